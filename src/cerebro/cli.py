"""The ``cerebro`` command."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

from .engine import Result
from .errors import ConfigError
from .store import sqlite_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cerebro", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="run a real model selection on scikit-learn's digits (8 models, 2 workers)"
    )
    demo.add_argument(
        "--path", default=None, help="folder for data and records (default: runs/demo-<time>)"
    )
    demo.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    demo.add_argument("--models", type=int, default=8, help="configurations to try (default 8)")
    demo.add_argument("--epochs", type=int, default=5, help="epochs per model (default 5)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    resume = commands.add_parser(
        "resume", help="continue an interrupted experiment by rerunning the script that started it"
    )
    resume.add_argument("path", help="the experiment's path (the folder holding cerebro.db)")
    args = parser.parse_args(argv)
    console = Console()
    if args.command == "demo":
        return _demo(args, console)
    if args.command == "resume":
        return _resume(args.path, console)
    return 2


def _resume(path: str, console: Console) -> int:
    from .engine import load

    try:
        result = load(path)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    command = result.experiment["config"].get("command")
    if not command:
        console.print(
            f"[red]error:[/red] path={path!r} was started from an interactive session, so there "
            "is no script to rerun: run the same code again with the same path to continue"
        )
        return 2
    status = result.experiment["status"]
    unfinished = sum(m.status not in ("completed", "failed") for m in result.models)
    console.print(
        f"resuming {result.experiment['name']!r} ({status}, {unfinished} models unfinished): "
        f"{' '.join(command['argv'])} (in {command['cwd']})"
    )
    done = subprocess.run([sys.executable, *command["argv"]], cwd=command["cwd"])
    return done.returncode


def _demo(args: argparse.Namespace, console: Console) -> int:
    from .demo import run_demo

    path = args.path or time.strftime("runs/demo-%Y%m%d-%H%M%S")
    console.print(
        f"[bold]Cerebro demo[/bold]: {args.models} configurations of an MLP/CNN on digits, "
        f"{args.epochs} epochs, {args.workers} workers (model hopper parallelism)"
    )
    started = time.time()
    try:
        result = run_demo(
            path=path,
            workers=args.workers,
            models=args.models,
            epochs=args.epochs,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    console.print(leaderboard_table(result))
    console.print(f"finished in {time.time() - started:.1f} s")
    best = result.best
    if best is not None:
        console.print(
            f"best: model {best.id}, val_accuracy {best.metrics['val_accuracy']:.4f}, "
            f"{format_params(best.params)}"
        )
    console.print(f"records:     {sqlite_file(path)} (SQLite)")
    console.print(f"checkpoints: {result.checkpoint_dir}")
    return 0


def leaderboard_table(result: Result) -> Table:
    """Models best first: the ranking metric, validation loss and parameters."""
    table = Table(title=f"Leaderboard (by {result.metric}, {result.mode})")
    second = "val_loss" if result.metric != "val_loss" else "train_loss"
    for name in ("#", "model", result.metric, second):
        table.add_column(name, justify="right")
    table.add_column("params", overflow="fold")
    ranked = result.ranked()
    for rank, model in enumerate(ranked + [m for m in result.models if m not in ranked], 1):
        table.add_row(
            str(rank) if model.status == "completed" else model.status,
            str(model.id),
            _number(model.metrics.get(result.metric)),
            _number(model.metrics.get(second)),
            format_params(model.params),
        )
    return table


def format_params(params: dict) -> str:
    """``{"lr": 0.0241226, "arch": "cnn"}`` -> ``"lr=0.0241 arch=cnn"``."""
    return " ".join(f"{k}={_number(v)}" for k, v in params.items())


def _number(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
