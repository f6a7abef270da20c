"""Sharded Parquet datasets and the loaders workers keep in memory."""

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes
from .dataset import Dataset, DatasetVersion, Shard
from .groups import GroupInfo

# Preparing loads pandas; workers only read shards.
__getattr__, __dir__ = lazy_attributes(__name__, globals(), {"prepare_data": ".prepare"})

if TYPE_CHECKING:
    from .prepare import prepare_data

__all__ = ["Dataset", "DatasetVersion", "GroupInfo", "Shard", "prepare_data"]
