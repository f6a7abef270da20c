"""What a runner is given and what it must do.

The worker brings each member of a unit in (built from its state, or found in its cache) as a
:class:`ModelInHand`, and asks the unit's runner to train or evaluate the group on the shard.
A training run leaves each member's objects (weights, optimizer, LR scheduler) and its ``rng``
as they are after the hop; the worker then captures every member's state in the one per-model
format, so checkpoints, clones, PBT and recovery never know which runner trained a model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from ..data import Shard
from ..errors import ModelFailed
from ..spec import ModelSpec
from ..state import Counters
from ..training import HopStats


@dataclass
class ModelInHand:
    """One model as a worker holds it between units (and keeps it, in its cache).

    Attributes:
        model_id: which model.
        spec: its built objects, on the worker's device.
        rng: torch's generator state(s) to continue before its next hop (``"rng"``, and
            ``"cuda_rng"`` on a GPU).
        counters: its progress, as its state file has it (``counters.version`` is the version
            of the state its objects hold).
        params: what it was built with (PBT may change a model's params: then it is rebuilt).
        nbytes: its tensors' size (measured when it arrives and after each training hop).
        bound: its tensors are views of a state file's bytes (a handover slot, or a file mapped
            copy-on-write), not its own: the next unit brings its state in again whatever its
            version (the slot may hold another state by then).
    """

    model_id: int
    spec: ModelSpec
    rng: dict[str, Any]
    counters: Counters
    params: dict[str, Any]
    nbytes: int = 0
    bound: bool = False


@dataclass(frozen=True)
class MemberSeeds:
    """A member's seeds for one unit: its row order, and (deterministic mode) the seed torch
    starts from instead of the generator state the model carries."""

    shuffle_seed: int
    rng_seed: int | None


# A member's outcome of one unit: its sums, or why it alone cannot go on (a non-finite loss,
# say). A runner raises instead when the whole unit failed.
Outcome = HopStats | ModelFailed


class Runner(ABC):
    """Trains or evaluates a group of models on one shard.

    A runner returns one :data:`Outcome` per member, in the members' order: a member that fails
    alone (its loss or a metric turned non-finite) gets a :class:`~cerebro.errors.ModelFailed`
    that names it, and the others' results stand. An exception raised from ``train`` or
    ``evaluate`` fails every member of the unit.
    """

    @abstractmethod
    def check(self, size: int) -> None:
        """Raise ValueError if this runner cannot take a group of ``size`` models."""

    @abstractmethod
    def train(
        self,
        models: list[ModelInHand],
        seeds: list[MemberSeeds],
        shard: Shard,
        device: torch.device,
        end_of_epoch: bool,
    ) -> list[Outcome]:
        """One training hop of each model over ``shard`` (rows in each member's own order);
        each model's ``rng`` is left at its state after the hop. Returns each one's sums."""

    @abstractmethod
    def evaluate(
        self, models: list[ModelInHand], shard: Shard, device: torch.device
    ) -> list[Outcome]:
        """Each model's loss and metrics over every row of ``shard`` (nothing changes)."""
