"""Atomic file replacement, on local paths and on fsspec URLs: readers see the old file or the
new one, never half of either.

A local file is written beside its target under a temporary name (``<name>.tmp-<pid>-<thread>``)
and renamed over it; a crash mid-write leaves only such a temporary file, which
:func:`remove_partial_writes` clears. At an fsspec URL (``s3://``, ``gs://``, ...) the file is
written locally, then uploaded in one put, which object stores make visible whole or not at all.
The few other file operations the checkpoints need take either kind of path.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable
from typing import IO, Any

PARTIAL_MARK = ".tmp-"


def is_url(path: str) -> bool:
    """True for an fsspec URL other than a local file (``s3://...``, ``memory://...``)."""
    return "://" in path and not path.startswith("file://")


def as_local(path: str) -> str:
    """``file:///x`` as the plain path ``/x``; anything else unchanged."""
    return path[len("file://") :] if path.startswith("file://") else path


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of a URL and the path within it."""
    import fsspec  # only experiments whose checkpoints live at a URL need it

    return fsspec.core.url_to_fs(url)


def exists(path: str) -> bool:
    if is_url(path):
        fs, inner = filesystem(path)
        return fs.isfile(inner)
    return os.path.isfile(path)


def size(path: str) -> int:
    if is_url(path):
        fs, inner = filesystem(path)
        return int(fs.size(inner))
    return os.path.getsize(path)


def remove(path: str) -> None:
    if is_url(path):
        fs, inner = filesystem(path)
        fs.rm_file(inner)
    else:
        os.remove(path)


def open_for_reading(path: str) -> IO[bytes]:
    if is_url(path):
        fs, inner = filesystem(path)
        return fs.open(inner, "rb")
    return open(path, "rb")


def replace_atomically(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)``, then rename (or upload) the result over ``path``."""
    if is_url(path):
        _upload_whole(path, write)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}{PARTIAL_MARK}{os.getpid()}-{threading.get_ident()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _upload_whole(url: str, write: Callable[[str], None]) -> None:
    fs, inner = filesystem(url)
    handle, tmp = tempfile.mkstemp(prefix="cerebro-upload-")
    os.close(handle)
    try:
        write(tmp)
        fs.makedirs(inner.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(tmp, inner)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def write_bytes_atomically(path: str, payload: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(payload)

    replace_atomically(path, write)


def remove_partial_writes(folder: str) -> None:
    """Delete temporary files that interrupted writes left in ``folder`` (at a URL, uploads are
    whole or absent: nothing to clear)."""
    if not is_url(folder) and os.path.isdir(folder):
        for name in os.listdir(folder):
            if PARTIAL_MARK in name:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))
