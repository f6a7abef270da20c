"""One model-selection workload trained every way people train it, on the same machine in the
same run: Cerebro's MOP against sequential training, task parallelism, DDP, Ray Tune and
model averaging.

The workload: 16 configurations (an MLP and a small CNN, two sizes each, batch sizes 32 and
64, two learning rates) x 5 epochs on scikit-learn's digits enlarged to 40,000 rows by random
affine transforms (see ``compare_approaches/workload.py``). The approaches:

- ``sequential``: one process trains each configuration in turn, over the shards in the order
  a deterministic MOP run visits them and with its seeds, so that metrics compare exactly;
- ``task_parallel``: W processes, each with its own full copy of the data, take whole
  configurations from a queue (what Ray Tune and Optuna do);
- ``ddp``: torch.distributed DDP (gloo on CPU, nccl on GPU), one configuration at a time, each
  global batch (the configuration's batch size) split across the W processes;
- ``ray_tune``: Ray Tune itself, W concurrent trials (skipped if ``ray.tune`` cannot be imported);
- ``model_averaging``: W processes train one configuration at a time, each on its own shards,
  and average their weights after every epoch (MADlib / Spark-era);
- ``mop`` and ``mop_deterministic``: ``cerebro.Experiment`` on ``LocalBackend(workers=W)``.

Each approach runs in a fresh process; a thread of this process samples the memory of that
process tree. Reported per approach: makespan, speedup over sequential, busy fraction, peak
resident memory per worker and in total, bytes of data each worker loaded, and the final
validation metrics of every configuration with their distance from sequential's. The goals of
issue 6 are checked against what was measured. Every training process uses one torch thread.

Usage:
    python benchmarks/compare.py                      # W = 2, all approaches, 12-14 min on 2 cores
    python benchmarks/compare.py --workers 4 --out /tmp/cmp   # on a machine with >= 4 cores
    python benchmarks/compare.py --approaches sequential,mop,ddp
    python benchmarks/compare.py --quick --out /tmp/cmp       # smoke run (~1 min); --quick
                                                              # writes files only with --out
    python benchmarks/compare.py --device cuda        # nccl for DDP, GPUs for every approach

Writes ``compare.md`` (table, goals, final metrics), ``compare_history.csv`` (every epoch),
``compare_makespan.png`` and ``compare_curves.png`` into ``--out`` (default
``benchmarks/results/``). Exits 1 if an approach failed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shlex
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the helper package beside this script, also for spawned processes

from compare_approaches import APPROACHES  # noqa: E402
from compare_approaches.approaches import Run, Settings, run_approach  # noqa: E402
from compare_approaches.memory import TreeMonitor  # noqa: E402
from compare_approaches.report import (  # noqa: E402
    Measured,
    code_version,
    goals,
    history_frame,
    plot_curves,
    plot_makespan,
    summary,
    write_markdown,
)
from compare_approaches.workload import make_dataset, workload  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check every argument before any work starts (errors name the argument, the
    value and what is accepted)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small workload, for a smoke run")
    parser.add_argument(
        "--out",
        default=None,
        help="folder for the table and plots (default benchmarks/results/; with --quick, "
        "nothing is written unless --out is given)",
    )
    parser.add_argument("--workers", type=int, default=2, help="W, worker processes (default 2)")
    parser.add_argument(
        "--approaches",
        default=",".join(APPROACHES),
        help=f"comma-separated, from: {', '.join(APPROACHES)} (default: all)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    names = [a.strip() for a in args.approaches.split(",")]
    unknown = [a for a in names if a not in APPROACHES]
    if unknown or not names:
        parser.error(
            f"--approaches {args.approaches!r}: unknown approach(es) "
            f"{', '.join(repr(a) for a in unknown)}; accepted (comma-separated): "
            f"{', '.join(APPROACHES)}"
        )
    # Run in the canonical order (sequential first: it is every ratio's baseline), once each.
    args.approaches = [a for a in APPROACHES if a in names]
    cores = os.cpu_count() or 1
    if args.workers < 1 or args.workers > cores:
        parser.error(
            f"--workers {args.workers}: must be between 1 and this machine's {cores} cores "
            "(os.cpu_count()), so that every worker has a core of its own"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device 'cuda': no CUDA device is available here; accepted: cpu")
    if args.out is None and not args.quick:
        args.out = os.path.join(HERE, "results")
    return args


def run_one(name: str, settings: Settings) -> Measured:
    """Run one approach in a fresh spawned process while this one samples its memory."""
    load = os.getloadavg()[0]
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=run_approach, args=(name, settings, send), name=f"cmp-{name}")
    process.start()
    send.close()
    monitor = TreeMonitor(process.pid).start()
    try:
        run = receive.recv()
    except EOFError:
        run = Run(name, settings.workers, error=f"runner exited with code {process.exitcode}")
    memory = monitor.stop()
    process.join()
    return Measured(run, memory, load)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    load_before = os.getloadavg()
    code = code_version()  # now: the repository may move on while this runs
    w = workload(args.quick, args.workers)
    print(
        f"compare: {len(w.configs)} configurations x {w.epochs} epochs, {w.rows} rows, "
        f"{w.num_shards} shards, W = {args.workers}, device {args.device}; "
        f"approaches: {', '.join(args.approaches)}; load average {load_before[0]:.2f}",
        flush=True,
    )
    measured: list[Measured] = []
    with tempfile.TemporaryDirectory(prefix="cerebro-compare-") as root:
        dataset = make_dataset(w, root)
        nbytes = {
            s: dataset.load_shard("train", s).nbytes + dataset.load_shard("val", s).nbytes
            for s in range(w.num_shards)
        }
        settings = Settings(w, dataset.path, args.workers, args.device, root, nbytes)
        for name in args.approaches:
            m = run_one(name, settings)
            measured.append(m)
            r = m.run
            if r.skipped:
                print(f"  {name}: skipped: {r.skipped}", flush=True)
            elif r.error:
                print(f"  {name}: FAILED\n{r.error}", flush=True)
            else:
                print(f"  {name}: makespan {r.makespan_s:.1f} s", flush=True)
    elapsed = time.time() - started
    table = summary(measured, w)
    goal_table = goals(table, args.workers, w)
    print(f"\n{table.to_string(index=False)}\n\n{goal_table.to_string(index=False)}", flush=True)
    print(f"\nwhole run: {elapsed:.0f} s", flush=True)
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        command = "python benchmarks/compare.py " + shlex.join(
            sys.argv[1:] if argv is None else argv
        )
        write_markdown(
            os.path.join(args.out, "compare.md"),
            command.strip(),
            load_before,
            w,
            args.workers,
            table,
            goal_table,
            measured,
            elapsed,
            args.device,
            code,
        )
        history_frame(measured, w).to_csv(
            os.path.join(args.out, "compare_history.csv"), index=False
        )
        plot_makespan(table, os.path.join(args.out, "compare_makespan.png"), args.workers)
        plot_curves(measured, w, os.path.join(args.out, "compare_curves.png"))
        print(f"wrote {args.out}/compare.md, compare_history.csv, compare_*.png", flush=True)
    else:
        print("--quick without --out: nothing written", flush=True)
    return 1 if any(m.run.error for m in measured) else 0


if __name__ == "__main__":
    sys.exit(main())
