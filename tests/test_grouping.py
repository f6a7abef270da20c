"""Fusion's share of the engine, without workers: options, cohorts, bundles, and a simulated run
of the real roster and scheduler in which MOP invariants 1-3 and 5 hold for every member of
every fused unit."""

from __future__ import annotations

import builders
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cerebro
from cerebro.engine.grouping import Fusion, Grouping, fusion_option
from cerebro.engine.roster import Roster
from cerebro.engine.scheduler import WorkerSlot, place_shards, schedule
from cerebro.kinds import ModelStatus, Origin, UnitKind
from cerebro.techniques.fusable import Fusability

MLP = Fusability(key="mlp", reason=None, nbytes=1000)
CNN = Fusability(key="cnn", reason=None, nbytes=1000)
ALONE = Fusability(key=None, reason="layer 0 (MyBlock) is not a supported layer", nbytes=0)


# Options -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, accepted",
    [
        ("yes", "True, False or cerebro.Fusion"),
        (1, "True, False or cerebro.Fusion"),
        ({"max_models": 4}, "True, False or cerebro.Fusion"),
    ],
)
def test_fusion_accepts_bools_and_fusion_options_only(value, accepted):
    with pytest.raises(cerebro.ConfigError, match=f"fusion=.*{accepted}"):
        fusion_option(value)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"max_models": 0}, "Fusion.max_models=0"),
        ({"max_models": 2.5}, "Fusion.max_models=2.5"),
        ({"memory_mb": 0}, "Fusion.memory_mb=0"),
        ({"memory_mb": -5}, "Fusion.memory_mb=-5"),
        ({"memory_mb": "lots"}, "Fusion.memory_mb='lots'"),
    ],
)
def test_fusion_limits_are_checked(kwargs, name):
    with pytest.raises(cerebro.ConfigError, match=name):
        Fusion(**kwargs)


def test_an_experiment_refuses_a_bad_fusion_before_anything_runs(digits, tmp_path):
    with pytest.raises(cerebro.ConfigError, match="fusion='on'"):
        cerebro.Experiment(
            builders.mlp,
            digits,
            cerebro.GridSearch({"lr": cerebro.choice([0.1])}),
            path=tmp_path / "run",
            fusion="on",
        )
    assert not (tmp_path / "run").exists()


def test_memory_limits_how_many_models_one_unit_holds():
    assert Fusion(max_models=32, memory_mb=1).most_members(2**20 // 4) == 4
    assert Fusion(max_models=2, memory_mb=1).most_members(10) == 2
    assert Fusion(memory_mb=1).most_members(2**30) == 1  # too big for the limit: alone


# Cohorts and bundles -----------------------------------------------------------------------------


def test_cohorts_are_near_equal_cuts_per_key_in_id_order():
    grouping = Grouping(Fusion(max_models=3), deterministic=True)
    facts = {i: MLP for i in range(7)} | {7: CNN, 8: ALONE}
    cohorts = grouping.enroll(facts)
    assert [c.models for c in cohorts] == [(0, 1, 2), (3, 4), (5, 6), (7,)]
    assert [grouping.anchor(i) for i in range(9)] == [0, 0, 0, 3, 3, 5, 5, 7, 8]
    assert not grouping.fusable(8)


def test_cohorts_come_back_from_the_records():
    grouping = Grouping(Fusion(max_models=2), deterministic=True)
    events = [{"kind": "fusion_cohort", "detail": c.event()} for c in grouping.enroll({
        3: MLP, 4: MLP, 5: MLP})]  # fmt: skip
    again = Grouping(Fusion(max_models=2), deterministic=True)
    again.restore([{"kind": "paused", "detail": {"model": 3}}, *events])
    assert [again.anchor(i) for i in (3, 4, 5)] == [3, 3, 5]
    assert again.fusable(4) and not again.fusable(6)


def test_a_changed_key_moves_a_model_to_models_of_its_new_key_and_comes_back_after_restart():
    roster = _roster(Grouping(Fusion(max_models=8), deterministic=True))
    _models(roster, [MLP, MLP, MLP])
    events = [{"kind": "fusion_cohort", "detail": {"anchor": 0, "models": [0, 1, 2], "key": roster
               .grouping._keys[0], "nbytes": 1000}}]  # fmt: skip
    change = roster.grouping.rekey(2, CNN)
    assert change is not None and roster.grouping.anchor(2) == 0  # its shard order stays
    bundles = sorted([m.model_id for m in roster.bundle(s.model_id)] for s in roster.slots(4))
    assert bundles == [[0, 1], [2]]
    again = Grouping(Fusion(max_models=8), deterministic=True)
    again.restore([*events, {"kind": "fusion_key", "detail": change}])
    assert again._keys == roster.grouping._keys and again.anchor(2) == 0


def _roster(grouping: Grouping, num_shards: int = 4, epochs: int = 2) -> Roster:
    return Roster("/nonexistent", num_shards, frozenset(), epochs, None, 0, grouping.deterministic,
                  grouping)  # fmt: skip


def _models(roster: Roster, facts: list[Fusability]) -> None:
    for _ in facts:
        roster.new({}, origin=Origin.SEARCH)
    roster.grouping.enroll(dict(enumerate(facts)))
    for model in roster:
        model.remaining = roster.train_order(model)


def test_models_at_the_same_point_with_the_same_key_go_together():
    roster = _roster(Grouping(Fusion(max_models=8), deterministic=False))
    _models(roster, [MLP, MLP, CNN, MLP, ALONE])
    roster[3].remaining.remove(0)  # a hop ahead of the others: not at their point
    slots = roster.slots(idle_workers=1)
    assert sorted(tuple(m.model_id for m in roster.bundle(s.model_id)) for s in slots) == [
        (0, 1),
        (2,),
        (3,),
        (4,),
    ]


def test_free_mode_splits_a_bundle_so_every_idle_worker_gets_a_part():
    roster = _roster(Grouping(Fusion(max_models=32), deterministic=False))
    _models(roster, [MLP] * 10)
    sizes = sorted(len(roster.bundle(s.model_id)) for s in roster.slots(idle_workers=3))
    assert sizes == [3, 3, 4]


def test_deterministic_mode_bundles_only_a_cohort_which_shares_one_shard_order():
    roster = _roster(Grouping(Fusion(max_models=2), deterministic=True))
    _models(roster, [MLP] * 4)
    bundles = [[m.model_id for m in roster.bundle(s.model_id)] for s in roster.slots(4)]
    assert bundles == [[0, 1], [2, 3]]
    assert roster.train_order(roster[1]) == roster.train_order(roster[0])
    assert roster.train_order(roster[3]) == roster.train_order(roster[2])


def test_without_fusion_every_model_is_its_own_unit_and_keeps_its_own_order():
    roster = _roster(Grouping(None, deterministic=True))
    _models(roster, [MLP] * 3)
    assert [[m.model_id for m in roster.bundle(s.model_id)] for s in roster.slots(3)] == [
        [0],
        [1],
        [2],
    ]
    from cerebro import training

    assert roster.train_order(roster[2]) == training.shard_order(0, 2, 0, [0, 1, 2, 3])


# A simulated run ---------------------------------------------------------------------------------


def simulate(num_shards, num_workers, facts, epochs, max_models, deterministic, picks):
    """The driver's loop over the real roster, grouping and scheduler; hypothesis picks which
    unit ends next and which models a person stops at their epoch ends."""
    grouping = Grouping(Fusion(max_models=max_models), deterministic)
    roster = _roster(grouping, num_shards, epochs)
    _models(roster, facts)
    placement = place_shards(num_shards, num_workers)
    running: dict[int, tuple[int, int, list[int]]] = {}  # worker -> (epoch, shard, members)
    visits: dict[tuple[int, int], list[int]] = {}
    first_order = {m.model_id: list(m.remaining) for m in roster}
    orders: dict[tuple[int, int], list[int]] = {}
    while True:
        workers = [WorkerSlot(w, placement[w], w in running) for w in placement]
        idle = sum(not w.busy for w in workers)
        for a in schedule(roster.slots(idle), workers):
            members = roster.bundle(a.model_id)
            assert a.worker_id not in running, "invariant 3: the worker runs one unit at a time"
            assert a.shard in placement[a.worker_id], "invariant 5: data would have to move"
            assert len(members) <= max_models
            point = {(m.epoch, m.phase, tuple(m.remaining)) for m in members}
            assert len(point) == 1, "a bundle's members are at one point"
            assert len({grouping._keys.get(m.model_id, m.model_id) for m in members}) == 1
            if deterministic:
                assert len({grouping.anchor(m.model_id) for m in members}) == 1
            for m in members:
                assert not m.busy, "invariant 2: a model is on one worker at a time"
                assert m.status is ModelStatus.RUNNING
                m.busy = True
                m.remaining.remove(a.shard)
                visits.setdefault((m.model_id, m.epoch), []).append(a.shard)
            running[a.worker_id] = (members[0].epoch, a.shard, [m.model_id for m in members])
        if not running:
            break
        worker = sorted(running)[picks.draw(st.integers(0, len(running) - 1))]
        _, _, member_ids = running.pop(worker)
        for model_id in member_ids:
            m = roster[model_id]
            m.busy = False
            if m.remaining:
                continue
            m.epoch += 1
            if m.epoch == epochs:
                m.status = ModelStatus.COMPLETED
            elif picks.draw(st.integers(0, 5)) == 0:
                m.status = ModelStatus.STOPPED  # leaves its bundle; the others go on
            else:
                m.start_epoch(roster.train_order(m))
                orders[(model_id, m.epoch)] = list(m.remaining)
    assert all(m.status is not ModelStatus.RUNNING for m in roster)
    return roster, visits, first_order, orders


@settings(max_examples=150, deadline=None)
@given(
    shape=st.integers(1, 5).flatmap(
        lambda shards: st.tuples(st.just(shards), st.integers(1, shards))
    ),
    kinds=st.lists(st.sampled_from([MLP, CNN, ALONE]), min_size=1, max_size=9),
    epochs=st.integers(1, 3),
    max_models=st.integers(1, 4),
    deterministic=st.booleans(),
    picks=st.data(),
)
def test_fused_runs_keep_the_mop_invariants_for_every_member(
    shape, kinds, epochs, max_models, deterministic, picks
):
    num_shards, num_workers = shape
    roster, visits, first_order, orders = simulate(
        num_shards, num_workers, kinds, epochs, max_models, deterministic, picks
    )
    # Invariant 1: each member visits each shard exactly once per epoch it trains to its end.
    for model in roster:
        for epoch in range(model.epoch):
            assert sorted(visits[(model.model_id, epoch)]) == list(range(num_shards))
        if deterministic:  # ... in its cohort's order
            for epoch in range(model.epoch):
                expected = first_order[model.model_id] if epoch == 0 else orders[
                    (model.model_id, epoch)]  # fmt: skip
                assert visits[(model.model_id, epoch)] == expected


def test_phases_keep_bundles_apart():
    roster = _roster(Grouping(Fusion(), deterministic=False))
    _models(roster, [MLP, MLP])
    roster[1].phase = UnitKind.EVAL
    assert len(roster.slots(1)) == 2
