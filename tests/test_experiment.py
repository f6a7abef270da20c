"""End-to-end runs of Experiment on real worker processes."""

from __future__ import annotations

import glob
import os

import builders
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BACKENDS, make_backend

import cerebro


def _check_hop_invariants(hops: pd.DataFrame, num_shards: int, val_shards: int) -> None:
    train = hops[hops.kind == "train"]
    # Invariant 1: every model trains on every training shard exactly once per epoch.
    for (_model, _epoch), group in train.groupby(["model_id", "epoch"]):
        assert sorted(group.shard) == list(range(num_shards))
    for (_model, _epoch), group in hops[hops.kind == "eval"].groupby(["model_id", "epoch"]):
        assert sorted(group.shard) == list(range(val_shards))
    # Invariants 2 and 3: no overlapping intervals per model, nor per worker.
    for key in ("model_id", "worker"):
        for _, group in hops.groupby(key):
            spans = group.sort_values("start")[["start", "end"]].to_numpy()
            assert (spans[1:, 0] >= spans[:-1, 1]).all(), f"overlap on one {key}"
    # Invariant 5: a shard is only ever used by one worker.
    assert hops.groupby("shard").worker.nunique().max() == 1


@pytest.fixture(scope="module", params=BACKENDS)
def run(request, digits, tmp_path_factory):
    space = {
        "lr": cerebro.loguniform(1e-3, 3e-2),
        "batch_size": cerebro.choice([32, 64]),
        "width": cerebro.randint(16, 64),
        "dropout": cerebro.uniform(0.0, 0.3),
        "l2": cerebro.quniform(0.0, 0.01, 0.001),
    }
    exp = cerebro.Experiment(
        builders.mlp,
        digits,
        cerebro.RandomSearch(space, num_models=6, seed=0),
        epochs=3,
        metric="val_accuracy",
        mode="max",
        backend=make_backend(request.param, workers=2),
        path=tmp_path_factory.mktemp("runs") / "random",
        seed=0,
        progress=False,
    )
    return exp, exp.run()


def test_hops_satisfy_mop_invariants_on_a_multi_worker_run(run, digits):
    _, result = run
    assert {m.status for m in result.models} == {"completed"}
    assert set(result.hops.worker) == {0, 1}
    assert list(result.hops.columns[:6]) == [
        "model_id",
        "epoch",
        "kind",
        "shard",
        "worker",
        "start",
    ]
    _check_hop_invariants(result.hops, digits.num_shards, digits.num_shards)
    assert len(result.hops) == 6 * 3 * (4 + 4)


def test_a_finished_run_leaves_no_spare_state_files(run):
    """State files are written in turns (cerebro.turns): each model's spare goes once it is
    done, by the driver's writer (local) or the backend (Ray, whose workers write them)."""
    exp, result = run
    states = glob.glob(os.path.join(exp.path, "**", "state.pt*"), recursive=True)
    assert len(states) == len(result.models)
    assert all(path.endswith("state.pt") for path in states)


def test_history_has_one_row_per_model_and_epoch(run):
    _, result = run
    history = result.history
    assert list(history.columns) == [
        "model_id",
        "epoch",
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
    ]
    assert len(history) == 6 * 3
    assert history.groupby("model_id").epoch.apply(list).map(lambda e: e == [0, 1, 2]).all()
    assert history.val_accuracy.between(0, 1).all()


def test_validation_metrics_are_exact_over_the_whole_split(run, digits):
    _, result = run
    model = result.load_model()
    x = torch.cat([digits.load_shard("val", s).x for s in range(digits.num_shards)])
    y = torch.cat([digits.load_shard("val", s).y for s in range(digits.num_shards)])
    with torch.no_grad():
        out = model(x)
    correct = int((out.argmax(1) == y).sum())
    assert result.best.metrics["val_accuracy"] == pytest.approx(correct / len(y), abs=1e-12)
    loss = torch.nn.functional.cross_entropy(out.double(), y).item()
    assert result.best.metrics["val_loss"] == pytest.approx(loss, rel=1e-5)


def test_best_follows_mode(run):
    _, result = run
    final = result.history.groupby("model_id").last()
    assert result.best.id == final.val_accuracy.idxmax()
    assert result.leaderboard().model_id.iloc[0] == result.best.id
    as_min = cerebro.engine.Result(result._store, "val_loss", "min", result.checkpoint_dir, None)
    assert as_min.best.id == final.val_loss.idxmin()
    as_max_loss = cerebro.engine.Result(
        result._store, "val_loss", "max", result.checkpoint_dir, None
    )
    assert as_max_loss.best.id == final.val_loss.idxmax()
    assert as_min.best.id != as_max_loss.best.id


def test_every_hop_shuffles_with_its_own_seed():
    """Each (model, epoch, shard) gets its own row-order seed."""
    from cerebro import training

    seeds = {
        training.shuffle_seed(0, m, e, s) for m in range(6) for e in range(3) for s in range(4)
    }
    assert len(seeds) == 6 * 3 * 4


def test_load_model_returns_a_plain_module_with_trained_weights(run):
    _, result = run
    model = result.load_model(result.models[0].id)
    assert type(model) is torch.nn.Sequential
    assert not model.training


def test_failed_models_are_marked_and_the_others_go_on(digits, tmp_path):
    # A forward that raises on the data is refused before the run (see test_preflight.py).
    space = {"fail": cerebro.choice(["none", "build", "nan"])}
    result = cerebro.Experiment(
        builders.flaky,
        digits,
        cerebro.GridSearch(space),
        epochs=2,
        metric="val_accuracy",
        mode="max",
        backend=cerebro.LocalBackend(workers=2),
        path=tmp_path / "run",
        progress=False,
    ).run()
    status = {m.params["fail"]: m for m in result.models}
    assert status["none"].status == "completed"
    assert result.best.params == {"fail": "none"}
    assert status["build"].status == "failed" and "build failed on purpose" in status["build"].error
    assert status["nan"].status == "failed" and "non-finite" in status["nan"].error
    # The healthy model ran every unit despite the others.
    healthy = result.hops[result.hops.model_id == status["none"].id]
    assert len(healthy) == 2 * (4 + 4)


def test_train_metric_without_validation_split(digits_arrays, tmp_path):
    ds = cerebro.prepare_data(digits_arrays, tmp_path / "d", num_shards=2, validation=0.0)
    result = cerebro.Experiment(
        builders.mlp,
        ds,
        cerebro.GridSearch({"lr": cerebro.choice([0.01, 0.001])}),
        epochs=1,
        metric="train_loss",
        mode="min",
        backend=cerebro.LocalBackend(workers=2),
        path=tmp_path / "run",
        progress=False,
    ).run()
    assert set(result.hops.kind) == {"train"}
    assert "val_loss" not in result.history.columns
    assert np.isfinite(result.best.metrics["train_loss"])
