"""The one workload every approach trains, and the single-process training loop that the
sequential, task-parallel and Ray Tune approaches share.

Data: scikit-learn's handwritten digits (1797 8x8 scans), enlarged to tens of thousands of rows
by seeded random affine transforms (rotation, scale, shift) plus pixel noise, so that a training
unit lasts long enough to time. Validation rows are other transformed copies of the same 1797
scans, so validation accuracy measures fit more than generalization to new writers; what
matters here is that every approach trains and validates on exactly the same rows.

Models: a grid over family (MLP, small CNN), size, batch size (32, 64) and learning rate; both
families use dropout, so a model's random stream must be handled right for results to match.

Shard order and seeds are those of a deterministic MOP run (``Experiment(deterministic=True)``
with the same seed): epoch ``e`` of model ``m`` visits the training shards in the permutation
seeded by ``(seed, "shard-order", m, e)``, reseeds torch with ``(seed, "hop-rng", m, e, shard)``
before each shard, and shuffles a shard's rows with ``training.shuffle_seed``. Trained that way
in one process, a model equals the MOP-trained one bit for bit on CPU.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import cerebro
from cerebro import training
from cerebro.data import Shard

SEED = 0


@dataclass(frozen=True)
class Workload:
    """What is trained: ``configs`` (one dict per configuration) for ``epochs`` epochs on
    ``rows`` augmented digits (``validation`` of them held out) cut into ``num_shards``."""

    name: str
    rows: int
    epochs: int
    num_shards: int
    configs: list[dict[str, Any]] = field(hash=False)
    validation: float = 0.2


def _grid(
    families: list[tuple[str, int]], batches: list[int], lrs: list[float]
) -> list[dict[str, Any]]:
    return [
        {"family": family, "size": size, "batch_size": batch, "lr": lr}
        for family, size in families
        for batch in batches
        for lr in lrs
    ]


def workload(quick: bool, workers: int) -> Workload:
    """The full workload (16 configurations) or the quick one (4). There are at least as many
    shards as workers, and a multiple of them, so every worker holds as much data."""
    num_shards = max(4, workers)
    num_shards += -num_shards % workers
    if quick:
        configs = [
            {"family": "mlp", "size": 64, "batch_size": 64, "lr": 3e-3},
            {"family": "mlp", "size": 256, "batch_size": 32, "lr": 1e-3},
            {"family": "cnn", "size": 8, "batch_size": 64, "lr": 3e-3},
            {"family": "cnn", "size": 16, "batch_size": 32, "lr": 1e-3},
        ]
        return Workload("quick", rows=4000, epochs=2, num_shards=num_shards, configs=configs)
    families = [("mlp", 64), ("mlp", 256), ("cnn", 8), ("cnn", 16)]
    configs = _grid(families, [32, 64], [1e-3, 3e-3])
    return Workload("full", rows=48000, epochs=6, num_shards=num_shards, configs=configs)


def config_name(params: dict[str, Any]) -> str:
    """A short label such as ``cnn16-b32-lr0.001``."""
    return f"{params['family']}{params['size']}-b{params['batch_size']}-lr{params['lr']:g}"


def build(params: dict[str, Any]) -> cerebro.ModelSpec:
    """An MLP (``size`` = width) or a two-convolution CNN (``size`` = channels) for 8x8 digits."""
    size = params["size"]
    if params["family"] == "mlp":
        model = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(64, size),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(size, size),
            torch.nn.ReLU(),
            torch.nn.Linear(size, 10),
        )
    else:
        model = torch.nn.Sequential(
            torch.nn.Unflatten(1, (1, 8)),  # (batch, 8, 8) -> (batch, 1, 8, 8)
            torch.nn.Conv2d(1, size, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(size, 2 * size, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(2 * size * 4, 10),
        )
    return cerebro.ModelSpec(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=params["lr"]),
        loss=torch.nn.CrossEntropyLoss(),
        batch_size=params["batch_size"],
        metrics={"accuracy": cerebro.metrics.accuracy},
    )


class ConfigBuild:
    """``build`` for a grid over configuration indices, so that model ``i`` of a MOP run is
    configuration ``i`` (picklable: it carries the configurations)."""

    def __init__(self, configs: list[dict[str, Any]]) -> None:
        self.configs = configs

    def __call__(self, params: dict[str, Any]) -> cerebro.ModelSpec:
        return build(self.configs[params["cfg"]])


def make_dataset(w: Workload, root: str) -> cerebro.Dataset:
    """Write the augmented digits as a prepared (sharded Parquet) dataset under ``root``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    scans = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    g = torch.Generator().manual_seed(SEED)
    which = torch.randint(0, len(scans), (w.rows,), generator=g)

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g) * 2 - 1

    angle = uniform(w.rows) * math.radians(12)
    scale = 1 + uniform(w.rows) * 0.1
    shift = uniform(w.rows, 2) * 0.25  # up to one pixel: the grid spans [-1, 1] over 8 pixels
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = torch.nn.functional.affine_grid(theta, [w.rows, 1, 8, 8], align_corners=False)
    images = torch.nn.functional.grid_sample(scans[which], grid, align_corners=False)
    images = (images + 0.05 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    return cerebro.prepare_data(
        {"image": images.squeeze(1).numpy(), "digit": digits.target[which.numpy()]},
        os.path.join(root, f"digits-{w.name}"),
        label="digit",
        num_shards=w.num_shards,
        validation=w.validation,
        seed=SEED,
    )


def shard_order(model_id: int, epoch: int, num_shards: int) -> list[int]:
    """The training shards of one epoch in the order a deterministic MOP run visits them."""
    return training.shard_order(SEED, model_id, epoch, list(range(num_shards)))


def hop_rng_seed(model_id: int, epoch: int, shard: int) -> int:
    """What a deterministic MOP worker seeds torch with before a training hop."""
    return training.hop_rng_seed(SEED, model_id, epoch, shard)


@dataclass
class Data:
    """Shards held in one process, by split and shard id, and the bytes they take."""

    train: dict[int, Shard]
    val: dict[int, Shard]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in (*self.train.values(), *self.val.values()))


def load_data(dataset_path: str, shards: list[int], device: torch.device) -> Data:
    """Load ``shards`` of both splits into this process (on ``device``)."""
    ds = cerebro.Dataset.open(dataset_path)

    def load(split: str, s: int) -> Shard:
        shard = ds.load_shard(split, s)
        return Shard(shard.x.to(device), shard.y.to(device))

    return Data({s: load("train", s) for s in shards}, {s: load("val", s) for s in shards})


def epoch_metrics(
    train: dict[int, dict[str, float]],
    val: dict[int, dict[str, float]],
    rows: dict[str, dict[int, int]],
) -> dict[str, float]:
    """Row-weighted means over shards of per-shard sums, added in shard order exactly as the
    MOP driver adds them, so that equal training gives equal (not just close) metrics."""
    out: dict[str, float] = {}
    for prefix, by_shard in (("train", train), ("val", val)):
        total_rows = sum(rows[prefix][s] for s in by_shard)
        totals: dict[str, float] = {}
        for s in sorted(by_shard):
            for name, value in by_shard[s].items():
                totals[name] = totals.get(name, 0.0) + value
        out.update({f"{prefix}_{name}": v / total_rows for name, v in totals.items()})
    return out


EpochCallback = Callable[[int, dict[str, float]], None]


def train_config(
    params: dict[str, Any],
    model_id: int,
    data: Data,
    epochs: int,
    device: torch.device,
    on_epoch: EpochCallback | None = None,
) -> tuple[list[dict[str, float]], float, float]:
    """Train one configuration in this process over all shards in MOP's deterministic order.

    Returns its history (one dict of metrics per epoch), the seconds spent in training and
    validation units, and the wall-clock time (``time.time()``) its first unit started.
    """
    spec = training.build_spec(build, params, training.init_seed(SEED, model_id))
    spec.model.to(device)
    num_shards = len(data.train)
    rows = {
        "train": {s: d.rows for s, d in data.train.items()},
        "val": {s: d.rows for s, d in data.val.items()},
    }
    history, compute, first = [], 0.0, time.time()
    for epoch in range(epochs):
        order = shard_order(model_id, epoch, num_shards)
        train: dict[int, dict[str, float]] = {}
        for i, s in enumerate(order):
            start = time.perf_counter()
            torch.manual_seed(hop_rng_seed(model_id, epoch, s))
            stats = training.run_train_hop(
                spec,
                data.train[s],
                training.shuffle_seed(SEED, model_id, epoch, s),
                device,
                end_of_epoch=i == len(order) - 1,
            )
            compute += time.perf_counter() - start
            train[s] = stats.sums
        val = {}
        for s in sorted(data.val):
            start = time.perf_counter()
            val[s] = training.run_eval_hop(spec, data.val[s], device).sums
            compute += time.perf_counter() - start
        metrics = {"epoch": epoch, **epoch_metrics(train, val, rows)}
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return history, compute, first


def peak_rss_kib() -> int:
    """This process's peak resident set size (VmHWM), in KiB."""
    return read_status(os.getpid()).get("VmHWM", 0)


def read_status(pid: int) -> dict[str, int]:
    """The memory lines (in KiB) of ``/proc/<pid>/status``; empty if the process is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out
