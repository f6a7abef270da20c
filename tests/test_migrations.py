"""Records carry a schema version: records written before versions existed (the old-records
fixture, made with the code of commit 4d60859) open, upgrade, resume and finish with this code;
an older version is upgraded on SQLite and PostgreSQL; a newer one is refused naming both
versions; readers never change the schema."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading

import old_records_build as fixture
import pandas as pd
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from postgres_server import postgres_server
from sqlalchemy import create_engine, insert, inspect, text

import cerebro
from cerebro.cli import main as cli_main
from cerebro.errors import CerebroError, RecordsTooNew
from cerebro.store import records, schema
from cerebro.store.records import RecordStore, metadata, open_engine, sqlite_url

BASELINE_TABLES = {"experiments", "models", "epochs", "hops", "checkpoints", "events", "controls"}


# The old records ---------------------------------------------------------------------------------


@pytest.fixture
def old(tmp_path) -> str:
    """A copy of the old-records fixture, moved to ``tmp_path`` (its recorded paths rewritten:
    a moved experiment is not resumed as it is). The fixture itself is never written."""
    folder = str(tmp_path / "old")
    shutil.copytree(fixture.FIXTURE, folder)
    db = os.path.join(folder, fixture.RUN, "cerebro.db")
    with sqlite3.connect(db) as conn:  # plain SQL, schema-agnostic: no cerebro code opens it yet
        (config,) = conn.execute("SELECT config FROM experiments").fetchone()
        config = json.loads(config)
        before = os.path.dirname(config["path"])
        for key in ("path", "checkpoint_dir", "dataset"):
            config[key] = folder + config[key][len(before) :]
        conn.execute("UPDATE experiments SET config = ?", (json.dumps(config),))
        conn.execute(
            "UPDATE checkpoints SET path = ? || substr(path, ?)", (folder, len(before) + 1)
        )
    conn.close()
    return folder


def _tables(db: str) -> set[str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    conn.close()
    return {r[0] for r in rows}


def _columns(db: str, table: str) -> dict[str, dict]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(f"PRAGMA table_info({table})").fetchall()
    conn.close()
    return {r[1]: {"type": r[2], "notnull": bool(r[3])} for r in rows}


def _version(db: str) -> list[str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(f"SELECT version_num FROM {schema.VERSION_TABLE}").fetchall()
    conn.close()
    return [r[0] for r in rows]


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read()).hexdigest()


def test_the_fixture_is_records_from_before_versions(old):
    db = os.path.join(old, fixture.RUN, "cerebro.db")
    assert _tables(db) == BASELINE_TABLES  # no version table
    assert "unit" not in _columns(db, "hops")
    with sqlite3.connect(db) as conn:
        (status,) = conn.execute("SELECT status FROM experiments").fetchone()
        epochs = conn.execute("SELECT count(*) FROM epochs").fetchone()[0]
    conn.close()
    assert status == "running"  # its driver was killed
    assert 1 <= epochs < len(fixture.LEARNING_RATES) * fixture.EPOCHS


def test_old_records_upgrade_resume_and_finish(old):
    run, data = os.path.join(old, fixture.RUN), os.path.join(old, fixture.DATA)
    db = os.path.join(run, "cerebro.db")
    # A reader reads the old records as they are and changes nothing.
    before = _digest(db)
    loaded = cerebro.load(run)
    assert loaded.experiment["status"] == "interrupted"  # "running", and no driver holds it
    assert "unit" in loaded.hops.columns and loaded.hops.unit.isna().all()
    assert len(loaded.hops) > 0 and {m.status for m in loaded.models} == {"running"}
    loaded._store.close()
    assert _digest(db) == before and schema.VERSION_TABLE not in _tables(db)

    # A person's request through the old records, applied by the run that continues them.
    ctl = cerebro.control(run, who="test")
    request = ctl.stop(2)
    ctl._store.close()
    assert schema.VERSION_TABLE not in _tables(db)

    result = fixture.experiment(run, data).run()

    assert _version(db) == [schema.HEAD]
    assert _columns(db, "hops")["unit"] == {"type": "INTEGER", "notnull": False}
    statuses = {m.id: m.status for m in result.models}
    assert statuses == {0: "completed", 1: "completed", 2: "stopped"}
    assert [r for r in result.controls if r["id"] == request.id][0]["state"] == "applied"
    for model in result.models[:2]:
        assert [h["epoch"] for h in model.history] == list(range(fixture.EPOCHS))
    key = ["model_id", "epoch", "kind", "shard"]
    assert not result.hops.duplicated(key).any()
    done = result.hops[result.hops.model_id < 2]
    assert len(done) == 2 * fixture.EPOCHS * 4  # 2 training and 2 validation shards an epoch
    assert str(result.hops.unit.dtype) == "Int64"  # None where the driver gave no unit id
    # Every hop the new code ran names its unit (the old run's epoch 0 hops do not).
    later = result.hops[result.hops.epoch >= 1]
    assert len(later) and later.unit.notna().all() and later.unit.is_unique
    assert "driver_lost" in [e["kind"] for e in result.events]
    assert sum(p.numel() for p in result.load_model(0).parameters()) > 0

    # Read again by a new reader: current, nothing absent.
    again = cerebro.load(run)
    assert again._store.absent == frozenset() and len(again.hops) == len(result.hops)
    again._store.close()


def test_a_store_from_before_versions_is_stamped_and_upgraded_by_a_writer(old):
    db = os.path.join(old, fixture.RUN, "cerebro.db")
    with sqlite3.connect(db) as conn:
        hops_before = conn.execute("SELECT * FROM hops ORDER BY id").fetchall()
    conn.close()
    engine = open_engine(sqlite_url(os.path.join(old, fixture.RUN)))
    engine.dispose()
    assert _version(db) == [schema.HEAD]
    with sqlite3.connect(db) as conn:
        hops_after = conn.execute("SELECT * FROM hops ORDER BY id").fetchall()
    conn.close()
    assert [row[:-1] for row in hops_after] == hops_before  # kept, with a NULL unit
    assert {row[-1] for row in hops_after} == {None}
    store, _ = RecordStore.find(os.path.join(old, fixture.RUN), None)
    assert store.absent == frozenset() and store.snapshot().hops.unit.isna().all()
    store.close()


# Versions on SQLite ------------------------------------------------------------------------------


def _at_revision(url: str, revision: str) -> None:
    """A database brought by Alembic's upgrade to ``revision`` (stamped there)."""
    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(schema.alembic_config(conn), revision)
    engine.dispose()


def _add_rows(url: str) -> None:
    """An experiment with one model, one epoch and one hop, written as revision 1 has them."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            insert(records.experiments).values(
                id=1,
                name="old",
                created=1.0,
                status="completed",
                config={"metric": "val_loss", "mode": "min", "checkpoint_dir": "/nowhere"},
            )
        )
        conn.execute(  # the columns revision 1 has (the Table objects name only those given)
            insert(records.models).values(
                experiment_id=1,
                model_id=0,
                params={"lr": 0.1},
                status="completed",
                created=1.0,
                updated=2.0,
                origin="search",
            )
        )
        conn.execute(
            insert(records.epochs).values(
                experiment_id=1, model_id=0, epoch=0, metrics={"val_loss": 0.5}, finished=2.0
            )
        )
        conn.execute(
            insert(records.hops).values(
                experiment_id=1,
                model_id=0,
                epoch=0,
                kind="train",
                shard=0,
                worker=0,
                start=1.5,
                end=1.75,
                rows=10,
                load_s=0.0,
                metrics={},
            )
        )
    engine.dispose()


def _check_readable(store: RecordStore) -> None:
    snapshot = store.snapshot()
    assert snapshot.experiment["name"] == "old"
    assert [m["params"] for m in snapshot.models] == [{"lr": 0.1}]
    assert [e["metrics"] for e in snapshot.epochs] == [{"val_loss": 0.5}]
    assert snapshot.hops[["model_id", "kind", "rows"]].values.tolist() == [[0, "train", 10]]
    assert snapshot.hops.unit.isna().all() and str(snapshot.hops.unit.dtype) == "Int64"


def test_revisions_make_the_tables_records_declares(tmp_path):
    script = ScriptDirectory.from_config(schema.alembic_config())
    chain = [r.revision for r in reversed(list(script.walk_revisions()))]
    assert tuple(chain) == schema.REVISIONS and script.get_current_head() == schema.HEAD
    migrated, made = f"sqlite:///{tmp_path}/migrated.db", f"sqlite:///{tmp_path}/made.db"
    _at_revision(migrated, "head")
    open_engine(made).dispose()  # a new store: create_all, stamped without Alembic
    for url in (migrated, made):
        engine = create_engine(url)
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"version_table": schema.VERSION_TABLE})
            assert context.get_current_revision() == schema.HEAD
            assert compare_metadata(context, metadata) == [], url
        version_columns = inspect(engine).get_columns(schema.VERSION_TABLE)
        assert [(c["name"], str(c["type"]), c["nullable"]) for c in version_columns] == [
            ("version_num", "VARCHAR(32)", False)
        ]
        assert inspect(engine).get_pk_constraint(schema.VERSION_TABLE)["constrained_columns"] == [
            "version_num"
        ]
        engine.dispose()


def test_an_older_version_is_upgraded_by_a_writer_and_read_as_it_is_by_a_reader(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    url, db = sqlite_url(str(run)), str(run / "cerebro.db")
    _at_revision(url, schema.BASELINE)
    _add_rows(url)
    before = _digest(db)
    store, row = RecordStore.find(run, None)
    assert row["name"] == "old"
    assert store.absent == frozenset({"hops.unit", "models.durable_version"})
    _check_readable(store)
    store.close()
    assert _digest(db) == before and _version(db) == [schema.BASELINE]  # a reader wrote nothing

    open_engine(url).dispose()
    assert _version(db) == [schema.HEAD] and "unit" in _columns(db, "hops")
    store, _ = RecordStore.find(run, None)
    _check_readable(store)
    store.add_hop(
        model_id=0,
        epoch=0,
        kind="eval",
        shard=0,
        worker=1,
        start=1.8,
        end=1.9,
        rows=5,
        load_s=0.0,
        save_s=None,
        metrics={},
        unit=7,
    )
    assert store.snapshot().hops.unit.tolist() == [pd.NA, 7]
    store.close()


def _newer(url: str, db: str) -> None:
    """Records as a newer Cerebro would leave them: stamped with a revision this one lacks."""
    open_engine(url).dispose()
    with sqlite3.connect(db) as conn:
        conn.execute(f"UPDATE {schema.VERSION_TABLE} SET version_num = '0099'")
    conn.close()


def test_a_store_of_a_newer_cerebro_is_refused_naming_both_versions(old, capsys):
    run, data = os.path.join(old, fixture.RUN), os.path.join(old, fixture.DATA)
    db = os.path.join(run, "cerebro.db")
    _newer(sqlite_url(run), db)
    before = _digest(db)
    said = f"records at {db} are schema version 99, newer than this Cerebro's 3: upgrade cerebro"
    for opening in (
        lambda: open_engine(sqlite_url(run)),  # a writer
        lambda: cerebro.load(run),  # a reader
        lambda: fixture.experiment(run, data).run(),
    ):
        with pytest.raises(RecordsTooNew) as caught:
            opening()
        assert said in str(caught.value)
        assert (caught.value.found, caught.value.supported) == ("0099", schema.HEAD)
    assert cli_main(["models", run]) == 2
    assert "schema version 99, newer than this Cerebro's 3" in " ".join(
        capsys.readouterr().out.split()
    )
    assert _digest(db) == before and _version(db) == ["0099"]


def test_tables_without_a_version_that_are_not_the_baseline_are_left_alone(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    url, db = sqlite_url(str(run)), str(run / "cerebro.db")
    _at_revision(url, schema.BASELINE)
    _add_rows(url)
    with sqlite3.connect(db) as conn:
        conn.execute(f"DROP TABLE {schema.VERSION_TABLE}")
        conn.execute("DROP TABLE controls")
        conn.execute("PRAGMA journal_mode=WAL")  # as cerebro's writers leave it
    conn.close()
    before = _digest(db)
    with pytest.raises(CerebroError, match=r"without a schema version.*lacks controls"):
        open_engine(url)
    assert _digest(db) == before and schema.VERSION_TABLE not in _tables(db)


def test_writers_opening_an_old_store_at_once_upgrade_it_once(old):
    run = os.path.join(old, fixture.RUN)
    barrier, errors = threading.Barrier(4), []

    def writer() -> None:
        try:
            barrier.wait()
            open_engine(sqlite_url(run)).dispose()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    db = os.path.join(run, "cerebro.db")
    assert _version(db) == [schema.HEAD] and list(_columns(db, "hops")).count("unit") == 1


def test_problems_of_a_sqlite_file_say_what_they_were(tmp_path):
    problem = records.sqlite_problem(str(tmp_path / "cerebro.db"))
    assert problem is not None and problem.fault is records.Fault.MISSING
    assert str(problem) == "missing (no cerebro.db)"
    (tmp_path / "cerebro.db").write_bytes(b"")
    problem = records.sqlite_problem(str(tmp_path / "cerebro.db"))
    assert problem is not None and problem.fault is records.Fault.EMPTY
    assert str(problem) == "empty (cerebro.db has 0 bytes: it holds no experiment)"


# Versions on PostgreSQL --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_url():
    with postgres_server() as url:
        yield url


def _database(server_url: str, name: str) -> str:
    """A new, empty database on the test server."""
    import psycopg
    from sqlalchemy.engine import make_url

    parsed = make_url(server_url)
    with psycopg.connect(
        host=parsed.host, port=parsed.port, user=parsed.username, dbname="postgres", autocommit=True
    ) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return records.normalize_url(parsed.set(database=name).render_as_string(hide_password=False))


def test_postgres_store_at_the_baseline_is_upgraded_and_readable(postgres_url):
    url = _database(postgres_url, "at_baseline")
    _at_revision(url, schema.BASELINE)
    _add_rows(url)
    engine = create_engine(url)
    assert "unit" not in {c["name"] for c in inspect(engine).get_columns("hops")}

    store, row = RecordStore.find(url, None)  # a reader: reads it as it is
    assert row["name"] == "old"
    assert store.absent == frozenset({"hops.unit", "models.durable_version"})
    _check_readable(store)
    store.close()
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT version_num FROM {schema.VERSION_TABLE}")).all() == [
            (schema.BASELINE,)
        ]

    open_engine(url).dispose()  # a writer: upgrades it
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT version_num FROM {schema.VERSION_TABLE}")).all() == [
            (schema.HEAD,)
        ]
        context = MigrationContext.configure(conn, opts={"version_table": schema.VERSION_TABLE})
        assert compare_metadata(context, metadata) == []
    unit = [c for c in inspect(engine).get_columns("hops") if c["name"] == "unit"]
    assert len(unit) == 1 and unit[0]["nullable"]
    store, _ = RecordStore.find(url, None)
    assert store.absent == frozenset()
    _check_readable(store)
    store.close()
    loaded = cerebro.load(url)
    assert loaded.experiment["name"] == "old" and loaded.hops.unit.isna().all()
    loaded._store.close()
    engine.dispose()


def test_postgres_store_from_before_versions_is_stamped_and_upgraded(postgres_url):
    url = _database(postgres_url, "before_versions")
    _at_revision(url, schema.BASELINE)
    _add_rows(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {schema.VERSION_TABLE}"))
    barrier, errors = threading.Barrier(3), []

    def writer() -> None:
        try:
            barrier.wait()
            open_engine(url).dispose()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT version_num FROM {schema.VERSION_TABLE}")).all() == [
            (schema.HEAD,)
        ]
    store, _ = RecordStore.find(url, None)
    _check_readable(store)
    store.close()
    engine.dispose()


def test_postgres_store_of_a_newer_cerebro_is_refused(postgres_url):
    url = _database(postgres_url, "newer")
    open_engine(url).dispose()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {schema.VERSION_TABLE} SET version_num = '0099'"))
    engine.dispose()
    shown = url.split("@")[-1]
    for opening in (lambda: open_engine(url), lambda: RecordStore.find(url, None)):
        with pytest.raises(RecordsTooNew, match=r"schema version 99, newer than this Cerebro's 3"):
            opening()
    with pytest.raises(RecordsTooNew) as caught:
        open_engine(url)
    assert shown in str(caught.value) and "unused" not in str(caught.value)  # no password


OPEN_CURRENT = """
import sys
from sqlalchemy import event
from sqlalchemy.engine import Engine
from cerebro.store.records import RecordStore, open_engine, sqlite_url
RecordStore.create(sqlite_url(sys.argv[1]), "x", {}).close()  # a new store: stamped, no Alembic
statements = []
event.listen(Engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
open_engine(sqlite_url(sys.argv[1])).dispose()
print(len(statements), [s.split()[0] for s in statements], "alembic" in sys.modules)
"""


def test_opening_a_current_store_is_one_version_query_without_alembic(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", OPEN_CURRENT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "['BEGIN',", "'SELECT']", "False"], done.stdout
