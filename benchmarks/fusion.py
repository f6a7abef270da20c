"""Model fusion: K same-shape models trained as one fused unit against one unit per model.

Part 1, per step: K = 1, 8, 32, 128 models, an MLP (64-128-128-10, Adam, dropout 0.1) and a
small CNN (two 3x3 convolutions with BatchNorm on 8x8 images, SGD with momentum), at batch 32
and 128, in one process with one thread: the fused runner over a shard against the plain
runner over the same shard once per model. Reported: time per SGD step of all K models (the
fastest of 5 hops: other tenants of a shared machine only add time), the speedup (plain /
fused), and peak memory (the process's peak RSS above what it held once the models were built,
each measure in a fresh process so that peaks do not carry over).

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


def measure_one(
    arch: str, mode: str, models: int, batch: int, device_name: str, steps: int
) -> dict:
    """Time per step of ``models`` models, fused or one after another (in its own process)."""
    from cerebro import training
    from cerebro.data import Shard
    from cerebro.state import Counters
    from cerebro.techniques.base import MemberSeeds, ModelInHand
    from cerebro.techniques.fused import FusedRunner

    torch.set_num_threads(1)
    device = torch.device(device_name)
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
        if mode == "fused":
            FusedRunner().train(hands, seeds, shard, device, end_of_epoch=False)
        else:
            for hand, seed in zip(hands, seeds):
                torch.manual_seed(seed.rng_seed or 0)
                training.run_train_hop(hand.spec, shard, seed.shuffle_seed, device, False)

    hop()  # warm-up: optimizer state created, kernels chosen
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # The fastest of 5 hops: these machines are shared, and other tenants only add time.
    times = []
    for _ in range(5):
        began = time.perf_counter()
        hop()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    result = {"step_ms": 1000 * min(times) / steps, "peak_mb": peak_kb / 1024}
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def step_table(device: str = "cpu", quick: bool = False) -> pd.DataFrame:
    """Part 1: every (K, batch), fused and plain, each in a fresh process."""
    sizes = [1, 8] if quick else [1, 8, 32, 128]
    batches = [32] if quick else ([32, 128] if device == "cpu" else [32, 256])
    rows = []
    for arch, batch in [(a, b) for a in ARCHITECTURES for b in batches]:
        steps = 3 if quick else max(10, 640 // batch)
        for models in sizes:
            measured = {}
            for mode in ("plain", "fused"):
                command = [sys.executable, __file__, "--one", arch, mode, str(models), str(batch)]
                command += ["--device", device, "--steps", str(steps)]
                out = subprocess.run(command, capture_output=True, text=True, check=True)
                measured[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(
                {
                    "device": device,
                    "model": arch,
                    "batch": batch,
                    "models": models,
                    "plain_step_ms": round(measured["plain"]["step_ms"], 3),
                    "fused_step_ms": round(measured["fused"]["step_ms"], 3),
                    "speedup": round(
                        measured["plain"]["step_ms"] / measured["fused"]["step_ms"], 2
                    ),
                    "plain_peak_mb": round(measured["plain"]["peak_mb"], 1),
                    "fused_peak_mb": round(measured["fused"]["peak_mb"], 1),
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
        "hops); peak: the process's peak RSS above its size once the models were built (on "
        "CUDA: peak allocated device memory).",
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
        "--one", nargs=4, metavar=("ARCH", "MODE", "MODELS", "BATCH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.one:
        arch, mode, models, batch = args.one
        measured = measure_one(arch, mode, int(models), int(batch), args.device, args.steps)
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
