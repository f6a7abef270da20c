"""``ModelSpec``: what a user's ``build(params)`` returns, in plain PyTorch objects."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError, check_int

MetricFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_METRIC_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclass
class ModelSpec:
    """One configuration, ready to train: an ordinary module, optimizer and loss.

    Args:
        model: any ``torch.nn.Module``.
        optimizer: a ``torch.optim.Optimizer`` over ``model``'s parameters.
        loss: ``loss(outputs, targets) -> scalar tensor``, a mean over the batch's rows.
        batch_size: rows per SGD step.
        metrics: name -> ``fn(outputs, targets) -> scalar tensor``, each a mean over rows (such as
            :func:`cerebro.metrics.accuracy`). Reported as ``train_<name>`` and ``val_<name>``,
            weighted exactly by rows over the whole split.
        lr_scheduler: optional ``torch.optim.lr_scheduler`` object over ``optimizer``.
        lr_scheduler_interval: ``"epoch"`` (step once after each epoch) or ``"batch"``.
        frozen: optional module applied to the inputs before ``model``, in eval mode and without
            gradients, never trained (a pre-trained backbone's first layers, say; see
            :func:`cerebro.cut`). Its output is what ``model`` trains on, so Cerebro may compute
            it once per shard and reuse it (``Experiment(materialize=...)``). ``build`` must give
            the same frozen weights every time it is called (load them from a file).

    Example:
        >>> import torch, cerebro
        >>> model = torch.nn.Linear(4, 2)
        >>> spec = cerebro.ModelSpec(model=model,
        ...                          optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        ...                          loss=torch.nn.CrossEntropyLoss(), batch_size=32,
        ...                          metrics={"accuracy": cerebro.metrics.accuracy})
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[Any, Any], torch.Tensor]
    batch_size: int
    metrics: dict[str, MetricFn] = field(default_factory=dict)
    lr_scheduler: Any = None
    lr_scheduler_interval: str = "epoch"
    frozen: torch.nn.Module | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ConfigError for a field that cannot be trained with. Run when the spec is made
        and again before its first training step, since ``build`` may replace a field after.
        """
        if not isinstance(self.model, torch.nn.Module):
            raise ConfigError("ModelSpec.model", self.model, "a torch.nn.Module")
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise ConfigError("ModelSpec.optimizer", self.optimizer, "a torch.optim.Optimizer")
        if not callable(self.loss):
            raise ConfigError("ModelSpec.loss", self.loss, "a callable loss(outputs, targets)")
        self.batch_size = check_int("ModelSpec.batch_size", self.batch_size, minimum=1)
        if not isinstance(self.metrics, dict):
            raise ConfigError("ModelSpec.metrics", self.metrics, "a dict of name -> callable")
        for name, fn in self.metrics.items():
            if not isinstance(name, str) or not _METRIC_NAME.match(name) or name == "loss":
                raise ConfigError(
                    "ModelSpec.metrics key",
                    name,
                    "an identifier other than 'loss' (e.g. 'accuracy')",
                )
            if not callable(fn):
                raise ConfigError(f"ModelSpec.metrics[{name!r}]", fn, "a callable")
        if self.lr_scheduler_interval not in ("epoch", "batch"):
            raise ConfigError(
                "ModelSpec.lr_scheduler_interval", self.lr_scheduler_interval, "'epoch' or 'batch'"
            )
        if self.lr_scheduler is not None and not hasattr(self.lr_scheduler, "state_dict"):
            raise ConfigError(
                "ModelSpec.lr_scheduler", self.lr_scheduler, "a torch.optim.lr_scheduler object"
            )
        if self.frozen is not None and not isinstance(self.frozen, torch.nn.Module):
            raise ConfigError(
                "ModelSpec.frozen", self.frozen, "a torch.nn.Module (applied before model), or None"
            )
        frozen_params = set() if self.frozen is None else {id(p) for p in self.frozen.parameters()}
        model_params = {id(p) for p in self.model.parameters()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) in frozen_params and id(p) not in model_params:
                    raise ConfigError(
                        "ModelSpec.optimizer",
                        type(self.optimizer).__name__,
                        "an optimizer over ModelSpec.model's parameters only",
                        hint="it holds parameters of ModelSpec.frozen, which never train: "
                        "build it over model.parameters()",
                    )
                if id(p) not in model_params:
                    raise ConfigError(
                        "ModelSpec.optimizer",
                        type(self.optimizer).__name__,  # its repr spans many lines
                        "an optimizer built over this spec's model.parameters()",
                        hint="it holds a tensor that is not a parameter of ModelSpec.model",
                    )

    def to(self, device: torch.device | str) -> ModelSpec:
        """Move the model (and the frozen prefix) to ``device``; returns the spec."""
        self.model.to(device)
        if self.frozen is not None:
            self.frozen.to(device)
        return self

    def metric_names(self) -> list[str]:
        """Names reported per split: ``loss`` and each metric."""
        return ["loss", *self.metrics]
