"""A model's next unit may follow the unit it is in (``Unit.follows``): sent to the next
worker while the model still trains on this one, it starts there the moment the state is
handed over, the workers telling each other (:mod:`cerebro.backends.bells`) without a round
trip through the driver. Followers whose state does not come are cancelled and run again,
so results stay those of a run without them."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import builders
import pytest
from conftest import assert_same_results, wait_for_train_hops

import cerebro
from cerebro.backends.base import Unit, UnitDone, UnitMember
from cerebro.backends.bells import Bell
from cerebro.backends.following import Cancel, Go, Inbox
from cerebro.kinds import UnitKind


def _unit(unit_id: int, follows: int | None = None, model_id: int = 0) -> Unit:
    member = UnitMember(model_id, {}, "state.pt", version=0)
    return Unit(unit_id, UnitKind.TRAIN, 0, (0,), 0, (member,), follows=follows)


@pytest.fixture
def inbox(tmp_path):
    """A worker's inbox on a real pipe and bell, with the driver's end and another bell."""
    driver, worker = multiprocessing.Pipe()
    mine, other = Bell(str(tmp_path), 0, peers=2), Bell(str(tmp_path), 1, peers=2)
    yield Inbox(worker, mine), driver, other
    mine.close()
    other.close()


def test_a_follower_waits_while_the_units_behind_it_run_then_starts_on_a_ring(inbox):
    box, driver, other = inbox
    driver.send(_unit(7, follows=5))
    driver.send(_unit(8, model_id=1))
    unit, run = box.next()
    assert (unit.unit_id, run) == (8, True)  # 7 waits for unit 5's hand-over
    other.ring(5)
    unit, run = box.next()
    assert (unit.unit_id, run) == (7, True)


def test_the_drivers_go_releases_a_follower_whose_ring_was_lost(inbox):
    box, driver, _ = inbox
    driver.send(_unit(7, follows=5))
    driver.send(Go(5))
    unit, run = box.next()
    assert (unit.unit_id, run) == (7, True)


def test_a_ring_heard_before_the_follower_came_still_counts(inbox):
    box, driver, other = inbox
    other.ring(5)
    driver.send(_unit(4, model_id=1))
    assert box.next()[0].unit_id == 4  # the ring is heard meanwhile
    driver.send(_unit(7, follows=5))
    assert box.next()[0].unit_id == 7


def test_a_cancelled_follower_is_given_back_not_run_and_a_stop_ends_the_wait(inbox):
    box, driver, _ = inbox
    driver.send(_unit(7, follows=5))
    driver.send(Cancel(7))
    unit, run = box.next()
    assert (unit.unit_id, run) == (7, False)
    driver.send(_unit(9, follows=6))
    driver.send(None)
    assert box.next() == (None, False)


def test_a_replaced_workers_bell_is_rung_and_a_full_one_drops_rings_without_blocking(tmp_path):
    ringer, first = Bell(str(tmp_path), 0, peers=2), Bell(str(tmp_path), 1, peers=2)
    ringer.ring(1)
    assert first.heard() == {1}
    first.close()  # the worker dies; its replacement makes the pipe anew
    second = Bell(str(tmp_path), 1, peers=2)
    ringer.ring(2)
    assert second.heard() == {2}
    began = time.monotonic()
    for unit_id in range(20_000):  # more than the pipe holds: no one reads it meanwhile
        ringer.ring(unit_id)
    assert time.monotonic() - began < 5
    heard = second.heard()
    assert 0 < len(heard) < 20_000 and 0 in heard
    ringer.close()
    second.close()


def _assert_each_hop_once_and_a_model_in_one_place(result: cerebro.Result) -> None:
    """Every (model, epoch, kind, shard) once, and no model in two units at a time."""
    hops = result.hops
    assert not hops.duplicated(["model_id", "epoch", "kind", "shard"]).any()
    for model_id, its in hops.sort_values("start").groupby("model_id"):
        units = its.groupby("unit").agg(start=("start", "min"), end=("end", "max"))
        units = units.sort_values("start")
        overlaps = units.start.iloc[1:].to_numpy() < units.end.iloc[:-1].to_numpy()
        assert not overlaps.any(), f"model {model_id} ran in two units at once"


class _Watched(cerebro.LocalBackend):
    """The real LocalBackend, noting the units that follow others and those cancelled."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.followers: list[Unit] = []
        self.cancelled: list[UnitDone] = []

    def submit(self, unit: Unit) -> None:
        if unit.follows is not None:
            self.followers.append(unit)
        super().submit(unit)

    def poll(self, timeout: float):
        events = super().poll(timeout)
        self.cancelled += [e for e in events if isinstance(e, UnitDone) and e.cancelled]
        return events


def _run(digits, path, backend, build=builders.mlp, space=None, lag=8, epochs=2):
    space = space or {"lr": cerebro.choice([0.003, 0.03])}
    return cerebro.Experiment(
        build,
        digits,
        cerebro.GridSearch(space),
        epochs=epochs,
        metric="val_accuracy",
        mode="max",
        backend=backend,
        path=path,
        seed=3,
        progress=False,
        deterministic=True,
        durable_lag=lag,
    ).run()


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    """The models on one worker: no unit follows another there."""
    path = tmp_path_factory.mktemp("reference")
    return _run(digits, path, cerebro.LocalBackend(workers=1))


def test_units_follow_each_other_across_workers_with_results_of_one_worker(
    digits, tmp_path, reference
):
    backend = _Watched(workers=2)
    result = _run(digits, tmp_path / "run", backend)
    assert len(backend.followers) >= 4
    assert {f.worker_id for f in backend.followers} == {0, 1}
    assert_same_results(result, reference)
    _assert_each_hop_once_and_a_model_in_one_place(result)


def test_followers_whose_states_go_to_their_files_are_cancelled_and_run_again(
    digits, tmp_path, tmp_path_factory
):
    space = {"lr": cerebro.choice([0.003, 0.03]), "width": cerebro.choice([4096])}
    reference = _run(digits, tmp_path_factory.mktemp("wide"), cerebro.LocalBackend(workers=1),
                     space=space, epochs=1)  # fmt: skip
    # 3.6 MB states, 1 MiB of shared memory: every new state goes straight to its file.
    backend = _Watched(workers=2, handover_mb=1)
    result = _run(digits, tmp_path / "run", backend, space=space, epochs=1)
    assert backend.followers, "no unit followed another"
    assert len(backend.cancelled) == len(backend.followers)
    assert {m.status for m in result.models} == {"completed"}
    assert_same_results(result, reference)
    _assert_each_hop_once_and_a_model_in_one_place(result)


def test_a_follower_of_a_unit_that_fails_is_cancelled_and_the_other_model_goes_on(digits, tmp_path):
    backend = _Watched(workers=2)
    space = {"fail_after": cerebro.choice([10**9, 30])}
    result = _run(digits, tmp_path / "run", backend, build=builders.fails_in_training, space=space)
    by_limit = {m.params["fail_after"]: m for m in result.models}
    assert by_limit[10**9].status == "completed"
    assert by_limit[30].status == "failed"
    assert "failed in training on purpose" in by_limit[30].error
    failing = by_limit[30].id
    assert any(f.model_ids == (failing,) for f in backend.followers)
    assert all(d.unit_id in {f.unit_id for f in backend.followers} for d in backend.cancelled)


def test_killing_the_worker_a_follower_waits_for_gives_results_of_one_worker(digits, tmp_path):
    reference = _run(digits, tmp_path / "ref", cerebro.LocalBackend(workers=1), builders.slow_mlp)
    backend = _Watched(workers=2)
    path = tmp_path / "killed"
    killed = []

    def kill_when_followed():
        if wait_for_train_hops(path, 5, timeout=120):
            pid = backend.pids()[1]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_when_followed)
    killer.start()
    result = _run(digits, path, backend, builders.slow_mlp)
    killer.join()
    assert killed, "the worker was never killed"
    assert [e["detail"]["worker"] for e in result.events if e["kind"] == "worker_lost"] == [1]
    assert {m.status for m in result.models} == {"completed"}
    assert_same_results(result, reference)
    _assert_each_hop_once_and_a_model_in_one_place(result)
