"""A worker that dies mid-hop (a local process or a Ray actor) is replaced, the interrupted unit
runs again from the state it started from, and the experiment ends as if nothing had happened
(deterministic mode)."""

from __future__ import annotations

import os
import signal
import threading
import time

import builders
import pytest
from conftest import assert_same_results, make_backend, wait_for_train_hops

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


@pytest.mark.parametrize(
    # ray: slow, 25 s (the default run stays under 10 minutes; its other Ray tests stay)
    "kind",
    ["local", pytest.param("ray", marks=pytest.mark.slow)],
)
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
        build=builders.exits_in_workers,  # flaky's "exit" would end the driver in preflight
        space=space,
    ).run()
    by_mode = {m.params["fail"]: m for m in result.models}
    assert by_mode["none"].status == "completed"
    assert by_mode["exit"].status == "failed"
    assert "lost its worker 3 times in a row" in by_mode["exit"].error
    assert len([e for e in result.events if e["kind"] == "worker_lost"]) == 3


@pytest.mark.parametrize("kind", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_a_stopped_worker_is_replaced_within_its_timeout_with_identical_results(
    digits, tmp_path, kind
):
    reference = _experiment(digits, tmp_path / "ref", cerebro.LocalBackend(workers=2)).run()

    timeout = 3.0
    backend = make_backend(kind, workers=2, worker_timeout=timeout)
    path = tmp_path / "stopped"
    stopped: list[tuple[int, float]] = []

    def stop_one_worker_mid_run():
        if wait_for_train_hops(path, 10, timeout=120):
            pid = backend.pids()[0]
            os.kill(pid, signal.SIGSTOP)  # alive, but silent: no exit for the driver to see
            stopped.append((pid, time.time()))

    stopper = threading.Thread(target=stop_one_worker_mid_run)
    stopper.start()
    result = _experiment(digits, path, backend).run()
    stopper.join()

    assert stopped, "the worker was never stopped"
    pid, when = stopped[0]
    lost = [e for e in result.events if e["kind"] == "worker_lost"]
    assert len(lost) == 1 and lost[0]["detail"]["worker"] == 0
    assert "stuck" in lost[0]["detail"]["reason"]
    # Recorded once the replacement is up: a process fork locally, a new actor on Ray (seconds).
    assert lost[0]["time"] - when < timeout + (5 if kind == "local" else 20)
    assert pid not in backend.pids() or not backend.pids()
    assert {m.status for m in result.models} == {"completed"}
    assert_same_results(result, reference)


def test_a_worker_killed_while_starting_is_retried_and_every_loss_recorded(
    digits, tmp_path, monkeypatch
):
    import slow_start

    monkeypatch.setenv("CEREBRO_TEST_IMPORT_DELAY", "2")  # workers take 2 s to receive build
    backend = cerebro.LocalBackend(workers=2)
    killed: list[int] = []

    def kill_the_first_worker_twice_while_it_starts():
        deadline = time.monotonic() + 60
        while len(killed) < 2 and time.monotonic() < deadline:
            pids = backend.pids()
            if pids and pids[0] not in killed:
                time.sleep(0.5)  # well inside its 2 s start
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_first_worker_twice_while_it_starts)
    killer.start()
    result = _experiment(digits, tmp_path / "run", backend, build=slow_start.build).run()
    killer.join()

    assert len(killed) == 2
    lost = [e["detail"] for e in result.events if e["kind"] == "worker_lost"]
    assert [(d["worker"], d["reason"]) for d in lost] == [(0, "exited while starting")] * 2
    assert all(d["exitcode"] == -signal.SIGKILL for d in lost)
    assert {m.status for m in result.models} == {"completed"}, [m.error for m in result.models]
    # The losses ran nothing: no unit was run twice, none was dropped.
    assert not result.hops.duplicated(["model_id", "epoch", "kind", "shard"]).any()
    assert len(result.hops) == 4 * 2 * (4 + 4)  # models x epochs x (train + validation) shards


@pytest.mark.slow
def test_a_ray_actor_killed_while_starting_is_retried_and_recorded(digits, tmp_path, monkeypatch):
    import ray

    backend = make_backend("ray", workers=2)
    launch = type(backend)._launch
    killed: list[int] = []

    def launch_and_kill_the_first(self, worker_id, node_id, generation):
        placed = launch(self, worker_id, node_id, generation)
        if not killed:  # a real kill of the real actor, before it has loaded its shards
            ray.kill(placed.actor)
            killed.append(worker_id)
        return placed

    monkeypatch.setattr(type(backend), "_launch", launch_and_kill_the_first)
    result = _experiment(digits, tmp_path / "run", backend).run()
    lost = [e["detail"] for e in result.events if e["kind"] == "worker_lost"]
    assert [(d["worker"], d["reason"]) for d in lost] == [(killed[0], "exited while starting")]
    assert {m.status for m in result.models} == {"completed"}


def test_a_unit_whose_new_state_cannot_be_handed_over_runs_again_with_identical_results(
    digits, tmp_path
):
    # The state of every model the unit trained is intact where the unit found it (its
    # handover file or its state file): the model runs the unit again, and nothing is lost.
    flag = tmp_path / "fail-once"
    space = {"lr": cerebro.choice([0.003, 0.03]), "flag": cerebro.choice([str(flag)])}
    reference = _experiment(
        digits, tmp_path / "ref", cerebro.LocalBackend(workers=2), builders.handover_fails, space
    ).run()

    flag.write_text("once")
    with pytest.warns(RuntimeWarning, match="could not hand its new state over.*it runs again"):
        result = _experiment(
            digits, tmp_path / "run", cerebro.LocalBackend(workers=2), builders.handover_fails,
            space,
        ).run()  # fmt: skip

    assert not flag.exists(), "no hand-over failed"
    failed = [e["detail"] for e in result.events if e["kind"] == "handover_failed"]
    assert len(failed) == 1 and failed[0]["failures"] == 1
    assert failed[0]["error"] == "OSError: [Errno 5] I/O error writing a handover file (on purpose)"
    assert {m.status for m in result.models} == {"completed"}
    assert_same_results(result, reference)
    key = ["model_id", "epoch", "kind", "shard"]
    assert not result.hops.duplicated(key).any()
    assert len(result.hops) == len(reference.hops)


def test_a_model_whose_states_never_hand_over_fails_after_max_unit_failures(digits, tmp_path):
    flag = tmp_path / "fail-always"
    flag.write_text("always")
    space = {"flag": cerebro.choice([str(flag), str(tmp_path / "absent")])}
    with pytest.warns(RuntimeWarning, match="it runs again"):
        result = cerebro.Experiment(
            builders.handover_fails, digits, cerebro.GridSearch(space), epochs=1,
            backend=cerebro.LocalBackend(workers=2), path=tmp_path / "run", progress=False,
            max_unit_failures=2,
        ).run()  # fmt: skip

    by_flag = {m.params["flag"]: m for m in result.models}
    assert by_flag[str(tmp_path / "absent")].status == "completed"
    failing = by_flag[str(flag)]
    assert failing.status == "failed"
    assert "could not hand its new state over, 2 times in a row" in failing.error
    assert "I/O error writing a handover file (on purpose)" in failing.error
    failed = [e["detail"] for e in result.events if e["kind"] == "handover_failed"]
    assert [f["failures"] for f in failed] == [1, 2]
    assert {f["model"] for f in failed} == {failing.id}
