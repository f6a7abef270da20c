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
from typing import Any

from .. import files
from ..errors import ConfigError, is_int
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
    """Make ``target`` hold the current state file (a hard link where the filesystem allows,
    a copy within the store at an fsspec URL)."""
    if files.is_url(state_path):
        fs, source = files.filesystem(state_path)
        fs.copy(source, files.filesystem(target)[1])
        return

    def write(tmp: str) -> None:
        try:
            os.link(state_path, tmp)
        except OSError:
            shutil.copyfile(state_path, tmp)

    replace_atomically(target, write)


def checksum(path: str) -> str:
    """BLAKE2b of a file's bytes (hashlib releases the GIL, so this can run on a thread)."""
    digest = hashlib.blake2b(digest_size=32)
    with files.open_for_reading(path) as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verified(path: str, expected: str | None) -> bool:
    return bool(expected) and files.exists(path) and checksum(path) == expected


def check_policy(keep: Any) -> str | int:
    """``"last_and_best"`` (default), ``"last"``, ``"all"``, or k >= 1: the last k and the best."""
    if isinstance(keep, str) and keep in POLICIES:
        return keep
    if is_int(keep) and int(keep) >= 1:
        return int(keep)
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


class Mirror:
    """A second home for epoch checkpoints at any fsspec URL (``s3://bucket/run``,
    ``gs://...``, ``file:///mnt/backup/run``, ``memory://...``).

    Each checkpoint is copied there once its checksum is known, pruned there with the local one,
    and fetched back (and checked against its recorded checksum) when a model must be recovered
    and its local copy is gone or damaged. The state a model carries between hops stays local:
    workers replace and memory-map it after every hop.

    Example:
        >>> mirror = Mirror("memory://cerebro-doc/checkpoints", "/tmp/run/checkpoints")
        >>> mirror.url_of("/tmp/run/checkpoints/model-00001/epoch-0002.pt")
        'memory://cerebro-doc/checkpoints/model-00001/epoch-0002.pt'
    """

    def __init__(self, url: str, checkpoint_dir: str) -> None:
        try:
            self.fs, self.root = files.filesystem(url)
        except (ImportError, ValueError) as e:
            raise ConfigError(
                "checkpoint_mirror",
                url,
                "an fsspec URL whose filesystem is installed, e.g. s3://bucket/run (s3fs)",
                hint=str(e).splitlines()[0] if str(e) else "",
            ) from e
        self.url = url.rstrip("/")
        self.root = self.root.rstrip("/")
        self.checkpoint_dir = os.path.abspath(checkpoint_dir)

    def _relative(self, local: str) -> str:
        return os.path.relpath(os.path.abspath(local), self.checkpoint_dir).replace(os.sep, "/")

    def _remote(self, local: str) -> str:
        return f"{self.root}/{self._relative(local)}"

    def url_of(self, local: str) -> str:
        """Where the copy of a local checkpoint lives."""
        return f"{self.url}/{self._relative(local)}"

    def upload(self, local: str) -> None:
        remote = self._remote(local)
        self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
        self.fs.put_file(local, remote)

    def remove(self, local: str) -> None:
        remote = self._remote(local)
        if self.fs.exists(remote):
            self.fs.rm_file(remote)

    def fetch(self, local: str, expected: str) -> bool:
        """Bring a checkpoint's copy back to ``local`` if it matches ``expected``."""
        remote = self._remote(local)
        if not self.fs.exists(remote):
            return False

        def write(tmp: str) -> None:
            self.fs.get_file(remote, tmp)

        os.makedirs(os.path.dirname(local), exist_ok=True)
        replace_atomically(local, write)
        if checksum(local) == expected:
            return True
        os.remove(local)
        return False


def check_writable(argument: str, url: str) -> None:
    """Fail fast, before any training, if checkpoints cannot be written at ``url``."""
    try:
        fs, root = files.filesystem(url)
        probe = f"{root.rstrip('/')}/.cerebro-write-test"
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as e:
        raise ConfigError(
            argument,
            url,
            "an fsspec URL this process can write (its filesystem package installed)",
            hint=str(e).splitlines()[0] if str(e) else type(e).__name__,
        ) from e
