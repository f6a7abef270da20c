"""MOP invariant 4: a model trained by hops equals the same model trained in one process over
the same shards in the same order, bit for bit on CPU (weights and optimizer state)."""

from __future__ import annotations

import time

import builders
import pytest
import torch
from conftest import BACKENDS, make_backend, state_equal

import cerebro
from cerebro import training
from cerebro.backends.base import StateSaved, Unit, UnitDone, UnitMember
from cerebro.kinds import UnitKind

SEED = 7
MODEL_ID = 3
PARAMS = {"lr": 0.01, "width": 48, "dropout": 0.2, "batch_size": 50}


def _hop_through_workers(dataset, order, tmp_path):
    """Drive real worker processes by hand: one worker per shard, hops in ``order``."""
    state_path = str(tmp_path / "state.pt")
    spec = training.build_spec(builders.mlp, PARAMS, training.init_seed(SEED, MODEL_ID))
    training.save_state(
        training.capture_state(spec, {"version": 0, "epoch": 0}, torch.device("cpu")), state_path
    )
    backend = cerebro.LocalBackend(workers=3, threads_per_worker=1)
    placement = {w: frozenset({w}) for w in range(3)}
    backend.start(dataset.path, placement, builders.mlp)
    version = 0
    try:
        for epoch, shards in enumerate(order):
            for i, shard in enumerate(shards):
                member = UnitMember(
                    model_id=MODEL_ID,
                    params=PARAMS,
                    state_path=state_path,
                    version=version,
                    shuffle_seeds=(training.shuffle_seed(SEED, MODEL_ID, epoch, shard),),
                )
                unit = Unit(
                    unit_id=version,
                    kind=UnitKind.TRAIN,
                    epoch=epoch,
                    shards=(shard,),
                    worker_id=shard,
                    members=(member,),
                    end_of_epoch=i == len(shards) - 1,
                )
                backend.submit(unit)
                events = []
                deadline = time.monotonic() + 120
                while not any(isinstance(e, StateSaved) for e in events):
                    assert time.monotonic() < deadline
                    events += backend.poll(1.0)
                assert all(e.ok for e in events), [e.error for e in events]
                assert [type(e) for e in events] == [UnitDone, StateSaved]
                version += 1
    finally:
        backend.shutdown()
    return training.load_state(state_path)


@pytest.fixture
def three_shards(tmp_path) -> cerebro.Dataset:
    """300 random 8x8 "images" in 3 training shards (seeded)."""
    generator = torch.Generator().manual_seed(11)
    data = {
        "x": torch.rand(300, 8, 8, generator=generator).numpy(),
        "y": torch.randint(0, 10, (300,), generator=generator).numpy(),
    }
    return cerebro.prepare_data(data, tmp_path / "data", num_shards=3, validation=0.1, seed=1)


def test_hops_over_s2_s0_s1_equal_one_process_bit_for_bit(three_shards, tmp_path):
    dataset = three_shards
    order = [[2, 0, 1], [2, 0, 1]]
    hopped = _hop_through_workers(dataset, order, tmp_path)

    shards = [dataset.load_shard("train", s) for s in range(3)]
    reference = training.train_in_process(builders.mlp, PARAMS, shards, order, SEED, MODEL_ID)

    assert state_equal(hopped["model"], reference.model.state_dict())
    assert state_equal(hopped["optimizer"], reference.optimizer.state_dict())
    assert state_equal(hopped["lr_scheduler"], reference.lr_scheduler.state_dict())
    assert torch.equal(hopped["rng"], torch.get_rng_state())  # dropout's stream hopped too
    # And it did learn something: not a comparison of two untouched models.
    initial = training.build_spec(builders.mlp, PARAMS, training.init_seed(SEED, MODEL_ID))
    assert not state_equal(hopped["model"], initial.model.state_dict())


def test_a_different_order_gives_different_weights(three_shards):
    """The comparison above can fail: shard order matters to plain SGD."""
    dataset = three_shards
    shards = [dataset.load_shard("train", s) for s in range(3)]
    a = training.train_in_process(builders.mlp, PARAMS, shards, [[2, 0, 1]], SEED, MODEL_ID)
    b = training.train_in_process(builders.mlp, PARAMS, shards, [[0, 1, 2]], SEED, MODEL_ID)
    assert not state_equal(a.model.state_dict(), b.model.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_cache_mb", [0, 1024], ids=["state-read-every-hop", "cached"])
def test_experiment_results_equal_one_process_training_in_the_recorded_order(
    digits, tmp_path, model_cache_mb, backend
):
    """End to end through the driver: replaying result.hops in one process gives the same
    weights as the experiment's final checkpoint, for every model, whether workers bring each
    model's state in at every hop (from disk, or Ray's object store) or keep models built
    between hops."""
    space = {"lr": cerebro.choice([0.003, 0.03]), "width": cerebro.choice([16, 32])}
    exp = cerebro.Experiment(
        builders.mlp,
        digits,
        cerebro.GridSearch(space),
        epochs=2,
        metric="val_accuracy",
        mode="max",
        backend=make_backend(
            backend, workers=2, threads_per_worker=1, model_cache_mb=model_cache_mb
        ),
        path=tmp_path / "run",
        seed=SEED,
        progress=False,
    )
    result = exp.run()
    shards = [digits.load_shard("train", s) for s in range(digits.num_shards)]
    train_hops = result.hops[result.hops.kind == "train"].sort_values("start")
    for record in result.models:
        mine = train_hops[train_hops.model_id == record.id]
        order = [list(mine[mine.epoch == e].shard) for e in range(2)]
        reference = training.train_in_process(
            builders.mlp, record.params, shards, order, SEED, record.id
        )
        loaded = result.load_model(record.id)
        assert state_equal(loaded.state_dict(), reference.model.state_dict()), record.id
