"""Model fusion end to end: one model selection of same-architecture configurations on digits,
run unfused (one model per unit) and fused, back to back on the same machine.

Reported per run: makespan (wall time of ``Experiment.run()``, workers' start included),
training span (first unit start to last unit end), busy fraction (time workers spent computing
units / (workers x span); a fused unit counts once, however many models it trains), the number
of models that trained fused, and the best validation accuracy. The ratio that matters is
unfused makespan / fused makespan, measured in one run (these machines are shared and noisy).

Usage:
    python benchmarks/fusion_selection.py            # 64 configurations, 5 epochs, 2 workers
    python benchmarks/fusion_selection.py --quick    # a smoke run (seconds), not for the table
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.datasets import load_digits

import cerebro

HERE = os.path.dirname(os.path.abspath(__file__))


def build(params: dict[str, Any]) -> cerebro.ModelSpec:
    """The issue's MLP, 64-128-128-10, with per-configuration lr, weight decay and dropout."""
    model = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(64, 128),
        torch.nn.ReLU(),
        torch.nn.Dropout(params["dropout"]),
        torch.nn.Linear(128, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=params["lr"], weight_decay=params["weight_decay"]
    )
    return cerebro.ModelSpec(
        model=model,
        optimizer=optimizer,
        loss=torch.nn.CrossEntropyLoss(),
        batch_size=32,
        metrics={"accuracy": cerebro.metrics.accuracy},
        lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=5),
    )


SPACE = {
    "lr": cerebro.loguniform(1e-4, 3e-2),
    "weight_decay": cerebro.loguniform(1e-5, 1e-1),
    "dropout": cerebro.uniform(0.0, 0.3),
}


def run_selection(data: cerebro.Dataset, folder: str, fusion: bool, models: int, epochs: int,
                  workers: int) -> dict[str, Any]:  # fmt: skip
    """One selection; its measures."""
    began = time.perf_counter()
    result = cerebro.Experiment(
        build,
        data,
        cerebro.RandomSearch(SPACE, num_models=models),
        epochs=epochs,
        metric="val_accuracy",
        mode="max",
        backend=cerebro.LocalBackend(workers=workers, threads_per_worker=1),
        path=folder,
        seed=0,
        progress=False,
        tensorboard=False,
        fusion=fusion,
    ).run()
    makespan = time.perf_counter() - began
    hops = result.hops
    units = hops.groupby("unit").agg(start=("start", "first"), end=("end", "first"))
    span = hops.end.max() - hops.start.min()
    return {
        "fusion": fusion,
        "models": models,
        "epochs": epochs,
        "workers": workers,
        "makespan_s": round(makespan, 2),
        "span_s": round(span, 2),
        "busy": round(float((units.end - units.start).sum() / (workers * span)), 3),
        "units": len(units),
        "fused_models": len(result.fused_models),
        "best_val_accuracy": round(result.best.metrics["val_accuracy"], 4),
    }


def end_to_end_table(quick: bool = False) -> pd.DataFrame:
    """Unfused then fused, on the same prepared digits; writes the result table."""
    models, epochs, workers = (8, 1, 2) if quick else (64, 5, 2)
    digits = load_digits()
    arrays = {"x": (digits.images / 16.0).astype(np.float32), "y": digits.target.astype(np.int64)}
    with tempfile.TemporaryDirectory() as tmp:
        data = cerebro.prepare_data(
            arrays, os.path.join(tmp, "digits"), label="y", num_shards=4, validation=0.2
        )
        rows = [
            run_selection(data, os.path.join(tmp, f"fusion-{f}"), f, models, epochs, workers)
            for f in (False, True)
        ]
    table = pd.DataFrame(rows)
    unfused, fused = table.iloc[0], table.iloc[1]
    table["makespan_speedup"] = [1.0, round(unfused.makespan_s / fused.makespan_s, 2)]
    return table


def write(table: pd.DataFrame, folder: str) -> str:
    path = os.path.join(folder, "fusion_selection.md")
    lines = [
        "# Model fusion end to end",
        "",
        f"{int(table.models[0])} configurations of one MLP (64-128-128-10, AdamW, cosine LR, "
        f"dropout) on digits, {int(table.epochs[0])} epochs, {int(table.workers[0])} local "
        "workers of 1 thread, free mode, unfused then fused in one run of "
        "`python benchmarks/fusion_selection.py`.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}.",
        "",
        table.to_markdown(index=False),
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, not for the table")
    args = parser.parse_args()
    table = end_to_end_table(args.quick)
    print(table.to_string(index=False))
    if not args.quick:
        print("written:", write(table, os.path.join(HERE, "results")))


if __name__ == "__main__":
    main()
