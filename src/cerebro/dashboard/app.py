"""The dashboard's FastAPI app: the JSON API over an experiment's records and the live page.

Reads go through :class:`~cerebro.dashboard.reader.ExperimentReader`; controls through
:class:`cerebro.Controller`, so that a request from the page is checked exactly as one from
:func:`cerebro.control` or the ``cerebro`` command, and recorded with who asked. Nothing is
uploaded and no code runs from a request.

Answers: 401 without the token, 404 for an unknown model or experiment, 422 for a body that
is not the JSON asked for, 400 with the control layer's message for a bad value, 409 (with the
reason) for a control the model cannot take in its status; any other error is logged here and
answered as a plain 500, never as a traceback.

Example:
    >>> app = create_app("runs/demo", token="secret")         # doctest: +SKIP
    >>> from fastapi.testclient import TestClient              # doctest: +SKIP
    >>> TestClient(app).get("/api/models",
    ...     headers={"Authorization": "Bearer secret"}).json()  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import importlib.resources
import io
import logging
import os
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from ..engine.control import Controller, ControlRejected, ControlRequest
from ..errors import ConfigError, check_bool
from ..store.records import reading
from . import auth
from .reader import ExperimentReader, ExperimentRef, UnknownModel, clean, discover

log = logging.getLogger("cerebro.dashboard")

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")

# Everything the page loads comes from this server: no CDN, no inline script.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the page's first URL holds the token
    "X-Frame-Options": "DENY",
}
WAIT_LIMIT_S = 30.0  # the most a control request waits for the driver (?wait=seconds)


# Request bodies: the shape is checked here (422), the values by the control layer (400).


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CloneBody(_Body):
    params: dict[str, Any] = {}
    warm_start: Any = True
    epochs: Any = None
    force: Any = False


class AddBody(_Body):
    params: dict[str, Any]
    epochs: Any = None
    force: Any = False


class EpochsBody(_Body):
    epochs: Any


class Catalog:
    """The experiments the server shows (found again when a page lists them: a new run in the
    folder appears), each read by its own :class:`ExperimentReader`."""

    def __init__(self, path_or_url: str | os.PathLike) -> None:
        self.path_or_url = os.fspath(path_or_url)
        self._lock = threading.Lock()
        self._readers: dict[str, ExperimentReader] = {}
        self._sources: dict[str, str] = {}
        self.refs: list[ExperimentRef] = []
        self.refresh()  # raises ConfigError: nothing to serve

    def refresh(self) -> list[ExperimentRef]:
        found = discover(self.path_or_url)
        with self._lock:
            self.refs = [ref for ref, _ in found]
            self._sources = {ref.key: source for ref, source in found}
        return self.refs

    def reader(self, key: str | None) -> ExperimentReader:
        with self._lock:
            if key is None:
                key = self.refs[-1].key  # the newest
            if key not in self._sources:
                raise HTTPException(404, f"experiment={key!r}: not one of {list(self._sources)}")
            reader = self._readers.get(key)
            if reader is None:
                ref = next(r for r in self.refs if r.key == key)
                reader = ExperimentReader.open(self._sources[key], ref.experiment_id, key)
                self._readers[key] = reader
            return reader

    def close(self) -> None:
        with self._lock:
            for reader in self._readers.values():
                reader.store.close()
            self._readers.clear()


def create_app(path_or_url: str | os.PathLike, token: str) -> FastAPI:
    """The dashboard over the experiments at ``path_or_url`` (a folder holding ``cerebro.db``,
    a folder of such folders, or a database URL), guarded by ``token``.

    Raises:
        ConfigError: no experiment there, or a database that cannot be reached.
    """
    if not isinstance(token, str) or len(token) < 8:
        raise ConfigError("token", "***", "a string of at least 8 characters")
    catalog = Catalog(path_or_url)
    app = FastAPI(title="Cerebro dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.catalog = catalog

    @app.middleware("http")
    async def _headers(request: Request, call_next: Callable[..., Any]) -> Response:
        try:
            response: Response = await call_next(request)
        except Exception:  # raised past the handlers: never shown
            log.exception("dashboard: %s %s failed", request.method, request.url.path)
            response = JSONResponse({"detail": "internal error (see the server's log)"}, 500)
        response.headers.update(_SECURITY_HEADERS)
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if error.status_code == 401 else None
        return JSONResponse({"detail": error.detail}, error.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, error: RequestValidationError) -> Response:
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in error.errors()
        ]
        return JSONResponse({"detail": "; ".join(problems) or "malformed request"}, 422)

    @app.exception_handler(ConfigError)
    async def _unreadable(request: Request, error: ConfigError) -> Response:
        # Records that cannot be read now (a database gone away): say so, without a trace.
        return JSONResponse({"detail": str(error)}, 503)

    @app.exception_handler(Exception)
    async def _internal(request: Request, error: Exception) -> Response:
        log.error("dashboard: %s %s failed", request.method, request.url.path, exc_info=error)
        return JSONResponse({"detail": "internal error (see the server's log)"}, 500)

    def caller(request: Request) -> auth.Caller:
        client = request.client.host if request.client else "?"
        name = auth.person_name(request.headers.get(auth.WHO_HEADER))
        if auth.token_matches(token, auth.bearer(request.headers.get("authorization"))):
            return auth.Caller(auth.Via.HEADER, client, name)
        if auth.token_matches(token, request.cookies.get(auth.COOKIE)):
            if request.method not in ("GET", "HEAD") and not request.headers.get(auth.CSRF_HEADER):
                raise HTTPException(
                    403, f"a request authenticated by cookie needs {auth.CSRF_HEADER}"
                )
            return auth.Caller(auth.Via.COOKIE, client, name)
        raise HTTPException(401, "the dashboard's token is needed: Authorization: Bearer <token>")

    Authorized = Depends(caller)

    def reader_of(experiment: str | None) -> ExperimentReader:
        with reading(catalog.path_or_url):
            return catalog.reader(experiment)

    def known(reader: ExperimentReader, model_id: int) -> None:
        if model_id not in reader.model_ids():
            raise HTTPException(404, f"model {model_id} is not a model of this experiment")

    # The page ----------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def page(request: Request, token_given: str | None = Query(None, alias="token")) -> Response:
        if token_given is not None:
            if not auth.token_matches(token, token_given):
                return HTMLResponse(_message("That token is not this server's."), 401)
            params = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = "/" + ("?" + urllib.parse.urlencode(params) if params else "")
            response = RedirectResponse(target, 303)
            response.set_cookie(auth.COOKIE, token, httponly=True, samesite="strict", path="/")
            return response
        if not auth.token_matches(token, request.cookies.get(auth.COOKIE)):
            return HTMLResponse(
                _message("Open the URL that <code>cerebro serve</code> printed (with ?token=)."),
                401,
            )
        with open(os.path.join(STATIC, "index.html"), encoding="utf-8") as f:
            return HTMLResponse(f.read())

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/vendor/plotly.min.js", include_in_schema=False)
    def plotly_js() -> Response:
        return FileResponse(plotly_path(), media_type="application/javascript")

    # Reading -----------------------------------------------------------------------------

    @app.get("/api/experiments")
    def experiments(_: auth.Caller = Authorized) -> Any:
        with reading(catalog.path_or_url):
            return clean(catalog.refresh())

    @app.get("/api/experiment")
    def experiment(experiment: str | None = None, _: auth.Caller = Authorized) -> Any:
        reader = reader_of(experiment)
        with reading(catalog.path_or_url):
            return clean(reader.experiment())

    @app.get("/api/models")
    def models(experiment: str | None = None, _: auth.Caller = Authorized) -> Any:
        reader = reader_of(experiment)
        with reading(catalog.path_or_url):
            return clean(reader.models())

    @app.get("/api/models.csv")
    def models_csv(experiment: str | None = None, _: auth.Caller = Authorized) -> Response:
        reader = reader_of(experiment)
        with reading(catalog.path_or_url):
            rows = reader.models()
        table = [
            {
                "model_id": m.id,
                "status": m.status.value,
                "origin": m.origin.value,
                "parent": m.parent,
                "epochs_done": m.epochs_done,
                "max_epochs": m.max_epochs,
                "fused": m.fused,
                **{f"param_{k}": v for k, v in m.params.items()},
                **m.metrics,
            }
            for m in rows
        ]
        return _csv(table, "leaderboard.csv")

    @app.get("/api/models/{model_id}")
    def model(model_id: int, experiment: str | None = None, _: auth.Caller = Authorized) -> Any:
        reader = reader_of(experiment)
        with reading(catalog.path_or_url):
            try:
                return clean(reader.model(model_id))
            except UnknownModel:
                raise HTTPException(
                    404, f"model {model_id} is not a model of this experiment"
                ) from None

    @app.get("/api/history")
    def history(experiment: str | None = None, after: int = 0, _: auth.Caller = Authorized) -> Any:
        reader = reader_of(experiment)
        with reading(catalog.path_or_url):
            return clean(reader.history(after))

    @app.get("/api/history.csv")
    def history_csv(experiment: str | None = None, _: auth.Caller = Authorized) -> Response:
        reader = reader_of(experiment)
        with reading(catalog.path_or_url):
            rows = reader.history()
        table = [
            {"model_id": r.model_id, "epoch": r.epoch, "finished_s": r.finished, **r.metrics}
            for r in rows
        ]
        return _csv(table, "history.csv")

    @app.get("/api/hops")
    def hops(
        experiment: str | None = None,
        after: int = 0,
        limit: int = Query(5000, ge=1, le=5000),
        _: auth.Caller = Authorized,
    ) -> Any:
        reader = reader_of(experiment)
        with reading(catalog.path_or_url):
            return clean(reader.hops(after, limit))

    @app.get("/api/controls")
    def controls(experiment: str | None = None, _: auth.Caller = Authorized) -> Any:
        reader = reader_of(experiment)
        with reading(catalog.path_or_url):
            return reader.controls()

    # Controls ----------------------------------------------------------------------------

    def controller(reader: ExperimentReader, who: auth.Caller) -> Controller:
        return Controller(reader.store, reader.folder, who=who.who)

    def request(
        reader: ExperimentReader,
        who: auth.Caller,
        model_id: int | None,
        make: Callable[[Controller], ControlRequest],
        wait: float,
    ) -> Any:
        with reading(catalog.path_or_url):
            if model_id is not None:
                known(reader, model_id)
            ctl = controller(reader, who)
            try:
                made = make(ctl)
            except ConfigError as e:
                # The model cannot take it in its status (stop a completed model, ...): 409;
                # any other bad value: 400. Both with the control layer's own message.
                status = 409 if e.argument == "model_id" and model_id is not None else 400
                raise HTTPException(status, str(e)) from None
            answer: dict[str, Any] = {
                "control": made.id,
                "op": made.op.value,
                "model_id": made.model_id,
                "who": ctl.who,
                "state": "pending",
            }
            if wait > 0:
                try:
                    answer["outcome"] = made.wait(timeout=min(wait, WAIT_LIMIT_S))
                    answer["state"] = "applied"
                except ControlRejected as e:
                    raise HTTPException(409, str(e)) from None
                except TimeoutError as e:
                    answer["note"] = str(e)
            return JSONResponse(clean(answer), 202 if answer["state"] == "pending" else 200)

    @app.post("/api/models/{model_id}/stop")
    def stop(
        model_id: int, experiment: str | None = None, wait: float = 0, who: auth.Caller = Authorized
    ) -> Any:
        return request(reader_of(experiment), who, model_id, lambda c: c.stop(model_id), wait)

    @app.post("/api/models/{model_id}/resume")
    def resume(
        model_id: int, experiment: str | None = None, wait: float = 0, who: auth.Caller = Authorized
    ) -> Any:
        return request(reader_of(experiment), who, model_id, lambda c: c.resume(model_id), wait)

    @app.post("/api/models/{model_id}/clone")
    def clone(
        model_id: int,
        body: CloneBody,
        experiment: str | None = None,
        wait: float = 0,
        who: auth.Caller = Authorized,
    ) -> Any:
        def make(c: Controller) -> ControlRequest:
            force = check_bool("force", body.force)
            return c.clone(model_id, body.params, body.warm_start, body.epochs, force)

        return request(reader_of(experiment), who, model_id, make, wait)

    @app.post("/api/models/{model_id}/epochs")
    def set_epochs(
        model_id: int,
        body: EpochsBody,
        experiment: str | None = None,
        wait: float = 0,
        who: auth.Caller = Authorized,
    ) -> Any:
        return request(
            reader_of(experiment),
            who,
            model_id,
            lambda c: c.set_epochs(model_id, body.epochs),
            wait,
        )

    @app.post("/api/models")
    def add(
        body: AddBody, experiment: str | None = None, wait: float = 0, who: auth.Caller = Authorized
    ) -> Any:
        def make(c: Controller) -> ControlRequest:
            force = check_bool("force", body.force)
            return c.add(body.params, body.epochs, force)

        return request(reader_of(experiment), who, None, make, wait)

    return app


def plotly_path() -> str:
    """plotly.js as the ``plotly`` wheel ships it (served by the dashboard: no CDN)."""
    try:
        path = importlib.resources.files("plotly") / "package_data" / "plotly.min.js"
    except ModuleNotFoundError as e:
        raise ConfigError(
            "dashboard", True, "the plotly package", hint="pip install cerebro[dashboard]"
        ) from e
    return str(path)


def _csv(rows: list[dict[str, Any]], name: str) -> Response:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return Response(
        out.getvalue(),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


def _message(text: str) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Cerebro</title>"
        "<link rel='stylesheet' href='/static/dashboard.css'></head>"
        f"<body><main class='message'><h1>Cerebro</h1><p>{text}</p></main></body></html>"
    )


__all__ = ["CSP", "Catalog", "create_app", "plotly_path"]
