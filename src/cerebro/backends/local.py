"""``LocalBackend``: MOP on one machine with worker processes.

Each worker is a separate process that loads its shards once and keeps them for the whole run.
Workers are forked from cerebro's template process (:mod:`.process_template`), never started by
importing the user's main module, so plain scripts, ``python -``/``-c``, IPython and notebooks
all work. Data never moves; model states move between workers through slot files in shared
memory that they train in place, and a thread of the driver's process copies each to the
model's durable state file behind them (see :mod:`.handover` and :mod:`.slots`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import multiprocessing.connection as mp_connection
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, WorkerError, check_int
from ..kinds import UnitKind
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
from .handover import DurableWriter, HandoverFolder, write_states
from .process_template import ProcessTemplate, WorkerProcess, join_all
from .shipping import pickle_build
from .watchdog import HEARTBEAT_S, Watchdog, check_worker_timeout
from .worker import WorkerConfig, WorkerRuntime

_START_TIMEOUT_S = 600.0
# A worker that dies while it starts (killed, out of memory) is started again this many times.
_START_ATTEMPTS = 3


class LocalBackend(Backend):
    """Run MOP workers as processes on this machine.

    Args:
        workers: number of worker processes (>= 1, at most the dataset's ``num_shards``).
        devices: torch devices to pin workers to, round-robin (e.g. ``["cuda:0", "cuda:1"]``).
            Default: CPU.
        threads_per_worker: torch threads in each worker. Default: the machine's cores divided
            evenly between workers (at least 1); 1 in deterministic experiments, so that results
            do not depend on the number of workers.
        model_cache_mb: memory each worker may use to keep models built between their hops (MiB;
            weights plus optimizer state), so that a model coming back to the worker that trained
            it last needs no state read. Least recently used models are dropped first.
        worker_timeout: seconds a worker running a unit may go without a heartbeat (workers
            send one every second) before it is declared lost, killed and replaced, and its unit
            run again. Default: the longer of 30 s and 3x the longest unit so far.
        handover_mb: shared memory (``/dev/shm``; MiB) that states handed from worker to worker
            may take at once. A state that does not fit goes through its file on disk instead
            (a slower hop). Default: half of ``/dev/shm``. 0: every state goes through its file.

    Example:
        >>> backend = cerebro.LocalBackend(workers=2)                    # doctest: +SKIP
        >>> backend = cerebro.LocalBackend(workers=2, devices=["cuda:0"])  # doctest: +SKIP
    """

    def __init__(
        self,
        workers: int = 2,
        devices: Sequence[str] | None = None,
        threads_per_worker: int | None = None,
        model_cache_mb: int = 1024,
        worker_timeout: float | None = None,
        handover_mb: int | None = None,
    ) -> None:
        check_int("workers", workers, minimum=1)
        check_int("handover_mb", handover_mb, minimum=0, unit="MiB", allow_none=True)
        self.handover_mb = handover_mb
        self.devices = _check_devices(devices)
        check_worker_options(threads_per_worker, model_cache_mb)
        self.workers = workers
        self.threads_per_worker = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
        self._fixed_threads = threads_per_worker or 1
        self.model_cache_mb = model_cache_mb
        self.worker_timeout = check_worker_timeout(worker_timeout)
        self._processes: dict[int, WorkerProcess] = {}
        self._pending: list[Event] = []
        self._watchdog = Watchdog(self.worker_timeout)
        # Units sent to each worker and not done yet, in order sent: it runs the first.
        self._running: dict[int, collections.deque[Unit]] = {}
        self._handover: HandoverFolder | None = None
        self._writer: DurableWriter | None = None
        self._saved: list[StateSaved] = []  # reported by the writer's thread
        self._saved_lock = threading.Lock()
        self._wake_r, self._wake_w = -1, -1  # the writer wakes poll() through this pipe

    @property
    def num_workers(self) -> int:
        return self.workers

    def validate(self, num_shards: int) -> None:
        check_workers_fit_shards(self.workers, num_shards)

    def prestart(self) -> None:
        """Start loading torch in the template process while the driver prepares."""
        ProcessTemplate.shared()

    def start(
        self,
        dataset_path: str,
        placement: dict[int, frozenset[int]],
        build: Callable[..., Any],
        deterministic: bool = False,
        state_dir: str | None = None,  # on this machine: the experiment already checked it
    ) -> list[WorkerInfo]:
        payload = pickle_build(build)
        self._open_handover()
        self._configs = [
            WorkerConfig(
                worker_id=worker_id,
                dataset_path=dataset_path,
                shards=placement[worker_id],
                device=self.devices[worker_id % len(self.devices)],
                build=payload,
                # Results depend on intra-op thread counts: deterministic runs use a fixed one.
                threads=self.threads_per_worker if not deterministic else self._fixed_threads,
                model_cache_mb=self.model_cache_mb,
                deterministic=deterministic,
                handover_dir=self._handover.path if self._handover else None,
                handover_budget=self._handover.budget if self._handover else 0,
            )
            for worker_id in range(self.workers)
        ]
        self._processes = {}
        try:
            for worker_id in range(self.workers):
                self._launch(worker_id)
            infos, self._pending = self._await_ready(set(range(self.workers)))
        except BaseException:
            self.shutdown(graceful=False)
            raise
        return [infos[w] for w in sorted(infos)]

    def _open_handover(self) -> None:
        self._close_handover(drain_s=0)  # a backend started again: a fresh folder
        if self.handover_mb != 0:
            self._handover = HandoverFolder(self.handover_mb)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._writer = DurableWriter(self._durable, self._handover)

    def _durable(self, saved: StateSaved) -> None:
        """From the writer's thread: a durable copy is written (or failed)."""
        with self._saved_lock:
            self._saved.append(saved)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _close_handover(self, drain_s: float) -> None:
        if self._writer is not None:
            self._writer.drain(drain_s)
            self._writer.close()
            self._writer = None
        if self._handover is not None:
            self._handover.close()
            self._handover = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1

    def _launch(self, worker_id: int) -> None:
        # One duplex pipe per worker, for units one way and events the other: a worker that
        # dies mid-message breaks only its own pipe (a queue shared by all workers has a lock
        # that a killed writer never releases).
        process = ProcessTemplate.shared().fork()
        with contextlib.suppress(OSError):  # a worker already dead: the next poll says so
            process.conn.send(_Boot.of_this_process(self._configs[worker_id]))
        self._processes[worker_id] = process

    def _receive(self, timeout: float, ignore: set[int]) -> tuple[list[tuple[int, Any]], set[int]]:
        """Messages from the workers (waiting up to ``timeout`` for the first one), and the ids
        of workers found dead. Workers in ``ignore`` are not waited on."""
        watched = [w for w in range(self.workers) if w not in ignore]
        handles: list[Any] = [self._processes[w].conn for w in watched]
        handles += [p.sentinel for w in watched if (p := self._processes[w]).sentinel is not None]
        if self._wake_r >= 0:
            handles.append(self._wake_r)
        mp_connection.wait(handles, timeout)
        messages: list[tuple[int, Any]] = []
        dead: set[int] = set()
        now = time.monotonic()
        for worker_id in watched:
            process = self._processes[worker_id]
            try:
                while process.conn.poll():
                    message = process.conn.recv()
                    self._watchdog.heard(worker_id, now)
                    if isinstance(message, UnitDone):
                        self._watchdog.unit_took(message.end - message.start)
                        self._handed_over(worker_id, message)
                    if not isinstance(message, _Heartbeat):
                        messages.append((worker_id, message))
            except (EOFError, OSError):
                dead.add(worker_id)
            if not process.is_alive():
                dead.add(worker_id)
        return messages, dead

    def _await_ready(self, waiting: set[int]) -> tuple[dict[int, WorkerInfo], list[Event]]:
        """Wait for the workers in ``waiting`` to load their shards; other events are kept.

        A worker that dies while it starts is replaced (and reported lost, so the loss is
        recorded) up to ``_START_ATTEMPTS`` times; one that fails to start raises at once.
        """
        infos: dict[int, WorkerInfo] = {}
        others: list[Event] = []
        ignore: set[int] = set()  # other workers found dead meanwhile: the next poll reports them
        attempts = dict.fromkeys(waiting, 1)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while len(infos) < len(waiting):
            messages, dead = self._receive(0.5, ignore)
            for worker_id, message in messages:
                if isinstance(message, _StartFailed):
                    raise WorkerError(f"worker {worker_id} could not start:\n{message.error}")
                if isinstance(message, WorkerInfo) and worker_id in waiting:
                    infos[worker_id] = message
                else:
                    others.append(message)
            for worker_id in sorted((dead & waiting) - set(infos)):
                process = self._processes[worker_id]
                process.join(timeout=5)
                if attempts[worker_id] >= _START_ATTEMPTS:
                    raise WorkerError(
                        f"worker {worker_id} (pid {process.pid}) exited with code "
                        f"{process.exitcode} while starting, {attempts[worker_id]} times "
                        "(see the output above; out of memory is a common cause)"
                    )
                attempts[worker_id] += 1
                others.append(WorkerLost.before_ready(worker_id, process.exitcode))
                process.close()
                self._launch(worker_id)
            ignore |= dead - waiting
            if time.monotonic() > deadline:
                raise WorkerError("workers did not start in time")
        return infos, others

    def _handed_over(self, worker_id: int, done: UnitDone) -> None:
        """The worker's first unit is done and its new states are in their handover files:
        have them copied to the state files (one written straight to its state file is durable
        already)."""
        running = self._running.get(worker_id)
        unit = running.popleft() if running else None
        if unit is None or self._writer is None:
            return
        for member in unit.members:
            written = done.written.get(member.model_id)
            if written is not None and written.path == member.target:
                self._writer.handed_over(
                    member.model_id,
                    member.version + unit.hops,
                    written.path,
                    member.state_path,
                    first=unit.end_of_epoch,  # its model waits for this copy at the epoch's end
                )
                continue
            if member.target is not None:  # it failed, or its state went to its state file
                self._writer.unlease(member.model_id, member.target)
            if written is not None:
                self._writer.wrote_directly(member.model_id, written.path)
                version = member.version + unit.hops
                saved = StateSaved(
                    member.model_id, version, True, written.seconds, path=written.path
                )
                with self._saved_lock:
                    self._saved.append(saved)

    def _forget_outputs(self, unit: Unit) -> None:
        """A unit lost with its worker: what it may have half-written in its targets is no
        state of anyone's."""
        if self._writer is not None:
            for member in unit.members:
                if member.target is not None:
                    self._writer.unlease(member.model_id, member.target)

    def _take_saved(self) -> list[Event]:
        if self._wake_r >= 0:
            with contextlib.suppress(OSError):
                while os.read(self._wake_r, 4096):
                    pass
        with self._saved_lock:
            saved: list[Event] = list(self._saved)
            self._saved.clear()
        return saved

    def submit(self, unit: Unit) -> None:
        if self._writer is not None:  # members whose state is handed over start from there
            writer = self._writer
            folder = self._handover.path if self._handover is not None else None
            training = unit.kind is UnitKind.TRAIN
            members = tuple(
                dataclasses.replace(
                    m,
                    source=writer.file_of(m.model_id, m.version),
                    target=(
                        writer.target_for(m.model_id, folder, m.version)
                        if folder and training
                        else None
                    ),
                )
                for m in unit.members
            )
            unit = dataclasses.replace(unit, members=members)
        self._running.setdefault(unit.worker_id, collections.deque()).append(unit)
        self._watchdog.heard(unit.worker_id, time.monotonic())  # its silence counts from now
        # A worker that died since the last poll: the next poll reports it lost, with this unit.
        with contextlib.suppress(OSError):
            self._processes[unit.worker_id].conn.send(unit)

    def poll(self, timeout: float) -> list[Event]:
        events: list[Event] = self._pending
        self._pending = []
        messages, dead = self._receive(0 if events else timeout, ignore=set())
        events += [message for _, message in messages]  # what a dead worker sent comes first
        events += self._take_saved()
        busy = {w for w, units in self._running.items() if units}
        stuck = set(self._watchdog.silent(busy, time.monotonic())) - dead
        for worker_id in sorted(dead | stuck):
            process = self._processes[worker_id]
            process.kill()  # its pipe broke, or it is stuck: make sure it is gone first
            process.join(timeout=5)
            exitcode = process.exitcode
            process.close()
            for unit in self._running.pop(worker_id, ()):  # what it may have half-written
                self._forget_outputs(unit)
            self._launch(worker_id)
            _, others = self._await_ready({worker_id})
            reason = self._watchdog.stuck_reason if worker_id in stuck else "exited"
            events += [*others, WorkerLost(worker_id, exitcode, reason)]
        return events

    @property
    def queue_depth(self) -> int:
        return 3  # a worker's pipe keeps the order: one unit running, two waiting

    @property
    def states_outlive_workers(self) -> bool:
        return True  # in slot files of the driver's handover folder, or in their state files

    def release(self, model_id: int) -> None:
        if self._writer is not None:
            self._writer.release(model_id)

    def pids(self) -> list[int]:
        """Process ids of the current workers (those started so far, while starting)."""
        return [process.pid for _, process in sorted(self._processes.items())]

    def shutdown(self, graceful: bool = True) -> None:
        processes = list(self._processes.values())
        for process in processes:
            if graceful:  # the worker finishes its unit and state writes, then exits
                with contextlib.suppress(OSError, ValueError):
                    process.conn.send(None)
            else:
                process.kill()
        join_all(processes, timeout=30 if graceful else 5)
        for process in processes:
            process.kill()  # still running after the wait: stopped now
            process.close()
        self._processes = {}
        self._running = {}
        # Copies still waiting are memory to disk: finish them, so a resume has less to redo.
        self._close_handover(drain_s=300 if graceful else 30)

    def __repr__(self) -> str:
        return f"LocalBackend(workers={self.workers}, devices={self.devices})"


class _Heartbeat:
    """Sent every HEARTBEAT_S seconds by a live worker (only the backend sees it)."""


class _StartFailed:
    def __init__(self, worker_id: int, error: str) -> None:
        self.worker_id = worker_id
        self.error = error


@dataclass(frozen=True)
class _Boot:
    """What a forked worker takes over from its driver before it imports anything of the
    user's: the import path, working directory and environment (a notebook may have changed
    them since the template started), then its own configuration."""

    sys_path: list[str]
    cwd: str
    environ: dict[str, str]
    config: WorkerConfig

    @classmethod
    def of_this_process(cls, config: WorkerConfig) -> _Boot:
        return cls(list(sys.path), os.getcwd(), dict(os.environ), config)

    def adopt(self) -> None:
        sys.path[:] = self.sys_path
        os.chdir(self.cwd)
        os.environ.clear()
        os.environ.update(self.environ)


def worker_main(conn: mp_connection.Connection) -> None:
    """Entry point of a forked worker: take over the driver's context, load shards, then run
    units until told to stop."""
    # Ctrl-C reaches the whole process group; the driver alone decides how workers stop.
    # (The template already asked the kernel to end this process with it.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tune_malloc_for_training()
    try:
        boot = conn.recv()
    except (EOFError, OSError):
        return
    boot.adopt()
    config = boot.config
    sending = threading.Lock()  # the main thread and the heartbeat thread share the pipe

    def send(message: Any) -> None:
        with sending, contextlib.suppress(OSError):  # the driver is gone: this worker ends too
            conn.send(message)

    try:
        runtime = WorkerRuntime(config)
    except Exception:
        send(_StartFailed(config.worker_id, traceback.format_exc()))
        return
    send(runtime.info)
    threading.Thread(target=_beat, args=(send,), daemon=True, name="cerebro-heartbeat").start()
    while True:
        try:
            unit = conn.recv()
        except (EOFError, OSError):
            break
        if unit is None:
            break
        done, snapshots = runtime.run(unit)
        if snapshots:
            done = _hand_over(runtime, unit, done, snapshots, config)
        send(done)


def _hand_over(
    runtime: WorkerRuntime,
    unit: Unit,
    done: UnitDone,
    snapshots: dict[int, dict[str, Any]],
    config: WorkerConfig,
) -> UnitDone:
    """Write a training unit's new states where the next worker reads them, before the unit
    is reported done (so the model may hop on at once)."""
    states = write_states(unit, snapshots, runtime.slots)
    runtime.forget(tuple(states.failed))  # their objects are ahead of every state written
    return dataclasses.replace(done, written=states.written, not_handed_over=states.failed)


def _beat(send: Callable[[Any], None]) -> None:
    """Tell the driver this process is alive, whatever its unit is doing."""
    while True:
        send(_Heartbeat())
        time.sleep(HEARTBEAT_S)


def _check_devices(devices: Sequence[str] | None) -> list[str]:
    if devices is None:
        return ["cpu"]
    if isinstance(devices, str) or not isinstance(devices, Sequence) or not devices:
        raise ConfigError("devices", devices, 'a non-empty list such as ["cuda:0"], or None')
    checked = []
    for device in devices:
        try:
            parsed = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(
                "devices", device, 'torch device names such as "cpu" or "cuda:0"'
            ) from e
        if parsed.type == "cuda":
            count = torch.cuda.device_count()
            if not torch.cuda.is_available() or (parsed.index or 0) >= count:
                raise ConfigError(
                    "devices", device, f"a CUDA device of this machine ({count} found)"
                )
        checked.append(str(parsed))
    return checked
