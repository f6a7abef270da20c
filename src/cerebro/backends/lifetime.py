"""Worker processes end with their driver.

If the driver is killed (SIGKILL, out of memory), a worker left running would finish its unit
and write the model's state after a restarted driver has already read it. On Linux the kernel
kills the worker as soon as its parent dies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> bool:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux). True if set.

    ``parent``: the pid this process was started by, taken by the parent itself before it
    started this process. Without it, a parent that died before this call would go unnoticed:
    ``getppid()`` would already name whoever adopted this process.
    """
    if not sys.platform.startswith("linux"):
        return False
    expected = os.getppid() if parent is None else parent
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        done = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if os.getppid() != expected:  # the parent died before the request took effect
        os._exit(1)
    return done
