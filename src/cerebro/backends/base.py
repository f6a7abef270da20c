"""What every backend does: start workers that hold shards, run units, report events.

A backend knows nothing about search or epochs. The driver sends :class:`Unit` objects naming
models, a shard and the paths of the models' state files; the backend reports :class:`UnitDone`
when the worker has finished computing (the worker is free again) and, for a training unit, the
members' new states are handed over: any worker can start from them (the model may hop on). It
reports :class:`StateSaved` later, when a model's state is also written durably to its state file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, check_int
from ..kinds import UnitKind
from ..state import HopRecord
from ..techniques import Technique
from ..techniques.features import FeaturePlan, Materialization


@dataclass(frozen=True)
class Written:
    """Where a worker wrote a model's new state and how long it took (seconds)."""

    path: str
    seconds: float


@dataclass(frozen=True)
class UnitMember:
    """One model of a unit: the state it starts from and its seeds for each of the unit's
    shards.

    ``state_path`` is the model's durable state file; ``source``, set by a backend that handed
    the state at ``version`` over in memory, is where the worker reads it instead (None: from
    the state file); ``target``, set by such a backend for a training unit, is the slot file
    the worker writes the new state to (see :mod:`.slots`). ``shuffle_seeds`` order each
    shard's rows for this model (one per shard of the unit, in its order); ``rng_seeds``
    (deterministic mode) seed torch before each of its hops instead of the RNG state it carries.
    """

    model_id: int
    params: dict[str, Any]
    state_path: str
    version: int
    shuffle_seeds: tuple[int, ...] = (0,)
    rng_seeds: tuple[int, ...] | None = None
    source: str | None = None
    target: str | None = None


@dataclass(frozen=True)
class Unit:
    """A group of one or more models on one or more shards of one worker, in order: a
    training hop of each model on each shard (``kind=TRAIN``) or an evaluation pass over them.
    The worker runs it with the runner of ``technique`` (see :mod:`cerebro.techniques`).

    A unit of several shards is several hops that would have run back to back on one worker
    anyway: its models stay in the worker between them (no hand-over, no round trip to the
    driver), and each hop is recorded as its own (:meth:`UnitDone.hops`).

    Example:
        >>> member = UnitMember(0, {"lr": 0.1}, "state.pt", version=4, shuffle_seeds=(11, 12))
        >>> unit = Unit(1, UnitKind.TRAIN, epoch=0, shards=(2, 0), worker_id=0, members=(member,))
        >>> unit.shards, unit.hops
        ((2, 0), 2)
    """

    unit_id: int
    kind: UnitKind
    epoch: int
    shards: tuple[int, ...]
    worker_id: int
    members: tuple[UnitMember, ...]
    end_of_epoch: bool = False  # its last hop ends its models' training epoch
    technique: Technique = Technique.PLAIN
    features: FeaturePlan | None = None  # a materialized unit's: what its members read

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError(f"unit {self.unit_id} holds no model: a unit holds one or more")
        ids = [m.model_id for m in self.members]
        if len(set(ids)) != len(ids):
            raise ValueError(f"unit {self.unit_id} holds a model more than once: {sorted(ids)}")
        shards = tuple(self.shards)
        if not shards or len(set(shards)) != len(shards):
            raise ValueError(
                f"unit {self.unit_id} has shards {list(shards)}: it needs one or more, each once"
            )
        for m in self.members:
            seeds = [m.shuffle_seeds, *([m.rng_seeds] if m.rng_seeds is not None else [])]
            if any(len(s) != len(shards) for s in seeds):
                raise ValueError(
                    f"unit {self.unit_id}: model {m.model_id} has {len(m.shuffle_seeds)} "
                    f"shuffle seeds for {len(shards)} shards (one per shard)"
                )
        object.__setattr__(self, "shards", shards)
        object.__setattr__(self, "kind", UnitKind(self.kind))  # frozen: normalized once here
        object.__setattr__(self, "technique", Technique(self.technique))

    @property
    def model_ids(self) -> tuple[int, ...]:
        return tuple(m.model_id for m in self.members)

    @property
    def hops(self) -> int:
        """How many hops (or evaluation passes) of each model it runs: one per shard."""
        return len(self.shards)


@dataclass(frozen=True)
class MemberResult:
    """What a unit measured for one of its models: row-weighted metric sums over ``rows``, or
    (``error`` set) why this model alone failed in it; the unit's other models go on."""

    model_id: int
    rows: int
    sums: dict[str, float]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ShardPass:
    """A unit's run over one of its shards: when it computed (seconds, wall clock) and what
    each member measured there (a member that failed on an earlier shard has no result)."""

    shard: int
    start: float
    end: float
    results: tuple[MemberResult, ...]


@dataclass(frozen=True)
class UnitDone:
    """A worker finished computing a unit (the worker is free again). ``passes`` hold each of
    its shards' timing and results, in order; ``load_s`` is the time spent before the first
    bringing the models' states in. ``ok=False``: the unit failed (``error`` says why) and no
    state changed; with ``ok=True`` a member may still have failed alone (:meth:`failure`).

    For a training unit, each successful member's new state (after all its shards) is handed
    over when this arrives; ``written`` says where the worker wrote each, by model id (a
    backend's own bookkeeping: empty where states move otherwise)."""

    unit_id: int
    worker_id: int
    ok: bool
    passes: tuple[ShardPass, ...] = ()
    load_s: float = 0.0
    error: str | None = None
    materialized: tuple[Materialization, ...] = ()  # kept features the unit computed
    written: dict[int, Written] = field(default_factory=dict)
    # ok=False because these members' states could not be fetched: lost with another worker
    # before they were written durably (they go back to their state files).
    states_lost: tuple[int, ...] = ()
    # Members whose new states could not be handed over (a handover file that could not be
    # written, say), by model id: why, as a traceback. No fault of theirs: their states at the
    # unit's start are intact, and they run the unit again (the others go on).
    not_handed_over: dict[int, str] = field(default_factory=dict)

    @property
    def start(self) -> float:
        return self.passes[0].start if self.passes else 0.0

    @property
    def end(self) -> float:
        return self.passes[-1].end if self.passes else 0.0

    def failure(self, model_id: int) -> str | None:
        """Why ``model_id`` alone failed in this unit (None: it did not). A member that fails
        on one shard runs no later one, and none of its new state is kept."""
        for shard_pass in self.passes:
            result = next((r for r in shard_pass.results if r.model_id == model_id), None)
            if result is None or not result.ok:
                return "it did not run" if result is None else result.error
        return None

    def hops(self, unit: Unit, model_id: int) -> list[HopRecord]:
        """The records of ``model_id``'s hops in ``unit``, one per shard, as the records and
        its state keep them (the first counts the unit's ``load_s``)."""
        records = []
        for i, shard_pass in enumerate(self.passes):
            result = next(r for r in shard_pass.results if r.model_id == model_id)
            records.append(
                HopRecord(
                    shard=shard_pass.shard,
                    rows=result.rows,
                    sums=dict(result.sums),
                    worker=self.worker_id,
                    start=shard_pass.start,
                    end=shard_pass.end,
                    load_s=self.load_s if i == 0 else 0.0,
                    unit=unit.unit_id,
                )
            )
        return records


@dataclass(frozen=True)
class StateSaved:
    """A model's state at ``version`` is written durably to its state file (``ok``), or could
    not be (``error`` says why; the state is still handed over in memory). A backend may skip
    a version whose write had not started when a newer one of the same model came: then only
    the newer one is reported."""

    model_id: int
    version: int
    ok: bool
    save_s: float = 0.0
    error: str | None = None
    path: str = ""  # the state file written (or not)


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

    # Models whose newest state only that worker held (not yet in their state files): they go
    # back to their state files and train the hops since again.
    states_lost: tuple[int, ...] = ()

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

    @property
    def queue_depth(self) -> int:
        """How many units a worker may hold at once (running and waiting). A backend whose
        workers run their units in the order sent may take more than one, so that a worker
        starts its next unit the moment it finishes one, without a round trip to the driver."""
        return 1

    @property
    def states_outlive_workers(self) -> bool:
        """Whether a state handed over survives the loss of the worker that made it (it is
        held outside the workers' processes). Then a model may evaluate its epoch's last state
        before that state's file is written; else it waits for the file first, so that an
        evaluation whose state is lost can read it again."""
        return False

    def release(self, model_id: int) -> None:  # noqa: B027 - optional hook
        """The driver will not run ``model_id`` again in this run (it completed, failed or
        stopped): once its state is durable, what holds it in memory may be freed."""

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
        """Send a unit to ``unit.worker_id`` (which holds fewer than :attr:`queue_depth`)."""

    @abstractmethod
    def poll(self, timeout: float) -> list[Event]:
        """Events since the last call, waiting up to ``timeout`` seconds for the first one."""

    @abstractmethod
    def shutdown(self, graceful: bool = True) -> None:
        """Stop every worker; graceful waits for units and state writes in progress, otherwise
        workers are stopped at once (states on disk stay at their last completed hop)."""


def check_worker_options(
    threads_per_worker: Any, model_cache_mb: Any, cache_default: str | None = None
) -> None:
    """The options every backend's workers take: refuse bad values before anything starts.
    ``cache_default``: what ``model_cache_mb=None`` means, where the backend allows it."""
    check_int("threads_per_worker", threads_per_worker, minimum=1, allow_none=True)
    check_int(
        "model_cache_mb", model_cache_mb, minimum=0, unit="MiB",
        allow_none=cache_default is not None, hint=cache_default or "",
    )  # fmt: skip


def check_workers_fit_shards(workers: int, num_shards: int) -> None:
    """Every worker must hold a shard: one without any could never train."""
    if workers > num_shards:
        raise ConfigError(
            "workers",
            workers,
            f"at most the dataset's num_shards ({num_shards})",
            hint="a worker without a shard could never train; prepare more shards",
        )
