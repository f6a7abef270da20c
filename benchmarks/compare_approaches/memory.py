"""Peak memory of a process tree, read from ``/proc`` by a thread of the parent process (so that
the measured processes do no extra work).

Per process, ``VmHWM`` is the kernel's own high-water mark of resident memory: a sample taken
any time after the peak reads it exactly, so only a process that grows in its last sampling
interval before exiting is under-read. The tree's total is the largest sum of ``VmRSS`` over
the tree seen at one sample: what the machine had to hold at once (sampled, so a short spike
between two samples can be missed).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from .workload import read_status


@dataclass
class TreeMemory:
    """Peaks seen: ``VmHWM`` per pid (KiB) and the largest summed ``VmRSS`` of the tree."""

    hwm_kib: dict[int, int] = field(default_factory=dict)
    total_rss_kib: int = 0
    samples: int = 0


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (by parent pid), found by scanning ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces or parentheses: fields start after the last ")".
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


class TreeMonitor:
    """Samples the memory of ``root`` and its descendants every ``interval`` seconds."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        self.root = root
        self.interval = interval
        self.memory = TreeMemory()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> TreeMonitor:
        self._thread.start()
        return self

    def stop(self) -> TreeMemory:
        self._stop.set()
        self._thread.join()
        return self.memory

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        total = 0
        for pid in descendants(self.root):
            status = read_status(pid)
            if not status:
                continue
            total += status.get("VmRSS", 0)
            hwm = status.get("VmHWM", 0)
            if hwm > self.memory.hwm_kib.get(pid, 0):
                self.memory.hwm_kib[pid] = hwm
        self.memory.total_rss_kib = max(self.memory.total_rss_kib, total)
        self.memory.samples += 1
