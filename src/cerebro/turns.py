"""State files that take turns in two inodes: a new version is written over the one before the
last, in place, then renamed over the file.

Writing a new file for every version of a model's state costs the kernel about 5x an overwrite
(it allocates the new file's pages and frees the old one's at the rename; measured here: 0.14 s
against 0.028 s for 123 MB, 18 ms against 3.8 ms for 12 MB), time that a machine's cores would
otherwise train with. So the file a version replaces is kept under a spare name
(``<file>.tmp-spare``), and the next version is written into that spare's bytes and renamed
over the file in turn. The file itself is only ever replaced by a rename: a crash mid-write
leaves it whole (the spare is cleared with the other partial writes, see
:func:`cerebro.files.remove_partial_writes`).

A spare is written over only where no one can be reading it:

- readers open a state file through :func:`open_current`, which holds a shared ``flock`` on
  what it opened and makes sure that is still the file's current inode; the writer takes an
  exclusive lock on the spare without waiting, and writes a new file instead where a reader
  holds it;
- readers copy what they keep (:func:`cerebro.statefile.read` reads into private memory: a
  mapping would see the bytes change two versions later);
- a spare with other names (an epoch checkpoint is a hard link of the state file) or of another
  size is never written over: it is dropped and a new file written.

Example:
    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "state.pt")
    >>> for version in (b"one", b"two", b"six"):
    ...     reused = write_in_turns(path, len(version), lambda f: f.write(version))
    >>> reused, open(path, "rb").read(), open(spare_of(path), "rb").read()
    (True, b'six', b'two')
    >>> with open_current(path) as f:
    ...     f.read()
    b'six'
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import threading
from collections.abc import Callable, Iterator
from typing import IO

from .files import PARTIAL_MARK

# Opens of a file replaced while a reader opened it, before giving up (each retry means a
# newer version was renamed in meanwhile: more than a few in a row is a writer gone wild).
_OPEN_ATTEMPTS = 100
# flock errors of filesystems that have no locks: readers go on unlocked (the writer cannot
# lock there either, so it never writes over a spare).
_NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS})


def spare_of(path: str) -> str:
    """The name the version before ``path``'s current one is kept under."""
    return f"{path}{PARTIAL_MARK}spare"


def write_in_turns(
    path: str,
    size: int,
    fill: Callable[[IO[bytes]], object],
    unless: Callable[[], bool] | None = None,
) -> bool:
    """Make ``path`` hold what ``fill`` writes (``size`` bytes, to the file it is given,
    positioned at 0): over the spare's bytes where it may be (see the module), else in a new
    file; either way renamed over ``path``, whose inode becomes the spare. Returns whether the
    spare was written over. Writers of one file take turns too (see :func:`_one_writer`);
    ``unless``, asked in the writer's turn, skips the write where it says True (another
    writer's newer content is there already)."""
    spare = spare_of(path)
    with _one_writer(path):
        if unless is not None and unless():
            return False
        handle = _claim(spare, size)
        if handle is None:
            tmp = f"{path}{PARTIAL_MARK}{os.getpid()}-{threading.get_ident()}"
            try:
                with open(tmp, "wb") as f:
                    fill(f)
                _swap(tmp, path, spare)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
            return False
        with handle:  # closing it releases the lock, after the rename
            fill(handle)
            handle.flush()
            _swap(spare, path, spare)
        return True


@contextlib.contextmanager
def _one_writer(path: str) -> Iterator[None]:
    """Hold the lock that writers of ``path`` take in turn (``<file>.tmp-lock``). Two Ray
    workers may save versions of one model at once (the one that trained it last is still
    writing when the next is done): a writer that had claimed the spare would otherwise rename
    whatever the spare's name meant by then over the file, another's half-written bytes
    among them. Where the filesystem has no locks, no one writes over a spare (new files)."""
    lock = lock_of(path)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:  # a model's first state: its folder is made now
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
        yield
    finally:
        os.close(fd)


def lock_of(path: str) -> str:
    """The file whose lock the writers of ``path`` take in turn."""
    return f"{path}{PARTIAL_MARK}lock"


def drop_spare(path: str) -> None:
    """Delete ``path``'s spare and its writers' lock (its model writes no more versions)."""
    for name in (spare_of(path), lock_of(path)):
        with contextlib.suppress(OSError):
            os.remove(name)


@contextlib.contextmanager
def open_current(path: str) -> Iterator[io.BufferedReader]:
    """``path`` opened for reading, holding a shared lock on it so that no writer writes over
    it meanwhile (see the module). Raises FileNotFoundError like ``open``."""
    for _ in range(_OPEN_ATTEMPTS):
        f = open(path, "rb")  # noqa: SIM115 (closed below or by the with)
        try:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            except OSError as e:
                if e.errno not in _NO_LOCKS:
                    raise
            else:
                opened = os.fstat(f.fileno())
                try:
                    current = os.stat(path)
                except FileNotFoundError:
                    current = None
                if current is None or (current.st_ino, current.st_dev) != (
                    opened.st_ino,
                    opened.st_dev,
                ):
                    continue  # a newer version was renamed in while it was opened: read that
            with f:
                yield f
            return
        finally:
            f.close()
    raise OSError(f"{path} was replaced {_OPEN_ATTEMPTS} times while it was being opened")


def _claim(spare: str, size: int) -> IO[bytes] | None:
    """The spare opened for writing over, locked, if it may be (None otherwise; a spare with
    other names or of another size is dropped)."""
    try:
        f = open(spare, "r+b")  # noqa: SIM115 (returned open)
    except OSError:
        return None
    try:
        stat: os.stat_result | None = os.fstat(f.fileno())
    except OSError:
        stat = None
    if stat is not None and stat.st_nlink == 1 and stat.st_size == size:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except OSError:
            # A reader holds it, or this filesystem has no locks: left as it is.
            f.close()
            return None
    f.close()
    with contextlib.suppress(OSError):
        os.remove(spare)  # its other names (a checkpoint) keep the bytes; its disk is free now
    return None


def _swap(new: str, path: str, spare: str) -> None:
    """Rename ``new`` over ``path``, keeping the inode it replaces as ``spare``."""
    # Named for this writer: two writing the same file at once each keep their own.
    kept = f"{path}{PARTIAL_MARK}kept-{os.getpid()}-{threading.get_ident()}"
    try:
        os.link(path, kept)
    except FileExistsError:
        os.remove(kept)  # left by a crash between the two renames below
        os.link(path, kept)
    except OSError:
        kept = ""  # no file yet, or a filesystem without hard links: no spare
    os.replace(new, path)
    if kept:
        os.replace(kept, spare)
