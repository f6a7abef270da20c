"""Models per data subgroup: 20 groups x 8 configurations, per-group model selection with MOP
(fused and not) against training each (group, configuration) pair one after another.

The data: 20 groups ("participants") of synthetic 64-feature rows, 10 classes, each group with
its own random linear teacher (so a model per group is what one wants), 2,500 rows per group,
20% validation, one shard per group (a grouped dataset never mixes groups in a shard). The
models: an MLP 64-256-256-10 with Adam; the 8 configurations differ in learning rate and
dropout (same shape and batch size, so they fuse).

Baseline, "one after another": in this process, with one thread, for each (group,
configuration) pair, build the model, train it for the epochs on the group's training shard
and evaluate it on its validation shard (cerebro.training's hop functions, the same SGD that a
worker runs), then the next pair. MOP: ``Experiment(per_group=True)`` on 2 local workers of 1
thread, free mode, without and with fusion. Reported: makespan (wall time of ``run()`` or of
the loop), speedup over the baseline, and the mean best-per-group validation accuracy.

Usage:
    python benchmarks/groups.py            # writes results/groups.md
    python benchmarks/groups.py --quick    # a smoke run (4 groups x 2 configurations)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from typing import Any

import numpy as np
import pandas as pd
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

import cerebro  # noqa: E402
from cerebro import training  # noqa: E402


def build(params: dict[str, Any]) -> cerebro.ModelSpec:
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        torch.nn.ReLU(),
        torch.nn.Dropout(params["dropout"]),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    return cerebro.ModelSpec(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=params["lr"]),
        loss=torch.nn.CrossEntropyLoss(),
        batch_size=64,
        metrics={"accuracy": cerebro.metrics.accuracy},
    )


SPACE = {
    "lr": cerebro.choice([3e-4, 1e-3, 3e-3, 1e-2]),
    "dropout": cerebro.choice([0.0, 0.2]),
}


def grouped_rows(groups: int, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of ``groups`` participants, each labelled by its own linear teacher."""
    rng = np.random.default_rng(seed)
    xs, ys, names = [], [], []
    for g in range(groups):
        teacher = rng.normal(size=(64, 10))
        x = rng.normal(size=(rows, 64)).astype(np.float32)
        xs.append(x)
        ys.append((x @ teacher + rng.normal(scale=2.0, size=(rows, 10))).argmax(axis=1))
        names += [f"p{g:02d}"] * rows
    return {"x": np.concatenate(xs), "y": np.concatenate(ys), "participant": np.array(names)}


def one_after_another(data: cerebro.Dataset, configurations: list[dict[str, Any]], epochs: int):
    """Each (group, configuration) pair trained and evaluated alone, one after another."""
    torch.set_num_threads(1)
    device = torch.device("cpu")
    started = time.perf_counter()
    best: dict[Any, float] = {}
    model_id = 0
    for group in data.groups:
        train = [data.load_shard("train", s) for s in group.shards]
        val = [data.load_shard("val", s) for s in group.shards]
        for params in configurations:
            spec = training.build_spec(build, params, training.init_seed(0, model_id))
            for epoch in range(epochs):
                for i, shard in enumerate(train):
                    seed = training.shuffle_seed(0, model_id, epoch, i)
                    training.run_train_hop(spec, shard, seed, device, i == len(train) - 1)
                correct = rows = 0.0
                for shard in val:
                    stats = training.run_eval_hop(spec, shard, device)
                    correct += stats.sums["accuracy"]
                    rows += stats.rows
            best[group.name] = max(best.get(group.name, 0.0), correct / rows)
            model_id += 1
    return time.perf_counter() - started, float(np.mean(list(best.values())))


QUICK_SPACE = {"lr": cerebro.choice([1e-3, 1e-2]), "dropout": cerebro.choice([0.0])}


def with_mop(data: cerebro.Dataset, folder: str, space: dict, epochs: int, fusion: bool):
    exp = cerebro.Experiment(
        build,
        data,
        cerebro.GridSearch(space),
        epochs=epochs,
        metric="val_accuracy",
        mode="max",
        backend=cerebro.LocalBackend(workers=2, threads_per_worker=1),
        path=folder,
        progress=False,
        per_group=True,
        fusion=fusion,
    )
    started = time.perf_counter()
    result = exp.run()
    makespan = time.perf_counter() - started
    accuracy = np.mean([m.metrics["val_accuracy"] for m in result.best_by_group.values()])
    return makespan, float(accuracy), len(result.models)


def table(quick: bool) -> pd.DataFrame:
    groups, epochs, rows = (4, 1, 500) if quick else (20, 3, 2500)
    space = QUICK_SPACE if quick else SPACE
    with tempfile.TemporaryDirectory() as tmp:
        data = cerebro.prepare_data(
            grouped_rows(groups, rows),
            os.path.join(tmp, "data"),
            num_shards=1,
            validation=0.2,
            group_by="participant",
        )
        configurations = cerebro.GridSearch(space).configurations()
        num_models = len(configurations)
        base_s, base_acc = one_after_another(data, configurations, epochs)
        results = [("one after another (1 process)", base_s, base_acc, groups * num_models)]
        # A warm-up run starts the worker template (torch loaded once per process), so that
        # neither measured run pays for it: as for a notebook's second experiment.
        with_mop(data, os.path.join(tmp, "warm-up"), QUICK_SPACE, 1, False)
        for fusion in (False, True):
            folder = os.path.join(tmp, f"run-{fusion}")
            makespan, accuracy, models = with_mop(data, folder, space, epochs, fusion)
            name = f"per_group=True, MOP, 2 workers{', fused' if fusion else ''}"
            results.append((name, makespan, accuracy, models))
    frame = pd.DataFrame(
        results, columns=["approach", "makespan_s", "mean_best_val_accuracy", "models"]
    )
    frame["speedup"] = (base_s / frame.makespan_s).round(2)
    frame["makespan_s"] = frame.makespan_s.round(1)
    frame["mean_best_val_accuracy"] = frame.mean_best_val_accuracy.round(4)
    frame.attrs.update(groups=groups, models=num_models, epochs=epochs, rows=rows)
    return frame


def write(frame: pd.DataFrame, folder: str) -> str:
    a = frame.attrs
    path = os.path.join(folder, "groups.md")
    lines = [
        "# Models per data subgroup",
        "",
        f"{a['groups']} groups x {a['models']} configurations = {a['groups'] * a['models']} "
        f"models (an MLP 64-256-256-10, Adam, batch 64), {a['epochs']} epochs, {a['rows']} "
        "synthetic rows per group (20% validation, one shard per group), each group labelled "
        "by its own linear teacher. One run of `python benchmarks/groups.py`.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}.",
        "",
        frame.to_markdown(index=False),
        "",
        "The baseline trains each (group, configuration) pair alone, one after another, in one "
        "process of one thread (the same hop functions a worker runs, no scheduling, no state "
        "files). MOP trains all of them at once on 2 workers of one thread each, each model "
        "only on its group's shard; with fusion, the configurations of one group that are at "
        "the same point hop as one fused unit. mean_best_val_accuracy: the mean over groups of "
        "the best configuration's validation accuracy (free mode: shard orders, and so "
        "accuracies, may differ slightly between the approaches). A warm-up experiment ran "
        "first in the same process, so neither MOP run includes starting the worker template "
        "(loading torch once, a few seconds: see results/overhead.md).",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, not for the table")
    args = parser.parse_args()
    frame = table(args.quick)
    print(frame.to_string(index=False))
    if not args.quick:
        print("written:", write(frame, os.path.join(HERE, "results")))


if __name__ == "__main__":
    sys.exit(main())
