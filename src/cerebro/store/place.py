"""What an experiment path holds, and what a run may do with it.

A path is the folder of one experiment: its records (``cerebro.db`` and SQLite's -wal/-shm
files, unless ``storage`` holds them), ``checkpoints/model-NNNNN/`` (or the ``checkpoint_dir``
given), ``build.pkl``, ``tensorboard/``, ``features/`` (kept frozen-prefix outputs) and the
driver's ``.lock``. Everything else in it is someone else's. Nothing here writes; :func:`clear`
deletes only cerebro's own entries, and only after :func:`check_claim` has let a run take the
path.

Example:
    >>> held = survey("runs/never-made", "runs/never-made/checkpoints", own_records=True)
    >>> str(held.records), held.checkpoints, held.foreign
    ('missing (no cerebro.db)', [], [])
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

from .. import files
from ..errors import ConfigError
from ..kinds import ExperimentStatus
from .records import Fault, RecordsProblem, sqlite_file, sqlite_problem

LOCK_FILE = ".lock"
_RECORD_FILES = ("cerebro.db", "cerebro.db-wal", "cerebro.db-shm", "cerebro.db-journal")
# build.pkl is named in engine/result.py; the engine is a layer above the store.
_OWN_ENTRIES = (*_RECORD_FILES, "checkpoints", "build.pkl", "tensorboard", "features", LOCK_FILE)
_MODEL_FOLDER = re.compile(r"model-\d{5,}")
_SHOWN = 5  # entries named in a message


@dataclass(frozen=True)
class Holdings:
    """What an experiment path holds, as one look found it.

    Attributes:
        path: the experiment path.
        checkpoint_dir: where its models' states and checkpoints live.
        records: None if the records at ``path`` hold an experiment (or live in ``storage``),
            else why not, e.g. ``missing (no cerebro.db)``, ``empty (cerebro.db has 0 bytes)``.
        checkpoints: the ``model-NNNNN`` folders in ``checkpoint_dir`` that hold files.
        foreign: entries of ``path`` that cerebro did not write (a person's files).
    """

    path: str
    checkpoint_dir: str
    records: RecordsProblem | None
    checkpoints: list[str]
    foreign: list[str]

    @property
    def cerebros(self) -> bool:
        """Whether cerebro left anything here besides an experiment the records hold: a
        cerebro.db that holds none (empty, unreadable), or models' states. The caller knows
        whether the records (at ``path`` or in ``storage``) hold this experiment."""
        own_db = self.records is not None and self.records.fault is not Fault.MISSING
        return own_db or bool(self.checkpoints)


def survey(path: str, checkpoint_dir: str, own_records: bool) -> Holdings:
    """Look at ``path`` without changing it. ``own_records``: the records are ``cerebro.db``
    at ``path`` (not in a ``storage`` database)."""
    records = sqlite_problem(sqlite_file(path)) if own_records else None
    states = _model_folders(checkpoint_dir)
    return Holdings(path, checkpoint_dir, records, states, _foreign(path, checkpoint_dir))


def check_path(path: str, checkpoint_dir: str, own_records: bool, overwrite: bool) -> None:
    """What an Experiment checks of its path when it is made, before any work: its folders can
    be written and, with its records at ``path``, a run would lose nothing there. (The run
    checks the claim again, holding the path's lock.)"""
    check_folder("path", path)
    if not files.is_url(checkpoint_dir):
        check_folder("checkpoint_dir", checkpoint_dir)
    if own_records:
        held = survey(path, checkpoint_dir, own_records=True)
        check_claim(held, has_records=held.records is None, overwrite=overwrite)


def check_claim(held: Holdings, has_records: bool, overwrite: bool) -> None:
    """Refuse, before anything is written or deleted, a run that would lose what ``held``
    holds. ``has_records``: the records hold an earlier experiment of this name to continue
    (or to delete with ``overwrite``).

    Raises:
        ConfigError: checkpoints without their records (a new run would overwrite the states of
            the one that made them); records that are not cerebro's, or unreadable; with
            ``overwrite``, a path that holds someone else's files and nothing of cerebro's.
    """
    records = held.records
    fault = records.fault if records is not None else None
    if fault is Fault.FOREIGN:  # another program's database: never ours to delete
        raise ConfigError(
            "path",
            held.path,
            "a path whose cerebro.db is cerebro's",
            hint=f"its records are {records}; choose another path, or move that file away",
        )
    recovery = "restore cerebro.db from a backup, move {} away, or pass overwrite=True to delete {}"
    if held.checkpoints and not has_records and not overwrite:
        where = (
            f"their records are {records}"
            if records is not None
            else "the storage holds no record of them"
        )
        raise ConfigError(
            "path",
            held.path,
            "a path whose checkpoints have their records",
            hint=f"checkpoints of an earlier run exist in {held.checkpoint_dir} "
            f"({_shown(held.checkpoints)}), but {where}: nothing was written or deleted; "
            + recovery.format("the checkpoints", "them"),
        )
    if fault is Fault.UNREADABLE and not overwrite:
        raise ConfigError(
            "path",
            held.path,
            "a path whose records are readable",
            hint=f"its records are {records}; " + recovery.format("it", "it"),
        )
    if overwrite and held.foreign and not (has_records or held.cerebros):
        raise ConfigError(
            "path",
            held.path,
            "for overwrite=True, a new or empty folder or one holding a cerebro experiment",
            hint=f"it holds {_shown(held.foreign)} and no cerebro records: nothing was deleted; "
            "choose another path, or leave out overwrite=True to add the experiment beside them",
        )


def clear(path: str, checkpoint_dir: str) -> None:
    """Delete what cerebro wrote for an experiment (the caller deletes its records), and
    nothing else: a person's files in ``path`` or ``checkpoint_dir`` stay."""
    for name in ("build.pkl", "tensorboard", "features"):
        target = os.path.join(path, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(target)
    # .lock stays: this driver holds it, and a new file would let a second driver in.
    if files.is_url(checkpoint_dir):
        fs, root = files.filesystem(checkpoint_dir)
        for folder in _model_folders(checkpoint_dir):
            fs.rm(f"{root.rstrip('/')}/{folder}", recursive=True)
        return
    for folder in _model_folders(checkpoint_dir):
        shutil.rmtree(os.path.join(checkpoint_dir, folder), ignore_errors=True)
    with contextlib.suppress(OSError):  # only if nothing else is in it
        os.rmdir(checkpoint_dir)


def check_folder(argument: str, path: str) -> None:
    """Refuse, before any work, an experiment folder that cannot be made or written: an existing
    file, a path under a file, or a folder without write permission."""
    accepted = "a folder (existing or new) that this process can write"
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(argument, path, accepted, hint="it is a file")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(argument, path, accepted, hint=f"{existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        shown = "it" if existing == os.path.abspath(path) else existing
        raise ConfigError(argument, path, accepted, hint=f"no permission to write in {shown}")


def driver_running(path: str | None) -> bool | None:
    """Whether a driver holds the experiment at ``path`` now (None: no local path to tell)."""
    if path is None:
        return None
    lock = os.path.join(path, LOCK_FILE)
    if not os.path.exists(lock):
        return False
    try:
        with open(lock) as handle:  # for reading: a reader writes nothing, not even the lock
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:  # e.g. another user's lock file that this one cannot read
        return None
    return False


def live_status(recorded: str, path: str | None) -> str:
    """An experiment's status as a reader should report it: a recorded ``running`` whose
    driver no longer holds the path's lock was interrupted (the driver was killed)."""
    if recorded == ExperimentStatus.RUNNING and driver_running(path) is False:
        return ExperimentStatus.INTERRUPTED.value
    return recorded


def experiment_folder(path_or_url: str | os.PathLike, row: dict[str, Any]) -> str | None:
    """The experiment's folder on this machine, if it has one here (records at a URL name
    theirs in the config)."""
    text = os.fspath(path_or_url)
    path = text if "://" not in text else row["config"].get("path")
    return path if path and os.path.isdir(path) else None


def _model_folders(checkpoint_dir: str) -> list[str]:
    """The ``model-NNNNN`` folders that hold files: the states of an experiment's models."""
    if files.is_url(checkpoint_dir):
        fs, root = files.filesystem(checkpoint_dir)
        try:
            entries = fs.ls(root, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted(n for n in names if _MODEL_FOLDER.fullmatch(n) and fs.ls(f"{root}/{n}"))
    if not os.path.isdir(checkpoint_dir):
        return []
    return sorted(
        name
        for name in os.listdir(checkpoint_dir)
        if _MODEL_FOLDER.fullmatch(name)
        and os.path.isdir(folder := os.path.join(checkpoint_dir, name))
        and os.listdir(folder)
    )


def _foreign(path: str, checkpoint_dir: str) -> list[str]:
    """Entries of ``path`` that cerebro did not write (a ``checkpoint_dir`` in it is its own)."""
    if not os.path.isdir(path):
        return []
    own = set(_OWN_ENTRIES)
    if not files.is_url(checkpoint_dir):
        inside = os.path.relpath(os.path.abspath(checkpoint_dir), os.path.abspath(path))
        own.add(inside.split(os.sep)[0])
    return sorted(
        name
        for name in os.listdir(path)
        if name not in own and not name.startswith(f"build.pkl{files.PARTIAL_MARK}")
    )


def _shown(names: list[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more
