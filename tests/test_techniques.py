"""The seam between workers and techniques: units hold groups of models, a runner trains a
group, and the plain runner (one model) is today's hop bit for bit."""

from __future__ import annotations

import builders
import pytest
import torch
from conftest import state_equal

from cerebro import training
from cerebro.backends import worker as worker_module
from cerebro.backends.base import Unit, UnitDone, UnitMember
from cerebro.backends.handover import write_states
from cerebro.backends.shipping import pickle_build
from cerebro.backends.worker import WorkerConfig, WorkerRuntime
from cerebro.kinds import UnitKind
from cerebro.state import Counters, HopRecord
from cerebro.techniques import Technique, runner_for
from cerebro.techniques.base import MemberSeeds, ModelInHand
from cerebro.techniques.plain import PlainRunner

SEED = 5
CPU = torch.device("cpu")
PARAMS = {0: {"lr": 0.01, "width": 24}, 1: {"lr": 0.03, "width": 16, "dropout": 0.3}}


def _initial(model_id: int) -> dict:
    """A model's initial state, as the driver writes it."""
    seed = training.init_seed(SEED, model_id)
    spec = training.build_spec(builders.mlp, PARAMS[model_id], seed)
    return training.capture_state(spec, {"version": 0, "epoch": 0, "init_seed": seed}, CPU)


def _member(model_id: int, path: str, version: int, epoch: int, shard: int) -> UnitMember:
    return UnitMember(
        model_id=model_id,
        params=PARAMS[model_id],
        state_path=path,
        version=version,
        shuffle_seeds=(training.shuffle_seed(SEED, model_id, epoch, shard),),
    )


# The plain runner ------------------------------------------------------------------------------


def test_plain_runner_trains_bit_for_bit_as_one_process(digits):
    shards = [digits.load_shard("train", s) for s in range(digits.num_shards)]
    order = [[2, 0, 3, 1], [1, 3]]
    state = _initial(0)
    spec = training.build_spec(builders.mlp, PARAMS[0], init_seed=None)
    training.restore_state(spec, state, CPU)
    counters = Counters.from_dict(state["counters"])
    model = ModelInHand(0, spec, {"rng": state["rng"]}, counters, PARAMS[0])
    runner = runner_for(Technique.PLAIN)
    for epoch, shard_ids in enumerate(order):
        for i, shard in enumerate(shard_ids):
            seeds = MemberSeeds(training.shuffle_seed(SEED, 0, epoch, shard), None)
            last = i == len(shard_ids) - 1
            (stats,) = runner.train([model], [seeds], shards[shard], CPU, last)
            assert stats.rows == shards[shard].rows

    reference = training.train_in_process(builders.mlp, PARAMS[0], shards, order, SEED, 0)
    assert state_equal(spec.model.state_dict(), reference.model.state_dict())
    assert state_equal(spec.optimizer.state_dict(), reference.optimizer.state_dict())
    assert state_equal(spec.lr_scheduler.state_dict(), reference.lr_scheduler.state_dict())
    assert torch.equal(model.rng["rng"], torch.get_rng_state())  # dropout's stream went along

    val = digits.load_shard("val", 0)
    rng_before = model.rng
    (ran,) = runner.evaluate([model], val, CPU)
    expected = training.run_eval_hop(reference, val, CPU)
    assert (ran.rows, ran.sums) == (expected.rows, expected.sums)
    assert model.rng is rng_before  # an evaluation changes no generator


def test_plain_runner_refuses_a_group_of_two(digits):
    state = _initial(0)
    models = []
    for model_id in (0, 1):
        spec = training.build_spec(builders.mlp, PARAMS[model_id], init_seed=None)
        models.append(ModelInHand(model_id, spec, {"rng": state["rng"]}, Counters(), {}))
    shard = digits.load_shard("train", 0)
    runner = PlainRunner()
    message = "the plain runner trains one model per unit, not a group of 2"
    seeds = [MemberSeeds(0, None)] * 2
    with pytest.raises(ValueError, match=message):
        runner.train(models, seeds, shard, CPU, False)
    with pytest.raises(ValueError, match=message):
        runner.evaluate(models, shard, CPU)
    with pytest.raises(ValueError, match="not a group of 0"):
        runner.train([], [], shard, CPU, False)


def test_a_unit_holds_at_least_one_model_and_each_once():
    with pytest.raises(ValueError, match="unit 3 holds no model"):
        Unit(unit_id=3, kind=UnitKind.TRAIN, epoch=0, shards=(0,), worker_id=0, members=())
    member = _member(0, "state.pt", 0, 0, 0)
    with pytest.raises(ValueError, match=r"more than once: \[0, 0\]"):
        Unit(3, UnitKind.TRAIN, 0, (0,), 0, members=(member, member))
    assert Unit(3, UnitKind.TRAIN, 0, (0,), 0, members=(member,)).technique is Technique.PLAIN


def test_unknown_technique_is_refused():
    with pytest.raises(ValueError, match="'shared-prefix' is not a valid Technique"):
        runner_for("shared-prefix")


# The worker ------------------------------------------------------------------------------------


@pytest.fixture
def make_runtime(digits, monkeypatch):
    # A runtime marks its process as a worker: this one is the test process.
    monkeypatch.setattr(worker_module, "_in_worker", False)

    def make(model_cache_mb: int) -> WorkerRuntime:
        return WorkerRuntime(worker_config(digits, 0, model_cache_mb))

    return make


def worker_config(digits, worker_id: int, model_cache_mb: int, **more) -> WorkerConfig:
    """A CPU worker holding every shard of ``digits``, building ``builders.mlp``."""
    return WorkerConfig(
        worker_id=worker_id,
        dataset_path=digits.path,
        shards=frozenset(range(digits.num_shards)),
        device="cpu",
        build=pickle_build(builders.mlp),
        threads=1,
        model_cache_mb=model_cache_mb,
        **more,
    )


@pytest.fixture
def count_reads(monkeypatch):
    reads: list[str] = []
    load = training.load_state

    def counting(path):
        reads.append(path)
        return load(path)

    monkeypatch.setattr(training, "load_state", counting)
    return reads


def _run(runtime: WorkerRuntime, unit: Unit) -> UnitDone:
    done, snapshots = runtime.run(unit)
    assert done.ok, done.error
    if unit.kind == UnitKind.TRAIN:
        assert set(snapshots) == set(unit.model_ids)
        states = write_states(unit, snapshots, None)  # no handover folder: the state files
        assert not states.failed, states.failed
        assert [w.path for w in states.written.values()] == [m.state_path for m in unit.members]
    else:
        assert snapshots == {}
    return done


# (model, epoch, shard, end of epoch): the models alternate, and sometimes one stays.
SCHEDULE = [
    (0, 0, 0, False),
    (1, 0, 0, False),
    (0, 0, 1, False),
    (0, 0, 2, False),
    (1, 0, 2, False),
    (1, 0, 1, False),
    (0, 0, 3, True),
    (1, 0, 3, True),
    (0, 1, 2, True),
    (1, 1, 0, True),
]


@pytest.mark.parametrize(
    ("model_cache_mb", "reads"),
    [
        # Nothing cached but the newest model: a model coming back after the other one is read.
        (0, [True, True, True, False, True, False, True, True, True, True]),
        # Both stay built: each state is read once, when the model first arrives.
        (1024, [True, True] + [False] * 8),
    ],
    ids=["miss", "hit"],
)
def test_worker_runs_two_models_through_its_cache_as_one_process(
    digits, tmp_path, make_runtime, count_reads, model_cache_mb, reads
):
    paths = {0: str(tmp_path / "a.pt"), 1: str(tmp_path / "b.pt")}
    for model_id, path in paths.items():
        training.save_state(_initial(model_id), path)
    runtime = make_runtime(model_cache_mb)
    version = {0: 0, 1: 0}
    read = []
    for unit_id, (model_id, epoch, shard, last) in enumerate(SCHEDULE):
        member = _member(model_id, paths[model_id], version[model_id], epoch, shard)
        unit = Unit(unit_id, UnitKind.TRAIN, epoch, (shard,), 0, (member,), end_of_epoch=last)
        needed, before = runtime.needs_state(member), len(count_reads)
        done = _run(runtime, unit)
        assert (len(count_reads) > before) == needed
        read.append(needed)
        version[model_id] += 1
        written = Counters.from_dict(training.load_state(paths[model_id])["counters"])
        assert written.hops[-1] == done.hops(unit, model_id)[-1]  # the state carries its record
        assert written.version == version[model_id] and written.epoch == epoch
    assert read == reads

    shards = [digits.load_shard("train", s) for s in range(digits.num_shards)]
    val = digits.load_shard("val", 1)
    for model_id in (0, 1):
        order = [[s for m, e, s, _ in SCHEDULE if m == model_id and e == ep] for ep in (0, 1)]
        reference = training.train_in_process(
            builders.mlp, PARAMS[model_id], shards, order, SEED, model_id
        )
        saved = training.load_state(paths[model_id])
        assert state_equal(saved["model"], reference.model.state_dict()), model_id
        assert state_equal(saved["optimizer"], reference.optimizer.state_dict()), model_id
        member = _member(model_id, paths[model_id], version[model_id], 1, 1)
        done = _run(runtime, Unit(50 + model_id, UnitKind.EVAL, 1, (1,), 0, (member,)))
        expected = training.run_eval_hop(reference, val, CPU)
        (result,) = done.passes[0].results
        assert (result.model_id, result.rows, result.sums) == (
            model_id,
            expected.rows,
            expected.sums,
        )


def test_worker_refuses_a_two_model_plain_unit_and_keeps_nothing(
    digits, tmp_path, make_runtime, count_reads
):
    paths = {0: str(tmp_path / "a.pt"), 1: str(tmp_path / "b.pt")}
    for model_id, path in paths.items():
        training.save_state(_initial(model_id), path)
    runtime = make_runtime(1024)
    _run(runtime, Unit(0, UnitKind.TRAIN, 0, (0,), 0, (_member(0, paths[0], 0, 0, 0),)))
    members = (_member(0, paths[0], 1, 0, 1), _member(1, paths[1], 0, 0, 1))
    done, snapshots = runtime.run(Unit(1, UnitKind.TRAIN, 0, (1,), 0, members))
    assert not done.ok and snapshots == {} and done.passes == ()
    assert "the plain runner trains one model per unit, not a group of 2" in done.error
    assert all(runtime.needs_state(m) for m in members)  # every member's objects forgotten
    assert Counters.from_dict(training.load_state(paths[0])["counters"]).version == 1


# Counters and hop records in state files -------------------------------------------------------


def test_counters_round_trip_through_a_state_file(tmp_path):
    hops = (
        HopRecord(shard=2, rows=10, sums={"loss": 3.5}, worker=1, start=1.0, end=2.0, unit=7),
        HopRecord(
            shard=0,
            rows=12,
            sums={"loss": 2.0, "accuracy": 6.0},
            worker=0,
            start=3.0,
            end=4.5,
            load_s=0.5,
            unit=9,
        ),
    )
    counters = Counters(version=4, epoch=1, init_seed=11, hops=hops, params={"lr": 0.1})
    spec = builders.mlp({})
    path = str(tmp_path / "state.pt")
    training.save_state(training.capture_state(spec, counters.to_dict(), CPU), path)
    stored = training.load_state(path)["counters"]
    assert isinstance(stored, dict) and stored["visited"] == [2, 0]
    assert Counters.from_dict(stored) == counters
    assert hops[1].means() == {"loss": 2.0 / 12, "accuracy": 0.5}


def test_old_counters_without_unit_ids_load_and_train_on(digits, tmp_path, make_runtime):
    """A state file written before hop records named their unit (and with a dict for
    counters, as every state file is) is read, and its epoch goes on where it was."""
    state = _initial(0)
    state["counters"] = {
        "version": 2,
        "epoch": 0,
        "init_seed": training.init_seed(SEED, 0),
        "visited": [3, 1],
        "hops": [
            {"shard": 3, "rows": 300, "sums": {"loss": 1.0}, "worker": 0, "start": 1.0, "end": 2.0},
            {
                "shard": 1,
                "rows": 300,
                "sums": {"loss": 0.5},
                "worker": 1,
                "start": 2.0,
                "end": 3.0,
                "load_s": 0.1,
            },
        ],
    }
    old = Counters.from_dict(state["counters"])
    assert [h.unit for h in old.hops] == [None, None] and old.hops[0].load_s == 0.0
    path = str(tmp_path / "old.pt")
    training.save_state(state, path)
    runtime = make_runtime(0)
    unit = Unit(5, UnitKind.TRAIN, 0, (2,), 0, (_member(0, path, 2, 0, 2),))
    done = _run(runtime, unit)
    written = Counters.from_dict(training.load_state(path)["counters"])
    assert written.version == 3 and written.visited == [3, 1, 2]
    assert written.hops[:2] == old.hops and written.hops[2] == done.hops(unit, 0)[-1]
    assert written.hops[2].unit == 5
