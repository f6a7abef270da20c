"""Load check of the dashboard: its API's answer times while a large run is being written, and
whether many readers disturb the run's writes.

A writer process records a run of ``--models`` models and ``--hops`` hops through Cerebro's own
``RecordStore`` (the driver's writes: one transaction per hop, an epoch row after each model's
10 hops, some units shared by two models as a fused group would), at most ``--rate`` hops a
second. ``cerebro serve`` serves the records from another process. Two phases, while it writes:

1. page: one client polls as the page does (experiment, models, new history rows, new hops)
   every 0.5 s, until half the hops are written;
2. readers: ``--readers`` clients at once, each asking the models, the experiment, a model's
   page and the newest hops in a loop, until the writer is done.

Reported: answer times (p50, p95, max) and failed answers per phase, and the writer's
hops, time and "database is locked" errors (it counts them and goes on).

    python benchmarks/dashboard_load.py                 # 200 models, 20k hops, 50 readers
    python benchmarks/dashboard_load.py --quick         # 50 models, 2k hops, 10 readers
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

try:  # the HTTP client starlette's TestClient takes too (the dev extra installs httpx2)
    import httpx2 as httpx
except ImportError:  # an environment with the older package of the same API
    import httpx  # type: ignore[no-redef]

WRITER = r"""
import json, math, random, sys, time
from sqlalchemy.exc import OperationalError
from cerebro.store import RecordStore, sqlite_url

path, models, hops, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
config = {"metric": "val_accuracy", "mode": "max", "epochs": 10, "path": path,
          "checkpoint_dir": path + "/checkpoints",
          "space": {"lr": {"kind": "loguniform", "low": 1e-4, "high": 1e-1},
                    "width": {"kind": "choice", "values": [32, 64, 128]}}}
store = RecordStore.create(sqlite_url(path), "load", config)
rng = random.Random(0)
locked = 0

def write(call, *args, **kwargs):
    global locked
    while True:
        try:
            return call(*args, **kwargs)
        except OperationalError as e:
            if "locked" not in str(e):
                raise
            locked += 1

for m in range(models):
    write(store.add_model, m, {"lr": 10 ** rng.uniform(-4, -1), "width": rng.choice([32, 64, 128])},
          "running", None)
print("ready", flush=True)
start, written, unit = time.time(), 0, 0
per_epoch = 10  # 8 training hops and 2 validation passes
epochs = math.ceil(hops / (models * per_epoch))
for epoch in range(epochs):
    for shard in range(per_epoch):
        for m in range(models):
            if written >= hops:
                break
            if m % 2 == 0 or m >= 20:
                unit += 1  # models 0-19 share units in pairs: a fused group
            t = time.time()
            write(store.add_hop, model_id=m, epoch=epoch, kind="train" if shard < 8 else "eval",
                  shard=shard, worker=m % 8, start=t - 0.01, end=t, rows=1000, load_s=0.001,
                  save_s=0.001, metrics={"loss": rng.random()}, unit=unit)
            written += 1
            if shard == per_epoch - 1:
                write(store.add_epoch, m, epoch, {"train_loss": rng.random(),
                      "val_loss": rng.random(), "val_accuracy": rng.random()})
            wait = start + written / rate - time.time()
            if wait > 0:
                time.sleep(wait)
for m in range(models):
    write(store.set_model_status, m, "completed")
store.set_experiment_status("completed")
print(json.dumps({"hops": written, "seconds": time.time() - start, "locked": locked}), flush=True)
"""


@dataclass
class Phase:
    name: str
    times: list[float] = field(default_factory=list)
    by_url: dict[str, list[float]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, url: str, seconds: float, answer: httpx.Response | None, error: str = "") -> None:
        with self.lock:
            self.times.append(seconds)
            self.by_url.setdefault(re.sub(r"/\d+", "/{id}", url), []).append(seconds)
            if answer is None or answer.status_code != 200:
                self.failed.append(error or f"{answer.status_code if answer else '?'}")

    def row(self) -> str:
        return self._row(self.name, self.times, len(self.failed))

    def rows_by_url(self) -> list[str]:
        return [self._row(f"{self.name}: {u}", t, 0) for u, t in sorted(self.by_url.items())]

    @staticmethod
    def _row(name: str, times: list[float], failed: int) -> str:
        ts = sorted(times) or [float("nan")]

        def pct(q: float) -> float:
            return ts[min(len(ts) - 1, int(q * len(ts)))] * 1000

        return (
            f"| {name} | {len(times)} | {pct(0.5):.1f} | {pct(0.95):.1f} | "
            f"{ts[-1] * 1000:.1f} | {failed} |"
        )

    @property
    def p95(self) -> float:
        ts = sorted(self.times)
        return ts[min(len(ts) - 1, int(0.95 * len(ts)))] if ts else float("nan")


@dataclass
class Report:
    page: Phase
    readers: Phase
    writer: dict
    models: int
    concurrency: int

    def table(self) -> str:
        w = self.writer
        return "\n".join(
            [
                f"Run written: {self.models} models, {w['hops']} hops in {w['seconds']:.1f} s; "
                f"'database is locked' errors in the run: {w['locked']}",
                "",
                "| phase | answers | p50 ms | p95 ms | max ms | failed |",
                "|---|---|---|---|---|---|",
                self.page.row(),
                *self.page.rows_by_url(),
                self.readers.row().replace("| readers |", f"| {self.concurrency} readers |"),
            ]
        )


def _get(client: httpx.Client, phase: Phase, url: str, **params) -> httpx.Response | None:
    started = time.perf_counter()
    try:
        answer = client.get(url, params=params)
    except httpx.HTTPError as e:
        phase.add(url, time.perf_counter() - started, None, repr(e))
        return None
    phase.add(url, time.perf_counter() - started, answer)
    return answer


def _hop_count(path: str) -> int:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{path}/cerebro.db?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM hops").fetchone()[0])
    except sqlite3.Error:
        return 0


def run(models: int = 200, hops: int = 20000, readers: int = 50, rate: float = 800.0) -> Report:
    folder = tempfile.mkdtemp(prefix="cerebro-load-")
    path = os.path.join(folder, "run")
    os.makedirs(path)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, path, str(models), str(hops), str(rate)],
        stdout=subprocess.PIPE,
        text=True,
    )
    server = None
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready", "the writer did not start"
        token = "load-check-token"
        server = subprocess.Popen(
            [sys.executable, "-m", "cerebro.cli", "serve", path, "--port", "0", "--token", token],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        url = None
        for line in server.stdout:
            found = re.search(r"http://[\d.]+:\d+", line)
            if found:
                url = found.group(0)
                break
        assert url, "cerebro serve printed no URL"
        headers = {"Authorization": f"Bearer {token}"}

        # 1. The page, polling for what changed.
        page = Phase("page polling")
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            history, last_hop = 0, 0
            while _hop_count(path) < hops // 2 and writer.poll() is None:
                _get(client, page, "/api/experiment")
                _get(client, page, "/api/models")
                more = _get(client, page, "/api/history", after=history)
                history += len(more.json()) if more is not None and more.status_code == 200 else 0
                new = _get(client, page, "/api/hops", after=last_hop)
                if new is not None and new.status_code == 200 and new.json():
                    last_hop = new.json()[-1]["id"]
                time.sleep(0.5)

        # 2. Many readers at once.
        crowd = Phase("readers")
        done = threading.Event()

        def reader(i: int) -> None:
            with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
                while not done.is_set():
                    _get(client, crowd, "/api/models")
                    _get(client, crowd, "/api/experiment")
                    _get(client, crowd, f"/api/models/{i % models}")
                    _get(client, crowd, "/api/hops", after=max(0, _hop_count(path) - 200))

        threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(readers)]
        for t in threads:
            t.start()
        out, _ = writer.communicate(timeout=600)
        done.set()
        for t in threads:
            t.join(60)
        assert writer.returncode == 0, "the writer failed"
        result = json.loads(out.strip().splitlines()[-1])
        return Report(page, crowd, result, models, readers)
    finally:
        for process in (writer, server):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--hops", type=int, default=20000)
    parser.add_argument("--readers", type=int, default=50)
    parser.add_argument("--rate", type=float, default=800.0, help="hops written per second")
    parser.add_argument("--quick", action="store_true", help="50 models, 2k hops, 10 readers")
    args = parser.parse_args()
    if args.quick:
        args.models, args.hops, args.readers = 50, 2000, 10
    report = run(args.models, args.hops, args.readers, args.rate)
    print(report.table())


if __name__ == "__main__":
    main()
