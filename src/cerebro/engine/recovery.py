"""Resume: each model's progress rebuilt from its records and its state file.

A model's state file is the truth about its progress: it lists the shards its current epoch has
visited and what each of those hops measured (:class:`cerebro.state.Counters`). Hop records of
shards it has not visited (the run died before their state was written) are deleted, missing
ones (the state was written but not yet recorded) are re-inserted, and an interrupted
validation pass runs again from the start. A state file that is missing or damaged sends the
model back to its newest epoch checkpoint whose checksum matches, or to its initial state.
"""

from __future__ import annotations

import pickle
import traceback
import warnings
from dataclasses import dataclass
from typing import Any

import pandas as pd

from .. import training
from ..errors import first_line
from ..files import remove_partial_writes
from ..kinds import EventKind, ModelStatus, Origin, UnitKind
from ..state import Counters, HopRecord
from ..store import RecordStore, checkpoints
from ..store.checkpoint_keeper import CheckpointKeeper
from ..store.records import Snapshot, jsonable
from .building import ModelBuilder
from .groups import PerGroup
from .lifecycle import Lifecycle
from .roster import ModelRun, Roster

# What a missing or damaged state file raises when read (other errors, such as running out of
# file handles or permissions, are not evidence that the state is lost, and propagate).
UNUSABLE_STATE = (FileNotFoundError, EOFError, RuntimeError, pickle.UnpicklingError, KeyError)


@dataclass(frozen=True)
class ResumePoint:
    """Where a model goes on from, by its state's counters.

    Attributes:
        epoch: the epoch it trains next.
        hops: the training hops of ``epoch`` already done (in order).
        trained: every training shard of ``epoch`` is done: its validation pass is next.
        completed: it has trained its budget.
    """

    epoch: int
    hops: tuple[HopRecord, ...]
    trained: bool
    completed: bool

    @property
    def visited(self) -> list[int]:
        return [h.shard for h in self.hops]


def resume_point(
    counters: Counters, epochs_recorded: int, num_train_shards: int, budget: int
) -> ResumePoint:
    """Where a model resumes, from its state's counters and how many epochs its records hold.

    A state whose epoch has visited every training shard either waits for its validation pass
    (the epoch is not recorded yet) or starts the next epoch (it is). A recorded epoch is done
    whatever its shard count: after ``Dataset.append`` it visited fewer shards than there are
    now, and the next epoch visits them all.

    Example:
        >>> hop = HopRecord(shard=0, rows=10, sums={}, worker=0, start=0.0, end=1.0)
        >>> done = Counters(version=4, epoch=1, hops=(hop, hop))     # epoch 1 trained
        >>> resume_point(done, epochs_recorded=1, num_train_shards=2, budget=3).trained
        True
        >>> resume_point(done, epochs_recorded=2, num_train_shards=2, budget=3).epoch
        2
        >>> resume_point(done, epochs_recorded=2, num_train_shards=2, budget=2).completed
        True
        >>> resume_point(done, epochs_recorded=2, num_train_shards=3, budget=3).epoch  # grown
        2
    """
    epoch, hops = counters.epoch, counters.hops
    trained = len(hops) == num_train_shards
    if counters.version == 0:  # never trained: its counters may predate any epoch
        epoch, hops, trained = 0, (), False
    elif epochs_recorded > epoch:  # the epoch is recorded: the next one starts
        epoch, hops, trained = epoch + 1, (), False
    return ResumePoint(epoch, hops, trained, epoch >= budget)


class Recovery:
    """Rebuilds the roster of a recorded experiment and corrects the records to the states."""

    def __init__(
        self,
        roster: Roster,
        lifecycle: Lifecycle,
        builder: ModelBuilder,
        keeper: CheckpointKeeper,
        store: RecordStore,
    ) -> None:
        self.roster = roster
        self.lifecycle = lifecycle
        self.builder = builder
        self.keeper = keeper
        self.store = store

    def restore(self) -> None:
        """Every recorded model back in the roster, at the hop its state file holds."""
        records = self.store.snapshot()
        self.roster.grouping.restore(records.events)  # cohorts fix shard orders: read first
        if self.lifecycle.features is not None:
            self.lifecycle.features.restore(records.events)
        history: dict[int, list[dict[str, float]]] = {}
        for row in records.epochs:
            history.setdefault(row["model_id"], []).append(
                {"epoch": row["epoch"], **row["metrics"]}
            )
        groups = PerGroup.recorded(records.events) if self.roster.groups is not None else {}
        for row in records.models:
            model = self._model_from(row, history.get(row["model_id"], []))
            model.group, model.configuration = groups.get(model.model_id, (None, None))
            self.roster.models[model.model_id] = model
            remove_partial_writes(model.folder)
            saved = [c for c in records.checkpoints if c["model_id"] == model.model_id]
            # A checksum first taken now vouches for nothing (the file may have been damaged
            # since it was written): a lost state goes back only to checkpoints recorded before.
            recorded = {c["epoch"] for c in saved}
            self.keeper.record_missing(model.model_id, model.folder, len(model.history), recorded)
            if not model.status.is_final:  # stopped ones may be resumed later
                self._restore_progress(model, records, saved)

    def _model_from(self, row: dict[str, Any], history: list[dict[str, float]]) -> ModelRun:
        model_id = row["model_id"]
        return ModelRun(
            model_id,
            dict(row["params"]),
            self.roster.state_path(model_id),
            status=ModelStatus(row["status"]),
            origin=Origin(row["origin"] or Origin.SEARCH),
            parent=row["parent"],
            max_epochs=row["max_epochs"],
            history=history,
        )

    def _restore_progress(
        self, model: ModelRun, records: Snapshot, saved: list[dict[str, Any]]
    ) -> None:
        hops: pd.DataFrame = records.hops
        try:
            counters = Counters.from_dict(training.load_counters(model.state_path))
        except UNUSABLE_STATE as e:
            try:
                recovered = self._recover_state(model, saved, first_line(e))
            except Exception:
                self.lifecycle.fail(
                    model, f"its state could not be recovered:\n{traceback.format_exc()}"
                )
                return
            if recovered is None:
                return
            counters = recovered
            hops = hops.iloc[0:0]  # records of the discarded epochs are gone
        if counters.params is not None and jsonable(counters.params) != jsonable(model.params):
            # An exploit wrote the state, then the run died before recording its params.
            model.params = dict(counters.params)
            self.store.update_model(model.model_id, params=model.params)
            self.store.add_event(
                EventKind.EXPLOIT_RECOVERED.value, model=model.model_id, params=model.params
            )
            self.lifecycle.rekey(model)
        model.version = model.durable_version = counters.version
        point = resume_point(
            counters,
            len(model.history),
            len(self.roster.train_shards_of(model)),
            self.roster.budget(model),
        )
        model.epoch = point.epoch
        if point.completed:
            self.lifecycle.set_status(model, ModelStatus.COMPLETED)
            return
        self.store.delete_hops(model.model_id, model.epoch, keep_train_shards=point.visited)
        mine = hops[(hops.model_id == model.model_id) & (hops.epoch == model.epoch)]
        recorded = set(mine[mine.kind == UnitKind.TRAIN.value].shard)
        for hop in point.hops:
            model.train.add(hop.shard, hop.rows, hop.sums)
            if hop.shard not in recorded:
                self.lifecycle.record_hop(model.model_id, model.epoch, UnitKind.TRAIN, hop)
        per_epoch = self.roster.units_per_epoch_of(model)
        model.units_done = len(model.history) * per_epoch + len(point.hops)
        if point.trained:
            model.phase, model.remaining = UnitKind.EVAL, sorted(self.roster.val_shards_of(model))
            if not model.remaining:
                self.lifecycle.finish_epoch(model)
        else:
            model.phase = UnitKind.TRAIN
            order = self.roster.train_order(model)
            model.remaining = [s for s in order if s not in point.visited]

    def _recover_state(
        self, model: ModelRun, saved: list[dict[str, Any]], problem: str
    ) -> Counters | None:
        """A model whose state file is missing or unreadable goes back to its newest epoch
        checkpoint whose checksum matches (or to its initial state), with a warning."""
        good = next(
            (
                c
                for c in sorted(saved, key=lambda c: -c["epoch"])
                if not c["pruned"] and self.keeper.usable(c["path"], c["checksum"])
            ),
            None,
        )
        back_to = good["epoch"] if good else -1
        where = f"its epoch {back_to} checkpoint" if good else "its initial state"
        warnings.warn(
            f"model {model.model_id}: state file {model.state_path} is unusable ({problem}); "
            f"it restarts from {where}",
            RuntimeWarning,
            stacklevel=2,
        )
        self.store.add_event(
            EventKind.STATE_RECOVERED.value,
            model=model.model_id,
            problem=problem,
            from_epoch=back_to,
        )
        self.store.forget_epochs_after(model.model_id, back_to)
        model.history = model.history[: back_to + 1]
        if good:
            checkpoints.snapshot(good["path"], model.state_path)
        else:
            initial = self.builder.initial_state(model.model_id, model.params, strict=False)
            if initial.state is None:
                self.lifecycle.fail(model, f"it could not be rebuilt: {initial.error}")
                return None
            training.save_state(initial.state, model.state_path)
        return Counters.from_dict(training.load_counters(model.state_path))
