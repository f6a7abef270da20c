"""The fused runner: a group of models of one shape trained as one, with stacked tensors.

Small models leave a device (and, on a CPU, Python itself) idle: each step of a 26k-parameter
MLP is a few microseconds of arithmetic behind a few hundred of framework overhead. Stacking K
such models' parameters into ``[K, ...]`` tensors runs one kernel per layer for the whole group
(``baddbmm`` for Linear, one optimizer update per parameter tensor), so the overhead is paid
once per step instead of K times.

What each member learns must not change (DESIGN.md: a model trained by hops equals the model
trained in one process). So every member keeps everything of its own, exactly as
:func:`cerebro.training.run_train_hop` would use it:

- its row order (``randperm`` seeded by its shuffle seed: its own batches, not a shared one);
- its dropout masks, drawn from its own random stream with the call ``F.dropout`` makes on a
  CPU (``bernoulli_(1 - p)`` of the input's shape), so they are bit-identical to a plain hop;
- its optimizer hyper-parameters, read from its own ``optimizer.param_groups`` before every
  step (its own LR scheduler changes them), applied with torch.optim's formulas as ``[K]``
  tensors;
- its losses: the per-member losses ``L[k]`` are summed and ``L.sum().backward()`` gives each
  member exactly its own gradient (no parameter is shared, so no cross terms).

At the end of a hop everything is written back into each member's own objects (parameters,
BatchNorm buffers, ``optimizer.state`` in torch's exact format), so a member's state is the one
per-model format and it may continue unfused at any epoch boundary.

Measured choices (``benchmarks/fusion.py``, torch 2.13): on a CPU a convolution and a
BatchNorm are computed per member (a grouped convolution over ``[B, K*C, H, W]`` was no faster
here and rounds differently, and BatchNorm folded into channels has a backward that rounds
differently, so a member's result would depend on its group); on CUDA both are one kernel for
the group (grouped convolution, BatchNorm over ``K*C`` channels), equal to float32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import metrics as metrics_module
from ..data import Shard
from ..errors import ModelFailed
from ..training import HopStats
from .base import MemberSeeds, ModelInHand, Outcome, Runner
from .fusable import (
    ELEMENTWISE,
    POOLING,
    BatchedLoss,
    NotFusable,
    batched_loss,
    group_key,
    leaves,
)


class FusedRunner(Runner):
    """Trains and evaluates a group of models with equal :func:`~.fusable.fusability` keys as
    one model of stacked tensors; each member's result is the one it would get alone.

    Example:
        >>> FusedRunner().check(0)
        Traceback (most recent call last):
        ...
        ValueError: the fused runner needs at least one model, not 0
    """

    def check(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"the fused runner needs at least one model, not {size}")

    def train(
        self,
        models: list[ModelInHand],
        seeds: list[MemberSeeds],
        shard: Shard,
        device: torch.device,
        end_of_epoch: bool,
    ) -> list[Outcome]:
        self.check(len(models))
        group = _Group.of(models, device)
        rngs = [_MemberRng.of(m, s, device) for m, s in zip(models, seeds, strict=True)]
        return group.train_hop(rngs, seeds, shard, end_of_epoch)

    def evaluate(
        self, models: list[ModelInHand], shard: Shard, device: torch.device
    ) -> list[Outcome]:
        self.check(len(models))
        return _Group.of(models, device).eval_hop(shard)


def check_group(models: list[ModelInHand]) -> None:
    """Raise ValueError unless every member is fusable with the same key."""
    keys = {}
    for m in models:
        try:
            keys[m.model_id], _ = group_key(m.spec)
        except NotFusable as e:
            raise ValueError(f"model {m.model_id} cannot be fused: {e}") from None
    if len(set(keys.values())) > 1:
        first = models[0].model_id
        other = [i for i, k in keys.items() if k != keys[first]]
        raise ValueError(
            f"models {sorted(keys)} cannot be fused together: models {other} differ from "
            f"model {first} in layers, shapes, batch size, loss, optimizer or metrics"
        )


# Below this many multiply-adds per member (rows x in x out), torch's CPU bmm switches to a
# naive loop whose sums round differently from F.linear's (measured on torch 2.13: exact at 400
# and above, not below, for the forward pass and both gradients).
_NAIVE_BMM = 400


# Random streams ---------------------------------------------------------------------------------


@dataclass
class _MemberRng:
    """A member's random stream for one hop, as a plain hop would have seeded torch's global
    generator(s): a CPU generator, and on CUDA the device generator's state."""

    cpu: torch.Generator
    cuda_state: Tensor | None

    @classmethod
    def of(cls, model: ModelInHand, seed: MemberSeeds, device: torch.device) -> _MemberRng:
        cpu = torch.Generator()
        cuda_state = None
        if seed.rng_seed is not None:  # deterministic mode: torch.manual_seed(rng_seed)
            cpu.manual_seed(seed.rng_seed)
            if device.type == "cuda":
                cuda_state = _cuda_state_seeded(seed.rng_seed, device)
        else:
            cpu.set_state(model.rng["rng"])
            if device.type == "cuda":
                cuda_state = model.rng.get("cuda_rng")
                if cuda_state is None:  # first hop on a GPU, as training.set_rng seeds it
                    cuda_state = _cuda_state_seeded(int(model.counters.init_seed or 0), device)
        return cls(cpu, cuda_state)

    def as_model_rng(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"rng": self.cpu.get_state()}
        if self.cuda_state is not None:
            rng["cuda_rng"] = self.cuda_state
        return rng


def _cuda_state_seeded(seed: int, device: torch.device) -> Tensor:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g.get_state()


# The stacked model ------------------------------------------------------------------------------


@dataclass
class _Layer:
    """One layer of the plan: what it computes and where its stacked tensors are."""

    kind: str  # linear, conv2d, batchnorm, dropout, flatten, elementwise, pooling
    module: nn.Module  # member 0's: its settings are the group's (they are in the key)
    weight: int | None = None  # index into the stacked parameters
    bias: int | None = None
    norm: int | None = None  # index into the stacked BatchNorm buffers
    dropout: int | None = None  # index of this dropout among the model's dropout layers


@dataclass
class _Group:
    models: list[ModelInHand]
    device: torch.device
    layers: list[_Layer]
    params: list[Tensor]  # [K, ...] leaves, in model.parameters() order
    running: list[tuple[Tensor, Tensor]]  # each BatchNorm's [K, C] running mean and var
    flats: list[_Flat]  # per param group: its trained parameters in one [K, n] buffer
    dropouts: list[list[float]] = field(default_factory=list)  # per layer, each member's p

    @classmethod
    def of(cls, models: list[ModelInHand], device: torch.device) -> _Group:
        check_group(models)
        first = models[0].spec.model
        index = {id(p): i for i, p in enumerate(first.parameters())}
        layers, norms, drops = [], 0, 0
        member_layers = [[m for _, m in leaves(x.spec.model)] for x in models]
        for _, m in leaves(first):
            layer = _Layer(_kind(m), m)
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)):
                layer.weight = index[id(m.weight)] if m.weight is not None else None
                layer.bias = index[id(m.bias)] if m.bias is not None else None
            if layer.kind == "batchnorm":
                layer.norm, norms = norms, norms + 1
            if layer.kind == "dropout":
                layer.dropout, drops = drops, drops + 1
            layers.append(layer)
        with torch.no_grad():
            params, flats = _stack_params(models, device)
            bn = [
                [m for m in ms if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
                for ms in member_layers
            ]
            running = [
                (
                    torch.stack([b[i].running_mean for b in bn]),  # type: ignore[misc]
                    torch.stack([b[i].running_var for b in bn]),  # type: ignore[misc]
                )
                for i in range(norms)
            ]
        dropouts = [[float(m.p) for m in ms if isinstance(m, nn.Dropout)] for ms in member_layers]
        dropout_ps = [list(d) for d in zip(*dropouts)]
        return cls(models, device, layers, params, running, flats, dropout_ps)

    @property
    def size(self) -> int:
        return len(self.models)

    # Forward --------------------------------------------------------------------------------

    def forward(self, x: Tensor, rngs: list[_MemberRng] | None) -> Tensor:
        """The group's outputs ``[K, B, ...]`` for inputs ``[K, B, ...]``; ``rngs`` given:
        training mode (dropout on, BatchNorm on batch statistics)."""
        training_mode = rngs is not None
        K, P = self.size, self.params
        for layer in self.layers:
            m = layer.module
            if layer.kind == "linear":
                assert layer.weight is not None
                shape = x.shape
                x3 = x.reshape(K, -1, shape[-1])
                weight = P[layer.weight]
                bias = P[layer.bias] if layer.bias is not None else None
                if x3.shape[1] * weight.shape[1] * weight.shape[2] < _NAIVE_BMM:
                    # torch's CPU bmm sums such small products in another order than
                    # F.linear does: per member, exactly plain's call.
                    y = torch.stack(
                        [
                            F.linear(xk, wk, bk)  # type: ignore[arg-type]  # a Linear has a weight
                            for xk, wk, bk in zip(*_members(x3, weight, bias), strict=True)
                        ]
                    )
                else:
                    y = _StackedLinear.apply(x3, weight, bias)
                x = y.view(*shape[:-1], y.shape[-1])
            elif layer.kind == "conv2d":
                x = self._conv(layer, x)
            elif layer.kind == "batchnorm":
                x = self._batchnorm(layer, x, training_mode)
            elif layer.kind == "dropout":
                if training_mode:
                    assert rngs is not None and layer.dropout is not None
                    x = self._dropout(x, self.dropouts[layer.dropout], rngs)
            elif layer.kind == "flatten":
                assert isinstance(m, nn.Flatten)
                start = m.start_dim + 1 if m.start_dim >= 0 else m.start_dim
                end = m.end_dim + 1 if m.end_dim >= 0 else m.end_dim
                x = x.flatten(start, end)
            elif layer.kind == "pooling":
                y = m(x.reshape(-1, *x.shape[2:]))
                x = y.view(K, -1, *y.shape[1:])
            else:  # elementwise
                x = m(x)
        return x

    def _conv(self, layer: _Layer, x: Tensor) -> Tensor:
        m = layer.module
        assert isinstance(m, nn.Conv2d) and layer.weight is not None
        weight = self.params[layer.weight]
        bias = self.params[layer.bias] if layer.bias is not None else None
        args = (m.stride, m.padding, m.dilation)
        if x.device.type != "cuda":
            # Per member: exactly plain's call (see the module docstring).
            return torch.stack(
                [
                    F.conv2d(xk, wk, bk, *args)  # type: ignore[arg-type]
                    for xk, wk, bk in zip(*_members(x, weight, bias), strict=True)
                ]
            )
        K, B = x.shape[:2]
        folded = x.transpose(0, 1).reshape(B, K * x.shape[2], *x.shape[3:])
        y = F.conv2d(
            folded,
            weight.reshape(-1, *weight.shape[2:]),
            None if bias is None else bias.reshape(-1),
            *args,  # type: ignore[arg-type]
            groups=K,
        )
        return y.view(B, K, -1, *y.shape[2:]).transpose(0, 1)

    def _batchnorm(self, layer: _Layer, x: Tensor, training_mode: bool) -> Tensor:
        m = layer.module
        assert isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and layer.norm is not None
        K, B = x.shape[:2]
        mean, var = self.running[layer.norm]
        weight = None if layer.weight is None else self.params[layer.weight]
        bias = None if layer.bias is None else self.params[layer.bias]
        momentum = m.momentum if m.momentum is not None else 0.0
        if x.device.type != "cuda":
            # Per member, exactly plain's call: folded into channels, the forward pass and the
            # running statistics are bit-identical but the CPU backward kernel rounds the
            # gradients differently (measured on torch 2.13).
            return torch.stack(
                [
                    F.batch_norm(xk, mean[k], var[k], wk, bk, training_mode, momentum, m.eps)
                    for k, (xk, wk, bk) in enumerate(zip(*_members(x, weight, bias), strict=True))
                ]
            )
        # Members folded into channels: [B, K*C, ...]; each channel's statistics are its own.
        folded = x.transpose(0, 1).reshape(B, K * x.shape[2], *x.shape[3:])
        y = F.batch_norm(
            folded,
            mean.view(-1),
            var.view(-1),
            None if weight is None else weight.view(-1),
            None if bias is None else bias.view(-1),
            training_mode,
            momentum,
            m.eps,
        )
        return y.view(B, K, *x.shape[2:]).transpose(0, 1)

    def _dropout(self, x: Tensor, ps: list[float], rngs: list[_MemberRng]) -> Tensor:
        if all(p == 0.0 for p in ps):
            return x  # F.dropout draws nothing at p = 0
        noise = torch.empty_like(x, memory_format=torch.contiguous_format)
        keep = [1.0 - p for p in ps]
        for k, p in enumerate(ps):
            if p == 0.0:
                noise[k].fill_(1.0)
            elif p == 1.0:
                noise[k].zero_()
            elif x.device.type == "cuda":
                noise[k].copy_(_cuda_mask(rngs[k], x.shape[1:], p, x))
            else:  # F.dropout's own CPU call: bernoulli_(1 - p), then divided by 1 - p
                noise[k].bernoulli_(keep[k], generator=rngs[k].cpu)
        if x.device.type != "cuda":
            scale = torch.tensor([q if q > 0 else 1.0 for q in keep], device=x.device)
            noise.div_(scale.to(x.dtype).view(-1, *([1] * (x.dim() - 1))))
        return x * noise

    # Training -------------------------------------------------------------------------------

    def train_hop(
        self,
        rngs: list[_MemberRng],
        seeds: list[MemberSeeds],
        shard: Shard,
        end_of_epoch: bool,
    ) -> list[Outcome]:
        device = self.device
        specs = [m.spec for m in self.models]
        for spec in specs:
            spec.model.train()
        batch = specs[0].batch_size
        orders = torch.stack(
            [
                torch.randperm(shard.rows, generator=torch.Generator().manual_seed(s.shuffle_seed))
                for s in seeds
            ]
        ).to(shard.x.device)
        optimizer = _StackedOptimizer.of(self)
        scorer = _Scorer.of(specs, device)
        per_batch = [
            s.lr_scheduler is not None and s.lr_scheduler_interval == "batch" for s in specs
        ]
        trained = [i for flat in self.flats for i in flat.index]
        batches = 0
        for start in range(0, shard.rows, batch):
            index = orders[:, start : start + batch]
            rows = index.shape[1]
            inputs, targets = shard.x[index], shard.y[index]
            outputs = self.forward(inputs, rngs)
            losses = scorer.losses(outputs, targets)
            if trained:
                grads = torch.autograd.grad(losses.sum(), [self.params[i] for i in trained])
                optimizer.step(dict(zip(trained, grads, strict=True)))
            batches += 1
            if any(per_batch):
                for spec, on in zip(specs, per_batch, strict=True):
                    if on:
                        _step_scheduler(spec)
                optimizer.read_hyper()
            scorer.accumulate(losses.detach(), outputs.detach(), targets, rows)
        if end_of_epoch:
            for spec in specs:
                if spec.lr_scheduler is not None and spec.lr_scheduler_interval == "epoch":
                    _step_scheduler(spec)
        self._write_back(batches)
        optimizer.write_back()
        for model, rng in zip(self.models, rngs, strict=True):
            model.rng = rng.as_model_rng()
        return scorer.finish(self.models, shard.rows, "training")

    def _write_back(self, batches: int) -> None:
        with torch.no_grad():
            for k, model in enumerate(self.models):
                for p, stacked in zip(model.spec.model.parameters(), self.params, strict=True):
                    p.copy_(stacked[k])
                norms = [
                    m
                    for _, m in leaves(model.spec.model)
                    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
                ]
                for m, (mean, var) in zip(norms, self.running, strict=True):
                    m.running_mean.copy_(mean[k])  # type: ignore[union-attr]
                    m.running_var.copy_(var[k])  # type: ignore[union-attr]
                    m.num_batches_tracked.add_(batches)  # type: ignore[union-attr]

    # Evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def eval_hop(self, shard: Shard) -> list[Outcome]:
        specs = [m.spec for m in self.models]
        scorer = _Scorer.of(specs, self.device)
        batch = specs[0].batch_size
        K = self.size
        for start in range(0, shard.rows, batch):
            x = shard.x[start : start + batch]
            y = shard.y[start : start + batch]
            inputs = x.unsqueeze(0).expand(K, *x.shape)
            targets = y.unsqueeze(0).expand(K, *y.shape)
            outputs = self.forward(inputs, None)
            scorer.accumulate(scorer.losses(outputs, targets), outputs, targets, len(y))
        return scorer.finish(self.models, shard.rows, "validation")


@dataclass
class _Flat:
    """One param group's trained parameters, all members: ``data`` is ``[K, n]`` and each
    parameter a ``[K, *shape]`` view of it, so the optimizer updates the whole group with a
    handful of operations instead of a handful per parameter."""

    data: Tensor
    index: list[int]  # which stacked parameters, in order
    offsets: list[tuple[int, int]]  # each one's columns in ``data``


def _stack_params(
    models: list[ModelInHand], device: torch.device
) -> tuple[list[Tensor], list[_Flat]]:
    per_member = [list(m.spec.model.parameters()) for m in models]
    first = per_member[0]
    index = {id(p): i for i, p in enumerate(first)}
    K = len(models)
    params: list[Tensor | None] = [None] * len(first)
    flats = []
    for group in models[0].spec.optimizer.param_groups:
        members = [index[id(p)] for p in group["params"] if p.requires_grad]
        if not members:
            flats.append(_Flat(torch.empty(K, 0, device=device), [], []))
            continue
        dtypes = {first[i].dtype for i in members}
        if len(dtypes) > 1:
            raise ValueError(f"a param group mixes dtypes {sorted(map(str, dtypes))}")
        columns = [
            torch.cat([per_member[k][i].detach().reshape(-1) for i in members]) for k in range(K)
        ]
        data = torch.stack(columns).to(device)
        offsets, at = [], 0
        for i in members:
            n = first[i].numel()
            offsets.append((at, at + n))
            params[i] = data[:, at : at + n].view(K, *first[i].shape).requires_grad_()
            at += n
        flats.append(_Flat(data, members, offsets))
    for i, p in enumerate(first):
        if params[i] is None:  # not optimized: its gradient (if any) is not used
            stacked = torch.stack([ps[i].detach() for ps in per_member]).to(device)
            params[i] = stacked.requires_grad_(p.requires_grad)
    return [p for p in params if p is not None], flats


def _members(
    x: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[tuple[Tensor, ...], tuple[Tensor | None, ...], tuple[Tensor | None, ...]]:
    """Each member's input, weight and bias for a per-member call. ``unbind``, not ``x[k]``:
    the backward of K selects fills K zero tensors of the whole group's size (K^2 work, which
    made CNN groups of 128 five times slower than training the models one by one)."""
    K = x.shape[0]
    weights = (None,) * K if weight is None else weight.unbind(0)
    biases = (None,) * K if bias is None else bias.unbind(0)
    return x.unbind(0), weights, biases


class _StackedLinear(torch.autograd.Function):
    """K Linear layers at once: ``y[k] = x[k] @ weight[k].T + bias[k]``.

    Written out because autograd's own backward for ``bmm(x, weight.transpose(1, 2))`` gives
    the weight's gradient transposed (a strided view), which made every step of the stacked
    optimizer's elementwise passes several times slower; here it comes out contiguous, as
    ``grad_output.T @ x`` per member, the product F.linear's backward computes.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad_x = torch.bmm(grad, weight) if need_x else None
        grad_weight = torch.bmm(grad.transpose(1, 2), x) if need_weight else None
        grad_bias = grad.sum(1) if ctx.has_bias and need_bias else None
        return grad_x, grad_weight, grad_bias


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.Conv2d):
        return "conv2d"
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return "batchnorm"
    if isinstance(m, nn.Dropout):
        return "dropout"
    if isinstance(m, nn.Flatten):
        return "flatten"
    if isinstance(m, POOLING):
        return "pooling"
    assert isinstance(m, ELEMENTWISE)
    return "elementwise"


def _cuda_mask(rng: _MemberRng, shape: torch.Size, p: float, like: Tensor) -> Tensor:
    """The scaled mask F.dropout would apply on CUDA, drawn from the member's own CUDA stream:
    the device generator is set to the member's state around ``native_dropout`` (the kernel
    F.dropout calls there) on a fresh tensor of the member's shape."""
    generator = torch.cuda.default_generators[like.device.index or torch.cuda.current_device()]
    saved = generator.get_state()
    try:
        generator.set_state(rng.cuda_state)  # type: ignore[arg-type]
        ones = torch.ones(shape, device=like.device, dtype=like.dtype)
        out, _ = torch.native_dropout(ones, p, True)
        rng.cuda_state = generator.get_state()
    finally:
        generator.set_state(saved)
    return out


def _step_scheduler(spec: Any) -> None:
    # The member's optimizer.step() is never called (the group's stacked update stands for
    # it); this is the flag its wrapped step() sets, so the scheduler knows a step was taken.
    spec.optimizer._opt_called = True
    spec.lr_scheduler.step()


# Losses and metrics -----------------------------------------------------------------------------


@dataclass
class _Scorer:
    """Each member's loss, and its loss and metric sums as ``training._accumulate`` keeps them
    (float64, each batch's value times its rows)."""

    specs: list[Any]
    batched: BatchedLoss | None
    names: list[str]
    accuracy: list[bool]  # per metric: all members use cerebro.metrics.accuracy
    sums: dict[str, Tensor]

    @classmethod
    def of(cls, specs: list[Any], device: torch.device) -> _Scorer:
        names = list(specs[0].metrics)
        batched = batched_loss(specs[0].loss)
        accuracy = [all(s.metrics[n] is metrics_module.accuracy for s in specs) for n in names]
        sums = {
            n: torch.zeros(len(specs), dtype=torch.float64, device=device) for n in ["loss", *names]
        }
        return cls(specs, batched, names, accuracy, sums)

    def losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``[K]``: member k's loss on its own outputs and targets."""
        b = self.batched
        if b is None:
            return torch.stack([s.loss(outputs[k], targets[k]) for k, s in enumerate(self.specs)])
        K = outputs.shape[0]
        per_row = F.cross_entropy(
            outputs.flatten(0, 1),
            targets.flatten(0, 1),
            reduction="none",
            ignore_index=b.ignore_index,
        ).view(K, -1)
        if b.reduction == "sum":
            return per_row.sum(1)
        if targets.dtype.is_floating_point:  # class probabilities: every row counts
            return per_row.mean(1)
        counted = (targets != b.ignore_index).view(K, -1).sum(1)
        return per_row.sum(1) / counted

    @torch.no_grad()
    def accumulate(self, losses: Tensor, outputs: Tensor, targets: Tensor, rows: int) -> None:
        self.sums["loss"] += losses.double() * rows
        for name, batched_accuracy in zip(self.names, self.accuracy, strict=True):
            if batched_accuracy and outputs.dim() >= 3 and outputs.shape[-1] > 1:
                value = (outputs.argmax(dim=-1) == targets).double().flatten(1).mean(1)
            else:
                value = torch.stack(
                    [
                        torch.as_tensor(s.metrics[name](outputs[k], targets[k])).double()
                        for k, s in enumerate(self.specs)
                    ]
                )
            self.sums[name] += value.to(self.sums[name].device) * rows

    def finish(self, models: list[ModelInHand], rows: int, what: str) -> list[Outcome]:
        table = {name: s.tolist() for name, s in self.sums.items()}
        outcomes: list[Outcome] = []
        for k, model in enumerate(models):
            values = {name: float(v[k]) for name, v in table.items()}
            bad = {n: v for n, v in values.items() if not math.isfinite(v)}
            if bad:
                outcomes.append(
                    ModelFailed(f"model {model.model_id}: {what} produced non-finite values: {bad}")
                )
            else:
                outcomes.append(HopStats(rows=rows, sums=values))
        return outcomes


# The optimizer ----------------------------------------------------------------------------------


@dataclass
class _Hyper:
    """One param group's hyper-parameters, each member's, as ``[K, 1]`` tensors."""

    lr: list[float]
    weight_decay: list[float]
    momentum: list[float]
    dampening: list[float]
    beta1: list[float]
    beta2: list[float]
    eps: list[float]


@dataclass(frozen=True)
class _Views:
    """One stacked parameter as the update sees it: ``[K, *shape]`` views of its param group's
    flat buffers, and three scratch tensors of that shape for the temporaries (made once per
    hop: rebuilding views every step cost as much as the update's arithmetic at K = 1)."""

    param: Tensor
    buffer: Tensor | None  # SGD momentum buffer / Adam exp_avg
    square: Tensor | None  # Adam exp_avg_sq
    scratch: tuple[Tensor, Tensor, Tensor]


@dataclass
class _StackedOptimizer:
    """The members' optimizers as one update per param group over its flat ``[K, n]`` buffer,
    with torch.optim's formulas (``_single_tensor_sgd``, ``_single_tensor_adam``: the same
    operations in the same order, so the same roundings) and each member's own
    hyper-parameters as ``[K, 1]`` tensors."""

    group: _Group
    kind: str  # "sgd" or "adam"
    nesterov: list[bool]  # per param group
    decoupled: list[bool]
    uses_momentum: list[bool]
    buffers: list[Tensor | None]  # per param group: SGD momentum buffer / Adam exp_avg, [K, n]
    squares: list[Tensor | None]  # Adam exp_avg_sq
    had_state: list[list[bool]]  # [group][member]: its optimizer held state at the start
    steps: list[list[float]]  # Adam: [group][member] step counts
    hyper: list[_Hyper] = field(default_factory=list)
    tensors: dict[tuple[int, str, int], Tensor] = field(default_factory=dict)
    views: dict[int, _Views] = field(default_factory=dict)  # by stacked parameter index
    scratch: Tensor | None = None  # [3, n]: the update's temporaries, reused every step

    @classmethod
    def of(cls, group: _Group) -> _StackedOptimizer:
        models = group.models
        first = models[0].spec.optimizer
        kind = "sgd" if isinstance(first, torch.optim.SGD) else "adam"
        nesterov = [bool(pg.get("nesterov", False)) for pg in first.param_groups]
        decoupled = [
            bool(pg.get("decoupled_weight_decay", isinstance(first, torch.optim.AdamW)))
            for pg in first.param_groups
        ]
        uses_momentum = [pg.get("momentum", 0) != 0 for pg in first.param_groups]
        buffers: list[Tensor | None] = []
        squares: list[Tensor | None] = []
        had_state, steps = [], []
        for g, flat in enumerate(group.flats):
            member_params = [_group_params(m, flat) for m in models]
            states = [
                [m.spec.optimizer.state.get(p, {}) for p in ps]
                for m, ps in zip(models, member_params, strict=True)
            ]
            had = []
            for m, st in zip(models, states, strict=True):
                if any(bool(x) != bool(st[0]) for x in st):
                    raise ValueError(
                        f"model {m.model_id}: its optimizer holds state for only "
                        "some parameters of a param group (train it plain)"
                    )
                had.append(bool(st[0]) if st else False)
            had_state.append(had)
            group_steps = []
            for m, st in zip(models, states, strict=True):
                counts = {float(x["step"]) for x in st if "step" in x}
                if len(counts) > 1:
                    raise ValueError(
                        f"model {m.model_id}: its Adam step counts differ within a "
                        "param group (train it plain)"
                    )
                group_steps.append(counts.pop() if counts else 0.0)
            steps.append(group_steps)
            if kind == "sgd" and not uses_momentum[g]:
                buffers.append(None)
                squares.append(None)
                continue
            key = "momentum_buffer" if kind == "sgd" else "exp_avg"
            with torch.no_grad():
                buffers.append(_flat_state(states, key, flat))
                squares.append(_flat_state(states, "exp_avg_sq", flat) if kind == "adam" else None)
        opt = cls(
            group, kind, nesterov, decoupled, uses_momentum, buffers, squares, had_state, steps
        )
        opt.read_hyper()
        return opt

    def read_hyper(self) -> None:
        """Each member's current hyper-parameters (its scheduler may have just changed them)."""
        groups = [m.spec.optimizer.param_groups for m in self.group.models]
        self.hyper = []
        for g in range(len(groups[0])):
            pgs = [gs[g] for gs in groups]
            self.hyper.append(
                _Hyper(
                    lr=[float(pg["lr"]) for pg in pgs],
                    weight_decay=[float(pg.get("weight_decay", 0.0)) for pg in pgs],
                    momentum=[float(pg.get("momentum", 0.0)) for pg in pgs],
                    dampening=[float(pg.get("dampening", 0.0)) for pg in pgs],
                    beta1=[float(pg["betas"][0]) if "betas" in pg else 0.0 for pg in pgs],
                    beta2=[float(pg["betas"][1]) if "betas" in pg else 0.0 for pg in pgs],
                    eps=[float(pg.get("eps", 0.0)) for pg in pgs],
                )
            )
        self.tensors = {}

    def _t(self, values: list[float], like: Tensor, g: int, name: str) -> Tensor:
        """``values`` as a ``[K, 1, ...]`` tensor of ``like``'s dtype, broadcasting over a
        parameter of ``like``'s rank (cached until the hyper-parameters or, for step-dependent
        names, the step change)."""
        key = (g, name, like.dim())
        t = self.tensors.get(key)
        if t is None:
            shape = (-1, *[1] * (like.dim() - 1))
            t = torch.tensor(values, dtype=like.dtype).to(like.device).view(shape)
            self.tensors[key] = t
        return t

    @torch.no_grad()
    def step(self, grads: dict[int, Tensor]) -> None:
        """One update; ``grads``: each trained stacked parameter's gradient, by index.

        Parameter by parameter on its ``[K, *shape]`` views of the flat buffers (gathering the
        gradients into one flat ``[K, n]`` tensor first copied them every step), with the
        temporaries in preallocated scratch.
        """
        K = self.group.size
        for g, flat in enumerate(self.group.flats):
            if not flat.index:
                continue
            if self.kind == "adam":
                for k in range(K):
                    self.steps[g][k] += 1
            for i in flat.index:
                views = self.views.get(i) or self._views(g, i, grads[i].shape)
                if self.kind == "sgd":
                    self._sgd(g, views, grads[i])
                else:
                    self._adam(g, views, grads[i])
            for k in range(K):
                self.had_state[g][k] = True
        for key in [k for k in self.tensors if k[1].startswith("step:")]:
            del self.tensors[key]

    def _views(self, g: int, i: int, shape: torch.Size) -> _Views:
        flat = self.group.flats[g]
        a, b = flat.offsets[flat.index.index(i)]
        room = shape[0] * max(stop - start for start, stop in flat.offsets)
        if self.scratch is None or self.scratch.shape[1] < room:
            self.scratch = flat.data.new_empty(3, room)
        n = shape.numel()
        s0, s1, s2 = (self.scratch[j, :n].view(shape) for j in range(3))
        buffer, square = self.buffers[g], self.squares[g]
        views = _Views(
            flat.data[:, a:b].view(shape),
            None if buffer is None else buffer[:, a:b].view(shape),
            None if square is None else square[:, a:b].view(shape),
            (s0, s1, s2),
        )
        self.views[i] = views
        return views

    def _sgd(self, g: int, views: _Views, grad: Tensor) -> None:
        h, param = self.hyper[g], views.param
        if any(h.weight_decay):
            wd = self._t(h.weight_decay, param, g, "wd")
            grad = torch.addcmul(grad, param, wd, out=views.scratch[0])
        buf = views.buffer
        if buf is not None:
            momentum = self._t(h.momentum, param, g, "m")
            buf.mul_(momentum)
            dampened = [1 - d for d in h.dampening]
            buf.addcmul_(grad, self._t(dampened, param, g, "1-d"))
            for k, had in enumerate(self.had_state[g]):
                if not had:  # torch's first step: the buffer is a clone of the gradient
                    buf[k].copy_(grad[k])
            if self.nesterov[g]:
                grad = torch.addcmul(grad, buf, momentum, out=views.scratch[1])
            else:
                grad = buf
        param.addcmul_(grad, self._t([-lr for lr in h.lr], param, g, "-lr"))

    def _adam(self, g: int, views: _Views, grad: Tensor) -> None:
        h, param = self.hyper[g], views.param
        exp_avg, exp_avg_sq = views.buffer, views.square
        assert exp_avg is not None and exp_avg_sq is not None
        steps = self.steps[g]
        if any(h.weight_decay):
            if self.decoupled[g]:
                factors = [1 - lr * wd for lr, wd in zip(h.lr, h.weight_decay, strict=True)]
                param.mul_(self._t(factors, param, g, "1-lr*wd"))
            else:
                wd = self._t(h.weight_decay, param, g, "wd")
                grad = torch.addcmul(grad, param, wd, out=views.scratch[0])
        exp_avg.lerp_(grad, self._t([1 - b1 for b1 in h.beta1], param, g, "1-b1"))
        exp_avg_sq.mul_(self._t(h.beta2, param, g, "b2"))
        scaled = torch.mul(
            grad, self._t([1 - b2 for b2 in h.beta2], param, g, "1-b2"),
            out=views.scratch[1],
        )  # fmt: skip
        exp_avg_sq.addcmul_(scaled, grad)
        # Python floats, per member, as torch computes them (then rounded to the tensor dtype).
        bc1 = [1 - b1**s for b1, s in zip(h.beta1, steps, strict=True)]
        bc2_sqrt = [(1 - b2**s) ** 0.5 for b2, s in zip(h.beta2, steps, strict=True)]
        neg_step = [-(lr / bc) for lr, bc in zip(h.lr, bc1, strict=True)]
        denom = torch.sqrt(exp_avg_sq, out=views.scratch[1])
        denom.div_(self._t(bc2_sqrt, param, g, "step:bc2"))
        denom.add_(self._t(h.eps, param, g, "eps"))
        step = torch.mul(exp_avg, self._t(neg_step, param, g, "step:size"), out=views.scratch[2])
        param.addcdiv_(step, denom)

    @torch.no_grad()
    def write_back(self) -> None:
        """Each member's optimizer.state as torch would have left it (same keys, dtypes and a
        float ``step`` tensor; a momentum buffer only where SGD would have made one)."""
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        for g, flat in enumerate(self.group.flats):
            buf, sq = self.buffers[g], self.squares[g]
            if buf is None:
                continue
            for k, model in enumerate(self.group.models):
                if not self.had_state[g][k]:
                    continue
                state = model.spec.optimizer.state
                for p, (a, b) in zip(_group_params(model, flat), flat.offsets, strict=True):
                    st = state[p]
                    if self.kind == "sgd":
                        _put(st, "momentum_buffer", buf[k, a:b].view(p.shape))
                        continue
                    assert sq is not None
                    if "step" in st:
                        st["step"].fill_(self.steps[g][k])
                    else:
                        st["step"] = torch.tensor(self.steps[g][k], dtype=scalar)
                    _put(st, "exp_avg", buf[k, a:b].view(p.shape))
                    _put(st, "exp_avg_sq", sq[k, a:b].view(p.shape))


def _group_params(model: ModelInHand, flat: _Flat) -> list[Tensor]:
    params = list(model.spec.model.parameters())
    return [params[i] for i in flat.index]


def _flat_state(states: list[list[dict[str, Any]]], key: str, flat: _Flat) -> Tensor:
    rows = []
    for member in states:
        parts = [
            st[key].reshape(-1).to(flat.data.device)
            if key in st
            else torch.zeros(b - a, dtype=flat.data.dtype, device=flat.data.device)
            for st, (a, b) in zip(member, flat.offsets, strict=True)
        ]
        rows.append(torch.cat(parts) if parts else flat.data.new_empty(0))
    return torch.stack(rows)


def _put(state: dict[str, Any], key: str, value: Tensor) -> None:
    if key in state:
        state[key].copy_(value)
    else:
        # A copy, not a view: a view would keep (and torch.save would write) the whole stack.
        state[key] = value.clone(memory_format=torch.contiguous_format)


__all__ = ["FusedRunner", "check_group"]
