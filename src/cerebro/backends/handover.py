"""Hand-over of model states between the workers of one machine, and their durable copies.

A model's states take turns in a few *slot files* in shared memory (``/dev/shm``; see
:mod:`.slots`): a worker trains the model in place in the slot the driver gave its unit as
target and reports the unit done; the next worker copies the state from there, at memory speed,
without waiting for a disk. Meanwhile a :class:`DurableWriter` in the driver's process copies
each handed-over state to the model's state file (the durable copy that resume, clone, PBT and
results read), newest version first, on a background thread. A slot is free again once a newer
state of its model is handed over and its own durable copy is written (or skipped for the
newer one); a few free ones stay for the model's next states, the others are deleted.

The folder has a byte budget: a state that does not fit is written straight to the model's
state file instead (a slower hop, never a lost one).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from .. import training, turns
from ..files import is_url, replace_atomically
from .base import StateSaved, Unit, Written
from .slots import SlotMaps, reserve

# Share of the shared-memory filesystem a run's handover files may take by default.
_SHARE_OF_SHM = 0.5


class HandoverFolder:
    """A run's folder for handover files: in ``/dev/shm`` where the machine has it (else the
    system's temporary folder), removed by :meth:`close`.

    Args:
        budget_mb: most MiB of states the folder holds at once (None: half of the
            filesystem it is on).
        root: where to make the folder (None: ``/dev/shm`` if writable).

    Example:
        >>> folder = HandoverFolder(budget_mb=64)
        >>> os.path.basename(slot_file(folder.path, 3, 0))
        'model-00003-s0.pt'
        >>> folder.path.startswith("/dev/shm/")  # where the machine has it
        True
        >>> folder.close(); os.path.exists(folder.path)
        False
    """

    def __init__(self, budget_mb: int | None = None, root: str | None = None) -> None:
        root = root or _shared_memory_root() or tempfile.gettempdir()
        _remove_orphans(root)
        self.path = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=root)
        if budget_mb is None:
            self.budget = int(shutil.disk_usage(self.path).total * _SHARE_OF_SHM)
        else:
            self.budget = budget_mb * 2**20

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


_PREFIX = "cerebro-handover-"


def _remove_orphans(root: str) -> None:
    """Remove the handover folders of runs whose driver died without closing them (killed,
    out of memory): shared memory is held until the machine restarts otherwise. A run resumes
    from its state files, never from these."""
    with contextlib.suppress(OSError), os.scandir(root) as entries:
        for entry in entries:
            owner = entry.name.removeprefix(_PREFIX).split("-", 1)[0]
            if entry.name.startswith(_PREFIX) and owner.isdigit() and not _alive(int(owner)):
                shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def slot_file(folder: str, model_id: int, slot: int) -> str:
    """The path of one of a model's slot files (see :mod:`.slots`)."""
    return os.path.join(folder, f"model-{model_id:05d}-s{slot}.pt")


def _shared_memory_root() -> str | None:
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return None  # tempfile's default folder


@dataclass(frozen=True)
class StatesWritten:
    """What :func:`write_states` did with a unit's new states, by model id: where each went,
    and why each that could not be written was not (a traceback)."""

    written: dict[int, Written] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)


def write_states(
    unit: Unit, snapshots: dict[int, dict[str, Any]], slots: SlotMaps | None
) -> StatesWritten:
    """Write each member's new state (``snapshots``, by model id) to its target slot (in
    place where it was trained there), or, where it has none or the handover folder has no
    room left for it, straight to its durable state file. A member whose state cannot be
    written is left out of ``written`` (the others are still written)."""
    done = StatesWritten()
    for member in unit.members:
        snapshot = snapshots.get(member.model_id)
        if snapshot is None:
            continue  # it failed alone: nothing of it changed
        began = time.perf_counter()
        target = member.target
        try:
            if (
                target is not None
                and slots is not None
                and (slots.hand_over(target, snapshot) or slots.write_new(target, snapshot))
            ):
                path = target
            else:
                path = member.state_path
                training.save_state(snapshot, path)
        except Exception:
            done.failed[member.model_id] = traceback.format_exc()
            continue
        done.written[member.model_id] = Written(path, time.perf_counter() - began)
    return done


@dataclass
class _Copy:
    model_id: int
    version: int
    source: str
    target: str


# Free slot files a model keeps for its next states (more are deleted).
_SPARE_SLOTS = 2


@dataclass
class _ModelFiles:
    """One model's slot files, as the driver's side of a backend tracks them."""

    files: dict[int, str] = field(default_factory=dict)  # handed-over states, by version
    copying: set[int] = field(default_factory=set)  # versions the writer still needs
    leased: set[str] = field(default_factory=set)  # targets of units running
    free: list[str] = field(default_factory=list)  # slots no state needs
    made: int = 0  # slot files named so far
    released: bool = False
    durable: int = -1  # the newest version copied to the state file from a slot
    target: str | None = None  # its state file (whose spare goes once it is released)


class DurableWriter:
    """Copies handed-over states to their state files on one background thread, and tracks
    which handover files may go.

    A copy waiting for the thread is replaced by a newer version of the same model (only the
    newest is worth writing); each copy that completes, or fails, is reported to ``report`` as
    a :class:`StateSaved`, from the writer's thread.
    """

    def __init__(
        self, report: Callable[[StateSaved], None], folder: HandoverFolder | None = None
    ) -> None:
        self._report = report
        self._folder = folder  # where it makes spare slots ahead of their use (None: never)
        self._lock = threading.Condition()
        self._queue: dict[int, _Copy] = {}  # model id -> its newest copy to make, in order
        self._models: dict[int, _ModelFiles] = {}
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="cerebro-durable")
        self._thread.start()

    def handed_over(
        self, model_id: int, version: int, path: str, target: str, first: bool = False
    ) -> None:
        """A worker wrote ``model_id``'s state at ``version`` to the handover file ``path``:
        copy it to ``target`` (replacing a copy of an older version still waiting). ``first``:
        before the copies waiting (the model will wait for it: its epoch's last state)."""
        with self._lock:
            files = self._models.setdefault(model_id, _ModelFiles())
            files.released = False  # a stopped model a person resumed trains again
            files.leased.discard(path)
            files.target = target
            # Versions trained again (replayed after a roll-back) supersede the files of the
            # first run's: the writer may be copying one, so they are deleted, never reused.
            superseded = [files.files.pop(v) for v in list(files.files) if v >= version]
            files.files[version] = path
            files.copying.add(version)
            replaced = self._queue.pop(model_id, None)
            if replaced is not None:
                files.copying.discard(replaced.version)
            copy = _Copy(model_id, version, path, target)
            if first:
                self._queue = {model_id: copy, **self._queue}
            else:
                self._queue[model_id] = copy
            self._lock.notify_all()
        for stale in superseded:
            if stale != path:
                with contextlib.suppress(OSError):
                    os.remove(stale)
        # Older files go once this copy is made, on the writer's thread: deleting a file costs
        # about 0.5 ms, time the driver's loop would take from scheduling.

    def file_of(self, model_id: int, version: int) -> str | None:
        """The handover file of ``model_id`` at ``version``, if there is one."""
        with self._lock:
            files = self._models.get(model_id)
            return None if files is None else files.files.get(version)

    def target_for(self, model_id: int, folder: str, version: int | None = None) -> str:
        """A slot file of ``model_id`` in ``folder`` that no state needs, for a unit to write
        the model's next state to (a new name when it has none free).

        ``version``: the state the unit starts from. Where it is in a slot whose durable copy
        is written, that slot is the target: the unit trains in it in place, and copies
        nothing (the state is in the state file still, for a unit that fails or is lost:
        :meth:`file_of` no longer names the slot)."""
        with self._lock:
            files = self._models.setdefault(model_id, _ModelFiles())
            files.released = False
            path = files.files.get(version) if version is not None else None
            if path is not None and files.durable == version:
                del files.files[version]
            elif files.free:
                path = files.free.pop()
            else:
                path = slot_file(folder, model_id, files.made)
                files.made += 1
            files.leased.add(path)
            return path

    def wrote_directly(self, model_id: int, target: str) -> None:
        """A worker wrote ``model_id``'s new state straight to its state file ``target`` (no
        slot had room for it): that file's spare goes with the model's other files."""
        with self._lock:
            self._models.setdefault(model_id, _ModelFiles()).target = target

    def unlease(self, model_id: int, path: str) -> None:
        """A unit's target slot holds no handed-over state (the unit failed, was lost, or
        wrote its state elsewhere): the slot is free again."""
        with self._lock:
            files = self._models.get(model_id)
            if files is None or path not in files.leased:
                return
            files.leased.discard(path)
            files.free.append(path)
        self._prune(model_id)

    def release(self, model_id: int) -> None:
        """The model trains no more: its files go once their copies are written."""
        with self._lock:
            self._models.setdefault(model_id, _ModelFiles()).released = True
        self._prune(model_id)

    def drain(self, timeout: float) -> bool:
        """Wait until every copy asked for is written (True) or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self) -> None:
        """Stop the thread after the copy in progress (waiting copies are not made), and delete
        the spares of the state files (a resumed run starts without them)."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._lock.notify_all()
        self._thread.join(timeout=60)
        with self._lock:
            targets = {f.target for f in self._models.values() if f.target is not None}
        for target in targets:
            turns.drop_spare(target)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                model_id = next(iter(self._queue))
                copy = self._queue.pop(model_id)
                self._busy = True
            saved = self._write(copy)
            with self._lock:
                files = self._models.get(copy.model_id)
                if files is not None:
                    files.copying.discard(copy.version)
                    if saved.ok and files.files.get(copy.version) == copy.source:
                        files.durable = copy.version
            self._report(saved)
            self._prune(copy.model_id)
            if saved.ok:
                self._reserve_spare(copy.model_id, copy.source)
            with self._lock:  # drain() returns once the copy is reported and its files tidied
                self._busy = False
                self._lock.notify_all()

    @staticmethod
    def _write(copy: _Copy) -> StateSaved:
        began = time.perf_counter()
        try:
            _copy_file(copy.source, copy.target, copy.version)
        except Exception:
            return StateSaved(
                copy.model_id, copy.version, ok=False, error=traceback.format_exc(),
                path=copy.target,
            )  # fmt: skip
        return StateSaved(
            copy.model_id, copy.version, ok=True, save_s=time.perf_counter() - began,
            path=copy.target,
        )  # fmt: skip

    def _reserve_spare(self, model_id: int, like: str) -> None:
        """Make a free slot for the model's next unit where it has none (as large as the slot
        ``like``): a unit whose target exists already copies its state in at memory speed,
        where making the file would cost it about 9x that (its first hops, or after a slot
        was deleted)."""
        if self._folder is None:
            return
        with self._lock:
            files = self._models.get(model_id)
            if files is None or files.released or files.free:
                return
            path = slot_file(self._folder.path, model_id, files.made)
            files.made += 1
        try:
            size = os.path.getsize(like)
        except OSError:
            return  # replaced or deleted meanwhile: the next copy tries again
        made = reserve(self._folder.path, self._folder.budget, path, size)
        with self._lock:
            files = self._models.get(model_id)
            if made and files is not None and not files.released:
                files.free.append(path)
                return
        if made:
            with contextlib.suppress(OSError):
                os.remove(path)

    def _prune(self, model_id: int) -> None:
        """Free the model's slots no state needs: those of versions older than its newest (all,
        once it is released) not waiting for their durable copy. A few free ones are kept
        for its next states; the others (all, once it is released) are deleted."""
        with self._lock:
            files = self._models.get(model_id)
            if files is None:
                return
            newest = max(files.files, default=None)
            doomed = [
                v for v in files.files if v not in files.copying and (v != newest or files.released)
            ]
            files.free += [files.files.pop(v) for v in doomed]
            keep = 0 if files.released else _SPARE_SLOTS
            paths, files.free = files.free[keep:], files.free[:keep]
            gone = files.released and not files.files and not files.leased
            if gone:
                del self._models[model_id]
        if gone and files.target is not None:
            turns.drop_spare(files.target)  # no versions to come: its disk is free again
        for path in paths:
            with contextlib.suppress(OSError):
                os.remove(path)


def _copy_file(source: str, target: str, version: int) -> None:
    """Copy the handover file ``source`` (the model's state at ``version``) to the state file
    ``target``: over the bytes of the version before the last where it may be
    (:mod:`cerebro.turns`: about 5x cheaper for the kernel than a new file), in a new file
    renamed over ``target`` otherwise. A newer version written straight to ``target``
    meanwhile (no slot had room for it) is left there."""
    if is_url(target):

        def copy(tmp: str) -> None:
            shutil.copyfile(source, tmp)

        replace_atomically(target, copy)
        return
    with open(source, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        turns.write_in_turns(
            target,
            size,
            lambda out: _send(src, out, size),
            unless=lambda: training.file_version(target) > version,
        )


def _send(source: IO[bytes], target: IO[bytes], size: int) -> None:
    """``size`` bytes of ``source`` from its start into ``target`` at its position, by
    sendfile(2) where the system has it for files (Linux: no copy through this process)."""
    sent = 0
    try:
        while sent < size:
            count = os.sendfile(target.fileno(), source.fileno(), sent, size - sent)
            if not count:
                raise EOFError(f"{source.name} ended after {sent} of {size} bytes")
            sent += count
    except OSError as e:
        if sent or e.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSOCK, errno.EOPNOTSUPP):
            raise
        source.seek(0)
        shutil.copyfileobj(source, target)
