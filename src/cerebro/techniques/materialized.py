"""Training on a frozen prefix's output, computed once per shard and kept beside it.

A unit of technique ``materialized`` carries a :class:`FeaturePlan`: its members' prefix chain
(see :mod:`cerebro.techniques.prefix`) and which depths of it are *kept*. The worker holding the
shard asks its :class:`FeatureStore` for the features at the members' depth: a kept depth is
read back (from memory, or from its file when memory is full), or computed once from the
deepest kept depth below it and written; a depth that is not kept is computed for this unit
from the deepest kept one below it (or from the raw rows). The unit's members then train their
trainable parts on the features, one after another: a unit of several members (configurations
that share the prefix) runs the prefix's remaining layers once for all of them.

Features are computed in fixed chunks of rows (:data:`~cerebro.techniques.prefix.FEATURE_ROWS`),
so they are the same bits whichever depth they were computed from and whichever worker did it.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict

import torch

from .. import files, training
from ..data import Shard
from ..errors import ModelFailed
from .base import MemberSeeds, ModelInHand, Outcome, Runner
from .features import FeaturePlan, Materialization
from .plain import train_one
from .prefix import chain, layers_of, run_layers


class FeatureStore:
    """A worker's kept features: by (features digest, shard content), in memory up to a
    budget (least recently used go first) and in files under the plan's folder."""

    def __init__(self) -> None:
        self._memory: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._checked: tuple[torch.nn.Module, tuple[str, ...]] | None = None  # last prefix seen

    def features(
        self,
        plan: FeaturePlan,
        frozen: torch.nn.Module,
        shard: Shard,
        split: str,
        shard_id: int,
        shard_digest: str,
        device: torch.device,
    ) -> tuple[torch.Tensor, list[Materialization]]:
        """The output of ``frozen`` (whose chain must be ``plan.chain``) for every row of
        ``shard``, and the kept depths this call computed."""
        self._check_chain(plan, frozen)
        layers = layers_of(frozen)
        budget = int(plan.memory_mb * 2**20)
        kept = sorted(plan.kept)
        base, x = 0, shard.x
        for depth in reversed(kept):  # the deepest kept depth already there
            found = self._read(plan, depth, shard_digest, device, budget)
            if found is not None:
                base, x = depth, found
                break
        made = []
        for depth in kept:
            if depth <= base:
                continue
            began = time.perf_counter()
            x = run_layers(layers[base:depth], x)
            seconds = time.perf_counter() - began
            self._keep(plan, depth, shard_digest, x, budget)
            made.append(
                Materialization(
                    plan.chain[depth - 1],
                    depth,
                    split,
                    shard_id,
                    shard_digest,
                    int(x.shape[0]),
                    x.nbytes,
                    seconds,
                )  # fmt: skip
            )
            base = depth
        return run_layers(layers[base:], x), made

    def _check_chain(self, plan: FeaturePlan, frozen: torch.nn.Module) -> None:
        """The built prefix computes what was planned: ``build`` gave the same weights."""
        if self._checked is None or self._checked[0] is not frozen:
            self._checked = (frozen, chain(frozen))  # hashed once while the model is cached
        if self._checked[1] != plan.chain:
            raise RuntimeError(
                "the frozen prefix built here differs from the one the experiment planned with "
                "(its layers or weights changed between calls of build): build must give the "
                "same frozen module every time, e.g. load its weights from a file"
            )

    def _path(self, plan: FeaturePlan, depth: int, shard_digest: str) -> str:
        return os.path.join(plan.folder, plan.chain[depth - 1], f"{shard_digest}.pt")

    def _read(
        self, plan: FeaturePlan, depth: int, shard_digest: str, device: torch.device, budget: int
    ) -> torch.Tensor | None:
        key = (plan.chain[depth - 1], shard_digest)
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = self._path(plan, depth, shard_digest)
        if not os.path.exists(path):
            return None
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged file: computed again (and rewritten)
            return None
        tensor: torch.Tensor = loaded.to(device)
        self._remember(key, tensor, budget)
        return tensor

    def _keep(
        self, plan: FeaturePlan, depth: int, shard_digest: str, x: torch.Tensor, budget: int
    ) -> None:
        path = self._path(plan, depth, shard_digest)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cpu = x.detach().to("cpu").contiguous()
        files.replace_atomically(path, lambda tmp: torch.save(cpu, tmp))
        self._remember((plan.chain[depth - 1], shard_digest), x, budget)

    def _remember(self, key: tuple[str, str], x: torch.Tensor, budget: int) -> None:
        self._memory[key] = x
        self._memory.move_to_end(key)
        total = sum(t.nbytes for t in self._memory.values())
        while total > budget and self._memory:
            _, dropped = self._memory.popitem(last=False)  # its file stays
            total -= dropped.nbytes


class MaterializedRunner(Runner):
    """Trains or evaluates members that share a frozen prefix on the prefix's output.

    The worker gives it a shard whose inputs are already the features (from its
    :class:`FeatureStore`); each member's trainable part then trains on them as it would on
    inputs that passed its frozen prefix batch by batch. A member whose loss turns non-finite
    fails alone.
    """

    def check(self, size: int) -> None:
        if size < 1:
            raise ValueError("a materialized unit holds one or more models")

    def train(
        self,
        models: list[ModelInHand],
        seeds: list[MemberSeeds],
        shard: Shard,
        device: torch.device,
        end_of_epoch: bool,
    ) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for model, seed in zip(models, seeds, strict=True):
            try:
                outcomes.append(
                    train_one(model, seed, shard, device, end_of_epoch, apply_frozen=False)
                )
            except ModelFailed as e:
                outcomes.append(ModelFailed(f"model {model.model_id}: {e}"))
        return outcomes

    def evaluate(
        self, models: list[ModelInHand], shard: Shard, device: torch.device
    ) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for model in models:
            try:
                outcomes.append(
                    training.run_eval_hop(model.spec, shard, device, apply_frozen=False)
                )
            except ModelFailed as e:
                outcomes.append(ModelFailed(f"model {model.model_id}: {e}"))
        return outcomes
