"""Automatic annotation pipeline: synthetic region distortions on pristine images and their annotations."""
