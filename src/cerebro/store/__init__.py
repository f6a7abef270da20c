"""Experiment records (SQLAlchemy) and model checkpoints."""

from . import checkpoints, place
from .records import RecordStore, normalize_url, open_engine, sqlite_file, sqlite_url

__all__ = [
    "RecordStore",
    "checkpoints",
    "normalize_url",
    "open_engine",
    "place",
    "sqlite_file",
    "sqlite_url",
]
