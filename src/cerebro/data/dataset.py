"""A prepared dataset: sharded Parquet files plus a JSON manifest.

Layout on disk::

    <path>/manifest.json
    <path>/train/shard-00000.parquet ...   # one file per training shard
    <path>/val/shard-00000.parquet ...     # the validation split, sharded the same way

Shard ``i`` of the training split and shard ``i`` of the validation split are placed on the same
worker, so validation also runs where the data already is.

A dataset grows by versions (:meth:`Dataset.append`): each adds shards after the last ones, in the
same folder, and rewrites only the manifest, so a reader of an older version still finds its files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import files
from ..errors import ConfigError
from .fingerprint import content_digest
from .groups import GroupInfo, GroupName

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Shard:
    """One shard in memory: model inputs ``x`` and targets ``y``, row-aligned."""

    x: torch.Tensor
    y: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.y.shape[0])

    @property
    def nbytes(self) -> int:
        return self.x.element_size() * self.x.nelement() + self.y.element_size() * self.y.nelement()


@dataclass(frozen=True)
class DatasetVersion:
    """One version of a dataset: what it added to the one before.

    Attributes:
        version: 1 for the rows :func:`cerebro.prepare_data` wrote, +1 per :meth:`Dataset.append`.
        shards: the shard numbers it added (the same in both splits).
        rows: the rows it added, both splits together.
        source_fingerprint: a hash of the source those rows came from.
        fingerprint: :attr:`Dataset.fingerprint` of the dataset as of this version.
    """

    version: int
    shards: range
    rows: int
    source_fingerprint: str | None
    fingerprint: str

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "first_shard": self.shards.start,
            "num_shards": len(self.shards),
            "rows": self.rows,
            "source_fingerprint": self.source_fingerprint,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> DatasetVersion:
        first = int(entry["first_shard"])
        return cls(
            int(entry["version"]),
            range(first, first + int(entry["num_shards"])),
            int(entry["rows"]),
            entry.get("source_fingerprint"),
            str(entry["fingerprint"]),
        )


class Dataset:
    """A dataset prepared by :func:`cerebro.prepare_data`.

    The number of shards is fixed when the dataset is prepared and does not depend on how many
    workers train on it.

    Example:
        >>> ds = cerebro.Dataset.open("data/digits")        # doctest: +SKIP
        >>> ds.num_shards, ds.num_rows, ds.label              # doctest: +SKIP
        (4, 1797, 'y')
    """

    def __init__(self, path: str, manifest: dict[str, Any]) -> None:
        self.path = os.fspath(path)
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike) -> Dataset:
        """Reopen a dataset written by :func:`cerebro.prepare_data`: a local folder, or the same
        folder copied to an fsspec URL (``s3://bucket/digits``) that every worker can read."""
        path = os.fspath(path)
        return cls(path, read_manifest(path))

    @property
    def num_shards(self) -> int:
        return int(self.manifest["num_shards"])

    @property
    def num_rows(self) -> int:
        """Rows in both splits together."""
        return int(self.manifest["num_rows"])

    @property
    def features(self) -> list[str]:
        return [f["name"] for f in self.manifest["features"]]

    @property
    def label(self) -> str:
        return str(self.manifest["label"]["name"])

    @property
    def label_classes(self) -> list[Any] | None:
        """Original values of a string label, in code order (None for numeric labels)."""
        return self.manifest["label"].get("classes")

    @property
    def dropped_rows(self) -> int:
        """Source rows left out by ``prepare_data(..., drop_invalid=True)`` (NaN, inf, no label)."""
        return int(self.manifest.get("dropped_rows", 0))

    @property
    def fingerprint(self) -> str:
        """Checksum of the shard files: two datasets with equal fingerprints hold the same data.
        Each version has its own (see :attr:`versions`)."""
        return str(self.manifest["fingerprint"])

    @property
    def version(self) -> int:
        """1 as prepared, +1 per :meth:`append`."""
        return int(self.manifest.get("version", 1))

    @property
    def versions(self) -> list[DatasetVersion]:
        """Every version up to this one, oldest first (a dataset prepared before versions were
        kept has one, holding all its shards)."""
        recorded = self.manifest.get("versions")
        if recorded is not None:
            return [DatasetVersion.from_json(v) for v in recorded]
        return [first_version(self.manifest)]

    @property
    def group_by(self) -> str | None:
        """The column the dataset was grouped by (``prepare_data(group_by=...)``), or None."""
        return self.manifest.get("group_by")

    @property
    def groups(self) -> list[GroupInfo]:
        """Each group with its rows and shards, in order of name (empty if not grouped)."""
        return [GroupInfo.from_json(g) for g in self.manifest.get("groups", [])]

    def shard_group(self, shard: int) -> GroupName | None:
        """The group whose rows shard ``shard`` holds (in both splits); None if not grouped."""
        for group in self.groups:
            if shard in group.shards:
                return group.name
        if self.group_by is not None or not 0 <= shard < self.num_shards:
            raise ConfigError("shard", shard, f"a shard number in range({self.num_shards})")
        return None

    def version_of(self, fingerprint: str) -> DatasetVersion | None:
        """The version of this dataset whose fingerprint is ``fingerprint``; None if it is no
        version of this dataset. An experiment trained on that version may go on with this one:
        its shards are this one's first ones, with the same bytes."""
        return next((v for v in self.versions if v.fingerprint == fingerprint), None)

    def append(
        self, source: Any, num_shards: int | None = None, drop_invalid: bool | None = None
    ) -> Dataset:
        """Add the rows of ``source`` as new shards, making the next version of this dataset.

        The new rows are split like :func:`cerebro.prepare_data` splits (the same validation
        fraction, shuffled by a seed drawn from the dataset's seed and the new version number, so
        the same call writes the same shards) and written after the last shards, in the same
        folder. Existing shard files are never rewritten: their bytes, digests and any reader of
        an older version are unaffected. The manifest is written last, atomically; a failure
        part-way removes the new files and leaves the old version as it was.

        Args:
            source: what :func:`cerebro.prepare_data` accepts (a DataFrame, a dict of arrays, a
                Parquet or CSV path) with exactly this dataset's columns, shapes and dtypes. A
                string label must hold only classes the dataset already has, an integer label
                only values it already holds (a new class is refused: the models' heads were
                built for the classes there are). A source already in the dataset (equal source
                fingerprint) is refused.
            num_shards: shards to add per split; default: as many as keep the rows per shard
                near the existing training shards' mean (at least one).
            drop_invalid: as in :func:`cerebro.prepare_data`; default: what the dataset was
                prepared with.

        Returns:
            The new version; this object still describes (and reads) the version it was.

        Example:
            >>> import numpy as np, tempfile, cerebro
            >>> rng = np.random.default_rng(0)
            >>> def rows(n):
            ...     return {"x": rng.normal(size=(n, 3)), "y": rng.integers(0, 2, n)}
            >>> folder = tempfile.mkdtemp() + "/grown"
            >>> ds = cerebro.prepare_data(rows(100), folder, num_shards=4, validation=0.2)
            >>> grown = ds.append(rows(50))
            >>> grown.version, grown.num_shards, grown.num_rows
            (2, 6, 150)
            >>> [(v.version, v.shards) for v in grown.versions]
            [(1, range(0, 4)), (2, range(4, 6))]
            >>> grown.shard_digest("train", 0) == ds.shard_digest("train", 0)
            True
        """
        from .append import append_rows  # reads sources with pandas, which workers never load

        return append_rows(self, source, num_shards, drop_invalid)

    def shard_rows(self, split: str) -> list[int]:
        """Rows in each shard of ``split`` ("train" or "val")."""
        return list(self.manifest["splits"][_check_split(split)]["rows"])

    def split_rows(self, split: str) -> int:
        return sum(self.shard_rows(split))

    def shard_path(self, split: str, shard: int) -> str:
        names = self.manifest["splits"][_check_split(split)]["files"]
        return _join(self.path, names[shard])

    def shard_digest(self, split: str, shard: int) -> str:
        """A digest of shard ``shard``'s file content: equal digests, equal rows (whatever the
        dataset or its version). Datasets prepared before digests were kept compute it."""
        digests = self.manifest["splits"][_check_split(split)].get("digests")
        if digests is not None:
            return str(digests[shard])
        with files.open_for_reading(self.shard_path(split, shard)) as f:
            return content_digest(f.read())

    def load_shard(self, split: str, shard: int) -> Shard:
        """Read one shard into CPU tensors (inputs as float32)."""
        path = self.shard_path(split, shard)
        if files.is_url(path):
            with files.open_for_reading(path) as f:
                table = pq.read_table(f)
        else:
            table = pq.read_table(files.as_local(path))
        features = self.manifest["features"]
        columns = [_column_to_numpy(table.column(f["name"]), f["shape"]) for f in features]
        n = table.num_rows
        if len(columns) == 1:
            x = columns[0].reshape(n, *(features[0]["shape"] or [1]))
        else:
            x = np.concatenate([c.reshape(n, -1) for c in columns], axis=1)
        label = self.manifest["label"]
        y = _column_to_numpy(table.column(label["name"]), label["shape"])
        y_dtype = np.int64 if label["kind"] == "class" else np.float32
        return Shard(_tensor(x, np.float32), _tensor(y, y_dtype))

    def __repr__(self) -> str:
        return (
            f"Dataset(path={self.path!r}, num_rows={self.num_rows}, num_shards={self.num_shards}, "
            f"features={self.features!r}, label={self.label!r}"
            + (f", group_by={self.group_by!r}, groups={len(self.groups)}" if self.group_by else "")
            + ")"
        )


def first_version(manifest: dict[str, Any]) -> DatasetVersion:
    """Version 1 of a dataset, as :func:`cerebro.prepare_data` wrote it."""
    return DatasetVersion(
        1,
        range(int(manifest["num_shards"])),
        int(manifest["num_rows"]),
        manifest.get("source_fingerprint"),
        str(manifest["fingerprint"]),
    )


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of the dataset folder ``path``; a ConfigError if it holds no cerebro dataset
    of this format version."""
    if not files.is_url(path) and os.path.isfile(files.as_local(path)):
        raise ConfigError("path", path, "a folder written by cerebro.prepare_data (it is a file)")
    manifest_path = _join(path, MANIFEST)
    if not files.exists(manifest_path):
        raise ConfigError(
            "path", path, "a folder written by cerebro.prepare_data (it has no manifest.json)"
        )
    try:
        with files.open_for_reading(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(
            "path",
            path,
            "a folder written by cerebro.prepare_data",
            hint=f"its manifest.json cannot be read: {e}",
        ) from e
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ConfigError(
            "path",
            path,
            f"a dataset of format version {FORMAT_VERSION}",
            hint=f"its manifest says {version!r}",
        )
    return manifest


def _join(folder: str, name: str) -> str:
    """``folder/name`` for a local path or an fsspec URL (whose separator is always "/")."""
    if files.is_url(folder):
        return f"{folder.rstrip('/')}/{name}"
    return os.path.join(files.as_local(folder), name)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError("split", split, "'train' or 'val'")
    return split


def _tensor(array: np.ndarray, dtype: type) -> torch.Tensor:
    # Arrow hands out read-only buffers; torch needs its own writable, contiguous copy.
    return torch.from_numpy(np.require(array, dtype=dtype, requirements=["C", "W"]))


def _column_to_numpy(column: pa.ChunkedArray, shape: list[int]) -> np.ndarray:
    array = column.combine_chunks()
    n = len(array)
    if shape:
        values = array.flatten().to_numpy(zero_copy_only=False)
        return values.reshape(n, *shape)
    return array.to_numpy(zero_copy_only=False)
