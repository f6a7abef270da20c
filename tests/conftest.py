from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import closing

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_digits

import cerebro


@pytest.fixture(scope="session")
def digits_arrays() -> dict[str, np.ndarray]:
    d = load_digits()
    return {"x": (d.images / 16.0).astype(np.float32), "y": d.target.astype(np.int64)}


@pytest.fixture(scope="session")
def digits(tmp_path_factory, digits_arrays) -> cerebro.Dataset:
    """Digits (1797 rows of 8x8 images), 4 shards, 20% validation."""
    path = tmp_path_factory.mktemp("data") / "digits"
    return cerebro.prepare_data(digits_arrays, path, label="y", num_shards=4, validation=0.2)


# The backend-independent tests (MOP invariants, equivalence, failure recovery, determinism) run
# against every backend. Ray is installed by the dev extra; the first Ray test starts a local
# Ray instance that the others reuse.
BACKENDS = ["local", "ray"]


def make_backend(kind: str, workers: int = 2, **options) -> cerebro.Backend:
    """A backend of ``kind`` ("local" or "ray") with ``workers`` workers on this machine."""
    if kind == "local":
        return cerebro.LocalBackend(workers=workers, **options)
    if kind == "ray":
        return cerebro.RayBackend(workers=workers, **options)
    raise ValueError(kind)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Bit-for-bit comparisons need the same thread count in the test process and the workers.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def state_equal(a, b) -> bool:
    """Exact equality of nested state dicts (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b


def replay_epoch(digits, build, params, state, seed, model_id, epoch, shards) -> torch.nn.Module:
    """Train one epoch in this process from ``state``, over ``shards`` in order, seeded as a
    deterministic MOP run seeds each hop: what the run recorded must come out bit for bit."""
    from cerebro import training
    from cerebro.seeding import derive_seed

    spec = training.build_spec(build, params, init_seed=None)
    training.restore_state(spec, state, torch.device("cpu"))
    for i, shard in enumerate(shards):
        torch.manual_seed(derive_seed(seed, "hop-rng", model_id, epoch, shard))
        training.run_train_hop(
            spec,
            digits.load_shard("train", shard),
            training.shuffle_seed(seed, model_id, epoch, shard),
            torch.device("cpu"),
            end_of_epoch=i == len(shards) - 1,
        )
    return spec.model


def small_experiment(digits, path, **overrides) -> cerebro.Experiment:
    """A quick experiment on ``digits``: an MLP grid over two learning rates, 1 epoch, 2 local
    workers, no progress display; ``overrides`` replace any argument."""
    import builders

    arguments = dict(
        build=builders.mlp,
        dataset=digits,
        search=cerebro.GridSearch({"lr": cerebro.choice([0.01, 0.03])}),
        epochs=1,
        metric="val_accuracy",
        mode="max",
        backend=cerebro.LocalBackend(workers=2),
        path=path,
        progress=False,
    )
    arguments.update(overrides)
    return cerebro.Experiment(**arguments)


def assert_same_results(result: cerebro.Result, reference: cerebro.Result) -> None:
    """Equal histories and bit-identical final weights for every model of ``reference``."""
    pd.testing.assert_frame_equal(result.history, reference.history, check_exact=True)
    for record in reference.models:
        assert state_equal(
            result.load_model(record.id).state_dict(), reference.load_model(record.id).state_dict()
        ), record.id


def assert_same_hops(result: cerebro.Result, reference: cerebro.Result) -> None:
    """The records read as if nothing had happened: every (model, epoch, kind, shard) once,
    the same ones as ``reference``'s."""
    key = ["model_id", "epoch", "kind", "shard"]
    assert not result.hops.duplicated(key).any()
    pd.testing.assert_frame_equal(
        result.hops[key].sort_values(key, ignore_index=True),
        reference.hops[key].sort_values(key, ignore_index=True),
    )


def kill_mid_run(script, path, min_train_hops: int) -> cerebro.Result:
    """Run ``python script path``, SIGKILL it once ``min_train_hops`` training hops are
    recorded (it must not have finished), and read what it left at ``path``."""
    victim = subprocess.Popen([sys.executable, str(script), str(path)])
    try:
        reached = wait_for_train_hops(
            path, min_train_hops, timeout=240, still=lambda: victim.poll() is None
        )
        assert victim.poll() is None, "the run finished before it could be killed"
        assert reached
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run ended before the kill landed"
    return cerebro.load(path)


def wait_for_train_hops(
    path, count: int, timeout: float, still: Callable[[], bool] = lambda: True
) -> bool:
    """Wait until the experiment at ``path`` has recorded ``count`` training hops (True), the
    timeout passes or ``still()`` turns False (False). For tests that break a run midway.

    It counts with one read-only SQLite query rather than ``cerebro.load``: a full load takes a
    second on a busy 2-core machine, long enough for a small run to finish before the kill."""
    deadline = time.monotonic() + timeout
    database = os.path.join(str(path), "cerebro.db")
    while time.monotonic() < deadline and still():
        if (_train_hops(database) or 0) >= count:
            return True
        time.sleep(0.02)
    return False


def _train_hops(database: str) -> int | None:
    """Training hops recorded in ``database`` so far; None while it has no hops table yet."""
    if not os.path.exists(database):
        return None
    try:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)) as db:
            return int(db.execute("SELECT COUNT(*) FROM hops WHERE kind = 'train'").fetchone()[0])
    except sqlite3.OperationalError:  # created but not yet migrated, or locked for a moment
        return None


class BackgroundRun:
    """Runs an experiment in a thread (a live run to control or watch); re-raises its error on
    join."""

    def __init__(self, exp: cerebro.Experiment) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(exp,), daemon=True)
        self.thread.start()

    def _run(self, exp: cerebro.Experiment) -> None:
        try:
            exp.run()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            self.error = e

    def join(self, timeout: float = 240) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the run did not finish"
        if self.error is not None:
            raise self.error


def wait_for(condition, timeout: float = 60.0) -> None:
    """Poll ``condition`` until it holds (records still being created count as not yet)."""
    deadline = time.monotonic() + timeout
    while not _holds(condition):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _holds(condition) -> bool:
    try:
        return condition()
    except cerebro.ConfigError:  # the records are still being created
        return False
