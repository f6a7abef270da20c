"""``Dataset.append``: the rows of a new source as the next version of a prepared dataset.

The recipe: read the source and check it against the dataset (columns, shapes, dtypes, label
classes) before anything is written, split its rows as ``prepare_data`` would (seeded by the
dataset's seed and the new version number), write them as shards numbered after the last ones,
then the manifest. Old shard files are never touched, so a reader of an older version and every
shard digest stay valid; a failure removes the new files and leaves the old manifest in place.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import files
from ..errors import ConfigError, check_bool, check_int
from . import checks, folder
from .dataset import MANIFEST, Dataset, DatasetVersion
from .fingerprint import source_fingerprint
from .prepare import _check_has_rows, _manifest_bytes, _validation_rows, _write_shards
from .sources import read_source


def append_rows(
    dataset: Dataset, source: Any, num_shards: int | None, drop_invalid: bool | None
) -> Dataset:
    """The next version of ``dataset`` with the rows of ``source`` (see :meth:`Dataset.append`)."""
    if files.is_url(dataset.path):
        raise ConfigError(
            "dataset",
            dataset.path,
            "a dataset in a local folder",
            hint="append writes new shard files beside the old ones: grow the local copy, "
            "then copy it to the URL again",
        )
    if num_shards is not None:
        check_int("num_shards", num_shards, minimum=1)
    if drop_invalid is not None:
        check_bool("drop_invalid", drop_invalid)
    # Grow the newest version on disk, not the one this object was opened at: an older one
    # would be overwritten otherwise.
    current = Dataset.open(dataset.path)
    manifest = current.manifest
    if current.group_by is not None:
        raise ConfigError(
            "dataset",
            dataset.path,
            "a dataset prepared without group_by",
            hint=f"appending to a dataset grouped by {current.group_by!r} is not supported yet: "
            "prepare the grown source again",
        )
    label, features = current.label, current.features
    if drop_invalid is None:
        drop_invalid = bool(manifest.get("arguments", {}).get("drop_invalid", False))

    columns = read_source(source)
    _check_columns(columns, label, features)
    _check_has_rows(source, len(columns[label]))
    _check_features_match(current, columns)
    invalid = checks.invalid_rows(columns, label, features)
    if invalid and not drop_invalid:
        checks.refuse_invalid(invalid, columns, label)
    checks.check_label_values(label, columns[label], invalid.get(label))
    fingerprint = source_fingerprint(columns, [label, *features])
    _refuse_duplicate(current, fingerprint)

    columns, dropped = checks.drop_rows({c: columns[c] for c in [label, *features]}, invalid)
    codes = _label_codes(current, columns[label])
    num_rows = len(codes)
    num_val = _validation_rows(num_rows, manifest["validation"], 1, dropped)
    added = _shards_to_add(current, num_rows - num_val, num_shards)
    _validation_rows(num_rows, manifest["validation"], added, dropped)  # each new shard has rows

    version = current.version + 1
    order = np.random.default_rng([int(manifest["seed"]), version]).permutation(num_rows)
    splits = {
        split: np.array_split(rows, added)
        for split, rows in (("val", order[:num_val]), ("train", order[num_val:]))
    }
    stored = {f: columns[f] for f in features}
    stored[label] = codes
    shards = range(current.num_shards, current.num_shards + added)
    out = Path(files.as_local(current.path))
    grown = copy.deepcopy(manifest)
    with folder.undone_on_failure(out, current.path) as created:
        new_splits, grown["fingerprint"] = _write_shards(
            out, stored, splits, shards, created, after=current.fingerprint
        )
        for split, meta in new_splits.items():
            old = grown["splits"][split]
            # A manifest from before digests were kept gets its old shards' digests now.
            old["digests"] = [current.shard_digest(split, s) for s in range(current.num_shards)]
            for key in ("files", "rows", "digests"):
                old[key] = [*old[key], *meta[key]]
        new = DatasetVersion(version, shards, num_rows, fingerprint, grown["fingerprint"])
        grown["versions"] = [v.to_json() for v in current.versions] + [new.to_json()]
        grown["version"] = version
        grown["num_rows"] = current.num_rows + num_rows
        grown["num_shards"] = current.num_shards + added
        grown["dropped_rows"] = current.dropped_rows + dropped
        # Written last, in one replace: until then readers see the old version whole.
        files.write_bytes_atomically(os.fspath(out / MANIFEST), _manifest_bytes(grown))
    return Dataset(current.path, grown)


def _check_columns(columns: Mapping[str, np.ndarray], label: str, features: Sequence[str]) -> None:
    """The source holds exactly the dataset's columns: its label and features, nothing else."""
    wanted = [label, *features]
    if label not in columns:
        raise ConfigError(
            "source",
            sorted(columns),
            f"columns that include the dataset's label {label!r}",
            hint=f"the dataset's columns are {wanted}",
        )
    missing = [c for c in wanted if c not in columns]
    extra = [c for c in columns if c not in wanted]
    if missing or extra:
        what = [f"it lacks {missing}"] * bool(missing) + [f"it also has {extra}"] * bool(extra)
        raise ConfigError(
            "source", sorted(columns), f"the dataset's columns {wanted}", hint="; ".join(what)
        )


def _check_features_match(dataset: Dataset, columns: Mapping[str, np.ndarray]) -> None:
    """Each feature has the shape per row and the dtype the dataset's shards hold."""
    schema = _stored_schema(dataset)
    for feature in dataset.manifest["features"]:
        name, shape = feature["name"], tuple(feature["shape"])
        values = columns[name]
        if values.shape[1:] != shape:
            raise ConfigError(
                f"source[{name!r}]",
                f"<rows of shape {values.shape[1:]}>",
                f"rows of shape {shape}, as the dataset's",
            )
        expected = _numpy_dtype(schema.field(name).type)
        if values.dtype != expected:
            raise ConfigError(
                f"source[{name!r}]",
                str(values.dtype),
                f"a column of dtype {expected}, as the dataset's",
                hint=f"cast it first, e.g. values.astype('{expected}')",
            )


def _stored_schema(dataset: Dataset) -> pa.Schema:
    with files.open_for_reading(dataset.shard_path("train", 0)) as f:
        return pq.read_schema(f)


def _numpy_dtype(arrow_type: pa.DataType) -> np.dtype:
    while pa.types.is_fixed_size_list(arrow_type) or pa.types.is_list(arrow_type):
        arrow_type = arrow_type.value_type
    return np.dtype(arrow_type.to_pandas_dtype())


def _refuse_duplicate(dataset: Dataset, fingerprint: str) -> None:
    """The same rows appended twice would be trained on twice per epoch: refused."""
    same = next((v for v in dataset.versions if v.source_fingerprint == fingerprint), None)
    if same is not None:
        raise ConfigError(
            "source",
            f"<source fingerprint {fingerprint}>",
            "rows that the dataset does not hold yet",
            hint=f"the same source made version {same.version} of the dataset at "
            f"{dataset.path}; cerebro.Dataset.open(path) returns it as it is now",
        )


def _label_codes(dataset: Dataset, values: np.ndarray) -> np.ndarray:
    """The new labels encoded as the dataset's: the same class codes, or float targets. A label
    of another kind, or a class the dataset does not have, is refused."""
    label = dataset.manifest["label"]
    name, kind, classes = label["name"], label["kind"], label.get("classes")
    if tuple(values.shape[1:]) != tuple(label["shape"]):
        raise ConfigError(
            f"source[{name!r}]",
            f"<labels of shape {values.shape[1:]}>",
            f"labels of shape {tuple(label['shape'])}, as the dataset's",
        )
    numeric = np.issubdtype(values.dtype, np.number) or values.dtype == bool
    integral = np.issubdtype(values.dtype, np.integer) or values.dtype == bool
    if kind == "regression":
        if not np.issubdtype(values.dtype, np.floating):
            raise ConfigError(
                f"source[{name!r}]", str(values.dtype), "float targets, as the dataset's"
            )
        return values.astype(np.float32)
    if classes is not None:
        if numeric:
            raise ConfigError(
                f"source[{name!r}]",
                str(values.dtype),
                f"text labels among the dataset's classes {classes}",
            )
        text = values.astype(str)
        _refuse_new_classes(name, np.unique(text), classes)
        return np.searchsorted(np.asarray(classes), text).astype(np.int64)
    if not integral:
        raise ConfigError(
            f"source[{name!r}]", str(values.dtype), "integer class labels, as the dataset's"
        )
    known = _known_classes(dataset)
    _refuse_new_classes(name, np.unique(values), known)
    return values.astype(np.int64)


def _refuse_new_classes(name: str, found: np.ndarray, known: Sequence[Any]) -> None:
    new = np.setdiff1d(found, np.asarray(known))
    if len(new):
        shown = [v.item() if isinstance(v, np.generic) else v for v in new[:5]]
        raise ConfigError(
            f"source[{name!r}]",
            shown[0],
            f"labels among the dataset's classes {list(known)}",
            hint=f"{len(new)} new class{'es' * (len(new) > 1)} {shown}: the models were built "
            "for the classes the dataset has; a new class needs a new dataset (prepare_data)",
        )


def _known_classes(dataset: Dataset) -> list[int]:
    """The integer labels the dataset's shards hold (only the label column is read)."""
    label = dataset.label
    found: set[int] = set()
    for split in ("train", "val"):
        for shard in range(dataset.num_shards):
            with files.open_for_reading(dataset.shard_path(split, shard)) as f:
                column = pq.read_table(f, columns=[label]).column(label).combine_chunks()
            if pa.types.is_fixed_size_list(column.type):
                column = column.flatten()
            found.update(np.unique(column.to_numpy(zero_copy_only=False)).tolist())
    return sorted(found)


def _shards_to_add(dataset: Dataset, num_train: int, num_shards: int | None) -> int:
    """``num_shards`` if given; otherwise the count that keeps training shards near the mean
    size of the existing ones, so that hops stay about as long as before."""
    if num_shards is not None:
        return int(num_shards)
    per_shard = dataset.split_rows("train") / dataset.num_shards
    return max(1, min(num_train, round(num_train / per_shard)))
