"""TensorBoard logs: one run per model under ``<path>/tensorboard/``.

Each epoch adds the model's metrics as scalars (``loss/train``, ``accuracy/val``, ...); when the
model completes or fails, its hyper-parameters and last metrics go to TensorBoard's HParams tab.
View with ``tensorboard --logdir <path>/tensorboard``.
"""

from __future__ import annotations

import importlib.util
import os
import threading
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


def available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog(Tracker):
    """Writes scalars and HParams of each model (needs the ``tensorboard`` package)."""

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

    def run_started(self) -> None:
        # Importing tensorboard takes ~0.1 s: done now, beside the first units, it does not
        # hold up the driver's loop at the first epoch's end.
        threading.Thread(target=_import_writer, daemon=True, name="cerebro-tb-import").start()

    def _writer(self, model_id: int) -> Any:
        if model_id not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            # Its own thread writes the events every few seconds: flushing after each epoch
            # would cost the driver's loop ~5 ms a time.
            self._writers[model_id] = SummaryWriter(
                log_dir=os.path.join(self.logdir, f"model-{model_id:05d}"), flush_secs=_FLUSH_S
            )
        return self._writers[model_id]

    def epoch_ended(self, model_id: int, epoch: int, metrics: dict[str, float]) -> None:
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
        metrics = last_metrics(history)
        writer = self._writer(model_id)
        hparams = {
            k: v if isinstance(v, (int, float, str, bool)) else repr(v) for k, v in params.items()
        }
        scalars = {f"hparam/{k}": v for k, v in metrics.items()}
        # What SummaryWriter.add_hparams writes, but into the model's own run: add_hparams
        # opens (and closes) another writer with its own thread, ~2 ms of the driver's loop.
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        for summary in hparams_summaries(hparams, scalars):
            writer.file_writer.add_summary(summary)
        for name, value in scalars.items():
            writer.add_scalar(name, value)
        writer.close()
        del self._writers[model_id]

    def run_finished(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
