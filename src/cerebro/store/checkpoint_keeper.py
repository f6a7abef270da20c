"""The keeper of epoch checkpoints during a run: it takes each one, computes its checksum off the
driver's loop (and copies it to the mirror), records it once the checksum is known, and prunes
old ones by the keep-policy, locally and on the mirror.

What a checkpoint *is* (a hard link to the state file at an epoch's end), its checksum and the
keep-policy's arithmetic are in :mod:`cerebro.store.checkpoints`; this class owns the bookkeeping
that spans a run: checksums in flight, and mirror copies already pruned.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from .. import files
from . import checkpoints
from .records import RecordStore


@dataclass(frozen=True)
class KeptModel:
    """What the keep-policy needs to know of a model: its folder, how many epochs it has
    finished, and its best epoch (None if none has a finite metric)."""

    folder: str
    epochs_done: int
    best_epoch: int | None


class CheckpointKeeper:
    """Epoch checkpoints of one run.

    Args:
        store: where checkpoints are recorded (``checkpoints`` table).
        policy: the keep-policy (see :func:`cerebro.store.checkpoints.check_policy`).
        mirror: a second home for checkpoints, or None.
        describe: a model's :class:`KeptModel` now (asked when its checkpoints are pruned).
    """

    def __init__(
        self,
        store: RecordStore,
        policy: str | int,
        mirror: checkpoints.Mirror | None,
        describe: Callable[[int], KeptModel],
    ) -> None:
        self.store = store
        self.policy = policy
        self.mirror = mirror
        self.describe = describe
        # Checkpoints whose checksum is being computed: (model, epoch, path) -> future.
        self._checksums: dict[tuple[int, int, str], Future[str]] = {}
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cerebro-checksum")
        self._copies_removed: dict[int, set[int]] = {}  # mirror copies pruned, by model

    def take(self, model_id: int, folder: str, state_path: str, epoch: int) -> None:
        """Keep the model's end-of-epoch state; its checksum is computed off the loop.
        A checkpoint that cannot be written is a warning: training goes on without it."""
        path = checkpoints.epoch_path(folder, epoch)
        try:
            checkpoints.snapshot(state_path, path)
        except OSError as e:
            warnings.warn(f"model {model_id}: epoch checkpoint not written: {e}", stacklevel=2)
            return
        self._checksums[(model_id, epoch, path)] = self._hasher.submit(
            self._checksum_and_copy, path
        )

    def record_ready(self, wait: bool = False) -> None:
        """Record checkpoints whose checksum is ready (all of them with ``wait``), then prune
        each one's model by the keep-policy."""
        for key in [k for k, f in self._checksums.items() if wait or f.done()]:
            model_id, epoch, path = key
            try:
                digest = self._checksums.pop(key).result()
                self.store.add_checkpoint(model_id, epoch, path, digest, files.size(path))
                self.prune(model_id)
            except OSError as e:
                warnings.warn(f"model {model_id}: epoch {epoch} checkpoint: {e}", stacklevel=2)

    def close(self) -> None:
        """Finish every checksum and mirror copy, and record them (also after an error: a
        checkpoint written is not lost)."""
        # Recorded first: pruning them may queue removals of mirror copies on the same thread,
        # which the shutdown then waits for (a shut-down pool would refuse them).
        self.record_ready(wait=True)
        self._hasher.shutdown(wait=True)

    def record_missing(
        self, model_id: int, folder: str, epochs_done: int, recorded: set[int]
    ) -> None:
        """Epoch checkpoints written before a crash but never recorded get their checksum now
        (and their mirror copy, which may not have been made)."""
        for epoch in range(epochs_done):
            path = checkpoints.epoch_path(folder, epoch)
            if epoch not in recorded and files.exists(path):
                digest = self._checksum_and_copy(path)
                self.store.add_checkpoint(model_id, epoch, path, digest, files.size(path))

    def usable(self, path: str, expected: str) -> bool:
        """The local copy matches its checksum, or the mirror's copy does (and is fetched)."""
        if checkpoints.verified(path, expected):
            return True
        try:
            return self.mirror is not None and self.mirror.fetch(path, expected)
        except Exception as e:  # an unreachable mirror: recover from what is left locally
            warnings.warn(f"checkpoint mirror: {path} not fetched: {e}", stacklevel=2)
            return False

    def prune(self, model_id: int) -> None:
        """Remove the model's checkpoints the keep-policy no longer keeps (not those whose
        checksum is still being computed)."""
        model = self.describe(model_id)
        present = [
            e
            for e in range(model.epochs_done)
            if files.exists(checkpoints.epoch_path(model.folder, e))
        ]
        pending = {e for (m, e, _) in self._checksums if m == model_id}
        keep = checkpoints.epochs_to_keep(self.policy, present, model.best_epoch)
        dropped = [e for e in present if e not in keep and e not in pending]
        for epoch in dropped:
            files.remove(checkpoints.epoch_path(model.folder, epoch))
        if dropped:
            self.store.set_checkpoints_pruned(model_id, dropped)
        if self.mirror is not None:
            self._prune_copies(model_id, model, pending)

    def _prune_copies(self, model_id: int, model: KeptModel, pending: set[int]) -> None:
        """Apply the keep-policy to the mirror's copies, over every epoch rather than the local
        files (a copy may outlive its local file: a crash between the two removals, or a
        model folder lost and recovered). Each copy is looked at once per run."""
        wanted = checkpoints.epochs_to_keep(self.policy, range(model.epochs_done), model.best_epoch)
        removed = self._copies_removed.setdefault(model_id, set())
        for epoch in range(model.epochs_done):
            if epoch not in wanted and epoch not in pending and epoch not in removed:
                removed.add(epoch)
                path = checkpoints.epoch_path(model.folder, epoch)
                self._hasher.submit(self._remove_copy, path)

    def _checksum_and_copy(self, path: str) -> str:
        """(On the checksum thread.) A checkpoint's checksum; then its copy on the mirror."""
        digest = checkpoints.checksum(path)
        if self.mirror is not None:
            try:
                self.mirror.upload(path)
            except Exception as e:  # the local checkpoint is still there: warn, go on
                warnings.warn(f"checkpoint mirror: {path} not copied: {e}", stacklevel=2)
        return digest

    def _remove_copy(self, path: str) -> None:
        assert self.mirror is not None  # submitted only by _prune_copies, with a mirror
        try:
            self.mirror.remove(path)
        except Exception as e:
            warnings.warn(f"checkpoint mirror: copy of {path} not pruned: {e}", stacklevel=2)
