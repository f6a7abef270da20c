"""The same experiment recorded in SQLite and in a real PostgreSQL server gives the same
records (deterministic mode, so that even metrics must match bit for bit)."""

from __future__ import annotations

import builders
import pandas as pd
import pytest
from conftest import small_experiment
from postgres_server import postgres_server

import cerebro


@pytest.fixture(scope="module")
def postgres_url():
    with postgres_server() as url:
        yield url


def _run(digits, path, storage=None, name=None, seed=3):
    space = {"lr": cerebro.choice([0.003, 0.03]), "width": cerebro.choice([16, 32])}
    return small_experiment(
        digits,
        path,
        search=cerebro.GridSearch(space),
        epochs=2,
        seed=seed,
        deterministic=True,
        storage=storage,
        name=name,
    ).run()


def _comparable_hops(result: cerebro.Result) -> pd.DataFrame:
    columns = ["model_id", "epoch", "kind", "shard", "worker", "rows"]
    return result.hops[columns].sort_values(columns, ignore_index=True)


def test_postgres_and_sqlite_give_the_same_records(digits, tmp_path, postgres_url):
    on_sqlite = _run(digits, tmp_path / "sqlite")
    on_postgres = _run(digits, tmp_path / "pg", storage=postgres_url, name="same")
    assert [(m.id, m.params, m.status) for m in on_postgres.models] == [
        (m.id, m.params, m.status) for m in on_sqlite.models
    ]
    pd.testing.assert_frame_equal(on_postgres.history, on_sqlite.history, check_exact=True)
    pd.testing.assert_frame_equal(_comparable_hops(on_postgres), _comparable_hops(on_sqlite))
    # Another process reads it back by URL, as it would for SQLite by path.
    loaded = cerebro.load(postgres_url, experiment="same")
    pd.testing.assert_frame_equal(loaded.history, on_sqlite.history, check_exact=True)
    assert loaded.best.id == on_sqlite.best.id
    # A different experiment under the same name in the same database is refused, not mixed in.
    with pytest.raises(cerebro.ConfigError, match=r"storage=.*different one \(seed: "):
        _run(digits, tmp_path / "pg2", storage=postgres_url, name="same", seed=4)


def test_unreachable_storage_fails_fast_without_the_password(digits, tmp_path):
    url = "postgresql://me:topsecret@127.0.0.1:9/nothing"
    with pytest.raises(cerebro.ConfigError) as info:
        _run(digits, tmp_path / "x", storage=url)
    assert "topsecret" not in str(info.value)
    assert "127.0.0.1:9/nothing" in str(info.value) and "***" in str(info.value)


def test_malformed_storage_url_is_rejected(digits):
    with pytest.raises(cerebro.ConfigError, match="storage='not a url'"):
        cerebro.Experiment(
            builders.mlp, digits, cerebro.GridSearch({"lr": 0.1}), storage="not a url"
        )
