"""Model fusion: K small models trained as one fused unit against K plain units, per step.

A plain unit pays torch's per-operation overhead (Python, dispatch, autograd, the optimizer's
loop over parameters) once per model per step; a fused unit (``FusedRunner``) pays it once per
group. This benchmark measures what that buys, in the same run on the same machine:

- per-step time of one fused hop of K models against K plain hops (``run_train_hop`` per
  model, through ``PlainRunner``) over the same shard, same rows and seeds, so both do exactly
  the same arithmetic; the time of a hop (stacking parameters and writing states back included)
  divided by its steps;
- speedup: plain time / fused time;
- peak memory of each, measured in a fresh process per measurement: on CPU the rise of the
  process's peak resident set (``ru_maxrss``) from just before training to its end (so it
  counts everything training allocated, and nothing the import of torch did); on CUDA
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

Every process uses one torch thread.

Usage:
    python benchmarks/fusion.py                  # CPU step table (~5 min on 2 cores)
    python benchmarks/fusion.py --quick          # smoke run, writes only with --out
    python benchmarks/fusion.py --device cuda    # GPU section: K up to 128 MLPs at batch 256
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
from dataclasses import asdict, dataclass

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class StepCase:
    arch: str  # "mlp" (64-128-128-10) or "cnn" (two convolutions for 8x8 inputs)
    batch: int
    models: int
    steps: int
    device: str
    mode: str  # "fused" or "plain"


@dataclass(frozen=True)
class StepResult:
    arch: str
    batch: int
    models: int
    device: str
    plain_ms: float  # one step of all K models, plain
    fused_ms: float  # one step of all K models, fused
    speedup: float
    plain_peak_mib: float
    fused_peak_mib: float


def build(params: dict):
    """The benchmark's models: Adam with per-model lr, as a model selection would try them."""
    import torch
    from torch import nn

    import cerebro

    if params["arch"] == "mlp":
        model = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 128),
            nn.ReLU(),
            nn.Linear(128, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.1),
            nn.Linear(64, 10),
        )
    return cerebro.ModelSpec(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=params["lr"]),
        loss=nn.CrossEntropyLoss(),
        batch_size=params["batch"],
        metrics={"accuracy": cerebro.metrics.accuracy},
    )


def child(case: StepCase) -> dict[str, float]:
    """One measurement, in this (fresh) process: a warm-up hop, then the timed hop."""
    import torch

    from cerebro import training
    from cerebro.data import Shard
    from cerebro.state import Counters
    from cerebro.techniques.base import MemberSeeds, ModelInHand
    from cerebro.techniques.fused import FusedRunner
    from cerebro.techniques.plain import PlainRunner

    torch.set_num_threads(1)
    device = torch.device(case.device)
    generator = torch.Generator().manual_seed(0)
    rows = case.batch * case.steps
    shard = Shard(
        torch.rand(rows, 1, 8, 8, generator=generator).to(device),
        torch.randint(0, 10, (rows,), generator=generator).to(device),
    )
    warm = Shard(shard.x[: 2 * case.batch], shard.y[: 2 * case.batch])
    models = []
    for k in range(case.models):
        params = {"arch": case.arch, "batch": case.batch, "lr": 1e-3 * (1 + k % 7)}
        spec = training.build_spec(build, params, init_seed=k)
        spec.model.to(device)
        models.append(ModelInHand(k, spec, {"rng": torch.get_rng_state()}, Counters(0, 0, k), {}))
    seeds = [MemberSeeds(k, k) for k in range(case.models)]

    def hop(data: Shard) -> None:
        if case.mode == "fused":
            FusedRunner().train(models, seeds, data, device, False)
        else:
            for model, seed in zip(models, seeds, strict=True):
                PlainRunner().train([model], [seed], data, device, False)

    hop(warm)  # first steps create optimizer state and warm torch's caches
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.max_memory_allocated(device)
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    began = time.perf_counter()
    hop(shard)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"step_ms": 1e3 * seconds / case.steps, "peak_mib": peak / 2**20}


def measure(case: StepCase) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", json.dumps(asdict(case))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_table(
    ks: list[int],
    archs: list[str],
    batches: list[int],
    device: str = "cpu",
    steps: int = 20,
    out: str | None = os.path.join(HERE, "results"),
    name: str = "fusion_steps",
) -> list[StepResult]:
    """Per-step time and peak memory, fused against plain, for each (arch, batch, K); writes
    ``<out>/<name>.md`` and ``.csv`` when ``out`` is given."""
    results = []
    for arch in archs:
        for batch in batches:
            for k in ks:
                fused = measure(StepCase(arch, batch, k, steps, device, "fused"))
                plain = measure(StepCase(arch, batch, k, steps, device, "plain"))
                result = StepResult(
                    arch,
                    batch,
                    k,
                    device,
                    plain_ms=plain["step_ms"],
                    fused_ms=fused["step_ms"],
                    speedup=plain["step_ms"] / fused["step_ms"],
                    plain_peak_mib=plain["peak_mib"],
                    fused_peak_mib=fused["peak_mib"],
                )
                print(
                    f"{arch} batch {batch} K={k}: plain {result.plain_ms:.2f} ms, fused "
                    f"{result.fused_ms:.2f} ms per step, {result.speedup:.2f}x",
                    flush=True,
                )
                results.append(result)
    if out is not None:
        _write(results, out, name, steps)
    return results


def _write(results: list[StepResult], out: str, name: str, steps: int) -> None:
    import pandas as pd

    os.makedirs(out, exist_ok=True)
    frame = pd.DataFrame([asdict(r) for r in results])
    frame.to_csv(os.path.join(out, f"{name}.csv"), index=False)
    device = results[0].device if results else "cpu"
    memory = (
        "torch.cuda.max_memory_allocated during the timed hop"
        if device.startswith("cuda")
        else "rise of the process's peak RSS (ru_maxrss) over the timed hop, fresh process each"
    )
    lines = [
        f"# Model fusion, per step ({device})",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} "
        f"{platform.processor() or ''}, {os.cpu_count()} cores, one torch thread; "
        f"`python benchmarks/fusion.py{' --device ' + device if device != 'cpu' else ''}`.",
        f"Each time is one hop of {steps} steps (Adam, each model its own lr, rows and seeds) "
        "divided by its steps: K models fused in one `FusedRunner` hop against K `PlainRunner` "
        "hops, parameters stacked and states written back included. "
        f"Peak memory: {memory}.",
        "",
        "| model | batch | K | plain ms/step | fused ms/step | speedup | plain peak MiB "
        "| fused peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.arch} | {r.batch} | {r.models} | {r.plain_ms:.2f} | {r.fused_ms:.2f} "
            f"| {r.speedup:.2f}x | {r.plain_peak_mib:.1f} | {r.fused_peak_mib:.1f} |"
        )
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (seconds)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default=None, help="folder for the tables (default: results/)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(StepCase(**json.loads(args.child)))))
        return
    out = args.out or (None if args.quick else os.path.join(HERE, "results"))
    if args.quick:
        step_table([1, 4], ["mlp", "cnn"], [32], args.device, steps=3, out=out)
    elif args.device.startswith("cuda"):
        # GPU section: the goal is >= 100x per step for K = 128 MLPs at batch 256.
        step_table(
            [1, 8, 32, 128],
            ["mlp"],
            [256],
            args.device,
            steps=50,
            out=out,
            name="fusion_steps_cuda",
        )
    else:
        step_table([1, 8, 32, 128], ["mlp", "cnn"], [32, 128], args.device, out=out)

    # End-to-end section: the lead adds `end_to_end_table(...)` here (Experiment(fusion=...)
    # against one plain unit per model, whole runs), once the engine groups models into units.


if __name__ == "__main__":
    main()
