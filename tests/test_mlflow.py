"""MLflowTracker against a real local SQLite tracking store, read back with MlflowClient: one
parent run and one nested run per model, params, metric histories with step=epoch, status
tags, the best model's weights, and no duplicates when the experiment is resumed."""

from __future__ import annotations

import os
import socket

import builders
import pytest
import torch

import cerebro

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402


def _experiment(digits, path, tracker, **overrides):
    options = dict(
        search=cerebro.GridSearch({"lr": cerebro.choice([0.01, 0.03])}),
        epochs=2,
        metric="val_accuracy",
        mode="max",
        backend=cerebro.LocalBackend(workers=2),
        path=path,
        progress=False,
        tensorboard=False,
        trackers=[tracker],
    )
    options.update(overrides)
    return cerebro.Experiment(builders.mlp, digits, **options)


def test_runs_metrics_tags_and_a_resume_without_duplicates(digits, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = lambda: cerebro.MLflowTracker(  # noqa: E731
        tracking_uri=uri, experiment_name="digits", artifact_location=str(tmp_path / "artifacts")
    )
    path = tmp_path / "run"
    first = _experiment(digits, path, tracker()).run()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("digits")

    def runs(kind):
        found = client.search_runs(
            [experiment.experiment_id], f"tags.`cerebro.kind` = '{kind}'", max_results=100
        )
        return {r.data.tags.get("cerebro.model_id", "parent"): r for r in found}

    [parent] = runs("experiment").values()
    models = runs("model")
    assert sorted(models) == ["0", "1"]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "run"
    for record in first.models:
        run = models[str(record.id)]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params == {"lr": str(record.params["lr"])}
        assert run.data.tags["cerebro.status"] == "completed" and run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [0, 1]
        assert [m.value for m in history] == pytest.approx(
            [h["val_accuracy"] for h in record.history]
        )
    # The best model's weights, as a state_dict, on the parent run.
    best = first.best.id
    assert parent.data.tags["cerebro.best_model"] == str(best)
    [artifact] = client.list_artifacts(parent.info.run_id, "best_model")
    local = client.download_artifacts(parent.info.run_id, artifact.path, str(tmp_path / "dl"))
    weights = torch.load(local)
    expected = first.load_model(best).state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in weights)

    # Resumed: a person gives model 0 a third epoch; the rerun continues the same runs.
    cerebro.control(path).set_epochs(0, 3)
    second = _experiment(digits, path, tracker()).run()
    assert len(second.model(0).history) == 3
    assert list(runs("experiment")) == ["parent"]  # no second parent run
    again = runs("model")
    assert sorted(again) == ["0", "1"]  # no duplicate model runs
    assert {r.info.run_id for r in again.values()} == {r.info.run_id for r in models.values()}
    steps = [m.step for m in client.get_metric_history(again["0"].info.run_id, "val_accuracy")]
    assert steps == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(again["1"].info.run_id, "val_loss")] == [0, 1]
    assert again["0"].info.status == "FINISHED"
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert os.path.isdir(tmp_path / "artifacts")  # the artifact_location given


def test_bad_tracker_arguments_are_refused_before_work(digits, tmp_path):
    with pytest.raises(cerebro.ConfigError, match="trackers=.*put the tracker in a list"):
        _experiment(
            digits, tmp_path / "a", cerebro.MLflowTracker(), trackers=cerebro.MLflowTracker()
        )
    with pytest.raises(cerebro.ConfigError, match="item 0 is the class MLflowTracker"):
        _experiment(digits, tmp_path / "a", None, trackers=[cerebro.MLflowTracker])
    with pytest.raises(cerebro.ConfigError, match="item 1 is a str"):
        _experiment(digits, tmp_path / "a", None, trackers=[cerebro.MLflowTracker(), "mlflow"])
    with pytest.raises(cerebro.ConfigError, match="tracking_uri=3 is not accepted"):
        cerebro.MLflowTracker(tracking_uri=3)
    with pytest.raises(cerebro.ConfigError, match="dashboard='yes' is not accepted"):
        _experiment(digits, tmp_path / "a", cerebro.MLflowTracker(), dashboard="yes")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(cerebro.ConfigError, match=f"port={port} is not accepted"):
            _experiment(digits, tmp_path / "a", cerebro.MLflowTracker(), dashboard=port)
    assert not (tmp_path / "a").exists()
