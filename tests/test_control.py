"""Control of a live multi-worker run from another thread or process: stop, resume, clone,
add and set_epochs take effect within one hop and show in the records."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import builders
import pandas as pd
import pytest
from conftest import BackgroundRun, replay_epoch, state_equal, wait_for

import cerebro
from cerebro import training
from cerebro.store.checkpoints import epoch_path, model_dir, origin_path, state_path

SEED = 3


def _experiment(digits, path, num_models=3, epochs=3, **overrides):
    options = dict(
        search=cerebro.RandomSearch({"lr": cerebro.loguniform(1e-3, 3e-2)}, num_models, seed=1),
        epochs=epochs,
        metric="val_accuracy",
        mode="max",
        backend=cerebro.LocalBackend(workers=2),
        path=path,
        seed=SEED,
        progress=False,
        deterministic=True,
        keep_checkpoints="all",
    )
    options.update(overrides)
    # Each training unit sleeps ~0.3 s (12 batches), long enough to act between hops.
    return cerebro.Experiment(builders.slow_mlp_30ms, digits, **options)


def _train_hops(path, model_id: int) -> pd.DataFrame:
    hops = cerebro.load(path).hops
    return hops[(hops.model_id == model_id) & (hops.kind == "train")]


def test_every_control_takes_effect_within_one_hop_on_a_live_run(digits, tmp_path):
    path = tmp_path / "live"
    run = BackgroundRun(_experiment(digits, path))
    wait_for(lambda: (path / "cerebro.db").exists() and len(_train_hops(path, 0)) >= 2)
    ctl = cerebro.control(path, who="tester")

    # Stopped from the command line, which waits until the driver has applied it.
    done = subprocess.run(
        [sys.executable, "-m", "cerebro.cli", "stop", str(path), "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "applied" in done.stdout, done.stdout + done.stderr
    result = cerebro.load(path)
    [row] = result.controls
    hops = _train_hops(path, 0)
    started_after = hops[hops.start + result.experiment["created"] > row["requested"]]
    # Within one hop: at most the hop it was waiting for starts after the request, none after
    # it was applied, and the stopped model gets no more hops while stopped.
    assert len(started_after) <= 1
    assert (hops.start + result.experiment["created"] <= row["settled"]).all()
    assert cerebro.load(path).model(0).status == "stopped"
    frozen = training.load_state(state_path(str(path / "checkpoints"), 0))

    clone = ctl.clone(0, params={"lr": 0.002}).wait(timeout=30)
    added = ctl.add({"lr": 0.02}, epochs=1).wait(timeout=30)
    ctl.set_epochs(1, 4).wait(timeout=30)
    time.sleep(1.0)
    assert len(_train_hops(path, 0)) == len(hops), "a stopped model trained"
    ctl.resume(0).wait(timeout=30)
    run.join()

    result = cerebro.load(path)
    by_id = {m.id: m for m in result.models}
    clone_id, added_id = clone["model_id"], added["model_id"]
    assert {m.status for m in result.models} == {"completed"}
    assert len(by_id[0].history) == 3  # resumed where it stopped
    assert len(by_id[1].history) == 4  # set_epochs
    assert len(by_id[added_id].history) == 1 and by_id[added_id].origin == "add"
    assert by_id[clone_id].origin == "clone" and by_id[clone_id].parent == 0
    assert by_id[clone_id].params == {"lr": 0.002}
    assert [r["state"] for r in result.controls] == ["applied"] * 5
    assert result.controls[0]["who"].endswith(")")  # user@host (pid N): the command line
    assert {r["who"] for r in result.controls[1:]} == {"tester"}
    # Every model, resumed or new, still trains on each shard exactly once per epoch.
    train = result.hops[result.hops.kind == "train"]
    assert (train.groupby(["model_id", "epoch"]).shard.nunique() == digits.num_shards).all()
    assert (train.groupby(["model_id", "epoch"]).size() == digits.num_shards).all()

    # The clone started from the stopped source's exact state (weights, Adam moments and
    # steps, LR-scheduler position, RNG), with the new learning rate...
    checkpoints = str(path / "checkpoints")
    origin = training.load_state(origin_path(model_dir(checkpoints, clone_id)))
    assert state_equal(origin["model"], frozen["model"])
    assert state_equal(origin["optimizer"]["state"], frozen["optimizer"]["state"])
    assert state_equal(origin["rng"], frozen["rng"])
    assert origin["lr_scheduler"]["last_epoch"] == frozen["lr_scheduler"]["last_epoch"]
    assert [g["lr"] for g in origin["optimizer"]["param_groups"]] == [0.002]
    assert clone["source_version"] == frozen["counters"]["version"]
    # ... and its first epoch, replayed here from that state, gives its recorded weights.
    first = train[(train.model_id == clone_id) & (train.epoch == 0)].sort_values("start")
    replayed = replay_epoch(
        digits, builders.slow_mlp_30ms, {"lr": 0.002}, origin, SEED, clone_id, 0, list(first.shard)
    )
    recorded = training.load_state(epoch_path(model_dir(checkpoints, clone_id), 0))["model"]
    assert state_equal(replayed.state_dict(), recorded)


def test_a_finished_experiment_reopens_for_added_cloned_and_extended_models(digits, tmp_path):
    path = tmp_path / "finished"
    _experiment(digits, path, num_models=2, epochs=1, search=_grid()).run()
    before = cerebro.load(path).hops
    ctl = cerebro.control(path)
    assert ctl.is_running is False
    added = ctl.add({"lr": 0.02})
    cloned = ctl.clone(0, params={"lr": 0.005}, force=True)
    extended = ctl.set_epochs(1, 2)
    assert {r["state"] for r in ctl.requests()} == {"pending"}

    result = _experiment(digits, path, num_models=2, epochs=1, search=_grid()).run()
    assert [m.status for m in result.models] == ["completed"] * 4
    assert added.wait(0)["model_id"] == 2 and cloned.wait(0)["model_id"] == 3
    assert extended.wait(0)["status"] == "running"
    assert len(result.model(1).history) == 2
    assert result.model(3).params == {"lr": 0.005}
    assert ctl.requests()[1]["options"]["force"] is True
    # Nothing already trained was trained again.
    old = result.hops[result.hops.model_id == 0]
    assert len(old) == len(before[before.model_id == 0])


def _grid():
    return cerebro.GridSearch({"lr": cerebro.choice([0.01, 0.02])})


@pytest.mark.slow  # 17 s (the default run stays under 10 minutes)
def test_bad_control_requests_are_refused_and_change_nothing(digits, tmp_path):
    path = tmp_path / "bad"
    _experiment(digits, path, num_models=2, epochs=1, search=_grid()).run()
    ctl = cerebro.control(path)
    refused = [
        (lambda: ctl.stop(7), "model_id"),
        (lambda: ctl.stop(0), "model_id"),  # completed
        (lambda: ctl.resume(1), "model_id"),  # completed: not stopped
        (lambda: ctl.clone(0, params={"nope": 1}), "params"),
        (lambda: ctl.clone(0, params={"lr": 0.5}), "params"),  # not a choice of the grid
        (lambda: ctl.add({"lr": 0.01}, epochs=0), "epochs"),
        (lambda: ctl.add({}), "params"),  # incomplete
        (lambda: ctl.set_epochs(0, 0), "epochs"),
        (lambda: ctl.clone(0, warm_start="yes"), "warm_start"),
        (lambda: ctl.stop("0"), "model_id"),
    ]
    for attempt, argument in refused:
        with pytest.raises(cerebro.ConfigError) as caught:
            attempt()
        assert isinstance(caught.value, ValueError) and caught.value.argument == argument
    assert ctl.requests() == []
    with pytest.raises(cerebro.ConfigError, match="path_or_url"):
        cerebro.control(tmp_path / "nowhere")

    # The command line says the same and exits with 2.
    cli = [sys.executable, "-m", "cerebro.cli"]
    done = subprocess.run(
        [*cli, "clone", str(path), "0", "--set", "nope=1"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "nope" in done.stdout and "--force" in done.stdout
    done = subprocess.run([*cli, "stop", str(path), "9"], capture_output=True, text=True)
    assert done.returncode == 2 and "model_id=9" in done.stdout
    assert ctl.requests() == []
    done = subprocess.run(
        [*cli, "add", str(path), "--set", "lr=0.5", "--force"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cerebro resume" in done.stdout  # not running: says how to apply it
    [request] = ctl.requests()
    assert request["params"] == {"lr": 0.5} and request["options"]["force"] is True
    done = subprocess.run([*cli, "models", str(path)], capture_output=True, text=True)
    assert done.returncode == 0 and "completed" in done.stdout


CONTROLLER = textwrap.dedent(
    """
    import random, sys, cerebro
    ctl = cerebro.control(sys.argv[1], who=sys.argv[2])
    rng = random.Random(sys.argv[2])
    for _ in range(12):
        op = rng.choice(["add", "stop", "resume", "clone", "set_epochs"])
        model_id = rng.randrange(len(ctl.models()))
        try:
            if op == "add":
                ctl.add({"lr": rng.uniform(1e-3, 3e-2)}, epochs=1)
            elif op == "clone":
                ctl.clone(model_id, params={"lr": 0.01}, epochs=1)
            elif op == "stop":
                ctl.stop(model_id)
            elif op == "resume":
                ctl.resume(model_id)
            else:
                ctl.set_epochs(model_id, rng.choice([1, 2]))
        except ValueError:
            pass  # refused by the checks before anything was queued
    """
)


@pytest.mark.slow  # 17 s (the default run stays under 10 minutes)
def test_two_controllers_at_once_never_corrupt_the_records(digits, tmp_path):
    path = tmp_path / "two"
    run = BackgroundRun(_experiment(digits, path, num_models=4, epochs=2))
    wait_for(lambda: (path / "cerebro.db").exists() and len(cerebro.load(path).hops) >= 1)
    controllers = [
        subprocess.Popen([sys.executable, "-c", CONTROLLER, str(path), who])
        for who in ("alice", "bob")
    ]
    for process in controllers:
        assert process.wait(timeout=120) == 0
    run.join()  # stopped models do not hold the run: it ends when no model is running

    result = cerebro.load(path)
    requests = result.controls
    assert requests and {r["who"] for r in requests} <= {"alice", "bob"}
    assert all(r["state"] in ("applied", "rejected") for r in requests)
    assert all(r["error"] for r in requests if r["state"] == "rejected")
    assert any(r["state"] == "applied" for r in requests)
    created = sorted(
        r["outcome"]["model_id"]
        for r in requests
        if r["state"] == "applied" and r["op"] in ("add", "clone")
    )
    ids = [m.id for m in result.models]
    assert ids == list(range(len(ids)))
    assert created == ids[4:]
    for model in result.models:
        epochs = [h["epoch"] for h in model.history]
        assert epochs == list(range(len(epochs)))
