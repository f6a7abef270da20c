"""Which models may be trained together in one fused unit, decided from their built objects.

The fused runner (:mod:`cerebro.techniques.fused`) re-implements a model's forward pass, its
optimizer and its losses on tensors stacked over the group, so it can only take models made of
pieces it knows exactly. The user's ``build`` stays as it is: this module inspects what it built
and says either "these may share a unit" (an equal :attr:`Fusability.key`) or why not, in words
the records can show.

The key holds everything that must be the same across a group because the stacked computation
shares it: the layer structure and each layer's settings (shapes, strides, BatchNorm eps and
momentum, ...), parameter shapes and dtypes, batch size, how the loss is computed, the
optimizer's class and the flags that change its formulas (SGD's nesterov, whether momentum is
used at all; Adam's decoupled weight decay), the param groups and which parameters each holds,
and the metric names. Everything a member may hold on its own stays out of the key: its weights
and optimizer state, lr, weight_decay, momentum, dampening, betas, eps, dropout rates, its LR
scheduler (any kind, stepped per batch or per epoch) and its loss and metric functions when they
are called member by member.

Losses: ``nn.CrossEntropyLoss`` (no class weights, no label smoothing, reduction "mean" or
"sum") and ``F.cross_entropy`` are computed for the whole group at once; any other callable is
called on each member's own outputs and targets, which is exact whatever it does (a closure, a
loss with state), only slower.

Example:
    >>> import torch, cerebro
    >>> def build(lr):
    ...     model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
    ...                                 torch.nn.Linear(8, 2))
    ...     return cerebro.ModelSpec(model, torch.optim.SGD(model.parameters(), lr=lr),
    ...                              torch.nn.CrossEntropyLoss(), batch_size=16)
    >>> a, b = fusability(build(0.1)), fusability(build(0.01))
    >>> a.key == b.key, a.reason
    (True, None)
    >>> spec = build(0.1)
    >>> spec.optimizer = torch.optim.RMSprop(spec.model.parameters())
    >>> fusability(spec).reason
    'optimizer RMSprop is not supported (SGD, Adam, AdamW)'
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import ModelSpec

# Layers whose parameters are stacked and computed by the fused runner's own kernels.
PARAM_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
# Parameter-free layers that act on each element (or each channel of each row) alone: the fused
# runner calls them on the whole group's activations at once.
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.GELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.SiLU,
    nn.ELU,
    nn.Softplus,
    nn.Identity,
)
POOLING: tuple[type[nn.Module], ...] = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
SUPPORTED: tuple[type[nn.Module], ...] = (
    *PARAM_LAYERS,
    *ELEMENTWISE,
    *POOLING,
    nn.Dropout,
    nn.Flatten,
)
OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
)


@dataclass(frozen=True)
class Fusability:
    """Whether (and with which models) one model may be trained in a fused unit.

    Attributes:
        key: models with equal keys may train in one fused unit; None: this one cannot be fused.
        reason: why not, in words for the records (None when fusable).
        nbytes: estimated training memory of one member: weights, gradients, optimizer state and
            the activations kept for the backward pass at its batch size (0 when not fusable).
    """

    key: str | None
    reason: str | None
    nbytes: int

    @property
    def fusable(self) -> bool:
        return self.key is not None


@dataclass(frozen=True)
class BatchedLoss:
    """A loss the fused runner computes for the whole group in one call (cross-entropy)."""

    reduction: str  # "mean" or "sum"
    ignore_index: int


class NotFusable(Exception):
    """Raised inside this module with the reason a model cannot be fused."""


def fusability(spec: ModelSpec, input_shape: Sequence[int] | None = None) -> Fusability:
    """Whether ``spec`` can train in a fused unit, its group key, and its estimated memory.

    ``input_shape``: the shape of one input row (e.g. ``(1, 8, 8)``), for the activation part
    of ``nbytes``; without it, the smallest input the layers accept is assumed (the first
    Linear's width, or the smallest square image that reaches the end), which can underestimate
    a convolutional model's activations.
    """
    try:
        key, layers = group_key(spec)
    except NotFusable as e:
        return Fusability(key=None, reason=str(e), nbytes=0)
    return Fusability(key=key, reason=None, nbytes=_estimate_nbytes(spec, layers, input_shape))


def group_key(spec: ModelSpec) -> tuple[str, list[tuple[str, nn.Module]]]:
    """The key of :func:`fusability` and the model's layers, without the memory estimate;
    raises :class:`NotFusable`."""
    if spec.frozen is not None:
        raise NotFusable("it has a frozen prefix (ModelSpec.frozen), which the fused runner does "
                         "not run")  # fmt: skip
    layers = leaves(spec.model)
    description = (
        tuple(_layer_key(name, m) for name, m in layers),
        _params_key(spec.model, layers),
        spec.batch_size,
        _loss_key(spec.loss),
        _optimizer_key(spec),
        tuple(spec.metric_names()),
    )
    _check_scheduler(spec)
    return hashlib.sha256(repr(description).encode()).hexdigest()[:24], layers


def leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's layers in forward order, nested Sequentials flattened (``"2.1"`` is layer 1
    of layer 2). Raises :class:`NotFusable` for anything the fused runner cannot compute."""
    if type(model) is not nn.Sequential:
        raise NotFusable("model is not an nn.Sequential")
    out: list[tuple[str, nn.Module]] = []

    def walk(seq: nn.Module, prefix: str) -> None:
        _check_plain_forward(seq, prefix or "the model")
        for name, child in seq.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if type(child) is nn.Sequential:
                walk(child, path)
                continue
            if type(child) not in SUPPORTED:
                raise NotFusable(f"layer {path} ({type(child).__name__}) is not a supported layer")
            _check_plain_forward(child, f"layer {path} ({type(child).__name__})")
            out.append((path, child))

    walk(model, "")
    if not out:
        raise NotFusable("model has no layers")
    return out


def _check_plain_forward(module: nn.Module, what: str) -> None:
    if "forward" in vars(module):
        raise NotFusable(f"{what} has its forward replaced on the instance")
    hooks = (
        module._forward_hooks,
        module._forward_pre_hooks,
        module._backward_hooks,
        module._backward_pre_hooks,
        module._state_dict_hooks,
    )
    if any(hooks):
        raise NotFusable(f"{what} has hooks")
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        raise NotFusable("global module hooks are registered")


def _settings(module: nn.Module, skip: tuple[str, ...] = ()) -> tuple[tuple[str, str], ...]:
    """A module's public attributes (its constructor settings), for the key."""
    return tuple(
        sorted(
            (k, repr(v))
            for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and k not in skip
        )
    )


def _layer_key(path: str, m: nn.Module) -> tuple[Any, ...]:
    where = f"layer {path} ({type(m).__name__})"
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            raise NotFusable(f"{where} has groups={m.groups} (only 1 is supported)")
        if m.padding_mode != "zeros":
            raise NotFusable(f"{where} has padding_mode={m.padding_mode!r} (only 'zeros')")
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if not m.track_running_stats:
            raise NotFusable(f"{where} does not track running stats")
        if m.momentum is None:
            raise NotFusable(f"{where} has momentum=None (a cumulative average)")
    if isinstance(m, nn.MaxPool2d) and m.return_indices:
        raise NotFusable(f"{where} returns indices")
    if isinstance(m, nn.Dropout):
        return (type(m).__name__,)  # p is the member's own
    return (type(m).__name__, _settings(m))


def _params_key(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> tuple[Any, ...]:
    params = list(model.parameters())
    in_layers = [p for _, m in layers for p in m.parameters(recurse=False)]
    if len(in_layers) != len(params) or len({id(p) for p in in_layers}) != len(params):
        raise NotFusable("model shares a parameter between layers")
    for _, m in layers:
        for name, b in m.named_buffers(recurse=False):
            if b is not None and name not in ("running_mean", "running_var", "num_batches_tracked"):
                raise NotFusable(f"model has a buffer {name!r} the fused runner does not know")
    for p in params:
        if not p.dtype.is_floating_point:
            raise NotFusable(f"a parameter has dtype {p.dtype}")
    return tuple((tuple(p.shape), str(p.dtype), p.requires_grad) for p in params)


def batched_loss(loss: Callable[..., Any]) -> BatchedLoss | None:
    """How the fused runner can compute ``loss`` for the whole group at once, or None to call
    it on each member's outputs."""
    if loss is F.cross_entropy:
        return BatchedLoss("mean", -100)
    if (
        type(loss) is nn.CrossEntropyLoss
        and loss.weight is None
        and loss.label_smoothing == 0.0
        and loss.reduction in ("mean", "sum")
        and not loss._forward_hooks
        and not loss._forward_pre_hooks
        and "forward" not in vars(loss)
    ):
        return BatchedLoss(loss.reduction, loss.ignore_index)
    return None


def _loss_key(loss: Callable[..., Any]) -> tuple[Any, ...]:
    batched = batched_loss(loss)
    if batched is not None:
        return ("cross_entropy", batched.reduction, batched.ignore_index)
    return ("per-member",)


def _optimizer_key(spec: ModelSpec) -> tuple[Any, ...]:
    opt = spec.optimizer
    name = type(opt).__name__
    if type(opt) not in OPTIMIZERS:
        raise NotFusable(f"optimizer {name} is not supported (SGD, Adam, AdamW)")
    index = {id(p): i for i, p in enumerate(spec.model.parameters())}
    groups = []
    for g in opt.param_groups:
        for flag in ("maximize", "capturable", "differentiable", "amsgrad"):
            if g.get(flag):
                raise NotFusable(f"optimizer {name} with {flag}=True is not supported")
        for hyper in ("lr", "weight_decay", "momentum", "dampening", "eps"):
            if isinstance(g.get(hyper), torch.Tensor):
                raise NotFusable(f"optimizer {name} has {hyper} as a tensor (floats only)")
        if any(isinstance(b, torch.Tensor) for b in g.get("betas", ())):
            raise NotFusable(f"optimizer {name} has betas as tensors (floats only)")
        members = tuple(index[id(p)] for p in g["params"])
        if isinstance(opt, torch.optim.SGD):
            flags: tuple[Any, ...] = (bool(g["nesterov"]), g["momentum"] != 0)
        else:
            flags = (bool(g.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW))),)
        groups.append((members, flags))
    if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        name = "Adam"  # AdamW is Adam with decoupled weight decay: the flag above tells them apart
    return (name, tuple(groups))


def _check_scheduler(spec: ModelSpec) -> None:
    sched = spec.lr_scheduler
    if sched is None:
        return
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise NotFusable("LR scheduler ReduceLROnPlateau is not supported (it needs a metric)")
    if not isinstance(sched, torch.optim.lr_scheduler.LRScheduler):
        raise NotFusable(f"LR scheduler {type(sched).__name__} is not a torch LRScheduler")
    if sched.optimizer is not spec.optimizer:
        raise NotFusable("LR scheduler drives another optimizer than the spec's")


def _estimate_nbytes(
    spec: ModelSpec, layers: list[tuple[str, nn.Module]], input_shape: Sequence[int] | None
) -> int:
    params = list(spec.model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    buffers = sum(b.numel() * b.element_size() for b in spec.model.buffers())
    state_copies = 1 if isinstance(spec.optimizer, torch.optim.SGD) else 2
    element = params[0].element_size() if params else 4
    activations = _activation_elements(layers, input_shape) * spec.batch_size * element
    return weights * (2 + state_copies) + buffers + activations


def _activation_elements(
    layers: list[tuple[str, nn.Module]], input_shape: Sequence[int] | None
) -> int:
    """Elements per row of the input and of every layer's output (what backward keeps, about),
    found by running the layers on meta tensors."""
    candidates: list[tuple[int, ...]]
    if input_shape is not None:
        candidates = [tuple(input_shape)]
    else:
        first = next((m for _, m in layers if isinstance(m, (nn.Linear, nn.Conv2d))), None)
        if isinstance(first, nn.Linear):
            candidates = [(first.in_features,)]
        elif isinstance(first, nn.Conv2d):
            candidates = [(first.in_channels, s, s) for s in range(1, 257)]
        else:
            return 0
    for shape in candidates:
        try:
            return _meta_forward(layers, shape)
        except (RuntimeError, ValueError):
            continue
    return 0


def _meta_forward(layers: list[tuple[str, nn.Module]], shape: tuple[int, ...]) -> int:
    x = torch.empty((2, *shape), device="meta")
    total = math.prod(shape)
    for _, m in layers:
        if isinstance(m, nn.Linear):
            x = F.linear(x, torch.empty(m.weight.shape, device="meta"))
        elif isinstance(m, nn.Conv2d):
            weight = torch.empty(m.weight.shape, device="meta")
            x = F.conv2d(x, weight, None, m.stride, m.padding, m.dilation)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if x.shape[1] != m.num_features:
                raise ValueError("BatchNorm width")
        elif not isinstance(m, nn.Dropout):
            x = m(x)
        total += math.prod(x.shape[1:])
    return total
