"""The driver loop: ask for runnable units, ask the scheduler, submit, dispatch events.

A model's life: for each epoch, one training hop on every training shard (order chosen by the
MOP scheduler), then one evaluation pass on every non-empty validation shard, then its epoch
metrics are recorded and it starts the next epoch at once (no barrier with other models).

A model hops on as soon as its unit is done: its new state is handed over in memory while the
backend writes it to the state file behind it. ``durable_lag`` bounds how many hops the current
version may run ahead of the state file (what a crash of the whole run can cost), and an epoch
ends only on a durable state, so epoch checkpoints, PBT, resume and results always read one.

A run is one recipe: :meth:`Driver.prepare` (build the first proposals, write nothing),
:meth:`Driver.restore` (a recorded experiment's models back at their last hop),
:meth:`Driver.start_workers`, then :meth:`Driver.run` (the loop, then finish). The parts each
own one piece of state: the :class:`~.roster.Roster` (every model), the
:class:`~.lifecycle.Lifecycle` (statuses, epoch ends, decisions), :mod:`.recovery`, the
:class:`~.requests.RequestApplier` (a person's requests), the
:class:`~cerebro.store.checkpoint_keeper.CheckpointKeeper` and the trackers.
"""

from __future__ import annotations

import dataclasses
import gc
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import training
from ..backends.base import Backend, StateSaved, Unit, UnitDone, UnitMember, WorkerInfo, WorkerLost
from ..data import Dataset
from ..errors import raised
from ..kinds import EventKind, ModelStatus, UnitKind
from ..search import Search
from ..search.base import EarlyStopping, Scheduler
from ..spec import ModelSpec
from ..state import Counters
from ..store import RecordStore, checkpoints
from ..store.checkpoint_keeper import CheckpointKeeper
from ..techniques import Technique
from ..techniques.features import FeaturePlan
from ..trackers import Standing, Tracker
from .building import ModelBuilder
from .durability import Durability
from .grouping import Fusion, Grouping
from .groups import PerGroup
from .identity import Fingerprints
from .lifecycle import Lifecycle, Proposal
from .materializing import FeaturePlanner, Materialize
from .recovery import Recovery, resume_point
from .requests import RequestApplier
from .roster import ModelRun, Roster, SplitSums
from .scheduler import WorkerSlot, place_shards, schedule

_POLL_S = 0.5
_STANDINGS_S = 0.1  # how often the loop shows the models' standings
RUNNING = ModelStatus.RUNNING


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
    scheduler: Scheduler | None = None  # None: the search decides what its models do
    fusion: Fusion | None = None  # None: every unit trains one model
    materialize: Materialize | None = None  # None: frozen prefixes run on every batch
    features_dir: str = ""  # where workers keep frozen prefixes' outputs
    durable_lag: int = 2  # hops a model's current state may run ahead of its state file
    per_group: bool = False  # one model per group of the dataset and configuration

    @property
    def search_epochs(self) -> int | None:
        """The most epochs the search's own models train: the scheduler's limit, else the
        search's (None: the experiment's epochs)."""
        if self.scheduler is not None and self.scheduler.max_epochs is not None:
            return self.scheduler.max_epochs
        return self.search.max_epochs


class Driver:
    """Runs one experiment: :meth:`prepare`, :meth:`restore` (to continue one), then
    :meth:`start_workers` and :meth:`run`. ``tracker`` hears of every unit, epoch and model
    end (:class:`cerebro.trackers.Trackers` for several)."""

    def __init__(self, config: RunConfig, backend: Backend, tracker: Tracker) -> None:
        self.config = config
        self.backend = backend
        self.tracker = tracker
        self._store: RecordStore | None = None  # attached by restore() or run()
        self._prepared: list[Proposal] = []
        val_rows = config.dataset.shard_rows("val")
        self.roster = Roster(
            config.checkpoint_dir,
            config.dataset.num_shards,
            frozenset(s for s, n in enumerate(val_rows) if n > 0),
            config.epochs,
            config.search_epochs,
            config.seed,
            config.deterministic,
            # Models that share a frozen prefix train in units too, fusion or not.
            Grouping(
                config.fusion or (Fusion() if config.materialize is not None else None),
                config.deterministic,
            ),
            PerGroup.of(config.dataset) if config.per_group else None,
        )
        self.builder = ModelBuilder(
            config.build,
            config.dataset,
            config.metric,
            config.seed,
            fusion=config.fusion is not None,
            materialize=config.materialize is not None,
        )
        features = None
        if config.materialize is not None:
            rows = config.dataset.split_rows("train") + config.dataset.split_rows("val")
            features = FeaturePlanner(config.materialize, rows, config.epochs, config.features_dir)
        self.lifecycle = Lifecycle(
            self.roster,
            self.builder,
            config.search,
            config.scheduler,
            config.early_stopping,
            tracker,
            config.metric,
            config.mode,
            features,
        )
        self.requests = RequestApplier(self.roster, self.lifecycle, self.builder, config.seed)
        self.lifecycle.at_rest = backend.release
        self.in_flight: dict[int, Unit] = {}
        self.durability = Durability(config.durable_lag)
        self.units_held: dict[int, int] = {}  # by worker: units sent and not yet done
        self.workers: list[WorkerInfo] = []
        self._epoch_ends: list[tuple[ModelRun, int]] = []  # units over, epochs to finish
        self._next_unit = 0
        self._standings_shown = -_STANDINGS_S

    @property
    def store(self) -> RecordStore:
        """The experiment's records, attached by :meth:`restore` or :meth:`run`."""
        if self._store is None:
            raise RuntimeError("the driver has no records yet: call restore() or run() first")
        return self._store

    @property
    def fingerprints(self) -> Fingerprints:
        """Of every model built (the experiment's config keeps the first)."""
        return self.builder.fingerprints

    def _attach(self, store: RecordStore) -> None:
        if self._store is store:
            return
        self._store = store
        self.keeper = CheckpointKeeper(
            store, self.config.keep_checkpoints, self.config.checkpoint_mirror, self.lifecycle.kept
        )
        self.lifecycle.attach(store, self.keeper)

    # The recipe ----------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Build the search's first configurations and check them; writes nothing.

        The search (and early-stopping rule) must be attached to the experiment already.
        A ``build`` that returns something other than a ModelSpec, a spec that cannot produce
        the experiment's metric, or one that fails a trial training step (see ``preflight``)
        raises ConfigError here, before any record or state is written.
        """
        self._prepared = self.lifecycle.propose(strict=True)

    def restore(self, store: RecordStore) -> None:
        """Continue a recorded experiment: every model back at its last saved hop, and the
        records corrected to what the state files hold (see :mod:`.recovery`)."""
        self._attach(store)
        Recovery(self.roster, self.lifecycle, self.builder, self.keeper, store).restore()

    def needs_workers(self, store: RecordStore) -> bool:
        """Whether a restored run has anything to train: a model running or paused, a search
        that would propose more, or a person's request waiting (prepare() must have run)."""
        if self._prepared or store.controls(pending_only=True):
            return True
        if any(m.status.is_live for m in self.roster):
            return True
        return not self.config.search.is_finished(self.roster.trials())

    def start_workers(self) -> None:
        """Start the backend's workers, each loading its shards (nothing is recorded yet)."""
        placement = place_shards(self.config.dataset.num_shards, self.backend.num_workers)
        self.workers = self.backend.start(
            self.config.dataset.path,
            placement,
            self.config.build,
            self.config.deterministic,
            state_dir=self.config.checkpoint_dir,
        )

    def run(self, store: RecordStore) -> None:
        """Train until every model is completed or failed; stops the workers in the end."""
        self._attach(store)
        try:
            try:
                self.lifecycle.add(self._prepared)
                self._prepared = []
                self.tracker.run_started()
                # What exists by now (modules, the records' engine, every model's objects) is
                # left out of the loop's garbage collections: a full one scanned it all, for up
                # to ~170 ms in which no unit was sent (units of milliseconds ran out).
                gc.freeze()
                try:
                    self._loop()
                finally:
                    gc.unfreeze()
                self._show_standings(now=True)
            finally:
                self.keeper.close()  # also after an error: no checkpoint written is lost
                self.tracker.run_finished()
        except BaseException:
            self.backend.shutdown(graceful=False)
            raise
        self.backend.shutdown()

    # The loop ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            self.requests.apply_pending()
            if self.roster.changed:
                # Models started, ended or paused: paused ones may go on, the search may add.
                self.roster.changed = False
                self.lifecycle.review_paused()
                trials = self.roster.trials()
                if not self.config.search.is_finished(trials):
                    self.lifecycle.add(self.lifecycle.propose(strict=False, trials=trials))
            self._fill_workers()
            if not self.in_flight and not self._awaiting_files():
                if self.roster.changed or self.roster.schedulable():
                    continue
                if self.lifecycle.prune_waiting():  # nothing else can change what they wait for
                    continue
                self.requests.apply_pending(now=True)  # a last look before the run ends
                if self.roster.changed or self.roster.schedulable():
                    continue
                return
            events = self.backend.poll(_POLL_S)
            with self.store.batch():  # one commit for the records of every event
                for event in events:
                    self._handle(event)
                # The workers get their next units before the records are written and the
                # epochs finished (records, decisions, trackers: ~2 ms each) and checkpoints
                # pruned (deleting a 12 MB file took 2-5 ms): a model's next hop waited for
                # all of it, and with many epoch ends at once short units ran out meanwhile.
                self._fill_workers()
                if self._epoch_ends:
                    self._finish_epochs()
                self.keeper.record_ready()
            self._show_standings()

    def _fill_workers(self) -> None:
        """Idle workers first; then each gets a next unit to start the moment it is done."""
        for depth in range(1, self.backend.queue_depth + 1):
            workers = self._worker_slots(depth)
            idle = sum(not w.busy for w in workers)
            if not idle:
                continue  # every worker holds this many units: nothing to match
            for assignment in schedule(self.roster.slots(idle), workers):
                self._submit(assignment.model_id, assignment.worker_id, assignment.shard)

    def _awaiting_files(self) -> bool:
        """Whether a state file write is still to be reported for a model that goes on. A
        failed model's may never come (its state was lost with a worker); what is written
        meanwhile the backend finishes when it shuts down."""
        return any(
            self.roster[m].status is not ModelStatus.FAILED for m in self.durability.waited_for()
        )

    def _worker_slots(self, depth: int) -> list[WorkerSlot]:
        """The workers, those holding ``depth`` units or more busy."""
        return [
            WorkerSlot(w.worker_id, w.shards, self.units_held.get(w.worker_id, 0) >= depth)
            for w in self.workers
        ]

    def _submit(self, slot_id: int, worker_id: int, shard: int) -> None:
        """Send the unit the scheduler matched: one model, or a bundle of fused ones, on
        ``shard`` and the shards it would visit next on the same worker anyway (see
        :meth:`_shards_for`)."""
        models = self.roster.bundle(slot_id)
        first = models[0]
        shards = self._shards_for(models, worker_id, shard)
        seed = self.config.seed
        epoch = first.epoch
        members = []
        for model in models:
            for visited in shards:
                model.remaining.remove(visited)
            model.busy = True
            members.append(
                UnitMember(
                    model_id=model.model_id,
                    params=model.params,
                    state_path=model.state_path,
                    version=model.version,
                    shuffle_seeds=tuple(
                        training.shuffle_seed(seed, model.model_id, epoch, s) for s in shards
                    ),
                    rng_seeds=(
                        tuple(training.hop_rng_seed(seed, model.model_id, epoch, s) for s in shards)
                        if self.config.deterministic
                        else None
                    ),
                )
            )
        self.units_held[worker_id] = self.units_held.get(worker_id, 0) + 1
        technique, plan = self._technique(first)
        unit = Unit(
            unit_id=self._next_unit,
            kind=first.phase,
            epoch=epoch,
            shards=shards,
            worker_id=worker_id,
            members=tuple(members),
            end_of_epoch=first.phase is UnitKind.TRAIN and not first.remaining,
            technique=technique,
            features=plan,
        )
        self._next_unit += 1
        self.in_flight[unit.unit_id] = unit
        self.backend.submit(unit)

    def _shards_for(self, models: list[ModelRun], worker_id: int, shard: int) -> tuple[int, ...]:
        """``shard``, then the models' next shards that this worker holds too: hops (or
        evaluations) the models would run here one after another, in one unit, without a
        round trip to the driver between them. In deterministic mode only those next in the
        models' fixed order; free mode takes them all. A training unit stays within the lag
        bound: its intermediate states are never written, so a crash loses at most
        ``durable_lag`` hops still. A unit that ends at the bound waits for its state file
        before the next one; with fewer than two running models per worker it stops a hop
        short of the bound instead (no other model would keep its worker busy)."""
        held = next(w.shards for w in self.workers if w.worker_id == worker_id)
        remaining = models[0].remaining
        if self.config.deterministic:
            start = remaining.index(shard)
            after = []
            for s in remaining[start + 1 :]:
                if s not in held:
                    break
                after.append(s)
        else:
            after = sorted(s for s in remaining if s in held and s != shard)
        after = [s for s in after if all(s in m.remaining for m in models)]
        if models[0].phase is UnitKind.TRAIN:
            behind = max(m.version - m.durable_version for m in models)
            # A unit that ends at the bound waits for its state file: where few models share
            # the workers, nothing else would keep its worker busy meanwhile, so one is spared.
            few = len(self.roster.with_status(RUNNING)) < 2 * len(self.workers)
            after = after[: max(self.durability.lag - behind - int(few), 1) - 1]
        return (shard, *after)

    def _technique(self, model: ModelRun) -> tuple[Technique, FeaturePlan | None]:
        """How a unit led by ``model`` trains. A fusable model runs on the fused runner even
        alone: its numbers then never depend on how many others a unit held (after a restart,
        say); likewise a prefixed model always reads its prefix's output."""
        features = self.lifecycle.features
        if features is not None and features.has(model.model_id):
            return Technique.MATERIALIZED, features.plan(model.model_id)
        if self.roster.grouping.fusable(model.model_id):
            return Technique.FUSED, None
        return Technique.PLAIN, None

    # Events --------------------------------------------------------------------------------------

    def _handle(self, event: UnitDone | StateSaved | WorkerLost) -> None:
        if isinstance(event, WorkerLost):
            self._worker_lost(event)
        elif isinstance(event, StateSaved):
            self._state_saved(event)
        elif event.unit_id in self.in_flight:  # else given up with its worker already
            self._unit_done(self.in_flight.pop(event.unit_id), event)

    def _unit_done(self, unit: Unit, event: UnitDone) -> None:
        """The worker is free: record each member's hop; a new state is handed over, so the
        model hops on (or waits for its state file, at the lag bound or an epoch's end)."""
        self.units_held[unit.worker_id] -= 1
        self.tracker.unit_done(unit.model_ids, unit.hops)
        if not event.ok:
            for model in self._members(unit):
                model.units_done += unit.hops
                if model.model_id in event.states_lost:  # its state was lost with a worker
                    self._roll_back(model)
                elif event.states_lost:  # not its fault: it runs the shards again
                    model.busy = False
                    model.remaining[:0] = unit.shards
                    self.requests.unit_over(model)
                else:
                    self.lifecycle.fail(model, f"{_described(unit)} failed:\n{event.error}")
                    self.requests.unit_over(model)
            return
        went_on = []
        for model, member in zip(self._members(unit), unit.members, strict=True):
            model.units_done += unit.hops
            error = event.failure(model.model_id)
            if error is not None:  # it failed alone: the unit's other models go on
                self.lifecycle.fail(model, f"{_described(unit)} failed:\n{error}")
                self.requests.unit_over(model)
                continue
            unwritten = event.not_handed_over.get(model.model_id)
            if unwritten is not None:  # trained, but its new state is not where it goes on
                self._not_handed_over(model, unit, event.worker_id, unwritten)
                continue
            split = model.train if unit.kind is UnitKind.TRAIN else model.val
            for hop in event.hops(unit, model.model_id):
                self.lifecycle.record_hop(model.model_id, unit.epoch, unit.kind, hop)
                split.add(hop.shard, hop.rows, hop.sums)
            went_on.append((model, member))
        for made in event.materialized:
            self.store.add_event(
                EventKind.MATERIALIZED.value, **dataclasses.asdict(made), worker=event.worker_id
            )
        waiting = []
        for model, member in went_on:
            if unit.kind is UnitKind.TRAIN:
                model.version = member.version + unit.hops
                self.durability.handed_over(
                    model.model_id, model.version, unit.epoch, unit.shards[-1]
                )
            if self._must_wait(model):
                model.waiting = unit.worker_id  # busy until its state file catches up
                waiting.append(model)
            else:
                self._unit_over(model, unit.worker_id)
        for model in waiting:
            model.waiting_with = tuple(m.model_id for m in waiting)

    def _state_saved(self, event: StateSaved) -> None:
        """A model's state file now holds ``event.version`` (or could not be written)."""
        model = self.roster[event.model_id]
        hop = self.durability.saved(event)
        if event.ok:
            model.durable_version = max(model.durable_version, event.version)
            self.store.set_durable_version(model.model_id, model.durable_version)
            if hop is not None:
                self.store.set_hop_save_time(model.model_id, *hop, event.save_s)
        if model.waiting is None or model.status is ModelStatus.FAILED:
            return
        if not event.ok and model.durable_version < model.version:
            raise self.durability.bound_reached(model, event)
        self._release(model)

    def _release(self, model: ModelRun) -> None:
        """Waiting models of one unit go on together once all their state files are written:
        they stay one bundle, and a search decides on their epochs at one time, as it would
        have without the wait (deterministic mode's results do not depend on write timing)."""
        unit = [self.roster[i] for i in model.waiting_with] or [model]
        unit = [m for m in unit if m.waiting is not None and m.status is not ModelStatus.FAILED]
        if any(self._must_wait(m) for m in unit):
            return
        for member in unit:
            assert member.waiting is not None
            worker, member.waiting, member.waiting_with = member.waiting, None, ()
            self._unit_over(member, worker)

    def _must_wait(self, model: ModelRun) -> bool:
        """Whether the model, its unit done, waits for its state file (see :class:`Durability`):
        its epoch ends with this unit, or its next unit would take it past the lag bound.
        Where handed-over states outlive the workers (LocalBackend's slot files), an epoch
        ends after its validation pass, which runs meanwhile (an evaluation reads the state
        handed over and writes none); else after its training, so that an evaluation whose
        state was lost with a worker reads it from the file again (RayBackend's)."""
        evaluating = model.phase is UnitKind.EVAL
        if not self.backend.states_outlive_workers:
            return self.durability.must_wait(model, not model.remaining and not evaluating)
        has_val = bool(self.roster.val_shards_of(model))
        epoch_over = not model.remaining and (evaluating or not has_val)
        next_evaluates = (evaluating and bool(model.remaining)) or (
            not evaluating and not model.remaining and has_val
        )
        return self.durability.must_wait(model, epoch_over, next_trains=not next_evaluates)

    def _unit_over(self, model: ModelRun, worker_id: int) -> None:
        """The model's unit is over (its state durable where it had to wait). A unit that ends
        its epoch is finished after the next scheduling pass (:meth:`_finish_epochs`); the
        model stays busy meanwhile."""
        if (
            model.status is RUNNING
            and not model.remaining
            and (model.phase is UnitKind.EVAL or not self.roster.val_shards_of(model))
        ):
            self._epoch_ends.append((model, worker_id))
            return
        self.lifecycle.unit_finished(model, worker_id)
        self.requests.unit_over(model)

    def _finish_epochs(self) -> None:
        """End the epochs whose last units are over, in the order they ended."""
        ends, self._epoch_ends = self._epoch_ends, []
        for model, worker_id in ends:
            self.lifecycle.unit_finished(model, worker_id)
            self.requests.unit_over(model)

    def _members(self, unit: Unit) -> list[ModelRun]:
        return [self.roster[i] for i in unit.model_ids]

    def _worker_lost(self, event: WorkerLost) -> None:
        """Units on a dead worker run again from the states they started from (the
        replacement worker holds the same shards); models whose newest state was held only by
        that worker go back to their state files."""
        # A worker lost while starting ran nothing: units sent since are on its replacement.
        on_it = [u for u in self.in_flight.values() if u.worker_id == event.worker_id]
        lost = [] if event.while_starting else on_it
        self.store.add_event(
            EventKind.WORKER_LOST.value,
            worker=event.worker_id,
            exitcode=event.exitcode,
            reason=event.reason,
            units=[
                {"model": m, "kind": u.kind.value, "epoch": u.epoch, "shards": list(u.shards)}
                for u in lost
                for m in u.model_ids
            ],
            states_lost=list(event.states_lost),
        )
        if not event.while_starting:
            self.units_held[event.worker_id] = 0
            for i, unit in enumerate(lost):
                self.in_flight.pop(unit.unit_id)
                for model in self._members(unit):
                    # Only the unit it was running may have killed it: those queued behind
                    # run again without a failure counted against their models.
                    self._member_lost(model, unit, event.exitcode, running=i == 0)
        for model_id in event.states_lost:
            model = self.roster[model_id]
            # One in a unit elsewhere either read its state already or fails to and is rolled
            # back then (UnitDone.states_lost).
            if model.status.is_live and not (model.busy and model.waiting is None):
                self._roll_back(model)

    def _member_lost(
        self, model: ModelRun, unit: Unit, exitcode: int | None, running: bool
    ) -> None:
        self._again_or_failed(
            model,
            unit,
            counted=running,
            failure=lambda times: (
                f"{_described(unit)} lost its worker "
                f"{times} times in a row (last exit code {exitcode})"
            ),
        )

    def _not_handed_over(self, model: ModelRun, unit: Unit, worker_id: int, error: str) -> None:
        """The unit trained the model but its new state could not be handed over (a handover
        file that could not be written, say): no fault of the model's, and its state at the
        unit's start is intact (a handover file the unit did not write to, or its state file),
        so it runs the unit's shards again, like a unit lost with its worker; after
        ``max_unit_failures`` such units in a row it fails, with the error."""
        again = self._again_or_failed(
            model,
            unit,
            counted=True,
            failure=lambda times: (
                f"{_described(unit)} could not hand its new state over, "
                f"{times} times in a row; the last time:\n{error}"
            ),
        )
        self.store.add_event(
            EventKind.HANDOVER_FAILED.value,
            model=model.model_id,
            worker=worker_id,
            unit_kind=unit.kind.value,
            epoch=unit.epoch,
            shards=list(unit.shards),
            failures=model.failures,
            error=raised(error),
        )
        if again:
            warnings.warn(
                f"{_described(unit)} of model {model.model_id} could not hand its new state "
                f"over ({raised(error)}); it runs again",
                RuntimeWarning,
                stacklevel=2,
            )

    def _again_or_failed(
        self, model: ModelRun, unit: Unit, counted: bool, failure: Callable[[int], str]
    ) -> bool:
        """A unit of the model whose work was lost (with its worker, or not handed over) runs
        again: its shards are the model's next ones. ``counted``: whether this unit counts
        towards ``max_unit_failures`` in a row (one queued behind the unit that killed its
        worker does not); at that many the model fails instead, with ``failure(times)``.
        Returns whether it runs again."""
        model.busy = False
        model.failures += int(counted)
        again = model.failures < self.config.max_unit_failures
        if again:
            model.remaining[:0] = unit.shards  # they are the model's next shards again
        else:
            self.lifecycle.fail(model, failure(model.failures))
        self.requests.unit_over(model)
        return again

    def _roll_back(self, model: ModelRun) -> None:
        """The model's newest state is gone: it goes on from its state file, and the hops of
        its epoch after that state are trained again (their records deleted); a file that
        holds all its epoch's training goes on to the validation pass (as on resume)."""
        counters = Counters.from_dict(training.load_counters(model.state_path))
        self.store.add_event(
            EventKind.STATE_ROLLED_BACK.value,
            model=model.model_id,
            lost_version=model.version,
            version=counters.version,
        )
        # An epoch ends on a durable state, so the file is of this epoch (or the last one's end).
        point = resume_point(
            counters,
            len(model.history),
            len(self.roster.train_shards_of(model)),
            self.roster.budget(model),
        )
        self.store.delete_hops(model.model_id, point.epoch, keep_train_shards=point.visited)
        # Nothing of it is waited for: its file holds this version (a report of that write may
        # have been lost with the worker), and its newer versions are gone.
        self.durability.forget(model.model_id, -1)
        model.version = model.durable_version = counters.version
        model.busy, model.waiting, model.waiting_with = False, None, ()
        model.train = SplitSums()
        for hop in point.hops:
            model.train.add(hop.shard, hop.rows, hop.sums)
        if point.trained:  # its epoch's training is in the file: the validation pass is next
            model.phase, model.remaining = UnitKind.EVAL, sorted(self.roster.val_shards_of(model))
            if not model.remaining:
                self.lifecycle.finish_epoch(model)
        else:
            model.phase = UnitKind.TRAIN
            model.remaining = [s for s in self.roster.train_order(model) if s not in point.visited]
        self.requests.unit_over(model)

    # Display -------------------------------------------------------------------------------------

    def _show_standings(self, now: bool = False) -> None:
        """Each model's status and last-epoch metric (as the leaderboard ranks them), and the
        furthest epoch in training, 1-based, out of the most epochs any model trains. Shown a
        few times a second (``now``: at once): a display needs no more, and with units of a
        few milliseconds, working it out after every poll cost the loop ~5% of its time."""
        clock = time.monotonic()
        if not now and clock - self._standings_shown < _STANDINGS_S:
            return
        self._standings_shown = clock
        metric = self.config.metric
        standings = {
            m.model_id: Standing(m.status, m.history[-1].get(metric) if m.history else None)
            for m in self.roster
        }
        # m.epoch counts finished epochs: a running model trains the next one, others rest.
        budget = self.roster.budget
        epoch = max(
            (min(m.epoch + 1 if m.status is RUNNING else m.epoch, budget(m)) for m in self.roster),
            default=1,
        )
        epochs = max((budget(m) for m in self.roster), default=self.config.epochs)
        self.tracker.standings(standings, epoch, epochs)


def _described(unit: Unit) -> str:
    """How a failure message names a unit: its kind and shards."""
    shards = ", ".join(map(str, unit.shards))
    return f"{unit.kind} unit on shard{'s' if unit.hops > 1 else ''} {shards}"
