"""IQA-Spider."""
