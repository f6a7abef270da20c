"""A prepared dataset: sharded Parquet files plus a JSON manifest.

Layout on disk::

    <path>/manifest.json
    <path>/train/shard-00000.parquet ...   # one file per training shard
    <path>/val/shard-00000.parquet ...     # the validation split, sharded the same way

Shard ``i`` of the training split and shard ``i`` of the validation split are placed on the same
worker, so validation also runs where the data already is.
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
        """Checksum of the shard files: two datasets with equal fingerprints hold the same data."""
        return str(self.manifest["fingerprint"])

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
            f"features={self.features!r}, label={self.label!r})"
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
