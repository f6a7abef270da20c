"""The plain runner: one model, trained and evaluated as written (today's hop)."""

from __future__ import annotations

import torch

from .. import training
from ..data import Shard
from ..training import HopStats
from .base import MemberSeeds, ModelInHand, Outcome, Runner


class PlainRunner(Runner):
    """Runs a group of exactly one model with :func:`cerebro.training.run_train_hop` and
    :func:`cerebro.training.run_eval_hop`.

    Example:
        >>> PlainRunner().check(2)
        Traceback (most recent call last):
        ...
        ValueError: the plain runner trains one model per unit, not a group of 2
    """

    def check(self, size: int) -> None:
        if size != 1:
            raise ValueError(f"the plain runner trains one model per unit, not a group of {size}")

    def train(
        self,
        models: list[ModelInHand],
        seeds: list[MemberSeeds],
        shard: Shard,
        device: torch.device,
        end_of_epoch: bool,
    ) -> list[Outcome]:
        self.check(len(models))
        return [train_one(models[0], seeds[0], shard, device, end_of_epoch)]

    def evaluate(
        self, models: list[ModelInHand], shard: Shard, device: torch.device
    ) -> list[Outcome]:
        self.check(len(models))
        return [training.run_eval_hop(models[0].spec, shard, device)]


def train_one(
    model: ModelInHand,
    seed: MemberSeeds,
    shard: Shard,
    device: torch.device,
    end_of_epoch: bool,
    apply_frozen: bool = True,
) -> HopStats:
    """One model's training hop on torch's global generator(s), seeded as its hop asks (see
    :func:`cerebro.training.run_train_hop`); leaves the model's ``rng`` after the hop."""
    if seed.rng_seed is not None:
        torch.manual_seed(seed.rng_seed)  # CPU and every CUDA device
    else:
        training.set_rng({**model.rng, "counters": {"init_seed": model.counters.init_seed}}, device)
    stats = training.run_train_hop(
        model.spec, shard, seed.shuffle_seed, device, end_of_epoch, apply_frozen=apply_frozen
    )
    model.rng = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        model.rng["cuda_rng"] = torch.cuda.get_rng_state(device)
    return stats
