"""Listeners on a run's events: the progress display, TensorBoard (and, next, MLflow)."""

from .base import Standing, Tracker, Trackers

__all__ = ["Standing", "Tracker", "Trackers"]
