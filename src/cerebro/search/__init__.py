"""Search algorithms: which configurations to train."""

from .base import FixedSearch, Search, Trial
from .grid import GridSearch
from .random import RandomSearch

__all__ = ["FixedSearch", "GridSearch", "RandomSearch", "Search", "Trial"]
