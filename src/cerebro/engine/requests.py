"""A person's control requests: one validator, used where a request is made
(:mod:`cerebro.engine.control`, against the records) and where the driver applies it (here,
against the models as they are at that moment), and the driver's side that applies them.

The driver looks for pending requests a few times a second and applies each at the model's
next hop boundary: a stop asked while a unit of the model runs waits for the unit to end.

Example:
    >>> check_model_id(5, known=3)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    cerebro.errors.ConfigError: model_id=5 is not accepted: ... of this experiment (ids 0-2)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .. import training
from ..errors import ConfigError, check_int, first_line, is_int
from ..kinds import ControlOp, ControlState, EventKind, ModelStatus, Origin
from ..state import Counters
from ..store import RecordStore, checkpoints
from .building import InitialState, ModelBuilder
from .lifecycle import Lifecycle, Proposal
from .roster import ModelRun, Roster

CONTROL_POLL_S = 0.25  # how often the records are checked for a person's requests


# The validator: each check raises ConfigError naming the argument, the value and what is
# accepted. A request is checked when it is made and again when it is applied.


def check_epochs_option(epochs: Any) -> int | None:
    """The ``epochs`` of an added or cloned model: an integer >= 1, or None."""
    if epochs is not None and not (is_int(epochs) and epochs >= 1):
        raise ConfigError("epochs", epochs, "an integer >= 1, or None (the experiment's)")
    return None if epochs is None else int(epochs)


def check_model_id(model_id: Any, known: int) -> int:
    """A model of the experiment (ids ``0 .. known - 1``)."""
    value = check_int("model_id", model_id)
    assert value is not None
    if not 0 <= value < known:
        ids = f"0-{known - 1}" if known else "none yet"
        raise ConfigError("model_id", model_id, f"a model of this experiment (ids {ids})")
    return value


def check_stoppable(model_id: int, status: ModelStatus) -> None:
    if not ModelStatus(status).is_live:
        raise ConfigError("model_id", model_id, "a running or paused model", hint=f"it is {status}")


def check_resumable(model_id: int, status: ModelStatus) -> None:
    if status not in (ModelStatus.STOPPED, ModelStatus.PRUNED):
        raise ConfigError(
            "model_id",
            model_id,
            "a stopped or pruned model",
            hint=f"it is {status}; set_epochs gives a completed model more epochs",
        )


def check_new_budget(model_id: int, status: ModelStatus, epochs: Any, least: int) -> int:
    """A model's new epoch budget: at least ``least`` (what it has done, or is doing)."""
    value = check_int("epochs", epochs, minimum=least, unit=f"epochs model {model_id} has done")
    assert value is not None
    if status is ModelStatus.FAILED:
        raise ConfigError("model_id", model_id, "a model that has not failed")
    return value


@dataclass(frozen=True)
class Request:
    """A request as the records hold it."""

    id: int
    op: ControlOp
    who: str
    requested: float
    model_id: int | None
    params: dict[str, Any]
    options: dict[str, Any]

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Request:
        return cls(
            id=row["id"],
            op=ControlOp(row["op"]),
            who=row["who"],
            requested=row["requested"],
            model_id=row["model_id"],
            params=dict(row["params"] or {}),
            options=dict(row["options"] or {}),
        )


# An outcome, or None: the request waits for the model's unit to end.
_Outcome = dict[str, Any] | None


class RequestApplier:
    """Applies pending requests to the run's models, in the order they were made."""

    def __init__(
        self, roster: Roster, lifecycle: Lifecycle, builder: ModelBuilder, seed: int
    ) -> None:
        self.roster = roster
        self.lifecycle = lifecycle
        self.builder = builder
        self.seed = seed
        self._checked = 0.0
        self._waiting: dict[int, Request] = {}  # stop requests waiting, by model

    @property
    def store(self) -> RecordStore:
        return self.lifecycle.store

    def apply_pending(self, now: bool = False) -> None:
        """Apply pending requests (checked a few times a second; ``now`` skips the wait)."""
        clock = time.monotonic()
        if not now and clock - self._checked < CONTROL_POLL_S:
            return
        self._checked = clock
        waiting = {r.id for r in self._waiting.values()}
        for row in self.store.controls(pending_only=True):
            if row["id"] in waiting:
                continue  # a stop waiting for its model's hop to end
            request = Request.from_row(row)
            try:
                outcome = self._apply(request)
            except ConfigError as e:
                self._settle(request, str(e))
                continue
            if outcome is not None:
                self._settle(request, None, outcome)

    def has_waiting(self, model: ModelRun) -> bool:
        return model.model_id in self._waiting

    def unit_over(self, model: ModelRun) -> None:
        """A stop that waited for the model's unit: apply it now that the unit is over, unless
        the model has meanwhile completed, been pruned or failed."""
        if model.busy or model.model_id not in self._waiting:
            return
        request = self._waiting.pop(model.model_id)
        if model.status.is_live:
            self._settle(request, None, self._stop(model))
        else:
            self._settle(request, f"model {model.model_id} is {model.status}: nothing to stop")

    def _settle(self, request: Request, error: str | None, outcome: _Outcome = None) -> None:
        state = ControlState.REJECTED if error is not None else ControlState.APPLIED
        self.store.settle_control(request.id, state.value, outcome, error)
        self.store.add_event(
            EventKind.CONTROL.value,
            control=request.id,
            op=request.op.value,
            who=request.who,
            requested=request.requested,
            model=request.model_id,
            state=state.value,
            outcome=outcome,
            error=error,
        )

    def _apply(self, request: Request) -> _Outcome:
        if request.op is ControlOp.ADD:
            return self._add(request.params, request.options.get("epochs"))
        model = self.roster[check_model_id(request.model_id, len(self.roster))]
        if request.op is ControlOp.STOP:
            check_stoppable(model.model_id, model.status)
            if model.busy:
                if model.model_id in self._waiting:
                    raise ConfigError(
                        "model_id", model.model_id, "a model not already being stopped"
                    )
                self._waiting[model.model_id] = request
                return None
            return self._stop(model)
        if request.op is ControlOp.RESUME:
            return self._resume(model)
        if request.op is ControlOp.SET_EPOCHS:
            return self._set_epochs(model, request.options.get("epochs"))
        return self._clone(model, request.params, request.options)

    def _stop(self, model: ModelRun) -> dict[str, Any]:
        self.lifecycle.set_status(model, ModelStatus.STOPPED)
        return {"epoch": model.epoch, "phase": model.phase.value, "version": model.version}

    def _resume(self, model: ModelRun) -> dict[str, Any]:
        if model.model_id in self._waiting:  # stop, then resume before the hop ended
            request = self._waiting.pop(model.model_id)
            self._settle(request, "cancelled by a later resume")
            return {"epoch": model.epoch, "cancelled_stop": request.id}
        check_resumable(model.model_id, model.status)
        budget = self.roster.budget(model)
        if model.epoch >= budget:
            raise ConfigError(
                "model_id",
                model.model_id,
                "a model with epochs left to train",
                hint=f"it has trained its {budget} epochs: use set_epochs to give it more",
            )
        self.lifecycle.set_status(model, ModelStatus.RUNNING)
        return {"epoch": model.epoch}

    def _set_epochs(self, model: ModelRun, epochs: Any) -> dict[str, Any]:
        done = len(model.history)
        started = self.roster.epoch_started(model)
        least = done + 1 if started and model.status is ModelStatus.RUNNING else max(done, 1)
        epochs = check_new_budget(model.model_id, model.status, epochs, least)
        model.max_epochs = epochs
        self.store.update_model(model.model_id, max_epochs=epochs)
        if model.status is ModelStatus.COMPLETED and epochs > done:
            # Reopened: it trains on from its last epoch.
            counters = Counters.from_dict(training.load_counters(model.state_path))
            model.version, model.epoch = counters.version, done
            model.durable_version = counters.version
            model.start_epoch(self.roster.train_order(model))
            self.lifecycle.set_status(model, ModelStatus.RUNNING)
        elif model.status.is_live and epochs <= done:
            self.lifecycle.set_status(model, ModelStatus.COMPLETED)
        self.roster.changed = True
        self.lifecycle.trackers.plan(self.roster.units_total())
        return {"epochs": epochs, "status": model.status.value}

    def _add(self, params: dict[str, Any], epochs: Any) -> dict[str, Any]:
        if self.roster.groups is not None:
            raise ConfigError(
                "op",
                "add",
                "stop, resume, clone or set_epochs in an experiment with per_group=True",
                hint="adding one configuration as a model per group is not supported yet; "
                "clone a group's model instead",
            )
        epochs = check_epochs_option(epochs)
        model = self.lifecycle.new_model(dict(params), Origin.ADD, None, epochs)
        initial = self.builder.initial_state(model.model_id, model.params, strict=False)
        self.lifecycle.add([Proposal(model, initial)])
        return {"model_id": model.model_id, "status": model.status.value}

    def _clone(
        self, source: ModelRun, params: dict[str, Any], options: dict[str, Any]
    ) -> dict[str, Any]:
        epochs = check_epochs_option(options.get("epochs"))
        merged = {**source.params, **params}
        if not options.get("warm_start", True):
            model = self.lifecycle.new_model(merged, Origin.CLONE, source.model_id, epochs)
            initial = self.builder.initial_state(model.model_id, model.params, strict=False)
            self.lifecycle.add([Proposal(model, initial)])
            return {"model_id": model.model_id, "warm_start": False}
        # The source's state file always holds a complete state at a hop boundary (it is only
        # ever replaced), so this is its exact state after its last saved hop.
        try:
            source_state = training.load_state(source.state_path)
            counters = Counters(init_seed=training.init_seed(self.seed, len(self.roster)))
            state = self.builder.warm_started(merged, source_state, counters)
        except Exception as e:
            raise ConfigError(
                "params",
                params,
                f"parameters model {source.model_id} can be warm-started with",
                hint=first_line(e),
            ) from e
        model = self.lifecycle.new_model(merged, Origin.CLONE, source.model_id, epochs)
        self.lifecycle.add([Proposal(model, InitialState(state, None))])
        if model.status is ModelStatus.RUNNING:
            checkpoints.snapshot(model.state_path, checkpoints.origin_path(model.folder))
        source_counters = Counters.from_dict(source_state["counters"])
        return {
            "model_id": model.model_id,
            "warm_start": True,
            "source_version": source_counters.version,
            "source_epoch": source_counters.epoch,
            "source_hops_in_epoch": len(source_counters.hops),
        }
