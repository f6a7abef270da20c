"""Busy fraction of small units: how much of a run's span the workers spend computing.

When units take milliseconds, what happens between two of them (bringing the next model's
state in, the driver's record of the last unit and its choice of the next) decides how fast
a model selection goes. Three workloads, each run once per ``durable_lag`` in one run:

- ``demo``: what ``cerebro demo`` trains (8 MLPs and small CNNs x 5 epochs on digits, 4 shards),
  2 workers;
- ``tiny``: 32 tiny MLPs (width 8-16) x 2 epochs on digits, 2 workers (``overhead.py``'s);
- ``6mlp``: 6 small MLPs (32-64-10) x 3 epochs on synthetic data, 5 shards of 480 training
  rows, 3 workers;
- ``10M``: ``mop_scaling.py``'s 2 MLPs of 10M parameters (123 MB states), 2 workers: where the
  lag matters, since writing a state file takes far longer than handing it over.

The baseline is ``durable_lag=0``: every new state written to its state file before its model
hops on (what every hop cost before states were handed over in memory). Reported per run:

- busy: time workers spent computing units / (workers x span, first unit start to last end);
- gap_ms: mean (and median) time a worker waits between two hops;
- load_ms: mean time a training unit spent bringing its model's state in;
- durable_ms: mean time a state file took to write (off the critical path unless lag 0);
- driver_cpu_ms, driver_cores, cpu_used: the driver's CPU time per unit, the cores it kept
  busy, and the share of the machine's cores the driver and workers used (``cpu_meter.py``);

Usage:
    python benchmarks/busy.py              # 4 workloads x 4 lags, ~4 min on 2 cores
    python benchmarks/busy.py --quick      # a smoke run, writes nothing unless --out
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

import cerebro

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cpu_meter import CpuMeter  # noqa: E402  (sibling scripts, not a package)
from mop_scaling import hop_delays  # noqa: E402

LAGS = (0, 1, 2, 4)
GOAL = 0.8  # busy fraction the workloads should reach with the default lag


@dataclass(frozen=True)
class Workload:
    name: str
    workers: int
    describe: str


WORKLOADS = {
    "demo": Workload("demo", 2, "8 configurations of `cerebro demo` x 5 epochs, digits"),
    "tiny": Workload("tiny", 2, "32 tiny MLPs x 2 epochs, digits (overhead.py's)"),
    "6mlp": Workload("6mlp", 3, "6 MLPs 32-64-10 x 3 epochs, 5 shards x 480 training rows"),
    "10M": Workload(
        "10M",
        2,
        "mop_scaling.py's 10M-parameter hop workload (2 MLPs, 123 MB states), where "
        "writing a state file takes longer than a memcpy of it by far",
    ),
}


def small_mlp(params: dict[str, Any]) -> cerebro.ModelSpec:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    return cerebro.ModelSpec(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=params["lr"]),
        loss=nn.CrossEntropyLoss(),
        batch_size=32,
    )


def experiment(name: str, root: str, lag: int, quick: bool) -> cerebro.Experiment:
    from overhead import tiny_space

    from cerebro.demo import SPACE, build

    w = WORKLOADS[name]
    backend = cerebro.LocalBackend(workers=w.workers, threads_per_worker=1)
    common = dict(
        metric="val_loss",
        mode="min",
        backend=backend,
        path=os.path.join(root, f"{name}-lag{lag}"),
        seed=0,
        progress=False,
        durable_lag=lag,
    )
    if name == "10M":
        import mop_scaling

        hops = mop_scaling.QUICK_HOPS["0.1M"] if quick else mop_scaling.HOP_WORKLOADS["10M"]
        dataset = _DATASETS.get(name) or mop_scaling.make_dataset(hops, root)
        _DATASETS[name] = dataset
        grid = cerebro.GridSearch({"cfg": cerebro.choice(list(range(hops.num_models)))})
        return cerebro.Experiment(
            mop_scaling._ConfigBuild(mop_scaling.configurations(hops)), dataset, grid,
            epochs=hops.epochs, **common,
        )  # fmt: skip
    if name == "6mlp":
        rng = np.random.default_rng(0)
        rows = 600 * 5  # 20% validation: 480 training rows per shard
        data = {"x": rng.normal(size=(rows, 32)).astype(np.float32), "y": rng.integers(0, 10, rows)}
        dataset = _prepared(data, os.path.join(root, "synthetic"), label="y", num_shards=5)
        rates = [1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3]
        search = cerebro.GridSearch({"lr": cerebro.choice(rates[: 2 if quick else 6])})
        return cerebro.Experiment(
            small_mlp, dataset, search, epochs=1 if quick else 3, **common
        )  # fmt: skip
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = {"pixels": (digits.data / 16.0).astype(np.float32), "digit": digits.target}
    dataset = _prepared(data, os.path.join(root, "digits"), label="digit", num_shards=4)
    count, epochs = (8, 5) if name == "demo" else (32, 2)
    if quick:
        count, epochs = 3, 1
    space = SPACE if name == "demo" else tiny_space()
    search = cerebro.RandomSearch(space, num_models=count, seed=0)
    return cerebro.Experiment(build, dataset, search, epochs=epochs, **common)


_DATASETS: dict[str, cerebro.Dataset] = {}


def _prepared(
    data: dict[str, np.ndarray], path: str, label: str, num_shards: int
) -> cerebro.Dataset:
    """The dataset prepared at ``path``, once per run of this script."""
    if path not in _DATASETS:
        _DATASETS[path] = cerebro.prepare_data(
            data, path, label=label, num_shards=num_shards, validation=0.2, seed=0
        )
    return _DATASETS[path]


def measure(name: str, root: str, lag: int, quick: bool) -> dict[str, Any]:
    w = WORKLOADS[name]
    with CpuMeter() as meter:
        result = experiment(name, root, lag, quick).run()
    hops = result.hops
    span = hops.end.max() - hops.start.min()
    created = result.experiment["created"]  # hops' times count from it
    driver_s, workers_s = meter.used(created + hops.start.min(), created + hops.end.max())
    units = int(hops.unit.nunique())
    gaps: list[float] = []
    for _, group in hops.sort_values("start").groupby("worker"):
        gaps += list(group.start.to_numpy()[1:] - group.end.to_numpy()[:-1])
    train = hops[hops.kind == "train"]
    moved, stayed = hop_delays(hops)
    return {
        "workload": name,
        "workers": w.workers,
        "durable_lag": lag,
        "hops": len(hops),
        "units": units,
        "unit_ms": round(1000 * float((hops.end - hops.start).mean()), 2),
        "gap_ms": round(1000 * float(np.mean(gaps)), 2),
        "median_gap_ms": round(1000 * float(np.median(gaps)), 2),
        "load_ms": round(1000 * float(train.groupby("unit").load_s.sum().mean()), 2),
        "durable_ms": round(1000 * float(train.save_s.dropna().mean()), 2),
        "moved_hop_ms": round(1000 * float(np.mean(moved)), 2) if moved else None,
        "stayed_hop_ms": round(1000 * float(np.mean(stayed)), 2) if stayed else None,
        "span_s": round(float(span), 2),
        "busy": round(float((hops.end - hops.start).sum() / (w.workers * span)), 3),
        "driver_cpu_ms": round(1000 * driver_s / units, 2),
        "driver_cores": round(driver_s / span, 2),
        "cpu_used": round((driver_s + workers_s) / ((os.cpu_count() or 1) * span), 2),
    }


def table(rows: list[dict[str, Any]], quick: bool) -> str:
    frame = pd.DataFrame(rows)
    base = frame[frame.durable_lag == 0].set_index("workload").busy
    frame["busy_vs_lag0"] = [round(r.busy / base[r.workload], 2) for r in frame.itertuples()]
    lines = [
        "# Busy fraction of small units",
        "",
        f"Command: `python benchmarks/busy.py{' --quick' if quick else ''}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {sys.version.split()[0]}; date {time.strftime('%Y-%m-%d')}",
        "",
        "Workloads (local workers, 1 torch thread each, free mode):",
        "",
        *(f"- **{w.name}** ({w.workers} workers): {w.describe}" for w in WORKLOADS.values()),
        "",
        "`durable_lag=0` is the baseline: each state is written to its file before its model "
        "hops on. `hops`: training hops and validation passes, one per model and shard; "
        "`units`: what the driver sent (a unit runs a model's next hops on one worker back to "
        "back). `busy` = hop time / (workers x span); `gap_ms` = mean wait of a worker "
        "between two hops; `load_ms` = a training unit's time bringing its state in; "
        "`durable_ms` = a state file's write (behind the model, unless lag 0); `moved_hop_ms` / "
        "`stayed_hop_ms` = what a training hop adds to the critical path, from when both its "
        "model and its worker were free to the start of its computation, for hops that change "
        "worker / stay (mop_scaling.py's `hop_delays`). A crash of the whole run costs at most "
        "`durable_lag` hops per model.",
        "",
        "CPU within the span (`cpu_meter.py`, sampled from /proc every 20 ms): "
        "`driver_cpu_ms` = the driver process's CPU time (all its threads: the loop, records, "
        "the durable writer) per unit; `driver_cores` = the cores it kept busy on average; "
        f"`cpu_used` = the driver's and the workers' CPU time over {os.cpu_count()} cores x span. "
        "Where `cpu_used` is near 1 the machine has no core left over: the driver's work "
        "comes out of the workers' time: a cheaper driver, not less waiting, is what would "
        "raise the busy fraction there.",
        "",
        frame.to_markdown(index=False),
        "",
        f"Goal: busy >= {GOAL} at the default lag ({_default_lag()}).",
        "",
    ]
    return "\n".join(lines)


def _default_lag() -> int:
    import inspect

    return int(inspect.signature(cerebro.Experiment).parameters["durable_lag"].default)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny runs, for a smoke test")
    parser.add_argument(
        "--workload", choices=sorted(WORKLOADS), nargs="+", default=list(WORKLOADS)
    )  # fmt: skip
    parser.add_argument("--lags", type=int, nargs="+", default=list(LAGS))
    parser.add_argument("--out", default=None, help="folder for busy.md (default: results/)")
    args = parser.parse_args(argv)
    if 0 not in args.lags:
        parser.error("--lags must include 0, the baseline")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name in args.workload:
            for lag in args.lags:
                rows.append(measure(name, root, lag, args.quick))
                print(pd.DataFrame(rows).to_string(index=False), flush=True)
    out = args.out or (None if args.quick else os.path.join(HERE, "results"))
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "busy.md"), "w") as f:
            f.write(table(rows, args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
