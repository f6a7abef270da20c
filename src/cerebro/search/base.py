"""The interfaces of search algorithms and schedulers.

A *search* is asked, whenever the driver could start models, which configurations to add. A
*scheduler* is asked, whenever a model ends an epoch, what that model does next (continue,
pause, stop, exploit). They compose as an Optuna sampler and pruner, or a Ray Tune search
algorithm and scheduler do: ``Experiment(search=TPESearch(...), scheduler=ASHA(...))``. A search
with no scheduler decides itself (the default: train every model to its ``max_epochs``).

Both decide from the trials recorded so far (their parameters, status and per-epoch metrics),
never from hidden state of their own, so that a resumed experiment decides what an uninterrupted
one would.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..history import metric_after
from ..kinds import Action, ModelStatus, Origin
from ..space import Dimension

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
        return metric_after(self.history, metric, len(self.history))


@dataclass(frozen=True)
class SearchContext:
    """What a search and a scheduler learn about the experiment they run in (given before the
    run starts).

    Attributes:
        metric, mode: the metric that ranks models, and ``"min"`` or ``"max"``.
        max_epochs: the experiment's ``epochs``.
        num_shards, num_workers: of the dataset and the backend.
        num_models: how many configurations the search proposes in all, if it says
            (:attr:`Search.num_models`; None when unknown). Hyperband as a scheduler sizes its
            brackets from it.
        space: the search's space, if it has one (PBT as a scheduler perturbs within it).
        scheduler_pauses: a scheduler may pause models until others catch up (ASHA,
            Hyperband). A search that keeps a number of models in flight then counts only the
            running ones, since paused ones would wait for the models it does not propose.

    ``score(value)`` turns a metric value into "larger is better" for either mode.
    """

    metric: str
    mode: str
    max_epochs: int
    num_shards: int
    num_workers: int
    num_models: int | None = None
    space: Mapping[str, Dimension] | None = field(default=None, compare=False)
    scheduler_pauses: bool = False

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


CONTINUE = Decision(Action.CONTINUE)


class Search(ABC):
    """Base class of search algorithms (grid, random, and adaptive ones).

    The driver calls :meth:`attach` once before the run, :meth:`propose` whenever the set of
    running models changes, and :meth:`decide` for a model that has just finished an epoch short
    of its ``max_epochs`` (and again, while it is paused, whenever new results arrive) when the
    experiment has no ``scheduler``.

    Attributes:
        max_epochs: the most epochs this search trains one of its models (None: the
            experiment's epochs).
        num_models: how many configurations it proposes in all (None when unknown); a
            scheduler may need it (see :class:`SearchContext`).
        space: the space it samples from (None if it has none).
    """

    context: SearchContext | None = None
    max_epochs: int | None = None
    num_models: int | None = None
    space: Mapping[str, Dimension] | None = None

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

    @property
    def proposes(self) -> bool:
        """Whether it proposes configurations (False for ASHA, Hyperband and PBT given without
        a space: those are schedulers, for ``Experiment(scheduler=...)``)."""
        return True

    @property
    def schedules(self) -> bool:
        """Whether it decides itself what its models do after an epoch (it overrides
        :meth:`decide`, as ASHA, Hyperband and PBT given a space do); such a search takes no
        ``scheduler``."""
        return type(self).decide is not Search.decide


class Scheduler(ABC):
    """Base class of schedulers: what a model does after an epoch, whatever search proposed it.

    A scheduler never proposes configurations. The driver calls :meth:`attach` once before the
    run (with the same context as the search, which tells the search's ``num_models`` and
    ``space``), then :meth:`decide` for a model that has just finished an epoch short of its
    ``max_epochs``, and again, while it is paused, whenever new results arrive. Decisions come
    from the trial records only, so that a resumed run decides the same.

    Attributes:
        max_epochs: the most epochs it trains one of the search's models (None: the search's,
            or else the experiment's epochs).
    """

    context: SearchContext | None = None
    max_epochs: int | None = None
    # Whether it may pause models until others catch up (see SearchContext.scheduler_pauses).
    pauses: bool = False

    def attach(self, context: SearchContext) -> None:
        """Learn the experiment's metric, mode, epochs, shards and the search's ``num_models``
        and ``space``. Raise ConfigError if this scheduler cannot run in it."""
        self.context = context

    @abstractmethod
    def decide(self, trial: Trial, trials: Sequence[Trial]) -> Decision:
        """What ``trial`` (which just finished an epoch, or is paused) does next.

        ``trials`` includes ``trial`` itself, with its newest epoch in its history.
        """

    def fingerprint(self) -> str:
        """Identifies the scheduler, so that a resumed experiment can check it is the same one."""
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


class EarlyStopping(Scheduler):
    """A rule that prunes models at epoch boundaries, usable with any search, as a scheduler
    (``Experiment(..., scheduler=cerebro.MedianStopping())``) or beside one
    (``early_stopping=``: asked first, after a model's new epoch only, then the scheduler)."""

    @abstractmethod
    def should_stop(self, trial: Trial, trials: Sequence[Trial]) -> str | None:
        """Why ``trial`` should stop after its newest epoch, or None to let it go on."""

    def decide(self, trial: Trial, trials: Sequence[Trial]) -> Decision:
        """Stop, with the rule's reason, or continue."""
        reason = self.should_stop(trial, trials)
        if reason:
            return Decision(Action.STOP, reason=f"{type(self).__name__}: {reason}")
        return CONTINUE
