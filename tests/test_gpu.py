"""The end-to-end run on a CUDA device (skipped where there is none, as on CI)."""

from __future__ import annotations

import builders
import pytest
import torch
from test_experiment import _check_hop_invariants

import cerebro

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_end_to_end_on_gpu_workers(digits, tmp_path):
    space = {
        "lr": cerebro.choice([0.003, 0.03]),
        "width": cerebro.choice([32, 64]),
        "batch_size": cerebro.choice([32, 64]),
    }
    result = cerebro.Experiment(
        builders.mlp,
        digits,
        cerebro.GridSearch(space),
        epochs=3,
        metric="val_accuracy",
        mode="max",
        backend=cerebro.LocalBackend(workers=2, devices=["cuda:0"]),
        path=tmp_path / "run",
        progress=False,
    ).run()
    assert {m.status for m in result.models} == {"completed"}
    _check_hop_invariants(result.hops, digits.num_shards, digits.num_shards)
    assert result.best.metrics["val_accuracy"] > 0.8
    model = result.load_model()
    assert next(model.parameters()).device.type == "cpu"
