"""Search algorithms: which configurations to train, and what each model does after an epoch."""

from .base import Decision, EarlyStopping, FixedSearch, Search, SearchContext, Trial
from .early_stopping import MedianStopping
from .grid import GridSearch
from .halving import ASHA, Hyperband
from .pbt import PBT
from .random import RandomSearch
from .tpe import TPESearch

__all__ = [
    "ASHA",
    "PBT",
    "Decision",
    "EarlyStopping",
    "FixedSearch",
    "GridSearch",
    "Hyperband",
    "MedianStopping",
    "RandomSearch",
    "Search",
    "SearchContext",
    "TPESearch",
    "Trial",
]
