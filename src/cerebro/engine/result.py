"""What an experiment returns: every model, its history, every hop, and the best model."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import pandas as pd
import torch

from .. import files, training
from ..errors import ConfigError, first_line, is_number
from ..formatting import format_metric
from ..history import last_metrics, ranking_key
from ..kinds import ModelStatus
from ..store import RecordStore, place
from ..store.checkpoints import state_path
from ..store.records import reading
from .groups import PerGroup


@dataclass(frozen=True)
class ModelRecord:
    """One configuration and how it went.

    Attributes:
        id: the model's id within the experiment.
        params: its hyper-parameters.
        status: "completed", "failed" (see ``error``), "running", "paused" (waiting for the
            search, e.g. at an ASHA rung), "stopped" (by a person) or "pruned" (by the search
            or early stopping).
        metrics: metrics of its last recorded epoch (e.g. ``{"val_accuracy": 0.97, ...}``).
        history: metrics of every epoch, oldest first (each dict has an "epoch" key).
        error: the traceback of a failed model.
        origin: "search", or "add"/"clone" for models a person added.
        parent: the source of a clone.
        group: with ``Experiment(per_group=True)``, the group whose shards it trained on.
        configuration: with ``per_group=True``, the configuration it is one of (0, 1, ...).
    """

    id: int
    params: dict[str, Any]
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None
    origin: str = "search"
    parent: int | None = None
    group: Any = None
    configuration: int | None = None


class Result:
    """The records of one experiment, read from its store.

    Example:
        >>> result = exp.run()                              # doctest: +SKIP
        >>> result.best.params, result.best.metrics         # doctest: +SKIP
        >>> result.history.head()                           # doctest: +SKIP
        >>> model = result.load_model()                     # doctest: +SKIP
    """

    def __init__(
        self,
        store: RecordStore,
        metric: str,
        mode: str,
        checkpoint_dir: str,
        build: Callable[[dict[str, Any]], Any] | None,
    ) -> None:
        self.metric = metric
        self.mode = mode
        self.checkpoint_dir = checkpoint_dir
        self._build = build
        self._build_path: str | None = None  # read on first use by load_model
        self._store = store
        records = store.snapshot()
        self.experiment: dict[str, Any] = records.experiment
        """The experiment's record: name, status ("running", "completed", "interrupted"), config."""
        epochs_by_model: dict[int, list[dict[str, float]]] = {}
        for row in records.epochs:
            epochs_by_model.setdefault(row["model_id"], []).append(
                {"epoch": row["epoch"], **row["metrics"]}
            )
        groups = PerGroup.recorded(records.events)
        self.models: list[ModelRecord] = [
            ModelRecord(
                id=row["model_id"],
                params=row["params"],
                status=row["status"],
                metrics=last_metrics(epochs_by_model.get(row["model_id"], [])),
                history=epochs_by_model.get(row["model_id"], []),
                error=row["error"],
                origin=row["origin"] or "search",
                parent=row["parent"],
                group=groups.get(row["model_id"], (None, None))[0],
                configuration=groups.get(row["model_id"], (None, None))[1],
            )
            for row in records.models
        ]
        self.controls: list[dict[str, Any]] = records.controls
        """Requests people made (stop, resume, clone, add, set_epochs): who, when, outcome."""
        self.events: list[dict[str, Any]] = records.events
        """Run-level events, oldest first: e.g. ``{"kind": "worker_lost", "detail": {...}}``."""
        self.hops: pd.DataFrame = records.hops
        """Every unit run: model_id, epoch, kind ("train"/"eval"), shard, worker, start, end
        (seconds since the experiment started), rows, load_s, save_s, metrics, unit (the id of
        the unit that ran it; missing in records from before units had ids)."""

    @property
    def grouped(self) -> bool:
        """Whether the experiment trained one model per group (``per_group=True``)."""
        return any(m.group is not None for m in self.models)

    def _group_columns(self, m: ModelRecord) -> dict[str, Any]:
        return {"group": m.group, "configuration": m.configuration} if self.grouped else {}

    @property
    def history(self) -> pd.DataFrame:
        """One row per (model, epoch): model_id, epoch, train_loss, val_loss, train_<m>, val_<m>;
        with ``per_group=True`` also ``group`` and ``configuration`` after ``model_id``."""
        rows = [
            {"model_id": m.id, **self._group_columns(m), **h}
            for m in self.models
            for h in m.history
        ]
        frame = pd.DataFrame(rows)
        if frame.empty:
            return pd.DataFrame(columns=["model_id", "epoch"])
        return frame.sort_values(["model_id", "epoch"], ignore_index=True)

    def ranked(self) -> list[ModelRecord]:
        """Models that reported ``metric``, best first (completed models before the others)."""
        scored = [m for m in self.models if is_number(m.metrics.get(self.metric))]
        rank = ranking_key(self.mode)
        return sorted(
            scored,
            key=lambda m: (m.status != ModelStatus.COMPLETED, rank(m.metrics[self.metric]), m.id),
        )

    @property
    def best(self) -> ModelRecord | None:
        """The completed model with the best last-epoch ``metric`` (None if no model completed)."""
        ranked = [m for m in self.ranked() if m.status == ModelStatus.COMPLETED]
        return ranked[0] if ranked else None

    @property
    def best_by_group(self) -> dict[Any, ModelRecord]:
        """With ``per_group=True``: each group's completed model with the best last-epoch
        ``metric`` (ties: the lower id), by group in the dataset's order; a group none of whose
        models completed with the metric is left out. Empty for an experiment without groups.

        Example:
            >>> for group, model in result.best_by_group.items():     # doctest: +SKIP
            ...     print(group, model.id, model.params, model.metrics["val_accuracy"])
        """
        best: dict[Any, ModelRecord] = {}
        for model in self.ranked():  # best first
            if model.group is not None and model.status == ModelStatus.COMPLETED:
                best.setdefault(model.group, model)
        order = {g: i for i, g in enumerate(dict.fromkeys(m.group for m in self.models))}
        return dict(sorted(best.items(), key=lambda item: order[item[0]]))

    @property
    def fused_models(self) -> frozenset[int]:
        """Ids of the models that trained in a fused unit (one ``unit`` in :attr:`hops`
        shared with another model)."""
        hops = self.hops.dropna(subset=["unit"])
        sizes = hops.groupby("unit")["model_id"].transform("nunique")
        return frozenset(int(i) for i in hops.model_id[sizes > 1])

    @property
    def materialized(self) -> pd.DataFrame:
        """Frozen-prefix outputs the run computed and kept (``Experiment(materialize=...)``),
        one row per prefix cut and shard: ``prefix`` (the digest the features are kept under),
        ``cut`` (depth), ``split``, ``shard``, ``shard_digest``, ``rows``, ``bytes``,
        ``seconds`` and ``worker``. Features found already kept (by an earlier run, or for
        the same shard content in an earlier dataset version) have no row."""
        columns = ["prefix", "cut", "split", "shard", "shard_digest", "rows", "bytes", "seconds",
                   "worker"]  # fmt: skip
        rows = [
            {
                "prefix": d["features"],
                "cut": d["depth"],
                "split": d["split"],
                "shard": d["shard"],
                "shard_digest": d["shard_digest"],
                "rows": d["rows"],
                "bytes": d["nbytes"],
                "seconds": d["seconds"],
                "worker": d["worker"],
            }  # fmt: skip
            for d in (e["detail"] for e in self.events if e["kind"] == "materialized")
        ]
        return pd.DataFrame(rows, columns=columns)

    def leaderboard(self) -> pd.DataFrame:
        """A table of every model: id, status, params and last-epoch metrics, best first
        (and ``fused``: whether it trained in a fused unit, when any model did; ``group`` and
        ``configuration`` with ``per_group=True``)."""
        ranked_ids = [m.id for m in self.ranked()]
        order = ranked_ids + [m.id for m in self.models if m.id not in ranked_ids]
        by_id = {m.id: m for m in self.models}
        fused = self.fused_models
        rows = [
            {
                "model_id": i,
                **self._group_columns(by_id[i]),
                "status": by_id[i].status,
                **({"fused": i in fused} if fused else {}),
                **by_id[i].params,
                **by_id[i].metrics,
            }
            for i in order
        ]
        return pd.DataFrame(rows)

    def model(self, model_id: int) -> ModelRecord:
        for m in self.models:
            if m.id == model_id:
                return m
        raise ConfigError("model_id", model_id, f"one of {[m.id for m in self.models]}")

    def load_model(self, model_id: int | None = None) -> torch.nn.Module:
        """The trained model as a plain ``nn.Module`` on CPU (the best one by default); a model
        with a frozen prefix comes back as ``nn.Sequential(frozen, model)``."""
        if model_id is None:
            if self.best is None:
                raise ConfigError("model_id", None, "an explicit id: no model completed")
            model_id = self.best.id
        record = self.model(model_id)
        build = self._build or self._load_build()
        path = state_path(self.checkpoint_dir, record.id)
        if not files.exists(path):
            raise ConfigError("model_id", model_id, "a model with a saved state", hint=path)
        spec = training.build_spec(build, record.params, init_seed=None)
        spec.model.load_state_dict(training.load_state(path)["model"])
        # A frozen prefix never trained: build gives its weights, and it runs first.
        model = spec.model if spec.frozen is None else torch.nn.Sequential(spec.frozen, spec.model)
        model.eval()
        return model

    def _load_build(self) -> Callable[[dict[str, Any]], Any]:
        if not self._build_path or not os.path.isfile(self._build_path):
            raise ConfigError("build", None, "the experiment's build function to rebuild the model")
        try:
            with open(self._build_path, "rb") as f:
                self._build = cloudpickle.load(f)
        except Exception as e:
            raise ConfigError(
                "build",
                self._build_path,
                "a build function this process can load",
                hint=f"{first_line(e)}; run where the experiment's own modules import",
            ) from e
        return self._build

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for m in self.models:
            counts[m.status] = counts.get(m.status, 0) + 1
        best = self.best
        shown = (
            f"{self.metric}={format_metric(best.metrics[self.metric])} (model {best.id})"
            if best
            else "none"
        )
        return f"Result(models={counts}, best {shown})"


BUILD_FILE = "build.pkl"


def load(path_or_url: str | os.PathLike, experiment: str | int | None = None) -> Result:
    """The records of an experiment, finished or still running, from any process.

    Args:
        path_or_url: the experiment's ``path`` (its folder holds ``cerebro.db``) or the
            SQLAlchemy URL of its database.
        experiment: name or id of the experiment in that database (default: the newest).

    Example:
        >>> result = cerebro.load("runs/demo")            # doctest: +SKIP
        >>> result.history.tail()                          # doctest: +SKIP
        >>> model = result.load_model()                    # doctest: +SKIP
    """
    store, row = RecordStore.find(path_or_url, experiment)
    config = row["config"]
    with reading(path_or_url):
        result = Result(store, config["metric"], config["mode"], config["checkpoint_dir"], None)
    result._build_path = os.path.join(config.get("path", ""), BUILD_FILE)
    # A driver killed with SIGKILL could not record its end: say what happened to it.
    folder = place.experiment_folder(path_or_url, row)
    result.experiment["status"] = place.live_status(result.experiment["status"], folder)
    return result
