"""The driver's view of every model: where each one is in its epoch, and what it may still do.

Pure state and arithmetic over it (no store, no processes): the lifecycle, recovery, control
requests and the loop all read and change the same :class:`Roster`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import training
from ..kinds import ModelStatus, Origin, UnitKind
from ..search import Trial
from ..store.checkpoints import state_path
from .grouping import Grouping
from .groups import PerGroup
from .scheduler import ModelSlot


@dataclass
class SplitSums:
    """Row-weighted metric sums of one split in one epoch, kept per shard."""

    by_shard: dict[int, tuple[int, dict[str, float]]] = field(default_factory=dict)

    def add(self, shard: int, rows: int, sums: dict[str, float]) -> None:
        self.by_shard[shard] = (rows, sums)

    def means(self, prefix: str) -> dict[str, float]:
        """``{prefix_name: mean}`` over every shard so far.

        Example:
            >>> split = SplitSums()
            >>> split.add(1, 10, {"loss": 5.0}); split.add(0, 30, {"loss": 3.0})
            >>> split.means("val")
            {'val_loss': 0.2}
        """
        # Added in shard order, not arrival order, so that float64 rounding, and so the
        # reported metrics, do not depend on which worker finished first.
        rows = sum(r for r, _ in self.by_shard.values())
        if not rows:
            return {}
        totals: dict[str, float] = {}
        for shard in sorted(self.by_shard):
            for name, value in self.by_shard[shard][1].items():
                totals[name] = totals.get(name, 0.0) + value
        return {f"{prefix}_{name}": value / rows for name, value in totals.items()}


@dataclass
class ModelRun:
    """One model as the driver tracks it between hops."""

    model_id: int
    params: dict[str, Any]
    state_path: str
    status: ModelStatus = ModelStatus.RUNNING
    epoch: int = 0  # the epoch it trains now (= epochs finished, at a boundary)
    phase: UnitKind = UnitKind.TRAIN
    remaining: list[int] = field(default_factory=list)  # shards left in this phase, in order
    busy: bool = False
    version: int = 0  # of its current state: training hops (and exploits) so far
    # Of its state file: the current version may run ahead, its state handed over in memory.
    durable_version: int = 0
    waiting: int | None = None  # the worker of its last hop, while it waits for durability
    waiting_with: tuple[int, ...] = ()  # the models of its unit that wait with it
    last_worker: int | None = None
    train: SplitSums = field(default_factory=SplitSums)
    val: SplitSums = field(default_factory=SplitSums)
    history: list[dict[str, float]] = field(default_factory=list)
    units_done: int = 0
    failures: int = 0  # consecutive units lost with a worker or not handed over
    origin: Origin = Origin.SEARCH
    parent: int | None = None  # a clone's source
    max_epochs: int | None = None  # its own budget, set by a person; None: the search's
    group: Any = None  # per_group=True: the group whose shards it trains on
    configuration: int | None = None  # per_group=True: which configuration it is (0, 1, ...)

    @property
    def folder(self) -> str:
        """Where the model's state and epoch checkpoints live."""
        return os.path.dirname(self.state_path)

    def trial(self, max_epochs: int | None) -> Trial:
        """What a search sees of this model, trained for at most ``max_epochs``."""
        return Trial(
            self.model_id,
            dict(self.params),
            self.status,
            list(self.history),
            origin=self.origin,
            max_epochs=max_epochs,
        )

    def start_epoch(self, train_order: list[int]) -> None:
        """Begin the next epoch's training phase (sums of the last one are cleared)."""
        self.train, self.val = SplitSums(), SplitSums()
        self.phase, self.remaining = UnitKind.TRAIN, list(train_order)


class Roster:
    """Every model of the experiment, and the rules that depend only on the experiment's shape:
    each model's epoch budget, shard order, and what the MOP scheduler is told.

    Args:
        checkpoint_dir: where model folders live.
        num_shards: training shards (every one is visited once per epoch).
        val_shards: validation shards that hold rows (each evaluated once per epoch).
        epochs: the experiment's epochs.
        search_epochs: the most epochs the search (or its scheduler) trains one of its own
            models, None if it has no limit of its own.
        seed, deterministic: deterministic mode fixes each epoch's shard order by the seed.
        grouping: which models may hop together (default: none, one model per unit).
        groups: ``per_group=True``: each model trains on its group's shards only, and the
            search sees one trial per configuration (see :mod:`.groups`).
    """

    def __init__(
        self,
        checkpoint_dir: str,
        num_shards: int,
        val_shards: frozenset[int],
        epochs: int,
        search_epochs: int | None,
        seed: int,
        deterministic: bool,
        grouping: Grouping | None = None,
        groups: PerGroup | None = None,
    ) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.train_shards = frozenset(range(num_shards))
        self.val_shards = val_shards
        self.epochs = epochs
        self.search_epochs = search_epochs
        self.seed = seed
        self.deterministic = deterministic
        self.grouping = grouping or Grouping(None, deterministic)
        self.groups = groups
        self.models: dict[int, ModelRun] = {}
        self._bundles: dict[int, list[int]] = {}  # the units slots() offered, by slot id
        self.changed = True  # models started, ended or paused since the search was last asked

    def new(self, params: dict[str, Any], origin: Origin, **fields: Any) -> ModelRun:
        """A model with the next id (not yet in the records)."""
        model_id = len(self.models)
        model = ModelRun(model_id, params, self.state_path(model_id), origin=origin, **fields)
        self.models[model_id] = model
        self.changed = True
        return model

    def state_path(self, model_id: int) -> str:
        return state_path(self.checkpoint_dir, model_id)

    def __getitem__(self, model_id: int) -> ModelRun:
        return self.models[model_id]

    def __iter__(self) -> Iterator[ModelRun]:
        return iter(self.models.values())

    def __len__(self) -> int:
        return len(self.models)

    def with_status(self, *statuses: ModelStatus) -> list[ModelRun]:
        return [m for m in self.models.values() if m.status in statuses]

    # Budgets and orders ------------------------------------------------------------------------

    def budget(self, model: ModelRun) -> int:
        """The epochs a model trains: its own (set by a person), its search's, the experiment's."""
        if model.max_epochs is not None:
            return model.max_epochs
        if model.origin is Origin.SEARCH and self.search_epochs is not None:
            return min(self.search_epochs, self.epochs)
        return self.epochs

    @property
    def units_per_epoch(self) -> int:
        return len(self.train_shards) + len(self.val_shards)

    def train_shards_of(self, model: ModelRun) -> frozenset[int]:
        """The training shards the model visits each epoch: all, or its group's."""
        if self.groups is None or model.group is None:
            return self.train_shards
        return self.groups[model.group].train

    def val_shards_of(self, model: ModelRun) -> frozenset[int]:
        """The validation shards (with rows) it is evaluated on: all, or its group's."""
        if self.groups is None or model.group is None:
            return self.val_shards
        return self.groups[model.group].val

    def units_per_epoch_of(self, model: ModelRun) -> int:
        return len(self.train_shards_of(model)) + len(self.val_shards_of(model))

    def configuration_count(self) -> int:
        """Configurations so far (per_group=True): the next one's number."""
        numbers = [m.configuration for m in self.models.values() if m.configuration is not None]
        return max(numbers, default=-1) + 1

    def train_order(self, model: ModelRun) -> list[int]:
        """The shards of the model's current epoch. Deterministic mode fixes their order by
        (seed, model, epoch), a fused cohort's by its anchor; free mode lets the scheduler take
        them in any order."""
        shards = sorted(self.train_shards_of(model))
        if not self.deterministic:
            return shards
        anchor = self.grouping.anchor(model.model_id)
        return training.shard_order(self.seed, anchor, model.epoch, shards)

    def units_total(self) -> int:
        """Units the run will have done: all of each live model's, what ended ones did."""
        return sum(
            m.units_done if m.status.ended_early else self.budget(m) * self.units_per_epoch_of(m)
            for m in self.models.values()
        )

    def epoch_started(self, model: ModelRun) -> bool:
        """Whether any unit of the model's current epoch has run or is running."""
        return (
            model.busy
            or model.epoch > len(model.history)
            or model.phase is not UnitKind.TRAIN
            or len(model.remaining) < len(self.train_shards_of(model))
        )

    # What the search and the scheduler see -----------------------------------------------------

    def trial(self, model: ModelRun) -> Trial:
        return model.trial(self.budget(model))

    def trials(self) -> list[Trial]:
        """What the search sees: one trial per model, or with ``per_group=True`` one per
        configuration (its metrics aggregated over groups, see :mod:`.groups`)."""
        if self.groups is not None:
            return self.groups.trials(self.models.values(), self.budget)
        return [self.trial(m) for m in self.models.values()]

    def schedulable(self) -> bool:
        """A running model waits for a worker (nothing in flight for it, shards left)."""
        return any(
            m.status is ModelStatus.RUNNING and not m.busy and m.remaining
            for m in self.models.values()
        )

    def slots(self, idle_workers: int = 1) -> list[ModelSlot]:
        """The MOP scheduler's view of the running models that wait for a worker: one slot per
        unit they would run as now (one model, or a bundle of fused ones; :meth:`bundle` gives
        its models), with the shards it may take next and how many units it has left (the
        longest go first). Models in a unit are left out: the scheduler has nothing to give
        them (this runs once per unit: 32 models' slots took 0.15 ms of the driver's 1.5)."""
        ready = [
            m
            for m in self.models.values()
            if m.status is ModelStatus.RUNNING and not m.busy and m.remaining
        ]
        self._bundles = {}
        slots = []
        for bundle in self.grouping.bundles(ready, idle_workers):
            first = bundle[0]
            self._bundles[first.model_id] = [m.model_id for m in bundle]
            work = max(self._priority(m) for m in bundle)
            slots.append(
                ModelSlot(first.model_id, self._eligible(first), False, work, first.last_worker)
            )
        return sorted(slots, key=lambda s: s.model_id)

    def bundle(self, slot_id: int) -> list[ModelRun]:
        """The models of the unit that :meth:`slots` offered as ``slot_id``."""
        return [self.models[i] for i in self._bundles.get(slot_id, [slot_id])]

    def _priority(self, m: ModelRun) -> int:
        """Units left, plus a share of an epoch that spreads models over it: the scheduler
        evens out what it is given, so models keep that far apart and end their epochs at
        different times (many ending at once leaves only short validation units to run while
        the driver records their epochs)."""
        val = len(self.val_shards_of(m))
        per_epoch = len(self.train_shards_of(m)) + val
        later = max(self.budget(m) - m.epoch - 1, 0) * per_epoch
        left = later + len(m.remaining) + (val if m.phase is UnitKind.TRAIN else 0)
        return left + m.model_id % per_epoch

    def _eligible(self, model: ModelRun) -> frozenset[int]:
        if self.deterministic and model.phase is UnitKind.TRAIN and model.remaining:
            return frozenset(model.remaining[:1])
        return frozenset(model.remaining)
