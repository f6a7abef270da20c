"""What the dashboard shows, read from an experiment's records: typed views, one per API answer.

The records are read through :class:`~cerebro.store.RecordStore` with a few targeted queries
(not a whole :meth:`~cerebro.store.RecordStore.snapshot`), so that an answer stays fast while a
large run goes on writing: the hops are read incrementally (``after`` the last id a page holds),
and whether a model was fused is kept up to date from the hops not seen yet.

Example:
    >>> reader = ExperimentReader.open("runs/demo")          # doctest: +SKIP
    >>> [m.id for m in reader.models() if m.status == "running"]  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from sqlalchemy import func, select

from ..errors import ConfigError, first_line
from ..history import best_epoch, last_metrics, ranking_key
from ..kinds import ControlState, ModelStatus, Origin
from ..store import RecordStore, place
from ..store.records import checkpoints as checkpoints_table
from ..store.records import controls as controls_table
from ..store.records import epochs as epochs_table
from ..store.records import events as events_table
from ..store.records import experiments as experiments_table
from ..store.records import hops as hops_table
from ..store.records import models as models_table
from ..store.records import readable, reading, sqlite_file

HOPS_PAGE = 5000  # the most hops one answer holds (a page asks again from the last id)


@dataclass(frozen=True)
class ExperimentRef:
    """One experiment the server can show: ``key`` names it in the API (``?experiment=key``)."""

    key: str
    name: str
    source: str  # the folder or the database URL (password hidden) it is read from
    experiment_id: int


@dataclass(frozen=True)
class Revision:
    """Counters that change when the records do: a page refetches only what changed."""

    models: float  # the newest model update time
    epochs: int
    hops: int  # the newest hop id
    controls: int  # the newest control id, and how many are settled
    settled: int
    events: int


@dataclass(frozen=True)
class ExperimentView:
    key: str
    id: int
    name: str
    status: str
    created: float
    metric: str
    mode: str
    epochs: int
    space: dict[str, Any] | None
    counts: dict[str, int]
    best: int | None
    revision: Revision


@dataclass(frozen=True)
class ModelSummary:
    """A leaderboard row."""

    id: int
    status: ModelStatus
    origin: Origin
    parent: int | None
    params: dict[str, Any]
    metrics: dict[str, float | None]
    epochs_done: int
    max_epochs: int
    fused: bool
    error: str | None  # the first line of a failed model's error


@dataclass(frozen=True)
class HopView:
    id: int
    model_id: int
    epoch: int
    kind: str
    shard: int
    worker: int
    start: float  # seconds since the experiment was created
    end: float
    unit: int | None
    rows: int


@dataclass(frozen=True)
class EpochView:
    model_id: int
    epoch: int
    finished: float  # seconds since the experiment was created
    metrics: dict[str, float | None]


@dataclass(frozen=True)
class ModelDetail:
    summary: ModelSummary
    history: list[EpochView]
    best_epoch: int | None
    hops: list[HopView]
    events: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]]
    controls: list[dict[str, Any]]
    children: list[int]  # clones of this model
    error: str | None  # the whole traceback of a failed model


@dataclass
class _FusedScan:
    """Which models shared a unit with another model, from the hops up to ``last_id``."""

    last_id: int = 0
    units: dict[int, set[int]] = field(default_factory=dict)
    fused: set[int] = field(default_factory=set)


class UnknownModel(LookupError):
    """A model id the experiment does not have (the API answers 404)."""


class ExperimentReader:
    """Reads one experiment's records for the dashboard (thread-safe: one per experiment)."""

    def __init__(self, store: RecordStore, folder: str | None, key: str = "0") -> None:
        self.store = store
        self.folder = folder
        self.key = key
        self._scan = _FusedScan()
        self._lock = threading.Lock()
        config = store.experiment()["config"]
        self.metric: str = config["metric"]
        self.mode: str = config["mode"]
        self.epochs: int = config["epochs"]

    @classmethod
    def open(
        cls, path_or_url: str | os.PathLike, experiment: int | None = None, key: str = "0"
    ) -> ExperimentReader:
        store, row = RecordStore.find(path_or_url, experiment)
        with reading(path_or_url):
            return cls(store, place.experiment_folder(path_or_url, row), key)

    # Reading ---------------------------------------------------------------------------------

    def experiment(self) -> ExperimentView:
        e = self.store.experiment_id
        with self._read() as conn:
            row = dict(
                conn.execute(
                    select(*readable(experiments_table, self.store.absent)).where(
                        experiments_table.c.id == e
                    )
                )
                .mappings()
                .one()
            )

            def scalar(query: Any) -> Any:
                return conn.execute(query).scalar() or 0

            revision = Revision(
                models=scalar(
                    select(func.max(models_table.c.updated)).where(_mine(models_table, e))
                ),
                epochs=scalar(select(func.count()).where(_mine(epochs_table, e))),
                hops=scalar(select(func.max(hops_table.c.id)).where(_mine(hops_table, e))),
                controls=scalar(
                    select(func.max(controls_table.c.id)).where(_mine(controls_table, e))
                ),
                settled=scalar(
                    select(func.count()).where(
                        _mine(controls_table, e),
                        controls_table.c.state != ControlState.PENDING.value,
                    )
                ),
                events=scalar(select(func.max(events_table.c.id)).where(_mine(events_table, e))),
            )
        models = self.models()
        counts: dict[str, int] = {}
        for m in models:
            counts[m.status.value] = counts.get(m.status.value, 0) + 1
        config = row["config"]
        return ExperimentView(
            key=self.key,
            id=row["id"],
            name=row["name"],
            status=place.live_status(row["status"], self.folder),
            created=row["created"],
            metric=self.metric,
            mode=self.mode,
            epochs=self.epochs,
            space=config.get("space"),
            counts=counts,
            best=best_model(models, self.metric, self.mode),
            revision=revision,
        )

    def models(self) -> list[ModelSummary]:
        """Every model with its last metrics, epochs done and whether it was fused (read with
        a few aggregate queries: only each model's last epoch row is decoded)."""
        fused = self._fused()
        e = self.store.experiment_id
        mine = _mine(epochs_table, e)
        done = (
            select(
                epochs_table.c.model_id,
                func.count().label("done"),
                func.max(epochs_table.c.epoch).label("last"),
            )
            .where(mine)
            .group_by(epochs_table.c.model_id)
            .subquery()
        )
        last = select(done.c.model_id, done.c.done, epochs_table.c.metrics).join(
            epochs_table,
            (epochs_table.c.model_id == done.c.model_id)
            & (epochs_table.c.epoch == done.c.last)
            & mine,
        )
        with self._read() as conn:
            model_rows = _rows(conn, models_table, self.store.absent, e, "model_id")
            lasts = {r.model_id: (r.done, r.metrics) for r in conn.execute(last)}
        return [
            self._summary(m, *lasts.get(m["model_id"], (0, {})), fused=fused) for m in model_rows
        ]

    def model(self, model_id: int) -> ModelDetail:
        e = self.store.experiment_id
        fused = self._fused()
        with self._read() as conn:
            rows = _rows(conn, models_table, self.store.absent, e, "model_id")
            row = next((r for r in rows if r["model_id"] == model_id), None)
            if row is None:
                raise UnknownModel(model_id)
            mine = epochs_table.c.model_id == model_id
            epoch_rows = _rows(conn, epochs_table, self.store.absent, e, "epoch", where=mine)
            hop_rows = _rows(
                conn,
                hops_table,
                self.store.absent,
                e,
                "id",
                where=hops_table.c.model_id == model_id,
            )
            checkpoint_rows = _rows(
                conn,
                checkpoints_table,
                self.store.absent,
                e,
                "epoch",
                where=checkpoints_table.c.model_id == model_id,
            )
            control_rows = _rows(
                conn,
                controls_table,
                self.store.absent,
                e,
                "id",
                where=controls_table.c.model_id == model_id,
            )
            event_rows = _rows(conn, events_table, self.store.absent, e, "id")
        created = self._created()
        history = [{"epoch": r["epoch"], **r["metrics"]} for r in epoch_rows]
        summary = self._summary(row, len(history), last_metrics(history), fused)
        # Outcomes name the models that a request made (clone, add): those are this model's too.
        made = list(_rows_made_by(self, model_id))
        return ModelDetail(
            summary=summary,
            history=[_epoch_view(r, created) for r in epoch_rows],
            best_epoch=best_epoch(history, self.metric, self.mode),
            hops=[_hop_view(r, created) for r in hop_rows],
            events=[
                clean(_event_view(r, created))
                for r in event_rows
                if _mentions(r["detail"], model_id)
            ],
            checkpoints=[
                clean({k: v for k, v in r.items() if k != "experiment_id"}) for r in checkpoint_rows
            ],
            controls=[clean(_control_view(r)) for r in control_rows + made],
            children=[r["model_id"] for r in rows if r["parent"] == model_id],
            error=row["error"],
        )

    def history(self, after: int = 0) -> list[EpochView]:
        """Every recorded epoch in the order they finished; ``after``: skip the first ``after``
        of them (a page that holds them asks for the rest only, and only those are decoded)."""
        e = self.store.experiment_id
        t = epochs_table
        query = (
            select(t.c.model_id, t.c.epoch, t.c.finished, t.c.metrics)
            .where(_mine(t, e))
            .order_by(t.c.finished, t.c.model_id, t.c.epoch)
            .offset(max(after, 0))
        )
        with self._read() as conn:
            rows = [dict(r) for r in conn.execute(query).mappings().all()]
        created = self._created()
        return [_epoch_view(r, created) for r in rows]

    def hops(self, after: int = 0, limit: int = HOPS_PAGE) -> list[HopView]:
        """Hops with an id above ``after``, oldest first (at most ``limit``)."""
        e = self.store.experiment_id
        query = (
            select(*readable(hops_table, self.store.absent, _HOP_FIELDS))
            .where(_mine(hops_table, e), hops_table.c.id > after)
            .order_by(hops_table.c.id)
            .limit(max(1, min(limit, HOPS_PAGE)))
        )
        with self._read() as conn:
            rows = [dict(r) for r in conn.execute(query).mappings().all()]
        created = self._created()
        return [_hop_view(r, created) for r in rows]

    def controls(self) -> list[dict[str, Any]]:
        return [clean(_control_view(r)) for r in self.store.controls()]

    def model_ids(self) -> set[int]:
        return {m["model_id"] for m in self.store.models()}

    # Parts -----------------------------------------------------------------------------------

    def _summary(
        self, row: dict[str, Any], done: int, metrics: dict[str, Any], fused: set[int]
    ) -> ModelSummary:
        error = row["error"]
        return ModelSummary(
            id=row["model_id"],
            status=ModelStatus(row["status"]),
            origin=Origin(row["origin"] or "search"),
            parent=row["parent"],
            params=row["params"],
            metrics={k: finite(v) for k, v in metrics.items()},
            epochs_done=done,
            max_epochs=row["max_epochs"] or self.epochs,
            fused=row["model_id"] in fused,
            error=first_line(Exception(error)) if error else None,
        )

    def _fused(self) -> set[int]:
        """Models that shared a unit with another model (a fused group), from new hops only."""
        e = self.store.experiment_id
        if f"{hops_table.name}.unit" in self.store.absent:
            return set()  # records from before units had ids
        with self._lock:
            scan = self._scan
            query = (
                select(hops_table.c.id, hops_table.c.model_id, hops_table.c.unit)
                .where(_mine(hops_table, e), hops_table.c.id > scan.last_id)
                .order_by(hops_table.c.id)
            )
            with self._read() as conn:
                for hop_id, model_id, unit in conn.execute(query):
                    scan.last_id = hop_id
                    if unit is None:
                        continue
                    members = scan.units.setdefault(unit, set())
                    members.add(model_id)
                    if len(members) > 1:
                        scan.fused |= members
            return set(scan.fused)

    def _created(self) -> float:
        if not hasattr(self, "_created_at"):
            self._created_at = float(self.store.experiment()["created"])
        return self._created_at

    def _read(self) -> Any:
        return _Reading(self.store)


class _Reading:
    """One read transaction (a consistent view while the run writes), database errors as a
    ConfigError naming the records."""

    def __init__(self, store: RecordStore) -> None:
        self.store = store

    def __enter__(self) -> Any:
        self._conn = self.store.engine.connect()
        self._tx = self._conn.begin()
        return self._conn

    def __exit__(self, *exc: Any) -> None:
        try:
            self._tx.rollback()  # nothing was written
        finally:
            self._conn.close()


def _rows_made_by(reader: ExperimentReader, model_id: int) -> Iterator[dict[str, Any]]:
    """Requests (add) whose outcome is this model: they made it."""
    for row in reader.store.controls():
        outcome = row.get("outcome") or {}
        if row["model_id"] != model_id and outcome.get("model_id") == model_id:
            yield row


_HOP_FIELDS = ["id", "model_id", "epoch", "kind", "shard", "worker", "start", "end", "unit", "rows"]


def _mine(table: Any, experiment_id: int) -> Any:
    return table.c.experiment_id == experiment_id


def _rows(
    conn: Any,
    table: Any,
    absent: frozenset[str],
    experiment_id: int,
    *order: str,
    where: Any = None,
) -> list[dict[str, Any]]:
    query = select(*readable(table, absent)).where(_mine(table, experiment_id))
    if where is not None:
        query = query.where(where)
    query = query.order_by(*(table.c[c] for c in order))
    return [dict(r) for r in conn.execute(query).mappings().all()]


def _hop_view(row: dict[str, Any], created: float) -> HopView:
    return HopView(
        id=row["id"],
        model_id=row["model_id"],
        epoch=row["epoch"],
        kind=row["kind"],
        shard=row["shard"],
        worker=row["worker"],
        start=round(row["start"] - created, 4),
        end=round(row["end"] - created, 4),
        unit=row["unit"],
        rows=row["rows"],
    )


def _epoch_view(row: dict[str, Any], created: float) -> EpochView:
    return EpochView(
        model_id=row["model_id"],
        epoch=row["epoch"],
        finished=round(row["finished"] - created, 4),
        metrics={k: finite(v) for k, v in row["metrics"].items()},
    )


def _event_view(row: dict[str, Any], created: float) -> dict[str, Any]:
    return {"time": round(row["time"] - created, 4), "kind": row["kind"], "detail": row["detail"]}


def _control_view(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "experiment_id"}


def _mentions(detail: Any, model_id: int) -> bool:
    if not isinstance(detail, dict):
        return False
    return any(detail.get(k) == model_id for k in ("model", "model_id", "source", "target"))


def finite(value: Any) -> float | None:
    """A metric as JSON can hold it: NaN and infinities become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def clean(value: Any) -> Any:
    """A view as plain JSON: dataclasses as dicts, enums as their values, NaN as None."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: clean(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [clean(v) for v in value]
    if isinstance(value, (ModelStatus, Origin)):
        return value.value
    if isinstance(value, float):
        return finite(value)
    return value


def best_model(models: list[ModelSummary], metric: str, mode: str) -> int | None:
    """The leaderboard's first model, as :meth:`cerebro.Result.ranked` orders them."""
    rank = ranking_key(mode)
    scored = [m for m in models if m.metrics.get(metric) is not None]
    if not scored:
        return None
    first = min(
        scored,
        key=lambda m: (m.status != ModelStatus.COMPLETED, rank(m.metrics[metric] or 0.0), m.id),
    )
    return first.id


# Finding the experiments to show -------------------------------------------------------------


def discover(path_or_url: str | os.PathLike) -> list[tuple[ExperimentRef, str]]:
    """The experiments at a folder, a folder of experiment folders, or a database URL, with
    the source each is read from.

    Raises:
        ConfigError: none there (the message says what was looked for), or an unreachable
            database (its URL shown without the password).
    """
    text = os.fspath(path_or_url)
    if "://" in text:
        return _in_source(text, "")
    if os.path.isfile(sqlite_file(text)):
        return _in_source(text, "")
    if not os.path.isdir(text):
        raise ConfigError(
            "path_or_url",
            text,
            "an experiment folder holding cerebro.db, a folder of such folders, or a database URL",
            hint="no such folder",
        )
    found: list[tuple[ExperimentRef, str]] = []
    for name in sorted(os.listdir(text)):
        sub = os.path.join(text, name)
        if os.path.isfile(sqlite_file(sub)):
            try:
                found += _in_source(sub, name)
            except ConfigError:
                continue  # e.g. a run whose records are still being created
    if not found:
        raise ConfigError(
            "path_or_url",
            text,
            "an experiment folder holding cerebro.db, a folder of such folders, or a database URL",
            hint="neither it nor its sub-folders hold a cerebro.db with an experiment",
        )
    return found


def _in_source(source: str, prefix: str) -> list[tuple[ExperimentRef, str]]:
    from ..errors import shown_url

    store, _ = RecordStore.find(source, None)
    try:
        with reading(source):
            rows = RecordStore.list_experiments(store.engine, store.absent)
    finally:
        store.close()
    refs = []
    for row in rows:
        key = f"{prefix}:{row['id']}" if prefix else str(row["id"])
        refs.append((ExperimentRef(key, row["name"], shown_url(source), row["id"]), source))
    return refs
