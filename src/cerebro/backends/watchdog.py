"""Which busy workers have gone silent: alive but stuck (stopped, hung, swapped out).

A dead worker closes its pipe and is replaced at once; a stuck one would stall the run forever.
Workers heartbeat every :data:`HEARTBEAT_S` seconds, from a thread of their own, whatever their
unit does. A worker running a unit that has not been heard from for ``worker_timeout`` seconds is
declared lost, exactly like a dead one: killed, replaced, and its unit run again.

The default timeout is ``max(DEFAULT_FLOOR_S, 3 x the longest unit so far)``. The floor: 30
heartbeats missed in a row is far beyond a loaded machine's scheduling hiccups or a long garbage
collection (both well under a second here), and 30 s lost to a truly stuck worker is small
against a model selection's minutes or hours. The multiple of the longest unit covers a unit
whose code holds the GIL for long stretches, which can delay the heartbeat thread.

Example:
    >>> dog = Watchdog(worker_timeout=None)
    >>> dog.heard(0, now=100.0)
    >>> dog.silent({0}, now=120.0), dog.silent({0}, now=131.0)
    ([], [0])
"""

from __future__ import annotations

from ..errors import ConfigError, is_number

HEARTBEAT_S = 1.0
DEFAULT_FLOOR_S = 30.0
_UNIT_MULTIPLE = 3.0


def check_worker_timeout(worker_timeout: float | None) -> float | None:
    """Refuse a bad ``worker_timeout`` before anything starts."""
    if worker_timeout is None:
        return None
    if not is_number(worker_timeout) or not worker_timeout > 2 * HEARTBEAT_S:
        raise ConfigError(
            "worker_timeout",
            worker_timeout,
            f"None (the default: at least {DEFAULT_FLOOR_S:g} s) or seconds > {2 * HEARTBEAT_S:g}"
            " (workers heartbeat every second)",
        )
    return float(worker_timeout)


class Watchdog:
    """Last time each worker was heard from, and the longest unit seen."""

    def __init__(self, worker_timeout: float | None) -> None:
        self.worker_timeout = worker_timeout
        self._heard: dict[int, float] = {}
        self._longest_unit = 0.0

    @property
    def timeout(self) -> float:
        if self.worker_timeout is not None:
            return self.worker_timeout
        return max(DEFAULT_FLOOR_S, _UNIT_MULTIPLE * self._longest_unit)

    @property
    def stuck_reason(self) -> str:
        """Why a worker this watchdog found silent was given up on (as the records say it)."""
        return f"silent for over {self.timeout:g} s while running a unit (stuck)"

    def heard(self, worker_id: int, now: float) -> None:
        self._heard[worker_id] = now

    def unit_took(self, seconds: float) -> None:
        self._longest_unit = max(self._longest_unit, seconds)

    def silent(self, busy: set[int], now: float) -> list[int]:
        """Busy workers not heard from within the timeout (a worker never heard counts from
        the first time it is asked about)."""
        for worker_id in busy:
            self._heard.setdefault(worker_id, now)
        return sorted(w for w in busy if now - self._heard[w] > self.timeout)
