"""Serving the dashboard with uvicorn: ``cerebro serve``, or beside a run
(``Experiment(..., dashboard=True)``).

The port is bound before anything is served, so a port in use is a clear error at once (and
``port=0`` takes any free one). The server binds to loopback unless told otherwise, and prints
its URL with the token, as Jupyter does.

Example:
    >>> server = DashboardServer("runs/demo", port=0)     # doctest: +SKIP
    >>> server.start(); print(server.url)                 # doctest: +SKIP
    http://127.0.0.1:41235/?token=...
    >>> server.stop()                                     # doctest: +SKIP
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time
from typing import Any

from ..errors import ConfigError, check_int
from ..trackers.base import Tracker
from . import auth

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8300


def check_available() -> None:
    """The dashboard's packages are installed (``pip install cerebro[dashboard]``)."""
    import importlib.util

    missing = [p for p in ("fastapi", "uvicorn", "plotly") if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(
            "dashboard",
            True,
            "the dashboard's packages installed",
            hint=f"missing {', '.join(missing)}: pip install cerebro[dashboard]",
        )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or ConfigError saying why not (port in use, ...)."""
    port = check_int("port", port, minimum=0, maximum=65535)
    if not isinstance(host, str) or not host:
        raise ConfigError("host", host, "an address to listen on, e.g. '127.0.0.1'")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError("host", host, "an address of this machine", hint=str(e)) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(
                "port", port, "a free port", hint=f"{host}:{port} is in use; --port 0 takes any"
            ) from None
        raise ConfigError(
            "host", host, "an address this process can listen on", hint=str(e)
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class DashboardServer:
    """The dashboard over ``path_or_url``, served by uvicorn in a thread of this process.

    Args:
        path_or_url: an experiment folder, a folder of them, or a database URL.
        host: address to listen on (default loopback: only this machine can connect).
        port: TCP port (0: any free one).
        token: the token every API call needs (default: a new random one).
    """

    def __init__(
        self,
        path_or_url: str | os.PathLike,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        token: str | None = None,
    ) -> None:
        check_available()
        self.path_or_url = os.fspath(path_or_url)
        self.host = host
        self.token = token or auth.new_token()
        self._socket = bind(host, port)  # a port in use fails here, before anything is served
        self.port = self._socket.getsockname()[1]
        self._server: Any = None
        self._app: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The page's address with the token (open it once: a cookie keeps the token)."""
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}/?token={self.token}"

    def app(self) -> Any:
        """The FastAPI app (made once; raises ConfigError if there is nothing to serve)."""
        if self._app is None:
            from .app import create_app

            self._app = create_app(self.path_or_url, self.token)
        return self._app

    def _uvicorn(self) -> Any:
        import uvicorn

        config = uvicorn.Config(
            self.app(),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        return uvicorn.Server(config)

    def start(self) -> None:
        """Serve in a background thread (returns once the server accepts connections)."""
        self._server = self._uvicorn()
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            daemon=True,
            name="cerebro-dashboard",
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                raise TimeoutError("the dashboard did not start within 30 s")
            time.sleep(0.02)

    def serve_forever(self) -> None:
        """Serve in this thread until Ctrl-C."""
        server = self._uvicorn()
        server.run(sockets=[self._socket])

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._socket.close()


class DashboardTracker(Tracker):
    """Serves the dashboard while a run goes on (``Experiment(..., dashboard=True)``): it
    starts when the run's loop does (its records exist then) and stops when the run ends.
    The port is bound when the tracker is made, so a port in use fails before any work."""

    def __init__(self, path: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        self.server = DashboardServer(path, host, port)

    @property
    def url(self) -> str:
        return self.server.url

    def run_started(self) -> None:
        self.server.start()
        print(f"cerebro dashboard: {self.server.url}", file=sys.stderr, flush=True)

    def run_finished(self) -> None:
        self.server.stop()
