"""Held-out evaluation: the job, its metrics beside chance, and the report people read."""
