"""Atomic file replacement: readers see the old file or the new one, never half of either.

A file is written beside its target under a temporary name (``<name>.tmp-<pid>-<thread>``) and
renamed over it. A crash mid-write leaves only such a temporary file, which
:func:`remove_partial_writes` clears.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable

PARTIAL_MARK = ".tmp-"


def replace_atomically(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)``, then rename the result over ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}{PARTIAL_MARK}{os.getpid()}-{threading.get_ident()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_bytes_atomically(path: str, payload: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(payload)

    replace_atomically(path, write)


def remove_partial_writes(folder: str) -> None:
    """Delete temporary files that interrupted writes left in ``folder``."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if PARTIAL_MARK in name:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))
