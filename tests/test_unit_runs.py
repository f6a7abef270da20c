"""Units of several shards: a model's visits to one worker that would run back to back anyway
(an evaluation pass over the worker's validation shards, training hops within the lag bound)
run as one unit, without a round trip to the driver between them, and are recorded hop by hop.
"""

from __future__ import annotations

import builders
import pandas as pd
from conftest import assert_same_results, small_experiment

import cerebro


def _units(hops: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, unit): its kind, worker and shards in the order they ran."""
    ordered = hops.sort_values("start")
    return (
        ordered.groupby(["model_id", "unit"])
        .agg(kind=("kind", "first"), workers=("worker", "nunique"), shards=("shard", list))
        .reset_index()
    )


def _most_hops(result: cerebro.Result, kind: str) -> int:
    """The most hops (or validation passes) any one unit of ``kind`` ran."""
    units = _units(result.hops)
    return int(units[units.kind == kind].shards.map(len).max())


def test_visits_to_one_worker_run_as_one_unit_and_each_hop_is_recorded(digits, tmp_path):
    result = small_experiment(digits, tmp_path / "run", epochs=2, durable_lag=3).run()
    hops = result.hops
    # Every model visits every shard once an epoch, for training and for validation.
    key = ["model_id", "epoch", "kind", "shard"]
    assert not hops.duplicated(key).any()
    assert (hops.groupby(["model_id", "epoch", "kind"]).shard.nunique() == 4).all()
    units = _units(hops)
    assert (units.workers == 1).all()  # a unit runs on the worker that holds its shards
    # Each validation pass runs as one unit per worker: both of its validation shards.
    evaluations = units[units.kind == "eval"]
    assert (evaluations.shards.map(len) == 2).all()
    # Training units take both of a worker's shards where the lag bound allows.
    assert _most_hops(result, "train") == 2
    # The hops of one unit ran one after another, each with its own time span.
    for _, unit in hops.groupby(["model_id", "unit"]):
        unit = unit.sort_values("start")
        assert (unit.start.to_numpy()[1:] >= unit.end.to_numpy()[:-1]).all()
        assert (unit.end > unit.start).all()


def test_a_unit_of_many_hops_trains_bit_for_bit_as_one_hop_per_unit(digits, tmp_path):
    # One worker holds every shard: with room in the lag bound its units take the whole
    # epoch's training (4 hops); with a bound of 0 each hop is a unit of its own.
    common = dict(
        epochs=2,
        deterministic=True,
        seed=3,
        search=cerebro.GridSearch(
            {"lr": cerebro.choice([0.01, 0.03]), "dropout": cerebro.choice([0.0, 0.3])}
        ),
        build=builders.mlp,
    )
    long_units, single = (
        small_experiment(
            digits,
            tmp_path / name,
            backend=cerebro.LocalBackend(workers=workers),
            durable_lag=lag,
            **common,
        ).run()
        for name, workers, lag in (("long", 1, 8), ("single", 2, 0))
    )
    assert _most_hops(long_units, "train") == 4 and _most_hops(single, "train") == 1
    assert_same_results(long_units, single)


def test_a_training_unit_takes_no_more_hops_than_the_lag_bound_allows(digits, tmp_path):
    # Four shards. Two models on one worker: a bound of 2 cuts each epoch's training into
    # units of at most 2 hops (1 where the last state file is still being written), a bound of
    # 1 into single hops. The same two models on two workers are too few to keep both busy
    # while one waits for its state file at the bound: their units stop a hop short of it.
    for workers, lag, most in ((1, 2, 2), (1, 1, 1), (2, 2, 1), (2, 3, 2)):
        result = small_experiment(
            digits,
            tmp_path / f"w{workers}-lag{lag}",
            backend=cerebro.LocalBackend(workers=workers),
            durable_lag=lag,
        ).run()
        assert _most_hops(result, "train") == most, (workers, lag)
        units = _units(result.hops)
        assert (units[units.kind == "eval"].shards.map(len) == 4 // workers).all()
