"""A worker that dies mid-hop (a local process or a Ray actor) is replaced, the interrupted unit
runs again from the state it started from, and the experiment ends as if nothing had happened
(deterministic mode)."""

from __future__ import annotations

import os
import signal
import threading

import builders
import pytest
from conftest import BACKENDS, assert_same_results, make_backend, wait_for_train_hops

import cerebro


def _experiment(digits, path, backend, build=builders.slow_mlp, space=None):
    space = space or {"lr": cerebro.choice([0.003, 0.03]), "dropout": cerebro.choice([0.0, 0.2])}
    return cerebro.Experiment(
        build,
        digits,
        cerebro.GridSearch(space),
        epochs=2,
        metric="val_accuracy",
        mode="max",
        backend=backend,
        path=path,
        seed=2,
        progress=False,
        deterministic=True,
    )


@pytest.mark.parametrize("kind", BACKENDS)
def test_killing_a_worker_mid_hop_gives_identical_results(digits, tmp_path, kind):
    reference = _experiment(digits, tmp_path / "ref", cerebro.LocalBackend(workers=2)).run()

    backend = make_backend(kind, workers=2)
    path = tmp_path / "killed"
    killed = []

    def kill_one_worker_mid_run():
        if wait_for_train_hops(path, 10, timeout=120):
            pid = backend.pids()[1]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_one_worker_mid_run)
    killer.start()
    result = _experiment(digits, path, backend).run()
    killer.join()

    assert killed, "the worker was never killed"
    lost = [e for e in result.events if e["kind"] == "worker_lost"]
    assert len(lost) == 1 and lost[0]["detail"]["worker"] == 1
    assert lost[0]["detail"]["units"], "no unit was in flight on the killed worker"
    assert {m.status for m in result.models} == {"completed"}
    assert_same_results(result, reference)
    key = ["model_id", "epoch", "kind", "shard"]
    assert not result.hops.duplicated(key).any()
    assert len(result.hops) == len(reference.hops)


@pytest.mark.parametrize("kind", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_a_unit_that_keeps_killing_its_worker_fails_its_model_only(digits, tmp_path, kind):
    space = {"fail": cerebro.choice(["none", "exit"])}
    result = _experiment(
        digits,
        tmp_path / "run",
        make_backend(kind, workers=2),
        build=builders.flaky,
        space=space,
    ).run()
    by_mode = {m.params["fail"]: m for m in result.models}
    assert by_mode["none"].status == "completed"
    assert by_mode["exit"].status == "failed"
    assert "lost its worker 3 times in a row" in by_mode["exit"].error
    assert len([e for e in result.events if e["kind"] == "worker_lost"]) == 3
