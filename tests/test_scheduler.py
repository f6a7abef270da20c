"""Property tests of the pure MOP scheduler against the invariants in DESIGN.md.

A simulated run drives the scheduler the way the driver does, with hypothesis choosing which
unit finishes next, so every interleaving of completions is fair game.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from cerebro.engine.scheduler import (
    Assignment,
    ModelSlot,
    WorkerSlot,
    is_work_conserving,
    place_shards,
    schedule,
)


@dataclass
class SimModel:
    model_id: int
    epoch: int = 0
    remaining: set[int] = field(default_factory=set)
    order: list[int] = field(default_factory=list)  # deterministic mode: fixed visiting order
    busy: bool = False
    done: bool = False


def simulate(num_shards, num_workers, num_models, epochs, picks, deterministic=False):
    """Run to completion; returns the log of (step, model, epoch, shard, worker) and checks
    the per-step invariants on the way."""
    placement = place_shards(num_shards, num_workers)
    models = [SimModel(m, remaining=set(range(num_shards))) for m in range(num_models)]
    if deterministic:
        for m in models:
            m.order = [(m.model_id + i) % num_shards for i in range(num_shards)]
    running: list[Assignment] = []
    log = []
    step = 0
    while True:
        model_slots = [
            ModelSlot(
                m.model_id,
                frozenset(m.order[:1] if deterministic else m.remaining),
                m.busy,
                remaining_work=(epochs - m.epoch) * num_shards + len(m.remaining),
            )
            for m in models
            if not m.done
        ]
        busy_workers = {a.worker_id for a in running}
        worker_slots = [WorkerSlot(w, placement[w], w in busy_workers) for w in placement]
        new = schedule(model_slots, worker_slots)
        # Invariant 6 (no barrier) and the issue's "every worker busy whenever some model could
        # use its shard": nothing schedulable is left idle, whatever epoch each model is in.
        assert is_work_conserving(model_slots, worker_slots, new)
        for a in new:
            model = models[a.model_id]
            assert not model.busy, "invariant 2: model already on a worker"
            assert a.worker_id not in busy_workers, "invariant 3: worker already busy"
            assert a.shard in placement[a.worker_id], "invariant 5: data would have to move"
            assert a.shard in model.remaining, "invariant 1: shard visited twice in an epoch"
            if deterministic:
                assert a.shard == model.order[0]
            busy_workers.add(a.worker_id)
            model.busy = True
            log.append((step, a.model_id, model.epoch, a.shard, a.worker_id))
        running.extend(new)
        assert len({a.model_id for a in running}) == len(running)
        assert len({a.worker_id for a in running}) == len(running)
        if not running:
            break
        finished = running.pop(picks.draw(st.integers(0, len(running) - 1)))
        model = models[finished.model_id]
        model.busy = False
        model.remaining.discard(finished.shard)
        if deterministic:
            model.order.pop(0)
        if not model.remaining:
            model.epoch += 1
            if model.epoch == epochs:
                model.done = True
            else:
                model.remaining = set(range(num_shards))
                if deterministic:
                    model.order = [
                        (model.model_id + model.epoch + i) % num_shards for i in range(num_shards)
                    ]
        step += 1
    assert all(m.done for m in models), "every model finishes"
    return log


run_shapes = st.integers(1, 6).flatmap(
    lambda shards: st.tuples(
        st.just(shards), st.integers(1, shards), st.integers(1, 7), st.integers(1, 3)
    )
)


@settings(max_examples=300, deadline=None)
@given(shape=run_shapes, picks=st.data(), deterministic=st.booleans())
def test_simulated_runs_keep_every_invariant(shape, picks, deterministic):
    num_shards, num_workers, num_models, epochs = shape
    log = simulate(num_shards, num_workers, num_models, epochs, picks, deterministic)
    # Invariant 1 (and 7: every hop is in the log): each model visits each shard exactly once
    # per epoch, and nothing else.
    visits = {}
    for _, model, epoch, shard, _ in log:
        visits.setdefault((model, epoch), []).append(shard)
    assert len(visits) == num_models * epochs
    for shards in visits.values():
        assert sorted(shards) == list(range(num_shards))
    # Invariant 5: each shard is only ever used on the one worker that holds it.
    placement = place_shards(num_shards, num_workers)
    for _, _, _, shard, worker in log:
        assert shard in placement[worker]


@settings(max_examples=200, deadline=None)
@given(num_shards=st.integers(1, 64), num_workers=st.integers(1, 64))
def test_each_shard_is_placed_on_exactly_one_worker(num_shards, num_workers):
    # Invariant 8: shards belong to the dataset; any number of workers just divides them up.
    placement = place_shards(num_shards, num_workers)
    assert sorted(s for shards in placement.values() for s in shards) == list(range(num_shards))
    sizes = [len(s) for s in placement.values()]
    assert max(sizes) - min(sizes) <= 1


slots = st.lists(
    st.tuples(st.frozensets(st.integers(0, 5), max_size=6), st.booleans(), st.integers(0, 20)),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(models=slots, busy_workers=st.lists(st.booleans(), min_size=1, max_size=6))
def test_schedule_is_a_deterministic_work_conserving_matching(models, busy_workers):
    placement = place_shards(6, len(busy_workers))
    model_slots = [ModelSlot(i, e, b, r) for i, (e, b, r) in enumerate(models)]
    worker_slots = [WorkerSlot(w, placement[w], busy) for w, busy in enumerate(busy_workers)]
    result = schedule(model_slots, worker_slots)
    assert result == schedule(model_slots, worker_slots)
    assert is_work_conserving(model_slots, worker_slots, result)
    assert len({a.model_id for a in result}) == len(result)
    assert len({a.worker_id for a in result}) == len(result)
    for a in result:
        assert not model_slots[a.model_id].busy and not worker_slots[a.worker_id].busy
        assert a.shard in model_slots[a.model_id].eligible & placement[a.worker_id]


def test_more_remaining_work_goes_first_then_the_worker_that_holds_the_state():
    workers = [WorkerSlot(0, frozenset({0}))]
    ahead = ModelSlot(0, frozenset({0}), remaining_work=3)
    behind = ModelSlot(1, frozenset({0}), remaining_work=9)
    assert schedule([ahead, behind], workers) == [Assignment(1, 0, 0)]
    cold = ModelSlot(0, frozenset({0}), remaining_work=5, last_worker=None)
    warm = ModelSlot(1, frozenset({0}), remaining_work=5, last_worker=0)
    assert schedule([cold, warm], workers) == [Assignment(1, 0, 0)]


def test_constrained_worker_chooses_first():
    # Model 0 could go to either worker, model 1 only to worker 0: both must be placed.
    workers = [WorkerSlot(0, frozenset({0})), WorkerSlot(1, frozenset({1}))]
    models = [ModelSlot(0, frozenset({0, 1}), remaining_work=9), ModelSlot(1, frozenset({0}))]
    assert sorted(schedule(models, workers), key=lambda a: a.model_id) == [
        Assignment(0, 1, 1),
        Assignment(1, 0, 0),
    ]
