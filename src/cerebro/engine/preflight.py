"""Preflight: one trial training step of each configuration, on the driver, before it trains.

A build can return a spec that ``ModelSpec`` accepts but that cannot train: a loss that returns
one value per row, a metric that raises, a model whose input size does not match the data. Found
by the workers, each such mistake fails every model with a raw torch error. The driver instead
runs one forward, loss, backward and optimizer step, and every metric, on a few real training
rows, on a copy of each newly built spec, and raises a :class:`~cerebro.ConfigError` that names
the argument, the configuration and the fix. It also checks that the copy's state after that
step reads back as a worker reads it: a value of another class in a ``state_dict()`` would
otherwise fail every model at its first hop.

Every configuration is checked, not one per model structure: a key built from modules, shapes
and batch size cannot see what decides the code path (a forward replaced on the instance, a
loss's ``reduction`` that its repr does not show, a metric chosen by a parameter), and one step
on at most 8 rows costs little next to training (tens of milliseconds for a small MLP). It runs
where the build put the model: on CPU, unless the build placed it on a device itself.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from .. import training
from ..data import Dataset, Shard
from ..errors import ConfigError, first_line
from ..spec import ModelSpec
from ..techniques.prefix import run_frozen

TRIAL_ROWS = 8  # rows of the trial batch (fewer if the batch size is smaller)
SAMPLE_ROWS = 128  # rows kept for the trial and for profiling frozen prefixes


class Preflight:
    """Checks each configuration with one trial step on the first rows of the largest training
    shard.

    Args:
        dataset: the experiment's data; one training shard is read, on the first check.
        build: the experiment's ``build``, used only for a spec that cannot be deep-copied.

    Example:
        >>> import cerebro, torch
        >>> def build(params):
        ...     model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        ...     return cerebro.ModelSpec(model=model,
        ...                              optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        ...                              loss=torch.nn.CrossEntropyLoss(reduction="none"),
        ...                              batch_size=32)
        >>> Preflight(ds, build).check(build({}), {"lr": 0.1})     # doctest: +SKIP
        Traceback (most recent call last):
        ...
        cerebro.errors.ConfigError: loss=CrossEntropyLoss() is not accepted: expected a loss ...
    """

    def __init__(self, dataset: Dataset, build: Callable[[dict[str, Any]], ModelSpec]) -> None:
        self.dataset = dataset
        self.build = build
        self._rows: Shard | None = None

    def check(self, spec: ModelSpec, params: dict[str, Any]) -> None:
        """Raise ConfigError, naming ``params``, if ``spec`` cannot train one step.

        ``spec`` itself is left as it was: weights, optimizer state and torch's random state
        (the model's initial state may already have been captured from it).
        """
        try:
            spec.check()  # build may have replaced a field after ModelSpec() checked it
            with torch.random.fork_rng(devices=[]):  # dropout in the trial draws random numbers
                rows = self.sample()
                trial = self._trial_copy(spec, params)
                trial_step(trial, Shard(rows.x[:TRIAL_ROWS], rows.y[:TRIAL_ROWS]))
                state_reads_back(trial)
        except ConfigError as e:
            raise naming(e, params) from e.__cause__  # the user's code that raised, if any

    def sample(self) -> Shard:
        """Up to SAMPLE_ROWS rows of the dataset's largest training shard (read once)."""
        if self._rows is None:
            sizes = self.dataset.shard_rows("train")
            biggest = max(range(len(sizes)), key=sizes.__getitem__)
            shard = self.dataset.load_shard("train", biggest)
            # Copies: the rest of the shard is not kept in the driver's memory.
            self._rows = Shard(shard.x[:SAMPLE_ROWS].clone(), shard.y[:SAMPLE_ROWS].clone())
        return self._rows

    def _trial_copy(self, spec: ModelSpec, params: dict[str, Any]) -> ModelSpec:
        """A copy of ``spec`` that shares no tensor with it, to train on."""
        try:
            # One call, so the copied optimizer and LR scheduler hold the copied weights.
            return copy.deepcopy(spec)
        except Exception:  # e.g. a module that holds a lock: a fresh build serves as well
            torch.manual_seed(0)  # inside the caller's fork_rng
            return self.build(dict(params))


def naming(error: ConfigError, params: dict[str, Any]) -> ConfigError:
    """``error`` again, saying which configuration it is about.

    >>> str(naming(ConfigError("batch_size", 0, "an integer >= 1"), {"lr": 0.1}))
    "batch_size=0 is not accepted: expected an integer >= 1 (configuration {'lr': 0.1})"
    """
    where = f"configuration {params!r}"
    hint = f"{where}: {error.hint}" if error.hint else where
    return ConfigError(error.argument, error.value, error.accepted, hint=hint)


def trial_step(spec: ModelSpec, rows: Shard) -> None:
    """One training step of ``spec`` (which it changes) on the first ``batch_size`` of ``rows``,
    then every metric; raises ConfigError for the part of the spec that fails."""
    size = min(spec.batch_size, rows.rows)
    device = next(spec.model.parameters(), torch.empty(0)).device
    inputs, targets = rows.x[:size].to(device), rows.y[:size].to(device)
    spec.model.train()
    if spec.frozen is not None:
        inputs = _frozen_forward(spec.frozen, inputs)
        outputs = _forward(spec.model, inputs, after_prefix=True)
    else:
        outputs = _forward(spec.model, inputs)
    loss = _loss(spec.loss, outputs, targets)
    _backward_and_step(spec, loss)
    with torch.no_grad():  # as training computes them
        for name, fn in spec.metrics.items():
            _metric(name, fn, outputs.detach(), targets)


def state_reads_back(spec: ModelSpec) -> None:
    """Raise ConfigError where ``spec``'s training state (after a step: an optimizer makes its
    state then) holds a value a worker could write but not read back: the model would fail at
    its first hop to another worker."""
    device = next(spec.model.parameters(), torch.empty(0)).device
    where = training.unreadable_part(training.capture_state(spec, {}, device))
    if where is None:
        return
    part, *keys, kind = where
    owner = {"model": spec.model, "optimizer": spec.optimizer, "lr_scheduler": spec.lr_scheduler}
    named = {"model": "a model", "optimizer": "an optimizer", "lr_scheduler": "an LR scheduler"}
    raise ConfigError(
        part,
        _shown(owner.get(part)),
        f"{named.get(part, part)} whose state_dict() holds tensors, numbers, strings, and "
        "lists, tuples and dicts of them (a worker reads each state back with "
        "torch.load(weights_only=True), which creates no object of another class)",
        hint=f"state_dict(){''.join(f'[{k!r}]' for k in keys)} is a {kind}",
    )


def _frozen_forward(frozen: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    try:
        return run_frozen(frozen, inputs)
    except Exception as e:
        raise ConfigError(
            "ModelSpec.frozen",
            _shown(frozen),
            "a frozen module whose forward takes a batch of the dataset's rows",
            hint=f"the dataset's feature shape is {tuple(inputs.shape[1:])} per row; "
            f"forward raised {_described(e)}",
        ) from e


def _forward(
    model: torch.nn.Module, inputs: torch.Tensor, after_prefix: bool = False
) -> torch.Tensor:
    try:
        outputs = model(inputs)
    except Exception as e:
        if after_prefix:
            raise ConfigError(
                "ModelSpec.model",
                _shown(model),
                "a model whose forward takes the frozen prefix's output",
                hint=f"the frozen prefix's output has shape {tuple(inputs.shape[1:])} per row"
                f"{_expected_input(model)}; forward raised {_described(e)}",
            ) from e
        raise ConfigError(
            "model",
            _shown(model),
            "a model whose forward takes a batch of the dataset's rows",
            hint=f"a batch of {len(inputs)} rows has inputs of shape {tuple(inputs.shape)}, "
            f"the dataset's feature shape {tuple(inputs.shape[1:])} per row; "
            f"forward raised {_described(e)}",
        ) from e
    if not isinstance(outputs, torch.Tensor):
        raise ConfigError(
            "model",
            _shown(model),
            "a model whose forward returns one tensor",
            hint=f"it returned {type(outputs).__name__}",
        )
    return outputs


def _expected_input(model: torch.nn.Module) -> str:
    """What the model's first layer takes, in words (", the model's first layer ... takes
    ..."), when it says so (a Linear's in_features, a convolution's in_channels)."""
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear):
            return f", the model's first layer {name} (Linear) takes {layer.in_features} features"
        if isinstance(layer, torch.nn.modules.conv._ConvNd):
            kind = type(layer).__name__
            return f", the model's first layer {name} ({kind}) takes {layer.in_channels} channels"
    return ""


def _loss(loss_fn: Callable[..., Any], outputs: torch.Tensor, targets: torch.Tensor) -> Any:
    try:
        loss = loss_fn(outputs, targets)
    except Exception as e:
        raise ConfigError(
            "loss",
            _shown(loss_fn),
            "loss(outputs, targets) that takes the model's outputs and the dataset's targets",
            hint=f"outputs {_tensor_kind(outputs)}, targets {_tensor_kind(targets)}; "
            f"it raised {_described(e)}",
        ) from e
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ConfigError(
            "loss",
            _shown(loss_fn),
            "a loss that returns a scalar tensor, the mean over the batch's rows",
            hint=f"{_returned(loss, len(targets))}; use reduction='mean' (or return .mean())",
        )
    return loss


def _backward_and_step(spec: ModelSpec, loss: torch.Tensor) -> None:
    spec.optimizer.zero_grad(set_to_none=True)
    steps: list[tuple[Callable[[], Any], str, Any, str]] = [
        (loss.backward, "loss", spec.loss, "a loss that backward() differentiates through the"),
        (spec.optimizer.step, "optimizer", spec.optimizer, "an optimizer whose step() updates"),
    ]
    for call, argument, given, accepted in steps:
        try:
            call()
        except Exception as e:
            raise ConfigError(
                argument,
                _shown(given),
                f"{accepted} model's parameters",
                hint=f"{call.__name__} raised {_described(e)}",
            ) from e


def _metric(
    name: str, fn: Callable[..., Any], outputs: torch.Tensor, targets: torch.Tensor
) -> None:
    argument = f"metrics[{name!r}]"
    accepted = "fn(outputs, targets) -> a scalar tensor, the mean over the batch's rows"
    try:
        value = torch.as_tensor(fn(outputs, targets)).double()
    except Exception as e:
        raise ConfigError(
            argument,
            _shown(fn),
            accepted,
            hint=f"on outputs {_tensor_kind(outputs)} and targets {_tensor_kind(targets)} "
            f"it raised {_described(e)}",
        ) from e
    if value.dim() != 0:
        raise ConfigError(
            argument, _shown(fn), accepted, hint=f"{_returned(value, len(targets))}; return .mean()"
        )


def _returned(value: Any, rows: int) -> str:
    """What a loss or metric returned instead of a scalar tensor."""
    if not isinstance(value, torch.Tensor):
        return f"it returned {type(value).__name__}"
    shape = tuple(value.shape)
    if value.numel() == rows and rows > 1:
        return f"it returned shape {shape} for a batch of {rows} rows: one value per row"
    return f"it returned shape {shape}"


def _tensor_kind(tensor: torch.Tensor) -> str:
    return f"of shape {tuple(tensor.shape)} and dtype {tensor.dtype}"


def _described(error: Exception) -> str:
    return f"{type(error).__name__}: {first_line(error)}"


def _shown(obj: Any) -> Any:
    """``obj`` for a message, or its type's name if its repr spans lines (modules, optimizers)."""
    return type(obj).__name__ if "\n" in repr(obj) else getattr(obj, "__name__", obj)
