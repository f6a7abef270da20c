"""Checks of the columns :func:`cerebro.prepare_data` is about to write.

Each problem is a ConfigError naming the column and, where rows are at fault, the first of them,
raised before anything is written. Every check is one vectorized pass over a column: a 100 MB
source costs a fraction of the time it takes to read it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from pandas.api.types import infer_dtype

from ..errors import ConfigError

DROP_HINT = "pass drop_invalid=True to leave such rows out"


def check_features_numeric(columns: Mapping[str, np.ndarray], features: Sequence[str]) -> None:
    for name in features:
        dtype = columns[name].dtype
        if not (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)):
            raise ConfigError(f"features[{name!r}]", str(dtype), "a numeric column (or arrays)")


def invalid_rows(
    columns: Mapping[str, np.ndarray], label: str, features: Sequence[str]
) -> dict[str, np.ndarray]:
    """Per column, a mask of the rows it cannot be trained on: NaN or inf in a number, or a
    missing label. Only columns with such rows are listed, the label first."""
    found = {}
    for name in [label, *features]:
        values = columns[name]
        if values.dtype == object:  # only a label can be one: features are numeric by now
            bad = pd.isna(values)
        elif np.issubdtype(values.dtype, np.inexact):
            bad = ~np.isfinite(values)
        else:
            continue  # integers and booleans hold no NaN
        bad = bad.reshape(len(values), -1).any(axis=1)
        if bad.any():
            found[name] = bad
    return found


def refuse_invalid(
    invalid: Mapping[str, np.ndarray], columns: Mapping[str, np.ndarray], label: str
) -> None:
    """Raise for the first column of ``invalid``, naming its first bad row and value."""
    name, bad = next(iter(invalid.items()))
    row = int(np.flatnonzero(bad)[0])
    cell = np.asarray(columns[name][row]).reshape(-1)
    value = cell[pd.isna(cell) | _not_finite(cell)][0]
    count = int(bad.sum())
    where = f"first at row {row}, {count} row{'s' if count > 1 else ''} in all; {DROP_HINT}"
    if name != label:
        raise ConfigError(f"features[{name!r}]", _plain(value), "finite numbers", hint=where)
    text_label = columns[name].dtype == object
    accepted = "a label in every row" if text_label else "a finite label in every row"
    raise ConfigError(f"label[{name!r}]", _plain(value), accepted, hint=where)


def drop_rows(
    columns: Mapping[str, np.ndarray], invalid: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], int]:
    """The columns without the rows any column of ``invalid`` marks, and how many those were."""
    if not invalid:
        return dict(columns), 0
    keep = ~np.logical_or.reduce(list(invalid.values()))
    return {name: values[keep] for name, values in columns.items()}, int((~keep).sum())


def check_label_values(name: str, values: np.ndarray, missing: np.ndarray | None) -> None:
    """An object label must hold scalars of one type: mixed types (1, '1', 2.0) would turn into
    classes of their text, and dicts or lists (struct or list columns) into classes of repr."""
    if values.dtype != object or values.ndim != 1:
        return
    rows = np.flatnonzero(~missing) if missing is not None else np.arange(len(values))
    present = values[rows]
    kind = infer_dtype(present, skipna=False)
    # infer_dtype names one scalar type ("string", "integer", ...) in C; only "mixed..." answers
    # need the per-row look at the types.
    if not kind.startswith("mixed") and kind != "unknown-array":
        return
    types = list(dict.fromkeys(type(v).__name__ for v in present))
    if len(types) == 1:
        raise ConfigError(
            f"label[{name!r}]",
            present[0],
            "numbers or strings",
            hint=f"it holds {types[0]} values, as in row {rows[0]}: "
            "a struct or list column cannot be a label",
        )
    first_type = type(present[0])
    other = next(i for i, v in enumerate(present) if type(v) is not first_type)
    raise ConfigError(
        f"label[{name!r}]",
        present[other],
        "labels of one type",
        hint=f"it mixes {', '.join(types)}; row {rows[other]} is the first "
        f"{type(present[other]).__name__}",
    )


def _not_finite(cell: np.ndarray) -> np.ndarray:
    if cell.dtype == object or not np.issubdtype(cell.dtype, np.inexact):
        return np.zeros(cell.shape, dtype=bool)
    return ~np.isfinite(cell)


def _plain(value: object) -> object:
    """A numpy scalar as the Python value (``nan``, not ``np.float32(nan)``) for messages."""
    return value.item() if isinstance(value, np.generic) else value
