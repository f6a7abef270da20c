"""The driver loop, the pure MOP scheduler, and what hops with a model."""

from .control import Controller, ControlRejected, ControlRequest, control
from .experiment import Experiment
from .result import ModelRecord, Result, load

__all__ = [
    "ControlRejected",
    "ControlRequest",
    "Controller",
    "Experiment",
    "ModelRecord",
    "Result",
    "control",
    "load",
]
