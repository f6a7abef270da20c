"""The driver loop, the pure MOP scheduler, and what hops with a model."""

from .experiment import Experiment
from .result import ModelRecord, Result, load

__all__ = ["Experiment", "ModelRecord", "Result", "load"]
