"""Epoch checkpoints: a model's full training state at the end of each epoch, with a checksum,
pruned by a keep-policy.

A model's current state file is only ever replaced (written beside it, then renamed), never
changed in place, so an epoch checkpoint is a hard link to it: no copy, and the checkpoint stays
as it was while the model trains on.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable

from ..errors import ConfigError
from ..files import replace_atomically

POLICIES = ("last_and_best", "last", "all")


def model_dir(checkpoint_dir: str, model_id: int) -> str:
    """The folder of one model's states: ``state.pt`` (current) and ``epoch-NNNN.pt``."""
    return os.path.join(checkpoint_dir, f"model-{model_id:05d}")


def state_path(checkpoint_dir: str, model_id: int) -> str:
    """Where a model's current training state lives."""
    return os.path.join(model_dir(checkpoint_dir, model_id), "state.pt")


def epoch_path(folder: str, epoch: int) -> str:
    """An epoch checkpoint in a model's folder."""
    return os.path.join(folder, f"epoch-{epoch:04d}.pt")


def snapshot(state_path: str, target: str) -> None:
    """Make ``target`` hold the current state file (a hard link where the filesystem allows)."""

    def write(tmp: str) -> None:
        try:
            os.link(state_path, tmp)
        except OSError:
            shutil.copyfile(state_path, tmp)

    replace_atomically(target, write)


def checksum(path: str) -> str:
    """BLAKE2b of a file's bytes (hashlib releases the GIL, so this can run on a thread)."""
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verified(path: str, expected: str | None) -> bool:
    return bool(expected) and os.path.isfile(path) and checksum(path) == expected


def check_policy(keep: object) -> str | int:
    """``"last_and_best"`` (default), ``"last"``, ``"all"``, or k >= 1: the last k and the best."""
    if keep in POLICIES:
        return keep  # type: ignore[return-value]
    if isinstance(keep, int) and not isinstance(keep, bool) and keep >= 1:
        return keep
    raise ConfigError("keep_checkpoints", keep, f"one of {list(POLICIES)} or an integer >= 1")


def epochs_to_keep(policy: str | int, epochs: Iterable[int], best: int | None) -> set[int]:
    """Which epoch checkpoints a policy keeps, given the epochs present and the best epoch."""
    present = sorted(set(epochs))
    if not present or policy == "all":
        return set(present)
    last = 1 if policy in ("last", "last_and_best") else int(policy)
    kept = set(present[-last:])
    if policy != "last" and best is not None and best in present:
        kept.add(best)
    return kept


def origin_path(folder: str) -> str:
    """The state a model last took from another model (a clone's warm start, or a PBT
    exploit), kept so that its training can be audited and replayed from there."""
    return os.path.join(folder, "origin.pt")
