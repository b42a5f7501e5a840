"""Experiment tracking: MLflow runs, sweep parents and the Hydra app's stage cache."""
