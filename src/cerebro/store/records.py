"""Experiment records through SQLAlchemy: SQLite file by default, any SQLAlchemy URL otherwise.

Tables: ``experiments``, ``models`` (params, status, error), ``epochs`` (metrics of each model and
epoch) and ``hops`` (every unit a worker ran: model, epoch, kind, shard, worker, times, rows,
metrics). Search decisions and results are derived from these rows.
"""

from __future__ import annotations

import json
import os
import time
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
    create_engine,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine

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
)

MODEL_STATUSES = ("pending", "running", "completed", "failed")


def sqlite_url(path: str) -> str:
    return "sqlite:///" + os.path.abspath(os.path.join(path, "cerebro.db"))


def open_engine(url: str) -> Engine:
    """A SQLAlchemy engine; SQLite files use WAL so readers never block the run."""
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.close()

    metadata.create_all(engine)
    return engine


class RecordStore:
    """Reads and writes one experiment's records.

    Example:
        >>> store = RecordStore.create("sqlite:///runs/x/cerebro.db", "x", {})  # doctest: +SKIP
    """

    def __init__(self, engine: Engine, experiment_id: int) -> None:
        self.engine = engine
        self.experiment_id = experiment_id

    @classmethod
    def create(cls, url: str, name: str, config: dict[str, Any]) -> RecordStore:
        engine = open_engine(url)
        with engine.begin() as conn:
            result = conn.execute(
                insert(experiments).values(
                    name=name, created=time.time(), status="running", config=_jsonable(config)
                )
            )
            experiment_id = int(result.inserted_primary_key[0])
        return cls(engine, experiment_id)

    @staticmethod
    def existing_experiments(url: str) -> list[dict[str, Any]]:
        engine = open_engine(url)
        with engine.connect() as conn:
            rows = conn.execute(select(experiments)).mappings().all()
        engine.dispose()
        return [dict(r) for r in rows]

    def set_experiment_status(self, status: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(experiments)
                .where(experiments.c.id == self.experiment_id)
                .values(status=status)
            )

    def add_model(
        self, model_id: int, params: dict[str, Any], status: str, error: str | None
    ) -> None:
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(
                insert(models).values(
                    experiment_id=self.experiment_id,
                    model_id=model_id,
                    params=_jsonable(params),
                    status=status,
                    error=error,
                    created=now,
                    updated=now,
                )
            )

    def set_model_status(self, model_id: int, status: str, error: str | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(models)
                .where(models.c.experiment_id == self.experiment_id, models.c.model_id == model_id)
                .values(status=status, error=error, updated=time.time())
            )

    def add_epoch(self, model_id: int, epoch: int, metrics: dict[str, float]) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                insert(epochs).values(
                    experiment_id=self.experiment_id,
                    model_id=model_id,
                    epoch=epoch,
                    metrics=metrics,
                    finished=time.time(),
                )
            )

    def add_hop(self, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(hops).values(experiment_id=self.experiment_id, **values))

    def set_hop_save_time(self, model_id: int, epoch: int, shard: int, save_s: float) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(hops)
                .where(
                    hops.c.experiment_id == self.experiment_id,
                    hops.c.model_id == model_id,
                    hops.c.epoch == epoch,
                    hops.c.shard == shard,
                    hops.c.kind == "train",
                )
                .values(save_s=save_s)
            )

    # Reading ---------------------------------------------------------------------------------

    def experiment(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = (
                conn.execute(select(experiments).where(experiments.c.id == self.experiment_id))
                .mappings()
                .one()
            )
        return dict(row)

    def models(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = (
                conn.execute(
                    select(models)
                    .where(models.c.experiment_id == self.experiment_id)
                    .order_by(models.c.model_id)
                )
                .mappings()
                .all()
            )
        return [dict(r) for r in rows]

    def epochs(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = (
                conn.execute(
                    select(epochs)
                    .where(epochs.c.experiment_id == self.experiment_id)
                    .order_by(epochs.c.model_id, epochs.c.epoch)
                )
                .mappings()
                .all()
            )
        return [dict(r) for r in rows]

    def hops_frame(self) -> pd.DataFrame:
        columns = [
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
        ]
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(*(hops.c[c] for c in columns))
                .where(hops.c.experiment_id == self.experiment_id)
                .order_by(hops.c.id)
            ).all()
        frame = pd.DataFrame(rows, columns=columns)
        created = self.experiment()["created"]
        frame["start"] = frame["start"] - created
        frame["end"] = frame["end"] - created
        return frame

    def close(self) -> None:
        self.engine.dispose()


def _jsonable(value: Any) -> Any:
    """Parameters as JSON (numpy scalars become Python numbers, other objects their repr)."""
    return json.loads(json.dumps(value, default=_to_builtin))


def _to_builtin(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return repr(value)
