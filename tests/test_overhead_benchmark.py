"""benchmarks/overhead.py: its smoke run writes a row per workload and approach, and bad
arguments are refused before any run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"


@pytest.mark.slow
def test_the_quick_run_writes_a_row_per_workload_and_approach(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "overhead.md").read_text()
    for workload in ("demo (8 x 5 epochs)", "tiny (32 x 2 epochs)"):
        for approach in ("cerebro", "cerebro, warm", "plain"):
            assert f"| {workload} | {approach} |" in table
    assert "first_unit_s <= 1.5" in table


@pytest.mark.parametrize(
    ("arguments", "said"),
    [(["--repeats", "0"], "--repeats=0"), (["--device", "tpu"], "--device=tpu")],
)
def test_bad_arguments_are_refused(arguments, said):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert said in done.stderr
