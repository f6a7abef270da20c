"""The ``cerebro`` command."""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

from .engine import Result
from .errors import ConfigError
from .formatting import format_metric, format_params
from .kinds import ModelStatus
from .store import sqlite_file
from .store.records import reading


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
        "resume",
        help="continue an experiment by rerunning the script that started it; "
        "with a model id, resume that stopped model",
    )
    resume.add_argument("path", help="the experiment's path (the folder holding cerebro.db)")
    resume.add_argument("model_id", type=int, nargs="?", help="a stopped or pruned model")
    _add_request_options(resume)
    models = commands.add_parser("models", help="a table of an experiment's models")
    models.add_argument("path")
    stop = commands.add_parser("stop", help="stop a running model after its current hop")
    stop.add_argument("path")
    stop.add_argument("model_id", type=int)
    _add_request_options(stop)
    clone = commands.add_parser(
        "clone", help="a new model from a model's exact state, with new hyper-parameters"
    )
    clone.add_argument("path")
    clone.add_argument("model_id", type=int)
    _add_params_options(clone)
    clone.add_argument(
        "--no-warm-start", action="store_true", help="start from fresh weights instead"
    )
    add = commands.add_parser("add", help="add a model with the given hyper-parameters")
    add.add_argument("path")
    _add_params_options(add)
    set_epochs = commands.add_parser("set-epochs", help="change one model's epoch budget")
    set_epochs.add_argument("path")
    set_epochs.add_argument("model_id", type=int)
    set_epochs.add_argument("epochs", type=int)
    _add_request_options(set_epochs)
    serve = commands.add_parser(
        "serve", help="the web dashboard: watch and steer experiments from a browser"
    )
    serve.add_argument(
        "path", help="an experiment folder, a folder of experiment folders, or a database URL"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback)")
    serve.add_argument("--port", type=int, default=8300, help="port (default 8300; 0: any free)")
    serve.add_argument("--token", default=None, help="the token to require (default: a new one)")
    args = parser.parse_args(argv)
    console = Console()
    if args.command == "demo":
        return _demo(args, console)
    if args.command == "resume" and args.model_id is None:
        return _resume(args.path, console)
    if args.command == "models":
        return _models(args.path, console)
    if args.command == "serve":
        return _serve(args, console)
    return _request(args, console)


def _add_request_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        type=float,
        default=30.0,
        help="seconds to wait for a running experiment to apply the request (default 30)",
    )


def _add_params_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="params",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a hyper-parameter (repeatable), e.g. --set lr=0.001",
    )
    parser.add_argument("--epochs", type=int, default=None, help="its epoch budget")
    parser.add_argument(
        "--force", action="store_true", help="allow parameters outside the search space"
    )
    _add_request_options(parser)


def _parse_params(pairs: list[str]) -> dict[str, str]:
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigError("--set", pair, "NAME=VALUE, e.g. --set lr=0.001")
        params[name.strip()] = value.strip()
    return params


def _request(args: argparse.Namespace, console: Console) -> int:
    from .engine import ControlRejected, control

    try:
        ctl = control(args.path)
        if args.command == "stop":
            request = ctl.stop(args.model_id)
        elif args.command == "resume":
            request = ctl.resume(args.model_id)
        elif args.command == "set-epochs":
            request = ctl.set_epochs(args.model_id, args.epochs)
        elif args.command == "clone":
            request = ctl.clone(
                args.model_id,
                _parse_params(args.params),
                warm_start=not args.no_warm_start,
                epochs=args.epochs,
                force=args.force,
            )
        else:
            request = ctl.add(_parse_params(args.params), epochs=args.epochs, force=args.force)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    console.print(f"request #{request.id} ({request.op}) recorded by {ctl.who}")
    if not ctl.is_running:
        console.print(
            f"the experiment is not running: `cerebro resume {args.path}` applies it and "
            "continues the experiment"
        )
        return 0
    try:
        outcome = request.wait(timeout=args.wait)
    except ControlRejected as e:
        console.print(f"[red]rejected:[/red] {e}")
        return 1
    except TimeoutError as e:
        console.print(f"[yellow]pending:[/yellow] {e}")
        return 0
    shown = ", ".join(f"{k}={v}" for k, v in outcome.items())
    console.print(f"applied: {shown}" if shown else "applied")
    return 0


def _serve(args: argparse.Namespace, console: Console) -> int:
    from .dashboard import DashboardServer

    try:
        server = DashboardServer(args.path, args.host, args.port, args.token)
        try:
            server.app()  # the records are found and read before anything is served
        except BaseException:
            server.stop()
            raise
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    console.print(f"Cerebro dashboard for {args.path}", highlight=False)
    console.print(f"open: {server.url}", highlight=False, soft_wrap=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


def _models(path: str, console: Console) -> int:
    from .engine import control

    try:
        ctl = control(path)
        with reading(path):
            frame = ctl.models()
            status = ctl.status  # a killed driver's "running" reads as interrupted
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    if ctl.is_running is None:  # records in a database server: no lock here to ask
        status = f"{status}, as recorded"
    table = Table(title=f"{path} ({status})")
    grouped = "group" in frame.columns
    for name in (
        "model",
        *(["group"] if grouped else []),
        "status",
        "origin",
        "epochs",
        ctl.metric,
    ):
        table.add_column(name, justify="right")
    table.add_column("params", overflow="fold")
    for row in frame.itertuples(index=False):
        origin = (
            row.origin
            if row.parent is None or row.parent != row.parent
            else (f"{row.origin} of {int(row.parent)}")
        )
        table.add_row(
            str(row.model_id),
            *([str(row.group)] if grouped else []),
            row.status,
            origin,
            f"{row.epochs_done}/{row.max_epochs}",
            format_metric(getattr(row, ctl.metric)),
            format_params(row.params),
        )
    console.print(table)
    return 0


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
    unfinished = sum(ModelStatus(m.status).is_live for m in result.models)
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
            f"best: model {best.id}, val_accuracy {format_metric(best.metrics['val_accuracy'])}, "
            f"{format_params(best.params)}"
        )
    console.print(f"records:     {sqlite_file(path)} (SQLite)")
    console.print(f"checkpoints: {result.checkpoint_dir}")
    return 0


def leaderboard_table(result: Result) -> Table:
    """Models best first: the ranking metric, validation loss and parameters (and each
    model's group, ``*`` marking the best of its group, with ``per_group=True``)."""
    table = Table(title=f"Leaderboard (by {result.metric}, {result.mode})")
    second = "val_loss" if result.metric != "val_loss" else "train_loss"
    grouped = result.grouped
    best_of_group = {m.id for m in result.best_by_group.values()}
    for name in ("#", "model", *(["group"] if grouped else []), result.metric, second):
        table.add_column(name, justify="right")
    table.add_column("params", overflow="fold")
    ranked = result.ranked()
    for rank, model in enumerate(ranked + [m for m in result.models if m not in ranked], 1):
        shown_group = f"{model.group}{' *' if model.id in best_of_group else ''}"
        table.add_row(
            str(rank) if model.status == ModelStatus.COMPLETED else model.status,
            str(model.id),
            *([shown_group] if grouped else []),
            format_metric(model.metrics.get(result.metric)),
            format_metric(model.metrics.get(second)),
            format_params(model.params),
        )
    fused = result.fused_models
    captions = []
    if fused:
        captions.append(f"{len(fused)} of {len(result.models)} models trained fused")
    if grouped:
        captions.append("* the best model of its group")
    if captions:
        table.caption = "; ".join(captions)
    return table


if __name__ == "__main__":
    sys.exit(main())
