"""Supervised classification of good vs defective (or defect type), judged by cross-validation."""
