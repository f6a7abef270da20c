"""How far a model's current state may run ahead of its state file.

A model hops on as soon as its unit is done, its new state handed over in memory; the backend
writes the state file behind it and reports each write (:class:`~cerebro.backends.base.StateSaved`).
:class:`Durability` says when a model must wait for its state file instead: when its next hop
would put it more than ``lag`` versions ahead (a crash of the whole run then costs at most
``lag`` hops per model, trained again on resume), and at the end of each epoch, so that epoch
checkpoints, PBT exploits, clones and results always read a durable state (the driver decides
whether the epoch's validation pass runs meanwhile: ``Driver._must_wait``).

Example:
    >>> durability = Durability(lag=2)
    >>> durability.handed_over(model_id=0, version=1, epoch=0, shard=3)
    >>> durability.waited_for()
    {0}
    >>> from cerebro.backends.base import StateSaved
    >>> durability.saved(StateSaved(model_id=0, version=1, ok=True))  # the hop it belongs to
    (0, 3)
    >>> durability.waited_for()
    set()
"""

from __future__ import annotations

import os
import warnings

from ..backends.base import StateSaved
from ..errors import DurabilityError, raised
from .roster import ModelRun


class Durability:
    """Which hops still wait for their state files, and the lag bound (``lag`` >= 0)."""

    def __init__(self, lag: int) -> None:
        self.lag = lag
        self._waiting: dict[tuple[int, int], tuple[int, int]] = {}  # (model, version) -> hop
        self._warned = False

    def waited_for(self) -> set[int]:
        """The models with a state file write still to be reported (the run is not over
        before, for those that go on)."""
        return {model_id for model_id, _ in self._waiting}

    def handed_over(self, model_id: int, version: int, epoch: int, shard: int) -> None:
        """A training hop (``epoch``, ``shard``) made ``version``, not yet in the state file."""
        self._waiting[(model_id, version)] = (epoch, shard)

    def must_wait(self, model: ModelRun, end_of_epoch: bool, next_trains: bool = True) -> bool:
        """Whether ``model`` waits for its state file before its next unit: it is behind, and
        its epoch is over or its next unit would take it past the lag bound (an evaluation,
        ``next_trains=False``, makes no new state: it waits only with a bound of 0)."""
        behind = model.version - model.durable_version
        return behind > 0 and (end_of_epoch or behind + int(next_trains) > self.lag)

    def saved(self, event: StateSaved) -> tuple[int, int] | None:
        """A write is reported: the (epoch, shard) of the hop that made its version, if known.
        Older versions of the model are no longer waited for (a backend may skip them)."""
        hop = self._waiting.get((event.model_id, event.version))
        self.forget(event.model_id, -1, up_to=event.version)
        if not event.ok and not self._warned:
            self._warned = True
            warnings.warn(
                f"could not write model {event.model_id}'s state to "
                f"{os.path.dirname(event.path) or event.path} ({raised(event.error)}): training "
                f"goes on from memory; the run stops if a model gets {self.lag} hops ahead of its "
                "state file",
                RuntimeWarning,
                stacklevel=2,
            )
        return hop

    def forget(self, model_id: int, version: int, up_to: int | None = None) -> None:
        """Stop waiting for the model's versions after ``version`` (its newer states are
        gone), or, with ``up_to``, for those up to that one."""
        for key in [k for k in self._waiting if k[0] == model_id]:
            if (up_to is not None and key[1] <= up_to) or (up_to is None and key[1] > version):
                del self._waiting[key]

    def bound_reached(self, model: ModelRun, event: StateSaved) -> DurabilityError:
        """The error that stops the run: ``model`` must wait for a state file that cannot be
        written."""
        return DurabilityError(
            f"model {model.model_id}'s state could not be written to {event.path} "
            f"({raised(event.error)}); it is {model.version - model.durable_version} hop(s) "
            f"ahead of its state file (version {model.durable_version}) and may go no further "
            f"(durable_lag={self.lag}, or the end of an epoch). What is recorded is kept: "
            "make the folder writable and run the experiment again to resume"
        )
