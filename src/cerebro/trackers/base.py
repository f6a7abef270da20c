"""The interface of everything that watches a run: the progress display, TensorBoard, MLflow.

Before a run's loop starts, the experiment gives each tracker a :class:`RunInfo` (its name,
path, metric, records: :meth:`Tracker.attach`). The driver then tells its trackers what
happens, in this order: :meth:`Tracker.run_started`, then
any number of :meth:`~Tracker.plan`, :meth:`~Tracker.unit_done`, :meth:`~Tracker.epoch_ended`,
:meth:`~Tracker.model_ended` and :meth:`~Tracker.standings`, then :meth:`Tracker.run_finished`
(also when the run fails). Every method does nothing by default: a tracker implements the
events it cares about. A tracker only reads: what it is told is already in the records.

Example:
    >>> class EpochPrinter(Tracker):
    ...     def epoch_ended(self, model_id, epoch, metrics):
    ...         print(f"model {model_id} epoch {epoch}: {metrics}")
    >>> trackers = Trackers([EpochPrinter()])
    >>> trackers.epoch_ended(3, 0, {"val_loss": 0.25})
    model 3 epoch 0: {'val_loss': 0.25}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..kinds import ModelStatus

if TYPE_CHECKING:
    from ..store import RecordStore


@dataclass(frozen=True)
class RunInfo:
    """What a tracker may know of the run it watches (given by :meth:`Tracker.attach`).

    Attributes:
        name: the experiment's name.
        path: its folder.
        experiment_id: its id in the records (a rerun with ``overwrite=True`` gets a new one).
        created: when its records were created (seconds since the epoch).
        metric, mode: what ranks its models.
        epochs: the experiment's epoch budget.
        checkpoint_dir: where each model's state lives.
        store: its records, to read (a tracker never writes them).
    """

    name: str
    path: str
    experiment_id: int
    created: float
    metric: str
    mode: str
    epochs: int
    checkpoint_dir: str
    store: RecordStore


@dataclass(frozen=True)
class Standing:
    """What a display needs of one model.

    Attributes:
        status: its status now.
        last: the metric of its last recorded epoch (None before its first, or if not finite).
    """

    status: ModelStatus = ModelStatus.RUNNING
    last: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", ModelStatus(self.status))  # a plain string too


class Tracker:
    """A listener on a run's events (see the module's docstring for their order)."""

    def attach(self, info: RunInfo) -> None:
        """The run this tracker watches (told once per run, before :meth:`run_started`)."""

    def run_started(self) -> None:
        """The run's loop begins (models restored or registered, workers started)."""

    def plan(self, units_total: int) -> None:
        """The units the run will have done in all (it changes as models start and end)."""

    def unit_done(self, model_ids: tuple[int, ...], hops: int = 1) -> None:
        """A worker finished a unit of these models: ``hops`` hops (or validation passes) of
        each, one per shard of the unit."""

    def epoch_ended(self, model_id: int, epoch: int, metrics: dict[str, float]) -> None:
        """A model finished ``epoch`` (0-based) with these metrics (``train_loss``, ...)."""

    def model_ended(
        self,
        model_id: int,
        status: ModelStatus,
        params: dict[str, Any],
        history: list[dict[str, float]],
    ) -> None:
        """A model completed, failed, was stopped or pruned (``history``: one dict per finished
        epoch). It may come back (a person resumes it), and end again."""

    def standings(self, models: Mapping[int, Standing], epoch: int, epochs: int) -> None:
        """Every model's standing, and the furthest epoch in training (1-based) of ``epochs``
        (told a few times a second; the records' truth replaces earlier reports)."""

    def run_finished(self) -> None:
        """The loop ended (also after an error): flush and close what the tracker holds."""


class Trackers(Tracker):
    """Several trackers as one: each event goes to each, in order."""

    def __init__(self, trackers: Iterable[Tracker]) -> None:
        self.trackers = list(trackers)

    def attach(self, info: RunInfo) -> None:
        for tracker in self.trackers:
            tracker.attach(info)

    def run_started(self) -> None:
        for tracker in self.trackers:
            tracker.run_started()

    def plan(self, units_total: int) -> None:
        for tracker in self.trackers:
            tracker.plan(units_total)

    def unit_done(self, model_ids: tuple[int, ...], hops: int = 1) -> None:
        for tracker in self.trackers:
            tracker.unit_done(model_ids, hops)

    def epoch_ended(self, model_id: int, epoch: int, metrics: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.epoch_ended(model_id, epoch, metrics)

    def model_ended(
        self,
        model_id: int,
        status: ModelStatus,
        params: dict[str, Any],
        history: list[dict[str, float]],
    ) -> None:
        for tracker in self.trackers:
            tracker.model_ended(model_id, status, params, history)

    def standings(self, models: Mapping[int, Standing], epoch: int, epochs: int) -> None:
        for tracker in self.trackers:
            tracker.standings(models, epoch, epochs)

    def run_finished(self) -> None:
        # Every tracker is closed even if one fails; the first error is raised after.
        errors: list[BaseException] = []
        for tracker in self.trackers:
            try:
                tracker.run_finished()
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]
