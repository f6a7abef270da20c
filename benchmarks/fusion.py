"""Model fusion: K same-shape models trained as one fused unit against one unit per model.

Part 1, per step: K = 1, 8, 32, 128 models, an MLP (64-128-128-10, Adam, dropout 0.1) and a
small CNN (two 3x3 convolutions with BatchNorm on 8x8 images, SGD with momentum), at batch 32
and 128, in one process with one thread: the fused runner over a shard against the plain
runner over the same shard once per model. Reported: time per SGD step of all K models (the
fastest of 5 hops, plain and fused hops taken in turns in one process so that a shared
machine's load weighs on both alike), the speedup (plain / fused), and peak memory (the process's
peak RSS over two hops above what it held once the models were built, each in a fresh process
so that peaks do not carry over).

Part 2, end to end: ``fusion_selection.py``'s selection of 64 configurations on digits with 2
workers, unfused then fused: makespan, busy fraction, best accuracy.

Usage:
    python benchmarks/fusion.py                  # both parts, writes results/fusion.md
    python benchmarks/fusion.py --quick          # a smoke run (seconds), not for the table
    python benchmarks/fusion.py --device cuda    # part 1 on a GPU (only where one is lent);
                                                 # aims at >= 100x at K = 128, batch 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any

import pandas as pd
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def mlp(params: dict[str, Any]) -> Any:
    import cerebro

    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(128, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )
    return cerebro.ModelSpec(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=params["lr"]),
        loss=torch.nn.CrossEntropyLoss(),
        batch_size=params["batch_size"],
        metrics={"accuracy": cerebro.metrics.accuracy},
    )


def cnn(params: dict[str, Any]) -> Any:
    import cerebro

    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(16 * 4 * 4, 10),
    )
    return cerebro.ModelSpec(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=params["lr"], momentum=0.9),
        loss=torch.nn.CrossEntropyLoss(),
        batch_size=params["batch_size"],
        metrics={"accuracy": cerebro.metrics.accuracy},
    )


ARCHITECTURES = {"mlp": (mlp, (64,)), "cnn": (cnn, (1, 8, 8))}


def _setup(arch: str, models: int, batch: int, device: torch.device, steps: int) -> Any:
    """``models`` freshly built models and a shard of ``steps`` batches; returns hop(mode)."""
    from cerebro import training
    from cerebro.data import Shard
    from cerebro.state import Counters
    from cerebro.techniques.base import MemberSeeds, ModelInHand
    from cerebro.techniques.fused import FusedRunner

    rows = batch * steps
    generator = torch.Generator().manual_seed(0)
    build, row_shape = ARCHITECTURES[arch]
    shard = Shard(
        torch.randn(rows, *row_shape, generator=generator).to(device),
        torch.randint(0, 10, (rows,), generator=generator).to(device),
    )
    hands = []
    for i in range(models):
        spec = training.build_spec(build, {"lr": 1e-3 * (1 + i % 7), "batch_size": batch}, i)
        spec.model.to(device)
        rng = {"rng": torch.get_rng_state()}
        hands.append(ModelInHand(i, spec, rng, Counters(0, 0, i), {}))
    seeds = [MemberSeeds(i, i) for i in range(models)]

    def hop() -> None:
        FusedRunner().train(hands, seeds, shard, device, end_of_epoch=False)

    def hop_plain() -> None:
        for hand, seed in zip(hands, seeds):
            torch.manual_seed(seed.rng_seed or 0)
            training.run_train_hop(hand.spec, shard, seed.shuffle_seed, device, False)

    return {"fused": hop, "plain": hop_plain}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_both(arch: str, models: int, batch: int, device_name: str, steps: int) -> dict:
    """Time per step, plain and fused, measured in turns in one process (each its own
    models): a shared machine's load then weighs on both alike. The fastest of 5 hops each."""
    torch.set_num_threads(1)
    device = torch.device(device_name)
    hops = {mode: _setup(arch, models, batch, device, steps)[mode] for mode in ("plain", "fused")}
    times: dict[str, list[float]] = {"plain": [], "fused": []}
    for hop in hops.values():
        hop()  # warm-up: optimizer state created, kernels chosen
    for _ in range(5):
        for mode, hop in hops.items():
            _sync(device)
            began = time.perf_counter()
            hop()
            _sync(device)
            times[mode].append(time.perf_counter() - began)
    return {f"{mode}_step_ms": 1000 * min(t) / steps for mode, t in times.items()}


def peak_one(arch: str, mode: str, models: int, batch: int, device_name: str, steps: int) -> dict:
    """Peak memory of two hops, plain or fused, above what the built models hold (in its own
    process, so peaks do not mix)."""
    torch.set_num_threads(1)
    device = torch.device(device_name)
    hop = _setup(arch, models, batch, device, steps)[mode]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hop()  # the first hop: optimizer state created, the runner's stacked copies made
    hop()
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    return {"peak_mb": peak_mb}


def _child(*arguments: str) -> dict:
    command = [sys.executable, __file__, *arguments]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_table(device: str = "cpu", quick: bool = False) -> pd.DataFrame:
    """Part 1: every (K, batch), fused and plain, each in a fresh process."""
    sizes = [1, 8] if quick else [1, 8, 32, 128]
    batches = [32] if quick else ([32, 128] if device == "cpu" else [32, 256])
    rows = []
    for arch, batch in [(a, b) for a in ARCHITECTURES for b in batches]:
        steps = 3 if quick else max(10, 640 // batch)
        for models in sizes:
            shape = [arch, str(models), str(batch), "--device", device, "--steps", str(steps)]
            timed = _child("--time", *shape)
            peaks = {mode: _child("--peak", mode, *shape)["peak_mb"] for mode in ("plain", "fused")}
            rows.append(
                {
                    "device": device,
                    "model": arch,
                    "batch": batch,
                    "models": models,
                    "plain_step_ms": round(timed["plain_step_ms"], 3),
                    "fused_step_ms": round(timed["fused_step_ms"], 3),
                    "speedup": round(timed["plain_step_ms"] / timed["fused_step_ms"], 2),
                    "plain_peak_mb": round(peaks["plain"], 1),
                    "fused_peak_mb": round(peaks["fused"], 1),
                }
            )
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def write(steps: pd.DataFrame, selection: pd.DataFrame | None, path: str) -> None:
    lines = [
        "# Model fusion",
        "",
        "Written by `python benchmarks/fusion.py` "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}).",
        "",
        "## Per step: fused unit vs one unit per model (1 thread)",
        "",
        "mlp: 64-128-128-10 (Adam, dropout 0.1); cnn: conv 8 and 16 channels with BatchNorm, "
        "8x8 inputs (SGD, momentum 0.9). Time of one SGD step of all K models (fastest of 5 "
        "hops, plain and fused in turns in one process); peak: the process's peak RSS over "
        "two hops above its size once the models were built (on CUDA: peak allocated device "
        "memory).",
        "",
        steps.to_markdown(index=False),
        "",
    ]
    if selection is not None:
        lines += [
            "## End to end: 64 configurations on digits, 2 workers",
            "",
            "From `benchmarks/fusion_selection.py` (AdamW, cosine LR, dropout; 5 epochs; free "
            "mode): unfused, then fused.",
            "",
            selection.to_markdown(index=False),
            "",
        ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, not for the table")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--time", nargs=3, metavar=("ARCH", "MODELS", "BATCH"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--peak", nargs=4, metavar=("MODE", "ARCH", "MODELS", "BATCH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.time:
        arch, models, batch = args.time
        print(json.dumps(time_both(arch, int(models), int(batch), args.device, args.steps)))
        return
    if args.peak:
        mode, arch, models, batch = args.peak
        measured = peak_one(arch, mode, int(models), int(batch), args.device, args.steps)
        print(json.dumps(measured))
        return
    steps = step_table(args.device, args.quick)
    print(steps.to_string(index=False))
    selection = None
    if args.device == "cpu":
        from fusion_selection import end_to_end_table

        selection = end_to_end_table(args.quick)
        print(selection.to_string(index=False))
    if not args.quick:
        name = "fusion.md" if args.device == "cpu" else f"fusion_{args.device}.md"
        write(steps, selection, os.path.join(HERE, "results", name))


if __name__ == "__main__":
    main()
