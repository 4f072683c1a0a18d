"""Distributed layer: Ray Train/Tune glue and MLflow experiment tracking (``tracking``)."""
