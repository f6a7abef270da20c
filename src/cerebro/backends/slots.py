"""Slot files: the few handover files each model's states take turns in, kept mapped by every
worker that used them.

Writing a state into a new file in ``/dev/shm`` costs about 9x copying it in memory (the kernel
allocates and zeroes each page); copying into a file already mapped costs one copy (measured:
152 ms against 17 ms for 123 MB). So the driver gives each model of a training unit a *target*,
a slot file of that model its older states no longer need (see
:class:`~.handover.DurableWriter`). At bring-in the worker copies the state the model starts
from into the target and binds the model's tensors to the target's bytes
(:func:`cerebro.training.bind_state`): training updates them in place, and handing the new
state over rewrites the file's header alone (:func:`cerebro.statefile.rewrite`).

A slot file is never truncated (another worker may have it mapped: touching a truncated page
kills a process): a state of another size goes to a new file renamed over the slot, and each
worker drops its mapping of a file that was replaced or deleted.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import shutil
import uuid
from typing import Any, cast

import torch

from .. import files, statefile, training, turns
from ..files import replace_atomically

# Room left in a slot's header for hops recorded later in the epoch (about 300 bytes each).
HEADER_ROOM = 8192
# Units between two looks for slot files deleted or replaced (a stat of each mapped file).
_PRUNE_EVERY = 16


class SlotMaps:
    """One worker's mappings of the slot files in a handover folder.

    Args:
        folder: the run's handover folder (every slot file is in it).
        budget: the most bytes the folder may hold; a slot that would take it past that is not
            made (the caller goes through the state file instead).

    Example:
        >>> import tempfile, torch
        >>> folder = tempfile.mkdtemp()
        >>> source = os.path.join(folder, "durable.pt")
        >>> statefile.write({"w": torch.zeros(4), "step": 0}, source)
        >>> maps = SlotMaps(folder, budget=2**20)
        >>> target = os.path.join(folder, "model-00001-s0.pt")
        >>> state = maps.bring_in(source, target)  # a copy in the slot: its tensors are views
        >>> _ = state["w"].add_(1.0)                # of the slot's bytes, trained in place
        >>> maps.hand_over(target, {"w": state["w"], "step": 1})
        True
        >>> statefile.read(target)["w"].tolist(), statefile.read(target)["step"]
        ([1.0, 1.0, 1.0, 1.0], 1)
    """

    def __init__(self, folder: str, budget: int) -> None:
        self.folder = folder
        self.budget = budget
        self._maps: dict[str, tuple[int, mmap.mmap]] = {}  # path -> (inode, mapping)
        # Where the unit's target slots hold their tensors, read at bring-in for the hand-over.
        self._refs: dict[str, tuple[Any, ...]] = {}
        # The header of what this worker last wrote to (or bound from) each slot: while a slot
        # still has it, no one else wrote there since (see unchanged()).
        self._seen: dict[str, bytes] = {}
        self._units = 0

    def bring_in(self, source: str, target: str) -> dict[str, Any] | None:
        """Copy the state file ``source`` into the slot ``target`` and return the state, its
        tensors views of the slot's bytes. None where ``source`` is not in cerebro's format
        (``torch.save``'s), the folder has no room for the slot, or ``source`` is a state file
        outside the folder and ``target`` no slot of its size yet: read it otherwise."""
        self._seen.pop(target, None)  # written now: whatever it held is gone
        if files.is_url(source):
            return None  # read through fsspec: copied from there (a hop from a remote file)
        mapped = self._mapping(source) if _inside(source, self.folder) else None
        if mapped is not None:
            size = len(mapped)
            if not statefile.is_statefile(mapped[: len(statefile.MAGIC)]):
                return None
            slot = self._slot(target, size)
            if slot is None:
                return None
            if slot is not mapped:  # else the unit trains in the slot its state is in
                _copy(mapped, slot, size)
        else:  # a state file: copied into a slot of its size if the target is one already
            with turns.open_current(source) as f:  # whole, though written over in turns
                size = os.fstat(f.fileno()).st_size
                if not statefile.is_statefile(f.read(len(statefile.MAGIC))):
                    return None
                slot = self._mapping(target)
                if slot is None or len(slot) != size:
                    # A model's first state (no optimizer state yet) or one after a roll-back:
                    # read from the file, and the hand-over makes the slot at its new size.
                    return None
                f.seek(0)
                if f.readinto(memoryview(slot)[:size]) != size:
                    raise EOFError(f"state file {source} changed while it was read")
        state, self._refs[target] = statefile.read_with_refs(slot)
        return state

    def read(self, path: str) -> dict[str, Any] | None:
        """The state in the slot file ``path``, its tensors views of a copy-on-write mapping of
        it (nothing is copied until used), or None where ``path`` is no slot file here."""
        if not _inside(path, self.folder):
            return None
        return cast(dict[str, Any] | None, statefile.read_mapped(path))

    def hand_over(self, target: str, state: dict[str, Any]) -> bool:
        """Write ``state`` over the slot ``target`` in place (see :func:`statefile.rewrite`);
        False where it does not fit there, or the slot holds no state yet (a spare made ahead
        of its use, still zeros: the unit read its state from a file of another size), so the
        caller writes a new file."""
        slot = self._mapping(target)
        refs = self._refs.pop(target, None)
        if slot is None or not statefile.is_statefile(slot[: len(statefile.MAGIC)]):
            return False
        if not statefile.rewrite(slot, state, refs):
            return False
        self._seen[target] = statefile.header_of(slot)
        return True

    def remember(self, path: str) -> bool:
        """Note the state the slot ``path`` holds now (a model is bound to it); False where it
        is no slot file this worker can map."""
        slot = self._mapping(path) if _inside(path, self.folder) else None
        if slot is None:
            return False
        self._seen[path] = statefile.header_of(slot)
        return True

    def unchanged(self, path: str) -> bool:
        """Whether the slot ``path`` still holds the state this worker last wrote to it or
        noted (:meth:`remember`). Every write of a slot changes its header (a copy brings
        another state's header; a hand-over records one more hop), so equal headers mean no
        write since."""
        seen = self._seen.get(path)
        if seen is None:
            return False
        slot = self._mapping(path)
        return slot is not None and slot[: len(seen)] == seen

    def write_new(self, target: str, state: dict[str, Any]) -> bool:
        """Write ``state`` to a new file renamed over the slot ``target`` (with room for a
        longer header later); False where the folder has no room for it."""
        if not self._room_for(training.state_nbytes(state) + HEADER_ROOM, replacing=target):
            return False

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                statefile.write_to(state, f, header_room=HEADER_ROOM)

        try:
            replace_atomically(target, write)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                return False  # /dev/shm filled up meanwhile
            raise
        self._seen.pop(target, None)
        self._maps.pop(target, None)
        return True

    def start_unit(self) -> None:
        """A unit begins: forget what the last one read of its targets, and drop the mappings
        of slot files deleted or replaced since they were mapped (looked for once every few
        units; a mapping found stale at use is dropped then)."""
        self._refs.clear()  # a new unit: what was read for the last one's targets is stale
        self._units += 1
        if self._units % _PRUNE_EVERY:
            return
        for path, (inode, _) in list(self._maps.items()):
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = -1
            if current != inode:
                del self._maps[path]

    def _mapping(self, path: str) -> mmap.mmap | None:
        """The slot file ``path`` mapped (shared, writable), or None if there is none."""
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            self._maps.pop(path, None)
            return None
        known = self._maps.get(path)
        if known is not None and known[0] == stat.st_ino and len(known[1]) == stat.st_size:
            return known[1]
        if not stat.st_size:
            return None
        fd = os.open(path, os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, stat.st_size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        finally:
            os.close(fd)
        self._maps[path] = (stat.st_ino, mapping)
        return mapping

    def _slot(self, target: str, size: int) -> mmap.mmap | None:
        """The slot ``target`` mapped, ``size`` bytes long: made anew (a new file renamed over
        it) where it is missing or of another size, if the folder has room."""
        slot = self._mapping(target)
        if slot is not None and len(slot) == size:
            return slot
        if not reserve(self.folder, self.budget, target, size):
            return None
        try:
            return self._mapping(target)
        except OSError:
            return None

    def _room_for(self, size: int, replacing: str) -> bool:
        return room_for(self.folder, self.budget, size, replacing)


def room_for(folder: str, budget: int, size: int, replacing: str) -> bool:
    """Whether a file of ``size`` bytes in place of ``replacing`` keeps ``folder`` within
    ``budget`` bytes (and its filesystem from filling up)."""
    used = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.path == replacing:
                continue  # its bytes are freed when it is replaced
            with contextlib.suppress(FileNotFoundError):  # deleted meanwhile by the driver
                used += entry.stat().st_size
    return used + size <= budget and size < shutil.disk_usage(folder).free


def reserve(folder: str, budget: int, path: str, size: int) -> bool:
    """Make the slot file ``path`` of ``size`` bytes before a unit needs it: the kernel
    allocates and zeroes its pages now (about 9x a copy of them), not on a hop's path. False,
    making nothing, where the folder has no room for it."""
    if not room_for(folder, budget, size, replacing=path):
        return False
    tmp = os.path.join(folder, f".new-{uuid.uuid4().hex}")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # The pages now: a full /dev/shm fails here (ENOSPC), not on a later touch of a
            # mapped page (which would kill the process).
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        return False
    return True


def _copy(source: mmap.mmap, target: mmap.mmap, size: int) -> None:
    """The first ``size`` bytes of ``source`` into ``target``: through torch, whose copy is
    about 1.7x as fast as a memoryview's for states of megabytes (measured: 0.5 ms against
    0.9 ms for 12 MB between two shared mappings)."""
    if size:
        into = torch.frombuffer(target, dtype=torch.uint8, count=size)
        into.copy_(torch.frombuffer(source, dtype=torch.uint8, count=size))


def _inside(path: str, folder: str) -> bool:
    return os.path.dirname(path) == folder
