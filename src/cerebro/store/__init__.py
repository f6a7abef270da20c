"""Experiment records (SQLAlchemy) and model checkpoints."""

from .records import RecordStore, open_engine, sqlite_url

__all__ = ["RecordStore", "open_engine", "sqlite_url"]
