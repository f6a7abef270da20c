"""Sharded Parquet datasets and the loaders workers keep in memory."""

from .dataset import Dataset, Shard
from .prepare import prepare_data

__all__ = ["Dataset", "Shard", "prepare_data"]
