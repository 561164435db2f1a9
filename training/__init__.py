"""Training, evaluation, export and experiment tracking for the two-tower model."""
