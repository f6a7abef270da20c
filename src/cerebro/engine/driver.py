"""The driver loop: asks the search for models, the scheduler for assignments, sends units to
the backend and records every hop and epoch in the store.

A model's life: for each epoch, one training hop on every training shard (order chosen by the
scheduler), then one evaluation pass on every non-empty validation shard, then its epoch metrics
are recorded and it starts the next epoch at once (no barrier with other models).
"""

from __future__ import annotations

import os
import pickle
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import files, training
from ..backends.base import Backend, StateSaved, Unit, UnitDone, WorkerInfo, WorkerLost
from ..data import Dataset
from ..errors import ConfigError, first_line
from ..files import remove_partial_writes
from ..progress import RunProgress, Standing
from ..search import Search, Trial
from ..search.base import (
    COMPLETED,
    FAILED,
    PAUSED,
    PRUNED,
    RUNNING,
    STOPPED,
    Decision,
    EarlyStopping,
    Scheduler,
)
from ..spec import ModelSpec
from ..store import RecordStore, checkpoints
from ..store.checkpoints import state_path
from ..store.records import jsonable
from ..store.tensorboard import TensorBoardLog
from .control import ControlRejected
from .identity import Fingerprints
from .preflight import Preflight, naming
from .result import finite, last_metrics, ranking_key
from .scheduler import ModelSlot, WorkerSlot, place_shards, schedule

_POLL_S = 0.5
_CONTROL_POLL_S = 0.25  # how often the records are checked for a person's requests
# What a missing or damaged state file raises when read (other errors, such as running out of
# file handles or permissions, are not evidence that the state is lost, and propagate).
_UNUSABLE_STATE = (FileNotFoundError, EOFError, RuntimeError, pickle.UnpicklingError, KeyError)
_CPU = torch.device("cpu")


@dataclass
class _Split:
    """Row-weighted sums of one split in one epoch, kept per shard."""

    by_shard: dict[int, tuple[int, dict[str, float]]] = field(default_factory=dict)

    def add(self, shard: int, rows: int, sums: dict[str, float]) -> None:
        self.by_shard[shard] = (rows, sums)

    def means(self, prefix: str) -> dict[str, float]:
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
class _Model:
    model_id: int
    params: dict[str, Any]
    state_path: str
    status: str = "running"
    epoch: int = 0
    phase: str = "train"
    remaining: list[int] = field(default_factory=list)  # shards left in this phase, in order
    busy: bool = False
    version: int = 0
    last_worker: int | None = None
    train: _Split = field(default_factory=_Split)
    val: _Split = field(default_factory=_Split)
    history: list[dict[str, float]] = field(default_factory=list)
    units_done: int = 0
    failures: int = 0  # consecutive units lost with a worker
    origin: str = "search"  # or "add" / "clone" (a person's)
    parent: int | None = None  # a clone's source
    max_epochs: int | None = None  # its own budget; None: the experiment's epochs
    stop_request: dict[str, Any] | None = None  # a stop control waiting for the hop to end

    @property
    def folder(self) -> str:
        """Where the model's state and epoch checkpoints live."""
        return os.path.dirname(self.state_path)


# A configuration the search proposed: the model, its initial state, or why it has none.
_Built = tuple[_Model, dict[str, Any] | None, str | None]


@dataclass
class RunConfig:
    """What the driver needs from an Experiment (already validated)."""

    build: Callable[[dict[str, Any]], ModelSpec]
    dataset: Dataset
    search: Search
    epochs: int
    metric: str
    mode: str
    seed: int
    checkpoint_dir: str
    deterministic: bool = False
    max_unit_failures: int = 3
    keep_checkpoints: str | int = "last_and_best"
    early_stopping: EarlyStopping | None = None
    checkpoint_mirror: checkpoints.Mirror | None = None
    scheduler: Scheduler | None = None


class Driver:
    """Runs one experiment: :meth:`prepare`, :meth:`start_workers`, then :meth:`run`."""

    def __init__(
        self,
        config: RunConfig,
        backend: Backend,
        progress: RunProgress,
        tensorboard: TensorBoardLog | None = None,
    ) -> None:
        self.config = config
        self.tensorboard = tensorboard
        self.backend = backend
        self.progress = progress
        self._store: RecordStore | None = None  # attached by restore() or run()
        self._prepared: list[_Built] = []
        self.preflight = Preflight(config.dataset, config.build)
        self.fingerprints = Fingerprints()  # of every model built (the config keeps the first)
        self.train_shards = frozenset(range(config.dataset.num_shards))
        val_rows = config.dataset.shard_rows("val")
        self.val_shards = frozenset(s for s, n in enumerate(val_rows) if n > 0)
        self.models: dict[int, _Model] = {}
        self.in_flight: dict[int, Unit] = {}
        self._computed: set[int] = set()  # in-flight training units whose UnitDone arrived
        # Epoch checkpoints whose checksum is being computed: (model, epoch, path) -> future.
        self._checksums: dict[tuple[int, int, str], Future[str]] = {}
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cerebro-checksum")
        self.busy_workers: set[int] = set()
        self._next_unit = 0
        self._roster_changed = True  # ask the search for configurations at the next chance
        self._copies_removed: dict[int, set[int]] = {}  # mirror copies pruned, by model
        self._controls_checked = 0.0

    @property
    def store(self) -> RecordStore:
        """The experiment's records, attached by :meth:`restore` or :meth:`run`."""
        if self._store is None:
            raise RuntimeError("the driver has no records yet: call restore() or run() first")
        return self._store

    # Models ------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Build the search's first configurations and check them; writes nothing.

        The search (and early-stopping rule) must be attached to the experiment already.
        A ``build`` that returns something other than a ModelSpec, a spec that cannot produce
        the experiment's metric, or one that fails a trial training step (see ``preflight``)
        raises ConfigError here, before any record or state is written.
        """
        self._prepared = self._build_proposals(strict=True)

    def _build_proposals(self, strict: bool, trials: list[Trial] | None = None) -> list[_Built]:
        """Ask the search for configurations; build each into (model, initial state, error)."""
        built = []
        for params in self.config.search.propose(self.trials() if trials is None else trials):
            model = self._new_model(dict(params), origin="search")
            built.append((model, *self._initial_state(model, strict)))
        return built

    def _new_model(self, params: dict[str, Any], origin: str, **fields: Any) -> _Model:
        model_id = len(self.models)
        path = state_path(self.config.checkpoint_dir, model_id)
        model = _Model(model_id, params, path, origin=origin, **fields)
        self.models[model_id] = model
        self._roster_changed = True
        return model

    def _initial_state(
        self, model: _Model, strict: bool
    ) -> tuple[dict[str, Any] | None, str | None]:
        seed = training.init_seed(self.config.seed, model.model_id)
        try:
            torch.manual_seed(seed)
            spec = self.config.build(dict(model.params))
        except ConfigError as e:  # ModelSpec refused a field: reported as the checks below are
            if strict:
                raise naming(e, model.params) from e
            return None, str(naming(e, model.params))
        except Exception:
            return None, traceback.format_exc()
        try:
            training.check_is_spec(spec, self.config.build)
            check_metric(self.config.metric, spec, has_validation=bool(self.val_shards))
        except ConfigError as e:
            if strict:
                raise
            return None, str(e)
        self.fingerprints.add(model.model_id, model.params, spec)
        counters = {"version": 0, "epoch": 0, "init_seed": seed}
        state = training.capture_state(spec, counters, _CPU)
        try:
            self.preflight.check(spec, model.params)  # a trial step on copies, after the capture
        except ConfigError as e:
            if strict:
                raise
            return None, str(e)
        return state, None

    def _register(self, model: _Model, state: dict[str, Any] | None, error: str | None) -> None:
        """Write a new model's initial state and record; a model that could not be built fails."""
        if state is not None:
            try:
                training.save_state(state, model.state_path)
            except Exception:
                error = traceback.format_exc()
        if error is not None:
            model.status = FAILED
        else:
            model.remaining = self._train_order(model)
        self.store.add_model(
            model.model_id,
            model.params,
            model.status,
            error,
            origin=model.origin,
            parent=model.parent,
            max_epochs=model.max_epochs,
        )

    def _add_models(self, built: list[_Built]) -> int:
        for entry in built:
            self._register(*entry)
        self._update_total()
        return len(built)

    def restore(self, store: RecordStore) -> None:
        """Continue a recorded experiment: rebuild every model from the records and its state
        file, and correct the records to what the state files hold.

        A model's state file is the truth about its progress: it lists the shards its current
        epoch has visited and what each of those hops measured. Hop records of shards it has not
        visited (the run died before their state was written) are deleted, missing ones (the
        state was written but not yet recorded) are re-inserted, and an interrupted validation
        pass is run again from the start.
        """
        self._store = store
        records = store.snapshot()
        history: dict[int, list[dict[str, float]]] = {}
        for row in records.epochs:
            history.setdefault(row["model_id"], []).append(
                {"epoch": row["epoch"], **row["metrics"]}
            )
        for row in records.models:
            model_id = row["model_id"]
            model = _Model(
                model_id, dict(row["params"]), state_path(self.config.checkpoint_dir, model_id)
            )
            model.status = row["status"]
            model.origin = row["origin"] or "search"
            model.parent = row["parent"]
            model.max_epochs = row["max_epochs"]
            model.history = history.get(model_id, [])
            self.models[model_id] = model
            remove_partial_writes(model.folder)
            saved = [c for c in records.checkpoints if c["model_id"] == model_id]
            # A checksum first taken now vouches for nothing (the file may have been damaged
            # since it was written): a lost state goes back only to checkpoints recorded before.
            self._record_missing_checkpoints(model, saved)
            if model.status not in (COMPLETED, FAILED):  # stopped ones may be resumed later
                self._restore_progress(model, records.hops, saved)

    def _restore_progress(self, model: _Model, hops: Any, saved: list[dict[str, Any]]) -> None:
        try:
            counters = training.load_state(model.state_path)["counters"]
        except _UNUSABLE_STATE as e:
            try:
                counters = self._recover_state(model, saved, first_line(e))
            except Exception:
                self._fail(model, f"its state could not be recovered:\n{traceback.format_exc()}")
                return
            if counters is None:
                return
            hops = hops.iloc[0:0]  # records of the discarded epochs are gone
        if "params" in counters and jsonable(counters["params"]) != jsonable(model.params):
            # An exploit wrote the state, then the run died before recording its params.
            model.params = dict(counters["params"])
            self.store.update_model(model.model_id, params=model.params)
            self.store.add_event("exploit_recovered", model=model.model_id, params=model.params)
        done_hops = counters.get("hops", [])
        model.version = counters["version"]
        model.epoch = counters["epoch"]
        epoch_trained = len(done_hops) == len(self.train_shards)
        if model.version == 0:
            model.epoch, done_hops, epoch_trained = 0, [], False
        elif epoch_trained and len(model.history) > model.epoch:
            model.epoch, done_hops, epoch_trained = model.epoch + 1, [], False  # epoch recorded
        if model.epoch >= self._budget(model):
            model.status = COMPLETED
            self.store.set_model_status(model.model_id, COMPLETED)
            return
        visited = [h["shard"] for h in done_hops]
        self.store.delete_hops(model.model_id, model.epoch, keep_train_shards=visited)
        mine = hops[(hops.model_id == model.model_id) & (hops.epoch == model.epoch)]
        recorded = set(mine[mine.kind == "train"].shard)
        for hop in done_hops:
            model.train.add(hop["shard"], hop["rows"], hop["sums"])
            if hop["shard"] not in recorded:
                self._record_hop(model.model_id, model.epoch, "train", hop)
        model.units_done = len(model.history) * (len(self.train_shards) + len(self.val_shards))
        model.units_done += len(done_hops)
        if epoch_trained:
            model.phase, model.remaining = "eval", sorted(self.val_shards)
            if not model.remaining:
                self._finish_epoch(model)
        else:
            model.phase = "train"
            model.remaining = [s for s in self._train_order(model) if s not in visited]

    def _record_missing_checkpoints(self, model: _Model, saved: list[dict[str, Any]]) -> None:
        """Epoch checkpoints written before a crash but never recorded get their checksum now."""
        recorded = {c["epoch"] for c in saved}
        model_dir = model.folder
        for epoch in range(len(model.history)):
            path = checkpoints.epoch_path(model_dir, epoch)
            if epoch not in recorded and files.exists(path):
                digest = self._checksum_and_copy(path)  # the copy may not have been made
                self.store.add_checkpoint(model.model_id, epoch, path, digest, files.size(path))

    def _recover_state(
        self, model: _Model, saved: list[dict[str, Any]], problem: str
    ) -> dict[str, Any] | None:
        """A model whose state file is missing or unreadable goes back to its newest epoch
        checkpoint whose checksum matches (or to its initial state), with a warning."""
        good = next(
            (
                c
                for c in sorted(saved, key=lambda c: -c["epoch"])
                if not c["pruned"] and self._usable_checkpoint(c["path"], c["checksum"])
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
            "state_recovered", model=model.model_id, problem=problem, from_epoch=back_to
        )
        self.store.forget_epochs_after(model.model_id, back_to)
        model.history = model.history[: back_to + 1]
        if good:
            checkpoints.snapshot(good["path"], model.state_path)
        else:
            state, error = self._initial_state(model, strict=False)
            if state is None:
                self._fail(model, f"it could not be rebuilt: {error}")
                return None
            training.save_state(state, model.state_path)
        return training.load_state(model.state_path)["counters"]

    def _usable_checkpoint(self, path: str, expected: str) -> bool:
        """The local copy matches its checksum, or the mirror's copy does (and is fetched)."""
        if checkpoints.verified(path, expected):
            return True
        mirror = self.config.checkpoint_mirror
        try:
            return mirror is not None and mirror.fetch(path, expected)
        except Exception as e:  # an unreachable mirror: recover from what is left locally
            warnings.warn(f"checkpoint mirror: {path} not fetched: {e}", stacklevel=2)
            return False

    def trials(self) -> list[Trial]:
        return [self._trial(m) for m in self.models.values()]

    def _trial(self, m: _Model) -> Trial:
        return Trial(
            m.model_id,
            dict(m.params),
            m.status,
            list(m.history),
            origin=m.origin,
            max_epochs=self._budget(m),
        )

    def _budget(self, model: _Model) -> int:
        """The epochs a model trains: its own (set by a person), its search's, the experiment's."""
        if model.max_epochs is not None:
            return model.max_epochs
        limit = self.config.search.max_epochs
        scheduler = self.config.scheduler
        if scheduler is not None and scheduler.max_epochs is not None:
            limit = scheduler.max_epochs
        if model.origin == "search" and limit is not None:
            return min(limit, self.config.epochs)
        return self.config.epochs

    # Main loop ---------------------------------------------------------------------------------

    def needs_workers(self, store: RecordStore) -> bool:
        """Whether a restored run has anything to train: a model running or paused, a search
        that would propose more, or a person's request waiting (prepare() must have run)."""
        if self._prepared or store.controls(pending_only=True):
            return True
        if any(m.status in (RUNNING, PAUSED) for m in self.models.values()):
            return True
        return not self.config.search.is_finished(self.trials())

    def start_workers(self) -> None:
        """Start the backend's workers, each loading its shards (nothing is recorded yet)."""
        placement = place_shards(self.config.dataset.num_shards, self.backend.num_workers)
        self.workers: list[WorkerInfo] = self.backend.start(
            self.config.dataset.path,
            placement,
            self.config.build,
            self.config.deterministic,
            state_dir=self.config.checkpoint_dir,
        )

    def run(self, store: RecordStore) -> None:
        """Train until every model is completed or failed; stops the workers in the end."""
        self._store = store
        try:
            self._add_models(self._prepared)
            self.progress.start()
            try:
                self._loop()
            finally:
                self.progress.stop()
                self._hasher.shutdown(wait=True)
                self._record_checkpoints(wait=True)  # also after an error: nothing is lost
        except BaseException:
            self.backend.shutdown(graceful=False)
            raise
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
        self.backend.shutdown()

    def _loop(self) -> None:
        while True:
            self._apply_controls()
            if self._roster_changed:
                # Models started, ended or paused: paused ones may go on, the search may add.
                self._roster_changed = False
                self._review_paused()
                trials = self.trials()
                if not self.config.search.is_finished(trials):
                    self._add_models(self._build_proposals(strict=False, trials=trials))
            for assignment in schedule(self._model_slots(), self._worker_slots()):
                self._submit(assignment.model_id, assignment.worker_id, assignment.shard)
            if not self.in_flight:
                if self._roster_changed or self._schedulable():
                    continue
                if self._prune_waiting():  # nothing else can change what they wait for
                    continue
                self._apply_controls(now=True)  # a last look before the run ends
                if self._roster_changed or self._schedulable():
                    continue
                return
            for event in self.backend.poll(_POLL_S):
                self._handle(event)
            self._record_checkpoints()
            self._show_status()

    def _schedulable(self) -> bool:
        return any(m.status == RUNNING and not m.busy and m.remaining for m in self.models.values())

    def _model_slots(self) -> list[ModelSlot]:
        per_epoch = len(self.train_shards) + len(self.val_shards)
        slots = []
        for m in self.models.values():
            if m.status != RUNNING:
                continue
            later = max(self._budget(m) - m.epoch - 1, 0) * per_epoch
            this = len(m.remaining) + (len(self.val_shards) if m.phase == "train" else 0)
            slots.append(
                ModelSlot(m.model_id, self._eligible(m), m.busy, later + this, m.last_worker)
            )
        return slots

    def _train_order(self, model: _Model) -> list[int]:
        """The shards of the model's next epoch. Deterministic mode fixes their order by
        (seed, model, epoch); free mode lets the scheduler take them in any order."""
        shards = sorted(self.train_shards)
        if not self.config.deterministic:
            return shards
        return training.shard_order(self.config.seed, model.model_id, model.epoch, shards)

    def _eligible(self, model: _Model) -> frozenset[int]:
        if self.config.deterministic and model.phase == "train" and model.remaining:
            return frozenset(model.remaining[:1])
        return frozenset(model.remaining)

    def _worker_slots(self) -> list[WorkerSlot]:
        return [
            WorkerSlot(w.worker_id, w.shards, w.worker_id in self.busy_workers)
            for w in self.workers
        ]

    def _submit(self, model_id: int, worker_id: int, shard: int) -> None:
        model = self.models[model_id]
        model.remaining.remove(shard)
        model.busy = True
        self.busy_workers.add(worker_id)
        unit = Unit(
            unit_id=self._next_unit,
            model_id=model_id,
            kind=model.phase,
            epoch=model.epoch,
            shard=shard,
            worker_id=worker_id,
            params=model.params,
            state_path=model.state_path,
            version=model.version,
            shuffle_seed=training.shuffle_seed(self.config.seed, model_id, model.epoch, shard),
            end_of_epoch=model.phase == "train" and not model.remaining,
            rng_seed=(
                training.hop_rng_seed(self.config.seed, model_id, model.epoch, shard)
                if self.config.deterministic
                else None
            ),
        )
        self._next_unit += 1
        self.in_flight[unit.unit_id] = unit
        self.backend.submit(unit)

    # Events ------------------------------------------------------------------------------------

    def _handle(self, event: UnitDone | StateSaved | WorkerLost) -> None:
        if isinstance(event, WorkerLost):
            self._worker_lost(event)
            return
        if event.unit_id not in self.in_flight:
            return  # a unit already given up with its worker
        unit = self.in_flight[event.unit_id]
        model = self.models[unit.model_id]
        if isinstance(event, UnitDone):
            self.busy_workers.discard(unit.worker_id)
            model.units_done += 1
            self.progress.advance()
            if not event.ok:
                self.in_flight.pop(unit.unit_id)
                self._fail(model, f"{unit.kind} unit on shard {unit.shard} failed:\n{event.error}")
                return
            self._record_hop(unit.model_id, unit.epoch, unit.kind, event.hop(unit.shard))
            if unit.kind == "train":
                self._computed.add(unit.unit_id)
            split = model.train if unit.kind == "train" else model.val
            split.add(unit.shard, event.rows, event.sums)
            if unit.kind == "eval":
                self.in_flight.pop(unit.unit_id)
                self._unit_finished(model, unit)
        else:
            self.in_flight.pop(unit.unit_id)
            self._computed.discard(unit.unit_id)
            if not event.ok:
                self.store.delete_hop(unit.model_id, unit.epoch, "train", unit.shard)
                self._fail(
                    model, f"saving the state after shard {unit.shard} failed:\n{event.error}"
                )
                return
            self.store.set_hop_save_time(unit.model_id, unit.epoch, unit.shard, event.save_s)
            model.version = unit.version + 1
            self._unit_finished(model, unit)

    def _checkpoint_epoch(self, model: _Model) -> None:
        """Keep the model's end-of-epoch state; its checksum is computed off the loop.
        A checkpoint that cannot be written is a warning: training goes on without it."""
        path = checkpoints.epoch_path(model.folder, model.epoch)
        try:
            checkpoints.snapshot(model.state_path, path)
        except OSError as e:
            warnings.warn(
                f"model {model.model_id}: epoch checkpoint not written: {e}", stacklevel=2
            )
            return
        key = (model.model_id, model.epoch, path)
        self._checksums[key] = self._hasher.submit(self._checksum_and_copy, path)

    def _checksum_and_copy(self, path: str) -> str:
        """(On the checksum thread.) A checkpoint's checksum; then its copy on the mirror."""
        digest = checkpoints.checksum(path)
        if self.config.checkpoint_mirror is not None:
            try:
                self.config.checkpoint_mirror.upload(path)
            except Exception as e:  # the local checkpoint is still there: warn, go on
                warnings.warn(f"checkpoint mirror: {path} not copied: {e}", stacklevel=2)
        return digest

    def _remove_copy(self, path: str) -> None:
        mirror = self.config.checkpoint_mirror
        assert mirror is not None  # submitted only by _prune_copies, which runs with a mirror
        try:
            mirror.remove(path)
        except Exception as e:
            warnings.warn(f"checkpoint mirror: copy of {path} not pruned: {e}", stacklevel=2)

    def _record_checkpoints(self, wait: bool = False) -> None:
        """Record checkpoints whose checksum is ready, then prune by the keep-policy."""
        for key in [k for k, f in self._checksums.items() if wait or f.done()]:
            model_id, epoch, path = key
            try:
                digest = self._checksums.pop(key).result()
                self.store.add_checkpoint(model_id, epoch, path, digest, files.size(path))
                self._prune(self.models[model_id])
            except OSError as e:
                warnings.warn(f"model {model_id}: epoch {epoch} checkpoint: {e}", stacklevel=2)

    def _prune(self, model: _Model) -> None:
        model_dir = model.folder
        present = [
            e
            for e in range(len(model.history))
            if files.exists(checkpoints.epoch_path(model_dir, e))
        ]
        pending = {e for (m, e, _) in self._checksums if m == model.model_id}
        keep = checkpoints.epochs_to_keep(
            self.config.keep_checkpoints, present, self._best_epoch(model)
        )
        dropped = [e for e in present if e not in keep and e not in pending]
        for epoch in dropped:
            files.remove(checkpoints.epoch_path(model_dir, epoch))
        if dropped:
            self.store.set_checkpoints_pruned(model.model_id, dropped)
        if self.config.checkpoint_mirror is not None:
            self._prune_copies(model, pending)

    def _prune_copies(self, model: _Model, pending: set[int]) -> None:
        """Apply the keep-policy to the mirror's copies, over every epoch rather than the local
        files (a copy may outlive its local file: a crash between the two removals, or a
        model folder lost and recovered). Each copy is looked at once per run."""
        wanted = checkpoints.epochs_to_keep(
            self.config.keep_checkpoints, range(len(model.history)), self._best_epoch(model)
        )
        removed = self._copies_removed.setdefault(model.model_id, set())
        for epoch in range(len(model.history)):
            if epoch not in wanted and epoch not in pending and epoch not in removed:
                removed.add(epoch)
                path = checkpoints.epoch_path(model.folder, epoch)
                self._hasher.submit(self._remove_copy, path)

    def _best_epoch(self, model: _Model) -> int | None:
        scored = [h for h in model.history if finite(h.get(self.config.metric))]
        if not scored:
            return None
        rank = ranking_key(self.config.mode)
        return int(min(scored, key=lambda h: rank(h[self.config.metric]))["epoch"])

    def _log_hparams(self, model: _Model) -> None:
        if self.tensorboard is not None and model.history:
            self.tensorboard.finish(model.model_id, model.params, last_metrics(model.history))

    def _record_hop(self, model_id: int, epoch: int, kind: str, hop: dict[str, Any]) -> None:
        rows = hop["rows"]
        self.store.add_hop(
            model_id=model_id,
            epoch=epoch,
            kind=kind,
            shard=hop["shard"],
            worker=hop["worker"],
            start=hop["start"],
            end=hop["end"],
            rows=rows,
            load_s=hop["load_s"],
            save_s=None,
            metrics={k: v / rows for k, v in hop["sums"].items()} if rows else {},
        )

    def _worker_lost(self, event: WorkerLost) -> None:
        """Units on a dead worker: count a hop whose state was written, run the others again
        from the state they started from (the replacement worker holds the same shards)."""
        # A worker lost while starting ran nothing: units sent since are on its replacement.
        on_it = [u for u in self.in_flight.values() if u.worker_id == event.worker_id]
        lost = [] if event.while_starting else on_it
        self.store.add_event(
            "worker_lost",
            worker=event.worker_id,
            exitcode=event.exitcode,
            reason=event.reason,
            units=[
                {"model": u.model_id, "kind": u.kind, "epoch": u.epoch, "shard": u.shard}
                for u in lost
            ],
        )
        if event.while_starting:
            return
        self.busy_workers.discard(event.worker_id)
        for unit in lost:
            self.in_flight.pop(unit.unit_id)
            computed = unit.unit_id in self._computed
            self._computed.discard(unit.unit_id)
            model = self.models[unit.model_id]
            if unit.kind == "train":
                try:
                    counters = training.load_state(model.state_path)["counters"]
                except _UNUSABLE_STATE:
                    counters = {"version": unit.version}  # the write did not complete
                if counters["version"] == unit.version + 1:  # written before the worker died
                    if not computed:
                        hop = counters["hops"][-1]
                        self._record_hop(unit.model_id, unit.epoch, "train", hop)
                        model.train.add(hop["shard"], hop["rows"], hop["sums"])
                    model.version = unit.version + 1
                    self._unit_finished(model, unit)
                    continue
                if computed:  # recorded, but its state was never written: forget it
                    self.store.delete_hop(unit.model_id, unit.epoch, "train", unit.shard)
                    model.train.by_shard.pop(unit.shard, None)
            model.busy = False
            model.failures += 1
            if model.failures >= self.config.max_unit_failures:
                self._fail(
                    model,
                    f"{unit.kind} unit on shard {unit.shard} lost its worker "
                    f"{model.failures} times in a row (last exit code {event.exitcode})",
                )
                continue
            model.remaining.insert(0, unit.shard)  # it is the model's next shard again
            self._answer_stop_request(model)

    def _unit_finished(self, model: _Model, unit: Unit) -> None:
        model.failures = 0
        model.busy = False
        model.last_worker = unit.worker_id
        if model.status == RUNNING and not model.remaining:
            if model.phase == "train" and self.val_shards:
                model.phase = "eval"
                model.remaining = sorted(self.val_shards)
            else:
                self._finish_epoch(model)
        self._answer_stop_request(model)

    def _finish_epoch(self, model: _Model) -> None:
        """Record the epoch and what the model does next (one transaction), then go on.

        The model is left at the start of its next epoch whatever is decided, so that a paused,
        stopped or pruned model can later resume from there.
        """
        metrics = {**model.train.means("train"), **model.val.means("val")}
        epoch = model.epoch
        model.history.append({"epoch": epoch, **metrics})
        self._checkpoint_epoch(model)  # before an exploit replaces the state file
        self.progress.epoch_done(model.model_id, metrics.get(self.config.metric))
        if self.tensorboard is not None:
            self.tensorboard.epoch(model.model_id, epoch, metrics)
        model.train, model.val = _Split(), _Split()
        model.epoch += 1
        model.phase, model.remaining = "train", self._train_order(model)
        self._roster_changed = True
        decision = None
        if model.epoch >= self._budget(model):
            model.status, model.remaining = COMPLETED, []
            event = None
        else:
            decision = self._decide(model, fresh=True)
            event = self._take(model, decision)
        recorded = None if model.status == RUNNING else model.status
        self.store.add_epoch(model.model_id, epoch, metrics, recorded, event)
        if decision is not None and decision.action == "exploit":
            self._exploit(model, decision)
        if model.status != RUNNING:
            self._model_ended(model)

    def _decide(self, model: _Model, fresh: bool, trials: list[Trial] | None = None) -> Decision:
        """Ask the early-stopping rule (after a new epoch only), then the scheduler (or else
        the search)."""
        trials = self.trials() if trials is None else trials
        trial = next(t for t in trials if t.model_id == model.model_id)
        rule = self.config.early_stopping
        if fresh and rule is not None:
            reason = rule.should_stop(trial, trials)
            if reason:
                return Decision("stop", reason=f"{type(rule).__name__}: {reason}")
        return (self.config.scheduler or self.config.search).decide(trial, trials)

    def _take(self, model: _Model, decision: Decision) -> tuple[str, dict[str, Any]] | None:
        """Apply a decision's new status; returns the event that records it."""
        detail = {"model": model.model_id, "epoch": model.epoch - 1, "reason": decision.reason}
        if decision.action == "pause":
            model.status = PAUSED
            return "paused", detail
        if decision.action == "stop":
            model.status = PRUNED
            return "pruned", detail
        model.status = RUNNING
        return None

    def _review_paused(self) -> None:
        """Ask the search again about every paused model (new results may decide them)."""
        paused = [m for m in self.models.values() if m.status == PAUSED]
        if not paused:
            return
        # One list for the whole review, updated where a decision changes a model: rebuilding
        # it per question made ASHA's reviews cost O(paused x models x epochs) per epoch.
        trials = self.trials()
        position = {t.model_id: i for i, t in enumerate(trials)}
        for model in paused:
            decision = self._decide(model, fresh=False, trials=trials)
            if decision.action == "pause":
                continue
            event = self._take(model, decision)
            if event is None:
                event = ("continued", {"model": model.model_id, "reason": decision.reason})
            self.store.update_model(model.model_id, status=model.status)
            self.store.add_event(event[0], **event[1])
            if decision.action == "exploit":
                self._exploit(model, decision)
            if model.status != RUNNING:
                self._model_ended(model)
            trials[position[model.model_id]] = self._trial(model)

    def _prune_waiting(self) -> bool:
        """Prune models still paused when no running model or new proposal can decide them."""
        waiting = [m for m in self.models.values() if m.status == PAUSED]
        for model in waiting:
            model.status = PRUNED
            self.store.update_model(model.model_id, status=PRUNED)
            self.store.add_event(
                "pruned",
                model=model.model_id,
                epoch=model.epoch - 1,
                reason="still paused when the search had nothing left to run",
            )
            self._model_ended(model)
        return bool(waiting)

    def _exploit(self, model: _Model, decision: Decision) -> None:
        """PBT: take the weights and optimizer state of ``decision.source`` as of its last
        finished epoch, under ``decision.params``.

        The state file is written before the records change: if the run dies in between, the
        resumed driver sees new params in the state and records them (see ``restore``).
        """
        # Decision.__post_init__ refuses an "exploit" without both (and Decision is frozen).
        assert decision.source is not None and decision.params is not None
        source = self.models[decision.source]
        if not source.history:
            warnings.warn(
                f"model {model.model_id}: exploit skipped, source has no epoch", stacklevel=2
            )
            return
        source_epoch = int(source.history[-1]["epoch"])
        path = checkpoints.epoch_path(source.folder, source_epoch)
        try:
            own = training.load_state(model.state_path)["counters"]
            counters = {**own, "version": model.version + 1, "params": dict(decision.params)}
            state = training.warm_start_state(
                self.config.build, decision.params, training.load_state(path), counters
            )
            training.save_state(state, model.state_path)
            checkpoints.snapshot(model.state_path, checkpoints.origin_path(model.folder))
        except Exception as e:
            # The error itself, not the traceback's first line ("Traceback (most recent...").
            warnings.warn(
                f"model {model.model_id}: could not exploit model {source.model_id} "
                f"({type(e).__name__}: {first_line(e)}); it goes on with its own state",
                stacklevel=2,
            )
            return
        before = model.params
        model.params = dict(decision.params)
        model.version += 1
        self.store.update_model(model.model_id, params=model.params)
        self.store.add_event(
            "exploit",
            model=model.model_id,
            epoch=model.epoch - 1,
            source=source.model_id,
            source_epoch=source_epoch,
            params_before=before,
            params=model.params,
            reason=decision.reason,
        )

    def _model_ended(self, model: _Model) -> None:
        """A model left the running set: completed, paused, stopped, pruned or failed."""
        self._roster_changed = True
        if model.status in (COMPLETED, PRUNED, FAILED):
            self._log_hparams(model)
        if model.status in (PRUNED, STOPPED, FAILED):
            self._update_total()

    def _fail(self, model: _Model, error: str) -> None:
        """Mark a model failed; its last saved state stays on disk, the others go on."""
        model.status = FAILED
        model.busy = False
        model.remaining = []
        self.store.set_model_status(model.model_id, FAILED, error)
        self._model_ended(model)
        self._answer_stop_request(model)

    # Controls: a person's requests, applied at the model's next hop boundary -----------------

    def _apply_controls(self, now: bool = False) -> None:
        """Apply pending control requests in the order they were made (checked a few times a
        second; ``now`` skips the wait)."""
        clock = time.monotonic()
        if not now and clock - self._controls_checked < _CONTROL_POLL_S:
            return
        self._controls_checked = clock
        waiting = {m.stop_request["id"] for m in self.models.values() if m.stop_request}
        for request in self.store.controls(pending_only=True):
            if request["id"] in waiting:
                continue  # a stop waiting for its model's hop to end
            try:
                outcome = self._control(request)
            except ControlRejected as e:
                self._settle(request, str(e))
                continue
            if outcome is not None:
                self._settle(request, None, outcome)

    def _settle(
        self, request: dict[str, Any], error: str | None, outcome: dict[str, Any] | None = None
    ) -> None:
        state = "rejected" if error is not None else "applied"
        self.store.settle_control(request["id"], state, outcome, error)
        self.store.add_event(
            "control",
            control=request["id"],
            op=request["op"],
            who=request["who"],
            requested=request["requested"],
            model=request["model_id"],
            state=state,
            outcome=outcome,
            error=error,
        )

    def _control(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """Apply one request; returns its outcome, or None if it waits for a hop to end."""
        op, options = request["op"], request["options"] or {}
        if op == "add":
            return self._add_by_hand(request["params"] or {}, options.get("epochs"))
        model = self._control_target(request)
        if op == "stop":
            if model.status not in (RUNNING, PAUSED):
                raise ControlRejected(
                    f"model {model.model_id} is {model.status}: only running or paused models "
                    "can be stopped"
                )
            if model.busy:
                if model.stop_request is not None:
                    raise ControlRejected(f"model {model.model_id} is already being stopped")
                model.stop_request = request
                return None
            return self._stop(model)
        if op == "resume":
            return self._resume(model)
        if op == "set_epochs":
            return self._set_epochs(model, options.get("epochs"))
        if op == "clone":
            return self._clone(
                model, request["params"] or {}, options.get("warm_start", True), options
            )
        raise ControlRejected(f"unknown control {op!r}")

    def _control_target(self, request: dict[str, Any]) -> _Model:
        model = self.models.get(request["model_id"])
        if model is None:
            raise ControlRejected(
                f"model_id={request['model_id']!r} is not a model of this experiment "
                f"(ids 0-{len(self.models) - 1})"
            )
        return model

    def _stop(self, model: _Model) -> dict[str, Any]:
        model.status = STOPPED
        self.store.update_model(model.model_id, status=STOPPED)
        self._model_ended(model)
        return {"epoch": model.epoch, "phase": model.phase, "version": model.version}

    def _answer_stop_request(self, model: _Model) -> None:
        """A stop that waited for the model's unit: apply it now that the unit is over, unless
        the model has meanwhile completed, been pruned or failed."""
        if model.stop_request is None or model.busy:
            return
        request, model.stop_request = model.stop_request, None
        if model.status in (RUNNING, PAUSED):
            self._settle(request, None, self._stop(model))
        else:
            self._settle(request, f"model {model.model_id} is {model.status}: nothing to stop")

    def _resume(self, model: _Model) -> dict[str, Any]:
        if model.stop_request is not None:  # stop, then resume before the hop ended
            request, model.stop_request = model.stop_request, None
            self._settle(request, "cancelled by a later resume")
            return {"epoch": model.epoch, "cancelled_stop": request["id"]}
        if model.status not in (STOPPED, PRUNED):
            raise ControlRejected(
                f"model {model.model_id} is {model.status}: only stopped or pruned models can "
                "be resumed (set_epochs reopens a completed one)"
            )
        if model.epoch >= self._budget(model):
            raise ControlRejected(
                f"model {model.model_id} has trained its {self._budget(model)} epochs: "
                "use set_epochs to give it more"
            )
        model.status = RUNNING
        self.store.update_model(model.model_id, status=RUNNING)
        self._roster_changed = True
        self._update_total()
        return {"epoch": model.epoch}

    def _set_epochs(self, model: _Model, epochs: Any) -> dict[str, Any]:
        done = len(model.history)
        started = (
            model.busy
            or model.epoch > done
            or (model.phase != "train" or len(model.remaining) < len(self.train_shards))
        )
        least = done + 1 if started and model.status == RUNNING else max(done, 1)
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < least:
            raise ControlRejected(
                f"epochs={epochs!r} for model {model.model_id}: an integer >= {least} "
                f"(it has finished {done} epochs)"
            )
        if model.status == FAILED:
            raise ControlRejected(f"model {model.model_id} failed: it cannot train on")
        model.max_epochs = epochs
        self.store.update_model(model.model_id, max_epochs=epochs)
        if model.status == COMPLETED and epochs > done:
            model.status = RUNNING  # reopened: it trains on from its last epoch
            model.version = training.load_state(model.state_path)["counters"]["version"]
            model.epoch, model.phase = done, "train"
            model.remaining = self._train_order(model)
            self.store.update_model(model.model_id, status=RUNNING)
        elif model.status in (RUNNING, PAUSED) and epochs <= done:
            model.status, model.remaining = COMPLETED, []
            self.store.update_model(model.model_id, status=COMPLETED)
            self._model_ended(model)
        self._roster_changed = True
        self._update_total()
        return {"epochs": epochs, "status": model.status}

    def _add_by_hand(self, params: dict[str, Any], epochs: Any) -> dict[str, Any]:
        self._check_epochs_option(epochs)
        model = self._new_model(dict(params), origin="add", max_epochs=epochs)
        state, error = self._initial_state(model, strict=False)
        self._add_models([(model, state, error)])
        return {"model_id": model.model_id, "status": model.status}

    def _clone(
        self, source: _Model, params: dict[str, Any], warm_start: bool, options: dict[str, Any]
    ) -> dict[str, Any]:
        epochs = options.get("epochs")
        self._check_epochs_option(epochs)
        merged = {**source.params, **params}
        if not warm_start:
            model = self._new_model(merged, origin="clone", parent=source.model_id)
            model.max_epochs = epochs
            state, error = self._initial_state(model, strict=False)
            self._add_models([(model, state, error)])
            return {"model_id": model.model_id, "warm_start": False}
        # The source's state file always holds a complete state at a hop boundary (it is only
        # ever replaced), so this is its exact state after its last saved hop.
        try:
            source_state = training.load_state(source.state_path)
            counters = {
                "version": 0,
                "epoch": 0,
                "init_seed": training.init_seed(self.config.seed, len(self.models)),
            }
            state = training.warm_start_state(self.config.build, merged, source_state, counters)
        except Exception as e:
            raise ControlRejected(
                f"model {source.model_id} cannot be warm-started with {params}: {first_line(e)}"
            ) from e
        model = self._new_model(merged, origin="clone", parent=source.model_id)
        model.max_epochs = epochs
        self._add_models([(model, state, None)])
        if model.status == RUNNING:
            checkpoints.snapshot(model.state_path, checkpoints.origin_path(model.folder))
        source_counters = source_state["counters"]
        return {
            "model_id": model.model_id,
            "warm_start": True,
            "source_version": source_counters["version"],
            "source_epoch": source_counters.get("epoch", 0),
            "source_hops_in_epoch": len(source_counters.get("hops", [])),
        }

    @staticmethod
    def _check_epochs_option(epochs: Any) -> None:
        if epochs is not None and (
            not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1
        ):
            raise ControlRejected(f"epochs={epochs!r}: an integer >= 1, or None")

    # Display -----------------------------------------------------------------------------------

    def _update_total(self) -> None:
        """Units the run will have done: all of each live model's, what ended ones did."""
        per_epoch = len(self.train_shards) + len(self.val_shards)
        self.progress.set_total(
            sum(
                m.units_done
                if m.status in (FAILED, PRUNED, STOPPED)
                else self._budget(m) * per_epoch
                for m in self.models.values()
            )
        )

    def _show_status(self) -> None:
        """Each model's status and last-epoch metric (as the leaderboard ranks them), and the
        furthest epoch in training, 1-based, out of the most epochs any model trains."""
        metric = self.config.metric
        standings = {
            i: Standing(m.status, m.history[-1].get(metric) if m.history else None)
            for i, m in self.models.items()
        }
        # m.epoch counts finished epochs: a running model trains the next one, others rest.
        epoch = max(
            (
                min(m.epoch + 1 if m.status == RUNNING else m.epoch, self._budget(m))
                for m in self.models.values()
            ),
            default=1,
        )
        epochs = max((self._budget(m) for m in self.models.values()), default=self.config.epochs)
        self.progress.status(standings, epoch, epochs)


def metric_names(spec: ModelSpec, has_validation: bool) -> list[str]:
    """The metrics an experiment over ``spec`` records, e.g. train_loss, val_accuracy."""
    splits = ("train", "val") if has_validation else ("train",)
    return [f"{split}_{name}" for split in splits for name in spec.metric_names()]


def check_metric(metric: str, spec: ModelSpec, has_validation: bool) -> None:
    accepted = metric_names(spec, has_validation)
    if metric not in accepted:
        raise ConfigError("metric", metric, f"one of the metrics the spec produces: {accepted}")
