"""The fused runner: K models of one shape trained as one, with stacked tensors.

Each member keeps its own sequential SGD: its own row order (its shuffle seed, not a batch
shared by all as in HFTA), its own learning rate, weight decay, momentum, betas and eps (read
from its own optimizer before every step, so that its own LR scheduler drives them), its own
dropout rate and masks (drawn from its own random stream, as ``F.dropout`` draws them on CPU),
its own loss and metrics. Parameters are stacked into ``[K, ...]`` leaf tensors for the hop; the
sum of the members' losses has each member's gradient as its gradient, since no parameter is
shared. The optimizer step is torch's formula on the stacked tensors with per-member
hyper-parameters. At the end every member's own objects (weights, optimizer state in torch's
format, scheduler, random state) hold what the hop produced, so the state captured afterwards
is the one per-model format and a model may go on alone with the plain runner.

Which models fit together is :func:`cerebro.techniques.fusable.fusability`'s business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import training
from ..data import Shard
from ..errors import ModelFailed
from .base import MemberSeeds, ModelInHand, Outcome, Runner
from .fusable import ELEMENTWISE, fusability, leaf_layers

# Elements of one parameter stack the optimizer updates per pass (about 1 MB of float32).
_CHUNK_ELEMENTS = 1 << 18


@dataclass
class _Stack:
    """The members' parameters, stacked, and where each member's own tensor is."""

    layers: list[list[nn.Module]]  # per layer index, the members' modules
    weights: dict[tuple[int, str], torch.Tensor]  # (layer, "weight"/"bias") -> [K, ...] leaf
    owners: dict[tuple[int, str], list[nn.Parameter]]  # the members' own parameters


class FusedRunner(Runner):
    """Trains or evaluates a group of fusable models of one key together.

    Example:
        >>> FusedRunner().check(0)
        Traceback (most recent call last):
        ...
        ValueError: the fused runner needs at least one model, not 0
    """

    def check(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"the fused runner needs at least one model, not {size}")

    def _check_group(self, models: list[ModelInHand]) -> None:
        self.check(len(models))
        keys = {m.model_id: fusability(m.spec) for m in models}
        first = keys[models[0].model_id]
        if first.key is None:
            raise ValueError(f"model {models[0].model_id} cannot be fused: {first.reason}")
        other = [i for i, f in keys.items() if f.key != first.key]
        if other:
            raise ValueError(
                f"models {other} cannot be fused with model {models[0].model_id}: "
                "their layers, batch size or optimizer differ"
            )

    # Training ----------------------------------------------------------------------------------

    def train(
        self,
        models: list[ModelInHand],
        seeds: list[MemberSeeds],
        shard: Shard,
        device: torch.device,
        end_of_epoch: bool,
    ) -> list[Outcome]:
        self._check_group(models)
        specs = [m.spec for m in models]
        stack = _stack(specs, device)
        streams = [_stream(m, s, device) for m, s in zip(models, seeds, strict=True)]
        orders = [
            torch.randperm(shard.rows, generator=torch.Generator().manual_seed(s.shuffle_seed)).to(
                shard.x.device
            )
            for s in seeds
        ]
        optimizer = _FusedOptimizer(specs, stack)
        sums = [training._zero_sums(spec, shard.x.device) for spec in specs]
        batch = specs[0].batch_size
        for model in (s.model for s in specs):
            model.train()
        for start in range(0, shard.rows, batch):
            index = torch.stack([order[start : start + batch] for order in orders])
            inputs = shard.x[index]  # [K, B, ...]: each member's own rows
            targets = shard.y[index]
            outputs = _forward(stack, inputs, [g for g, _ in streams], training=True)
            losses = [spec.loss(outputs[k], targets[k]) for k, spec in enumerate(specs)]
            for weight in stack.weights.values():
                weight.grad = None
            torch.stack(losses).sum().backward()
            optimizer.step()
            for spec in specs:
                if spec.lr_scheduler is not None and spec.lr_scheduler_interval == "batch":
                    _step_scheduler(spec)
            rows = index.shape[1]
            for k, spec in enumerate(specs):
                training._accumulate(
                    spec, sums[k], losses[k].detach(), outputs[k].detach(), targets[k], rows
                )
        for spec in specs:
            if (
                end_of_epoch
                and spec.lr_scheduler is not None
                and spec.lr_scheduler_interval == "epoch"
            ):
                _step_scheduler(spec)
        optimizer.write_back()
        _write_back(stack)
        for member, (_, rng_after) in zip(models, streams, strict=True):
            member.rng = rng_after()
        return [_outcome(m.model_id, s, shard.rows, "training") for m, s in zip(models, sums)]

    # Evaluation --------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(
        self, models: list[ModelInHand], shard: Shard, device: torch.device
    ) -> list[Outcome]:
        self._check_group(models)
        specs = [m.spec for m in models]
        stack = _stack(specs, device, requires_grad=False)
        sums = [training._zero_sums(spec, shard.x.device) for spec in specs]
        batch = specs[0].batch_size
        for start in range(0, shard.rows, batch):
            inputs = shard.x[start : start + batch]
            targets = shard.y[start : start + batch]
            shared = inputs.unsqueeze(0).expand(len(specs), *inputs.shape)
            outputs = _forward(stack, shared, None, training=False)
            for k, spec in enumerate(specs):
                loss = spec.loss(outputs[k], targets)
                training._accumulate(spec, sums[k], loss, outputs[k], targets, len(targets))
        return [_outcome(m.model_id, s, shard.rows, "validation") for m, s in zip(models, sums)]


# The forward pass --------------------------------------------------------------------------------


def _stack(specs: list[Any], device: torch.device, requires_grad: bool = True) -> _Stack:
    per_model = [leaf_layers(spec.model) for spec in specs]
    assert all(isinstance(layers, list) for layers in per_model)
    layers = [list(column) for column in zip(*per_model, strict=True)]
    weights: dict[tuple[int, str], torch.Tensor] = {}
    owners: dict[tuple[int, str], list[nn.Parameter]] = {}
    for i, column in enumerate(layers):
        if type(column[0]) is not nn.Linear:
            continue
        for name in ("weight", "bias"):
            own = [getattr(layer, name) for layer in column]
            if own[0] is None:
                continue
            stacked = torch.stack([p.detach() for p in own]).to(device)
            weights[(i, name)] = stacked.requires_grad_(requires_grad)
            owners[(i, name)] = own
    return _Stack(layers, weights, owners)


def _forward(
    stack: _Stack,
    x: torch.Tensor,
    generators: list[torch.Generator] | None,
    training: bool,
) -> torch.Tensor:
    """All members' outputs, ``[K, B, ...]``, from their inputs ``x`` (``[K, B, ...]``)."""
    members, rows = x.shape[0], x.shape[1]
    for i, column in enumerate(stack.layers):
        layer = column[0]
        if type(layer) is nn.Linear:
            weight = stack.weights[(i, "weight")]
            bias = stack.weights.get((i, "bias"))
            if bias is None:
                x = torch.bmm(x, weight.transpose(1, 2))
            else:
                x = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
        elif type(layer) is nn.Flatten:
            x = x.flatten(2)
        elif type(layer) is nn.Dropout:
            if training and generators is not None:
                x = _dropout(x, [m.p for m in column], generators)  # type: ignore[misc]
        elif type(layer) in ELEMENTWISE:
            x = layer(x.reshape(members * rows, *x.shape[2:])).reshape(members, rows, *x.shape[2:])
        else:  # fusability() refused it: a group that holds it is a bug
            raise TypeError(f"layer {i} ({type(layer).__name__}) cannot run fused")
    return x


def _dropout(
    x: torch.Tensor, rates: list[float], generators: list[torch.Generator]
) -> torch.Tensor:
    """Each member's rows through its own dropout, masks drawn as ``F.dropout`` draws them on
    CPU (``empty_like(input).bernoulli_(1 - p)``, scaled by ``1 / (1 - p)``) from its own
    generator, so that a fused member gets the masks it would get alone."""
    out = []
    for k, (p, generator) in enumerate(zip(rates, generators, strict=True)):
        if p == 0:
            out.append(x[k])  # F.dropout draws nothing then
        elif p == 1:
            out.append(x[k] * 0.0)
        else:
            noise = torch.empty_like(x[k]).bernoulli_(1 - p, generator=generator)
            noise.div_(1 - p)
            out.append(x[k] * noise)
    return torch.stack(out)


def _stream(
    model: ModelInHand, seed: MemberSeeds, device: torch.device
) -> tuple[torch.Generator, Any]:
    """A generator continuing the member's random stream as the plain runner would (seeded by
    the hop in deterministic mode), and a function giving the member's rng state after it."""
    cpu = torch.Generator()
    if seed.rng_seed is not None:
        cpu.manual_seed(seed.rng_seed)
    else:
        cpu.set_state(model.rng["rng"])
    if device.type != "cuda":
        return cpu, lambda: {"rng": cpu.get_state()}
    cuda = torch.Generator(device=device)
    if seed.rng_seed is not None:
        cuda.manual_seed(seed.rng_seed)
    elif "cuda_rng" in model.rng:
        cuda.set_state(model.rng["cuda_rng"])
    else:  # first hop on a GPU: seeded as the plain runner seeds it
        cuda.manual_seed(model.counters.init_seed or 0)
    return cuda, lambda: {"rng": cpu.get_state(), "cuda_rng": cuda.get_state()}


def _step_scheduler(spec: Any) -> None:
    # The members' own optimizers never step (the fused one does their work), which their
    # schedulers would warn about: mark them stepped, as optimizer.step's wrapper does.
    spec.optimizer._opt_called = True
    spec.lr_scheduler.step()


def _write_back(stack: _Stack) -> None:
    with torch.no_grad():
        for where, stacked in stack.weights.items():
            for k, own in enumerate(stack.owners[where]):
                own.copy_(stacked[k])


def _outcome(model_id: int, sums: dict[str, torch.Tensor], rows: int, what: str) -> Outcome:
    try:
        return training._finish(sums, rows, what)
    except ModelFailed as e:
        return ModelFailed(f"model {model_id}: {e}")


# The optimizer -----------------------------------------------------------------------------------


class _FusedOptimizer:
    """torch's SGD, Adam or AdamW step over stacked parameters, each member with its own
    hyper-parameters (read from its own optimizer's param groups before each step)."""

    def __init__(self, specs: list[Any], stack: _Stack) -> None:
        self.specs = specs
        self.stack = stack
        self.kind = type(specs[0].optimizer)
        self.state: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self.fresh: dict[tuple[int, str], list[bool]] = {}  # SGD: members without a buffer yet
        self.steps: dict[tuple[int, str], list[float]] = {}
        self._cache: dict[tuple[Any, ...], torch.Tensor] = {}
        # The members' param groups: schedulers change their values, never the dicts.
        self.groups = {
            where: [self._group_of(spec, p) for spec, p in zip(specs, own, strict=True)]
            for where, own in stack.owners.items()
        }
        for where, own in stack.owners.items():
            states = [spec.optimizer.state.get(p, {}) for spec, p in zip(specs, own)]
            device = stack.weights[where].device
            if self.kind is torch.optim.SGD:
                buffers = [s.get("momentum_buffer") for s in states]
                self.fresh[where] = [b is None for b in buffers]
                self.state[where] = {
                    "momentum_buffer": torch.stack(
                        [
                            torch.zeros_like(p) if b is None else b.detach()
                            for p, b in zip(own, buffers, strict=True)
                        ]
                    ).to(device)
                }
            else:
                self.steps[where] = [float(s["step"]) if "step" in s else 0.0 for s in states]
                self.state[where] = {
                    name: torch.stack(
                        [
                            torch.zeros_like(p) if name not in s else s[name].detach()
                            for p, s in zip(own, states, strict=True)
                        ]
                    ).to(device)
                    for name in ("exp_avg", "exp_avg_sq")
                }

    def _group_of(self, spec: Any, param: nn.Parameter) -> dict[str, Any]:
        for group in spec.optimizer.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise ValueError("a parameter is not in its model's optimizer")

    def _per_member(self, values: list[float], like: torch.Tensor) -> torch.Tensor:
        """``values`` (one per member) as a tensor broadcasting over ``like``'s member axis.
        Cached: most hyper-parameters stay the same from one step and parameter to the next."""
        key = (tuple(values), like.dim(), like.dtype, like.device)
        tensor = self._cache.get(key)
        if tensor is None:
            shape = (len(values),) + (1,) * (like.dim() - 1)
            tensor = torch.tensor(values, dtype=like.dtype, device=like.device).reshape(shape)
            if len(self._cache) > 256:  # per-step values (bias corrections) would pile up
                self._cache.clear()
            self._cache[key] = tensor
        return tensor

    @torch.no_grad()
    def step(self) -> None:
        # Member by member chunks: every pass of the step over a chunk stays in the cache
        # (measured here: a whole stack of 32 MLPs made each of the ~10 passes memory-bound).
        for where, param in self.stack.weights.items():
            if param.grad is None:
                continue
            if self.kind is not torch.optim.SGD:
                self.steps[where] = [s + 1 for s in self.steps[where]]
            members = param.shape[0]
            chunk = max(1, _CHUNK_ELEMENTS // max(1, param[0].numel()))
            for first in range(0, members, chunk):
                part = slice(first, min(first + chunk, members))
                if self.kind is torch.optim.SGD:
                    self._sgd(where, part, param[part], param.grad[part])
                else:
                    self._adam(where, part, param[part], param.grad[part])
            if self.kind is torch.optim.SGD:
                self.fresh[where] = [False] * members

    def _sgd(self, where: Any, part: slice, param: torch.Tensor, grad: torch.Tensor) -> None:
        at = self._per_member
        groups = self.groups[where][part]
        wd = [g["weight_decay"] for g in groups]
        if any(wd):
            grad = grad + at(wd, param) * param
        if groups[0]["momentum"] != 0:
            buf = self.state[where]["momentum_buffer"][part]
            momentum = at([g["momentum"] for g in groups], param)
            buf.mul_(momentum).addcmul_(at([1 - g["dampening"] for g in groups], param), grad)
            for k, fresh in enumerate(self.fresh[where][part]):
                if fresh:  # torch's first step: the buffer is the gradient itself
                    buf[k].copy_(grad[k])
            grad = grad + momentum * buf if groups[0]["nesterov"] else buf
        param.addcmul_(at([-g["lr"] for g in groups], param), grad)

    def _adam(self, where: Any, part: slice, param: torch.Tensor, grad: torch.Tensor) -> None:
        at = self._per_member
        groups = self.groups[where][part]
        steps = self.steps[where][part]
        lr = [g["lr"] for g in groups]
        wd = [g["weight_decay"] for g in groups]
        decoupled = self.kind is torch.optim.AdamW or groups[0].get("decoupled_weight_decay")
        if any(wd):
            if decoupled:
                param.mul_(at([1 - a * b for a, b in zip(lr, wd)], param))
            else:
                grad = grad + at(wd, param) * param
        beta1 = [g["betas"][0] for g in groups]
        beta2 = [g["betas"][1] for g in groups]
        exp_avg = self.state[where]["exp_avg"][part]
        exp_avg_sq = self.state[where]["exp_avg_sq"][part]
        # torch's formula (see _single_tensor_adam), in place, scalars made per-member tensors.
        exp_avg.lerp_(grad, at([1 - b for b in beta1], param))
        exp_avg_sq.mul_(at(beta2, param)).addcmul_(grad * at([1 - b for b in beta2], param), grad)
        step_size = [-a / (1 - b**s) for a, b, s in zip(lr, beta1, steps)]
        correction = [math.sqrt(1 - b**s) for b, s in zip(beta2, steps)]
        eps = at([g["eps"] for g in groups], param)
        denom = exp_avg_sq.sqrt().div_(at(correction, param)).add_(eps)
        param.addcdiv_(exp_avg * at(step_size, param), denom)

    def write_back(self) -> None:
        """Each member's optimizer state, in torch's own format, from the stacked one."""
        for where, own in self.stack.owners.items():
            for k, (spec, p) in enumerate(zip(self.specs, own, strict=True)):
                if self.kind is torch.optim.SGD:
                    if self.groups[where][k]["momentum"] != 0 and not self.fresh[where][k]:
                        buf = self.state[where]["momentum_buffer"][k]
                        spec.optimizer.state[p] = {"momentum_buffer": buf.clone().to(p.device)}
                elif self.steps[where][k] > 0:
                    spec.optimizer.state[p] = {
                        "step": torch.tensor(self.steps[where][k], dtype=torch.float32),
                        "exp_avg": self.state[where]["exp_avg"][k].clone().to(p.device),
                        "exp_avg_sq": self.state[where]["exp_avg_sq"][k].clone().to(p.device),
                    }
