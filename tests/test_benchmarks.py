"""The benchmark scripts keep running (their speed is measured by running them, not here)."""

from __future__ import annotations

import doctest
import math
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_mop_scaling_quick_runs_and_reports_every_approach(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "mop_scaling.py"),
            "--quick",
            "--workers",
            "1",
            "2",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    for label in ("sequential, 1 thread", "MOP, 1 worker", "MOP, 2 workers"):
        assert label in done.stdout
    assert "overhead_per_unit" in done.stdout


def test_mop_scaling_refuses_more_workers_than_cores():
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "mop_scaling.py"),
            "--quick",
            "--workers",
            str((os.cpu_count() or 1) + 1),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--workers" in done.stderr and "cores" in done.stderr


@pytest.mark.slow
def test_fusion_quick_runs_both_parts():
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "fusion.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "fused_step_ms" in done.stdout and "makespan_speedup" in done.stdout


@pytest.mark.slow
def test_transfer_quick_runs_every_approach():
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "transfer.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    for label in ("current practice", "materialized, unlimited", "materialized, 25%"):
        assert label in done.stdout


@pytest.mark.slow
def test_busy_quick_writes_a_row_per_workload_and_lag(tmp_path):
    done = _run_quick("busy.py", "--out", str(tmp_path))
    table = (tmp_path / "busy.md").read_text()
    for workload in ("demo", "tiny", "6mlp", "10M"):
        rows = [line for line in table.splitlines() if line.startswith(f"| {workload} ")]
        assert len(rows) == 4, table  # durable_lag 0, 1, 2 and 4
    assert "busy_vs_lag0" in table and "cpu_used" in table and done.stdout


@pytest.mark.slow
def test_groups_quick_runs_every_approach():
    done = _run_quick("groups.py")
    for label in ("one after another", "per_group=True, MOP, 2 workers, fused"):
        assert label in done.stdout


def test_cpu_meter_counts_the_driver_and_its_workers_apart():
    """busy.py's CpuMeter: its example, and a worker that exits inside the span still counts
    up to its last sample."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import cpu_meter
    finally:
        sys.path.pop(0)
    failures, tried = doctest.testmod(cpu_meter)
    assert tried and not failures
    if not cpu_meter.CpuMeter().available:
        pytest.skip("no /proc here")
    spin = "import time; t = time.time(); [0 for _ in iter(lambda: time.time() < t + 0.3, False)]"
    with cpu_meter.CpuMeter(every=0.01) as meter:
        start = time.time()
        child = subprocess.Popen([sys.executable, "-c", spin])
        child.wait()
        time.sleep(0.2)  # the worker has exited: the span still holds its CPU time
        end = time.time()
    driver, workers = meter.used(start, end)
    assert 0.15 < workers < 1.0 and driver < 0.15, (driver, workers)
    assert all(math.isnan(v) for v in meter.used(end + 10, end + 20))  # no samples there


def _run_quick(script: str, *options: str) -> subprocess.CompletedProcess[str]:
    """``benchmarks/<script> --quick`` run to its end, successfully."""
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", *options],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done
