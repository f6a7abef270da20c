"""The dashboard's load check (benchmarks/dashboard_load.py): while a run of 200 models and 20k
hops is being written, the page's API answers within 200 ms (p95), and 50 concurrent readers
cause no "database is locked" error in the run (nor any failed answer)."""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("fastapi")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import dashboard_load  # noqa: E402

pytestmark = pytest.mark.slow


def test_the_api_stays_fast_and_readers_never_lock_the_run():
    # 400 hops a second: far above a real run's rate (hops last seconds), for 50 s.
    report = dashboard_load.run(models=200, hops=20000, readers=50, rate=400)
    print(report.table())
    assert report.writer["hops"] == 20000
    assert report.writer["locked"] == 0
    assert not report.page.failed and not report.readers.failed
    assert len(report.page.times) >= 40 and len(report.readers.times) >= 200
    assert report.page.p95 < 0.200, report.table()
