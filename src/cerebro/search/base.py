"""The interface every search algorithm implements.

A search is asked, whenever the driver could start models, which configurations to add, and,
whenever a model ends an epoch, what that model should do next. It decides from the trials
recorded so far (their parameters, status and per-epoch metrics), never from hidden state of its
own, so that a resumed experiment decides what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..kinds import Action, ModelStatus, Origin

# The statuses under their short names (one definition: cerebro.kinds.ModelStatus).
RUNNING, PAUSED, COMPLETED, FAILED, STOPPED, PRUNED = (
    ModelStatus.RUNNING,
    ModelStatus.PAUSED,
    ModelStatus.COMPLETED,
    ModelStatus.FAILED,
    ModelStatus.STOPPED,
    ModelStatus.PRUNED,
)


@dataclass(frozen=True)
class Trial:
    """What a search may know about one model.

    Attributes:
        model_id: the model's id (0, 1, ... in the order models were added).
        params: its current hyper-parameters.
        status: one of running, paused, completed, failed, stopped, pruned.
        history: one dict per finished epoch, ``{"epoch": e, "val_loss": ..., ...}``, in order.
        origin: ``"search"`` if this search proposed it, ``"add"`` or ``"clone"`` if a person
            did (searches count only their own proposals against their budget).
        max_epochs: the epochs this model trains at most.
    """

    model_id: int
    params: dict[str, Any]
    status: ModelStatus
    history: list[dict[str, float]] = field(default_factory=list)
    origin: Origin = Origin.SEARCH
    max_epochs: int | None = None

    def __post_init__(self) -> None:
        # Plain strings (from the records, or a test) become the enums (frozen: set once here).
        object.__setattr__(self, "status", ModelStatus(self.status))
        object.__setattr__(self, "origin", Origin(self.origin))

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    def value(self, metric: str) -> float | None:
        """The metric at the last finished epoch; None if absent or not finite."""
        value = self.history[-1].get(metric) if self.history else None
        if value is None or not math.isfinite(value):
            return None
        return float(value)


@dataclass(frozen=True)
class SearchContext:
    """What a search learns about the experiment it runs in (given before the run starts).

    ``score(value)`` turns a metric value into "larger is better" for either mode.
    """

    metric: str
    mode: str
    max_epochs: int
    num_shards: int
    num_workers: int

    def score(self, value: float) -> float:
        return value if self.mode == "max" else -value


@dataclass(frozen=True)
class Decision:
    """What a model does after an epoch (see :meth:`Search.decide`).

    ``action``:
        ``"continue"``: train the next epoch.
        ``"pause"``: wait; the search is asked again whenever new results are recorded. A model
            still paused when nothing else can change is pruned.
        ``"stop"``: prune the model now (its checkpoints stay).
        ``"exploit"``: (PBT) copy the weights and optimizer state of model ``source`` as of its
            last finished epoch, switch to ``params``, then continue.
    """

    action: Action
    reason: str = ""
    source: int | None = None
    params: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        try:
            action = Action(self.action)
        except ValueError:
            raise ValueError(f"unknown decision action {self.action!r}") from None
        object.__setattr__(self, "action", action)  # frozen: the one place it is normalized
        if self.action is Action.EXPLOIT and (self.source is None or self.params is None):
            raise ValueError("an 'exploit' decision needs a source model and params")


CONTINUE = Decision("continue")


class Search(ABC):
    """Base class of search algorithms (grid, random, and adaptive ones).

    The driver calls :meth:`attach` once before the run, :meth:`propose` whenever the set of
    running models changes, and :meth:`decide` for a model that has just finished an epoch short
    of its ``max_epochs`` (and again, while it is paused, whenever new results arrive).
    """

    context: SearchContext | None = None
    # The most epochs this search trains one of its models (None: the experiment's epochs).
    max_epochs: int | None = None

    def attach(self, context: SearchContext) -> None:
        """Learn the experiment's metric, mode, epochs and shards. Raise ConfigError if this
        search cannot run in it (e.g. a ``max_epochs`` above the experiment's ``epochs``)."""
        self.context = context

    @abstractmethod
    def propose(self, trials: Sequence[Trial]) -> list[dict[str, Any]]:
        """Configurations to start now, given every trial so far (possibly none)."""

    @abstractmethod
    def is_finished(self, trials: Sequence[Trial]) -> bool:
        """True when this search will never propose another configuration."""

    def decide(self, trial: Trial, trials: Sequence[Trial]) -> Decision:
        """What ``trial`` (which just finished an epoch, or is paused) does next.

        ``trials`` includes ``trial`` itself, with its newest epoch in its history.
        The default trains every model to its ``max_epochs``.
        """
        return CONTINUE

    def fingerprint(self) -> str:
        """Identifies the search, so that a resumed experiment can check it is the same one."""
        return repr(self)


def own_trials(trials: Sequence[Trial]) -> list[Trial]:
    """The trials the search proposed itself (not added or cloned by a person)."""
    return [t for t in trials if t.origin is Origin.SEARCH]


class FixedSearch(Search):
    """A search whose configurations are all known up front (grid and random search)."""

    def configurations(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def propose(self, trials: Sequence[Trial]) -> list[dict[str, Any]]:
        return self.configurations()[len(own_trials(trials)) :]

    def is_finished(self, trials: Sequence[Trial]) -> bool:
        return len(own_trials(trials)) >= len(self.configurations())

    def fingerprint(self) -> str:
        text = json.dumps(self.configurations(), sort_keys=True, default=repr)
        return f"{type(self).__name__}:" + hashlib.sha256(text.encode()).hexdigest()[:16]


class EarlyStopping(ABC):
    """A rule that prunes models at epoch boundaries, usable with any search
    (``Experiment(..., early_stopping=cerebro.MedianStopping())``)."""

    context: SearchContext | None = None

    def attach(self, context: SearchContext) -> None:
        self.context = context

    @abstractmethod
    def should_stop(self, trial: Trial, trials: Sequence[Trial]) -> str | None:
        """Why ``trial`` should stop after its newest epoch, or None to let it go on."""
