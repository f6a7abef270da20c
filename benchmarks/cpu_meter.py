"""CPU time of a run's driver and of its workers, read from ``/proc`` while the run goes on.

A busy fraction below 1 may be the workers waiting for the driver, or the machine having no core
left for them: on a machine with as many cores as workers, the driver's own work (records,
scheduling, the durable copies of states) takes CPU time the workers would otherwise have had.
:class:`CpuMeter` tells the two apart: it samples the CPU time of this process (the driver, all
its threads, less the sampler's own) and of its descendants (the worker processes) every
``every`` seconds, and :meth:`CpuMeter.used` gives what each used within a span of the run.

Linux only (``/proc``); elsewhere :attr:`CpuMeter.available` is False and nothing is sampled.

Example (a child process that spins for 0.6 s while this one sleeps):
    >>> import subprocess, sys, time
    >>> spin = ("import time; t = time.time(); "
    ...         "[0 for _ in iter(lambda: time.time() < t + 0.6, False)]")
    >>> child = subprocess.Popen([sys.executable, "-c", spin])
    >>> with CpuMeter(every=0.01) as meter:
    ...     start = time.time()
    ...     time.sleep(0.4)
    ...     end = time.time()
    >>> child.wait()
    0
    >>> driver, workers = meter.used(start, end)
    >>> not meter.available or (driver < 0.1 and workers > 0.15)
    True
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from dataclasses import dataclass
from types import TracebackType

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
_LOOK_EVERY = 10  # samples between two looks for new descendants


@dataclass(frozen=True)
class _Sample:
    at: float  # time.time()
    driver_s: float  # this process's CPU time, less the sampler thread's
    workers_s: dict[int, float]  # descendant pid -> CPU time


class CpuMeter:
    """Samples CPU time while it is entered (see the module's docstring). A sample reads
    ``/proc/<pid>/stat`` of the driver and of each worker known (~20 us each); every
    ``_LOOK_EVERY`` samples it looks at every process for new workers."""

    def __init__(self, every: float = 0.02) -> None:
        self.every = every
        self.available = os.path.exists(f"/proc/{os.getpid()}/stat")
        self._samples: list[_Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="cpu-meter", daemon=True)

    def __enter__(self) -> CpuMeter:
        if self.available:
            self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def used(self, start: float, end: float) -> tuple[float, float]:
        """CPU seconds the driver and the workers (together) used from ``start`` to ``end``
        (``time.time()``), between the samples nearest inside them; (nan, nan) where fewer
        than two samples fall inside. A worker is found within ``_LOOK_EVERY`` samples of its
        start: one started less than that before ``start`` counts from 0."""
        times = [s.at for s in self._samples]
        first, last = bisect.bisect_left(times, start), bisect.bisect_right(times, end) - 1
        if last <= first:
            return float("nan"), float("nan")
        a, b = self._samples[first], self._samples[last]
        # Each worker up to its last sample in the span (it may have exited before the
        # span's end), from its first sample's value (0 for one started in the span).
        last_seen: dict[int, float] = {}
        for sample in self._samples[first : last + 1]:
            last_seen.update(sample.workers_s)
        workers = sum(cpu - a.workers_s.get(pid, 0.0) for pid, cpu in last_seen.items())
        return b.driver_s - a.driver_s, workers

    def _sample(self) -> None:
        me, pids, count = os.getpid(), [], 0
        while True:
            own = time.thread_time()
            at = time.time()
            if count % _LOOK_EVERY == 0:  # new workers: a look at every process (~2 ms)
                pids = _descendants(_parents(), me)
            count += 1
            driver = _cpu_of(me)
            workers = {pid: cpu for pid in pids if (cpu := _cpu_of(pid)) is not None}
            self._samples.append(_Sample(at, (driver or 0.0) - own, workers))
            if self._stop.wait(self.every):
                return


def _stat(pid: int) -> tuple[int, float] | None:
    """A process's parent pid and CPU seconds (user and system); None once it exited."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            line = f.read()
    except OSError:
        return None
    fields = line[line.rindex(")") + 2 :].split()  # the name may hold spaces
    return int(fields[1]), (int(fields[11]) + int(fields[12])) * _TICK_S


def _cpu_of(pid: int) -> float | None:
    stat = _stat(pid)
    return None if stat is None else stat[1]


def _parents() -> dict[int, int]:
    """Every process: pid -> parent pid."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _stat(int(name))) is not None:
            table[int(name)] = stat[0]
    return table


def _descendants(parents: dict[int, int], root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found
