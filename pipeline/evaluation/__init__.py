"""Evaluation: generation, scoring, metrics, resampling (intervals and paired tests) and slices."""
