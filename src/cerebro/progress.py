"""A live progress display (rich): hops done, models finished, epoch reached, best metric."""

from __future__ import annotations

import math

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RunProgress:
    """Shows one bar of units (hops and validation passes) with a line of run status.

    Disabled (prints nothing) when ``enabled`` is False.
    """

    def __init__(self, enabled: bool, metric: str, mode: str) -> None:
        self.metric = metric
        self.mode = mode
        self.best: float | None = None
        self.best_model: int | None = None
        self._bar = None
        if enabled:
            self._bar = Progress(
                TextColumn("[bold]units[/bold]"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
                transient=False,
            )
            self._task = self._bar.add_task("run", total=None, status="starting workers")

    def start(self) -> None:
        if self._bar is not None:
            self._bar.start()

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()

    def set_total(self, total: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def epoch_done(self, model_id: int, value: float | None) -> None:
        if value is None or not math.isfinite(value):
            return
        better = self.best is None or (
            value > self.best if self.mode == "max" else value < self.best
        )
        if better:
            self.best, self.best_model = value, model_id

    def status(self, models: int, running: int, completed: int, failed: int, epoch: int) -> None:
        if self._bar is None:
            return
        best = f"{self.best:.4f} (model {self.best_model})" if self.best is not None else "-"
        text = f"{completed}/{models} done · {failed} failed · epoch {epoch} · {self.metric} {best}"
        self._bar.update(self._task, status=text)
