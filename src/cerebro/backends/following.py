"""Units that follow units: a model's next unit sent to the next worker while it still trains
on this one (``Unit.follows``), so that the next worker starts it the moment its state is
handed over instead of after a round trip through the driver.

The worker's side is an :class:`Inbox`: the units of the driver's pipe in order, each follower
held until the unit it follows is handed over (a ring of that unit's worker, see
:mod:`.bells`, or the driver's :class:`Go`), or run no more if it is cancelled (:class:`Cancel`:
the unit it follows failed, was lost or wrote its states elsewhere); the units behind a
follower that waits run meanwhile. The backend's side is in :class:`~.local.LocalBackend`.
"""

from __future__ import annotations

import collections
import multiprocessing.connection as mp_connection
from dataclasses import dataclass
from typing import Any

from ..kinds import UnitKind
from .base import Unit, UnitDone
from .bells import Bell

# Rings remembered for units not yet reached: a follower's predecessor may end long before the
# worker gets to it. Far more than a worker's queue holds; older ones are forgotten.
_REMEMBERED = 4096


@dataclass(frozen=True)
class Go:
    """The driver's word that unit ``unit_id``'s new states are handed over (sent after the
    worker that ran it reported so: a fallback for a ring that was lost)."""

    unit_id: int


@dataclass(frozen=True)
class Cancel:
    """Do not run unit ``unit_id`` (a follower whose predecessor's states will not come)."""

    unit_id: int


def handed_over_in_slots(unit: Unit, done: UnitDone) -> bool:
    """Whether a training unit wrote every member's new state to its target slot, where a
    unit that follows it reads them (a state written straight to its file is not there)."""
    if not done.ok or unit.kind is not UnitKind.TRAIN:
        return False
    for member in unit.members:
        written = done.written.get(member.model_id)
        if written is None or member.target is None or written.path != member.target:
            return False
    return True


def cancelled(unit: Unit, worker_id: int) -> UnitDone:
    """The report of a unit that did not run."""
    error = (
        f"unit {unit.unit_id} was cancelled: it followed unit {unit.follows}, whose new states "
        "did not come"
    )
    return UnitDone(unit.unit_id, worker_id, ok=False, error=error, cancelled=True)


class Inbox:
    """A worker's units in the order the driver sent them, except that a follower waits
    until the unit it follows is handed over while the units behind it run: a worker holding
    a follower is never idle while it holds something it can run.

    Args:
        conn: the worker's pipe from the driver (units, :class:`Go`, :class:`Cancel`, and None
            to stop).
        bell: the worker's bell (None: only the driver's :class:`Go` releases a follower).
    """

    def __init__(self, conn: mp_connection.Connection, bell: Bell | None) -> None:
        self.conn = conn
        self.bell = bell
        self._held: list[Unit] = []  # received and not run yet, in order
        self._handed_over: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._cancelled: set[int] = set()
        self._stopping = False

    def next(self) -> tuple[Unit | None, bool]:
        """The next unit and whether to run it (False: report it :func:`cancelled`); None
        when the worker is to stop. Raises EOFError or OSError once the driver is gone."""
        handles: list[Any] = [self.conn] + ([self.bell] if self.bell is not None else [])
        while True:
            self._hear()  # also keeps the bell's pipe from filling up between waits
            found = self._first_ready()
            if found is not None:
                return found
            if self._stopping:
                return None, False  # the driver awaits nothing more of this worker
            if self._held:  # followers only: a ring, or the driver's next message
                mp_connection.wait(handles)
                if not self.conn.poll():
                    continue
            self._take(self.conn.recv())

    def _first_ready(self) -> tuple[Unit, bool] | None:
        for i, unit in enumerate(self._held):
            if unit.unit_id in self._cancelled:
                self._cancelled.discard(unit.unit_id)
                return self._held.pop(i), False
            if unit.follows is None or unit.follows in self._handed_over:
                return self._held.pop(i), True
        return None

    def _take(self, message: Any) -> None:
        if isinstance(message, Go):
            self._remember(message.unit_id)
        elif isinstance(message, Cancel):
            self._cancelled.add(message.unit_id)
        elif message is None:
            self._stopping = True
        else:
            self._held.append(message)

    def _hear(self) -> None:
        if self.bell is not None:
            for unit_id in self.bell.heard():
                self._remember(unit_id)

    def _remember(self, unit_id: int) -> None:
        self._handed_over[unit_id] = None
        while len(self._handed_over) > _REMEMBERED:
            self._handed_over.popitem(last=False)
