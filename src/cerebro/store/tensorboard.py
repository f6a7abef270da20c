"""TensorBoard logs: one run per model under ``<path>/tensorboard/``.

Each epoch adds the model's metrics as scalars (``loss/train``, ``accuracy/val``, ...); when the
model completes or fails, its hyper-parameters and last metrics go to TensorBoard's HParams tab.
View with ``tensorboard --logdir <path>/tensorboard``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from ..errors import ConfigError


def available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog:
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

    def _writer(self, model_id: int) -> Any:
        if model_id not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[model_id] = SummaryWriter(
                log_dir=os.path.join(self.logdir, f"model-{model_id:05d}")
            )
        return self._writers[model_id]

    def epoch(self, model_id: int, epoch: int, metrics: dict[str, float]) -> None:
        writer = self._writer(model_id)
        for name, value in metrics.items():
            split, _, metric = name.partition("_")
            writer.add_scalar(f"{metric}/{split}", value, epoch)
        writer.flush()

    def finish(self, model_id: int, params: dict[str, Any], metrics: dict[str, float]) -> None:
        """Record the model's hyper-parameters against its last metrics, then close its run."""
        writer = self._writer(model_id)
        hparams = {
            k: v if isinstance(v, (int, float, str, bool)) else repr(v) for k, v in params.items()
        }
        writer.add_hparams(hparams, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")
        writer.close()
        del self._writers[model_id]

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
