"""``prepare_data``: split a table once (seeded) and write it as sharded Parquet.

The recipe: check the arguments and the target folder, read and check the source, then either
reopen the dataset already prepared there from the same source and arguments, or write it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import files
from ..errors import ConfigError, check_bool, check_int, is_number
from . import checks, folder
from .dataset import FORMAT_VERSION, MANIFEST, Dataset, first_version
from .fingerprint import content_digest, source_fingerprint
from .groups import (
    DEFAULT_MIN_GROUP_ROWS,
    check_group_arguments,
    group_values,
    split_groups,
)
from .sources import read_source


def prepare_data(
    source: Any,
    path: str | os.PathLike,
    label: str = "y",
    features: Sequence[str] | None = None,
    num_shards: int = 4,
    validation: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
    drop_invalid: bool = False,
    group_by: str | None = None,
    min_group_rows: int = DEFAULT_MIN_GROUP_ROWS,
    small_groups: str = "error",
) -> Dataset:
    """Split ``source`` into training and validation rows and write both as Parquet shards.

    Running the same call again is cheap: a folder that already holds the dataset prepared from
    the same source data with the same arguments is reopened, not rewritten. A folder holding a
    different dataset is refused, saying what differs, unless ``overwrite=True``.

    Args:
        source: a pandas DataFrame, a dict of equal-length numpy arrays (the first axis is rows;
            further axes make fixed-shape array columns such as images), or the path of a Parquet
            or CSV file or of a folder of them.
        path: folder to write: new, empty, or holding a dataset written by ``prepare_data``.
        label: the target column.
        features: input columns (default: every column but ``label``). One array column keeps its
            shape (e.g. (8, 8) images); several columns are flattened and concatenated.
        num_shards: shards per split, fixed here and independent of the number of workers.
        validation: fraction of rows held out for validation, in [0, 1).
        seed: seeds the split, so the same call always writes the same shards.
        overwrite: replace a different dataset at ``path``. Only a dataset's own files are
            deleted; a folder that holds other files and no dataset is refused all the same.
        drop_invalid: leave out rows with NaN or inf in a feature or label, or with no label,
            and count them in :attr:`Dataset.dropped_rows`. By default such a row is refused,
            naming its column and row.
        group_by: a column of integers or strings (a participant, a site) whose groups never
            share a shard: each group is split into training and validation rows on its own
            and gets shards of its own (``max(num_shards, number of groups)`` shards in all,
            given to groups in proportion to their training rows, at least one each). The
            column is not a feature. :attr:`Dataset.groups` lists the groups, and
            ``Experiment(per_group=True)`` trains one model per group and configuration.
        min_group_rows: with ``group_by``, the fewest rows a group may have (default 10: a
            validation row and a few training rows per shard); smaller groups are refused,
            naming them, unless ``small_groups="merge"``.
        small_groups: ``"error"`` (default) or ``"merge"``: groups under ``min_group_rows``
            become one group named ``"other"`` (refused if that is still too small, or if a
            group of that name exists).

    Returns:
        The prepared :class:`Dataset`.

    Example:
        >>> from sklearn.datasets import load_digits                        # doctest: +SKIP
        >>> d = load_digits()                                               # doctest: +SKIP
        >>> ds = cerebro.prepare_data({"x": d.images, "y": d.target}, "data/digits",
        ...                           label="y", num_shards=4)              # doctest: +SKIP

        Grouped, one participant per group:

        >>> import numpy as np, tempfile, cerebro
        >>> rng = np.random.default_rng(0)
        >>> rows = {"x": rng.normal(size=(60, 3)), "y": rng.integers(0, 2, 60),
        ...         "who": np.repeat(["ann", "bob", "cy"], [30, 20, 10])}
        >>> ds = cerebro.prepare_data(rows, tempfile.mkdtemp() + "/g", group_by="who",
        ...                           num_shards=4)
        >>> [(g.name, g.rows, g.shards) for g in ds.groups]
        [('ann', 30, range(0, 2)), ('bob', 20, range(2, 3)), ('cy', 10, range(3, 4))]
        >>> ds.features, ds.shard_group(2)
        (['x'], 'bob')
    """
    _check_arguments(num_shards, seed, validation, overwrite, drop_invalid)
    check_group_arguments(group_by, min_group_rows, small_groups)
    out, shown = Path(path), os.fspath(path)
    existing = folder.dataset_at(out, shown)

    columns = read_source(source)
    grouping = None if group_by is None else group_values(columns, group_by, label)
    features = _choose_columns(columns, label, features, exclude=group_by)
    _check_has_rows(source, len(columns[label]))
    checks.check_features_numeric(columns, features)
    invalid = checks.invalid_rows(columns, label, features)
    if invalid and not drop_invalid:
        checks.refuse_invalid(invalid, columns, label)
    checks.check_label_values(label, columns[label], invalid.get(label))

    used = [label, *features] + ([group_by] if group_by is not None else [])
    # The fingerprint is of the source as read, before any row is dropped: drop_invalid is one of
    # the recorded arguments.
    fingerprint = source_fingerprint(columns, used)
    arguments = {
        "label": label,
        "features": features,
        "num_shards": int(num_shards),
        "validation": float(validation),
        "seed": int(seed),
        "drop_invalid": bool(drop_invalid),
    }
    if group_by is not None:  # only then: ungrouped datasets keep the arguments they had
        arguments.update(
            group_by=group_by, min_group_rows=int(min_group_rows), small_groups=small_groups
        )
    if grouping is not None:
        columns = {**columns, group_by: grouping}  # type: ignore[dict-item]
    columns, dropped = checks.drop_rows({c: columns[c] for c in used}, invalid)
    num_val = _validation_rows(len(columns[label]), validation, num_shards, dropped)

    if existing is not None and not overwrite:
        return folder.reopen_same(out, shown, existing, fingerprint, arguments)
    if existing is not None:
        folder.remove_dataset(out, existing)
    recorded = {"dropped_rows": dropped, "source_fingerprint": fingerprint, "arguments": arguments}
    return _write_dataset(out, shown, columns, arguments, num_val, recorded)


def _write_dataset(
    out: Path,
    shown: str,
    columns: Mapping[str, np.ndarray],
    arguments: Mapping[str, Any],
    num_val: int,
    recorded: Mapping[str, Any],
) -> Dataset:
    """Split the rows (seeded), write the shards, then the manifest; a failure removes them."""
    label, features, num_shards = arguments["label"], arguments["features"], arguments["num_shards"]
    num_rows = len(columns[label])
    group_by = arguments.get("group_by")
    if group_by is None:
        order = np.random.default_rng(arguments["seed"]).permutation(num_rows)
        pieces = {
            split: np.array_split(rows, num_shards)
            for split, rows in (("val", order[:num_val]), ("train", order[num_val:]))
        }
        grouped: dict[str, Any] = {}
    else:
        split = split_groups(
            columns[group_by],
            arguments["validation"],
            num_shards,
            arguments["seed"],
            arguments["min_group_rows"],
            arguments["small_groups"],
        )
        pieces = {"val": split.shards["val"], "train": split.shards["train"]}
        num_shards = len(split.shards["train"])
        grouped = {"group_by": group_by, "groups": [g.to_json() for g in split.groups]}
    label_info = _label_info(label, columns[label])
    stored = {f: columns[f] for f in features}
    stored[label] = label_info.pop("codes")
    manifest = {
        "format_version": FORMAT_VERSION,
        "num_rows": num_rows,
        "num_shards": num_shards,
        "validation": arguments["validation"],
        "seed": arguments["seed"],
        "features": [{"name": f, "shape": list(columns[f].shape[1:])} for f in features],
        "label": label_info,
        **recorded,
        **grouped,
    }
    with folder.undone_on_failure(out, shown) as created:
        folder.make_folder(out, created)
        manifest["splits"], manifest["fingerprint"] = _write_shards(
            out, stored, pieces, range(num_shards), created
        )
        manifest["version"] = 1
        manifest["versions"] = [first_version(manifest).to_json()]
        # Written last: a folder whose manifest is there holds the whole dataset.
        files.write_bytes_atomically(os.fspath(out / MANIFEST), _manifest_bytes(manifest))
    return Dataset(os.fspath(out), manifest)


def _check_arguments(
    num_shards: Any, seed: Any, validation: Any, overwrite: Any, drop_invalid: Any
) -> None:
    check_int("num_shards", num_shards, minimum=1)
    check_int("seed", seed)
    if not is_number(validation) or not 0 <= validation < 1:
        raise ConfigError("validation", validation, "a fraction in [0, 1)")
    for name, value in (("overwrite", overwrite), ("drop_invalid", drop_invalid)):
        check_bool(name, value)


def _choose_columns(
    columns: Mapping[str, np.ndarray],
    label: Any,
    features: Sequence[str] | None,
    exclude: str | None = None,
) -> list[str]:
    """The feature columns, checked against the source's columns and the label (and the group
    column ``exclude``, which is never a feature)."""
    if not isinstance(label, str) or label not in columns:
        raise ConfigError("label", label, f"one of the source's columns {sorted(columns)}")
    if features is None:
        features = [c for c in columns if c not in (label, exclude)]
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
    if exclude is not None and exclude in features:
        raise ConfigError(
            "features", features, f"columns other than the group_by column {exclude!r}"
        )
    if not features:
        raise ConfigError("features", features, "at least one input column besides the label")
    return features


def _check_has_rows(source: Any, num_rows: int) -> None:
    # Checked before the column types: a header-only CSV reads as columns of type null.
    if num_rows:
        return
    if isinstance(source, (str, os.PathLike)):
        raise ConfigError(
            "source", os.fspath(source), "data with at least one row", hint="it has 0 rows"
        )
    raise ConfigError("source", "<0 rows>", "data with at least one row")


def _validation_rows(num_rows: int, validation: float, num_shards: int, dropped: int) -> int:
    """How many of ``num_rows`` to hold out, once the rest is known to fill every shard."""
    if num_rows == 0:  # every row was invalid and dropped
        raise ConfigError(
            "source",
            "<0 rows>",
            "data with at least one row",
            hint=f"drop_invalid=True left out all {dropped} rows",
        )
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
    return num_val


def _write_shards(
    out: Path,
    stored: Mapping[str, np.ndarray],
    splits: Mapping[str, Sequence[np.ndarray]],
    shards: range,
    created: list[Path],
    after: str = "",
) -> tuple[dict[str, Any], str]:
    """Write each split's rows as the shards numbered ``shards`` under ``out`` (``splits``:
    one array of row indices per shard); their names, row counts and content digests, and a
    checksum of them all (chained to the checksum ``after`` of the shards before them, when a
    dataset grows)."""
    digest = hashlib.sha256(after.encode())
    split_meta = {}
    for split, rows in splits.items():
        folder.make_folder(out / split, created)
        names, counts, digests = [], [], []
        for shard, shard_rows in zip(shards, rows, strict=True):
            name = f"{split}/shard-{shard:05d}.parquet"
            if not (out / name).exists():  # undo removes only what this call made
                created.append(out / name)
            pq.write_table(_to_table({c: a[shard_rows] for c, a in stored.items()}), out / name)
            content = (out / name).read_bytes()
            digest.update(content)
            names.append(name)
            counts.append(int(len(shard_rows)))
            digests.append(content_digest(content))
        split_meta[split] = {"files": names, "rows": counts, "digests": digests}
    return split_meta, digest.hexdigest()


def _manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps(manifest, indent=1).encode()


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
