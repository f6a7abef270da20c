"""Tables and plots of a comparison: every figure comes from the runs of this invocation."""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from .approaches import Run
from .memory import TreeMemory
from .workload import Workload, config_name

MIB = 2**20


@dataclass
class Measured:
    """One approach's run, the memory its process tree reached, and the load when it started."""

    run: Run
    memory: TreeMemory | None
    load_1m: float


def _final(run: Run, cfg: int, metric: str) -> float:
    hist = run.history.get(cfg) or []
    return float(hist[-1][metric]) if hist else math.nan


def _curve(run: Run, cfg: int, metric: str) -> list[float]:
    return [float(h[metric]) for h in run.history.get(cfg) or []]


def summary(measured: list[Measured], w: Workload) -> pd.DataFrame:
    """One row per approach: time, busy fraction, memory, data, and metrics against sequential."""
    by_name = {m.run.approach: m.run for m in measured}
    seq = by_name.get("sequential")
    ok_seq = seq is not None and not seq.error and not seq.skipped
    n = len(w.configs)
    rows = []
    for m in measured:
        r = m.run
        row: dict[str, Any] = {"approach": r.approach, "workers": r.workers}
        if r.skipped or r.error:
            status = f"skipped: {r.skipped}" if r.skipped else "failed: " + _last_line(r.error)
            status = status.replace("|", "/")  # a pipe would split the markdown cell
            rows.append({**row, "note": status, "load_1m": round(m.load_1m, 2)})
            continue
        rss = dict(m.memory.hwm_kib) if m.memory else {}
        for pid, kib in r.worker_rss_kib.items():
            rss[pid] = max(rss.get(pid, 0), kib)
        worker_rss = [rss[p] for p in r.worker_pids if p in rss]
        row.update(
            makespan_s=round(r.makespan_s, 1),
            speedup=round(seq.makespan_s / r.makespan_s, 2) if ok_seq else math.nan,
            busy=round(r.compute_s / (r.workers * r.makespan_s), 3),
            startup_s=round(r.startup_s, 1),
            data_mib_per_worker=round(max(r.data_bytes) / MIB, 2) if r.data_bytes else math.nan,
            rss_mib_per_worker=round(max(worker_rss) / 1024, 0) if worker_rss else math.nan,
            rss_mib_total=round(m.memory.total_rss_kib / 1024, 0) if m.memory else math.nan,
            mean_val_acc=round(
                float(np.nanmean([_final(r, c, "val_accuracy") for c in range(n)])), 4
            ),
        )
        if ok_seq:
            final = [abs(_final(r, c, "val_loss") - _final(seq, c, "val_loss")) for c in range(n)]
            curves = [
                max(
                    (
                        abs(a - b)
                        for a, b in zip(_curve(r, c, "val_loss"), _curve(seq, c, "val_loss"))
                    ),
                    default=math.nan,
                )
                for c in range(n)
            ]
            same = sum(
                _curve(r, c, "val_loss") == _curve(seq, c, "val_loss")
                and _curve(r, c, "val_accuracy") == _curve(seq, c, "val_accuracy")
                for c in range(n)
            )
            row.update(
                max_dval_loss_final=float(f"{max(final):.3g}"),
                max_dval_loss_any_epoch=float(f"{max(curves):.3g}"),
                identical_curves=f"{same}/{n}",
            )
        row.update(note=r.note, load_1m=round(m.load_1m, 2))
        rows.append(row)
    return pd.DataFrame(rows)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


def goals(table: pd.DataFrame, workers: int, w: Workload) -> pd.DataFrame:
    """The issue's goals, each with what this run measured and whether it is met."""
    t = table.set_index("approach")

    def get(name: str, col: str) -> float:
        if name not in t.index or col not in t.columns:
            return math.nan
        value = t.loc[name, col]
        return float(value) if isinstance(value, (int, float, np.floating)) else math.nan

    def row(goal: str, measured: str, met: bool | None) -> dict[str, str]:
        verdict = "not measured" if met is None else ("yes" if met else "no")
        return {"goal": goal, "measured": measured, "met?": verdict}

    rows = []
    mop, tp = get("mop", "makespan_s"), get("task_parallel", "makespan_s")
    ratio = mop / tp
    rows.append(
        row(
            "MOP makespan within 10% of task parallelism's",
            f"MOP {mop:.1f} s, task parallelism {tp:.1f} s: ratio {ratio:.3f}",
            None if math.isnan(ratio) else ratio <= 1.10,
        )
    )
    mop_d, tp_d = get("mop", "data_mib_per_worker"), get("task_parallel", "data_mib_per_worker")
    share = mop_d / tp_d
    rows.append(
        row(
            f"MOP data per worker about 1/W = {1 / workers:.3f} of task parallelism's",
            f"{mop_d:.2f} MiB vs {tp_d:.2f} MiB: {share:.3f}"
            f" (peak RSS per worker {get('mop', 'rss_mib_per_worker'):.0f} vs "
            f"{get('task_parallel', 'rss_mib_per_worker'):.0f} MiB)",
            None if math.isnan(share) else abs(share * workers - 1) <= 0.1,
        )
    )
    ddp = get("ddp", "makespan_s")
    batches = sorted({c["batch_size"] for c in w.configs})
    rows.append(
        row(
            "MOP at least 2x faster than DDP at batch size <= 64",
            f"DDP {ddp:.1f} s / MOP {mop:.1f} s = {ddp / mop:.2f}x (batch sizes {batches})",
            None if math.isnan(ddp / mop) else ddp / mop >= 2 and max(batches) <= 64,
        )
    )
    n = len(w.configs)
    if "mop_deterministic" in t.index and "identical_curves" in t.columns:
        same = str(t.loc["mop_deterministic", "identical_curves"])
        final = get("mop_deterministic", "max_dval_loss_final")
        rows.append(
            row(
                "MOP (same shard order: deterministic) final metric = sequential's, every config",
                f"largest final val_loss difference {final:.3g}; identical curves {same}",
                final == 0,
            )
        )
        rows.append(
            row(
                "MOP learning curves on top of sequential's",
                f"largest val_loss difference at any epoch "
                f"{get('mop_deterministic', 'max_dval_loss_any_epoch'):.3g}; "
                f"val_loss and val_accuracy equal at every epoch for {same} configurations",
                same == f"{n}/{n}",
            )
        )
    else:
        rows.append(
            row("MOP final metric = sequential's", "needs sequential, mop_deterministic", None)
        )
    for name in ("ddp", "model_averaging"):
        drift = get(name, "max_dval_loss_any_epoch")
        rows.append(
            row(
                f"{name} drifts from sequential (same shard order, not plain sequential SGD)",
                f"largest val_loss difference at any epoch {drift:.3g}, final "
                f"{get(name, 'max_dval_loss_final'):.3g}",
                None if math.isnan(drift) else drift > 0,
            )
        )
    return pd.DataFrame(rows)


def per_config(measured: list[Measured], w: Workload, metric: str, digits: int) -> pd.DataFrame:
    """Final ``metric`` of every configuration under every approach that ran."""
    runs = [m.run for m in measured if not (m.run.skipped or m.run.error)]
    rows = []
    for c, params in enumerate(w.configs):
        row = {"config": f"{c}: {config_name(params)}"}
        for r in runs:
            row[r.approach] = round(_final(r, c, metric), digits)
        rows.append(row)
    return pd.DataFrame(rows)


def history_frame(measured: list[Measured], w: Workload) -> pd.DataFrame:
    """Every epoch of every configuration under every approach (a CSV, for auditing)."""
    rows = []
    for m in measured:
        for cfg, hist in sorted(m.run.history.items()):
            for h in hist:
                rows.append(
                    {
                        "approach": m.run.approach,
                        "config": cfg,
                        "name": config_name(w.configs[cfg]),
                        **h,
                    }
                )
    return pd.DataFrame(rows)


def machine() -> str:
    """CPU model, cores, memory, OS and library versions, for the table's header."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        memory = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    try:
        import ray

        ray_version = f", ray {ray.__version__}"
    except ImportError:
        ray_version = ", ray not installed"
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return (
        f"{model}, {os.cpu_count()} cores{memory}{gpu}; {platform.system()} {platform.release()}; "
        f"Python {sys.version.split()[0]}, torch {torch.__version__}{ray_version}"
    )


def code_version() -> str:
    """Which cerebro was measured: where it was imported from, and the repository's state."""
    import subprocess

    import cerebro

    where = os.path.dirname(os.path.abspath(cerebro.__file__))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else "?"

    def changed(*paths: str) -> str:
        out = git("status", "--porcelain", "--", *paths)
        return str(len(out.splitlines())) if out != "?" else "?"

    inside = where == os.path.join(repo, "src", "cerebro")
    source = (
        f"the repository's src/ ({changed('src')} uncommitted file(s) there)"
        if inside
        else f"`{where}`, not the repository's src/"
    )
    return (
        f"cerebro imported from {source}; repository HEAD {git('rev-parse', '--short', 'HEAD')}; "
        f"uncommitted files of this benchmark: "
        f"{changed('benchmarks/compare.py', 'benchmarks/compare_approaches')}"
    )


def write_markdown(
    path: str,
    command: str,
    load_before: tuple[float, float, float],
    w: Workload,
    workers: int,
    table: pd.DataFrame,
    goal_table: pd.DataFrame,
    measured: list[Measured],
    elapsed_s: float,
    device: str,
    code: str,
) -> None:
    rows_train = int(round(w.rows * (1 - w.validation)))
    lines = [
        "# Cerebro against other ways of training a model selection",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}",
        "",
        f"Code: {code}",
        "",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}; whole run {elapsed_s / 60:.1f} min; "
        f"load average before the run (1, 5, 15 min): "
        f"{', '.join(f'{x:.2f}' for x in load_before)}; device {device}.",
        "",
        f"Workload ({w.name}): {len(w.configs)} configurations x {w.epochs} epochs on augmented "
        f"scikit-learn digits ({w.rows} rows of 8x8 images, {rows_train} for training, the rest "
        f"for validation, {w.num_shards} shards); W = {workers} workers; one torch thread per "
        "process. Configurations: " + ", ".join(config_name(c) for c in w.configs) + ".",
        "",
        *(
            [
                "**Quick run**: a smoke test. Its timings are mostly process start-up, so its "
                "goal verdicts say nothing about the approaches.",
                "",
            ]
            if w.name == "quick"
            else []
        ),
        "## Results",
        "",
        table.to_markdown(index=False),
        "",
        "Columns: `makespan_s` from the approach's start (before its processes or data are set "
        "up) to the last result; `speedup` = sequential's makespan / this one; `busy` = seconds "
        "workers spent in training and validation units / (workers x makespan), which for DDP "
        "and model averaging includes their communication; `startup_s` until the first unit "
        "started; `data_mib_per_worker` = bytes of training and validation shards the busiest "
        "worker loaded; `rss_mib_per_worker` = largest peak resident memory (VmHWM) of a "
        "training process; `rss_mib_total` = largest summed resident memory of the approach's "
        "whole process tree (driver, workers and, for Ray, its own services) at one sample; "
        "`max_dval_loss_*` = largest |val_loss - sequential's| over configurations (final epoch, "
        "any epoch); `identical_curves` = configurations whose val_loss and val_accuracy equal "
        "sequential's exactly at every epoch; `load_1m` = 1-minute load average when the "
        "approach started.",
        "",
        "## Goals",
        "",
        goal_table.to_markdown(index=False),
        "",
        "## Final val_accuracy of every configuration",
        "",
        per_config(measured, w, "val_accuracy", 4).to_markdown(index=False),
        "",
        "## Final val_loss of every configuration",
        "",
        per_config(measured, w, "val_loss", 6).to_markdown(index=False),
        "",
        "Every epoch of every configuration is in `compare_history.csv`; plots: "
        "`compare_makespan.png`, `compare_curves.png`.",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_makespan(table: pd.DataFrame, path: str, workers: int) -> None:
    """Makespan bars (speedup over sequential written on each), data each worker loaded, and
    peak resident memory per worker and in total."""
    plt = _plt()
    ran = table[table["makespan_s"].notna()] if "makespan_s" in table else table.iloc[:0]
    names = list(ran.approach)[::-1]
    y = np.arange(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [3, 2, 2]})
    ax = axes[0]
    bars = ax.barh(y, list(ran.makespan_s)[::-1], color="#4c72b0")
    for bar, speedup in zip(bars, list(ran.speedup)[::-1]):
        label = f" {speedup:.2f}x" if isinstance(speedup, float) and not math.isnan(speedup) else ""
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, label, va="center")
    ax.set(xlabel="makespan (s)", title=f"Makespan, W = {workers} (speedup over sequential)")
    ax.margins(x=0.15)
    axes[1].barh(y, list(ran.data_mib_per_worker)[::-1], color="#dd8452")
    axes[1].set(xlabel="MiB", title="Data loaded per worker")
    axes[2].barh(y + 0.2, list(ran.rss_mib_per_worker)[::-1], 0.4, label="per worker")
    axes[2].barh(y - 0.2, list(ran.rss_mib_total)[::-1], 0.4, label="whole process tree")
    axes[2].set(xlabel="MiB", title="Peak resident memory")
    axes[2].legend(loc="best", fontsize=8)
    for ax in axes:
        ax.set_yticks(y, names if ax is axes[0] else [])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(measured: list[Measured], w: Workload, path: str) -> None:
    """Validation loss per epoch of a few configurations under each approach (top), and its
    distance from sequential's (bottom, symmetric log scale: 0 means identical)."""
    plt = _plt()
    runs = [m.run for m in measured if not (m.run.skipped or m.run.error)]
    seq = next((r for r in runs if r.approach == "sequential"), None)
    picks = sorted({int(round(x)) for x in np.linspace(0, len(w.configs) - 1, 4)})
    fig, axes = plt.subplots(2, len(picks), figsize=(4 * len(picks), 7), squeeze=False)
    styles = {
        "sequential": {"color": "black", "lw": 4, "alpha": 0.35},
        "mop_deterministic": {"color": "#dd8452", "ls": "--", "marker": "o"},
        "mop": {"color": "#c44e52", "marker": "x"},
        "ddp": {"color": "#4c72b0", "marker": "s"},
        "model_averaging": {"color": "#55a868", "marker": "^"},
        "task_parallel": {"color": "#8172b3", "ls": ":", "marker": "."},
        "ray_tune": {"color": "#937860", "ls": "-.", "marker": "+"},
    }
    for col, cfg in enumerate(picks):
        top, bottom = axes[0][col], axes[1][col]
        for r in runs:
            curve = _curve(r, cfg, "val_loss")
            epochs = np.arange(1, len(curve) + 1)
            style = styles.get(r.approach, {})
            top.plot(epochs, curve, label=r.approach, **style)
            if seq is not None and r is not seq:
                base = _curve(seq, cfg, "val_loss")
                diff = [abs(a - b) for a, b in zip(curve, base)]
                bottom.plot(epochs[: len(diff)], diff, label=r.approach, **style)
        top.set(title=config_name(w.configs[cfg]), xlabel="epoch", ylabel="val_loss")
        for ax in (top, bottom):
            ax.xaxis.get_major_locator().set_params(integer=True)
        bottom.set_yscale("symlog", linthresh=1e-7)
        bottom.set(xlabel="epoch", ylabel="|val_loss - sequential's|")
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(fontsize=8)
    fig.suptitle("Learning curves: same shard order, different ways of training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
