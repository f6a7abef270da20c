from __future__ import annotations

import os
import subprocess
import sys

import cerebro
from cerebro.cli import main


def test_demo_runs_a_real_model_selection(tmp_path):
    path = tmp_path / "demo"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "cerebro.cli",
            "demo",
            "--path",
            str(path),
            "--epochs",
            "2",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    out = completed.stdout
    assert "Leaderboard (by val_accuracy, max)" in out
    assert "records:" in out and os.path.exists(path / "cerebro.db")
    from cerebro.store import RecordStore, open_engine

    store = RecordStore(open_engine(f"sqlite:///{path / 'cerebro.db'}"), 1)
    assert len(store.models()) == 8
    assert {m["status"] for m in store.models()} == {"completed"}
    assert len(store.epochs()) == 8 * 2


def test_demo_bad_arguments_exit_2_with_a_clear_message(tmp_path, capsys):
    assert main(["demo", "--workers", "0", "--path", str(tmp_path / "x")]) == 2
    assert "workers=0 is not accepted" in capsys.readouterr().out


def test_public_api_names():
    for name in [
        "prepare_data",
        "Dataset",
        "ModelSpec",
        "metrics",
        "loguniform",
        "choice",
        "randint",
        "uniform",
        "quniform",
        "Experiment",
        "GridSearch",
        "RandomSearch",
        "LocalBackend",
    ]:
        assert hasattr(cerebro, name), name
