"""Worker processes forked from a clean template process, never from the user's ``__main__``.

multiprocessing's ``spawn`` (and ``forkserver``) start a child by importing the parent's main
module again, so a script without ``if __name__ == "__main__":`` runs its experiment once more in
every worker, and a script piped to ``python -`` or run with ``python -c`` cannot start workers at
all. Instead, cerebro starts one *template* process from its own entry point: it imports torch,
torch's lazily loaded compiler stack (the first optimizer step would load it) and the worker's
modules once, then forks a worker on each request. A fork takes milliseconds, so workers (and
replacements of lost workers) start without paying for torch's imports again, and the template is
kept for later experiments of the same driver process (notebook cells, test suites).

The template never runs a tensor operation or touches CUDA, so forked workers may use both.
Workers receive everything else from the driver over their own pipe: the user's ``build``
(cloudpickled), the driver's ``sys.path``, working directory and environment.

Lifetimes: the template is killed by the kernel when the driver dies (and exits when the driver
closes its control socket); each worker is killed when the template dies.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ..errors import WorkerError

# What the template loads before forking: everything a worker needs for its first unit.
_PRELOAD = (
    "torch",
    "torch._dynamo",
    "pyarrow.parquet",
    "cerebro.backends.worker",
    "cerebro.techniques.plain",  # imported by a worker's first unit
)
_BOOT_TIMEOUT_S = 300.0


class ProcessTemplate:
    """Driver-side handle of the template process.

    Example:
        >>> template = ProcessTemplate.shared()                          # doctest: +SKIP
        >>> worker = template.fork()  # a WorkerProcess with a Connection to it  # doctest: +SKIP
    """

    _shared: ProcessTemplate | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        # The template must import this cerebro, even one run from a source tree.
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        # The driver's pid travels too: the template checks it is still its parent.
        code = f"import {__name__} as t; t.serve({theirs.fileno()}, {os.getpid()})"
        command = [sys.executable, "-c", code]
        self._process = _spawn_on_long_lived_thread(
            lambda: subprocess.Popen(
                command, pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL
            )
        )
        theirs.close()
        self._socket = ours
        self._buffer = b""
        self._exits: dict[int, int] = {}
        self._started: list[int] = []
        self._owner = os.getpid()  # a forked copy of the driver must start its own template
        self._lock = threading.Lock()

    @classmethod
    def shared(cls) -> ProcessTemplate:
        """The template of this process, started now if there is none or it died."""
        with cls._shared_lock:
            shared = cls._shared
            if shared is None or shared._owner != os.getpid() or not shared.alive():
                shared = cls._shared = cls()
            return shared

    def alive(self) -> bool:
        return self._process.poll() is None

    def fork(self, timeout: float = _BOOT_TIMEOUT_S) -> WorkerProcess:
        """A new worker process and the driver's end of its pipe (waits for the template to
        finish loading on first use)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with self._lock:
            try:
                socket.send_fds(self._socket, [b"F"], [theirs.fileno()])
            except OSError as e:
                raise WorkerError(f"the worker template process is gone ({e})") from e
            finally:
                theirs.close()
            deadline = time.monotonic() + timeout
            while not self._started:
                self._read(deadline)
            pid = self._started.pop(0)
        return WorkerProcess(pid, Connection(ours.detach()), self)

    def exit_code(self, pid: int, timeout: float) -> int | None:
        """A worker's exit code (negative: killed by that signal), once the template reaped it."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while pid not in self._exits:
                try:
                    self._read(deadline)
                except WorkerError:
                    return None
            return self._exits.pop(pid)

    def _read(self, deadline: float) -> None:
        """Read one message from the template: ``S pid`` (forked) or ``X pid code`` (exited)."""
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError("the worker template process did not answer in time")
            readable, _, _ = select.select([self._socket], [], [], min(left, 0.5))
            if not readable:
                if not self.alive():
                    raise WorkerError(
                        f"the worker template process exited with code {self._process.returncode}"
                        " (see its error above)"
                    )
                continue
            data = self._socket.recv(4096)
            if not data:
                raise WorkerError("the worker template process closed its connection")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        kind, *fields = line.decode().split()
        if kind == "S":
            self._started.append(int(fields[0]))
        elif kind == "X":
            self._exits[int(fields[0])] = int(fields[1])

    def close(self) -> None:
        """Stop the template (its idle workers, if any, die with it)."""
        with contextlib.suppress(OSError):
            self._socket.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=2)
        if self._process.poll() is None:
            self._process.kill()


class WorkerProcess:
    """A worker forked by the template: its pid, its pipe, and a way to wait for its end."""

    def __init__(self, pid: int, conn: Connection, template: ProcessTemplate) -> None:
        self.pid = pid
        self.conn = conn
        self._template = template
        self._exitcode: int | None = None
        # A pidfd becomes readable when the process ends and cannot name a reused pid.
        self._pidfd: int | None = None
        with contextlib.suppress(AttributeError, OSError):
            self._pidfd = os.pidfd_open(pid)

    @property
    def sentinel(self) -> int | None:
        """A file descriptor readable once the process has ended (None where unsupported)."""
        return self._pidfd

    def is_alive(self) -> bool:
        if self._exitcode is not None:
            return False
        if self._pidfd is not None:
            readable, _, _ = select.select([self._pidfd], [], [], 0)
            return not readable
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            else:
                os.kill(self.pid, signal.SIGKILL)

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to end; True if it has."""
        deadline = time.monotonic() + timeout
        while self.is_alive():
            if time.monotonic() > deadline:
                return False
            if self._pidfd is not None:
                select.select([self._pidfd], [], [], max(0.0, deadline - time.monotonic()))
            else:
                time.sleep(0.01)
        return True

    @property
    def exitcode(self) -> int | None:
        """The exit code once the process has ended (negative: the signal that killed it)."""
        if self._exitcode is None and not self.is_alive():
            self._exitcode = self._template.exit_code(self.pid, timeout=2.0)
        return self._exitcode

    def close(self) -> None:
        self.conn.close()
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None


def join_all(processes: list[WorkerProcess], timeout: float) -> None:
    """Wait for every process to end, ``timeout`` seconds in all (not per process)."""
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))


# The launcher thread -------------------------------------------------------------------------
# The kernel signals a child when the *thread* that started it ends (PR_SET_PDEATHSIG), so the
# template is started from a thread that lives as long as this process, not from whichever
# thread (a notebook's, a test's) runs the first experiment.

_launches: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]]] = queue.Queue()
_launcher: threading.Thread | None = None
_launcher_lock = threading.Lock()


def _spawn_on_long_lived_thread(start: Callable[[], subprocess.Popen[bytes]]) -> Any:
    global _launcher
    with _launcher_lock:
        if _launcher is None or not _launcher.is_alive():
            _launcher = threading.Thread(target=_launch_loop, name="cerebro-launcher", daemon=True)
            _launcher.start()
    answer: queue.Queue[Any] = queue.Queue()
    _launches.put((start, answer))
    result = answer.get()
    if isinstance(result, BaseException):
        raise result
    return result


def _launch_loop() -> None:
    while True:
        start, answer = _launches.get()
        try:
            answer.put(start())
        except BaseException as e:
            answer.put(e)


@atexit.register
def _close_shared() -> None:
    shared = ProcessTemplate._shared
    if shared is not None and shared._owner == os.getpid():  # not a forked copy's to stop
        shared.close()


# The template's side -------------------------------------------------------------------------


def serve(fd: int, driver: int | None = None) -> None:
    """Main loop of the template process: fork a worker for each descriptor received on ``fd``,
    report each child's pid and, once reaped, its exit code. Exits when the driver is gone."""
    from .lifetime import die_with_parent

    die_with_parent(driver)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    if "" in sys.path:  # `python -c` puts the working directory first; workers get the driver's
        sys.path.remove("")
    for module in _PRELOAD:
        __import__(module)
    control = socket.socket(fileno=fd)
    children: set[int] = set()
    while True:
        readable, _, _ = select.select([control], [], [], 0.2 if children else None)
        if readable:
            try:
                _, fds, _, _ = socket.recv_fds(control, 1, 1)
            except OSError:
                fds = []
            if not fds:  # the driver closed the socket, or died
                break
            pid = _fork_worker(fds[0], control)
            os.close(fds[0])
            children.add(pid)
            control.sendall(f"S {pid}\n".encode())
        for pid, status in _reap(children):
            children.discard(pid)
            with contextlib.suppress(OSError):
                control.sendall(f"X {pid} {_exit_code(status)}\n".encode())
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    os._exit(0)


def _fork_worker(fd: int, control: socket.socket) -> int:
    from .lifetime import die_with_parent

    template = os.getpid()
    with warnings.catch_warnings():
        # Python >= 3.12 warns about forking a process with native threads (OpenBLAS's and
        # Arrow's pools); both libraries re-create their pools in the child.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        die_with_parent(template)  # first: the template may be killed at any moment
        control.close()
        from .local import worker_main

        worker_main(Connection(fd))
        code = 0
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        # Skip the interpreter's teardown (torch's is slow) and the template's atexit hooks.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reap(children: set[int]) -> list[tuple[int, int]]:
    ended = []
    for pid in list(children):
        with contextlib.suppress(ChildProcessError):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                ended.append((pid, status))
    return ended


def _exit_code(status: int) -> int:
    """As multiprocessing reports it: the exit status, or minus the signal that killed it."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)
