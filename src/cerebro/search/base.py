"""The interface every search algorithm implements.

A search is asked, whenever the driver could start models, which configurations to add. It
decides from the trials recorded so far (their parameters, status and per-epoch metrics), never
from hidden state of its own, so that a resumed experiment decides what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Trial:
    """What a search may know about one model: its parameters, status and metrics per epoch."""

    model_id: int
    params: dict[str, Any]
    status: str
    history: list[dict[str, float]] = field(default_factory=list)


class Search(ABC):
    """Base class of search algorithms (grid, random, and adaptive ones)."""

    @abstractmethod
    def propose(self, trials: Sequence[Trial]) -> list[dict[str, Any]]:
        """Configurations to start now, given every trial so far (possibly none)."""

    @abstractmethod
    def is_finished(self, trials: Sequence[Trial]) -> bool:
        """True when this search will never propose another configuration."""

    def fingerprint(self) -> str:
        """Identifies the search, so that a resumed experiment can check it is the same one."""
        return repr(self)


class FixedSearch(Search):
    """A search whose configurations are all known up front (grid and random search)."""

    def configurations(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def propose(self, trials: Sequence[Trial]) -> list[dict[str, Any]]:
        return self.configurations()[len(trials) :]

    def is_finished(self, trials: Sequence[Trial]) -> bool:
        return len(trials) >= len(self.configurations())

    def fingerprint(self) -> str:
        text = json.dumps(self.configurations(), sort_keys=True, default=repr)
        return f"{type(self).__name__}:" + hashlib.sha256(text.encode()).hexdigest()[:16]
