"""Whether a built model can train fused with others, decided from its objects alone.

The fused runner (:mod:`cerebro.techniques.fused`) stacks the parameters of K models and runs
one batched forward and backward for all of them, so the models must agree on everything that
shapes the computation: the layers and their shapes, the batch size, the optimizer's class and
the flags that change its formula. What may differ per model is everything the fused runner
applies per member: learning rate, weight decay, momentum, dampening, betas, eps, dropout rates,
the LR scheduler, the loss and the metrics (called on each member's own outputs), initial weights
and optimizer state.

Supported today: an ``nn.Sequential`` (nested ones too) of ``Linear``, ``Flatten``, ``Dropout``
and parameter-free activations, trained by SGD, Adam or AdamW. Convolutions and BatchNorm are
not fused yet: a model holding one trains alone and its ``not_fused`` event says so.

Example:
    >>> import torch, cerebro
    >>> def spec(lr, width=32):
    ...     model = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.ReLU(),
    ...                                 torch.nn.Linear(width, 2))
    ...     return cerebro.ModelSpec(model=model, optimizer=torch.optim.Adam(model.parameters(),
    ...                              lr=lr), loss=torch.nn.CrossEntropyLoss(), batch_size=16)
    >>> fusability(spec(0.1)).key == fusability(spec(0.01)).key
    True
    >>> fusability(spec(0.1)).key == fusability(spec(0.1, width=64)).key
    False
    >>> model = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3))
    >>> fusability(cerebro.ModelSpec(model=model, optimizer=torch.optim.SGD(
    ...     model.parameters(), lr=0.1), loss=torch.nn.MSELoss(), batch_size=4)).reason
    ... # doctest: +NORMALIZE_WHITESPACE
    'layer 0 (Conv1d) is not a layer the fused runner supports (Linear, Flatten, Dropout,
    activations)'
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..spec import ModelSpec

# Layers without parameters that act on each row alone: run on all members' rows at once.
ELEMENTWISE = (
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
OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


@dataclass(frozen=True)
class Fusability:
    """Whether a model can be fused, with which others, and what one member costs.

    Attributes:
        key: models with equal keys may train in one fused unit; None: it cannot be fused.
        reason: why not, for the records (None when it can).
        nbytes: estimated training memory of one member: weights, gradients, optimizer state
            and activations at its batch size.
    """

    key: str | None
    reason: str | None
    nbytes: int


def leaf_layers(model: nn.Module) -> list[nn.Module] | str:
    """The layers a Sequential applies in order (nested Sequentials unrolled), or why the
    model is not such a chain."""
    if type(model) is not nn.Sequential:
        return f"the model is a {type(model).__name__}, not an nn.Sequential"
    layers: list[nn.Module] = []
    for module in model.modules():
        if "forward" in vars(module):
            return f"{type(module).__name__}.forward was replaced on the object"
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
            return f"{type(module).__name__} has hooks"
    for module in _unrolled(model):
        layers.append(module)
    return layers


def _unrolled(model: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []
    for child in model.children():
        out += _unrolled(child) if type(child) is nn.Sequential else [child]
    return out


def _layer_key(index: int, layer: nn.Module) -> str:
    """What must match in layer ``index`` across a group; raises ValueError if unsupported."""
    if type(layer) is nn.Linear:
        return f"Linear({layer.in_features},{layer.out_features},{layer.bias is not None})"
    if type(layer) is nn.Flatten:
        if layer.start_dim != 1 or layer.end_dim != -1:
            raise ValueError(f"layer {index} (Flatten) flattens other dimensions than 1..-1")
        return "Flatten"
    if type(layer) is nn.Dropout:
        return "Dropout"  # its rate is a member's own
    if type(layer) in ELEMENTWISE:
        return repr(layer)  # e.g. LeakyReLU(negative_slope=0.01): settings are shared
    raise ValueError(
        f"layer {index} ({type(layer).__name__}) is not a layer the fused runner supports "
        "(Linear, Flatten, Dropout, activations)"
    )


def _optimizer_key(spec: ModelSpec) -> str:
    optimizer = spec.optimizer
    kind = type(optimizer)
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer {kind.__name__} is not supported (SGD, Adam, AdamW)")
    params = [id(p) for p in spec.model.parameters()]
    groups = []
    for group in optimizer.param_groups:
        for flag in ("maximize", "differentiable", "capturable", "amsgrad"):
            if group.get(flag):
                raise ValueError(f"{kind.__name__}({flag}=True) is not supported")
        if group.get("fused"):
            raise ValueError(f"{kind.__name__}(fused=True) is not supported")
        if any(isinstance(v, torch.Tensor) for k, v in group.items() if k != "params"):
            raise ValueError(f"{kind.__name__} with tensor hyper-parameters is not supported")
        shared = ""
        if kind is torch.optim.SGD:
            shared = f"momentum={group['momentum'] != 0},nesterov={group['nesterov']}"
        elif kind is torch.optim.Adam:
            shared = f"decoupled={group.get('decoupled_weight_decay', False)}"
        groups.append(f"[{','.join(str(params.index(id(p))) for p in group['params'])}]{shared}")
    return f"{kind.__name__}:{';'.join(groups)}"


def fusability(spec: ModelSpec) -> Fusability:
    """Whether ``spec``'s model can train fused, and its fusion key (see the module)."""
    layers = leaf_layers(spec.model)
    if isinstance(layers, str):
        return Fusability(None, layers, 0)
    try:
        parts = [_layer_key(i, layer) for i, layer in enumerate(layers)]
        parts.append(_optimizer_key(spec))
    except ValueError as e:
        return Fusability(None, str(e), 0)
    scheduler = spec.lr_scheduler
    schedulers = torch.optim.lr_scheduler
    if scheduler is not None and (
        not isinstance(scheduler, schedulers.LRScheduler)
        or isinstance(scheduler, schedulers.ReduceLROnPlateau)  # it steps on a metric
    ):
        return Fusability(None, f"LR scheduler {type(scheduler).__name__} is not supported", 0)
    dtypes = {p.dtype for p in spec.model.parameters()}
    parts += [f"batch={spec.batch_size}", f"interval={spec.lr_scheduler_interval}", str(dtypes)]
    weights = sum(p.numel() * p.element_size() for p in spec.model.parameters())
    widths = sum(layer.out_features for layer in layers if isinstance(layer, nn.Linear))
    activations = 4 * spec.batch_size * widths * 3  # outputs, their gradients, masks
    return Fusability("|".join(parts), None, 4 * weights + activations)
