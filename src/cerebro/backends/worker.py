"""The worker's side of MOP, shared by every backend: it keeps its shards in memory, brings a
model's state in, runs one unit, and hands back a job that writes the new state.

Models a worker trained recently stay built in memory (an LRU cache), so a model that comes back
to the same worker with no hop elsewhere in between starts without reading its state.
"""

from __future__ import annotations

import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import training
from ..data import Dataset, Shard
from ..spec import ModelSpec
from .base import StateSaved, Unit, UnitDone, WorkerInfo
from .shipping import load_build


@dataclass
class _CachedModel:
    spec: ModelSpec
    version: int
    rng: dict[str, Any]  # "rng" (and "cuda_rng") to restore before the model's next hop
    counters: dict[str, int]
    params: dict[str, Any]  # what it was built with (PBT may change a model's params)
    nbytes: int = 0  # its tensors' size, measured when it arrives and after each training hop


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
    """

    worker_id: int
    dataset_path: str
    shards: frozenset[int]
    device: str
    build: bytes
    threads: int | None
    model_cache_mb: int
    deterministic: bool = False


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
        self._cache: OrderedDict[int, _CachedModel] = OrderedDict()
        dataset = Dataset.open(config.dataset_path)
        self.data: dict[tuple[str, int], Shard] = {}
        for split in ("train", "val"):
            for shard in sorted(shards):
                loaded = dataset.load_shard(split, shard)
                self.data[(split, shard)] = Shard(
                    loaded.x.to(self.device), loaded.y.to(self.device)
                )
        self.info = WorkerInfo(
            worker_id=worker_id,
            shards=frozenset(shards),
            device=str(self.device),
            rows_loaded=sum(s.rows for s in self.data.values()),
            bytes_loaded=sum(s.nbytes for s in self.data.values()),
        )

    def needs_state(self, unit: Unit) -> bool:
        """Whether running ``unit`` will read the model's state (it is not cached here at the
        unit's version): a backend holding the state elsewhere can hand it to :meth:`run`."""
        entry = self._cache.get(unit.model_id)
        return entry is None or entry.params != unit.params or entry.version != unit.version

    def run(
        self, unit: Unit, state: dict[str, Any] | None = None, received: float | None = None
    ) -> tuple[UnitDone, Callable[[], StateSaved] | None]:
        """Run one unit. Returns its result and, for training units, the job writing the state.

        ``state``: the model's state at ``unit.version`` if the backend already has it (from an
        object store, say); otherwise it is read from ``unit.state_path`` when needed.
        ``received``: when the unit reached the worker (``time.time()``), if the backend spent
        time fetching ``state`` before this call; the hop's ``load_s`` counts from there.
        """
        received = received or time.time()
        try:
            entry = self._bring_in(unit, state)
            load_s = time.time() - received
            if unit.kind == "train":
                if unit.rng_seed is not None:
                    torch.manual_seed(unit.rng_seed)  # CPU and every CUDA device
                else:
                    training.set_rng({**entry.rng, "counters": entry.counters}, self.device)
                start = time.time()
                stats = training.run_train_hop(
                    entry.spec,
                    self.data[("train", unit.shard)],
                    unit.shuffle_seed,
                    self.device,
                    unit.end_of_epoch,
                )
                end = time.time()
                done = self._done(unit, stats, start, end, load_s)
                entry.version = unit.version + 1
                entry.rng = {"rng": torch.get_rng_state()}
                if self.device.type == "cuda":
                    entry.rng["cuda_rng"] = torch.cuda.get_rng_state(self.device)
                entry.counters = _progress(entry.counters, unit, done.hop(unit.shard))
                snapshot = training.capture_state(entry.spec, entry.counters, self.device)
                entry.nbytes = _nbytes(entry.spec)  # the optimizer state may have just been created
                self._evict()
                save = self.save_job(unit, snapshot)
            else:
                start = time.time()
                stats = training.run_eval_hop(
                    entry.spec, self.data[("val", unit.shard)], self.device
                )
                end = time.time()
                done = self._done(unit, stats, start, end, load_s)
                save = None
        except Exception:
            # The model's objects may be half-updated: forget them, the last saved state is intact.
            self._cache.pop(unit.model_id, None)
            return UnitDone(
                unit.unit_id, self.worker_id, ok=False, error=traceback.format_exc()
            ), None
        return done, save

    def _done(
        self, unit: Unit, stats: training.HopStats, start: float, end: float, load_s: float
    ) -> UnitDone:
        return UnitDone(
            unit.unit_id,
            self.worker_id,
            ok=True,
            rows=stats.rows,
            sums=dict(stats.sums),
            start=start,
            end=end,
            load_s=load_s,
        )

    def _bring_in(self, unit: Unit, state: dict[str, Any] | None) -> _CachedModel:
        entry = self._cache.get(unit.model_id)
        if entry is not None and not self.needs_state(unit):
            self._cache.move_to_end(unit.model_id)
            return entry
        if entry is not None and entry.params != unit.params:
            entry = None  # rebuilt: batch size or layers may depend on the new params
        if entry is None:
            spec = training.build_spec(self.build, unit.params, init_seed=None)
            spec.model.to(self.device)
        else:
            spec = entry.spec
        if state is None:
            state = training.load_state(unit.state_path)
        found = state["counters"]["version"]
        if found != unit.version:
            raise RuntimeError(
                f"state of model {unit.model_id} at {unit.state_path} is version {found}, "
                f"expected {unit.version}"
            )
        training.restore_state(spec, state, self.device)
        rng: dict[str, Any] = {k: state[k] for k in ("rng", "cuda_rng") if k in state}
        entry = _CachedModel(
            spec, unit.version, rng, dict(state["counters"]), dict(unit.params), _nbytes(spec)
        )
        self._cache[unit.model_id] = entry
        self._cache.move_to_end(unit.model_id)
        self._evict()
        return entry

    def _evict(self) -> None:
        """Drop least recently used models until the cache fits its budget (keep the newest)."""
        total = sum(e.nbytes for e in self._cache.values())
        while len(self._cache) > 1 and total > self.cache_budget:
            total -= self._cache.popitem(last=False)[1].nbytes

    def save_job(self, unit: Unit, snapshot: dict[str, Any]) -> Callable[[], StateSaved]:
        """The job that writes a training unit's new state to ``unit.state_path`` (run by the
        backend, off the unit's critical path). Backends may wrap it to publish the state too."""

        def save() -> StateSaved:
            began = time.time()
            try:
                training.save_state(snapshot, unit.state_path)
            except Exception:
                # The cache belongs to the main thread; the driver fails this model anyway.
                return StateSaved(
                    unit.unit_id, self.worker_id, ok=False, error=traceback.format_exc()
                )
            return StateSaved(unit.unit_id, self.worker_id, ok=True, save_s=time.time() - began)

        return save


def _nbytes(spec: ModelSpec) -> int:
    """Bytes of a model's tensors: weights, buffers and optimizer state."""
    total = sum(t.nbytes for t in spec.model.state_dict().values())
    for state in spec.optimizer.state.values():
        total += sum(v.nbytes for v in state.values() if isinstance(v, torch.Tensor))
    return total


def _progress(counters: dict[str, Any], unit: Unit, hop: dict[str, Any]) -> dict[str, Any]:
    """Counters after a training hop. Besides the version, the state records which shards its
    current epoch has visited and what each hop measured, so that a resumed driver can rebuild
    the model's progress from the state file alone (records may lag it by one hop)."""
    same_epoch = counters.get("epoch") == unit.epoch
    hops = [*(counters.get("hops", []) if same_epoch else []), hop]
    return {
        **counters,
        "version": unit.version + 1,
        "epoch": unit.epoch,
        "visited": [h["shard"] for h in hops],
        "hops": hops,
    }
