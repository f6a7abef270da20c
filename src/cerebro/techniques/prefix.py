"""Frozen prefixes: cutting a pre-trained backbone, running its frozen layers, and naming each cut
by what it computes.

A spec's ``frozen`` module never trains, so its output for a row never changes: it can be
computed once per shard and reused by every configuration and epoch. What names that output is
the *chain*: one digest per depth of the prefix, each covering the layers up to it (their types,
settings and weights). Two configurations that cut the same backbone at depths 2 and 3 share the
chain's first two digests, so depth 3's features can be computed from depth 2's.

Example:
    >>> import torch
    >>> from torch import nn
    >>> backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    >>> frozen, rest = cut(backbone, 2)
    >>> frozen
    Sequential(
      (0): Linear(in_features=4, out_features=8, bias=True)
      (1): ReLU()
    )
    >>> [p.requires_grad for p in frozen.parameters()]
    [False, False]
    >>> deeper, _ = cut(backbone, 3)
    >>> chain(deeper)[:2] == chain(frozen)
    True
    >>> run_frozen(frozen, torch.zeros(5, 4)).shape
    torch.Size([5, 8])
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..errors import ConfigError

# Rows per forward pass when a prefix's output is computed for a whole shard: a fixed number, so
# the features do not depend on the shard's size or on who computes them.
FEATURE_ROWS = 256


def cut(backbone: nn.Module, depth: int) -> tuple[nn.Sequential | None, nn.Sequential]:
    """Split a pre-trained ``nn.Sequential`` into (frozen prefix, trainable rest) at ``depth``.

    The prefix holds the first ``depth`` layers with ``requires_grad`` off (None for depth 0:
    everything trains); the rest holds the others and trains. They share the backbone's modules
    (no copy), so build a fresh backbone per configuration, as ``build`` does anyway. Use
    ``ModelSpec(model=nn.Sequential(rest, head), frozen=prefix, ...)`` with an optimizer over
    the trainable part only.

    A torchvision network is not an ``nn.Sequential`` (its forward flattens before the
    classifier): make it one first, e.g. for a ResNet
    ``nn.Sequential(*list(resnet.children())[:-1], nn.Flatten())``.

    Example:
        >>> from torch import nn
        >>> frozen, rest = cut(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), 1)
        >>> len(frozen), len(rest)
        (1, 1)
        >>> cut(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), 2)
        Traceback (most recent call last):
        ...
        cerebro.errors.ConfigError: depth=2 is not accepted: expected an integer from 0 to 1 \
(the backbone has 2 layers; the rest must keep one to train)
    """
    if not isinstance(backbone, nn.Sequential):
        raise ConfigError(
            "backbone",
            type(backbone).__name__,
            "an nn.Sequential (make one of a network's layers in forward order)",
        )
    layers = list(backbone.children())
    last = len(layers) - 1
    if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= last:
        raise ConfigError(
            "depth",
            depth,
            f"an integer from 0 to {last} (the backbone has {len(layers)} layers; the rest must "
            "keep one to train)",
        )
    rest = nn.Sequential(*layers[depth:])
    if depth == 0:
        return None, rest
    prefix = nn.Sequential(*layers[:depth])
    prefix.requires_grad_(False)
    prefix.eval()
    return prefix, rest


def layers_of(frozen: nn.Module) -> list[nn.Module]:
    """The prefix's layers, one per depth of its chain: an ``nn.Sequential``'s children, or the
    module as one layer."""
    if type(frozen) is nn.Sequential and len(frozen) > 0:
        return list(frozen.children())
    return [frozen]


def chain(frozen: nn.Module) -> tuple[str, ...]:
    """One digest per depth of ``frozen``: depth ``d``'s covers layers ``0..d-1`` (class,
    settings, and every parameter's and buffer's bytes), so equal digests compute equal outputs.
    """
    digests = []
    running = hashlib.blake2b(digest_size=16)
    for layer in layers_of(frozen):
        running.update(f"{type(layer).__module__}.{type(layer).__qualname__}".encode())
        running.update(repr(layer).encode())
        for name, tensor in layer.state_dict().items():
            data = tensor.detach().to("cpu").contiguous()
            running.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
            running.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        digests.append(running.copy().hexdigest())
    return tuple(digests)


def run_frozen(frozen: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The frozen prefix's output for ``inputs``: eval mode, no gradients."""
    frozen.eval()
    with torch.no_grad():
        return frozen(inputs)


def run_layers(layers: list[nn.Module], inputs: torch.Tensor) -> torch.Tensor:
    """``layers`` applied in order to every row of ``inputs``, FEATURE_ROWS rows at a time (eval
    mode, no gradients)."""
    if not layers:
        return inputs
    for layer in layers:
        layer.eval()
    out = []
    with torch.no_grad():
        for start in range(0, max(len(inputs), 1), FEATURE_ROWS):  # an empty shard: one pass
            x = inputs[start : start + FEATURE_ROWS]
            for layer in layers:
                x = layer(x)
            out.append(x)
    return torch.cat(out)
