"""Control of a running (or finished) experiment from another process: stop, resume, clone,
add models and change their epoch budget.

A request is checked here against the records (model ids, statuses, the search space) and
queued in the records' ``controls`` table with who asked and when; the experiment's driver
applies it at the model's next hop boundary and records the outcome. Nothing is changed by a
request that fails its checks. A request made while no driver runs waits for the next
``Experiment.run()`` or ``cerebro resume <path>`` on the same path.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..errors import CerebroError, ConfigError, check_bool, is_int
from ..kinds import ControlOp, ControlState, ModelStatus
from ..space import Dimension, LogUniform, QUniform, RandInt, Uniform, space_from_description
from ..store import RecordStore, place
from ..store.records import reading
from .requests import (
    check_epochs_option,
    check_model_id,
    check_new_budget,
    check_resumable,
    check_stoppable,
)


class ControlRejected(CerebroError):
    """The experiment's driver refused a request (e.g. the model completed before it applied)."""


@dataclass(frozen=True)
class ControlRequest:
    """A queued request. :meth:`wait` blocks until the driver has applied or rejected it."""

    id: int
    op: ControlOp
    model_id: int | None
    _store: RecordStore

    def status(self) -> dict[str, Any]:
        """The request's row: state ("pending", "applied", "rejected"), outcome, error, ..."""
        return self._store.controls(control_id=self.id)[0]

    def wait(self, timeout: float = 60.0, poll: float = 0.1) -> dict[str, Any]:
        """Wait until the driver settles the request; returns its outcome (for ``add`` and
        ``clone``: ``{"model_id": new_id, ...}``).

        Raises:
            ControlRejected: the driver refused it (the message says why).
            TimeoutError: still pending after ``timeout`` seconds (e.g. no driver is running).
        """
        deadline = time.monotonic() + timeout
        while True:
            row = self.status()
            if row["state"] == ControlState.APPLIED:
                return row["outcome"] or {}
            if row["state"] == ControlState.REJECTED:
                raise ControlRejected(f"control #{self.id} ({self.op}) rejected: {row['error']}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"control #{self.id} ({self.op}) still pending after {timeout:g} s; it is "
                    "applied when the experiment runs (cerebro resume <path>)"
                )
            time.sleep(poll)


class Controller:
    """Requests to one experiment. Get one with :func:`cerebro.control`.

    Example:
        >>> ctl = cerebro.control("runs/demo")                        # doctest: +SKIP
        >>> ctl.stop(3)                                               # doctest: +SKIP
        >>> new = ctl.clone(1, params={"lr": 0.001}).wait()["model_id"]  # doctest: +SKIP
        >>> ctl.add({"lr": 0.01, "batch_size": 64, "width": 64})       # doctest: +SKIP
    """

    def __init__(self, store: RecordStore, path: str | None, who: str | None = None) -> None:
        self._store = store
        self.path = path
        self.who = who or f"{getpass.getuser()}@{socket.gethostname()} (pid {os.getpid()})"
        config = store.experiment()["config"]
        described = config.get("space")
        self.space: dict[str, Dimension] | None = (
            space_from_description(described) if described else None
        )
        self.epochs: int = config["epochs"]
        self.metric: str = config["metric"]

    # Reading ---------------------------------------------------------------------------------

    def models(self) -> pd.DataFrame:
        """One row per model: id, status, origin, parent, epochs done, budget, the ranking
        metric's last value, params; and ``group`` when the experiment trains one model per
        group (``per_group=True``)."""
        from .groups import PerGroup

        records = self._store.snapshot()
        groups = PerGroup.recorded(records.events)
        done: dict[int, int] = {}
        last: dict[int, float | None] = {}
        for row in records.epochs:
            done[row["model_id"]] = done.get(row["model_id"], 0) + 1
            last[row["model_id"]] = row["metrics"].get(self.metric)
        rows = [
            {
                "model_id": m["model_id"],
                "status": m["status"],
                "origin": m["origin"],
                "parent": m["parent"],
                "epochs_done": done.get(m["model_id"], 0),
                "max_epochs": m["max_epochs"] or self.epochs,
                self.metric: last.get(m["model_id"]),
                "params": m["params"],
                **({"group": groups.get(m["model_id"], (None,))[0]} if groups else {}),
            }
            for m in records.models
        ]
        return pd.DataFrame(rows)

    def requests(self) -> list[dict[str, Any]]:
        """Every request made to this experiment, oldest first, with its state and outcome."""
        return self._store.controls()

    @property
    def is_running(self) -> bool | None:
        """Whether a driver is running the experiment now (None if that cannot be told: records
        in a database server without the experiment's folder)."""
        return place.driver_running(self.path)

    @property
    def status(self) -> str:
        """The experiment's status: "running", "completed" or "interrupted" (also when the
        records say running but no driver holds the experiment: it was killed)."""
        return place.live_status(self._store.experiment()["status"], self.path)

    # Requests --------------------------------------------------------------------------------

    def stop(self, model_id: int) -> ControlRequest:
        """Stop a running or paused model after its current hop; its state is kept."""
        model = self._model(model_id)
        check_stoppable(model_id, ModelStatus(model["status"]))
        return self._request(ControlOp.STOP, model_id)

    def resume(self, model_id: int) -> ControlRequest:
        """Let a stopped (or pruned) model train on from where it stopped."""
        model = self._model(model_id)
        stopping = any(
            r["op"] == ControlOp.STOP
            and r["model_id"] == model_id
            and r["state"] == ControlState.PENDING
            for r in self.requests()
        )
        if not stopping:
            check_resumable(model_id, ModelStatus(model["status"]))
        return self._request(ControlOp.RESUME, model_id)

    def set_epochs(self, model_id: int, epochs: int) -> ControlRequest:
        """Change one model's epoch budget (a completed model given more epochs trains on)."""
        model = self._model(model_id)
        done = sum(row["model_id"] == model_id for row in self._store.epochs())
        epochs = check_new_budget(model_id, ModelStatus(model["status"]), epochs, max(done, 1))
        return self._request(ControlOp.SET_EPOCHS, model_id, options={"epochs": epochs})

    def clone(
        self,
        model_id: int,
        params: Mapping[str, Any] | None = None,
        warm_start: bool = True,
        epochs: int | None = None,
        force: bool = False,
    ) -> ControlRequest:
        """A new model with the source's params updated by ``params``.

        With ``warm_start`` (default) it starts from the source's exact training state after
        its last hop (weights, optimizer state, LR-scheduler position, RNG) under the new
        hyper-parameters; otherwise from a fresh initialization. ``force`` allows parameters
        outside the search space (recorded as forced).
        """
        self._model(model_id)
        check_bool("warm_start", warm_start)
        changes = self._check_params(dict(params or {}), force, complete=False)
        options = {"warm_start": warm_start, "epochs": check_epochs_option(epochs), "force": force}
        return self._request(ControlOp.CLONE, model_id, changes, options)

    def add(
        self, params: Mapping[str, Any], epochs: int | None = None, force: bool = False
    ) -> ControlRequest:
        """A new model with these params (every parameter of the space), trained from scratch
        for ``epochs`` (default: the experiment's)."""
        checked = self._check_params(dict(params), force, complete=True)
        return self._request(
            ControlOp.ADD, None, checked, {"epochs": check_epochs_option(epochs), "force": force}
        )

    def _request(
        self,
        op: ControlOp,
        model_id: int | None,
        params: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
    ) -> ControlRequest:
        control_id = self._store.request_control(op.value, self.who, model_id, params, options)
        return ControlRequest(control_id, op, model_id, self._store)

    def _model(self, model_id: Any) -> dict[str, Any]:
        models = self._store.models()
        check_model_id(model_id, len(models))  # model ids are 0, 1, ... in the order added
        return next(m for m in models if m["model_id"] == model_id)

    def _check_params(self, params: dict[str, Any], force: bool, complete: bool) -> dict[str, Any]:
        if self.space is None:
            return params
        checked = {}
        for name, value in params.items():
            dim = self.space.get(name)
            if dim is None:
                if not force:
                    raise ConfigError(
                        "params",
                        f"{name}={value!r}",
                        f"a parameter of the search space: {sorted(self.space)}",
                        hint="force=True (--force) allows it",
                    )
                checked[name] = value
                continue
            value = coerce(dim, value)
            if not dim.contains(value) and not force:
                raise ConfigError(
                    "params",
                    f"{name}={value!r}",
                    f"a value in {dim}",
                    hint="force=True (--force) allows it",
                )
            checked[name] = value
        missing = sorted(set(self.space) - set(checked))
        if complete and missing:
            raise ConfigError(
                "params",
                params,
                "a value for every parameter of the space",
                hint=f"missing {missing}",
            )
        return checked


def coerce(dim: Dimension, value: Any) -> Any:
    """A value as its dimension's type: "0.01" or 1 for a float dimension, "64" for an int one,
    "cnn" for a choice holding "cnn" (what ``--set name=value`` on the command line gives)."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = json.loads(value)
    continuous = isinstance(dim, (Uniform, LogUniform, QUniform))
    if continuous and is_int(value):
        return float(value)
    if isinstance(dim, RandInt) and isinstance(value, float) and value.is_integer():
        return int(value)
    values = getattr(dim, "values", None)
    if values is not None and not any(value == v for v in values):
        by_text = [v for v in values if str(v) == str(value)]
        if len(by_text) == 1:
            return by_text[0]
    return value


def control(
    path_or_url: str | os.PathLike, experiment: str | int | None = None, who: str | None = None
) -> Controller:
    """Control an experiment, running or finished, from any process.

    Args:
        path_or_url: the experiment's ``path`` or its database URL.
        experiment: name or id of the experiment in that database (default: the newest).
        who: recorded with each request (default: ``user@host (pid N)``).

    Example:
        >>> ctl = cerebro.control("runs/demo")                      # doctest: +SKIP
        >>> ctl.models()                                            # doctest: +SKIP
        >>> ctl.stop(2).wait()                                      # doctest: +SKIP
    """
    store, row = RecordStore.find(path_or_url, experiment)
    with reading(path_or_url):
        return Controller(store, place.experiment_folder(path_or_url, row), who)
