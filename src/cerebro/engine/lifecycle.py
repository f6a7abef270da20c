"""A model's life: it is built and registered, trains epoch after epoch, is asked at each epoch
end what to do next (continue, pause, stop, exploit), and ends (completed, failed, stopped,
pruned). Every status change goes through :meth:`Lifecycle.set_status`, which keeps memory, the
records and the trackers in step.

A model is left at the start of its next epoch whatever is decided at an epoch end, so that a
paused, stopped or pruned model can later resume from there.
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import history, training
from ..errors import first_line
from ..kinds import Action, EventKind, ModelStatus, Origin, UnitKind
from ..search import Decision, Search, Trial
from ..search.base import EarlyStopping, Scheduler
from ..state import Counters, HopRecord
from ..store import RecordStore, checkpoints
from ..store.checkpoint_keeper import CheckpointKeeper, KeptModel
from ..techniques.fusable import Fusability
from ..trackers import Tracker
from .building import InitialState, ModelBuilder
from .materializing import FeaturePlanner, PrefixFacts
from .roster import ModelRun, Roster

RUNNING, PAUSED, COMPLETED, FAILED, PRUNED = (
    ModelStatus.RUNNING,
    ModelStatus.PAUSED,
    ModelStatus.COMPLETED,
    ModelStatus.FAILED,
    ModelStatus.PRUNED,
)

# What a model's status becomes on a decision, and the event that records it.
_ON_DECISION = {
    Action.PAUSE: (PAUSED, EventKind.PAUSED),
    Action.STOP: (PRUNED, EventKind.PRUNED),
}


@dataclass(frozen=True)
class Proposal:
    """A configuration the search (or a person) proposed, built: the model and its state."""

    model: ModelRun
    initial: InitialState


class Lifecycle:
    """Builds models, moves them through their statuses, and decides at their epoch ends.

    Args:
        roster: every model of the run.
        builder: builds a configuration into its initial state.
        search: proposes configurations (and decides, unless ``scheduler`` is given).
        scheduler: decides what a model does after an epoch (None: the search does).
        early_stopping: a rule asked first, after each new epoch.
        trackers: told of every epoch and of every model that ends.
        metric, mode: the experiment's ranking (for each model's best epoch).
    """

    def __init__(
        self,
        roster: Roster,
        builder: ModelBuilder,
        search: Search,
        scheduler: Scheduler | None,
        early_stopping: EarlyStopping | None,
        trackers: Tracker,
        metric: str,
        mode: str,
        features: FeaturePlanner | None = None,
    ) -> None:
        self.roster = roster
        self.features = features  # None: frozen prefixes run on every batch
        self.builder = builder
        self.search = search
        self.decider: Search | Scheduler = scheduler if scheduler is not None else search
        self.early_stopping = early_stopping
        self.trackers = trackers
        self.metric = metric
        self.mode = mode
        self._store: RecordStore | None = None
        self._keeper: CheckpointKeeper | None = None
        # Told of each model that stops running (completed, failed, paused, stopped), so the
        # backend may free what holds its state in memory once it is durable.
        self.at_rest: Callable[[int], None] = lambda model_id: None

    def attach(self, store: RecordStore, keeper: CheckpointKeeper) -> None:
        self._store, self._keeper = store, keeper

    @property
    def store(self) -> RecordStore:
        if self._store is None:
            raise RuntimeError("the lifecycle has no records yet: attach() them first")
        return self._store

    @property
    def keeper(self) -> CheckpointKeeper:
        if self._keeper is None:
            raise RuntimeError("the lifecycle has no checkpoint keeper yet: attach() it first")
        return self._keeper

    def kept(self, model_id: int) -> KeptModel:
        """What the checkpoint keeper needs of a model to prune its checkpoints."""
        model = self.roster[model_id]
        best = history.best_epoch(model.history, self.metric, self.mode)
        return KeptModel(model.folder, len(model.history), best)

    # Building ----------------------------------------------------------------------------------

    def propose(self, strict: bool, trials: list[Trial] | None = None) -> list[Proposal]:
        """Ask the search for configurations and build each (``strict``: raise ConfigError
        for a configuration that cannot train; otherwise it is registered as failed)."""
        trials = self.roster.trials() if trials is None else trials
        proposals = []
        groups = self.roster.groups
        for params in self.search.propose(trials):
            if groups is None:
                models = [self.roster.new(dict(params), origin=Origin.SEARCH)]
            else:  # one model per group, all of one configuration
                number = self.roster.configuration_count()
                models = [
                    self.roster.new(
                        dict(params), origin=Origin.SEARCH, group=name, configuration=number
                    )
                    for name in groups.names
                ]
            for model in models:
                initial = self.builder.initial_state(model.model_id, model.params, strict)
                proposals.append(Proposal(model, initial))
        return proposals

    def new_model(
        self, params: dict[str, Any], origin: Origin, parent: int | None, max_epochs: int | None
    ) -> ModelRun:
        """A model a person adds or clones; with ``per_group=True`` a clone trains on its
        source's group, as a configuration of its own."""
        fields: dict[str, Any] = {}
        if self.roster.groups is not None and parent is not None:
            fields = dict(
                group=self.roster[parent].group, configuration=self.roster.configuration_count()
            )
        return self.roster.new(
            params, origin=origin, parent=parent, max_epochs=max_epochs, **fields
        )

    def add(self, proposals: list[Proposal]) -> None:
        """Write each new model's initial state and record; a model that could not be built
        (or whose state could not be written) is recorded as failed."""
        for proposal in proposals:
            self._register(proposal.model, proposal.initial)
            if self.roster.groups is not None:  # which group it is, for results and a restart
                self.store.add_event(
                    EventKind.GROUP_MODEL.value, **self.roster.groups.event(proposal.model)
                )
        self._enroll(proposals)
        self.trackers.plan(self.roster.units_total())

    def _enroll(self, proposals: list[Proposal]) -> None:
        """With fusion or materialization on: the new models' cohorts (models of one fusion
        key, or of one frozen prefix), why a model cannot be fused, and the prefix plan, in the
        records (a restarted run reads them back)."""
        grouping = self.roster.grouping
        if not grouping.enabled:
            return
        together, prefixed = {}, {}
        for proposal in proposals:
            model = proposal.model
            if model.status is FAILED:
                continue
            prefix = self._prefix_facts(model.params, proposal.initial)
            if prefix is not None:
                prefixed[model.model_id] = prefix
                continue
            facts = proposal.initial.fusion or self.builder.fusability(model.params)
            if facts is None:
                continue
            together[model.model_id] = facts
            if facts.key is None:
                self.store.add_event(
                    EventKind.NOT_FUSED.value, model=model.model_id, reason=facts.reason
                )
        if prefixed and self.features is not None:
            self.store.add_event(EventKind.FEATURE_PLAN.value, **self.features.enroll(prefixed))
            for model_id, prefix in prefixed.items():
                together[model_id] = self._prefix_grouping(model_id, prefix)
        for cohort in grouping.enroll(together):
            self.store.add_event(EventKind.FUSION_COHORT.value, **cohort.event())
        for proposal in proposals:  # a cohort's shard order is its anchor's
            model = proposal.model
            if model.status is RUNNING and not self.roster.epoch_started(model):
                model.remaining = self.roster.train_order(model)

    def _prefix_facts(
        self, params: dict[str, Any], initial: InitialState | None
    ) -> PrefixFacts | None:
        """A model's frozen prefix as the feature planner sees it (None: materialization is
        off, or the model has no frozen prefix)."""
        if self.features is None:
            return None
        if initial is not None and initial.prefix is not None:
            return initial.prefix
        return self.builder.prefix_facts(params)

    def _register(self, model: ModelRun, initial: InitialState) -> None:
        error = initial.error
        if initial.state is not None:
            try:
                training.save_state(initial.state, model.state_path)
            except Exception:
                error = traceback.format_exc()
        if error is not None:
            model.status, model.remaining = FAILED, []
        else:
            model.remaining = self.roster.train_order(model)
        self.store.add_model(
            model.model_id,
            model.params,
            model.status.value,
            error,
            origin=model.origin.value,
            parent=model.parent,
            max_epochs=model.max_epochs,
        )
        if error is not None:
            self.trackers.model_ended(model.model_id, model.status, model.params, model.history)

    # Statuses ------------------------------------------------------------------------------------

    def set_status(
        self,
        model: ModelRun,
        status: ModelStatus,
        *,
        error: str | None = None,
        event: tuple[EventKind, dict[str, Any]] | None = None,
        recorded: bool = False,
    ) -> None:
        """The one place a model's status changes: in memory, in the records (unless
        ``recorded``: the caller wrote it in the same transaction as its epoch), and for the
        trackers. A failed model keeps its last saved state on disk; the others go on."""
        model.status = status
        if status in (COMPLETED, FAILED):
            model.remaining = []
        if status is FAILED:
            model.busy = False
        if not recorded:
            self.store.set_model_status(model.model_id, status.value, error)
            if event is not None:
                self.store.add_event(event[0].value, **event[1])
        self.roster.changed = True
        if status is not RUNNING:
            self.trackers.model_ended(model.model_id, status, model.params, model.history)
            self.at_rest(model.model_id)
        self.trackers.plan(self.roster.units_total())

    def fail(self, model: ModelRun, error: str) -> None:
        self.set_status(model, FAILED, error=error)

    # Hops and epochs -----------------------------------------------------------------------------

    def record_hop(self, model_id: int, epoch: int, kind: UnitKind, hop: HopRecord) -> None:
        self.store.add_hop(
            model_id=model_id,
            epoch=epoch,
            kind=kind.value,
            shard=hop.shard,
            worker=hop.worker,
            start=hop.start,
            end=hop.end,
            rows=hop.rows,
            load_s=hop.load_s,
            save_s=None,
            metrics=hop.means(),
            unit=hop.unit,
        )

    def unit_finished(self, model: ModelRun, worker_id: int) -> None:
        """A unit of the model is over (its state saved, for a training hop): go on to the
        validation pass, or end the epoch, once the phase has no shard left."""
        model.failures = 0
        model.busy = False
        model.last_worker = worker_id
        if model.status is RUNNING and not model.remaining:
            val_shards = self.roster.val_shards_of(model)
            if model.phase is UnitKind.TRAIN and val_shards:
                model.phase, model.remaining = UnitKind.EVAL, sorted(val_shards)
            else:
                self.finish_epoch(model)

    def finish_epoch(self, model: ModelRun) -> None:
        """Record the epoch and what the model does next (one transaction), then go on."""
        metrics = {**model.train.means("train"), **model.val.means("val")}
        epoch = model.epoch
        model.history.append({"epoch": epoch, **metrics})
        self.keeper.take(model.model_id, model.folder, model.state_path, epoch)  # before exploit
        self.trackers.epoch_ended(model.model_id, epoch, metrics)
        model.epoch += 1
        model.start_epoch(self.roster.train_order(model))
        self.roster.changed = True
        decision = None
        status, event = RUNNING, None
        if model.epoch >= self.roster.budget(model):
            status = COMPLETED
        else:
            decision = self.decide(model, fresh=True)
            status, event = self._outcome(model, decision)
        self.store.add_epoch(
            model.model_id,
            epoch,
            metrics,
            None if status is RUNNING else status.value,
            None if event is None else (event[0].value, event[1]),
        )
        if decision is not None and decision.action is Action.EXPLOIT:
            self.exploit(model, decision)
        if status is not RUNNING:
            self.set_status(model, status, recorded=True)

    # Decisions -----------------------------------------------------------------------------------

    def decide(self, model: ModelRun, fresh: bool, trials: list[Trial] | None = None) -> Decision:
        """Ask the early-stopping rule (after a new epoch only), then the scheduler (or the
        search, when it schedules itself). With ``per_group=True`` the configuration decides
        for all its group models (see :mod:`.groups`)."""
        if self.roster.groups is not None:
            return self.roster.groups.decide(
                model,
                fresh,
                list(self.roster),
                self.decider,
                self.early_stopping,
                self.roster.budget,
            )
        trials = self.roster.trials() if trials is None else trials
        trial = next(t for t in trials if t.model_id == model.model_id)
        rule = self.early_stopping
        if fresh and rule is not None:
            reason = rule.should_stop(trial, trials)
            if reason:
                return Decision(Action.STOP, reason=f"{type(rule).__name__}: {reason}")
        return self.decider.decide(trial, trials)

    def _outcome(
        self, model: ModelRun, decision: Decision
    ) -> tuple[ModelStatus, tuple[EventKind, dict[str, Any]] | None]:
        """The status a decision gives the model, and the event that records it."""
        if decision.action not in _ON_DECISION:
            return RUNNING, None
        status, kind = _ON_DECISION[decision.action]
        detail = {"model": model.model_id, "epoch": model.epoch - 1, "reason": decision.reason}
        return status, (kind, detail)

    def review_paused(self) -> None:
        """Ask again about every paused model (new results may decide them)."""
        paused = self.roster.with_status(PAUSED)
        if not paused:
            return
        # One list for the whole review, updated where a decision changes a model: rebuilding
        # it per question made ASHA's reviews cost O(paused x models x epochs) per epoch.
        trials = self.roster.trials()
        position = {t.model_id: i for i, t in enumerate(trials)}
        for model in paused:
            decision = self.decide(model, fresh=False, trials=trials)
            if decision.action is Action.PAUSE:
                continue
            status, event = self._outcome(model, decision)
            if event is None:
                event = (EventKind.CONTINUED, {"model": model.model_id, "reason": decision.reason})
            self.set_status(model, status, event=event)
            if decision.action is Action.EXPLOIT:
                self.exploit(model, decision)
            if self.roster.groups is None:  # per group, decide() reads the roster itself
                trials[position[model.model_id]] = self.roster.trial(model)

    def prune_waiting(self) -> bool:
        """Prune models still paused when no running model or new proposal can decide them."""
        waiting = self.roster.with_status(PAUSED)
        for model in waiting:
            detail = {
                "model": model.model_id,
                "epoch": model.epoch - 1,
                "reason": "still paused when the search had nothing left to run",
            }
            self.set_status(model, PRUNED, event=(EventKind.PRUNED, detail))
        return bool(waiting)

    def exploit(self, model: ModelRun, decision: Decision) -> None:
        """PBT: take the weights and optimizer state of ``decision.source`` as of its last
        finished epoch, under ``decision.params``.

        The state file is written before the records change: if the run dies in between, the
        resumed driver sees new params in the state and records them (see recovery).
        """
        # Decision.__post_init__ refuses an "exploit" without both (and Decision is frozen).
        assert decision.source is not None and decision.params is not None
        source = self.roster[decision.source]
        if not source.history:
            warnings.warn(
                f"model {model.model_id}: exploit skipped, source has no epoch", stacklevel=2
            )
            return
        source_epoch = int(source.history[-1]["epoch"])
        path = checkpoints.epoch_path(source.folder, source_epoch)
        try:
            own = Counters.from_dict(training.load_counters(model.state_path))
            counters = Counters(
                version=model.version + 1,
                epoch=own.epoch,
                init_seed=own.init_seed,
                hops=own.hops,
                params=dict(decision.params),
            )
            state = self.builder.warm_started(decision.params, training.load_state(path), counters)
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
        model.durable_version = model.version  # written to its state file above
        self.store.update_model(model.model_id, params=model.params)
        self.store.add_event(
            EventKind.EXPLOIT.value,
            model=model.model_id,
            epoch=model.epoch - 1,
            source=source.model_id,
            source_epoch=source_epoch,
            params_before=before,
            params=model.params,
            reason=decision.reason,
        )
        self.rekey(model)

    def rekey(self, model: ModelRun) -> None:
        """With fusion on: what a model whose params changed may now be fused with (a new
        batch size, say, is a new fusion key), in the records for a restart to read back."""
        prefix = self._prefix_facts(model.params, None)
        if self.features is not None and self.features.changes(model.model_id, prefix):
            self.store.add_event(
                EventKind.FEATURE_PLAN.value, **self.features.enroll({model.model_id: prefix})
            )
        if prefix is None:
            facts = self.builder.fusability(model.params)
        else:
            facts = self._prefix_grouping(model.model_id, prefix)
        if facts is None:
            return
        change = self.roster.grouping.rekey(model.model_id, facts)
        if change is not None:
            self.store.add_event(EventKind.FUSION_KEY.value, **change)

    def _prefix_grouping(self, model_id: int, prefix: PrefixFacts) -> Fusability:
        """Whom a model with a frozen prefix hops with. One that reads its own depth kept
        trains alone, in its own shard order (the order it has with materialization off); the
        others compute part of their prefix in each unit, so models of one prefix share units
        (the prefix's remaining layers then run once for all of them)."""
        if self.features is not None and self.features.reads_kept(model_id):
            return Fusability(None, "it reads its frozen prefix's kept output", 0)
        return Fusability(key=f"prefix:{prefix.chain[-1]}", reason=None, nbytes=0)
