"""TensorBoard logs: per-model scalars equal the recorded history; HParams are written."""

from __future__ import annotations

import os

import builders
import pytest

import cerebro

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def test_scalars_and_hparams_per_model(digits, tmp_path):
    result = cerebro.Experiment(
        builders.mlp,
        digits,
        cerebro.GridSearch({"lr": cerebro.choice([0.01, 0.03])}),
        epochs=2,
        metric="val_accuracy",
        mode="max",
        backend=cerebro.LocalBackend(workers=2),
        path=tmp_path / "run",
        progress=False,
        tensorboard=True,
    ).run()
    logdir = tmp_path / "run" / "tensorboard"
    assert sorted(os.listdir(logdir)) == ["model-00000", "model-00001"]
    for model in result.models:
        events = EventAccumulator(str(logdir / f"model-{model.id:05d}"))
        events.Reload()
        tags = events.Tags()["scalars"]
        for column in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
            split, _, metric = column.partition("_")
            logged = [s.value for s in events.Scalars(f"{metric}/{split}")]
            expected = [h[column] for h in model.history]
            assert logged == pytest.approx(expected, rel=1e-6), column
        assert "hparam/val_accuracy" in tags
        assert events.PluginTagToContent("hparams"), "no HParams record"


def test_tensorboard_can_be_turned_off(digits, tmp_path):
    cerebro.Experiment(
        builders.mlp,
        digits,
        cerebro.GridSearch({"lr": 0.01}),
        metric="val_accuracy",
        mode="max",
        path=tmp_path / "run",
        progress=False,
        tensorboard=False,
    ).run()
    assert not (tmp_path / "run" / "tensorboard").exists()
