"""Search algorithms (which configurations to train) and schedulers (what each model does after
an epoch)."""

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes
from .base import Decision, EarlyStopping, FixedSearch, Scheduler, Search, SearchContext, Trial
from .early_stopping import MedianStopping
from .grid import GridSearch
from .halving import ASHA, Hyperband
from .pbt import PBT
from .random import RandomSearch

# TPE loads Optuna: only for runs that use it.
__getattr__, __dir__ = lazy_attributes(__name__, globals(), {"TPESearch": ".tpe"})

if TYPE_CHECKING:
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
    "Scheduler",
    "Search",
    "SearchContext",
    "TPESearch",
    "Trial",
]
