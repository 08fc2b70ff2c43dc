"""Segmentation network factories of fedseg, built by name from the run configuration."""
