"""benchmarks/compare.py keeps running and writes well-formed outputs (its speed is measured by
running it, not here), and refuses bad arguments before doing any work."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "compare.py")
APPROACHES = (
    "sequential",
    "task_parallel",
    "ddp",
    "ray_tune",
    "model_averaging",
    "mop",
    "mop_deterministic",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _compare(*args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout
    )


def _markdown_table(text: str, heading: str) -> list[dict[str, str]]:
    """The first markdown table after ``heading``, as one dict per row."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    header, _rule, *body = rows
    return [dict(zip(header, row, strict=True)) for row in body]


@pytest.mark.slow  # a minute: every approach end to end (the default run stays under 10 minutes)
def test_quick_run_writes_a_row_per_approach_plots_and_every_metric(tmp_path):
    done = _compare("--quick", "--out", str(tmp_path), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    text = (tmp_path / "compare.md").read_text()
    assert "Command: `python benchmarks/compare.py --quick --out" in text
    assert "Machine:" in text and "load average before the run" in text
    results = _markdown_table(text, "## Results")
    assert [row["approach"] for row in results] == list(APPROACHES)
    ran = []
    for row in results:
        if row["approach"] == "ray_tune" and row["note"].startswith("skipped"):
            assert "ray[tune] not installed" in row["note"]
            continue
        assert not row["note"].startswith(("failed", "skipped")), row
        for column in ("makespan_s", "speedup", "busy", "data_mib_per_worker"):
            assert float(row[column]) > 0, (row["approach"], column)
        for column in ("rss_mib_per_worker", "rss_mib_total"):
            assert float(row[column]) > 0, (row["approach"], column)
        ran.append(row["approach"])
    by_name = {row["approach"]: row for row in results}
    # MOP's workers each hold half the shards; task parallelism's hold all of them.
    assert float(by_name["mop"]["data_mib_per_worker"]) < float(
        by_name["task_parallel"]["data_mib_per_worker"]
    )

    goals = _markdown_table(text, "## Goals")
    assert len(goals) >= 6 and all(g["met?"] in ("yes", "no", "not measured") for g in goals)

    # Every configuration has a final metric under every approach that ran.
    finals = _markdown_table(text, "## Final val_accuracy of every configuration")
    assert len(finals) == 4  # the quick workload's configurations
    for row in finals:
        for approach in ran:
            assert 0 <= float(row[approach]) <= 1, (row["config"], approach)
    with open(tmp_path / "compare_history.csv") as f:
        history = list(csv.DictReader(f))
    for approach in ran:
        configs = {r["config"] for r in history if r["approach"] == approach}
        assert configs == {"0", "1", "2", "3"}, approach
    assert all(math.isfinite(float(r["val_loss"])) for r in history)

    for name in ("compare_makespan.png", "compare_curves.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name


def test_unknown_approach_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    done = _compare("--approaches", "sequential,horovod", "--out", str(out), timeout=120)
    assert done.returncode == 2
    assert "--approaches" in done.stderr and "'horovod'" in done.stderr
    assert all(name in done.stderr for name in APPROACHES)  # what is accepted
    assert not out.exists()


def test_more_workers_than_cores_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    too_many = (os.cpu_count() or 1) + 1
    done = _compare("--quick", "--workers", str(too_many), "--out", str(out), timeout=120)
    assert done.returncode == 2
    assert f"--workers {too_many}" in done.stderr and "cores" in done.stderr
    assert not out.exists()
    done = _compare("--quick", "--workers", "0", "--out", str(out), timeout=120)
    assert done.returncode == 2 and "--workers 0" in done.stderr
