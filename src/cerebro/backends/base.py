"""What every backend does: start workers that hold shards, run units, report events.

A backend knows nothing about search or epochs. The driver sends :class:`Unit` objects naming a
model, a shard and the path of the model's state; the backend reports :class:`UnitDone` when the
worker has finished computing (the worker is free again) and, for training units,
:class:`StateSaved` when the model's new state is written (the model may hop on).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class Unit:
    """One model on one shard: a training hop (``kind="train"``) or an evaluation pass."""

    unit_id: int
    model_id: int
    kind: str
    epoch: int
    shard: int
    worker_id: int
    params: dict[str, Any]
    state_path: str
    version: int
    shuffle_seed: int = 0
    end_of_epoch: bool = False
    rng_seed: int | None = None  # deterministic mode: seed torch with it instead of the carried RNG


@dataclass(frozen=True)
class UnitDone:
    """A worker finished computing a unit. ``start``/``end`` bound the computation (seconds,
    wall clock); ``load_s`` is the time spent before it bringing the model's state in."""

    unit_id: int
    worker_id: int
    ok: bool
    rows: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    start: float = 0.0
    end: float = 0.0
    load_s: float = 0.0
    error: str | None = None

    def hop(self, shard: int) -> dict[str, Any]:
        """The record of this hop, as the driver stores it and a model's state carries it."""
        return {
            "shard": shard,
            "rows": self.rows,
            "sums": dict(self.sums),
            "worker": self.worker_id,
            "start": self.start,
            "end": self.end,
            "load_s": self.load_s,
        }


@dataclass(frozen=True)
class StateSaved:
    """The state a training unit produced is written to ``Unit.state_path``."""

    unit_id: int
    worker_id: int
    ok: bool
    save_s: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class WorkerInfo:
    """A started worker: the shards it holds and how much data it loaded."""

    worker_id: int
    shards: frozenset[int]
    device: str
    rows_loaded: int
    bytes_loaded: int


@dataclass(frozen=True)
class WorkerLost:
    """A worker died (killed, out of memory); the backend has already started a replacement
    holding the same shards. Units it was running are lost and must be run again."""

    worker_id: int
    exitcode: int | None
    reason: str = "exited"  # or why the backend gave up on it (e.g. silent while running a unit)
    # It died before it was ready, so it ran no unit: units the driver has sent to this worker
    # id since are on its replacement (or will be) and are not lost.
    while_starting: bool = False

    @classmethod
    def before_ready(cls, worker_id: int, exitcode: int | None) -> WorkerLost:
        """A worker that died while it started (the backend starts it again)."""
        return cls(worker_id, exitcode, "exited while starting", while_starting=True)


Event = UnitDone | StateSaved | WorkerLost


class Backend(ABC):
    """Where units run: :class:`cerebro.LocalBackend`, :class:`cerebro.RayBackend`."""

    @property
    @abstractmethod
    def num_workers(self) -> int:
        """How many workers this backend starts."""

    def validate(self, num_shards: int) -> None:  # noqa: B027 - optional hook
        """Raise ConfigError before any work starts if this backend cannot run the dataset."""

    def prestart(self) -> None:  # noqa: B027 - optional hook
        """Begin slow set-up that needs no arguments (loading torch in a template process, say)
        while the driver prepares; :meth:`start` then finishes it. Starts no worker."""

    @abstractmethod
    def start(
        self,
        dataset_path: str,
        placement: dict[int, frozenset[int]],
        build: Callable[..., Any],
        deterministic: bool = False,
        state_dir: str | None = None,
    ) -> list[WorkerInfo]:
        """Start the workers; worker ``w`` loads the shards ``placement[w]`` and keeps them
        (a backend that knows where data lives may place shards otherwise: the returned
        :class:`WorkerInfo` list is what holds).

        ``deterministic``: workers must compute bit-identical results whatever their number
        (fixed thread counts, deterministic algorithms). ``state_dir``: where model states
        are written (a backend whose workers run elsewhere checks they can write there)."""

    @abstractmethod
    def submit(self, unit: Unit) -> None:
        """Send a unit to ``unit.worker_id`` (which must be idle)."""

    @abstractmethod
    def poll(self, timeout: float) -> list[Event]:
        """Events since the last call, waiting up to ``timeout`` seconds for the first one."""

    @abstractmethod
    def shutdown(self, graceful: bool = True) -> None:
        """Stop every worker; graceful waits for units and state writes in progress, otherwise
        workers are stopped at once (states on disk stay at their last completed hop)."""


def check_worker_options(threads_per_worker: Any, model_cache_mb: Any) -> None:
    """The options every backend's workers take: refuse bad values before anything starts."""
    if threads_per_worker is not None and (
        not isinstance(threads_per_worker, int) or threads_per_worker < 1
    ):
        raise ConfigError("threads_per_worker", threads_per_worker, "an integer >= 1 or None")
    if not isinstance(model_cache_mb, int) or model_cache_mb < 0:
        raise ConfigError("model_cache_mb", model_cache_mb, "an integer >= 0 (MiB)")


def check_workers_fit_shards(workers: int, num_shards: int) -> None:
    """Every worker must hold a shard: one without any could never train."""
    if workers > num_shards:
        raise ConfigError(
            "workers",
            workers,
            f"at most the dataset's num_shards ({num_shards})",
            hint="a worker without a shard could never train; prepare more shards",
        )
