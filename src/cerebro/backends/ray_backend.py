"""``RayBackend``: MOP on a Ray cluster, with one long-lived actor per worker.

Each actor loads its shards once, like a local worker process, and runs the same
:class:`~cerebro.backends.worker.WorkerRuntime`. What Ray adds:

- **Placement across nodes.** Workers are spread over the cluster's nodes, within each node's
  CPUs and GPUs. Before any actor starts, a probe on every node checks which shards it can read
  at the dataset's path, and that it can write the experiment's checkpoint folder. Shards that
  only some nodes hold (node-local disks) go to workers on those nodes.
- **States through the object store.** After a training unit, the actor publishes each model's
  new state in Ray's object store (tensors as numpy arrays, which Ray stores without pickling)
  before it reports the unit done; the next worker to train the model reads it from there, node
  to node, never through the driver. A thread of the actor then writes the published copy to
  the model's state file, the durable copy that checkpoints and recovery use. A state lost with
  its actor before it was written is reported (``states_lost``): the model goes back to its
  state file.
- **Recovery.** A worker whose actor or node dies is replaced by a new actor with the same
  shards, on the same node if it is alive, otherwise on another node that has room and can read
  them. The driver then re-runs the interrupted units, exactly as with local workers.

Ray is optional: ``pip install "cerebro[ray]"``. This module imports it only when a backend is
created.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sys
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import training, turns
from ..errors import ConfigError, WorkerError, check_int, check_number
from ..files import is_url
from .allocator import tune_malloc_for_training
from .base import (
    Backend,
    Event,
    StateSaved,
    Unit,
    UnitDone,
    WorkerInfo,
    WorkerLost,
    check_worker_options,
    check_workers_fit_shards,
)
from .handover import write_states
from .shipping import pickle_build
from .watchdog import Watchdog, check_worker_timeout
from .worker import WorkerConfig, WorkerRuntime

_START_TIMEOUT_S = 600.0
_FETCH_TIMEOUT_S = 120.0  # fetching a state from another node's object store
_CONNECT_TIMEOUT_S = 5.0  # reaching the head node's address before handing it to Ray
_REPLACE_TIMEOUT_S = 120.0  # a replacement actor must be placed and loaded by then
_START_ATTEMPTS = 3  # an actor that dies while it starts is started again, this many in all


class RayBackend(Backend):
    """Run MOP workers as Ray actors, on one machine or across a cluster.

    Args:
        address: the Ray cluster to join (``"host:port"`` of its head node, ``"auto"`` for the
            cluster this machine belongs to, or ``"ray://host:10001"``). ``None`` starts a Ray
            instance on this machine, or uses the one this process already connected to.
        workers: number of worker actors. ``None``: as many as the cluster can place (and the
            dataset has shards for).
        gpus_per_worker: GPUs reserved for each actor (fractions share a GPU); with more than 0
            the actor trains on its GPU.
        cpus_per_worker: CPUs reserved for each actor; also its torch thread count, unless
            ``threads_per_worker`` is given (deterministic experiments use 1 thread by default,
            so that results do not depend on the cluster).
        threads_per_worker: torch intra-op threads in each actor.
        model_cache_mb: memory each actor may use to keep models built between their hops
            (MiB). Default: a third of the memory its node gives Ray's tasks, split among the
            workers placed there, and at least 1024. A model that does not fit is built again
            at each hop that brings it in (a 100M-parameter model with Adam takes 1.6 GB).
        runtime_env: Ray runtime environment for the actors (e.g. ``{"working_dir": "."}`` to ship
            the module that defines ``build``). When this backend starts Ray itself, actors get
            this process's ``sys.path`` so they import what the driver imports.
        worker_timeout: seconds an actor running a unit may leave its heartbeat calls (one a
            second) unanswered before it is declared lost, killed and replaced, and its unit run
            again. Default: the longer of 30 s and 3x the longest unit so far.

    The dataset and the experiment's ``path`` (or ``checkpoint_dir``) must be readable, and the
    latter writable, by every node: a shared filesystem, or an fsspec URL such as ``s3://``.
    Cerebro must be installed on every node.

    Example:
        >>> backend = cerebro.RayBackend()                                # doctest: +SKIP
        >>> backend = cerebro.RayBackend("10.0.0.5:6379", workers=16,
        ...                              gpus_per_worker=1)                 # doctest: +SKIP
    """

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        gpus_per_worker: float = 0,
        cpus_per_worker: float = 1,
        threads_per_worker: int | None = None,
        model_cache_mb: int | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        worker_timeout: float | None = None,
    ) -> None:
        try:
            import ray  # noqa: F401 - only to fail here, with the way to install it
        except ImportError as e:
            raise ImportError(
                'RayBackend needs Ray, which is not installed: pip install "cerebro[ray]"'
            ) from e
        if address is not None and (not isinstance(address, str) or not address.strip()):
            raise ConfigError("address", address, 'None, "auto", "host:port" or "ray://host:port"')
        check_int("workers", workers, minimum=1, allow_none=True, hint="None: all that fit")
        check_number("gpus_per_worker", gpus_per_worker, minimum=0)
        check_number("cpus_per_worker", cpus_per_worker, minimum=0)
        if cpus_per_worker == 0 and gpus_per_worker == 0:
            raise ConfigError(
                "cpus_per_worker", cpus_per_worker, "a number > 0 when gpus_per_worker is 0"
            )
        check_worker_options(threads_per_worker, model_cache_mb, _CACHE_DEFAULT)
        self.address = address
        self.workers = workers
        self.gpus_per_worker = gpus_per_worker
        self.cpus_per_worker = cpus_per_worker
        self.threads_per_worker = threads_per_worker
        self.model_cache_mb = model_cache_mb
        self.runtime_env = dict(runtime_env) if runtime_env is not None else None
        self.worker_timeout = check_worker_timeout(worker_timeout)
        self._watchdog = Watchdog(self.worker_timeout)
        self._beats: dict[int, Any] = {}  # worker -> its unanswered heartbeat call
        self._lost_while_starting: list[WorkerLost] = []
        self._workers: list[_Placed] = []
        self._pending: dict[
            Any, tuple[str, int, int, Unit]
        ] = {}  # ref -> (what, worker, gen, unit)
        # model -> (version, object ref, worker that published it); and its newest version
        # known to be in its state file
        self._states: dict[int, tuple[int, Any, int]] = {}
        self._durable: dict[int, int] = {}
        # State files the workers wrote in turns (their spares go once their models are done),
        # and the models the driver released.
        self._state_files: dict[int, str] = {}
        self._released: set[int] = set()

    # Cluster -----------------------------------------------------------------------------------

    def _connect(self) -> None:
        import ray

        if self.address not in (None, "auto"):
            _check_reachable(self.address)
        if ray.is_initialized():
            # One process joins one cluster: an address naming another one is a mistake.
            current = str(ray.get_runtime_context().gcs_address)
            if self.address not in (None, "auto") and not _same_address(self.address, current):
                raise ConfigError(
                    "address",
                    self.address,
                    f"the Ray cluster this process is connected to ({current}), "
                    "or call ray.shutdown() first",
                )
            return
        runtime_env = self.runtime_env
        if runtime_env is None and self.address is None:
            # A local Ray's workers import what this process imports (like spawned processes).
            paths = [p for p in sys.path if p and os.path.isdir(p)]
            runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}
        options: dict[str, Any] = {
            # "local" starts a new instance; None would join one found in Ray's temp files,
            # which may be a dead cluster left by another program.
            "address": self.address or "local",
            "runtime_env": runtime_env,
            "include_dashboard": False,
            "logging_level": "WARNING",
            "configure_logging": False,
        }
        try:
            ray.init(**options)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(
                "address",
                self.address,
                "the address of a running Ray cluster",
                # Ray turns token authentication on by itself only for clusters it finds, not
                # for an explicit address: the usual reason a live cluster refuses a driver.
                hint=f"{e}. A cluster started by `ray start` uses token authentication by "
                "default: run with RAY_AUTH_MODE=token, and the cluster's token in "
                "RAY_AUTH_TOKEN or ~/.ray/auth_token",
            ) from e

    def _capacity(self) -> dict[str, int]:
        """How many workers each alive node can hold (node id -> count)."""
        import ray

        capacity = {}
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            resources = node.get("Resources", {})
            fits = []
            if self.cpus_per_worker:
                fits.append(int(resources.get("CPU", 0) // self.cpus_per_worker))
            if self.gpus_per_worker:
                fits.append(int(resources.get("GPU", 0) // self.gpus_per_worker))
            capacity[node["NodeID"]] = min(fits)
        return capacity

    def _describe_cluster(self) -> str:
        import ray

        total = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        return f"{nodes} node(s), {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs"

    @property
    def num_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        self._connect()
        return max(1, sum(self._capacity().values()))

    def validate(self, num_shards: int) -> None:
        self._connect()
        room = sum(self._capacity().values())
        if self.workers is None:
            self.workers = max(1, min(room, num_shards))
        check_workers_fit_shards(self.workers, num_shards)
        if self.workers > room:
            raise ConfigError(
                "workers",
                self.workers,
                f"at most {room}: what the Ray cluster at {self._where()} can place with "
                f"cpus_per_worker={self.cpus_per_worker:g}, "
                f"gpus_per_worker={self.gpus_per_worker:g}",
                hint=self._describe_cluster(),
            )

    def _where(self) -> str:
        import ray

        if self.address not in (None, "auto"):
            return self.address
        with contextlib.suppress(Exception):
            return str(ray.get_runtime_context().gcs_address)
        return "this machine"

    # Start -------------------------------------------------------------------------------------

    def start(
        self,
        dataset_path: str,
        placement: dict[int, frozenset[int]],
        build: Callable[..., Any],
        deterministic: bool = False,
        state_dir: str | None = None,
    ) -> list[WorkerInfo]:
        import ray

        self._connect()
        num_shards = len(set().union(*placement.values()))
        if self.workers is None:
            self.validate(num_shards)
        workers = self.workers
        assert workers is not None  # validate() sets it to what the cluster holds
        self._survey = _survey_nodes(dataset_path, num_shards, state_dir)
        nodes_for = _choose_nodes(workers, self._capacity(), self._survey)
        shards = _place_by_locality(placement, nodes_for, self._survey, num_shards)
        payload = pickle_build(build)
        threads = self.threads_per_worker or (
            1 if deterministic else max(1, int(self.cpus_per_worker))
        )
        cache_mb = self._cache_mb(nodes_for)
        self._configs = [
            WorkerConfig(
                worker_id=w,
                dataset_path=dataset_path,
                shards=shards[w],
                device="cuda" if self.gpus_per_worker else "cpu",
                build=payload,
                threads=threads,
                model_cache_mb=cache_mb[w],
                deterministic=deterministic,
            )
            for w in range(workers)
        ]
        self._actor_class: Any = ray.remote(_WorkerActor)  # Ray's actor class has no stub
        self._workers = [self._launch(w, nodes_for[w], generation=0) for w in range(workers)]
        self._lost_while_starting = []
        return [self._ready_or_retried(w) for w in range(workers)]

    def _cache_mb(self, nodes_for: list[str]) -> list[int]:
        """Each worker's model cache (MiB): the one asked for, else its node's share."""
        if self.model_cache_mb is not None:
            return [self.model_cache_mb] * len(nodes_for)
        import ray

        memory = {n["NodeID"]: n.get("Resources", {}).get("memory", 0) for n in ray.nodes()}
        return [default_cache_mb(memory.get(node, 0), nodes_for.count(node)) for node in nodes_for]

    def _ready_or_retried(self, worker_id: int) -> WorkerInfo:
        """Wait for a new actor; one that dies while it starts (killed, out of memory: not an
        error in its own set-up) is started again, up to ``_START_ATTEMPTS`` in all, and each
        loss is reported by the next poll so that it is recorded."""
        attempt = 1
        while True:
            try:
                return self._await_ready(worker_id, _START_TIMEOUT_S, shutdown_on_error=False)
            except _DiedWhileStarting:
                if attempt == _START_ATTEMPTS:
                    self.shutdown(graceful=False)
                    raise
            except WorkerError:
                self.shutdown(graceful=False)
                raise
            attempt += 1
            self._lost_while_starting.append(WorkerLost.before_ready(worker_id, exitcode=None))
            old = self._workers[worker_id]
            self._workers[worker_id] = self._launch(worker_id, old.node_id, old.generation + 1)

    def _launch(self, worker_id: int, node_id: str, generation: int) -> _Placed:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor = self._actor_class.options(
            num_cpus=self.cpus_per_worker,
            num_gpus=self.gpus_per_worker,
            # Units and state waits run side by side; a unit never overlaps another one.
            max_concurrency=4,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            name=f"cerebro-worker-{worker_id}-{uuid.uuid4().hex[:8]}",
        ).remote(self._configs[worker_id])
        return _Placed(actor, node_id, generation, actor.describe.remote())

    def _await_ready(self, worker_id: int, timeout: float, shutdown_on_error: bool) -> WorkerInfo:
        import ray

        placed = self._workers[worker_id]
        host = self._survey[placed.node_id].host
        try:
            description = ray.get(placed.ready, timeout=timeout)
        except ray.exceptions.RayError as e:
            if shutdown_on_error:
                self.shutdown(graceful=False)
            died = isinstance(e, ray.exceptions.ActorDiedError) and not e.actor_init_failed
            why = (
                f"did not start within {timeout:g} s"
                if isinstance(e, ray.exceptions.GetTimeoutError)
                else f"could not start:\n{e}"
            )
            where = f"worker {worker_id} on node {host} ({placed.node_id[:12]})"
            raise (_DiedWhileStarting if died else WorkerError)(f"{where} {why}") from e
        placed.pid = description["pid"]
        return description["info"]

    # Units -------------------------------------------------------------------------------------

    def submit(self, unit: Unit) -> None:
        placed = self._workers[unit.worker_id]
        # Nested in a dict, the refs are not fetched before the call: a worker that has a
        # model cached at this version never transfers it.
        refs = {}
        for member in unit.members:
            self._released.discard(member.model_id)  # a model a person resumed trains again
            published = self._states.get(member.model_id)
            if published and published[0] == member.version:
                refs[member.model_id] = published[1]
            elif published:  # a newer state file (an exploit, a rollback): that is the one
                del self._states[member.model_id]
        ref = placed.actor.run.remote(unit, refs)
        self._pending[ref] = ("run", unit.worker_id, placed.generation, unit)
        self._watchdog.heard(unit.worker_id, time.monotonic())  # its silence counts from now

    def poll(self, timeout: float) -> list[Event]:
        import ray

        if self._lost_while_starting:  # reported first, so that every loss is recorded
            lost, self._lost_while_starting = self._lost_while_starting, []
            return list(lost)
        if not self._pending:
            time.sleep(timeout)
            return []
        ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=0)
        events: list[Event] = []
        dead: set[int] = set()
        for ref in ready:
            what, worker_id, generation, unit = self._pending.pop(ref)
            if generation != self._workers[worker_id].generation:
                continue  # from a worker already replaced
            try:
                value = ray.get(ref)
            except ray.exceptions.RayError:
                dead.add(worker_id)
                continue
            if what == "run":
                done, published = value
                events.append(done)
                self._watchdog.unit_took(done.end - done.start)
                for member in unit.members:
                    version = member.version + unit.hops
                    if member.model_id in published:
                        self._states[member.model_id] = (
                            version, published[member.model_id], worker_id
                        )  # fmt: skip
                    if (written := done.written.get(member.model_id)) is not None:
                        # Not published (object store full, say): written to its file at once.
                        events.append(self._saved(StateSaved(
                            member.model_id, version, True, written.seconds, path=written.path
                        )))  # fmt: skip
                if published:
                    saved_ref = self._workers[worker_id].actor.saved.remote(unit.unit_id)
                    self._pending[saved_ref] = ("saved", worker_id, generation, unit)
            else:
                events += [self._saved(saved) for saved in value]
        for worker_id in sorted(dead):
            events.append(self._replace(worker_id))
        for worker_id in self._stuck() - dead:
            events.append(self._replace(worker_id, self._watchdog.stuck_reason))
        return events

    def _saved(self, saved: StateSaved) -> StateSaved:
        if saved.ok:
            self._durable[saved.model_id] = max(self._durable.get(saved.model_id, 0), saved.version)
            if saved.path and not is_url(saved.path):
                self._state_files[saved.model_id] = saved.path
        if saved.model_id in self._released:
            self._drop_spare(saved.model_id)
        return saved

    def release(self, model_id: int) -> None:
        """Its state file's spare goes (:mod:`cerebro.turns`): now, or once the writes of it
        still under way are reported."""
        self._released.add(model_id)
        self._drop_spare(model_id)

    def _drop_spare(self, model_id: int) -> None:
        saving = any(
            what == "saved" and model_id in unit.model_ids
            for what, _, _, unit in self._pending.values()
        )
        path = None if saving else self._state_files.pop(model_id, None)
        if path is not None:
            turns.drop_spare(path)

    def _stuck(self) -> set[int]:
        """Busy workers whose heartbeat calls (answered by another of the actor's threads
        while it runs a unit) have gone unanswered for longer than the timeout."""
        import ray

        busy = {p[1] for p in self._pending.values() if p[0] == "run"}
        if self._beats:
            answered, _ = ray.wait(
                list(self._beats.values()), num_returns=len(self._beats), timeout=0
            )
            now = time.monotonic()
            for worker_id in [w for w, ref in self._beats.items() if ref in answered]:
                del self._beats[worker_id]
                self._watchdog.heard(worker_id, now)
        for worker_id in busy - set(self._beats):
            self._beats[worker_id] = self._workers[worker_id].actor.heartbeat.remote()
        return set(self._watchdog.silent(busy, time.monotonic()))

    def _replace(self, worker_id: int, reason: str = "exited") -> WorkerLost:
        """Start a new actor for a dead one, with the same shards; units it ran are lost."""
        import ray

        old = self._workers[worker_id]
        with contextlib.suppress(Exception):
            ray.kill(old.actor)
        for ref in [r for r, p in self._pending.items() if p[1] == worker_id]:
            del self._pending[ref]
        self._beats.pop(worker_id, None)
        # States it published are gone with it (it owned them): those not yet in their state
        # files are lost.
        lost = tuple(
            sorted(
                model_id
                for model_id, (version, _, by) in self._states.items()
                if by == worker_id and self._durable.get(model_id, 0) < version
            )
        )
        for model_id in [m for m, (_, _, by) in self._states.items() if by == worker_id]:
            del self._states[model_id]
        # Ray learns that a node died some seconds after the node's actors: a replacement placed
        # on it fails to start, and the next candidate is tried.
        failed: set[str] = set()
        while True:
            node_id = self._replacement_node(worker_id, old.node_id, failed)
            self._workers[worker_id] = self._launch(worker_id, node_id, old.generation + 1)
            try:
                self._await_ready(worker_id, _REPLACE_TIMEOUT_S, shutdown_on_error=False)
            except WorkerError:
                failed.add(node_id)
                if len(failed) >= 3:
                    raise
                continue
            return WorkerLost(worker_id, exitcode=None, reason=reason, states_lost=lost)

    def _replacement_node(self, worker_id: int, previous: str, failed: set[str]) -> str:
        """The dead worker's node if it is alive, else another that has room and its shards."""
        capacity = {n: room for n, room in self._capacity().items() if n not in failed}
        if previous in capacity:
            return previous
        shards = self._configs[worker_id].shards
        used: dict[str, int] = {}
        for w, placed in enumerate(self._workers):
            if w != worker_id:
                used[placed.node_id] = used.get(placed.node_id, 0) + 1
        candidates = [
            node
            for node, room in capacity.items()
            if room > used.get(node, 0)
            and node in self._survey
            and shards <= self._survey[node].shards
        ]
        if not candidates:
            lost = self._survey.get(previous)
            raise WorkerError(
                f"worker {worker_id} was lost with its node "
                f"{lost.host if lost else '?'} ({previous[:12]}), and no other node has room "
                f"for it (cpus_per_worker={self.cpus_per_worker:g}, "
                f"gpus_per_worker={self.gpus_per_worker:g}) and can read its shards "
                f"{sorted(shards)}; {self._describe_cluster()}. Everything trained so far is "
                "saved: add a node, then resume the experiment"
            )
        return min(candidates, key=lambda node: (used.get(node, 0), node))

    def pids(self) -> list[int]:
        """Process ids of the current worker actors (all on this machine only if Ray is local)."""
        return [placed.pid for placed in self._workers]

    def nodes(self) -> list[str]:
        """Node id of each worker's actor."""
        return [placed.node_id for placed in self._workers]

    def shutdown(self, graceful: bool = True) -> None:
        import ray

        # State files still being written: finished first (also after an error, so a resume
        # has less to train again).
        saves = [r for r, p in self._pending.items() if p[0] == "saved"]
        with contextlib.suppress(ray.exceptions.RayError):
            ray.wait(saves, num_returns=len(saves), timeout=300 if graceful else 30)
        for placed in self._workers:
            with contextlib.suppress(Exception):
                ray.kill(placed.actor)
        for path in self._state_files.values():  # a resumed run starts without spares
            turns.drop_spare(path)
        self._workers, self._pending, self._states, self._durable = [], {}, {}, {}
        self._state_files, self._released = {}, set()

    def __repr__(self) -> str:
        return (
            f"RayBackend(address={self.address!r}, workers={self.workers}, "
            f"gpus_per_worker={self.gpus_per_worker:g}, cpus_per_worker={self.cpus_per_worker:g})"
        )


class _DiedWhileStarting(WorkerError):
    """An actor's process ended before it was ready (not an error raised by its set-up)."""


@dataclass
class _Placed:
    """A worker's current actor, the node it was placed on, and how many times it was replaced."""

    actor: Any
    node_id: str
    generation: int
    ready: Any  # ref to the actor's description once its shards are loaded
    pid: int = 0


_CACHE_DEFAULT = "None: a third of the node's memory for tasks, split among its workers"


def default_cache_mb(node_memory: float, workers_on_node: int) -> int:
    """A worker's share of its node for keeping models built between hops (MiB): a third of
    the memory the node gives Ray's tasks (``node_memory`` bytes), split among the workers
    placed on it, and at least 1024. Rebuilding a model that does not fit costs its
    initialization and fresh pages for all its tensors at each hop (a 100M-parameter model's
    hop: 2.6 s against 0.58 s cached, measured in benchmarks/mop_scaling.py on one node).

    Example:
        >>> default_cache_mb(48 * 2**30, workers_on_node=4)
        4096
        >>> default_cache_mb(0, workers_on_node=1)
        1024
    """
    return max(1024, int(node_memory / 3 / max(1, workers_on_node) / 2**20))


# The actor ---------------------------------------------------------------------------------------


class _WorkerActor:
    """A worker: its shards in memory, units run by a :class:`WorkerRuntime`. Each training unit's
    new states are published in the object store before the unit is reported done, then written
    to their state files from there by a thread (off the unit's path)."""

    def __init__(self, config: WorkerConfig) -> None:
        tune_malloc_for_training()
        # States come in as read-only views of the object store, which torch warns about on
        # every tensor; nothing here writes to them (see from_object_store).
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        self.runtime = WorkerRuntime(config)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cerebro-save")
        self._saves: dict[int, Future[list[StateSaved]]] = {}
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"info": self.runtime.info, "pid": os.getpid(), "host": socket.gethostname()}

    def heartbeat(self) -> None:
        """Answered by another thread while a unit runs: only a stuck process stays silent."""

    def run(self, unit: Unit, published: dict[int, Any]) -> tuple[UnitDone, dict[int, Any]]:
        """Run a unit; returns its result and the refs of the new states it published."""
        import ray

        received = time.time()
        states, unfetched = {}, []
        for member in unit.members:
            if member.model_id in published and self.runtime.needs_state(member):
                try:
                    ref = published[member.model_id]
                    # Views, not copies: bringing the state in copies it into the model's
                    # own tensors (one copy less on the hop's path, 1x a memcpy of the state).
                    states[member.model_id] = from_object_store(
                        ray.get(ref, timeout=_FETCH_TIMEOUT_S), copy=False
                    )
                except ray.exceptions.RayError:
                    unfetched.append(member.model_id)  # lost with its actor: try the file
        done, snapshots = self.runtime.run(unit, states, received)
        if not done.ok and unfetched:  # the file did not hold that version either
            return dataclasses.replace(done, states_lost=tuple(unfetched)), {}
        refs: dict[int, Any] = {}
        unpublished: dict[int, dict[str, Any]] = {}
        for model_id, snapshot in snapshots.items():
            try:
                refs[model_id] = ray.put(to_object_store(snapshot))
            except (ray.exceptions.RayError, MemoryError):
                unpublished[model_id] = snapshot  # object store full, say: through its file
        kept = write_states(unit, unpublished, slots=None)
        self.runtime.forget(tuple(kept.failed))  # their objects are ahead of every state kept
        done = dataclasses.replace(done, written=kept.written, not_handed_over=kept.failed)
        if refs:
            with self._lock:
                self._saves[unit.unit_id] = self._writer.submit(_write_published, unit, refs)
        return done, refs

    def saved(self, unit_id: int) -> list[StateSaved]:
        """Wait for a unit's published states to be written to their state files."""
        with self._lock:
            future = self._saves.pop(unit_id)
        return future.result()


def _write_published(unit: Unit, refs: dict[int, Any]) -> list[StateSaved]:
    """Write each published state to its model's state file, from the object store's copy: the
    model's own tensors may be training on in the next unit already."""
    import ray

    saved = []
    for member in unit.members:
        if member.model_id not in refs:
            continue
        version, path = member.version + unit.hops, member.state_path
        began = time.perf_counter()
        try:
            state = from_object_store(ray.get(refs[member.model_id]), copy=False)
            training.save_state(state, path, newer_only=True)  # a later hop's may be there
        except Exception:
            error = traceback.format_exc()
            saved.append(StateSaved(member.model_id, version, False, error=error, path=path))
            continue
        took = time.perf_counter() - began
        saved.append(StateSaved(member.model_id, version, True, took, path=path))
    return saved


# Nodes and placement -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _NodeSurvey:
    host: str
    shards: frozenset[int]  # shards whose training and validation files this node can read
    problem: str | None  # why the node cannot take workers (dataset or checkpoints unreadable)


def _survey_nodes(
    dataset_path: str, num_shards: int, state_dir: str | None
) -> dict[str, _NodeSurvey]:
    """Run a probe on every alive node: which shards it reads, whether it can write states."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(_probe_node)
    alive = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    refs = {
        node: probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
        ).remote(dataset_path, num_shards, state_dir)
        for node in alive
    }
    survey = {}
    for node, ref in refs.items():
        try:
            host, readable, problem = ray.get(ref, timeout=_START_TIMEOUT_S)
            survey[node] = _NodeSurvey(host, frozenset(readable), problem)
        except ray.exceptions.RayError as e:
            survey[node] = _NodeSurvey("?", frozenset(), f"the probe failed: {e}")
    return survey


def _probe_node(
    dataset_path: str, num_shards: int, state_dir: str | None
) -> tuple[str, list[int], str | None]:
    from .. import files
    from ..data import Dataset

    host = socket.gethostname()
    try:
        dataset = Dataset.open(dataset_path)
    except Exception as e:
        return host, [], f"cannot read the dataset at {dataset_path}: {e}"
    readable = [
        shard
        for shard in range(num_shards)
        if all(files.exists(dataset.shard_path(split, shard)) for split in ("train", "val"))
    ]
    if state_dir is not None:
        probe = f"{state_dir.rstrip('/')}/.cerebro-probe-{host}-{os.getpid()}"
        try:
            files.write_bytes_atomically(probe, b"ok")
            files.remove(probe)
        except Exception as e:
            return host, readable, f"cannot write the checkpoint folder {state_dir}: {e}"
    return host, readable, None


def _choose_nodes(
    workers: int, capacity: dict[str, int], survey: dict[str, _NodeSurvey]
) -> list[str]:
    """A node for each worker: spread over nodes, within each node's room."""
    unusable = {node: s for node, s in survey.items() if s.problem and capacity.get(node)}
    if unusable:
        lines = "; ".join(
            f"node {s.host} ({node[:12]}): {s.problem}" for node, s in unusable.items()
        )
        raise ConfigError(
            "dataset",
            "a path these nodes cannot use",
            "a dataset path and experiment path that every node can read (shared storage or "
            "an fsspec URL)",
            hint=lines,
        )
    room = {node: n for node, n in sorted(capacity.items()) if n > 0 and node in survey}
    chosen: list[str] = []
    while len(chosen) < workers and room:
        for node in list(room):  # one worker per node per round: spread
            if len(chosen) == workers:
                break
            chosen.append(node)
            room[node] -= 1
            if room[node] == 0:
                del room[node]
    if len(chosen) < workers:
        raise WorkerError(f"the cluster has room for {len(chosen)} workers, not {workers}")
    return chosen


def _place_by_locality(
    placement: dict[int, frozenset[int]],
    nodes_for: list[str],
    survey: dict[str, _NodeSurvey],
    num_shards: int,
) -> dict[int, frozenset[int]]:
    """The driver's placement when every worker's node reads its shards; otherwise each shard
    goes to the least loaded worker on a node that holds it."""
    if all(placement[w] <= survey[node].shards for w, node in enumerate(nodes_for)):
        return placement
    assigned: dict[int, set[int]] = {w: set() for w in range(len(nodes_for))}
    for shard in range(num_shards):
        holders = [w for w, node in enumerate(nodes_for) if shard in survey[node].shards]
        if not holders:
            have = {s.host: sorted(s.shards) for s in survey.values()}
            raise ConfigError(
                "dataset",
                f"shard {shard}",
                "every shard readable on a node that has room for a worker",
                hint=f"shards readable per node: {have}",
            )
        assigned[min(holders, key=lambda w: (len(assigned[w]), w))].add(shard)
    return {w: frozenset(s) for w, s in assigned.items()}


def _check_reachable(address: str) -> None:
    """Fail fast, naming the address, when nothing listens there (Ray itself retries for long)."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError("address", address, '"host:port", "ray://host:port", "auto" or None')
    try:
        with socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise ConfigError(
            "address",
            address,
            "the address of a running Ray cluster's head node",
            hint=f"cannot connect to {host}:{port}: {e}",
        ) from e


def _same_address(given: str, current: str) -> bool:
    """Whether ``host:port`` addresses name the same server (loopback matches this machine)."""

    def resolve(address: str) -> tuple[str, str]:
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            return socket.gethostbyname(host), port
        except OSError:
            return host, port

    (host_a, port_a), (host_b, port_b) = resolve(given), resolve(current)
    return port_a == port_b and (
        host_a == host_b or host_a.startswith("127.") or host_b.startswith("127.")
    )


# States in the object store ----------------------------------------------------------------------


def to_object_store(state: Any) -> Any:
    """A state with its tensors as numpy arrays, which Ray stores without pickling and reads
    without copying. Tensors numpy cannot represent (bfloat16) stay tensors."""
    if isinstance(state, torch.Tensor):
        try:
            return _Array(state.detach().cpu().numpy())
        except TypeError:
            return state
    if isinstance(state, dict):
        return {k: to_object_store(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(to_object_store(v) for v in state)
    return state


def from_object_store(state: Any, copy: bool = True) -> Any:
    """The state back with tensors: copies by default (object-store memory is read-only and
    shared), else read-only views of the store's memory, for a reader that copies what it keeps
    (:func:`~cerebro.training.restore_state`, a write to a file). Writing to a view is undefined
    behaviour: it would change the state for every reader of the object."""
    if isinstance(state, _Array):
        return torch.from_numpy(np.array(state.array, copy=True) if copy else state.array)
    if isinstance(state, dict):
        return {k: from_object_store(v, copy) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(from_object_store(v, copy) for v in state)
    return state


@dataclass(frozen=True)
class _Array:
    """Marks an array that was a tensor (a state may hold plain numpy values too)."""

    array: np.ndarray
