"""Listeners on a run's events: the progress display, TensorBoard, MLflow, the dashboard."""

from .base import RunInfo, Standing, Tracker, Trackers

__all__ = ["RunInfo", "Standing", "Tracker", "Trackers"]
