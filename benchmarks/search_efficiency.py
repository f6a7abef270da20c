"""Search efficiency: random search, TPE, ASHA and Hyperband on the same workload and budget.

The workload is real: MLPs on scikit-learn's handwritten digits (1797 8x8 images, 10 classes),
half of the rows held out for validation so that configurations differ more, and a search
space wide enough to hold many bad configurations (learning rate 1e-5..1, log-uniform). Every
search ranks models by ``val_loss``.

The compute budget is counted in model-epochs (one model trained for one epoch on every
training shard). Every method gets the same budget B:

- random search and TPE: B / max_epochs configurations, each trained for max_epochs;
- ASHA and Hyperband (eta = 3): as many configurations as fit in B when every rung promotes
  its full quota (an upper bound: a run can only spend less).

Reported per method (mean and [min, max] over seeds): model-epochs actually spent (train hops /
shards), configurations tried, the best ``val_loss`` reached by any model at any epoch after
B/4, B/2 and B model-epochs (epochs taken in the order they finished), the validation accuracy
of that epoch, the best last-epoch ``val_loss`` of a model trained to max_epochs, wall time and
the fraction of it workers were busy.

Usage:
    python benchmarks/search_efficiency.py            # 5 seeds, B = 16 x 27 model-epochs, ~8 min
    python benchmarks/search_efficiency.py --seeds 0 1 2 --budget-models 8
    python benchmarks/search_efficiency.py --quick    # a smoke run (~30 s), writes nothing
                                                      # unless --out is given
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from typing import Any

import numpy as np
import pandas as pd
import torch

import cerebro

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("random", "tpe", "asha", "hyperband")
METRIC, MODE = "val_loss", "min"
ETA = 3

SPACE = {
    "lr": cerebro.loguniform(1e-5, 1.0),
    "width": cerebro.randint(16, 256),
    "dropout": cerebro.uniform(0.0, 0.6),
    "batch_size": cerebro.choice([16, 32, 64, 128]),
    "weight_decay": cerebro.loguniform(1e-6, 1e-1),
}


def build(params: dict[str, Any]) -> cerebro.ModelSpec:
    """A one-hidden-layer MLP for the 64 pixels of a digit, sized and regularized by ``params``."""
    width = params["width"]
    model = torch.nn.Sequential(
        torch.nn.Linear(64, width),
        torch.nn.ReLU(),
        torch.nn.Dropout(params["dropout"]),
        torch.nn.Linear(width, 10),
    )
    optimizer = torch.optim.Adam(
        model.parameters(), lr=params["lr"], weight_decay=params["weight_decay"]
    )
    return cerebro.ModelSpec(
        model=model,
        optimizer=optimizer,
        loss=torch.nn.CrossEntropyLoss(),
        batch_size=params["batch_size"],
        metrics={"accuracy": cerebro.metrics.accuracy},
    )


def make_dataset(root: str, num_shards: int, validation: float) -> cerebro.Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.data / 16.0).astype(np.float32)
    return cerebro.prepare_data(
        {"pixels": pixels, "digit": digits.target},
        os.path.join(root, "digits"),
        label="digit",
        num_shards=num_shards,
        validation=validation,
        seed=0,
    )


# -- budgets --------------------------------------------------------------------------------


def asha_cost(search: cerebro.ASHA) -> int:
    """Model-epochs ASHA spends at most: every rung promotes floor(n / eta) of its n models."""
    n, cost, trained = search.num_models, 0, 0
    for rung in (*search.rungs, search.max_epochs):
        cost += n * (rung - trained)
        trained = rung
        n //= search.reduction_factor
    return cost


def hyperband_cost(search: cerebro.Hyperband) -> int:
    """Model-epochs Hyperband spends at most: each bracket keeps max(1, floor(m / eta))."""
    cost = 0
    for bracket in search.brackets:
        m, trained = bracket.size, 0
        for rung in bracket.rungs:
            cost += m * (rung - trained)
            trained = rung
            m = max(1, m // search.reduction_factor)
    return cost


def make_search(method: str, budget: int, max_epochs: int, seed: int) -> cerebro.Search:
    """The search for ``method`` with as many configurations as fit in ``budget`` model-epochs."""
    if method == "random":
        return cerebro.RandomSearch(SPACE, num_models=budget // max_epochs, seed=seed)
    if method == "tpe":
        return cerebro.TPESearch(SPACE, num_models=budget // max_epochs, seed=seed)
    kind, cost = {
        "asha": (cerebro.ASHA, asha_cost),
        "hyperband": (cerebro.Hyperband, hyperband_cost),
    }[method]
    n = 1
    while cost(kind(SPACE, n + 1, max_epochs, ETA, seed)) <= budget:
        n += 1
    return kind(SPACE, n, max_epochs, ETA, seed)


# -- one run --------------------------------------------------------------------------------


def run_one(
    method: str,
    seed: int,
    dataset: cerebro.Dataset,
    budget: int,
    max_epochs: int,
    workers: int,
    root: str,
) -> dict[str, Any]:
    search = make_search(method, budget, max_epochs, seed)
    started = time.perf_counter()
    result = cerebro.Experiment(
        build,
        dataset,
        search,
        epochs=max_epochs,
        metric=METRIC,
        mode=MODE,
        backend=cerebro.LocalBackend(workers=workers),
        path=os.path.join(root, f"{method}-{seed}"),
        seed=seed,
        progress=False,
        overwrite=True,
    ).run()
    wall = time.perf_counter() - started
    hops = result.hops
    spent = int((hops.kind == "train").sum()) / dataset.num_shards
    busy = float((hops.end - hops.start).sum() / (workers * (hops.end.max() - hops.start.min())))
    epochs = epoch_order(result)
    best_final = result.best.metrics[METRIC] if result.best is not None else math.nan
    statuses = pd.Series([m.status for m in result.models]).value_counts().to_dict()
    return {
        "method": method,
        "seed": seed,
        "models": len(result.models),
        "full": int(sum(len(m.history) >= max_epochs for m in result.models)),
        "failed": statuses.get("failed", 0),
        "spent": spent,
        "wall_s": wall,
        "busy": busy,
        "best_final": best_final,
        "epochs": epochs,
    }


def epoch_order(result: cerebro.Result) -> pd.DataFrame:
    """Every recorded (model, epoch), in the order its metrics became known (its last hop's end),
    with the cumulative model-epochs and the best metric so far."""
    history = result.history
    done = result.hops.groupby(["model_id", "epoch"]).end.max().rename("done")
    frame = history.join(done, on=["model_id", "epoch"]).sort_values("done", ignore_index=True)
    values = frame[METRIC].astype(float).where(np.isfinite(frame[METRIC].astype(float)))
    accumulate = np.fmin.accumulate if MODE == "min" else np.fmax.accumulate
    frame["model_epochs"] = np.arange(1, len(frame) + 1)
    frame["best_so_far"] = accumulate(values.to_numpy())
    return frame[
        ["model_id", "epoch", "done", "model_epochs", METRIC, "val_accuracy", "best_so_far"]
    ]


def best_within(epochs: pd.DataFrame, budget: float) -> tuple[float, float]:
    """The best metric among the first ``budget`` model-epochs, and that epoch's val accuracy."""
    seen = epochs[(epochs.model_epochs <= budget) & np.isfinite(epochs[METRIC])]
    if seen.empty:
        return math.nan, math.nan
    row = seen.loc[seen[METRIC].idxmin() if MODE == "min" else seen[METRIC].idxmax()]
    return float(row[METRIC]), float(row["val_accuracy"])


# -- tables and plot ------------------------------------------------------------------------


FRACTIONS = (0.25, 0.5, 1.0)


def per_seed_table(runs: list[dict[str, Any]], budget: int) -> pd.DataFrame:
    rows = []
    for r in runs:
        row = {
            "method": r["method"],
            "seed": r["seed"],
            "configs": r["models"],
            "trained_fully": r["full"],
            "model_epochs": r["spent"],
            "failed": r["failed"],
        }
        for f in FRACTIONS:
            row[f"best_loss@{f:g}B"] = best_within(r["epochs"], f * budget)[0]
        row["acc_at_best"] = best_within(r["epochs"], budget)[1]
        row["best_final_loss"] = r["best_final"]
        row["wall_s"] = r["wall_s"]
        row["busy"] = r["busy"]
        rows.append(row)
    return pd.DataFrame(rows)


def summary_table(per_seed: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    rows = []
    for method in methods:
        group = per_seed[per_seed.method == method]
        row: dict[str, Any] = {"method": method, "seeds": len(group)}
        row["configs"] = _spread(group.configs, "{:.0f}")
        row["trained_fully"] = _spread(group.trained_fully, "{:.0f}")
        row["model_epochs"] = _spread(group.model_epochs, "{:.0f}")
        for f in FRACTIONS:
            row[f"best val_loss @{f:g}B"] = _spread(group[f"best_loss@{f:g}B"], "{:.3f}")
        row["val_acc at best"] = _spread(group.acc_at_best, "{:.3f}")
        row["best final val_loss"] = _spread(group.best_final_loss, "{:.3f}")
        row["wall_s"] = _spread(group.wall_s, "{:.0f}")
        row["busy"] = _spread(group.busy, "{:.2f}")
        rows.append(row)
    return pd.DataFrame(rows)


def _spread(values: pd.Series, fmt: str) -> str:
    values = values.astype(float)
    if len(values) == 1 or values.min() == values.max():
        return fmt.format(values.mean())
    return f"{fmt.format(values.mean())} [{fmt.format(values.min())}, {fmt.format(values.max())}]"


def _write(
    summary: pd.DataFrame,
    per_seed: pd.DataFrame,
    args: argparse.Namespace,
    budget: int,
    dataset: cerebro.Dataset,
    planned: dict[str, int],
    total_s: float,
    path: str,
) -> None:
    seeds = " ".join(map(str, args.seeds))
    command = (
        "python benchmarks/search_efficiency.py"
        f" --seeds {seeds} --budget-models {args.budget_models} --max-epochs {args.max_epochs}"
        f" --workers {args.workers}"
    )
    shown = per_seed.copy()
    for column in shown.columns:
        if column.startswith(("best", "acc")):
            shown[column] = shown[column].map("{:.4f}".format)
    shown["wall_s"] = shown["wall_s"].map("{:.1f}".format)
    shown["busy"] = shown["busy"].map("{:.3f}".format)
    shown["model_epochs"] = shown["model_epochs"].map("{:g}".format)
    lines = [
        "# Search efficiency",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared), "
        f"torch {torch.__version__}, "
        f"Python {sys.version.split()[0]}; date {time.strftime('%Y-%m-%d')}; "
        f"whole run {total_s / 60:.1f} min",
        "",
        "Workload: scikit-learn digits (1797 8x8 images, 10 classes), "
        f"{dataset.split_rows('train')} training and {dataset.split_rows('val')} validation rows "
        f"in {dataset.num_shards} shards; a one-hidden-layer MLP trained with Adam; space: "
        "lr log-uniform 1e-5..1, width 16..256, dropout 0..0.6, batch size 16/32/64/128, "
        "weight decay log-uniform 1e-6..0.1. Every search ranks models by `val_loss` (min). "
        f"{args.workers} workers (MOP), at most {args.max_epochs} epochs per model.",
        "",
        f"Budget B = {args.budget_models} x {args.max_epochs} = {budget} model-epochs per run. "
        "Configurations per method: "
        + ", ".join(f"{m} {n}" for m, n in planned.items())
        + " (random and TPE: B / max_epochs trained fully; ASHA and Hyperband with eta = "
        f"{ETA}: as many as fit in B if every rung promotes its full quota).",
        "",
        "Columns: `model_epochs` = train hops / shards actually run. `best val_loss @xB` = the "
        "lowest `val_loss` of any model at any epoch among the first x*B model-epochs, taking "
        "epochs in the order their validation finished (each model keeps its best epoch's "
        "checkpoint by default). `val_acc at best` = the validation accuracy of that epoch. "
        "`best final val_loss` = the best last-epoch `val_loss` of a model trained to "
        f"{args.max_epochs} epochs (what `result.best` returns). `wall_s` = the whole "
        "`Experiment.run()` call, starting the workers included; `busy` = time workers spent "
        "in units / (workers x first unit start to last unit end). Summary cells: mean "
        "[min, max] over seeds.",
        "",
        "## Summary",
        "",
        summary.to_markdown(index=False),
        "",
        "## Every run",
        "",
        shown.to_markdown(index=False),
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _plot(runs: list[dict[str, Any]], per_seed: pd.DataFrame, budget: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    methods = list(dict.fromkeys(r["method"] for r in runs))
    colors = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    grid = np.arange(1, budget + 1)
    for method in methods:
        curves = []
        for r in (r for r in runs if r["method"] == method):
            e = r["epochs"]
            x, y = e.model_epochs.to_numpy(), e.best_so_far.to_numpy()
            axes[0].step(x, y, where="post", color=colors[method], alpha=0.25, lw=0.8)
            index = np.searchsorted(x, grid, side="right") - 1
            curves.append(np.where(index >= 0, y[np.clip(index, 0, None)], np.nan))
        axes[0].step(
            grid, np.nanmean(curves, axis=0), where="post", color=colors[method], lw=2, label=method
        )
    axes[0].set(
        xlabel="model-epochs spent",
        ylabel="best val_loss so far",
        yscale="log",
        title="Best val_loss vs compute (thin: one seed, thick: mean)",
    )
    axes[0].axvline(budget, color="k", ls="--", lw=0.8)
    low = np.nanmin([np.nanmin(r["epochs"].best_so_far) for r in runs])
    top = np.nanmax([np.nanmax(r["epochs"].best_so_far) for r in runs])
    axes[0].set_ylim(0.95 * low, min(top * 1.05, 5 * low))
    axes[0].legend()
    column = "best_loss@1B"
    for i, method in enumerate(methods):
        values = per_seed[per_seed.method == method][column].to_numpy()
        axes[1].plot(
            np.full(len(values), i) + np.linspace(-0.1, 0.1, len(values)),
            values,
            "o",
            color=colors[method],
            alpha=0.6,
        )
        axes[1].plot([i - 0.25, i + 0.25], [values.mean()] * 2, color=colors[method], lw=2)
    axes[1].set_xticks(range(len(methods)), methods)
    axes[1].set(ylabel="best val_loss within B", title=f"At B = {budget} model-epochs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--budget-models",
        type=int,
        default=16,
        help="budget B in models trained fully: B = this x max-epochs model-epochs",
    )
    parser.add_argument("--max-epochs", type=int, default=27)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--validation", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="tiny budget, for a smoke test")
    parser.add_argument(
        "--out",
        default=None,
        help="folder for the md and png (default: benchmarks/results; --quick writes only here)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.budget_models, args.max_epochs = args.seeds[:1], 4, 3
    if args.workers < 1 or args.workers > args.shards:
        parser.error(f"--workers {args.workers}: must be between 1 and --shards ({args.shards})")
    budget = args.budget_models * args.max_epochs
    planned = {
        m: make_search(m, budget, args.max_epochs, 0).num_models  # type: ignore[attr-defined]
        for m in args.methods
    }
    print(f"budget {budget} model-epochs; configurations {planned}", flush=True)
    runs = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        dataset = make_dataset(root, args.shards, args.validation)
        for seed in args.seeds:
            for method in args.methods:
                r = run_one(method, seed, dataset, budget, args.max_epochs, args.workers, root)
                runs.append(r)
                low, acc = best_within(r["epochs"], budget)
                print(
                    f"{method:>9} seed {seed}: {r['models']} configs, {r['spent']:g} model-epochs, "
                    f"best {METRIC} {low:.4f} (acc {acc:.4f}), {r['wall_s']:.1f} s",
                    flush=True,
                )
    total = time.perf_counter() - started
    per_seed = per_seed_table(runs, budget)
    summary = summary_table(per_seed, args.methods)
    print(summary.to_markdown(index=False))
    print(f"total {total:.0f} s")
    out = (
        args.out
        if args.out is not None
        else (None if args.quick else os.path.join(HERE, "results"))
    )
    if out is not None:
        os.makedirs(out, exist_ok=True)
        _write(
            summary,
            per_seed,
            args,
            budget,
            dataset,
            planned,
            total,
            os.path.join(out, "search_efficiency.md"),
        )
        _plot(runs, per_seed, budget, os.path.join(out, "search_efficiency.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
