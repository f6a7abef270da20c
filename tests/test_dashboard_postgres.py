"""The dashboard over records in a real PostgreSQL server (``cerebro serve <database URL>``):
every experiment of the database listed, the same answers as from SQLite, controls recorded."""

from __future__ import annotations

import pytest
from conftest import small_experiment
from postgres_server import postgres_server

import cerebro
from cerebro.errors import shown_url

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from cerebro.dashboard.app import create_app  # noqa: E402

pytestmark = pytest.mark.slow
AUTH = {"Authorization": "Bearer pg-token-1234"}


def test_the_dashboard_serves_records_from_postgresql(digits, tmp_path):
    with postgres_server() as url:
        for name in ("first", "second"):
            small_experiment(digits, tmp_path / name, storage=url, name=name, epochs=2).run()
        client = TestClient(create_app(url, "pg-token-1234"), raise_server_exceptions=False)
        listed = client.get("/api/experiments", headers=AUTH).json()
        assert [e["name"] for e in listed] == ["first", "second"]
        assert listed[0]["source"] == shown_url(url)  # a password would show as ***
        first = listed[0]["key"]
        result = cerebro.load(url, "first")

        models = client.get("/api/models", params={"experiment": first}, headers=AUTH).json()
        assert [m["id"] for m in models] == [m.id for m in result.models]
        for row, record in zip(models, result.models):
            assert row["metrics"] == pytest.approx(record.metrics)
        view = client.get("/api/experiment", params={"experiment": first}, headers=AUTH).json()
        assert view["name"] == "first" and view["best"] == result.best.id
        hops = client.get("/api/hops", params={"experiment": first}, headers=AUTH).json()
        assert len(hops) == len(result.hops)
        detail = client.get("/api/models/1", params={"experiment": first}, headers=AUTH).json()
        assert len(detail["history"]) == 2

        answer = client.post(
            "/api/models/0/epochs", params={"experiment": first}, json={"epochs": 3}, headers=AUTH
        )
        assert answer.status_code == 202, answer.text
        [control] = cerebro.load(url, "first").controls
        assert control["op"] == "set_epochs" and control["who"].endswith(
            "via dashboard (testclient)"
        )
        assert cerebro.load(url, "second").controls == []  # the other experiment is untouched
