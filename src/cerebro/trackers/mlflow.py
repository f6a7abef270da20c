"""MLflow runs of an experiment: one parent run, one nested run per model.

Each model's run gets its params once (when it first reports), every epoch's metrics with
``step=epoch``, its status as the tag ``cerebro.status`` when it ends (completed, pruned,
stopped, failed), and the MLflow run status FINISHED, KILLED or FAILED. At the end of the run,
the best model's weights go to the parent run as the artifact ``best_model/model-<id>.pt``
(``torch.load`` gives its ``state_dict``).

A resumed experiment continues the same MLflow runs: the parent and each model's run are found
again by the tags ``cerebro.key`` (the experiment's path, id in the records and creation time)
and ``cerebro.model_id``, and epochs already logged are not logged again.

Example:
    >>> exp = cerebro.Experiment(build, ds, search, epochs=5, path="runs/demo",
    ...     trackers=[cerebro.MLflowTracker(tracking_uri="sqlite:///mlflow.db")])  # doctest: +SKIP
    >>> exp.run()                                                                 # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import math
import os
import tempfile
import time
from typing import Any

from ..errors import ConfigError
from ..kinds import ModelStatus
from .base import RunInfo, Tracker

_RUN_STATUS = {
    ModelStatus.COMPLETED: "FINISHED",
    ModelStatus.FAILED: "FAILED",
    ModelStatus.STOPPED: "KILLED",
    ModelStatus.PRUNED: "KILLED",
}
KEY_TAG = "cerebro.key"
KIND_TAG = "cerebro.kind"
MODEL_TAG = "cerebro.model_id"
STATUS_TAG = "cerebro.status"


def available() -> bool:
    return importlib.util.find_spec("mlflow") is not None


class MLflowTracker(Tracker):
    """Logs a run to MLflow (needs ``pip install cerebro[mlflow]``).

    Args:
        tracking_uri: the MLflow tracking server or store, e.g. ``"http://localhost:5000"`` or
            ``"sqlite:///mlflow.db"`` (default: MLflow's own, ``MLFLOW_TRACKING_URI`` or
            ``./mlruns``).
        experiment_name: the MLflow experiment (default: the Cerebro experiment's name);
            made if it does not exist.
        artifact_location: where a new MLflow experiment keeps artifacts (default MLflow's).
        log_best_model: log the best model's weights as an artifact of the parent run.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        artifact_location: str | None = None,
        log_best_model: bool = True,
    ) -> None:
        if not available():
            raise ConfigError(
                "trackers",
                "MLflowTracker()",
                "the mlflow package",
                hint="pip install cerebro[mlflow]",
            )
        for argument, value in (
            ("tracking_uri", tracking_uri),
            ("experiment_name", experiment_name),
            ("artifact_location", artifact_location),
        ):
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(argument, value, "a non-empty string or None")
        if not isinstance(log_best_model, bool):
            raise ConfigError("log_best_model", log_best_model, "True or False")
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.artifact_location = artifact_location
        self.log_best_model = log_best_model
        self._info: RunInfo | None = None
        self._client: Any = None
        self.parent_run_id: str | None = None
        self._runs: dict[int, str] = {}  # model id -> MLflow run id
        self._logged: dict[int, int] = {}  # model id -> last epoch logged
        self._ended: set[int] = set()

    # Events -------------------------------------------------------------------------------

    def attach(self, info: RunInfo) -> None:
        self._info = info

    def run_started(self) -> None:
        self._open()

    def epoch_ended(self, model_id: int, epoch: int, metrics: dict[str, float]) -> None:
        if not self._open():
            return
        run = self._model_run(model_id)
        if model_id in self._ended:  # a person resumed it or gave it more epochs
            self._client.update_run(run, status="RUNNING")
            self._ended.discard(model_id)
        self._log_epoch(model_id, run, epoch, metrics)

    def model_ended(
        self,
        model_id: int,
        status: ModelStatus,
        params: dict[str, Any],
        history: list[dict[str, float]],
    ) -> None:
        if not self._open():
            return
        run = self._model_run(model_id, params)
        for row in history:  # epochs it had not reported (none, normally)
            self._log_epoch(model_id, run, int(row["epoch"]), row)
        status = ModelStatus(status)
        self._client.set_tag(run, STATUS_TAG, status.value)
        if status in _RUN_STATUS:
            self._client.set_terminated(run, _RUN_STATUS[status])
            self._ended.add(model_id)

    def run_finished(self) -> None:
        if self._client is None or self._info is None or self.parent_run_id is None:
            return
        models = self._info.store.models()
        finished = all(not ModelStatus(m["status"]).is_live for m in models)
        if finished and self.log_best_model:
            self._log_best()
        self._client.set_terminated(self.parent_run_id, "FINISHED" if finished else "KILLED")

    # MLflow -------------------------------------------------------------------------------

    def _open(self) -> bool:
        """Find or make the parent run and the models' runs (once); False without a run."""
        if self._client is not None:
            return True
        if self._info is None:
            return False
        from mlflow import MlflowClient

        info = self._info
        self._client = client = MlflowClient(self.tracking_uri)
        name = self.experiment_name or info.name
        experiment = client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(name, artifact_location=self.artifact_location)
        )
        self._experiment_id = experiment_id
        self._key = f"{os.path.abspath(info.path)}#{info.experiment_id}@{info.created:.6f}"
        mine = f"tags.`{KEY_TAG}` = '{_quoted(self._key)}'"
        found = client.search_runs([experiment_id], f"{mine} and tags.`{KIND_TAG}` = 'experiment'")
        if found:
            self.parent_run_id = found[0].info.run_id
            client.update_run(self.parent_run_id, status="RUNNING")
        else:
            parent = client.create_run(
                experiment_id,
                run_name=info.name,
                tags={KEY_TAG: self._key, KIND_TAG: "experiment", "cerebro.path": info.path},
            )
            self.parent_run_id = parent.info.run_id
            client.log_batch(
                self.parent_run_id,
                params=_params({"metric": info.metric, "mode": info.mode, "epochs": info.epochs}),
            )
        for run in _all_runs(client, experiment_id, f"{mine} and tags.`{KIND_TAG}` = 'model'"):
            model_id = int(run.data.tags[MODEL_TAG])
            self._runs[model_id] = run.info.run_id
            steps = [m.step for m in client.get_metric_history(run.info.run_id, info.metric)]
            self._logged[model_id] = max(steps, default=-1)
            if run.info.status != "RUNNING":
                self._ended.add(model_id)
        return True

    def _model_run(self, model_id: int, params: dict[str, Any] | None = None) -> str:
        run = self._runs.get(model_id)
        if run is not None:
            return run
        assert self._info is not None and self.parent_run_id is not None
        row = next((m for m in self._info.store.models() if m["model_id"] == model_id), None)
        tags = {
            KEY_TAG: self._key,
            KIND_TAG: "model",
            MODEL_TAG: str(model_id),
            "mlflow.parentRunId": self.parent_run_id,
        }
        if row is not None:
            params = row["params"] if params is None else params
            tags["cerebro.origin"] = row["origin"] or "search"
            if row["parent"] is not None:
                tags["cerebro.parent"] = str(row["parent"])
        created = self._client.create_run(
            self._experiment_id, run_name=f"model-{model_id}", tags=tags
        )
        run = created.info.run_id
        self._client.log_batch(run, params=_params(params or {}))
        self._runs[model_id] = run
        self._logged[model_id] = -1
        return run

    def _log_epoch(self, model_id: int, run: str, epoch: int, metrics: dict[str, Any]) -> None:
        if epoch <= self._logged.get(model_id, -1):
            return  # logged before (a resumed run reports nothing twice)
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [
            Metric(k, float(v), now, epoch)
            for k, v in metrics.items()
            if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v)
        ]
        if values:
            self._client.log_batch(run, metrics=values)
        self._logged[model_id] = epoch

    def _log_best(self) -> None:
        import torch

        from .. import training
        from ..engine.result import Result
        from ..store.checkpoints import state_path

        info = self._info
        assert info is not None and self.parent_run_id is not None
        best = Result(info.store, info.metric, info.mode, info.checkpoint_dir, None).best
        if best is None:
            return
        state = training.load_state(state_path(info.checkpoint_dir, best.id))
        with tempfile.TemporaryDirectory() as folder:
            file = os.path.join(folder, f"model-{best.id}.pt")
            torch.save(state["model"], file)
            self._client.log_artifact(self.parent_run_id, file, "best_model")
        self._client.set_tag(self.parent_run_id, "cerebro.best_model", str(best.id))


def _params(params: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(str(k), str(v)[:6000]) for k, v in params.items()]


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _all_runs(client: Any, experiment_id: str, where: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], where, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs
