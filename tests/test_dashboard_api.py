"""The dashboard's JSON API, through FastAPI's TestClient, against real recorded runs: every
endpoint, the token, bad input (400 with the control layer's message, 404, 409, 422), and a
stop asked through the API applied by a live driver at the next hop boundary."""

from __future__ import annotations

import socket

import builders
import pytest
from conftest import BackgroundRun, wait_for

import cerebro

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from cerebro.dashboard.app import CSP, create_app  # noqa: E402
from cerebro.dashboard.server import DashboardServer  # noqa: E402

TOKEN = "test-token-1234"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _experiment(digits, path, **overrides):
    options = dict(
        search=cerebro.GridSearch({"lr": cerebro.choice([0.01, 0.02, 0.03])}),
        epochs=2,
        metric="val_accuracy",
        mode="max",
        backend=cerebro.LocalBackend(workers=2),
        path=path,
        seed=3,
        progress=False,
        tensorboard=False,
    )
    options.update(overrides)
    # Each training unit sleeps ~0.3 s: long enough to stop a model between two of its hops.
    return cerebro.Experiment(builders.slow_mlp_30ms, digits, **options)


@pytest.fixture(scope="module")
def run(digits, tmp_path_factory):
    """A live run, its client, and (once the live test is over) the finished records."""
    path = tmp_path_factory.mktemp("dash") / "live"
    background = BackgroundRun(_experiment(digits, path))

    def started() -> bool:
        return (path / "cerebro.db").exists() and len(cerebro.load(path).hops) >= 2

    wait_for(started, timeout=120)
    client = TestClient(create_app(path, TOKEN), raise_server_exceptions=False)
    return path, background, client


def test_a_stop_asked_through_the_api_is_applied_by_the_live_driver(run):
    path, background, client = run
    models = client.get("/api/models", headers=AUTH).json()
    assert len(models) == 3 and {m["status"] for m in models} <= {"running", "completed"}
    target = 2  # the last model: the grid's others keep the workers busy
    answer = client.post(
        f"/api/models/{target}/stop?wait=30",
        headers={**AUTH, "X-Cerebro-User": "alice"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["state"] == "applied" and answer.json()["op"] == "stop"
    requested_at = cerebro.load(path).controls[0]
    background.join()

    result = cerebro.load(path)
    assert result.model(target).status == "stopped"
    [control] = result.controls
    assert control["who"] == "alice via dashboard (testclient)"
    assert control["state"] == "applied"
    # At the next hop boundary: at most the hop it waited for started after it was asked,
    # none after it was applied.
    hops = result.hops[(result.hops.model_id == target) & (result.hops.kind == "train")]
    started = hops.start + result.experiment["created"]
    assert (started > requested_at["requested"]).sum() <= 1
    assert (started <= control["settled"]).all()
    assert {m.status for m in result.models if m.id != target} == {"completed"}


def test_every_read_endpoint_answers_from_the_records(run):
    path, _, client = run
    result = cerebro.load(path)

    experiment = client.get("/api/experiment", headers=AUTH).json()
    assert experiment["name"] == "live" and experiment["metric"] == "val_accuracy"
    assert experiment["status"] == "completed"
    assert experiment["counts"] == {"completed": 2, "stopped": 1}
    assert experiment["best"] == result.best.id
    assert experiment["revision"]["hops"] > 0 and experiment["space"]["lr"]["kind"] == "choice"

    [listed] = client.get("/api/experiments", headers=AUTH).json()
    assert listed["key"] == str(experiment["id"]) and listed["name"] == "live"

    models = client.get("/api/models", headers=AUTH).json()
    by_id = {m["id"]: m for m in models}
    for record in result.models:
        row = by_id[record.id]
        assert row["status"] == record.status and row["params"] == record.params
        assert row["epochs_done"] == len(record.history) and row["max_epochs"] == 2
        assert row["metrics"] == pytest.approx(record.metrics)
        assert row["fused"] is False  # plain runner: every unit holds one model

    detail = client.get("/api/models/0", headers=AUTH).json()
    assert detail["summary"]["id"] == 0 and len(detail["history"]) == 2
    assert len(detail["hops"]) == len(result.hops[result.hops.model_id == 0])
    assert {h["kind"] for h in detail["hops"]} == {"train", "eval"}
    assert [c["epoch"] for c in detail["checkpoints"]]  # kept checkpoints are listed
    assert detail["best_epoch"] in (0, 1)
    stopped = client.get("/api/models/2", headers=AUTH).json()
    assert [c["op"] for c in stopped["controls"]] == ["stop"]
    assert any(e["kind"] == "control" for e in stopped["events"])

    history = client.get("/api/history", headers=AUTH).json()
    assert len(history) == len(result.history)
    assert client.get("/api/history?after=2", headers=AUTH).json() == history[2:]

    hops = client.get("/api/hops", headers=AUTH).json()
    assert len(hops) == len(result.hops)
    ids = [h["id"] for h in hops]
    assert ids == sorted(ids)
    later = client.get(f"/api/hops?after={ids[4]}&limit=3", headers=AUTH).json()
    assert [h["id"] for h in later] == ids[5:8]
    assert all(0 <= h["start"] <= h["end"] for h in hops)

    controls = client.get("/api/controls", headers=AUTH).json()
    assert [c["op"] for c in controls] == ["stop"]

    board = client.get("/api/models.csv", headers=AUTH)
    assert board.headers["content-type"].startswith("text/csv")
    lines = board.text.strip().splitlines()
    assert lines[0].startswith("model_id,status,") and "param_lr" in lines[0]
    assert len(lines) == 4
    curves = client.get("/api/history.csv", headers=AUTH).text.strip().splitlines()
    assert curves[0].startswith("model_id,epoch,finished_s") and len(curves) == 1 + len(history)


def test_the_token_is_required_and_the_page_trades_it_for_a_cookie(run):
    _, _, client = run
    for url in ("/api/models", "/api/experiment", "/api/hops", "/api/models/0"):
        assert client.get(url).status_code == 401
        wrong = client.get(url, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
    for url in ("/api/models/0/stop", "/api/models/0/resume"):
        assert client.post(url).status_code == 401
    assert client.post("/api/models", json={"params": {"lr": 0.01}}).status_code == 401

    fresh = TestClient(client.app)
    assert fresh.get("/").status_code == 401
    assert fresh.get("/?token=wrong").status_code == 401
    opened = fresh.get(f"/?token={TOKEN}&experiment=1", follow_redirects=False)
    assert opened.status_code == 303 and opened.headers["location"] == "/?experiment=1"
    cookie = opened.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    page = fresh.get("/")
    assert page.status_code == 200 and '<script src="/static/dashboard.js"' in page.text
    assert page.headers["content-security-policy"] == CSP
    assert "script-src 'self'" in CSP and "http" not in CSP  # nothing from another origin
    assert fresh.get("/api/models").status_code == 200  # the cookie is the token
    # A control authenticated by the cookie alone (as another site's form could send it) is
    # refused; the page adds its header.
    assert fresh.post("/api/models/0/stop").status_code == 403
    # Every script and style the page loads is served here.
    assert fresh.get("/vendor/plotly.min.js").status_code == 200
    assert fresh.get("/static/dashboard.css").status_code == 200


def test_bad_input_is_answered_with_the_reason_and_changes_nothing(run):
    path, _, client = run
    before = len(cerebro.load(path).controls)

    def post(url, headers=AUTH, **kwargs):
        return client.post(url, headers=headers, **kwargs)

    assert client.get("/api/models/99", headers=AUTH).status_code == 404
    assert post("/api/models/99/stop").status_code == 404
    assert client.get("/api/models?experiment=nope", headers=AUTH).status_code == 404
    # A finished model cannot take these: 409 with the control layer's reason.
    stop = post("/api/models/0/stop")
    assert stop.status_code == 409 and "a running or paused model" in stop.json()["detail"]
    assert "it is completed" in stop.json()["detail"]
    resume = post("/api/models/1/resume")
    assert resume.status_code == 409 and "stopped or pruned" in resume.json()["detail"]
    # Bad values: 400 with the control layer's message (argument, value, what is accepted).
    bad = [
        ("/api/models/0/clone", {"params": {"nope": 1}}, "params="),
        ("/api/models/0/clone", {"params": {"lr": 0.5}}, "a value in"),
        ("/api/models/0/clone", {"warm_start": "yes"}, "warm_start='yes'"),
        ("/api/models", {"params": {"lr": 0.01}, "epochs": 0}, "epochs=0"),
        ("/api/models", {"params": {}}, "a value for every parameter"),
        ("/api/models/0/epochs", {"epochs": 1}, "epochs=1"),  # it has done 2
        ("/api/models/0/epochs", {"epochs": "many"}, "epochs='many'"),
    ]
    for url, body, message in bad:
        answer = post(url, json=body)
        assert answer.status_code == 400, (url, body, answer.text)
        assert message in answer.json()["detail"], answer.json()
    # Malformed JSON and bodies of the wrong shape: 422, never a traceback.
    for url, content in [
        ("/api/models/0/clone", b"{not json"),
        ("/api/models", b"[1, 2]"),
        ("/api/models/0/epochs", b"{}"),
        ("/api/models/0/clone", b'{"params": {}, "lr": 0.1}'),  # unknown field
    ]:
        answer = post(url, content=content, headers={**AUTH, "Content-Type": "application/json"})
        assert answer.status_code == 422, (url, answer.text)
        assert "Traceback" not in answer.text and answer.json()["detail"]
    assert client.get("/api/models/abc", headers=AUTH).status_code == 422
    assert len(cerebro.load(path).controls) == before  # nothing was queued

    # A good request on a finished run is queued for its next run (202: pending).
    answer = post("/api/models/0/clone", json={"params": {"lr": 0.02}, "epochs": 1})
    assert answer.status_code == 202 and answer.json()["state"] == "pending"
    [*_, queued] = cerebro.load(path).controls
    assert queued["op"] == "clone" and queued["params"] == {"lr": 0.02}
    assert queued["who"] == "anonymous via dashboard (testclient)"


def test_serving_refuses_bad_places_before_serving(tmp_path, run):
    path, _, _ = run
    with pytest.raises(cerebro.ConfigError, match="path_or_url=") as caught:
        create_app(tmp_path / "nowhere", TOKEN)
    assert "no such folder" in str(caught.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(cerebro.ConfigError, match="sub-folders hold"):
        create_app(tmp_path / "empty", TOKEN)
    url = "postgresql://alice:s3cret@127.0.0.1:1/nodb"
    with pytest.raises(cerebro.ConfigError) as caught:
        create_app(url, TOKEN)
    assert "s3cret" not in str(caught.value) and "alice:***@127.0.0.1:1" in str(caught.value)
    # A folder of experiment folders: each is listed.
    app = create_app(path.parent, TOKEN)
    [listed] = TestClient(app).get("/api/experiments", headers=AUTH).json()
    assert listed["key"].startswith("live:") and listed["name"] == "live"

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            cerebro.ConfigError, match=f"port={port} is not accepted: expected a free port"
        ):
            DashboardServer(path, port=port)


def test_the_command_serves_the_page_and_api(run):
    import subprocess
    import sys
    import urllib.request

    path, _, _ = run
    done = subprocess.run(
        [sys.executable, "-m", "cerebro.cli", "serve", str(path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "path_or_url=" in done.stdout
    server = DashboardServer(path, port=0, token=TOKEN)
    server.start()
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{server.port}/api/models", headers=AUTH)
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200 and b'"status"' in answer.read()
        assert server.url == f"http://127.0.0.1:{server.port}/?token={TOKEN}"
    finally:
        server.stop()
