"""``prepare_data``: split a table once (seeded) and write it as sharded Parquet."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import ConfigError
from .dataset import FORMAT_VERSION, MANIFEST, Dataset


def prepare_data(
    source: Any,
    path: str | os.PathLike,
    label: str = "y",
    features: Sequence[str] | None = None,
    num_shards: int = 4,
    validation: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
) -> Dataset:
    """Split ``source`` into training and validation rows and write both as Parquet shards.

    Args:
        source: a pandas DataFrame, a dict of equal-length numpy arrays (the first axis is rows;
            further axes make fixed-shape array columns such as images), or the path of a Parquet
            or CSV file or of a folder of them.
        path: folder to write (created; must be empty unless ``overwrite=True``).
        label: the target column.
        features: input columns (default: every column but ``label``). One array column keeps its
            shape (e.g. (8, 8) images); several columns are flattened and concatenated.
        num_shards: shards per split, fixed here and independent of the number of workers.
        validation: fraction of rows held out for validation, in [0, 1).
        seed: seeds the split, so the same call always writes the same shards.
        overwrite: replace an existing dataset at ``path``.

    Returns:
        The prepared :class:`Dataset`.

    Example:
        >>> from sklearn.datasets import load_digits                        # doctest: +SKIP
        >>> d = load_digits()                                               # doctest: +SKIP
        >>> ds = cerebro.prepare_data({"x": d.images, "y": d.target}, "data/digits",
        ...                           label="y", num_shards=4)              # doctest: +SKIP
    """
    _check_int("num_shards", num_shards, minimum=1)
    _check_int("seed", seed, minimum=None)
    if (
        not isinstance(validation, (int, float))
        or isinstance(validation, bool)
        or not (0 <= validation < 1)
    ):
        raise ConfigError("validation", validation, "a fraction in [0, 1)")
    columns = _read_source(source)
    if not isinstance(label, str) or label not in columns:
        raise ConfigError("label", label, f"one of the source's columns {sorted(columns)}")
    if features is None:
        features = [c for c in columns if c != label]
    elif isinstance(features, str) or not isinstance(features, Sequence):
        raise ConfigError("features", features, "a list of column names or None")
    features = list(features)
    unknown = [f for f in features if f not in columns]
    if unknown:
        raise ConfigError(
            "features", unknown, f"names among the source's columns {sorted(columns)}"
        )
    if label in features:
        raise ConfigError("features", features, f"columns other than the label {label!r}")
    if not features:
        raise ConfigError("features", features, "at least one input column besides the label")
    for name in features:
        if not np.issubdtype(columns[name].dtype, np.number) and columns[name].dtype != bool:
            raise ConfigError(
                f"features[{name!r}]", str(columns[name].dtype), "a numeric column (or arrays)"
            )
    num_rows = len(columns[label])
    if num_rows == 0:
        raise ConfigError("source", "<0 rows>", "data with at least one row")
    num_val = int(round(validation * num_rows))
    if validation > 0 and num_rows > 1:
        num_val = max(num_val, 1)
    num_train = num_rows - num_val
    if num_shards > num_train:
        raise ConfigError(
            "num_shards",
            num_shards,
            f"at most the number of training rows ({num_train})",
        )

    out = Path(path)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(
                "path", os.fspath(path), "an empty or new folder", hint="pass overwrite=True"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    order = np.random.default_rng(seed).permutation(num_rows)
    splits = {"val": order[:num_val], "train": order[num_val:]}
    label_info = _label_info(label, columns[label])
    feature_info = [{"name": f, "shape": list(columns[f].shape[1:])} for f in features]
    stored = {f: columns[f] for f in features}
    stored[label] = label_info.pop("codes")

    digest = hashlib.sha256()
    split_meta = {}
    for split, rows in splits.items():
        (out / split).mkdir()
        files, counts = [], []
        for shard, shard_rows in enumerate(np.array_split(rows, num_shards)):
            name = f"{split}/shard-{shard:05d}.parquet"
            table = _to_table({c: a[shard_rows] for c, a in stored.items()})
            pq.write_table(table, out / name)
            digest.update((out / name).read_bytes())
            files.append(name)
            counts.append(int(len(shard_rows)))
        split_meta[split] = {"files": files, "rows": counts}

    manifest = {
        "format_version": FORMAT_VERSION,
        "num_rows": num_rows,
        "num_shards": num_shards,
        "validation": float(validation),
        "seed": seed,
        "features": feature_info,
        "label": label_info,
        "splits": split_meta,
        "fingerprint": digest.hexdigest(),
    }
    with open(out / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
    return Dataset(os.fspath(out), manifest)


def _check_int(name: str, value: Any, minimum: int | None) -> None:
    bad = not isinstance(value, (int, np.integer)) or isinstance(value, bool)
    if bad or (minimum is not None and value < minimum):
        raise ConfigError(name, value, "an integer" + (f" >= {minimum}" if minimum else ""))


def _read_source(source: Any) -> dict[str, np.ndarray]:
    """Columns of ``source`` as numpy arrays whose first axis is rows."""
    if isinstance(source, pd.DataFrame):
        return {str(c): _stack_cells(source[c].to_numpy()) for c in source.columns}
    if isinstance(source, Mapping):
        columns = {str(k): np.asarray(v) for k, v in source.items()}
        if not columns:
            raise ConfigError("source", source, "a non-empty dict of column name -> numpy array")
        lengths = {k: (len(v) if v.ndim else -1) for k, v in columns.items()}
        if len(set(lengths.values())) != 1 or -1 in lengths.values():
            raise ConfigError("source", lengths, "arrays that all have the same number of rows")
        return columns
    if isinstance(source, (str, os.PathLike)):
        return _table_columns(_read_path(Path(source)))
    raise ConfigError(
        "source",
        source,
        "a pandas DataFrame, a dict of numpy arrays, or a path to Parquet/CSV files",
    )


def _read_path(path: Path) -> pa.Table:
    if path.is_dir():
        parquet = sorted(path.rglob("*.parquet"))
        csv = sorted(path.rglob("*.csv"))
        if parquet:
            return pa.concat_tables([pq.read_table(p) for p in parquet])
        if csv:
            return pa.concat_tables([pacsv.read_csv(p) for p in csv])
        raise ConfigError("source", os.fspath(path), "a folder holding .parquet or .csv files")
    if not path.exists():
        raise ConfigError("source", os.fspath(path), "an existing Parquet or CSV file or folder")
    if path.suffix.lower() in (".parquet", ".pq"):
        return pq.read_table(path)
    if path.suffix.lower() == ".csv":
        return pacsv.read_csv(path)
    raise ConfigError("source", os.fspath(path), "a file ending in .parquet, .pq or .csv")


def _table_columns(table: pa.Table) -> dict[str, np.ndarray]:
    columns = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type):
            columns[name] = _list_column(name, column)
        else:
            columns[name] = column.to_numpy(zero_copy_only=False)
    return columns


def _list_column(name: str, column: pa.Array) -> np.ndarray:
    """A (possibly nested) list column whose cells all have one shape, as an n-d array."""
    rows, shape, values = len(column), [], column
    while pa.types.is_fixed_size_list(values.type) or pa.types.is_list(values.type):
        lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
        if len(lengths) and lengths.min() != lengths.max():
            raise ConfigError(
                f"source column {name!r}", "<lists of different lengths>", "cells of one shape"
            )
        shape.append(int(lengths[0]) if len(lengths) else 0)
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False).reshape(rows, *shape)


def _stack_cells(values: np.ndarray) -> np.ndarray:
    """An object column whose cells are arrays becomes one array with a leading row axis."""
    if values.dtype == object and len(values) and isinstance(values[0], (np.ndarray, list, tuple)):
        try:
            return np.stack([np.asarray(v) for v in values])
        except ValueError as e:
            raise ConfigError(
                "source",
                "<array cells of different shapes>",
                "array cells that all have the same shape",
            ) from e
    return values


def _label_info(name: str, values: np.ndarray) -> dict[str, Any]:
    """Describe the label and encode it: integers/strings as class codes, floats as targets."""
    info: dict[str, Any] = {"name": name, "shape": list(values.shape[1:])}
    if np.issubdtype(values.dtype, np.integer) or values.dtype == bool:
        info.update(kind="class", codes=values.astype(np.int64))
    elif np.issubdtype(values.dtype, np.floating):
        info.update(kind="regression", codes=values.astype(np.float32))
    else:
        classes, codes = np.unique(values.astype(str), return_inverse=True)
        info.update(kind="class", classes=classes.tolist(), codes=codes.astype(np.int64))
    return info


def _to_table(columns: Mapping[str, np.ndarray]) -> pa.Table:
    arrays = {}
    for name, values in columns.items():
        if values.ndim > 1:
            flat = pa.array(np.ascontiguousarray(values).reshape(-1))
            width = int(np.prod(values.shape[1:]))
            arrays[name] = pa.FixedSizeListArray.from_arrays(flat, width)
        else:
            arrays[name] = pa.array(values)
    return pa.table(arrays)
