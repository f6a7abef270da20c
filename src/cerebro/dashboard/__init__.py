"""The web dashboard: watch and steer a run from the browser (``cerebro serve <path>``).

A FastAPI app (:func:`create_app`) over an experiment's records, served by uvicorn
(:class:`DashboardServer`), with a JSON API that the page and scripts use. It needs the
``dashboard`` extra: ``pip install cerebro[dashboard]``.

Example:
    >>> server = cerebro.dashboard.DashboardServer("runs/demo")  # doctest: +SKIP
    >>> server.start(); server.url                                # doctest: +SKIP
    'http://127.0.0.1:8300/?token=...'
"""

from typing import Any

from .server import DEFAULT_HOST, DEFAULT_PORT, DashboardServer, DashboardTracker

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "DashboardServer", "DashboardTracker", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":  # FastAPI loads only when an app is made
        from .app import create_app

        return create_app
    raise AttributeError(name)
