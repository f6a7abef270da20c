"""Schema versions of the records: Alembic revisions (``migrations/versions/``), applied when a
writer opens a store.

The records hold their version in the table ``cerebro_alembic_version`` (not Alembic's default
``alembic_version``, so that one database can hold Cerebro's records beside those of another
program that uses Alembic, such as Optuna's RDB storage). Versions are numbered: revision
``"0002"`` is schema version 2.

* A writer (:func:`upgrade`: ``Experiment.run`` opening its records) makes the tables of an empty
  database and stamps them at the newest version; stamps a store from before versions (the
  tables, no version table) at the baseline and upgrades it; upgrades an older version. It does
  so in one transaction that holds the database's write lock (SQLite: ``BEGIN IMMEDIATE``;
  PostgreSQL: a transaction-level advisory lock, and DDL is transactional), so that two drivers
  opening one store at once migrate it once, and a reader sees it either before or after.
* A reader (:func:`check`: ``cerebro.load``, ``cerebro.control``, the ``cerebro`` command) never
  changes the schema: a running driver of an older Cerebro may be writing the store, and an
  archived run may be read-only. It reads an older store as it is (a column added since reads as
  None, see :func:`absent_columns`); the next driver to run the experiment upgrades it.
* Both refuse a store whose version this code does not know (written by a newer Cerebro),
  naming both versions.

Opening a current store costs one query (its version) and imports no Alembic.

To add a revision: write ``migrations/versions/vNNNN_<what>.py`` (``revision = "NNNN"``,
``down_revision`` the previous one; :func:`alembic_config` works with Alembic's commands, e.g.
``alembic.command.revision(alembic_config(), "what", rev_id="0003")``), append it to
:data:`REVISIONS` and change the tables in ``records.py`` to match (tests/test_migrations.py
checks that the revisions make the tables ``records.py`` declares).
"""

from __future__ import annotations

import os
import threading
import urllib.parse
from typing import TYPE_CHECKING

from sqlalchemy import Column, MetaData, PrimaryKeyConstraint, String, Table, inspect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from ..errors import CerebroError, RecordsTooNew, first_line

if TYPE_CHECKING:
    from alembic.config import Config

VERSION_TABLE = "cerebro_alembic_version"
REVISIONS = ("0001", "0002", "0003")  # the baseline, hops.unit, models.durable_version
BASELINE, HEAD = REVISIONS[0], REVISIONS[-1]
MIGRATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")
# Alembic's version table (alembic.ddl.impl.DefaultImpl.version_table_impl), made here for a
# new store so that creating one imports no Alembic (tests check that Alembic reads it).
_VERSION = Table(
    VERSION_TABLE,
    MetaData(),
    Column("version_num", String(32), nullable=False),
    PrimaryKeyConstraint("version_num", name=f"{VERSION_TABLE}_pkc"),
)
_ALEMBIC = threading.Lock()
_LOCK_KEY = 0x43E2EB20  # PostgreSQL advisory lock held while a store's schema is changed
_SENTINEL_TABLE = "experiments"  # a database holding it holds cerebro's tables


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration of the records' migrations, made here (no alembic.ini)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    config.attributes["connection"] = connection
    return config


def check(engine: Engine, where: str) -> str | None:
    """A reader's look at a store's version: its revision (the baseline for a store from before
    versions, None for a database without cerebro's tables). Changes nothing.

    Raises:
        RecordsTooNew: the store was written by a newer Cerebro.
    """
    found = _fast_revision(engine)
    if found == HEAD:
        return HEAD
    with engine.connect() as conn:
        revision = _stored_revision(conn)
        if revision is None:
            return BASELINE if inspect(conn).has_table(_SENTINEL_TABLE) else None
    _refuse_unknown(revision, where)
    return revision


def upgrade(engine: Engine, metadata: MetaData, where: str) -> None:
    """A writer's opening: bring the store at ``engine`` to :data:`HEAD` (see the module's
    docstring), making ``metadata``'s tables in an empty database.

    Raises:
        RecordsTooNew: the store was written by a newer Cerebro.
        CerebroError: cerebro's tables without a version that the baseline does not describe
            (nothing is changed then).
    """
    if _fast_revision(engine) == HEAD:
        return
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            conn.execution_options(cerebro_begin="BEGIN IMMEDIATE")  # the write lock, now
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
            # Under the lock: another writer may have migrated it since the first look.
            revision = _stored_revision(conn)
            if revision == HEAD:
                return
            if revision is None and not inspect(conn).has_table(_SENTINEL_TABLE):
                # An empty database (a new experiment's): today's tables, stamped, no Alembic.
                metadata.create_all(conn)
                _VERSION.create(conn, checkfirst=True)
                conn.execute(_VERSION.insert().values(version_num=HEAD))
                return
            if revision is not None:
                _refuse_unknown(revision, where)
                _alembic(conn, "upgrade", HEAD)
            else:  # a store from before versions: the baseline's tables, unstamped
                _alembic(conn, "stamp", BASELINE)
                try:
                    _alembic(conn, "upgrade", HEAD)
                except SQLAlchemyError as e:
                    raise _not_baseline(where, first_line(e)) from e
                missing = _missing(conn, metadata)
                if missing:  # the transaction is rolled back: nothing was changed
                    raise _not_baseline(where, "it lacks " + ", ".join(missing))


def _alembic(conn: Connection, name: str, revision: str) -> None:
    """Alembic's ``stamp`` or ``upgrade`` on ``conn``, inside its transaction. One at a time in
    a process: Alembic's ``context`` and ``op`` are module-level proxies."""
    from alembic import command

    with _ALEMBIC:
        getattr(command, name)(alembic_config(conn), revision)


def absent_columns(engine: Engine, metadata: MetaData, revision: str | None) -> frozenset[str]:
    """Columns of ``metadata`` (``"table.column"``) that a store at ``revision`` lacks: none at
    :data:`HEAD`, else those the database's tables do not have (added by later revisions)."""
    if revision in (HEAD, None):
        return frozenset()
    with engine.connect() as conn:
        return frozenset(name for name in _missing(conn, metadata) if "." in name)


def _missing(conn: Connection, metadata: MetaData) -> list[str]:
    """Tables (``"hops"``) and columns (``"hops.unit"``) of ``metadata`` the database lacks."""
    found = inspect(conn)
    tables = set(found.get_table_names())
    missing = []
    for table in metadata.sorted_tables:
        if table.name not in tables:
            missing.append(table.name)
            continue
        columns = {c["name"] for c in found.get_columns(table.name)}
        missing += [f"{table.name}.{c.name}" for c in table.columns if c.name not in columns]
    return missing


def _not_baseline(where: str, why: str) -> CerebroError:
    return CerebroError(
        f"records at {where} hold cerebro's tables without a schema version, but not those of "
        f"its first version ({why}): this Cerebro cannot upgrade them; nothing was changed"
    )


def _fast_revision(engine: Engine) -> str | None:
    """The store's revision in one query, or None if that query cannot tell (no version table,
    an empty one, or another error of the query: the careful look that follows will say). An
    unreachable database raises here."""
    with engine.connect() as conn:
        try:
            rows = conn.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").all()
        except DBAPIError:  # e.g. no such table (PostgreSQL: the transaction is rolled back)
            return None
    return str(rows[0][0]) if len(rows) == 1 else None


def _stored_revision(conn: Connection) -> str | None:
    """The revision in the version table (None without one, or with none in it)."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    rows = conn.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").all()
    if len(rows) > 1:  # a branched history: not one Cerebro ever writes
        raise RecordsTooNew(describe(conn.engine), ", ".join(sorted(str(r[0]) for r in rows)), HEAD)
    return str(rows[0][0]) if rows else None


def _refuse_unknown(revision: str, where: str) -> None:
    if revision not in REVISIONS:
        raise RecordsTooNew(where, revision, HEAD)


def describe(engine: Engine) -> str:
    """Where a store is, for messages: a SQLite file's path, or the URL without its password."""
    url = engine.url
    if url.get_backend_name() != "sqlite":
        return url.render_as_string(hide_password=True)
    database = url.database or ""
    if database.startswith("file:"):  # a reader's URI (read-only): file:<quoted path>?mode=ro
        database = urllib.parse.unquote(database.removeprefix("file:").split("?")[0])
    return database
