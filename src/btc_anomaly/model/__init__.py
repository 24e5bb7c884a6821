"""Isolation Forest training, MLflow registry, promotion gate and the compiled scorer."""
