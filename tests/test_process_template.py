"""The template process that workers fork from: forks report pids and exit codes, a dead
template is replaced by the next experiment, and workers end with the template."""

from __future__ import annotations

import os
import signal
import time

from conftest import small_experiment

from cerebro.backends.process_template import ProcessTemplate


def test_a_forked_worker_reports_its_pid_and_the_signal_that_killed_it():
    template = ProcessTemplate.shared()
    worker = template.fork()
    assert worker.is_alive()
    os.kill(worker.pid, signal.SIGKILL)
    assert worker.join(timeout=10)
    assert worker.exitcode == -signal.SIGKILL
    worker.close()


def test_a_killed_template_is_replaced_by_the_next_experiment(digits, tmp_path):
    first = ProcessTemplate.shared()
    idle = first.fork()  # a worker waiting for its configuration: it must die with the template
    first._process.kill()
    first._process.wait(timeout=10)
    assert idle.join(timeout=10), "a worker outlived its template"
    idle.close()

    result = small_experiment(digits, tmp_path / "run").run()
    assert {m.status for m in result.models} == {"completed"}
    second = ProcessTemplate.shared()
    assert second is not first and second.alive()


def test_the_template_ends_when_its_driver_closes_it():
    template = ProcessTemplate()
    worker = template.fork()
    template.close()
    deadline = time.monotonic() + 10
    while template.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not template.alive()
    assert worker.join(timeout=10)
    worker.close()
