"""Crash and resume: kill the driver with SIGKILL mid-run, run the script again on the same
path, and get exactly what an uninterrupted run gives (deterministic mode)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import builders
import pandas as pd
import pytest
from conftest import (
    assert_same_hops,
    assert_same_results,
    kill_mid_run,
    small_experiment,
    state_equal,
)

import cerebro

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS, EPOCHS = 5, 3

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import builders, cerebro
if __name__ == "__main__":
    space = {{"lr": cerebro.loguniform(1e-3, 3e-2), "width": cerebro.randint(16, 64),
             "dropout": cerebro.uniform(0.0, 0.3)}}
    cerebro.Experiment(builders.mlp, {data!r}, cerebro.RandomSearch(space, num_models={models}),
                       epochs={epochs}, metric="val_accuracy", mode="max",
                       backend=cerebro.{backend}(workers=2), path=sys.argv[1], seed=11,
                       progress=False, deterministic=True{extra}).run()
"""


def _script_text(digits, backend: str = "LocalBackend", extra: str = "") -> str:
    """The test script on ``backend``, with ``extra`` Experiment arguments (", name=value")."""
    return SCRIPT.format(
        tests=HERE, data=digits.path, models=MODELS, epochs=EPOCHS, backend=backend, extra=extra
    )


@pytest.fixture
def script(digits, tmp_path):
    path = tmp_path / "run.py"
    path.write_text(_script_text(digits))
    return path


def _run(script, path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "how",
    [
        "same script",
        # slow: the default run stays under its 10 minutes (the same path as "same script")
        pytest.param("cerebro resume", marks=pytest.mark.slow),
        pytest.param("fused", marks=pytest.mark.slow),  # 25 s
        pytest.param("on ray", marks=pytest.mark.slow),
    ],
)
def test_sigkill_of_the_driver_then_rerun_gives_identical_results(script, tmp_path, digits, how):
    """ "on ray": the crashed run and its rerun use RayBackend (its local Ray, actors included,
    dies with the driver); the reference ran on local worker processes. "fused": models of one
    width in fused cohorts of 3, killed while fused units are in flight."""
    total_train_hops = MODELS * EPOCHS * digits.num_shards
    if how == "fused":
        script = tmp_path / "run_fused.py"
        text = _script_text(digits, extra=", fusion=cerebro.Fusion(max_models=3)")
        script.write_text(text.replace('"width": cerebro.randint(16, 64)', '"width": 32'))
    uninterrupted = tmp_path / "uninterrupted"
    _run(script, uninterrupted)

    if how == "on ray":
        script = tmp_path / "run_on_ray.py"
        script.write_text(_script_text(digits, backend="RayBackend"))
    crashed = tmp_path / "crashed"
    at_kill = kill_mid_run(script, crashed, min_train_hops=total_train_hops // 2)
    # It died without saying so; no driver holds the path's lock, so readers say interrupted.
    assert at_kill.experiment["status"] == "interrupted"
    unfinished = [m for m in at_kill.models if m.status != "completed"]
    assert unfinished, "the kill came too late to test anything"
    finished_at_kill = {m.id for m in at_kill.models if m.status == "completed"}
    finished_states = {i: os.stat(training_state(crashed, i)).st_mtime_ns for i in finished_at_kill}

    if how == "fused":
        assert len(at_kill.fused_models) == MODELS, "fused units ran before the kill"
    if how in ("same script", "on ray", "fused"):
        _run(script, crashed)  # the same script again: it continues the experiment
    else:
        done = subprocess.run(
            [sys.executable, "-m", "cerebro.cli", "resume", str(crashed)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert "resuming" in done.stdout
    resumed, reference = cerebro.load(crashed), cerebro.load(uninterrupted)
    assert resumed.experiment["status"] == "completed"
    assert {m.status for m in resumed.models} == {"completed"}
    assert_same_results(resumed, reference)
    assert_same_hops(resumed, reference)
    # Models that had completed were not trained again.
    for model_id, mtime in finished_states.items():
        assert os.stat(training_state(crashed, model_id)).st_mtime_ns == mtime


def training_state(path, model_id: int) -> str:
    from cerebro.store.checkpoints import state_path

    return state_path(os.path.join(path, "checkpoints"), model_id)


_small = small_experiment


def test_running_a_finished_experiment_again_trains_nothing(digits, tmp_path, monkeypatch):
    first = _small(digits, tmp_path / "run").run()
    backend = cerebro.LocalBackend(workers=2)
    monkeypatch.setattr(backend, "start", lambda *a, **k: pytest.fail("a worker was started"))
    again = _small(digits, tmp_path / "run", backend=backend).run()
    pd.testing.assert_frame_equal(again.hops, first.hops)
    pd.testing.assert_frame_equal(again.history, first.history)
    assert again.experiment["status"] == "completed"


def test_a_path_holding_a_different_experiment_is_refused(digits, tmp_path):
    _small(digits, tmp_path / "run").run()
    with pytest.raises(
        cerebro.ConfigError, match=r"path=.*different one \(epochs: recorded 1, now 2"
    ):
        _small(digits, tmp_path / "run", epochs=2).run()
    with pytest.raises(cerebro.ConfigError, match=r"different one \(search: "):
        _small(digits, tmp_path / "run", search=cerebro.GridSearch({"lr": 0.5})).run()
    # overwrite=True replaces it.
    replaced = _small(digits, tmp_path / "run", epochs=2, overwrite=True).run()
    assert set(replaced.history.epoch) == {0, 1}


def test_a_second_driver_on_the_same_path_is_refused(digits, tmp_path):
    import fcntl

    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(cerebro.ConfigError, match="no other process is running"):
            _small(digits, tmp_path / "run").run()


def test_resume_of_an_interactive_experiment_says_what_to_do(digits, tmp_path):
    from cerebro.store import RecordStore, open_engine, sqlite_url

    _small(digits, tmp_path / "run").run()
    # As if it had been started from a notebook: no command was recorded.
    engine = open_engine(sqlite_url(str(tmp_path / "run")))
    with engine.begin() as conn:
        from cerebro.store.records import experiments

        row = conn.execute(experiments.select()).mappings().one()
        config = {**row["config"], "command": None}
        conn.execute(experiments.update().values(config=config))
    assert RecordStore.list_experiments(engine)[0]["config"]["command"] is None
    done = subprocess.run(
        [sys.executable, "-m", "cerebro.cli", "resume", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "interactive session" in done.stdout


@pytest.mark.parametrize(
    "also_break_newest_checkpoint", [False, pytest.param(True, marks=pytest.mark.slow)]
)
def test_a_lost_state_file_restarts_its_model_from_a_good_checkpoint(
    script, tmp_path, digits, also_break_newest_checkpoint
):
    """After a crash, one model's state file is gone (and maybe its newest epoch checkpoint is
    corrupt): it restarts from the newest checkpoint whose checksum matches, with a warning,
    and the results still equal an uninterrupted run (deterministic mode)."""
    total_train_hops = MODELS * EPOCHS * digits.num_shards
    uninterrupted = tmp_path / "uninterrupted"
    _run(script, uninterrupted)
    crashed = tmp_path / "crashed"
    # At a third, the kill usually lands between an epoch's end and the record of its
    # checkpoint's checksum: a checkpoint corrupted then must not be trusted on resume.
    at_kill = kill_mid_run(script, crashed, min_train_hops=total_train_hops // 3)
    unfinished = [m for m in at_kill.models if m.status != "completed"]
    assert unfinished, "the kill came too late to test anything"
    victim = max(unfinished, key=lambda m: len(m.history))
    os.remove(training_state(crashed, victim.id))
    model_dir = os.path.dirname(training_state(crashed, victim.id))
    epochs_on_disk = sorted(f for f in os.listdir(model_dir) if f.startswith("epoch-"))
    if also_break_newest_checkpoint and epochs_on_disk:
        newest = os.path.join(model_dir, epochs_on_disk[-1])
        data = bytearray(Path(newest).read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte: only the checksum can tell
        os.remove(newest)  # (it may be a hard link to another file)
        Path(newest).write_bytes(bytes(data))

    done = subprocess.run(
        [sys.executable, str(script), str(crashed)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert f"model {victim.id}: state file" in done.stderr and "restarts from" in done.stderr
    resumed, reference = cerebro.load(crashed), cerebro.load(uninterrupted)
    assert_same_results(resumed, reference)
    recovered = [e for e in resumed.events if e["kind"] == "state_recovered"]
    assert [e["detail"]["model"] for e in recovered] == [victim.id]
    if also_break_newest_checkpoint and epochs_on_disk:
        broken_epoch = int(epochs_on_disk[-1][6:10])
        assert recovered[0]["detail"]["from_epoch"] < broken_epoch


@pytest.mark.slow
def test_a_model_whose_local_files_are_all_lost_recovers_from_the_checkpoint_mirror(
    script, tmp_path, digits
):
    """With ``checkpoint_mirror``, epoch checkpoints are also kept at an fsspec URL: a model whose
    whole local folder is gone after a crash restarts from the mirror's newest good copy."""
    mirror = tmp_path / "mirror"
    mirrored = _script_with(tmp_path, digits, f"checkpoint_mirror={'file://' + str(mirror)!r}")
    uninterrupted = tmp_path / "uninterrupted"
    _run(script, uninterrupted)
    crashed = tmp_path / "crashed"
    total_train_hops = MODELS * EPOCHS * digits.num_shards
    at_kill = kill_mid_run(mirrored, crashed, min_train_hops=total_train_hops * 2 // 3)
    unfinished = [m for m in at_kill.models if m.status != "completed"]
    assert unfinished, "the kill came too late to test anything"
    victim = max(unfinished, key=lambda m: len(m.history))
    folder = os.path.dirname(training_state(crashed, victim.id))
    shutil.rmtree(folder)

    done = subprocess.run(
        [sys.executable, str(mirrored), str(crashed)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    resumed = _assert_same_results(crashed, uninterrupted)
    [event] = [e["detail"] for e in resumed.events if e["kind"] == "state_recovered"]
    if len(victim.history) >= 2:  # its first checkpoint was surely copied before the kill
        assert event["from_epoch"] >= 0
    # The mirror holds what the keep-policy keeps locally, byte for byte.
    for model in resumed.models:
        local = Path(os.path.dirname(training_state(crashed, model.id)))
        copies = mirror / local.name
        kept = sorted(p.name for p in local.glob("epoch-*.pt"))
        assert sorted(p.name for p in copies.glob("epoch-*.pt")) == kept
        for name in kept:
            assert (copies / name).read_bytes() == (local / name).read_bytes()


@pytest.mark.slow
def test_sigkill_then_rerun_with_checkpoints_at_an_fsspec_url(script, tmp_path, digits):
    """The same crash and resume with every state at an fsspec URL (uploads, no renames)."""
    at_url = _script_with(tmp_path, digits, f"checkpoint_dir={'local://' + str(tmp_path)!r}")
    uninterrupted = tmp_path / "uninterrupted"
    _run(script, uninterrupted)
    crashed = tmp_path / "crashed"
    total_train_hops = MODELS * EPOCHS * digits.num_shards
    at_kill = kill_mid_run(at_url, crashed, min_train_hops=total_train_hops // 2)
    assert any(m.status != "completed" for m in at_kill.models), "the kill came too late"
    _run(at_url, crashed)
    _assert_same_results(crashed, uninterrupted)
    assert not (crashed / "checkpoints").exists()


def _script_with(tmp_path, digits, option: str) -> Path:
    """The test script with one more Experiment argument, e.g. ``checkpoint_dir='...'``."""
    path = tmp_path / "with_option.py"
    path.write_text(_script_text(digits, extra=f", {option}"))
    return path


def _assert_same_results(resumed_path, reference_path) -> cerebro.Result:
    resumed, reference = cerebro.load(resumed_path), cerebro.load(reference_path)
    assert_same_results(resumed, reference)
    return resumed


def test_a_refused_run_leaves_the_other_experiments_build_alone(digits, tmp_path):
    first = _small(digits, tmp_path / "run").run()
    with pytest.raises(cerebro.ConfigError, match="different one"):
        _small(digits, tmp_path / "run", epochs=2, build=builders.flaky).run()
    loaded = cerebro.load(tmp_path / "run")
    assert state_equal(loaded.load_model().state_dict(), first.load_model().state_dict())
    assert loaded._load_build() is builders.mlp
