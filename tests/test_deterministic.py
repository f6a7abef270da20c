"""Deterministic mode: final weights and metrics are bit-identical whatever the number of
workers (and so whatever the timing), on local worker processes and on Ray actors alike."""

from __future__ import annotations

import builders
import pandas as pd
import pytest
from conftest import make_backend, state_equal

import cerebro


def _run(
    dataset, path, workers: int, deterministic: bool = True, kind: str = "local"
) -> cerebro.Result:
    space = {"lr": cerebro.choice([0.003, 0.03]), "dropout": cerebro.choice([0.0, 0.3])}
    return cerebro.Experiment(
        builders.mlp,
        dataset,
        cerebro.GridSearch(space),
        epochs=2,
        metric="val_accuracy",
        mode="max",
        backend=make_backend(kind, workers=workers),
        path=path,
        seed=5,
        progress=False,
        deterministic=deterministic,
    ).run()


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    runs = {w: _run(digits, root / f"w{w}", w) for w in (1, 2, 3, 4)}
    runs["ray-2"] = _run(digits, root / "ray", 2, kind="ray")
    return runs


def test_final_weights_are_bit_identical_on_1_2_3_and_4_workers_and_on_ray(runs):
    one = runs[1]
    for workers in (2, 3, 4, "ray-2"):
        other = runs[workers]
        assert {m.status for m in other.models} == {"completed"}
        for record in one.models:
            assert state_equal(
                one.load_model(record.id).state_dict(), other.load_model(record.id).state_dict()
            ), (workers, record.id)


def test_metrics_are_bit_identical_on_1_2_3_and_4_workers_and_on_ray(runs):
    for workers in (2, 3, 4, "ray-2"):
        pd.testing.assert_frame_equal(runs[1].history, runs[workers].history, check_exact=True)


def test_each_model_visits_shards_in_its_seeded_order(runs):
    orders = {}
    for workers, result in runs.items():
        train = result.hops[result.hops.kind == "train"].sort_values("start")
        orders[workers] = train.groupby(["model_id", "epoch"]).shard.apply(list).to_dict()
    assert orders[1] == orders[2] == orders[3] == orders[4] == orders["ray-2"]
    # The order is a permutation that differs between epochs or models (not always 0, 1, 2, 3).
    assert any(order != sorted(order) for order in orders[1].values())
    # And every hop ran on the worker that holds its shard.
    for result in runs.values():
        assert result.hops.groupby("shard").worker.nunique().max() == 1
