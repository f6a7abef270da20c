"""Reading the source of :func:`cerebro.prepare_data` into numpy columns whose first axis is rows.

A problem found while reading is a ConfigError that names the file, or the column and its first
bad row, rather than the raw numpy or pyarrow error it would otherwise surface as.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import ConfigError, first_line

PARQUET_SUFFIXES = (".parquet", ".pq")

# Cells of these types make an array column (images, embeddings) rather than a column of objects.
_ARRAY_CELLS = (np.ndarray, list, tuple)


def read_source(source: Any) -> dict[str, np.ndarray]:
    """Columns of ``source`` (a DataFrame, a dict of arrays, or a Parquet/CSV path) as arrays."""
    if isinstance(source, pd.DataFrame):
        return {str(c): _stack_cells(str(c), source[c].to_numpy()) for c in source.columns}
    if isinstance(source, Mapping):
        if not source:
            raise ConfigError("source", source, "a non-empty dict of column name -> numpy array")
        columns = {str(k): _as_array(str(k), v) for k, v in source.items()}
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


def _as_array(name: str, values: Any) -> np.ndarray:
    try:
        array = np.asarray(values)
    except ValueError:
        # numpy refuses nested lists of different lengths without saying where; as a column of
        # one object per row, _stack_cells finds the first row whose shape differs.
        array = np.empty(len(values), dtype=object)
        for row, cell in enumerate(values):
            array[row] = cell
    return _stack_cells(name, array)


def _stack_cells(name: str, values: np.ndarray) -> np.ndarray:
    """An object column whose cells are arrays becomes one array with a leading row axis."""
    if values.dtype != object or values.ndim != 1 or not len(values):
        return values
    missing = pd.isna(values)  # elementwise on an object column; an array cell is not missing
    present = np.flatnonzero(~missing)
    if not len(present) or not isinstance(values[present[0]], _ARRAY_CELLS):
        return values
    if len(present) < len(values):
        row = int(np.flatnonzero(missing)[0])
        raise ConfigError(
            f"source[{name!r}]", values[row], "an array in every row", hint=f"row {row} has none"
        )
    cells = [_cell(name, row, cell) for row, cell in enumerate(values)]
    shape = cells[0].shape
    for row, cell in enumerate(cells):
        if cell.shape != shape:
            raise ConfigError(
                f"source[{name!r}]",
                cell.shape,
                f"array cells that all have one shape, {shape} as in row 0",
                hint=f"row {row} has shape {cell.shape}",
            )
    return np.stack(cells)


def _cell(name: str, row: int, cell: Any) -> np.ndarray:
    try:
        return np.asarray(cell)
    except ValueError as e:  # a cell that is itself a ragged nested list
        raise ConfigError(
            f"source[{name!r}]",
            cell,
            "array cells that all have one shape",
            hint=f"row {row} holds lists of different lengths",
        ) from e


def _read_path(path: Path) -> pa.Table:
    if path.is_dir():
        parquet = sorted(path.rglob("*.parquet"))
        csv = sorted(path.rglob("*.csv"))
        if not parquet and not csv:
            raise ConfigError("source", os.fspath(path), "a folder holding .parquet or .csv files")
        tables = [_read_file(p) for p in (parquet or csv)]
        try:
            return pa.concat_tables(tables)
        except pa.ArrowException as e:
            raise ConfigError(
                "source",
                os.fspath(path),
                "a folder of files with the same columns and types",
                hint=first_line(e),
            ) from e
    if not path.exists():
        raise ConfigError("source", os.fspath(path), "an existing Parquet or CSV file or folder")
    if path.suffix.lower() not in (*PARQUET_SUFFIXES, ".csv"):
        raise ConfigError("source", os.fspath(path), "a file ending in .parquet, .pq or .csv")
    return _read_file(path)


def _read_file(path: Path) -> pa.Table:
    """One Parquet or CSV file; an empty or damaged file is refused by name."""
    read = pq.read_table if path.suffix.lower() in PARQUET_SUFFIXES else pacsv.read_csv
    try:
        return read(path)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(
            "source", os.fspath(path), "a readable Parquet or CSV file", hint=first_line(e)
        ) from e


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
    rows, values = len(column), column
    shape: list[int] = []
    while pa.types.is_fixed_size_list(values.type) or pa.types.is_list(values.type):
        # At depth d, entry i of ``values`` belongs to row i // (cells per row so far), since
        # every shallower level has already been checked to be of one length.
        per_row = int(np.prod(shape))
        if values.null_count:
            first = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
            raise ConfigError(
                f"source[{name!r}]",
                None,
                "a list in every row",
                hint=f"row {first // per_row} holds a null",
            )
        lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
        differ: np.ndarray | list[int] = (
            np.flatnonzero(lengths != lengths[0]) if len(lengths) else []
        )
        if len(differ):
            first = int(differ[0])
            raise ConfigError(
                f"source[{name!r}]",
                f"<a list of {lengths[first]}>",
                f"lists that all have {lengths[0]} items",
                hint=f"row {first // per_row} holds a list of {lengths[first]}",
            )
        shape.append(int(lengths[0]) if len(lengths) else 0)
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False).reshape(rows, *shape)
