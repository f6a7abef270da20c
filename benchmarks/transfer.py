"""Transfer learning at the cost of its heads: one fine-tuning model selection run as current
practice (every configuration runs its frozen layers on every batch) and with materialized
features (unlimited budget, and 25% of what keeping every depth needs), back to back.

A small CNN is pre-trained here on one task (digit parity, 2x-upsampled digits) and saved; the
selection fine-tunes it for 10-class digits: 3 freeze depths x 2 learning rates x 2 batch sizes
x 2 head widths = 24 configurations, 5 epochs, 2 local workers of one thread, deterministic
mode. Reported: makespan, speedup over current practice, bytes kept, and each configuration's
validation accuracy in every run (equal to current practice's when a model's depth is kept:
same shard orders, same bits on this CPU).

The growing-data part: the same selection on 80% of the rows (5 epochs, materialized), then
25% more rows appended (``Dataset.append``) and the finished selection continued one epoch on
the grown dataset (``set_epochs``: each model warm, the old shards' features read back, only
the new shards' computed), against a from-scratch round on the grown dataset (the 24
configurations, 5 epochs, materialized, every feature computed). Reported: each round's
makespan, features computed, and best accuracy.

Usage:
    python benchmarks/transfer.py                 # both parts (~8 minutes on 2 cores)
    python benchmarks/transfer.py --part main     # current practice vs materialized only
    python benchmarks/transfer.py --part append   # the growing-data part only
    python benchmarks/transfer.py --quick         # a smoke run, not for the tables
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
# After the first pooling (the third conv layer still trains), after the last pooling, after
# the dense layer (only the head trains).
FREEZE = (7, 10, 12)


def backbone() -> torch.nn.Sequential:
    """The pre-trained CNN's layers: 8x8 digits, upsampled to 16x16, three conv layers, a
    dense layer of 128."""
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8)),
        torch.nn.Upsample(scale_factor=2),
        torch.nn.Conv2d(1, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),  # depth 7 ends here: 64 x 8 x 8
        torch.nn.Conv2d(64, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),  # 64 x 4 x 4
        torch.nn.Flatten(),
        torch.nn.Linear(1024, 128),
        torch.nn.ReLU(),
    )


def build(params: dict[str, Any]) -> cerebro.ModelSpec:
    net = backbone()
    net.load_state_dict(torch.load(params["weights"], weights_only=True))
    frozen, rest = cerebro.cut(net, params["freeze"])  # rest: up to the 128 dense features
    head = torch.nn.Sequential(
        torch.nn.Linear(128, params["head"]),
        torch.nn.ReLU(),
        torch.nn.Linear(params["head"], 10),
    )
    model = torch.nn.Sequential(rest, head)
    return cerebro.ModelSpec(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=params["lr"]),
        loss=torch.nn.CrossEntropyLoss(),
        batch_size=params["batch_size"],
        metrics={"accuracy": cerebro.metrics.accuracy},
        frozen=frozen,
    )


def space(weights: str) -> dict[str, Any]:
    return {
        "weights": cerebro.choice([weights]),
        "freeze": cerebro.choice(list(FREEZE)),
        "lr": cerebro.choice([1e-3, 3e-3]),
        "batch_size": cerebro.choice([32, 64]),
        "head": cerebro.choice([64, 128]),
    }


def pretrain(arrays: dict[str, np.ndarray], path: str) -> str:
    """The backbone trained on digit parity (another task than the selection's), saved."""
    torch.manual_seed(0)
    net, head = backbone(), torch.nn.Linear(128, 2)
    optimizer = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=3e-3)
    x, y = torch.tensor(arrays["x"]), torch.tensor(arrays["y"] % 2)
    for _ in range(3):
        for start in range(0, len(x), 128):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(
                head(net(x[start : start + 128])), y[start : start + 128]
            )
            loss.backward()
            optimizer.step()
    torch.save(net.state_dict(), path)
    return path


def digits_arrays() -> dict[str, np.ndarray]:
    digits = load_digits()
    return {"x": (digits.images / 16.0).astype(np.float32), "y": digits.target.astype(np.int64)}


def run(data: cerebro.Dataset, folder: str, weights: str, materialize: Any, epochs: int,
        label: str) -> tuple[dict[str, Any], cerebro.Result]:  # fmt: skip
    began = time.perf_counter()
    result = cerebro.Experiment(
        build,
        data,
        cerebro.GridSearch(space(weights)),
        epochs=epochs,
        metric="val_accuracy",
        mode="max",
        backend=cerebro.LocalBackend(workers=2, threads_per_worker=1),
        path=folder,
        seed=0,
        deterministic=True,
        progress=False,
        tensorboard=False,
        materialize=materialize,
    ).run()
    makespan = time.perf_counter() - began
    made = result.materialized
    return {
        "run": label,
        "makespan_s": round(makespan, 2),
        "kept_MB": round(made.bytes.sum() / 2**20, 2),
        "features_computed": len(made),
        "best_val_accuracy": round(result.best.metrics["val_accuracy"], 4),
    }, result


def accuracies(results: dict[str, cerebro.Result]) -> pd.DataFrame:
    """Each configuration's final validation accuracy in every run."""
    first = next(iter(results.values()))
    rows = []
    for record in first.models:
        row = {k: record.params[k] for k in ("freeze", "lr", "batch_size", "head")}
        for label, result in results.items():
            row[label] = round(result.model(record.id).metrics["val_accuracy"], 4)
        rows.append(row)
    return pd.DataFrame(rows)


def main_table(quick: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    epochs = 1 if quick else 5
    arrays = digits_arrays()
    with tempfile.TemporaryDirectory() as tmp:
        weights = pretrain(arrays, os.path.join(tmp, "pretrained.pt"))
        data = cerebro.prepare_data(
            arrays, os.path.join(tmp, "digits"), label="y", num_shards=4, validation=0.2
        )
        rows, results = [], {}
        row, results["current practice"] = run(
            data, os.path.join(tmp, "off"), weights, False, epochs, "current practice"
        )
        rows.append(row)
        row, results["unlimited"] = run(
            data, os.path.join(tmp, "on"), weights, True, epochs, "materialized, unlimited"
        )
        rows.append(row)
        quarter = cerebro.Materialize(budget_mb=row["kept_MB"] / 4)
        row, results["25% budget"] = run(
            data, os.path.join(tmp, "quarter"), weights, quarter, epochs, "materialized, 25%"
        )
        rows.append(row)
    table = pd.DataFrame(rows)
    table["speedup"] = (table.makespan_s.iloc[0] / table.makespan_s).round(2)
    return table, accuracies(results)


def append_table(quick: bool) -> pd.DataFrame:
    """Initial round, append round (continued one epoch on the grown dataset), from-scratch
    round on the grown dataset."""
    epochs = 1 if quick else 5
    arrays = digits_arrays()
    initial = int(len(arrays["y"]) / 1.25)  # the appended rows are 25% more
    with tempfile.TemporaryDirectory() as tmp:
        weights = pretrain(arrays, os.path.join(tmp, "pretrained.pt"))
        data = cerebro.prepare_data(
            {k: v[:initial] for k, v in arrays.items()}, os.path.join(tmp, "digits"),
            label="y", num_shards=4, validation=0.2,
        )  # fmt: skip
        path = os.path.join(tmp, "growing")
        rows = []
        row, done = run(data, path, weights, True, epochs, "initial round")
        rows.append({**row, "rows": data.num_rows, "shards": data.num_shards})
        began = time.perf_counter()
        grown = data.append({k: v[initial:] for k, v in arrays.items()})
        append_s = time.perf_counter() - began
        control = cerebro.control(path)
        for model in done.models:
            control.set_epochs(model.id, epochs + 1)
        computed_before = row["features_computed"]
        row, _ = run(grown, path, weights, True, epochs, "append round (+1 epoch)")
        row["features_computed"] -= computed_before  # the records hold both rounds'
        row["kept_MB"] = None
        rows.append({**row, "rows": grown.num_rows, "shards": grown.num_shards,
                     "append_s": round(append_s, 2)})  # fmt: skip
        row, _ = run(
            grown, os.path.join(tmp, "scratch"), weights, True, epochs, "from-scratch round"
        )
        rows.append({**row, "rows": grown.num_rows, "shards": grown.num_shards})
    table = pd.DataFrame(rows)
    table["cost_vs_scratch"] = (table.makespan_s / table.makespan_s.iloc[2]).round(3)
    return table


def write_markdown(path: str, title: str, intro: str, *blocks: str) -> str:
    """A result table's file: title, what ran, the machine, then the tables and lines given."""
    machine = (
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}."
    )
    with open(path, "w") as f:
        f.write("\n".join([f"# {title}", "", intro, machine, "", *blocks, ""]))
    return path


def write_append(table: pd.DataFrame, folder: str) -> str:
    return write_markdown(
        os.path.join(folder, "transfer_append.md"),
        "Transfer learning on a growing dataset",
        "The 24 configurations of `transfer.md` on 80% of digits (5 epochs, materialized), then "
        "25% more rows appended and the finished selection continued one epoch on the grown "
        "dataset, against a from-scratch round (5 epochs) on the grown dataset; one run of "
        "`python benchmarks/transfer.py --part append`.",
        table.to_markdown(index=False),
    )


def write(table: pd.DataFrame, per_config: pd.DataFrame, folder: str) -> list[str]:
    same = (per_config["unlimited"] == per_config["current practice"]).all()
    path = write_markdown(
        os.path.join(folder, "transfer.md"),
        "Transfer learning: materialized frozen features",
        "24 configurations (freeze depth 7/10/12 x lr x batch size x head width) fine-tuning a "
        "CNN pre-trained in the run, 5 epochs, 2 local workers of 1 thread, deterministic, "
        "in one run of `python benchmarks/transfer.py`.",
        table.to_markdown(index=False),
        "",
        "Validation accuracy of each configuration (unlimited budget equal to current practice "
        f"for every configuration: {bool(same)}):",
        "",
        per_config.to_markdown(index=False),
    )
    plot = os.path.join(folder, "transfer.png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(table.run, table.makespan_s, color=["grey", "tab:blue", "tab:cyan"][: len(table)])
    for y, (t, s) in enumerate(zip(table.makespan_s, table.speedup, strict=True)):
        ax.text(t, y, f" {t:.1f} s ({s}x)", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("makespan (s), 24 configurations x 5 epochs, 2 workers")
    ax.set_xlim(0, table.makespan_s.max() * 1.35)
    fig.tight_layout()
    fig.savefig(plot, dpi=120)
    return [path, plot]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, not for the tables")
    parser.add_argument("--part", choices=["main", "append", "all"], default="all")
    args = parser.parse_args()
    results = os.path.join(HERE, "results")
    if args.part in ("main", "all"):
        table, per_config = main_table(args.quick)
        print(table.to_string(index=False))
        print(per_config.to_string(index=False))
        if not args.quick:
            print("written:", *write(table, per_config, results))
    if args.part in ("append", "all"):
        grown = append_table(args.quick)
        print(grown.to_string(index=False))
        if not args.quick:
            print("written:", write_append(grown, results))


if __name__ == "__main__":
    main()
