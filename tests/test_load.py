"""cerebro.load: the records of an experiment from another process, during and after the run."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import builders
import pandas as pd
import pytest
from conftest import state_equal

import cerebro

HERE = os.path.dirname(os.path.abspath(__file__))

RUN_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import builders, cerebro
if __name__ == "__main__":
    space = {{"lr": cerebro.loguniform(1e-3, 3e-2), "width": cerebro.randint(16, 64)}}
    cerebro.Experiment(builders.mlp, {data!r}, cerebro.RandomSearch(space, num_models=6),
                       epochs=4, metric="val_accuracy", mode="max",
                       backend=cerebro.LocalBackend(workers=2), path={path!r},
                       progress=False).run()
"""


def _check_consistent(result: cerebro.Result, num_shards: int) -> None:
    ids = {m.id for m in result.models}
    history = result.history
    assert set(history.model_id) <= ids
    # An epoch is recorded after all of its hops: a snapshot never shows one without the other.
    for row in history.itertuples():
        hops = result.hops[
            (result.hops.model_id == row.model_id) & (result.hops.epoch == row.epoch)
        ]
        assert sorted(hops[hops.kind == "train"].shard) == list(range(num_shards))
        assert sorted(hops[hops.kind == "eval"].shard) == list(range(num_shards))
    for model in result.models:
        assert [h["epoch"] for h in model.history] == list(range(len(model.history)))


def test_a_second_process_reads_while_the_run_writes(digits, tmp_path):
    path = str(tmp_path / "run")
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT.format(tests=HERE, data=digits.path, path=path))
    writer = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    reads, seen_hops, running_reads = 0, 0, 0
    deadline = time.monotonic() + 240
    try:
        while writer.poll() is None:
            assert time.monotonic() < deadline
            if not os.path.exists(os.path.join(path, "cerebro.db")):
                time.sleep(0.05)
                continue
            try:
                result = cerebro.load(path)
            except cerebro.ConfigError:  # the database exists but no experiment is recorded yet
                time.sleep(0.05)
                continue
            _check_consistent(result, digits.num_shards)
            assert len(result.hops) >= seen_hops
            seen_hops = len(result.hops)
            running_reads += result.experiment["status"] == "running"
            reads += 1
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == 0, writer.stderr.read()
    assert running_reads >= 10, f"only {running_reads} reads overlapped the run"

    final = cerebro.load(path)
    assert final.experiment["status"] == "completed"
    assert {m.status for m in final.models} == {"completed"}
    assert len(final.history) == 6 * 4
    _check_consistent(final, digits.num_shards)
    # load_model works from this process: the build function was kept beside the records.
    model = final.load_model()
    assert sum(p.numel() for p in model.parameters()) > 0


def test_load_returns_what_run_returned(digits, tmp_path):
    returned = cerebro.Experiment(
        builders.mlp,
        digits,
        cerebro.GridSearch({"lr": cerebro.choice([0.01, 0.03])}),
        epochs=2,
        metric="val_loss",
        mode="min",
        backend=cerebro.LocalBackend(workers=2),
        path=tmp_path / "run",
        progress=False,
    ).run()
    loaded = cerebro.load(tmp_path / "run")
    pd.testing.assert_frame_equal(loaded.history, returned.history)
    pd.testing.assert_frame_equal(loaded.hops, returned.hops)
    assert loaded.best == returned.best
    assert loaded.metric == "val_loss" and loaded.mode == "min"
    assert state_equal(loaded.load_model().state_dict(), returned.load_model().state_dict())


def test_load_rejects_what_is_not_an_experiment(tmp_path):
    with pytest.raises(cerebro.ConfigError, match="path_or_url="):
        cerebro.load(tmp_path)
    with pytest.raises(cerebro.ConfigError, match="path_or_url='postgresql://me:\\*\\*\\*@"):
        cerebro.load("postgresql://me:secret@127.0.0.1:1/nothing")
