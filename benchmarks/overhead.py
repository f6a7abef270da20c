"""Fixed cost of an experiment: cerebro (2 local workers) against a plain PyTorch loop.

Two workloads on scikit-learn's digits (4 shards, 20% validation):

- ``demo``: what ``cerebro demo`` trains, 8 configurations (MLPs and small CNNs) x 5 epochs;
- ``tiny``: 32 tiny MLPs (width 8-16) x 2 epochs, where fixed costs dominate.

Each run is a fresh Python process, as a user's script is. The clock starts when the model
selection is called, after imports and data preparation (the plain loop reads the same prepared
rows before its clock starts). Reported, as the median over ``--repeats`` runs:

- makespan: from the call to its return (the plain loop: building and training every
  configuration one after another, validating after every epoch, as cerebro does);
- time to first unit: from the call to the start of the first training hop (the first batch);
- last unit to return: from the end of the last unit to the return of the call (cerebro's
  shutdown of its workers and records);
- last unit to exit: from the end of the last unit to the end of the process (adds Python's
  own teardown of torch's modules, which the plain loop pays too);
- ratio: cerebro's makespan over the plain loop's.

Both pay torch's one-time costs inside the clock (the first optimizer loads ``torch._dynamo``):
the plain loop in its only process, cerebro in its driver and in the template process that
workers fork from.

Usage:
    python benchmarks/overhead.py                 # both workloads, 5 repeats (~4 min)
    python benchmarks/overhead.py --quick         # a smoke run, writes nothing unless --out
    python benchmarks/overhead.py --device cuda   # workers and the plain loop on the GPU
                                                  # (writes overhead_cuda.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS = {"demo": (8, 5), "tiny": (32, 2)}  # configurations, epochs
# "cerebro, warm": a second experiment in the same process (a notebook, a test suite), whose
# workers fork from the template process the first one started.
APPROACHES = ("cerebro", "cerebro, warm", "plain")
GOALS = {"first_unit_s": 1.5, "last_unit_to_return_s": 0.3, "ratio": 3.0}  # on the demo


def tiny_space() -> dict[str, Any]:
    import cerebro

    return {
        "arch": "mlp",
        "lr": cerebro.loguniform(1e-3, 1e-1),
        "batch_size": cerebro.choice([32, 64]),
        "width": cerebro.randint(8, 16),
        "dropout": 0.0,
        "l2": 0.0,
    }


def configurations(workload: str, seed: int = 0) -> list[dict[str, Any]]:
    """The configurations both approaches train, as RandomSearch draws them."""
    import cerebro
    from cerebro.demo import SPACE

    count, _ = WORKLOADS[workload]
    space = SPACE if workload == "demo" else tiny_space()
    return cerebro.RandomSearch(space, num_models=count, seed=seed).propose([])


# One measured process ------------------------------------------------------------------------


def child(approach: str, workload: str, folder: str, device: str) -> dict[str, float]:
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    import cerebro
    from cerebro.demo import build

    digits = load_digits()
    dataset = cerebro.prepare_data(
        {"pixels": (digits.data / 16.0).astype(np.float32), "digit": digits.target},
        os.path.join(folder, "data"),
        label="digit",
        num_shards=4,
        validation=0.2,
        seed=0,
    )
    count, epochs = WORKLOADS[workload]
    if approach.startswith("cerebro"):
        space = cerebro.demo.SPACE if workload == "demo" else tiny_space()

        def experiment(path: str) -> cerebro.Experiment:
            return cerebro.Experiment(
                build,
                dataset,
                cerebro.RandomSearch(space, num_models=count, seed=0),
                epochs=epochs,
                metric="val_accuracy",
                mode="max",
                backend=cerebro.LocalBackend(workers=2, devices=[device]),
                path=os.path.join(folder, path),
                seed=0,
                progress=False,
            )

        if approach == "cerebro, warm":
            experiment("first").run()
        began = time.time()
        experiment("run").run()
        returned = time.time()
        with sqlite3.connect(os.path.join(folder, "run", "cerebro.db")) as db:
            first, last = db.execute("select min(start), max(end) from hops").fetchone()
        return {"began": began, "first": first, "last": last, "returned": returned}
    train = [dataset.load_shard("train", s) for s in range(dataset.num_shards)]
    val = [dataset.load_shard("val", s) for s in range(dataset.num_shards)]
    on = torch.device(device)
    x, y = torch.cat([s.x for s in train]).to(on), torch.cat([s.y for s in train]).to(on)
    vx, vy = torch.cat([s.x for s in val]).to(on), torch.cat([s.y for s in val]).to(on)
    configs = configurations(workload)
    torch.set_num_threads(1)  # as each of cerebro's 2 workers on this 2-core machine
    began = time.time()
    first = None
    for params in configs:
        spec = build(params)
        spec.model.to(on)  # before the first step: Adam's state follows the parameters
        for _ in range(epochs):
            spec.model.train()
            order = torch.randperm(len(y), device=on)
            for i in range(0, len(y), spec.batch_size):
                first = first or time.time()
                rows = order[i : i + spec.batch_size]
                spec.optimizer.zero_grad()
                spec.loss(spec.model(x[rows]), y[rows]).backward()
                spec.optimizer.step()
            spec.model.eval()
            with torch.no_grad():
                (spec.model(vx).argmax(1) == vy).float().mean().item()
    if on.type == "cuda":
        torch.cuda.synchronize()
    last = returned = time.time()
    return {"began": began, "first": first, "last": last, "returned": returned}


def measure(approach: str, workload: str, device: str) -> dict[str, float]:
    """One run in a fresh process; the exit time is taken here, when the process has ended."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, __file__, "--child", approach, workload, folder, device]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        exited = time.time()
        if done.returncode != 0:
            raise RuntimeError(f"{approach} on {workload} failed:\n{done.stderr[-3000:]}")
        t = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "makespan_s": t["returned"] - t["began"],
        "first_unit_s": t["first"] - t["began"],
        "last_unit_to_return_s": t["returned"] - t["last"],
        "last_unit_to_exit_s": exited - t["last"],
    }


# The table -----------------------------------------------------------------------------------


def run(workloads: list[str], repeats: int, device: str) -> list[dict[str, Any]]:
    rows = []
    for workload in workloads:
        runs: dict[str, list[dict[str, float]]] = {a: [] for a in APPROACHES}
        for _ in range(repeats):  # interleaved, so that a noisy minute hits both
            for approach in APPROACHES:
                runs[approach].append(measure(approach, workload, device))
        medians = {
            a: {k: statistics.median(r[k] for r in runs[a]) for k in runs[a][0]} for a in APPROACHES
        }
        plain = medians["plain"]["makespan_s"]
        for approach in APPROACHES:
            rows.append(
                {
                    "workload": workload,
                    "approach": approach,
                    **medians[approach],
                    "ratio": medians[approach]["makespan_s"] / plain,
                }
            )
    return rows


def table(rows: list[dict[str, Any]], repeats: int, device: str) -> str:
    import torch

    import cerebro

    lines = [
        "# Fixed cost of an experiment: cerebro (2 local workers) vs a plain PyTorch loop",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}, cerebro {cerebro.__version__}",
        f"- device: {device}; median of {repeats} runs, each in a fresh process; clock from the "
        "call of the model selection (after imports and data preparation) to its return",
        f"- command: `python benchmarks/overhead.py{_device_option(device)}`",
        "",
        "| workload | approach | makespan (s) | time to first unit (s) | last unit to return (s) "
        "| last unit to exit (s) | makespan / plain loop |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        configs, epochs = WORKLOADS[r["workload"]]
        lines.append(
            f"| {r['workload']} ({configs} x {epochs} epochs) | {r['approach']} "
            f"| {r['makespan_s']:.2f} | {r['first_unit_s']:.2f} "
            f"| {r['last_unit_to_return_s']:.2f} | {r['last_unit_to_exit_s']:.2f} "
            f"| {r['ratio']:.2f}x |"
        )
    lines += ["", "Goals on the demo:", ""]
    for approach in ("cerebro", "cerebro, warm"):
        demo = next(r for r in rows if r["workload"] == "demo" and r["approach"] == approach)
        for key, goal in GOALS.items():
            met = "met" if demo[key] <= goal else "NOT met"
            lines.append(f"- {approach}: {key} <= {goal}: {demo[key]:.2f} ({met})")
    return "\n".join(lines) + "\n"


def _device_option(device: str) -> str:
    return "" if device == "cpu" else f" --device {device}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=4, metavar=("APPROACH", "WORKLOAD", "FOLDER", "DEVICE"))
    parser.add_argument("--device", default="cpu", help="cpu (default) or a CUDA device")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one repeat of the tiny workload")
    parser.add_argument("--out", help="folder for overhead.md (default: benchmarks/results)")
    args = parser.parse_args(argv)
    if args.child:
        approach, workload, folder, device = args.child
        print(json.dumps(child(approach, workload, folder, device)))
        return 0
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} is not accepted: expected an integer >= 1")
    if args.device != "cpu":
        import torch

        if not args.device.startswith("cuda") or not torch.cuda.is_available():
            parser.error(f"--device={args.device} is not accepted: expected cpu, or cuda on a GPU")
    workloads, repeats = (["tiny", "demo"], 1) if args.quick else (args.workloads, args.repeats)
    rows = run(workloads, repeats, args.device)
    text = table(rows, repeats, args.device)
    print(text)
    out = args.out or (None if args.quick else os.path.join(HERE, "results"))
    if out:
        os.makedirs(out, exist_ok=True)
        name = "overhead.md" if args.device == "cpu" else "overhead_cuda.md"
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
