"""The live progress display: true epochs, the leaderboard's best value, plain lines off a TTY."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import types

import pytest
from rich.console import Console

from cerebro.trackers import Standing
from cerebro.trackers.progress import RunProgress

HERE = os.path.dirname(os.path.abspath(__file__))


class Clock:
    """A time source the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _plain(mode: str = "max", interval: float = 10.0) -> tuple[RunProgress, io.StringIO, Clock]:
    """A progress writing to a non-terminal stream narrower than its lines."""
    out, clock = io.StringIO(), Clock()
    console = Console(file=out, force_terminal=False, force_jupyter=False, width=40)
    progress = RunProgress(
        True, "val_accuracy", mode, console=console, interval=interval, clock=clock
    )
    return progress, out, clock


def _lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_the_epoch_shown_starts_at_one_and_never_passes_the_last():
    progress, out, clock = _plain(interval=0.0)  # a line per update
    progress.run_started()
    progress.standings({0: Standing()}, 0, 5)  # before any report of the epoch in training
    for epoch in (1, 3, 5, 6):  # 6: a finished model's count of epochs, one past the last
        progress.standings({0: Standing()}, epoch, 5)
    progress.run_finished()
    shown = [re.search(r"epoch (\d+)/5", line).group(1) for line in _lines(out)]
    assert shown == ["1", "1", "3", "5", "5", "5"]


def test_best_is_the_best_last_epoch_value_as_the_leaderboard_ranks_it():
    progress, out, _ = _plain()
    progress.run_started()
    progress.epoch_ended(0, 0, {progress.metric: 0.90})
    progress.epoch_ended(0, 0, {progress.metric: 0.99})  # model 0's best epoch, but not its last
    progress.epoch_ended(1, 0, {progress.metric: 0.95})
    progress.epoch_ended(0, 0, {progress.metric: 0.93})
    progress.epoch_ended(1, 0, {progress.metric: 0.96})
    progress.epoch_ended(2, 0, {progress.metric: float("nan")})  # no value ranks nowhere
    assert progress.best() == (1, 0.96)
    progress.run_finished()
    assert "best val_accuracy 0.96 (model 1, last epoch)" in _lines(out)[-1]
    assert "0.99" not in out.getvalue().splitlines()[-1]

    # Completed models rank first, as in Result.ranked; ties go to the lower id.
    progress.standings({0: Standing("completed", 0.93), 1: Standing("failed", 0.96)}, 2, 2)
    assert progress.best() == (0, 0.93)
    progress.standings({3: Standing("completed", 0.5), 2: Standing("completed", 0.5)}, 2, 2)
    assert progress.best() == (2, 0.5)


def test_best_in_min_mode_is_the_lowest_last_value():
    progress, _, _ = _plain(mode="min")
    progress.standings({0: Standing("completed", 0.3), 1: Standing("completed", 0.2)}, 1, 1)
    assert progress.best() == (1, 0.2)
    assert "best val_accuracy 0.2 (model 1, last epoch)" in progress.status_text()


def test_a_non_terminal_gets_complete_plain_lines_every_interval_and_at_the_end():
    progress, out, clock = _plain(interval=10.0)
    progress.plan(80)
    progress.run_started()
    for _ in range(32):
        progress.unit_done()  # the first prints a line, the rest fall inside the interval
    clock.now += 5
    progress.standings({i: Standing() for i in range(8)}, 2, 5)
    assert len(_lines(out)) == 1
    clock.now += 7  # 12 s after the first line
    progress.epoch_ended(3, 0, {progress.metric: 0.981})
    progress.run_finished()
    lines = _lines(out)
    assert lines[0] == "cerebro: units 1/80 (1%) · starting · 0:00:00"
    assert lines[1] == (
        "cerebro: units 32/80 (40%) · 0/8 done · 0 failed · epoch 2/5 · "
        "best val_accuracy 0.981 (model 3, last epoch) · 0:00:12"
    )
    assert lines[2] == lines[1]  # the end: the same state, once more
    assert "━" not in out.getvalue() and "…" not in out.getvalue()


def test_disabled_prints_nothing():
    out = io.StringIO()
    progress = RunProgress(False, "val_accuracy", "max", console=Console(file=out))
    progress.plan(4)
    progress.run_started()
    progress.unit_done()
    progress.epoch_ended(0, 0, {progress.metric: 0.5})
    progress.standings({0: Standing("completed", 0.5)}, 1, 1)
    progress.run_finished()
    assert out.getvalue() == ""


def test_a_terminal_gets_rich_bar_with_the_status():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, force_jupyter=False, width=200)
    progress = RunProgress(True, "val_accuracy", "max", console=console)
    progress.plan(8)
    progress.run_started()
    progress.unit_done()
    progress.standings({0: Standing("running", 0.8)}, 2, 2)
    progress.run_finished()
    text = out.getvalue()
    assert "━" in text and "epoch 2/2" in text and "best val_accuracy 0.8 (model 0" in text


def test_jupyter_without_ipywidgets_updates_a_single_line(monkeypatch):
    shown: list[tuple[str, str]] = []

    class Handle:
        def update(self, obj):
            shown.append(("update", obj))

    def display(obj, display_id=False):
        shown.append(("display", obj))
        return Handle()

    fake = types.ModuleType("IPython.display")
    fake.display, fake.Pretty = display, str
    monkeypatch.setitem(sys.modules, "IPython", types.ModuleType("IPython"))
    monkeypatch.setitem(sys.modules, "IPython.display", fake)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import raises ImportError
    out, clock = io.StringIO(), Clock()
    console = Console(file=out, force_jupyter=True)
    progress = RunProgress(True, "val_accuracy", "max", console=console, clock=clock)
    progress.run_started()
    progress.unit_done()
    clock.now += 2
    progress.standings({0: Standing()}, 1, 3)
    progress.run_finished()
    assert [kind for kind, _ in shown] == ["display", "update", "update"]
    assert "epoch 1/3" in shown[-1][1]
    assert out.getvalue() == ""


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import builders, cerebro
if __name__ == "__main__":
    space = {{"lr": cerebro.loguniform(1e-3, 3e-2)}}
    result = cerebro.Experiment(builders.mlp, {data!r}, cerebro.RandomSearch(space, num_models=2),
                                epochs=2, metric="val_accuracy", mode="max",
                                backend=cerebro.LocalBackend(workers=1), path=sys.argv[1], seed=3,
                                progress=True).run()
    print(repr(result))
"""


def test_a_run_with_its_stderr_on_a_pipe_logs_true_epochs_and_the_leaderboard_best(
    digits, tmp_path
):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=HERE, data=digits.path))
    # rich reads these as "this is a terminal": without them a pipe is a pipe.
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "exp")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("cerebro:")]
    assert lines, done.stderr
    assert "epoch 2/2" in lines[-1] and "epoch 3" not in done.stderr
    assert "━" not in done.stderr
    assert lines[-1].startswith("cerebro: units 32/32 (100%) · 2/2 done · 0 failed")
    best = re.search(r"best val_accuracy=(\S+) \(model (\d+)\)", done.stdout)
    assert best, done.stdout
    assert f"best val_accuracy {best[1]} (model {best[2]}, last epoch)" in lines[-1]


@pytest.mark.parametrize("value", [None, float("inf")])
def test_a_model_without_a_finite_last_value_is_not_best(value):
    progress, _, _ = _plain()
    progress.standings({0: Standing("completed", value), 1: Standing("running", 0.1)}, 1, 1)
    assert progress.best() == (1, 0.1)
