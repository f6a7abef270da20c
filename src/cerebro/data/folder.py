"""The folder :func:`cerebro.prepare_data` writes to.

Cerebro only ever deletes what it wrote: the files a dataset's manifest lists, the manifest, and
its ``train``/``val`` folders once empty. A folder that holds anything else without a cerebro
manifest is refused, even with ``overwrite=True``, and a failed or interrupted write removes the
files it had written, so that a re-run finds the folder as the failed call found it (less the old
dataset, when it was replacing one).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import ConfigError
from .dataset import MANIFEST, SPLITS, Dataset, read_manifest
from .fingerprint import differences

REPLACE_HINT = "choose another path, or pass overwrite=True to replace that dataset"


def dataset_at(out: Path, shown: str) -> dict[str, Any] | None:
    """The manifest of the cerebro dataset at ``out``, or None where ``out`` is new or an empty
    folder. Refuses a file, a path below a file, a new path in a folder this process cannot
    write, and a folder that holds something other than a cerebro dataset."""
    if out.exists() and not out.is_dir():
        raise ConfigError("path", shown, "a folder, new or empty", hint="it is a file")
    if not out.exists():
        _check_can_create(out, shown)
        return None
    entries = _entries(out, shown)
    if not entries:
        return None
    try:
        return read_manifest(os.fspath(out))
    except ConfigError:
        raise ConfigError(
            "path",
            shown,
            "a new or empty folder, or one that holds a cerebro dataset",
            hint=f"it holds {_few(entries)} and no cerebro manifest; nothing there is deleted, "
            "even with overwrite=True: choose another path",
        ) from None


def reopen_same(
    out: Path, shown: str, manifest: Mapping[str, Any], source: str, arguments: Mapping[str, Any]
) -> Dataset:
    """The dataset at ``out`` if it was prepared from this source with these arguments and is
    whole; otherwise a ConfigError saying what differs."""
    found = differences(manifest, source, arguments)
    if found:
        raise ConfigError(
            "path",
            shown,
            "a new or empty folder, or one that holds this same dataset",
            hint=f"it holds a dataset prepared {'; '.join(found)}: {REPLACE_HINT}",
        )
    missing = [name for name in _dataset_files(manifest) if not (out / name).is_file()]
    if missing:
        raise ConfigError(
            "path",
            shown,
            "a whole dataset",
            hint=f"the dataset there lacks {_few(missing)}: {REPLACE_HINT}",
        )
    return Dataset.open(out)


def remove_dataset(out: Path, manifest: Mapping[str, Any]) -> None:
    """Delete the files of the dataset at ``out`` and nothing else: any other file stays."""
    for name in _dataset_files(manifest):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    (out / MANIFEST).unlink()
    for split in SPLITS:
        with contextlib.suppress(OSError):  # still holds someone's files: leave it
            (out / split).rmdir()


@contextlib.contextmanager
def undone_on_failure(out: Path, shown: str) -> Iterator[list[Path]]:
    """Yield a list that the writer extends with every file and folder it creates, in order; if
    the block fails (or is interrupted), those are removed again, last first. Folders are removed
    only if empty. A PermissionError becomes a ConfigError naming ``path``."""
    created: list[Path] = []
    try:
        yield created
    except BaseException as e:
        for written in reversed(created):
            with contextlib.suppress(OSError):
                written.rmdir() if written.is_dir() else written.unlink()
        if isinstance(e, PermissionError):
            raise ConfigError("path", shown, "a folder this process may write", hint=str(e)) from e
        raise


def make_folder(folder: Path, created: list[Path]) -> None:
    """``folder`` and any missing parents, each new one added to ``created``."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for new in reversed(missing):
        new.mkdir()
        created.append(new)


def _check_can_create(out: Path, shown: str) -> None:
    ancestor = next(p for p in out.parents if p.exists())
    if not ancestor.is_dir():
        raise ConfigError("path", shown, "a path below a folder", hint=f"{ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(
            "path", shown, "a folder this process may write", hint=f"{ancestor} is not writable"
        )


def _entries(out: Path, shown: str) -> list[str]:
    try:
        return sorted(os.listdir(out))
    except PermissionError as e:
        raise ConfigError("path", shown, "a folder this process may read", hint=str(e)) from e


def _dataset_files(manifest: Mapping[str, Any]) -> list[str]:
    """The shard files a manifest lists; only names of the form ``train/<file>.parquet`` count,
    so that no manifest, however edited, can point a deletion outside the dataset."""
    splits = manifest.get("splits")
    listed = [
        name
        for split in (splits.values() if isinstance(splits, Mapping) else [])
        for name in (split.get("files", []) if isinstance(split, Mapping) else [])
    ]
    return [name for name in listed if _is_shard_name(name)]


def _is_shard_name(name: object) -> bool:
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    return len(parts) == 2 and parts[0] in SPLITS and parts[1].endswith(".parquet")


def _few(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
