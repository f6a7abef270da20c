"""Where units run: local worker processes (the default) or Ray actors (``RayBackend``, which
imports Ray only when created)."""

from .base import Backend, StateSaved, Unit, UnitDone, WorkerInfo, WorkerLost
from .local import LocalBackend
from .ray_backend import RayBackend

__all__ = [
    "Backend",
    "LocalBackend",
    "RayBackend",
    "StateSaved",
    "Unit",
    "UnitDone",
    "WorkerInfo",
    "WorkerLost",
]
