"""The worker's side of MOP, shared by every backend: it keeps its shards in memory, brings
each model of a unit in, has the unit's runner (:mod:`cerebro.techniques`) train or evaluate
them, and hands back their new states (each backend moves them on its own way).

Models a worker trained recently stay built in memory (an LRU cache), so a model that comes back
to the same worker with no hop elsewhere in between starts without reading its state.
"""

from __future__ import annotations

import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from .. import training
from ..data import Dataset, Shard
from ..errors import ModelFailed
from ..kinds import UnitKind
from ..spec import ModelSpec
from ..state import Counters
from ..techniques import runner_for
from ..techniques.base import MemberSeeds, ModelInHand, Outcome, Runner
from ..techniques.features import Materialization
from ..techniques.materialized import FeatureStore
from .base import MemberResult, ShardPass, Unit, UnitDone, UnitMember, WorkerInfo
from .shipping import load_build
from .slots import SlotMaps

_in_worker = False


def in_worker() -> bool:
    """Whether this process is a cerebro worker (where starting an experiment would recurse)."""
    return _in_worker


@dataclass(frozen=True)
class WorkerConfig:
    """What one worker needs to start, whatever the backend.

    Args:
        worker_id: this worker's id.
        dataset_path: a prepared dataset every worker can read.
        shards: the shard ids this worker holds (training and validation split).
        device: torch device for models and data (e.g. "cpu", "cuda:0").
        build: the user's ``build`` function, as :func:`~.shipping.pickle_build` made it.
        threads: torch intra-op threads for this worker (None leaves torch's default).
        model_cache_mb: memory for models kept built between their hops (least recently used
            ones go first; the model in use always stays).
        deterministic: use torch's deterministic algorithms.
        handover_dir: where the worker writes new states for the next worker (None: straight
            to their state files); ``handover_budget``: the most bytes that folder may hold.
    """

    worker_id: int
    dataset_path: str
    shards: frozenset[int]
    device: str
    build: bytes
    threads: int | None
    model_cache_mb: int
    deterministic: bool = False
    handover_dir: str | None = None
    handover_budget: int = 0


class WorkerRuntime:
    """Runs units on the shards of one worker (see :class:`WorkerConfig`)."""

    def __init__(self, config: WorkerConfig) -> None:
        if config.threads:
            torch.set_num_threads(config.threads)
        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        worker_id, shards = config.worker_id, config.shards
        self.worker_id = worker_id
        self.device = torch.device(config.device)
        global _in_worker
        _in_worker = True  # before user modules are imported: they may call Experiment.run()
        self.build = load_build(config.build)
        self.cache_budget = config.model_cache_mb * 2**20
        self.slots = (
            SlotMaps(config.handover_dir, config.handover_budget) if config.handover_dir else None
        )
        self._cache: OrderedDict[int, ModelInHand] = OrderedDict()
        # Model id -> the slot its cached tensors are views of, and whether of its shared
        # mapping (trained in place there) or of a private, copy-on-write one (evaluated).
        self._bound_to: dict[int, tuple[str, bool]] = {}
        dataset = Dataset.open(config.dataset_path)
        self.data: dict[tuple[str, int], Shard] = {}
        self.digests: dict[tuple[str, int], str] = {}  # what kept features are keyed by
        for split in ("train", "val"):
            for shard in sorted(shards):
                loaded = dataset.load_shard(split, shard)
                self.data[(split, shard)] = Shard(
                    loaded.x.to(self.device), loaded.y.to(self.device)
                )
                self.digests[(split, shard)] = dataset.shard_digest(split, shard)
        self.features = FeatureStore()
        self.info = WorkerInfo(
            worker_id=worker_id,
            shards=frozenset(shards),
            device=str(self.device),
            rows_loaded=sum(s.rows for s in self.data.values()),
            bytes_loaded=sum(s.nbytes for s in self.data.values()),
        )

    def needs_state(self, member: UnitMember) -> bool:
        """Whether running a unit with ``member`` will read its state (it is not cached here at
        the member's version): a backend holding the state elsewhere can hand it to :meth:`run`."""
        entry = self._cache.get(member.model_id)
        return (
            entry is None
            or entry.bound
            or entry.params != member.params
            or entry.counters.version != member.version
        )

    def run(
        self,
        unit: Unit,
        states: dict[int, dict[str, Any]] | None = None,
        received: float | None = None,
    ) -> tuple[UnitDone, dict[int, dict[str, Any]]]:
        """Run one unit with its technique's runner. Returns its result and, for a training
        unit, each successful member's new state by model id (tensors on the CPU, referencing
        the worker's own: write or copy them before the next unit).

        ``states``: members' states at their unit versions that the backend already has (from
        an object store, say), by model id; the others are read from their ``source`` (else
        their ``state_path``) when needed. ``received``: when the unit reached the worker
        (``time.time()``), if the backend spent time fetching ``states`` before this call; the
        hop's ``load_s`` counts from there.
        """
        received = received or time.time()
        states = states or {}
        try:
            runner = runner_for(unit.technique)
            runner.check(len(unit.members))
            in_unit = frozenset(unit.model_ids)
            if self.slots is not None:
                self.slots.start_unit()
            models = [
                self._bring_in(m, states.get(m.model_id), in_unit, unit.kind) for m in unit.members
            ]
            load_s = time.time() - received
            split = "train" if unit.kind is UnitKind.TRAIN else "val"
            passes: list[ShardPass] = []
            materialized: list[Materialization] = []
            running = list(range(len(models)))  # members that have not failed
            for i, shard_id in enumerate(unit.shards):
                shard_pass, made = self._pass(
                    unit, runner, [models[k] for k in running], [unit.members[k] for k in running],
                    split, i, shard_id,
                )  # fmt: skip
                passes.append(shard_pass)
                materialized += made
                running = [k for k, r in zip(running, shard_pass.results, strict=True) if r.ok]
            done = UnitDone(
                unit.unit_id,
                self.worker_id,
                ok=True,
                passes=tuple(passes),
                load_s=load_s,
                materialized=tuple(materialized),
            )
            failed = set(unit.model_ids) - {unit.members[k].model_id for k in running}
            for model_id in failed:  # its objects may hold non-finite values: built again later
                self._cache.pop(model_id, None)
            snapshots: dict[int, dict[str, Any]] = {}
            if unit.kind is UnitKind.TRAIN:
                for member, model in zip(unit.members, models, strict=True):
                    if member.model_id in failed:
                        continue  # failed alone: its last saved state stays
                    for hop in done.hops(unit, member.model_id):
                        model.counters = model.counters.after_hop(hop, epoch=unit.epoch)
                    snapshot = training.capture_state(
                        model.spec, model.counters.to_dict(), self.device
                    )
                    # The runner left each member's own random stream in model.rng (a fused
                    # runner draws from per-member generators, not torch's global one).
                    snapshot.update({k: v.clone() for k, v in model.rng.items()})
                    snapshots[member.model_id] = snapshot
                    # The optimizer state may have just been created: measured again.
                    model.nbytes = _nbytes(model.spec)
                self._evict(in_unit)
        except Exception:
            # The models' objects may be half-updated: forget them, the last saved states are
            # intact.
            for member in unit.members:
                self._cache.pop(member.model_id, None)
            return UnitDone(
                unit.unit_id, self.worker_id, ok=False, error=traceback.format_exc()
            ), {}
        return done, snapshots

    def _pass(
        self,
        unit: Unit,
        runner: Runner,
        models: list[ModelInHand],
        members: list[UnitMember],
        split: str,
        index: int,
        shard_id: int,
    ) -> tuple[ShardPass, list[Materialization]]:
        """Train or evaluate ``models`` (the unit's members still running) on the unit's
        ``index``-th shard."""
        shard = self.data[(split, shard_id)]
        start = time.time()
        materialized: list[Materialization] = []
        if unit.features is not None:  # the members train on their prefix's output
            frozen = models[0].spec.frozen
            if frozen is None:
                raise RuntimeError(f"model {members[0].model_id} has no frozen prefix")
            x, materialized = self.features.features(
                unit.features, frozen, shard, split, shard_id,
                self.digests[(split, shard_id)], self.device,
            )  # fmt: skip
            shard = Shard(x, shard.y)
        outcomes: list[Outcome] = []
        if models and unit.kind is UnitKind.TRAIN:
            seeds = [
                MemberSeeds(
                    m.shuffle_seeds[index], None if m.rng_seeds is None else m.rng_seeds[index]
                )
                for m in members
            ]
            last = unit.end_of_epoch and index == len(unit.shards) - 1
            outcomes = runner.train(models, seeds, shard, self.device, last)
        elif models:
            outcomes = runner.evaluate(models, shard, self.device)
        results = tuple(
            _member_result(m.model_id, outcome)
            for m, outcome in zip(members, outcomes, strict=True)
        )
        return ShardPass(shard_id, start, time.time(), results), materialized

    def forget(self, model_ids: tuple[int, ...]) -> None:
        """Drop these models from the cache (their objects no longer match a saved state)."""
        for model_id in model_ids:
            self._cache.pop(model_id, None)

    def _bring_in(
        self,
        member: UnitMember,
        state: dict[str, Any] | None,
        in_unit: frozenset[int],
        kind: UnitKind,
    ) -> ModelInHand:
        entry = self._cache.get(member.model_id)
        if entry is not None and (
            not self.needs_state(member) or self._uses_in_place(entry, member, kind)
        ):
            self._cache.move_to_end(member.model_id)
            return entry
        if entry is not None and entry.params != member.params:
            entry = None  # rebuilt: batch size or layers may depend on the new params
        spec = self._build(member) if entry is None else entry.spec
        source = member.source or member.state_path
        # States this worker reads itself are bound, not copied, where they can be: a
        # training unit's into its target slot (trained in place there), an evaluation's
        # slot mapped copy-on-write (a state file's bytes are copied: it may be written over
        # in turns). States a backend hands over (Ray's) are copied.
        ours = state is None
        in_target = False
        if ours and self.slots is not None and member.target is not None:
            state = self.slots.bring_in(source, member.target)
            in_target = state is not None
        elif ours and kind is not UnitKind.EVAL:
            ours = False  # no slot to train in: the file's mapping is copied (as before)
        if state is None and self.slots is not None:
            state = self.slots.read(source)  # a slot is mapped: its pages are read when used
        if state is None:
            state = training.load_state(source)
        counters = Counters.from_dict(state["counters"])
        if counters.version != member.version:
            raise RuntimeError(
                f"state of model {member.model_id} at {source} is version "
                f"{counters.version}, expected {member.version}"
            )
        bound = ours and training.can_bind(spec, state)
        self._bound_to.pop(member.model_id, None)
        if bound:
            training.bind_state(spec, state)
            if in_target and member.target is not None:
                self._bound_to[member.model_id] = (member.target, True)
            elif member.target is None and self.slots is not None and self.slots.remember(source):
                self._bound_to[member.model_id] = (source, False)
        else:
            if entry is not None and entry.bound:  # copying into it would write another's state
                spec = self._build(member)
            training.restore_state(spec, state, self.device)
        rng: dict[str, Any] = {k: state[k] for k in ("rng", "cuda_rng") if k in state}
        entry = ModelInHand(
            member.model_id, spec, rng, counters, dict(member.params), _nbytes(spec), bound
        )
        self._cache[member.model_id] = entry
        self._cache.move_to_end(member.model_id)
        self._evict(in_unit)
        return entry

    def _build(self, member: UnitMember) -> ModelSpec:
        return training.build_spec(self.build, member.params, init_seed=None).to(self.device)

    def _uses_in_place(self, entry: ModelInHand, member: UnitMember, kind: UnitKind) -> bool:
        """Whether the unit can use ``entry`` as it is, bound to the slot it is to read: the
        slot still holds what the model was bound to (or handed over) here. An evaluation
        writes nothing (no gradients, eval mode); a training unit does so only where the slot
        is its target too (the driver gave it the slot to train in: its durable copy is
        written), so no state anyone needs changes."""
        bound = self._bound_to.get(member.model_id)
        if kind is UnitKind.EVAL:
            usable = bound is not None and bound[0] == member.source
        else:  # trained in place: its tensors must be the slot's own bytes, not a private copy
            usable = member.target == member.source and bound == (member.source, True)
        return (
            usable
            and self.slots is not None
            and member.source is not None
            and entry.params == member.params
            and entry.counters.version == member.version
            and self.slots.unchanged(member.source)
        )

    def _evict(self, in_unit: frozenset[int]) -> None:
        """Drop least recently used models until the cache fits its budget; the models of the
        unit running stay (they are in use)."""
        total = sum(e.nbytes for e in self._cache.values())
        for model_id in [i for i in self._cache if i not in in_unit]:  # oldest first
            if total <= self.cache_budget:
                break
            total -= self._cache.pop(model_id).nbytes


def _member_result(model_id: int, outcome: Outcome) -> MemberResult:
    if isinstance(outcome, ModelFailed):
        return MemberResult(model_id, 0, {}, error=f"{type(outcome).__name__}: {outcome}")
    return MemberResult(model_id, outcome.rows, dict(outcome.sums))


def _nbytes(spec: ModelSpec) -> int:
    """Bytes of the model's own tensors (weights, buffers, gradients and optimizer state): what
    keeping it built costs this worker. Tensors bound to a mapped state file are left out (their
    storage is the file's: not resizable); the slot's memory is the driver's to free."""
    tensors = [*spec.model.state_dict().values()]
    tensors += [p.grad for p in spec.model.parameters() if p.grad is not None]
    for state in spec.optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.nbytes for t in tensors if t.untyped_storage().resizable())
