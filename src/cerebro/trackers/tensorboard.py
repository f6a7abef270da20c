"""TensorBoard logs: one run per model under ``<path>/tensorboard/``.

Each epoch adds the model's metrics as scalars (``loss/train``, ``accuracy/val``, ...); when the
model completes or fails, its hyper-parameters and last metrics go to TensorBoard's HParams tab.
View with ``tensorboard --logdir <path>/tensorboard``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from ..history import last_metrics
from ..kinds import ModelStatus
from .base import Tracker

# A model that ended in one of these has its hyper-parameters and last metrics in HParams.
_FLUSH_S = 2  # how often a model's events reach its file while it trains
_HPARAMS_ON = (ModelStatus.COMPLETED, ModelStatus.PRUNED, ModelStatus.FAILED)


def _import_writer() -> None:
    import torch.utils.tensorboard  # noqa: F401


def _import_quietly() -> None:
    with contextlib.suppress(Exception):  # raised again where the writer is needed
        _import_writer()


def available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog(Tracker):
    """Writes scalars and HParams of each model (needs the ``tensorboard`` package).

    During a run the writing happens on one thread of its own, in the order the events came:
    a model's first scalars open its event file and start the writer's thread, and its end
    closes them, which waits for the file to be flushed: about 2.6 ms and 1.6 ms of the
    driver's loop each (measured on the tiny workload of ``benchmarks/busy.py``, 2 cores),
    a few percent of a run of small units. Everything is on disk once ``run_finished``
    returns; an error writing is raised there. The writer's modules (about 0.16 s of CPU)
    are imported from the tracker's creation on, beside the run's preparation.
    """

    def __init__(self, logdir: str) -> None:
        if not available():
            raise ConfigError(
                "tensorboard",
                True,
                "the tensorboard package",
                hint="pip install cerebro[tensorboard]",
            )
        self.logdir = logdir
        self._writers: dict[int, Any] = {}
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # Begun now, while the experiment builds its models and starts its workers: imported
        # once the units run, it took ~0.6 ms of CPU per unit of the tiny workload of
        # benchmarks/busy.py from the workers (2 cores). An error importing is raised by the
        # writer's thread (run_finished) or the first direct call.
        self._importing = threading.Thread(
            target=_import_quietly, daemon=True, name="cerebro-tb-import"
        )
        self._importing.start()

    def run_started(self) -> None:
        self._error = None
        self._thread = threading.Thread(target=self._serve, daemon=True, name="cerebro-tb")
        self._thread.start()

    def _serve(self) -> None:
        self._importing.join()
        self._run(_import_writer)  # at once where the import above succeeded
        while (job := self._jobs.get()) is not None:
            self._run(job)

    def _run(self, job: Callable[[], None]) -> None:
        if self._error is None:  # after an error nothing more is written
            try:
                job()
            except BaseException as e:  # raised by run_finished, in the driver's thread
                self._error = e

    def _do(self, job: Callable[[], None]) -> None:
        if self._thread is None:  # outside a run (called directly): at once
            job()
        else:
            self._jobs.put(job)

    def _writer(self, model_id: int) -> Any:
        if model_id not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            # Its own thread writes the events every few seconds: flushing after each epoch
            # would cost ~5 ms a time.
            self._writers[model_id] = SummaryWriter(
                log_dir=os.path.join(self.logdir, f"model-{model_id:05d}"), flush_secs=_FLUSH_S
            )
        return self._writers[model_id]

    def epoch_ended(self, model_id: int, epoch: int, metrics: dict[str, float]) -> None:
        metrics = dict(metrics)  # the caller's may change before the job runs
        self._do(lambda: self._write_epoch(model_id, epoch, metrics))

    def _write_epoch(self, model_id: int, epoch: int, metrics: dict[str, float]) -> None:
        writer = self._writer(model_id)
        for name, value in metrics.items():
            split, _, metric = name.partition("_")
            writer.add_scalar(f"{metric}/{split}", value, epoch)

    def model_ended(
        self,
        model_id: int,
        status: ModelStatus,
        params: dict[str, Any],
        history: list[dict[str, float]],
    ) -> None:
        """Record the model's hyper-parameters against its last metrics, then close its run."""
        if status not in _HPARAMS_ON or not history:
            return
        params, metrics = dict(params), last_metrics(history)
        self._do(lambda: self._write_end(model_id, params, metrics))

    def _write_end(self, model_id: int, params: dict[str, Any], metrics: dict[str, float]) -> None:
        writer = self._writer(model_id)
        hparams = {
            k: v if isinstance(v, (int, float, str, bool)) else repr(v) for k, v in params.items()
        }
        scalars = {f"hparam/{k}": v for k, v in metrics.items()}
        # What SummaryWriter.add_hparams writes, but into the model's own run: add_hparams
        # opens (and closes) another writer with its own thread.
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        for summary in hparams_summaries(hparams, scalars):
            writer.file_writer.add_summary(summary)
        for name, value in scalars.items():
            writer.add_scalar(name, value)
        writer.close()
        del self._writers[model_id]

    def run_finished(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        error, self._error = self._error, None
        if error is not None:
            raise error
