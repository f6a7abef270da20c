"""Live progress of a run: units done, models finished, the epoch in training, the best model.

Where the output goes decides how it is shown, as in tqdm and rich:

- a terminal, or Jupyter with ipywidgets: rich's bar, redrawn in place;
- Jupyter without ipywidgets: one line of text, updated in place;
- anything else (a log file, a CI log, a pipe): a complete plain line every ``interval``
  seconds and one at the end. A bar drawn to a file is cut at the console's width and
  never redrawn, which is why it is not used there.

The best value shown is the one the leaderboard puts first: each model's *last* epoch counts
(not its best epoch), completed models rank before the others, ties go to the lower id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from ..formatting import format_metric
from ..history import as_finite
from ..kinds import ModelStatus
from .base import Standing, Tracker

# Jupyter's text line is updated in place, so it may change often; a log line is kept.
_JUPYTER_INTERVAL_S = 1.0


class RunProgress(Tracker):
    """Shows how far a run is: units (hops and validation passes), models, epoch, best model.

    Disabled (prints nothing) when ``enabled`` is False.

    Args:
        enabled: show anything at all.
        metric: the experiment's metric, e.g. "val_accuracy".
        mode: "max" or "min": which values of ``metric`` are better.
        console: where to show it (default: standard error, as tqdm does, so that a
            program's own output stays clean).
        interval: seconds between two plain lines when the console is not a terminal.
        clock: the time source, in seconds (injectable so that tests need not sleep).
    """

    def __init__(
        self,
        enabled: bool,
        metric: str,
        mode: str,
        *,
        console: Console | None = None,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metric = metric
        self.mode = mode
        self.interval = interval
        self._clock = clock
        self._models: dict[int, Standing] = {}
        self._epoch: tuple[int, int] | None = None  # (epoch in training, of how many)
        self._done = 0
        self._fused: set[int] = set()  # models that trained in a fused unit
        self._total: int | None = None
        self._started: float | None = None
        self._view: _Bar | _Lines | None = None
        if enabled:
            self._view = _choose_view(console or Console(stderr=True), self)

    # What the driver reports -------------------------------------------------------------------

    def run_started(self) -> None:
        self._started = self._clock()
        if self._view is not None:
            self._view.start()

    def run_finished(self) -> None:
        """End the display; shows the final state (a last line where lines are printed)."""
        if self._view is not None and self._started is not None:
            self._view.stop()

    def plan(self, units_total: int) -> None:
        """The units the run will have done in all (it changes as models start and end)."""
        self._total = units_total
        self._show()

    def unit_done(self, model_ids: tuple[int, ...] = (), hops: int = 1) -> None:
        """A unit done: ``hops`` hops (or validation passes) of each of its models, as the
        plan counts them; a unit of several models is a fused one."""
        self._done += max(len(model_ids), 1) * hops
        if len(model_ids) > 1:
            self._fused.update(model_ids)
        self._show()

    def epoch_ended(self, model_id: int, epoch: int, metrics: dict[str, float]) -> None:
        """A model recorded an epoch: its value of the metric is now its last value."""
        value = metrics.get(self.metric)
        old = self._models.get(model_id, Standing())
        # A NaN or infinite last value ranks nowhere, as in Result.ranked.
        self._models[model_id] = Standing(old.status, as_finite(value))
        self._show()

    def standings(self, models: Mapping[int, Standing], epoch: int, epochs: int) -> None:
        """Every model's standing, and the epoch in training (1-based) out of ``epochs``.

        The driver's records are the truth (they include models restored on resume and
        epochs rolled back), so they replace what :meth:`epoch_ended` reported.
        """
        self._models = {i: Standing(s.status, as_finite(s.last)) for i, s in models.items()}
        # Clamped: the display never shows epoch 0 or an epoch past the last one.
        self._epoch = (min(max(epoch, 1), epochs), epochs)
        self._show()

    # What is shown -----------------------------------------------------------------------------

    def best(self) -> tuple[int, float] | None:
        """(model id, value) of the model the leaderboard ranks first, None if none has one."""
        sign = -1.0 if self.mode == "max" else 1.0
        first = min(
            (
                (s.status is not ModelStatus.COMPLETED, sign * s.last, i, s.last)
                for i, s in self._models.items()
                if s.last is not None
            ),
            default=None,
        )
        return None if first is None else (first[2], first[3])

    def status_text(self) -> str:
        """Models done and failed, how many trained fused (if any), epoch, best model, e.g.
        "3/8 done · 0 failed · 8 fused · epoch 2/5 · best val_accuracy 0.981 (model 3, last
        epoch)"."""
        if not self._models and self._epoch is None:
            return "starting"
        statuses = [s.status for s in self._models.values()]
        parts = [
            f"{statuses.count(ModelStatus.COMPLETED)}/{len(statuses)} done",
            f"{statuses.count(ModelStatus.FAILED)} failed",
        ]
        if self._fused:
            parts.append(f"{len(self._fused)} fused")
        if self._epoch is not None:
            parts.append(f"epoch {self._epoch[0]}/{self._epoch[1]}")
        best = self.best()
        # Formatted as the leaderboard and Result's repr format it, so all read the same.
        shown = f"{format_metric(best[1])} (model {best[0]}, last epoch)" if best else "-"
        parts.append(f"best {self.metric} {shown}")
        return " · ".join(parts)

    def line(self) -> str:
        """The whole status as one plain line, e.g. "cerebro: units 32/80 (40%) · 3/8 done ·
        0 failed · epoch 2/5 · best val_accuracy 0.981 (model 3, last epoch) · 0:00:12"."""
        units = f"units {self._done}"
        if self._total:
            units += f"/{self._total} ({100 * self._done // self._total}%)"
        elapsed = 0.0 if self._started is None else self._clock() - self._started
        return f"cerebro: {units} · {self.status_text()} · {timedelta(seconds=int(elapsed))}"

    def _show(self) -> None:
        # Totals set while the run is being prepared wait for start(): nothing shows before it.
        if self._view is not None and self._started is not None:
            self._view.update()


class _Bar:
    """rich's live bar: for a terminal, and for Jupyter with ipywidgets (rich redraws one
    widget there rather than printing a line per refresh)."""

    def __init__(self, console: Console, progress: RunProgress) -> None:
        self._progress = progress
        self._bar = _BarAndStatus(
            TextColumn("[bold]units[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            get_time=progress._clock,
            transient=False,
        )
        self._task = self._bar.add_task("run", total=None, start=False)

    def start(self) -> None:
        self._bar.start()
        self._bar.start_task(self._task)  # the elapsed time counts from here
        self.update()

    def update(self) -> None:
        p = self._progress
        self._bar.status = p.status_text()
        self._bar.update(self._task, completed=p._done, total=p._total)

    def stop(self) -> None:
        self.update()
        self._bar.stop()


class _BarAndStatus(Progress):
    """The bar, with the run's status on a line of its own below it: a status in the bar's
    row made rich squeeze the bar and cut both in a narrow terminal; alone it wraps."""

    status = "starting"

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        yield Text(self.status)


class _Lines:
    """Plain complete lines, at most one per ``interval`` seconds and one at the end, written
    by ``write`` (printed to a log, or replacing Jupyter's one line)."""

    def __init__(
        self, write: Callable[[str], None], interval: float, progress: RunProgress
    ) -> None:
        self._write = write
        self._interval = interval
        self._progress = progress
        self._shown_at: float | None = None

    def start(self) -> None:
        pass  # the first update shows a line: before it there is nothing to say

    def update(self) -> None:
        now = self._progress._clock()
        if self._shown_at is None or now - self._shown_at >= self._interval:
            self._shown_at = now
            self._write(self._progress.line())

    def stop(self) -> None:
        self._write(self._progress.line())


def _choose_view(console: Console, progress: RunProgress) -> _Bar | _Lines:
    if console.is_jupyter:
        try:
            import ipywidgets  # noqa: F401  (rich's live display in Jupyter needs it)
        except ImportError:
            return _Lines(_jupyter_line(), _JUPYTER_INTERVAL_S, progress)
        return _Bar(console, progress)
    if console.is_terminal and not console.is_dumb_terminal:
        return _Bar(console, progress)

    def log(text: str) -> None:
        # soft_wrap: a line longer than the console's width stays one line, uncut.
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    return _Lines(log, progress.interval, progress)


def _jupyter_line() -> Callable[[str], None]:
    """A writer that replaces one text output of the current Jupyter cell."""
    from IPython.display import Pretty, display

    handle: Any = None

    def write(text: str) -> None:
        nonlocal handle
        if handle is None:
            handle = display(Pretty(text), display_id=True)
        else:
            handle.update(Pretty(text))

    return write
