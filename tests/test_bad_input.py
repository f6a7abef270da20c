"""Bad input raises ConfigError (a ValueError) naming the argument, the value and what is
accepted, before any training starts."""

from __future__ import annotations

import os

import builders
import numpy as np
import pandas as pd
import pytest

import cerebro


def _raises(argument: str, value: str, call, *args, **kwargs) -> cerebro.ConfigError:
    with pytest.raises(cerebro.ConfigError) as info:
        call(*args, **kwargs)
    error = info.value
    assert isinstance(error, ValueError)
    message = str(error)
    assert message.startswith(argument), message
    assert value in message, message
    assert "expected" in message, message
    return error


@pytest.fixture
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {"a": rng.normal(size=20), "b": rng.normal(size=20), "y": np.arange(20) % 2}
    )


def test_prepare_data_rejects_bad_columns_and_sizes(frame, tmp_path):
    out = tmp_path / "d"
    _raises(
        "features", "'nope'", cerebro.prepare_data, frame, out, label="y", features=["a", "nope"]
    )
    _raises("label", "'missing'", cerebro.prepare_data, frame, out, label="missing")
    _raises("source", "0 rows", cerebro.prepare_data, frame.iloc[:0], out, label="y")
    _raises("num_shards", "0", cerebro.prepare_data, frame, out, label="y", num_shards=0)
    _raises("num_shards", "17", cerebro.prepare_data, frame, out, label="y", num_shards=17)
    _raises("validation", "1.0", cerebro.prepare_data, frame, out, label="y", validation=1.0)
    _raises("validation", "-0.1", cerebro.prepare_data, frame, out, label="y", validation=-0.1)
    _raises("source", "42", cerebro.prepare_data, 42, out)
    _raises("source", "nothing.csv", cerebro.prepare_data, str(tmp_path / "nothing.csv"), out)
    _raises("features", "'y'", cerebro.prepare_data, frame, out, label="y", features=["a", "y"])
    assert not out.exists()  # nothing was written


def test_prepare_data_refuses_to_overwrite_by_default(frame, tmp_path):
    cerebro.prepare_data(frame, tmp_path / "d", label="y", num_shards=2)
    _raises("path", "d", cerebro.prepare_data, frame, tmp_path / "d", label="y")
    cerebro.prepare_data(frame, tmp_path / "d", label="y", num_shards=2, overwrite=True)


def test_search_spaces():
    _raises("space['lr']", "LogUniform", cerebro.GridSearch, {"lr": cerebro.loguniform(1e-4, 1e-1)})
    _raises("choice(values)", "[]", cerebro.choice, [])
    _raises("space['bs']", "[32, 64]", cerebro.GridSearch, {"bs": [32, 64]})
    _raises("space", "{}", cerebro.RandomSearch, {}, num_models=2)
    _raises("num_models", "0", cerebro.RandomSearch, {"lr": 0.1}, num_models=0)
    _raises("loguniform(low)", "0", cerebro.loguniform, 0, 1)
    _raises("uniform(high)", "0", cerebro.uniform, 1, 0)
    _raises("randint(low)", "0.5", cerebro.randint, 0.5, 3)
    _raises("quniform(q)", "0", cerebro.quniform, 0, 1, 0)


def _experiment(dataset, tmp_path, **overrides):
    kwargs = dict(
        build=builders.mlp,
        dataset=dataset,
        search=cerebro.GridSearch({"lr": 0.01}),
        epochs=1,
        metric="val_accuracy",
        mode="max",
        backend=cerebro.LocalBackend(workers=1),
        path=tmp_path / "run",
        progress=False,
    )
    kwargs.update(overrides)
    return cerebro.Experiment(**kwargs)


def test_experiment_arguments(digits, tmp_path):
    _raises("mode", "'maximize'", _experiment, digits, tmp_path, mode="maximize")
    _raises("epochs", "0", _experiment, digits, tmp_path, epochs=0)
    _raises("workers", "0", cerebro.LocalBackend, workers=0)
    _raises("workers", "5", _experiment, digits, tmp_path, backend=cerebro.LocalBackend(workers=5))
    _raises("search", "{'lr': 0.01}", _experiment, digits, tmp_path, search={"lr": 0.01})
    _raises("metric", "'accuracy'", _experiment, digits, tmp_path, metric="accuracy")
    _raises("devices", "'tpu:0'", cerebro.LocalBackend, workers=1, devices=["tpu:0"])


def test_metric_not_produced_by_the_spec_fails_before_anything_is_written(digits, tmp_path):
    exp = _experiment(digits, tmp_path, metric="val_f1")
    error = _raises("metric", "'val_f1'", exp.run)
    assert "val_accuracy" in error.accepted  # lists what the spec does produce
    assert not os.path.exists(tmp_path / "run" / "cerebro.db")


def test_build_that_returns_no_model_spec_fails_before_training(digits, tmp_path):
    exp = _experiment(digits, tmp_path, build=builders.not_a_spec)
    _raises("build", "not_a_spec", exp.run)
    assert not os.path.exists(tmp_path / "run" / "cerebro.db")


def test_model_spec_checks_its_fields():
    import torch

    model = torch.nn.Linear(2, 2)
    other = torch.nn.Linear(2, 2)
    good = dict(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss=torch.nn.MSELoss(),
        batch_size=8,
    )
    _raises("ModelSpec.batch_size", "0", cerebro.ModelSpec, **{**good, "batch_size": 0})
    _raises("ModelSpec.model", "'m'", cerebro.ModelSpec, **{**good, "model": "m"})
    _raises(
        "ModelSpec.optimizer",
        "SGD",
        cerebro.ModelSpec,
        **{**good, "optimizer": torch.optim.SGD(other.parameters(), lr=0.1)},
    )
    _raises(
        "ModelSpec.metrics key",
        "'loss'",
        cerebro.ModelSpec,
        **{**good, "metrics": {"loss": cerebro.metrics.mse}},
    )
