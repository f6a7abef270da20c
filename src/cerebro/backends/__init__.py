"""Where units run: local worker processes (the default)."""

from .base import Backend, StateSaved, Unit, UnitDone, WorkerInfo, WorkerLost
from .local import LocalBackend

__all__ = [
    "Backend",
    "LocalBackend",
    "StateSaved",
    "Unit",
    "UnitDone",
    "WorkerInfo",
    "WorkerLost",
]
