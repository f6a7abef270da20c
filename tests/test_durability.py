"""States hop on in memory while their state files are written behind them: how far a model
may run ahead of its file (``durable_lag``), what a crash then costs, and what happens when a
state file cannot be written."""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import subprocess
import sys
import time
import warnings

import pytest
from conftest import assert_same_hops, assert_same_results, small_experiment, wait_for_train_hops

import cerebro
from cerebro.backends import handover
from cerebro.errors import ConfigError, DurabilityError

HERE = os.path.dirname(os.path.abspath(__file__))
SPACE = {"lr": cerebro.choice([0.003, 0.03]), "dropout": cerebro.choice([0.0, 0.2])}


def _experiment(digits, path, **overrides) -> cerebro.Experiment:
    arguments = dict(
        search=cerebro.GridSearch(SPACE), epochs=2, seed=4, deterministic=True
    )  # fmt: skip
    arguments.update(overrides)
    return small_experiment(digits, path, **arguments)


def _durable_versions(path) -> dict[int, tuple[int, int]]:
    """Each model's (durable version, training hops recorded), read from the records."""
    with sqlite3.connect(os.path.join(str(path), "cerebro.db")) as conn:
        durable = dict(conn.execute("SELECT model_id, durable_version FROM models").fetchall())
        hops = dict(
            conn.execute(
                "SELECT model_id, COUNT(*) FROM hops WHERE kind = 'train' GROUP BY model_id"
            ).fetchall()
        )
    conn.close()
    return {m: (durable[m] or 0, hops.get(m, 0)) for m in durable}


@pytest.mark.parametrize("value", [-1, 1.5, "2", True, None])
def test_a_lag_bound_that_is_not_an_integer_from_zero_is_refused_naming_the_option(
    digits, tmp_path, value
):
    with pytest.raises(ConfigError, match="durable_lag") as caught:
        _experiment(digits, tmp_path / "run", durable_lag=value)
    assert "integer >= 0" in str(caught.value) and repr(value) in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_every_lag_bound_gives_the_same_results_and_ends_on_durable_states(digits, tmp_path):
    """Lag 0 writes each state before its model hops on; 1 and 4 let models run ahead. The
    results do not depend on it, and a finished run's records say every state is durable."""
    results = [
        _experiment(digits, tmp_path / f"lag{lag}", durable_lag=lag).run() for lag in (0, 1, 4)
    ]
    for result in results[1:]:
        assert_same_results(result, results[0])
    for lag, result in zip((0, 1, 4), results, strict=True):
        versions = _durable_versions(tmp_path / f"lag{lag}")
        assert all(durable == hops == 2 * digits.num_shards for durable, hops in versions.values())
        assert result.hops[result.hops.kind == "train"].save_s.notna().any()


def test_a_full_disk_warns_once_then_stops_at_the_bound_and_loses_nothing(
    digits, tmp_path, monkeypatch
):
    """The disk fills after the first few state files: training goes on from memory, one
    warning names the folder, and the run stops with a DurabilityError once a model may go no
    further. Nothing is marked lost: with room again, the same experiment resumes and ends as
    an uninterrupted run."""
    reference = _experiment(digits, tmp_path / "reference").run()
    path = tmp_path / "full"
    written = []
    copy = handover._copy_file

    def fills_up(source: str, target: str, version: int) -> None:
        if len(written) >= 3:
            raise OSError(errno.ENOSPC, "No space left on device", target)
        written.append(target)
        copy(source, target, version)

    monkeypatch.setattr(handover, "_copy_file", fills_up)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DurabilityError, match=r"durable_lag=2") as error:
            _experiment(digits, path).run()
    assert "No space left on device" in str(error.value)
    said = [w for w in caught if "training goes on from memory" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    assert str(path / "checkpoints") in str(said[0].message)
    stopped = cerebro.load(path)
    assert all(m.status != "failed" for m in stopped.models)
    for durable, hops in _durable_versions(path).values():
        assert hops - durable <= 2  # recorded hops past the state file are at most the bound

    monkeypatch.setattr(handover, "_copy_file", copy)  # room again
    resumed = _experiment(digits, path).run()
    assert_same_results(resumed, reference)
    assert_same_hops(resumed, reference)


SCRIPT = """
import os, signal, sys, threading, time
sys.path.insert(0, {tests!r})
import builders, cerebro
from cerebro.backends import handover

copy = handover._copy_file

def slow_disk(source, target, version):  # each state file takes 0.25 s: states run ahead
    time.sleep(0.25)
    copy(source, target, version)

if __name__ == "__main__":
    if sys.argv[2] == "slow":
        handover._copy_file = slow_disk
    space = {space!r}
    space = {{k: cerebro.choice(v) for k, v in space.items()}}
    backend = cerebro.LocalBackend(workers=2)
    if sys.argv[2] == "slow":
        def kill_a_worker():  # the test kills the driver after this
            while not os.path.exists(sys.argv[3]):
                time.sleep(0.05)
            os.kill(backend.pids()[1], signal.SIGKILL)
        threading.Thread(target=kill_a_worker, daemon=True).start()
    cerebro.Experiment(builders.slow_mlp, {data!r}, cerebro.GridSearch(space), epochs=3,
                       metric="val_accuracy", mode="max", backend=backend, path=sys.argv[1],
                       seed=8, progress=False, deterministic=True, durable_lag=3).run()
"""


def test_killing_a_worker_then_the_driver_while_states_run_ahead_resumes_to_identical_results(
    digits, tmp_path
):
    """With a slow disk, models run up to 3 hops ahead of their state files. A worker is
    killed, then the driver, both while some model's current state is newer than its file:
    the rerun goes on from the files, trains the lost hops again and ends as an uninterrupted
    run, every hop recorded once."""
    script = tmp_path / "run.py"
    space = {k: [0.003, 0.03] if k == "lr" else [0.0, 0.2] for k in SPACE}
    script.write_text(SCRIPT.format(tests=HERE, data=digits.path, space=space))
    reference = tmp_path / "reference"
    done = subprocess.run(
        [sys.executable, str(script), str(reference), "fast"], capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    path, go = tmp_path / "crashed", tmp_path / "kill-a-worker"
    victim = subprocess.Popen([sys.executable, str(script), str(path), "slow", str(go)])
    try:
        assert wait_for_train_hops(path, 8, timeout=240, still=lambda: victim.poll() is None)
        go.touch()
        deadline = time.monotonic() + 60
        while not _worker_lost(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _worker_lost(path), "the worker's loss was never recorded"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # a moment when some model runs ahead of its file
            versions = _durable_versions(path)
            if any(hops > durable for durable, hops in versions.values()):
                break
            time.sleep(0.02)
        assert victim.poll() is None, "the run finished before it could be killed"
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    at_kill = _durable_versions(path)
    assert any(hops > durable for durable, hops in at_kill.values()), at_kill
    assert all(hops - durable <= 3 for durable, hops in at_kill.values()), at_kill

    done = subprocess.run(
        [sys.executable, str(script), str(path), "fast"], capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    resumed, uninterrupted = cerebro.load(path), cerebro.load(reference)
    assert {m.status for m in resumed.models} == {"completed"}
    assert_same_results(resumed, uninterrupted)
    assert_same_hops(resumed, uninterrupted)


def _worker_lost(path) -> bool:
    with sqlite3.connect(os.path.join(str(path), "cerebro.db")) as conn:
        (count,) = conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'worker_lost'").fetchone()
    conn.close()
    return bool(count)


class _StatesLostWithWorkers(cerebro.LocalBackend):
    """LocalBackend as a backend whose handed-over states die with their worker (Ray's) would
    be driven, noting when each state file is reported written."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.written_at: dict[tuple[int, int], float] = {}

    @property
    def states_outlive_workers(self) -> bool:
        return False

    def _durable(self, saved) -> None:
        self.written_at[(saved.model_id, saved.version)] = time.time()
        super()._durable(saved)


def test_where_states_die_with_workers_an_epoch_is_evaluated_from_its_state_file(digits, tmp_path):
    """With such a backend a model evaluates its epoch only once its last training state is in
    its file: an evaluation whose state was lost with a worker can read it again from there."""
    from cerebro.store import RecordStore

    backend = _StatesLostWithWorkers(workers=2)
    path = tmp_path / "run"
    result = small_experiment(digits, path, epochs=2, backend=backend, durable_lag=2).run()
    _, row = RecordStore.find(path, None)
    hops, shards = result.hops, digits.num_shards
    evaluated = 0
    for (model, epoch), of_epoch in hops.groupby(["model_id", "epoch"]):
        written = backend.written_at[(model, (epoch + 1) * shards)]  # the epoch's last state
        evals = of_epoch[of_epoch.kind == "eval"]
        assert (evals.start + row["created"] > written).all(), (model, epoch)
        evaluated += len(evals)
    assert evaluated == 2 * 2 * shards  # 2 models x 2 epochs x every validation shard
