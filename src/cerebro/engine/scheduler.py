"""The MOP scheduler: pure logic that matches idle models to idle workers.

It takes a snapshot of models and workers and returns assignments. It holds no processes, files
or clocks, so every backend reuses it and the tests can check it exhaustively.

A model lists the shards it may visit next (``eligible``): in free mode every shard it has not
visited in the current epoch (or validation pass), in deterministic mode only the next one in its
fixed order. A worker may train a model on a shard only if the worker holds that shard, which is
what keeps data in place (MOP invariant 5).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSlot:
    """What the scheduler needs to know about one model.

    ``remaining_work`` counts the units the model still has to run in the whole experiment; models
    with more work left go first (longest-remaining-first keeps the makespan short).
    ``last_worker`` lets ties prefer the worker that already holds the model's state in memory.
    """

    model_id: int
    eligible: frozenset[int]
    busy: bool = False
    remaining_work: int = 0
    last_worker: int | None = None


@dataclass(frozen=True)
class WorkerSlot:
    """A worker, the shards it holds and whether it is running a unit."""

    worker_id: int
    shards: frozenset[int]
    busy: bool = False


@dataclass(frozen=True)
class Assignment:
    """Train (or evaluate) ``model_id`` on ``shard`` at ``worker_id``."""

    model_id: int
    worker_id: int
    shard: int


def place_shards(num_shards: int, num_workers: int) -> dict[int, frozenset[int]]:
    """Spread shards over workers round-robin: each shard on exactly one worker.

    >>> place_shards(5, 2)
    {0: frozenset({0, 2, 4}), 1: frozenset({1, 3})}
    """
    if num_shards < 1 or num_workers < 1:
        raise ValueError(
            f"need num_shards >= 1 and num_workers >= 1, got {num_shards}, {num_workers}"
        )
    return {w: frozenset(range(w, num_shards, num_workers)) for w in range(num_workers)}


def schedule(models: Sequence[ModelSlot], workers: Sequence[WorkerSlot]) -> list[Assignment]:
    """Assign idle models to idle workers holding a shard they may visit next.

    The result is work-conserving: afterwards no idle worker holds a shard that some still idle
    model may visit. Each model and each worker appears in at most one assignment. The output
    depends only on the input (ties are broken by ids).
    """
    idle_models = [m for m in models if not m.busy and m.eligible]
    idle_workers = [w for w in workers if not w.busy and w.shards]
    if not idle_models or not idle_workers:
        return []

    candidates = {
        w.worker_id: [m for m in idle_models if m.eligible & w.shards] for w in idle_workers
    }
    taken: set[int] = set()
    assignments: list[Assignment] = []
    # The most constrained workers (fewest candidate models) choose first, so that a model
    # several workers could take does not go to the one worker another model needed.
    for worker in sorted(idle_workers, key=lambda w: (len(candidates[w.worker_id]), w.worker_id)):
        options = [m for m in candidates[worker.worker_id] if m.model_id not in taken]
        if not options:
            continue
        chosen = min(options, key=lambda m: _preference(m, worker.worker_id))
        taken.add(chosen.model_id)
        shard = min(chosen.eligible & worker.shards)
        assignments.append(Assignment(chosen.model_id, worker.worker_id, shard))
    return assignments


def _preference(model: ModelSlot, worker_id: int) -> tuple:
    return (-model.remaining_work, model.last_worker != worker_id, model.model_id)


def is_work_conserving(
    models: Iterable[ModelSlot], workers: Iterable[WorkerSlot], assignments: Iterable[Assignment]
) -> bool:
    """True if no idle worker is left holding a shard that a still idle model may visit."""
    assignments = list(assignments)
    used_models = {a.model_id for a in assignments}
    used_workers = {a.worker_id for a in assignments}
    for w in workers:
        if w.busy or w.worker_id in used_workers:
            continue
        for m in models:
            if not m.busy and m.model_id not in used_models and m.eligible & w.shards:
                return False
    return True
