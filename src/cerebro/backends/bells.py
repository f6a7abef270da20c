"""Bells: how a worker tells the others of its machine that a unit's new states are handed
over, without going through the driver.

A worker that holds a unit following one still running elsewhere (``Unit.follows``) waits for
that unit's hand-over. The driver would hear of it first and pass it on (it does, as a
fallback), but on a busy machine its loop takes milliseconds to wake and read the message:
longer than copying a state of megabytes. So each worker has a named pipe (FIFO) in the
handover folder, and a worker that handed a unit's states over writes the unit's id to every
other worker's pipe at once: the one waiting wakes and starts.

Rings are a shortcut, never the only path: one that cannot be written (a pipe full of rings no
one waited for, a worker not started yet or replaced) is dropped, and the driver's message
comes a little later.

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> first, second = Bell(folder, 0, peers=2), Bell(folder, 1, peers=2)
    >>> first.ring(41)
    >>> second.heard()
    {41}
    >>> second.heard(), first.heard()  # each ring is heard once, by the others
    (set(), set())
    >>> first.close(); second.close()
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct

_RING = struct.Struct("<q")  # a unit id: 8 bytes, written whole (< PIPE_BUF)
_READ = 4096 * _RING.size


def bell_path(folder: str, worker_id: int) -> str:
    """Where worker ``worker_id``'s pipe is."""
    return os.path.join(folder, f"bell-{worker_id}")


class Bell:
    """One worker's pipe (made anew, so a replaced worker does not read its predecessor's
    rings) and its handles on the others' pipes, opened when first rung.

    Args:
        folder: the run's handover folder.
        worker_id: this worker's id.
        peers: how many workers the run has (ids ``0 .. peers - 1``).
    """

    def __init__(self, folder: str, worker_id: int, peers: int) -> None:
        self.folder = folder
        self.worker_id = worker_id
        self.peers = peers
        path = bell_path(folder, worker_id)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        os.mkfifo(path, 0o600)
        # Read and write: the pipe always has a writer (no end of file when the others have
        # none open), and opening it does not wait for one.
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self._others: dict[int, int] = {}  # worker id -> open handle on its pipe

    def fileno(self) -> int:
        """The pipe's handle, readable when a ring came (for ``select`` and friends)."""
        return self._fd

    def heard(self) -> set[int]:
        """The unit ids rung since the last call (reading never waits)."""
        rung: set[int] = set()
        while True:
            try:
                data = os.read(self._fd, _READ)
            except BlockingIOError:
                return rung
            rung.update(unit_id for (unit_id,) in _RING.iter_unpack(data))
            if len(data) < _READ:
                return rung

    def ring(self, unit_id: int) -> None:
        """Tell every other worker that unit ``unit_id``'s new states are handed over."""
        message = _RING.pack(unit_id)
        for peer in range(self.peers):
            if peer != self.worker_id:
                self._ring_one(peer, message)

    def _ring_one(self, peer: int, message: bytes) -> None:
        for _ in range(2):  # once more on a fresh handle: the peer may have been replaced
            fd = self._others.get(peer)
            if fd is None:
                try:
                    fd = os.open(bell_path(self.folder, peer), os.O_WRONLY | os.O_NONBLOCK)
                except OSError:
                    return  # not made yet, or no one reads it (ENOENT, ENXIO): dropped
                self._others[peer] = fd
            try:
                os.write(fd, message)
                return
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    return  # full of rings it did not wait for: the driver tells it instead
                self._forget(peer)  # EPIPE: its reader is gone (a replaced worker's old pipe)

    def _forget(self, peer: int) -> None:
        fd = self._others.pop(peer, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        for peer in list(self._others):
            self._forget(peer)
        with contextlib.suppress(OSError):
            os.close(self._fd)
