"""Experiment records through SQLAlchemy: SQLite file by default, any SQLAlchemy URL otherwise.

Tables: ``experiments``, ``models`` (params, status, error), ``epochs`` (metrics of each model and
epoch) and ``hops`` (every unit a worker ran: model, epoch, kind, shard, worker, unit, times,
rows, metrics). Search decisions and results are derived from these rows.

The tables carry a schema version (:mod:`.schema`): a writer's :func:`open_engine` upgrades an
older store, a reader reads it as it is, and both refuse a store written by a newer Cerebro.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import pandas as pd
from sqlalchemy import (
    JSON,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    null,
    select,
    update,
)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from ..errors import ConfigError, first_line, shown_url
from ..kinds import ControlState, ExperimentStatus
from . import schema

metadata = MetaData()

experiments = Table(
    "experiments",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False),
    Column("created", Float, nullable=False),
    Column("status", String(20), nullable=False),
    Column("config", JSON, nullable=False),
)

models = Table(
    "models",
    metadata,
    Column("experiment_id", Integer, primary_key=True),
    Column("model_id", Integer, primary_key=True),
    Column("params", JSON, nullable=False),
    Column("status", String(20), nullable=False),
    Column("error", Text),
    Column("created", Float, nullable=False),
    Column("updated", Float, nullable=False),
    # "search" (proposed by the search), "add" or "clone" (by a person); a clone's source.
    Column("origin", String(20), nullable=False, default="search"),
    Column("parent", Integer),
    Column("max_epochs", Integer),  # this model's own epoch budget (None: the experiment's)
    # The newest version of its training state written durably (its state file); the current
    # version, handed from worker to worker in memory, may be ahead of it (schema version 3).
    Column("durable_version", Integer),
)

epochs = Table(
    "epochs",
    metadata,
    Column("experiment_id", Integer, primary_key=True),
    Column("model_id", Integer, primary_key=True),
    Column("epoch", Integer, primary_key=True),
    Column("metrics", JSON, nullable=False),
    Column("finished", Float, nullable=False),
)

hops = Table(
    "hops",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("experiment_id", Integer, nullable=False, index=True),
    Column("model_id", Integer, nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("kind", String(8), nullable=False),
    Column("shard", Integer, nullable=False),
    Column("worker", Integer, nullable=False),
    Column("start", Float, nullable=False),
    Column("end", Float, nullable=False),
    Column("rows", Integer, nullable=False),
    Column("load_s", Float, nullable=False),
    Column("save_s", Float),
    Column("metrics", JSON, nullable=False),
    Column("unit", Integer),  # the id of the unit that ran it (None: recorded before version 2)
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("experiment_id", Integer, primary_key=True),
    Column("model_id", Integer, primary_key=True),
    Column("epoch", Integer, primary_key=True),
    Column("path", Text, nullable=False),
    Column("checksum", String(64), nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("created", Float, nullable=False),
    Column("pruned", Integer, nullable=False, default=0),
)

events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("experiment_id", Integer, nullable=False, index=True),
    Column("time", Float, nullable=False),
    Column("kind", String(40), nullable=False),
    Column("detail", JSON, nullable=False),
)

# Requests of a person to a running (or finished) experiment, applied by its driver.
controls = Table(
    "controls",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("experiment_id", Integer, nullable=False, index=True),
    Column("requested", Float, nullable=False),
    Column("who", String(200), nullable=False),
    Column("op", String(20), nullable=False),
    Column("model_id", Integer),
    Column("params", JSON),
    Column("options", JSON, nullable=False),
    Column("state", String(20), nullable=False),  # pending, applied, rejected
    Column("settled", Float),
    Column("outcome", JSON),  # e.g. {"model_id": 9} for add and clone
    Column("error", Text),
)

# Statements the driver's loop makes for every hop and epoch, built once: building one costs
# ~100 us, five times as much as running it with new values (SQLite; measured). Bound
# parameters: "x" the experiment, "m" the model, "e" the epoch.
_INSERT_HOPS = insert(hops)
_INSERT_EPOCH = insert(epochs)
_INSERT_EVENT = insert(events)
_INSERT_CHECKPOINT = insert(checkpoints)
_OF_MODEL = (models.c.experiment_id == bindparam("x"), models.c.model_id == bindparam("m"))
_SET_STATUS = update(models).where(*_OF_MODEL)
_SET_DURABLE = (
    update(models).where(*_OF_MODEL).values(durable_version=bindparam("v"), updated=bindparam("u"))
)
_SET_SAVE_TIME = (
    update(hops)
    .where(
        hops.c.experiment_id == bindparam("x"),
        hops.c.model_id == bindparam("m"),
        hops.c.epoch == bindparam("e"),
        hops.c.shard == bindparam("s"),
        hops.c.kind == "train",
    )
    .values(save_s=bindparam("t"))
)
_OF_CHECKPOINT = (
    checkpoints.c.experiment_id == bindparam("x"),
    checkpoints.c.model_id == bindparam("m"),
)
_DELETE_CHECKPOINT = delete(checkpoints).where(
    *_OF_CHECKPOINT, checkpoints.c.epoch == bindparam("e")
)
_SET_PRUNED = (
    update(checkpoints)
    .where(*_OF_CHECKPOINT, checkpoints.c.epoch.in_(bindparam("es", expanding=True)))
    .values(pruned=1)
)

# The longest queued hop records and durable versions wait for a write of their own in a batch.
QUEUED_S = 0.25

HOP_COLUMNS = [
    "model_id",
    "epoch",
    "kind",
    "shard",
    "worker",
    "start",
    "end",
    "rows",
    "load_s",
    "save_s",
    "metrics",
    "unit",
]


@dataclass(frozen=True)
class Snapshot:
    """All records of one experiment at one moment."""

    experiment: dict[str, Any]
    models: list[dict[str, Any]]
    epochs: list[dict[str, Any]]
    hops: pd.DataFrame
    events: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]]
    controls: list[dict[str, Any]]


def sqlite_file(path: str) -> str:
    """The default records of an experiment: ``<path>/cerebro.db``."""
    return os.path.join(path, "cerebro.db")


def sqlite_url(path: str) -> str:
    return "sqlite:///" + os.path.abspath(sqlite_file(path))


def reader_url(file: str) -> str | URL:
    """How a reader opens a SQLite file of records without writing to it.

    Where the file's folder is writable, plainly: SQLite keeps its -wal and -shm files there while
    it reads (a live run's newest transactions are in them) and removes them after. A read-only
    folder (an archived run, a read-only mount) cannot hold them, so the file opens read-only,
    and immutable when it has no -wal file (a writer in WAL mode always has one).
    """
    file = os.path.abspath(file)
    if os.access(os.path.dirname(file), os.W_OK):
        return "sqlite:///" + file
    options = "mode=ro" if os.path.exists(file + "-wal") else "mode=ro&immutable=1"
    database = f"file:{urllib.parse.quote(file)}?{options}"
    return URL.create("sqlite", database=database, query={"uri": "true"})


class Fault(Enum):
    """Why a SQLite file holds no readable cerebro experiment."""

    MISSING = "missing"
    EMPTY = "empty"
    UNREADABLE = "unreadable"
    FOREIGN = "not cerebro's"  # another program's database: never cerebro's to delete


@dataclass(frozen=True)
class RecordsProblem:
    """A SQLite file that holds no readable cerebro experiment: its :class:`Fault` and what
    was found. ``str()`` says both, e.g. ``"missing (no cerebro.db)"``."""

    fault: Fault
    detail: str

    def __str__(self) -> str:
        return f"{self.fault.value} ({self.detail})"


def sqlite_problem(file: str) -> RecordsProblem | None:
    """Why a SQLite file holds no readable cerebro experiment, e.g. ``missing (no cerebro.db)``,
    or None if it holds one. Found without writing anything."""
    problem = _file_problem(file)
    if problem is not None:
        return problem
    engine = open_engine(reader_url(file), create=False)
    try:
        return _tables_problem(engine, os.path.basename(file))
    finally:
        engine.dispose()


def _file_problem(file: str) -> RecordsProblem | None:
    """A file that is missing or empty (found without opening it)."""
    name = os.path.basename(file)
    if not os.path.isfile(file):
        return RecordsProblem(Fault.MISSING, f"no {name}")
    if os.path.getsize(file) == 0:
        return RecordsProblem(Fault.EMPTY, f"{name} has 0 bytes: it holds no experiment")
    return None


def _tables_problem(engine: Engine, name: str) -> RecordsProblem | None:
    """What a SQLite database opened by a reader's ``engine`` lacks to hold an experiment."""
    count = 0
    try:
        with engine.connect() as conn:
            tables = conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='table'")
            names = sorted(row[0] for row in tables)
            if "experiments" in names:
                count = conn.execute(select(func.count()).select_from(experiments)).scalar_one()
    except SQLAlchemyError as e:
        return RecordsProblem(
            Fault.UNREADABLE, f"{name} is not a cerebro database or is damaged: {database_cause(e)}"
        )
    if names and "experiments" not in names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        return RecordsProblem(
            Fault.FOREIGN, f"{name} is not a cerebro database: its tables are {shown}"
        )
    if not names or not count:
        return RecordsProblem(Fault.EMPTY, f"{name} holds no experiment")
    return None


def database_cause(error: SQLAlchemyError) -> str:
    """The database's own words (``file is not a database``), without SQLAlchemy's wrapping."""
    return first_line(getattr(error, "orig", None) or error)


@contextlib.contextmanager
def reading(path_or_url: str | os.PathLike) -> Iterator[None]:
    """Database errors while records are read, as a ConfigError naming where they are."""
    try:
        yield
    except SQLAlchemyError as e:
        text = os.fspath(path_or_url)
        where = "the database" if "://" in text else os.path.basename(sqlite_file(text))
        raise ConfigError(
            "path_or_url",
            shown_url(text),
            "a reachable, readable cerebro database",
            hint=f"{where} is not a cerebro database or is unreadable: {database_cause(e)}",
        ) from e


def normalize_url(url: str) -> str:
    """Check a storage URL; plain ``postgresql://`` uses psycopg 3 when psycopg2 is absent."""
    try:
        parsed = make_url(url)
    except (ArgumentError, TypeError) as e:
        raise ConfigError(
            "storage", shown_url(url), "a SQLAlchemy URL such as 'postgresql://user:pw@host/db'"
        ) from e
    psycopg3_only = importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec(
        "psycopg"
    )
    if parsed.drivername == "postgresql" and psycopg3_only:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def open_engine(url: str | URL, create: bool = True) -> Engine:
    """A SQLAlchemy engine; SQLite files use WAL so readers never block the run.

    ``create``: a writer's engine. It sets WAL mode and brings the records to this code's
    schema version (:func:`schema.upgrade`: tables made in an empty database, an older store
    upgraded; one version query when it is current). Readers pass False: the engine writes
    nothing (WAL mode is kept in the file by its writer, and an archived run may be read-only)
    and does not look at the records yet (see :meth:`RecordStore.find`).

    Raises:
        RecordsTooNew: with ``create``, records written by a newer Cerebro.
    """
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
            # pysqlite opens no transaction for SELECTs; take control so that a read
            # transaction is one consistent snapshot (SQLAlchemy's documented recipe).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            if create:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # A migration asks for BEGIN IMMEDIATE: the write lock before its first read.
            conn.exec_driver_sql(conn.get_execution_options().get("cerebro_begin", "BEGIN"))

    if create:
        try:
            schema.upgrade(engine, metadata, schema.describe(engine))
        except BaseException:
            engine.dispose()
            raise
    return engine


class RecordStore:
    """Reads and writes one experiment's records.

    Example:
        >>> store = RecordStore.create("sqlite:///runs/x/cerebro.db", "x", {})  # doctest: +SKIP
    """

    def __init__(
        self, engine: Engine, experiment_id: int, absent: frozenset[str] = frozenset()
    ) -> None:
        self.engine = engine
        self.experiment_id = experiment_id
        # Columns an older store (opened by a reader, which never upgrades) lacks: read as None.
        self.absent = absent
        self._in_batch = False  # inside batch(): writes share one transaction
        self._batch: Connection | None = None  # that transaction's connection, once opened
        self._queued = _Queued()  # writes of hops and versions not made yet
        self._flushed = time.monotonic()  # when queued writes were last made

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Make every write inside one transaction (one commit instead of one per write), as
        the driver does with the events of one poll; nested batches join the outer one. What
        was written before an error inside is committed all the same (each record is a fact of
        its own).

        Hop records, hop save times and durable versions are queued instead, and written
        together (each kind in one statement) with the next other write, or at a batch's end
        once they have waited ``QUEUED_S``: a poll that only records hops then costs no
        transaction at all. Readers see them that much later; a crash loses at most those,
        and resume re-inserts every hop that a state file holds (see
        :mod:`cerebro.engine.recovery`)."""
        if self._in_batch:
            yield
            return
        self._in_batch = True
        try:
            yield
        finally:
            self._in_batch = False
            conn, self._batch = self._batch, None
            if conn is None and self._queued and time.monotonic() - self._flushed >= QUEUED_S:
                conn = self.engine.connect()
                conn.begin()
            if conn is not None:
                with conn:
                    try:
                        self._flush(conn)
                        conn.commit()
                    except BaseException:
                        conn.rollback()
                        raise

    @contextlib.contextmanager
    def _begin(self) -> Iterator[Connection]:
        """A transaction for one write, with the queued writes made first (so that writes
        keep their order): the open batch's, else a new one."""
        if not self._in_batch:
            with self.engine.begin() as conn:
                self._flush(conn)
                yield conn
            return
        if self._batch is None:
            self._batch = self.engine.connect()
            self._batch.begin()
        self._flush(self._batch)
        yield self._batch

    def flush(self) -> None:
        """Write what is queued now (outside a batch; inside one it waits for the batch's end)."""
        if self._queued and not self._in_batch:
            with self._begin():
                pass

    def _flush(self, conn: Connection) -> None:
        queued, self._queued = self._queued, _Queued()
        self._flushed = time.monotonic()
        if queued.hops:
            conn.execute(_INSERT_HOPS, queued.hops)
        x = self.experiment_id
        if queued.save_times:
            conn.execute(_SET_SAVE_TIME, [{"x": x, **row} for row in queued.save_times])
        if queued.durable:
            now = time.time()
            conn.execute(
                _SET_DURABLE,
                [{"x": x, "m": m, "v": v, "u": now} for m, v in queued.durable.items()],
            )

    @classmethod
    def create(cls, url: str, name: str, config: dict[str, Any]) -> RecordStore:
        engine = open_engine(url)
        with engine.begin() as conn:
            result = conn.execute(
                insert(experiments).values(
                    name=name,
                    created=time.time(),
                    status=ExperimentStatus.RUNNING.value,
                    config=jsonable(config),
                )
            )
            key = result.inserted_primary_key
            assert key is not None  # a single-row insert() without returning() always has one
            experiment_id = int(key[0])
        return cls(engine, experiment_id)

    @classmethod
    def find(
        cls, path_or_url: str | os.PathLike, experiment: str | int | None
    ) -> tuple[RecordStore, dict[str, Any]]:
        """The store of a recorded experiment (by name or id; default the newest) found at an
        experiment folder holding ``cerebro.db`` or at a database URL, and its row.

        A reader's: it makes no table and sets no mode (an empty or foreign file stays as it
        is), opens a read-only archived run, and never upgrades the schema: records of an older
        version are read as they are (columns added since read as None), one SQLite file is
        opened once.

        Raises:
            ConfigError: no readable experiment there; RecordsTooNew (a ConfigError) for
                records written by a newer Cerebro.
        """
        text = os.fspath(path_or_url)
        if "://" in text:
            url: str | URL = normalize_url(text)
        elif os.path.isfile(sqlite_file(text)):
            url = reader_url(sqlite_file(text))
        else:
            raise ConfigError(
                "path_or_url", text, "an experiment folder holding cerebro.db, or a database URL"
            )
        try:
            engine = open_engine(url, create=False)
        except SQLAlchemyError as e:
            raise ConfigError(
                "path_or_url", shown_url(text), "a reachable Cerebro database", hint=first_line(e)
            ) from e
        try:
            if "://" not in text:
                file = sqlite_file(text)
                problem = _file_problem(file) or _tables_problem(engine, os.path.basename(file))
                if problem is not None:
                    raise ConfigError(
                        "path_or_url",
                        text,
                        "an experiment folder whose cerebro.db holds a cerebro experiment",
                        hint=f"its records are {problem}",
                    )
            try:
                revision = schema.check(engine, schema.describe(engine))
                absent = schema.absent_columns(engine, metadata, revision)
                rows = cls.list_experiments(engine, absent)
            except SQLAlchemyError as e:
                raise ConfigError(
                    "path_or_url",
                    shown_url(text),
                    "a reachable Cerebro database",
                    hint=first_line(e),
                ) from e
            if not rows:
                raise ConfigError(
                    "path_or_url", shown_url(text), "a database that holds a cerebro experiment"
                )
            if experiment is not None:
                rows = [r for r in rows if experiment in (r["id"], r["name"])]
            if not rows:
                raise ConfigError(
                    "experiment", experiment, "an experiment recorded in that database"
                )
        except BaseException:
            engine.dispose()
            raise
        row = max(rows, key=lambda r: r["id"])
        return cls(engine, row["id"], absent), row

    @staticmethod
    def delete_experiment(engine: Engine, experiment_id: int) -> None:
        """Remove one experiment and all of its records."""
        with engine.begin() as conn:
            for table in (hops, epochs, models, events, checkpoints, controls):
                conn.execute(delete(table).where(table.c.experiment_id == experiment_id))
            conn.execute(delete(experiments).where(experiments.c.id == experiment_id))

    @staticmethod
    def list_experiments(
        engine: Engine, absent: frozenset[str] = frozenset()
    ) -> list[dict[str, Any]]:
        """Every experiment recorded in a database, oldest first."""
        query = select(*readable(experiments, absent)).order_by(experiments.c.id)
        with engine.begin() as conn:
            rows = conn.execute(query).mappings().all()
        return [dict(r) for r in rows]

    def set_experiment_status(self, status: str) -> None:
        with self._begin() as conn:
            conn.execute(
                update(experiments)
                .where(experiments.c.id == self.experiment_id)
                .values(status=status)
            )

    def update_config(self, **values: Any) -> None:
        """Replace some entries of the experiment's config (the others are kept)."""
        where = experiments.c.id == self.experiment_id
        with self._begin() as conn:
            config = conn.execute(select(experiments.c.config).where(where)).scalar_one()
            conn.execute(
                update(experiments).where(where).values(config={**config, **jsonable(values)})
            )

    def note_lost_driver(self) -> bool:
        """For a driver that holds the experiment path's lock: a recorded status of ``running``
        means the driver before it died without a word (SIGKILL, power loss). Marks the
        experiment ``interrupted``, with a ``driver_lost`` event; True if it was."""
        with self._begin() as conn:
            changed = conn.execute(
                update(experiments)
                .where(
                    experiments.c.id == self.experiment_id,
                    experiments.c.status == ExperimentStatus.RUNNING.value,
                )
                .values(status=ExperimentStatus.INTERRUPTED.value)
            ).rowcount
            if changed:
                note = "the previous driver ended without recording it (killed, or its host died)"
                self._insert_event(conn, "driver_lost", {"note": note})
        return bool(changed)

    def add_model(
        self,
        model_id: int,
        params: dict[str, Any],
        status: str,
        error: str | None,
        origin: str = "search",
        parent: int | None = None,
        max_epochs: int | None = None,
    ) -> None:
        now = time.time()
        with self._begin() as conn:
            conn.execute(
                insert(models).values(
                    experiment_id=self.experiment_id,
                    model_id=model_id,
                    params=jsonable(params),
                    status=status,
                    error=error,
                    created=now,
                    updated=now,
                    origin=origin,
                    parent=parent,
                    max_epochs=max_epochs,
                )
            )

    def update_model(self, model_id: int, **values: Any) -> None:
        """Change a model's params, max_epochs or status (and error) in one transaction."""
        if "params" in values:
            values["params"] = jsonable(values["params"])
        with self._begin() as conn:
            conn.execute(
                update(models)
                .where(models.c.experiment_id == self.experiment_id, models.c.model_id == model_id)
                .values(updated=time.time(), **values)
            )

    def set_model_status(self, model_id: int, status: str, error: str | None = None) -> None:
        with self._begin() as conn:
            conn.execute(
                _SET_STATUS,
                {"x": self.experiment_id, "m": model_id, "status": status, "error": error,
                 "updated": time.time()},
            )  # fmt: skip

    def add_epoch(
        self,
        model_id: int,
        epoch: int,
        metrics: dict[str, float],
        status: str | None = None,
        event: tuple[str, dict[str, Any]] | None = None,
    ) -> None:
        """Record an epoch's metrics, with the decision taken on it (a new status and its
        event) in the same transaction, so that a resumed run never has to decide again."""
        now = time.time()
        with self._begin() as conn:
            conn.execute(
                _INSERT_EPOCH,
                {"experiment_id": self.experiment_id, "model_id": model_id, "epoch": epoch,
                 "metrics": metrics, "finished": now},
            )  # fmt: skip
            if status is not None:
                conn.execute(
                    _SET_STATUS,
                    {"x": self.experiment_id, "m": model_id, "status": status, "updated": now},
                )
            if event is not None:
                self._insert_event(conn, *event)

    def add_hop(
        self,
        *,
        model_id: int,
        epoch: int,
        kind: str,
        shard: int,
        worker: int,
        start: float,
        end: float,
        rows: int,
        load_s: float,
        save_s: float | None,
        metrics: dict[str, float],
        unit: int | None = None,
    ) -> None:
        """Record a hop: what ``worker`` ran of ``model_id`` on ``shard`` (``kind`` "train" or
        "eval") in ``epoch``, as part of unit ``unit`` (its id; None when not known)."""
        row = {
            "experiment_id": self.experiment_id,
            "model_id": model_id,
            "epoch": epoch,
            "kind": kind,
            "shard": shard,
            "worker": worker,
            "start": start,
            "end": end,
            "rows": rows,
            "load_s": load_s,
            "save_s": save_s,
            "metrics": metrics,
            "unit": unit,
        }
        self._queued.hops.append(row)
        self._write_queued()

    def add_event(self, kind: str, **detail: Any) -> None:
        """Something that happened to the run as a whole (e.g. a worker was lost)."""
        with self._begin() as conn:
            self._insert_event(conn, kind, detail)

    def _insert_event(self, conn: Any, kind: str, detail: dict[str, Any]) -> None:
        conn.execute(
            _INSERT_EVENT,
            {"experiment_id": self.experiment_id, "time": time.time(), "kind": kind,
             "detail": jsonable(detail)},
        )  # fmt: skip

    # Controls ----------------------------------------------------------------------------------

    def request_control(
        self,
        op: str,
        who: str,
        model_id: int | None = None,
        params: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
    ) -> int:
        """Queue a person's request; the experiment's driver applies it. Returns its id."""
        with self._begin() as conn:
            result = conn.execute(
                insert(controls).values(
                    experiment_id=self.experiment_id,
                    requested=time.time(),
                    who=who,
                    op=op,
                    model_id=model_id,
                    params=jsonable(params) if params is not None else None,
                    options=jsonable(options or {}),
                    state=ControlState.PENDING.value,
                )
            )
            key = result.inserted_primary_key
            assert key is not None  # a single-row insert() without returning() always has one
            return int(key[0])

    def controls(
        self, pending_only: bool = False, control_id: int | None = None
    ) -> list[dict[str, Any]]:
        """Control requests (all, the pending ones, or one), oldest first."""
        query = select(*readable(controls, self.absent)).order_by(controls.c.id)
        if pending_only:
            query = query.where(controls.c.state == ControlState.PENDING.value)
        if control_id is not None:
            query = query.where(controls.c.id == control_id)
        return self._rows(query, controls)

    def settle_control(
        self,
        control_id: int,
        state: str,
        outcome: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        """Mark a request applied or rejected (only once: a settled request stays settled)."""
        with self._begin() as conn:
            conn.execute(
                update(controls)
                .where(controls.c.id == control_id, controls.c.state == ControlState.PENDING.value)
                .values(
                    state=state,
                    settled=time.time(),
                    outcome=jsonable(outcome) if outcome is not None else None,
                    error=error,
                )
            )

    def add_checkpoint(
        self, model_id: int, epoch: int, path: str, checksum: str, size: int
    ) -> None:
        with self._begin() as conn:
            conn.execute(_DELETE_CHECKPOINT, {"x": self.experiment_id, "m": model_id, "e": epoch})
            conn.execute(
                _INSERT_CHECKPOINT,
                {"experiment_id": self.experiment_id, "model_id": model_id, "epoch": epoch,
                 "path": path, "checksum": checksum, "bytes": size, "created": time.time(),
                 "pruned": 0},
            )  # fmt: skip

    def set_checkpoints_pruned(self, model_id: int, epochs: list[int]) -> None:
        with self._begin() as conn:
            conn.execute(_SET_PRUNED, {"x": self.experiment_id, "m": model_id, "es": epochs})

    def forget_epochs_after(self, model_id: int, epoch: int) -> None:
        """Delete a model's records of epochs after ``epoch`` (it will train them again)."""
        with self._begin() as conn:
            for table in (hops, epochs, checkpoints):
                conn.execute(
                    delete(table).where(
                        table.c.experiment_id == self.experiment_id,
                        table.c.model_id == model_id,
                        table.c.epoch > epoch,
                    )
                )

    def delete_hop(self, model_id: int, epoch: int, kind: str, shard: int) -> None:
        with self._begin() as conn:
            conn.execute(
                delete(hops).where(
                    hops.c.experiment_id == self.experiment_id,
                    hops.c.model_id == model_id,
                    hops.c.epoch == epoch,
                    hops.c.kind == kind,
                    hops.c.shard == shard,
                )
            )

    def delete_hops(self, model_id: int, epoch: int, keep_train_shards: list[int]) -> None:
        """Forget a model's hops from ``epoch`` on, except the training hops of those shards."""
        with self._begin() as conn:
            mine = (hops.c.experiment_id == self.experiment_id) & (hops.c.model_id == model_id)
            conn.execute(delete(hops).where(mine, hops.c.epoch > epoch))
            conn.execute(
                delete(hops).where(
                    mine,
                    hops.c.epoch == epoch,
                    (hops.c.kind != "train") | hops.c.shard.not_in(keep_train_shards),
                )
            )

    def set_durable_version(self, model_id: int, version: int) -> None:
        """The newest version of the model's state in its state file."""
        self._queued.durable[model_id] = version
        self._write_queued()

    def set_hop_save_time(self, model_id: int, epoch: int, shard: int, save_s: float) -> None:
        self._queued.save_times.append({"m": model_id, "e": epoch, "s": shard, "t": save_s})
        self._write_queued()

    def _write_queued(self) -> None:
        """Outside a batch, what was just queued is written at once, in its own transaction
        (inside one, at the batch's end)."""
        if not self._in_batch:
            self.flush()

    # Reading ---------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Every record of this experiment, read in one transaction: a consistent view even
        while the run goes on writing (and what this store has queued, written first)."""
        self.flush()
        options = (
            {} if self.engine.dialect.name == "sqlite" else {"isolation_level": "REPEATABLE READ"}
        )
        with self.engine.connect().execution_options(**options) as conn, conn.begin():
            experiment = dict(
                conn.execute(
                    select(*readable(experiments, self.absent)).where(
                        experiments.c.id == self.experiment_id
                    )
                )
                .mappings()
                .one()
            )

            def rows(table: Table, columns: list[str] | None, *order: str) -> list[dict[str, Any]]:
                chosen = readable(table, self.absent, columns)
                query = (
                    select(*chosen)
                    .where(table.c.experiment_id == self.experiment_id)
                    .order_by(*(table.c[c] for c in order))
                )
                return [dict(r) for r in conn.execute(query).mappings().all()]

            model_rows = rows(models, None, "model_id")
            epoch_rows = rows(epochs, None, "model_id", "epoch")
            checkpoint_rows = rows(checkpoints, None, "model_id", "epoch")
            event_rows = rows(events, ["time", "kind", "detail"], "id")
            hop_rows = rows(hops, HOP_COLUMNS, "id")
            control_rows = rows(controls, None, "id")
        frame = pd.DataFrame(hop_rows, columns=HOP_COLUMNS)
        frame["unit"] = frame["unit"].astype("Int64")  # None for hops recorded without one
        frame["start"] = frame["start"] - experiment["created"]
        frame["end"] = frame["end"] - experiment["created"]
        return Snapshot(
            experiment=experiment,
            models=model_rows,
            epochs=epoch_rows,
            hops=frame,
            events=event_rows,
            checkpoints=checkpoint_rows,
            controls=control_rows,
        )

    def models(self) -> list[dict[str, Any]]:
        """This experiment's model rows (one table read, not a whole snapshot)."""
        return self._rows(
            select(*readable(models, self.absent)).order_by(models.c.model_id), models
        )

    def epochs(self) -> list[dict[str, Any]]:
        query = select(*readable(epochs, self.absent)).order_by(epochs.c.model_id, epochs.c.epoch)
        return self._rows(query, epochs)

    def experiment(self) -> dict[str, Any]:
        """This experiment's own row: name, status, config."""
        query = select(*readable(experiments, self.absent)).where(
            experiments.c.id == self.experiment_id
        )
        with self._begin() as conn:
            return dict(conn.execute(query).mappings().one())

    def _rows(self, query: Any, table: Table) -> list[dict[str, Any]]:
        with self._begin() as conn:
            result = conn.execute(query.where(table.c.experiment_id == self.experiment_id))
            return [dict(r) for r in result.mappings().all()]

    def close(self) -> None:
        self.flush()
        self.engine.dispose()


@dataclass
class _Queued:
    """Writes a batch makes at its end, each kind in one statement."""

    hops: list[dict[str, Any]] = field(default_factory=list)
    save_times: list[dict[str, Any]] = field(default_factory=list)
    durable: dict[int, int] = field(default_factory=dict)  # model id -> version

    def __bool__(self) -> bool:
        return bool(self.hops or self.save_times or self.durable)


def readable(table: Table, absent: frozenset[str], columns: list[str] | None = None) -> list[Any]:
    """The columns of ``table`` to select (all, or those named): those that an older store
    lacks (``absent``, as ``"table.column"``) are read as NULL under their name."""
    names = columns if columns is not None else list(table.columns.keys())
    return [
        null().label(name) if f"{table.name}.{name}" in absent else table.c[name] for name in names
    ]


def jsonable(value: Any) -> Any:
    """Parameters as JSON (numpy scalars become Python numbers, other objects their repr)."""
    return json.loads(json.dumps(value, default=_to_builtin))


def _to_builtin(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return repr(value)
