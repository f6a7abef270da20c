"""Grouped datasets: ``prepare_data(..., group_by="participant")``.

The rows of one group never share a shard with another group's rows. Each group is split into
training and validation rows on its own (seeded), and gets one or more shards of its own: shard
``i`` of the training split and shard ``i`` of the validation split hold the same group, so a
group's validation also runs where its training data is. The manifest lists each group, its rows
and its shards, so a per-group model (``Experiment(per_group=True)``) visits only its group's
shards.

Group values are integers or strings (a column of floats, booleans or objects is refused, as is
a null in it). Groups are ordered by value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, check_int

# The fewest rows a group may have by default: enough for a validation row and a few training
# rows in each of its shards. ``min_group_rows`` chooses another.
DEFAULT_MIN_GROUP_ROWS = 10
SMALL_GROUPS = ("error", "merge")
OTHER = "other"  # the group small ones are merged into with small_groups="merge"

GroupName = int | str


@dataclass(frozen=True)
class GroupInfo:
    """One group of a grouped dataset (see :attr:`cerebro.Dataset.groups`).

    Attributes:
        name: the group's value in the ``group_by`` column (``"other"`` for merged small groups).
        rows: its rows, both splits together.
        train_rows, val_rows: its rows in each split.
        shards: its shard numbers (the same in both splits).
        merged: for the ``"other"`` group, the names of the small groups merged into it.
    """

    name: GroupName
    rows: int
    train_rows: int
    val_rows: int
    shards: range
    merged: tuple[GroupName, ...] = ()

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": self.name,
            "rows": self.rows,
            "train_rows": self.train_rows,
            "val_rows": self.val_rows,
            "first_shard": self.shards.start,
            "num_shards": len(self.shards),
        }
        if self.merged:
            entry["merged"] = list(self.merged)
        return entry

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> GroupInfo:
        first = int(entry["first_shard"])
        return cls(
            entry["name"],
            int(entry["rows"]),
            int(entry["train_rows"]),
            int(entry["val_rows"]),
            range(first, first + int(entry["num_shards"])),
            tuple(entry.get("merged", ())),
        )


@dataclass(frozen=True)
class GroupedSplit:
    """Where each row goes: the source rows of every shard of each split, and the groups."""

    shards: dict[str, list[np.ndarray]]  # split -> one array of source row indices per shard
    groups: list[GroupInfo]


def check_group_arguments(group_by: Any, min_group_rows: Any, small_groups: Any) -> None:
    if group_by is not None and not isinstance(group_by, str):
        raise ConfigError("group_by", group_by, "None or the name of a column")
    check_int("min_group_rows", min_group_rows, minimum=1)
    if small_groups not in SMALL_GROUPS:
        raise ConfigError(
            "small_groups",
            small_groups,
            "'error' (refuse groups under min_group_rows) or 'merge' (merge them into one "
            f"group named {OTHER!r})",
        )


def group_values(columns: Mapping[str, np.ndarray], group_by: str, label: str) -> np.ndarray:
    """The group column as integers or strings; a ConfigError naming it if it is missing, the
    label, of another type, or holds a null."""
    if group_by not in columns:
        raise ConfigError("group_by", group_by, f"one of the source's columns {sorted(columns)}")
    if group_by == label:
        raise ConfigError("group_by", group_by, f"a column other than the label {label!r}")
    values = columns[group_by]
    if values.ndim != 1:
        raise ConfigError(
            "group_by", group_by, "a column of one integer or string per row", hint="arrays"
        )
    if np.issubdtype(values.dtype, np.integer):
        return values.astype(np.int64)
    if np.issubdtype(values.dtype, np.floating):
        null = np.flatnonzero(np.isnan(values))
        if len(null):
            raise _null_error(group_by, int(null[0]), len(null))
        raise ConfigError(
            "group_by",
            group_by,
            "a column of integers or strings",
            hint=f"it holds floats (row 0: {values[0]!r}); cast it to int or str first",
        )
    if values.dtype.kind in "US":
        return values.astype(str)
    if values.dtype == object:
        nulls = [i for i, v in enumerate(values) if v is None or (isinstance(v, float) and v != v)]
        if nulls:
            raise _null_error(group_by, nulls[0], len(nulls))
        kinds = {type(v) for v in values}
        if kinds <= {str}:
            return values.astype(str)
        if all(issubclass(k, (int, np.integer)) and not issubclass(k, bool) for k in kinds):
            return values.astype(np.int64)
        shown = ", ".join(sorted(k.__name__ for k in kinds))
        raise ConfigError(
            "group_by", group_by, "a column of integers or strings", hint=f"it holds {shown}"
        )
    raise ConfigError(
        "group_by",
        group_by,
        "a column of integers or strings",
        hint=f"it holds {values.dtype} values",
    )


def _null_error(column: str, row: int, count: int) -> ConfigError:
    return ConfigError(
        "group_by",
        column,
        "a column with a group for every row",
        hint=f"{count} rows have none (null/NaN), the first at row {row}; drop or fill them",
    )


def split_groups(
    groups: np.ndarray,
    validation: float,
    num_shards: int,
    seed: int,
    min_group_rows: int,
    small_groups: str,
) -> GroupedSplit:
    """Split every group on its own and give it shards of its own.

    Groups under ``min_group_rows`` rows are refused, naming them, or merged into one group
    ``"other"`` (``small_groups="merge"``). There are ``max(num_shards, number of groups)``
    shards, given to the groups in proportion to their training rows (largest remainder),
    at least one each and never more than a group has training rows.

    Example:
        >>> g = np.array(["a"] * 30 + ["b"] * 10)
        >>> split = split_groups(g, validation=0.2, num_shards=4, seed=0,
        ...                      min_group_rows=10, small_groups="error")
        >>> [(i.name, i.train_rows, i.val_rows, i.shards) for i in split.groups]
        [('a', 24, 6, range(0, 3)), ('b', 8, 2, range(3, 4))]
        >>> [len(rows) for rows in split.shards["train"]]
        [8, 8, 8, 8]
    """
    names, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(len(names))]
    named: list[tuple[GroupName, np.ndarray, tuple[GroupName, ...]]] = [
        (_plain(n), rows, ()) for n, rows in zip(names, members)
    ]
    named = _small_groups(named, min_group_rows, small_groups)
    rng = np.random.default_rng(seed)
    train_parts, val_parts = [], []
    for name, rows, _ in named:
        order = rows[rng.permutation(len(rows))]
        num_val = int(round(validation * len(rows)))
        if validation > 0 and len(rows) > 1:
            num_val = max(num_val, 1)
        if num_val == len(rows):
            raise ConfigError(
                "validation",
                validation,
                f"a fraction that leaves group {name!r} ({len(rows)} rows) a training row",
            )
        val_parts.append(order[:num_val])
        train_parts.append(order[num_val:])
    counts = _apportion([len(t) for t in train_parts], max(num_shards, len(named)))
    shards: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    infos = []
    for (name, rows, merged), train, val, count in zip(named, train_parts, val_parts, counts):
        first = len(shards["train"])
        shards["train"] += np.array_split(train, count)
        shards["val"] += np.array_split(val, count)
        infos.append(
            GroupInfo(name, len(rows), len(train), len(val), range(first, first + count), merged)
        )
    return GroupedSplit(shards, infos)


def _plain(value: Any) -> GroupName:
    """A numpy scalar as the int or str it holds (what the manifest's JSON keeps)."""
    return int(value) if isinstance(value, np.integer) else str(value)


def _small_groups(
    named: list[tuple[GroupName, np.ndarray, tuple[GroupName, ...]]],
    min_rows: int,
    policy: str,
) -> list[tuple[GroupName, np.ndarray, tuple[GroupName, ...]]]:
    small = [(n, r) for n, r, _ in named if len(r) < min_rows]
    if not small:
        return named
    shown = ", ".join(f"{n!r} ({len(r)} rows)" for n, r in small[:10])
    if len(small) > 10:
        shown += f" and {len(small) - 10} more"
    if policy == "error":
        raise ConfigError(
            "min_group_rows",
            min_rows,
            "a minimum every group reaches",
            hint=f"groups with fewer rows: {shown}; pass small_groups='merge' to merge them into "
            f"one group {OTHER!r}, or a smaller min_group_rows",
        )
    kept = [g for g in named if len(g[1]) >= min_rows]
    if any(str(n) == OTHER for n, _, _ in kept):
        raise ConfigError(
            "small_groups",
            policy,
            f"'error' here: the source already has a group named {OTHER!r}",
            hint=f"small groups ({shown}) cannot be merged into a new one of that name",
        )
    rows = np.sort(np.concatenate([r for _, r in small]))
    if len(rows) < min_rows:
        raise ConfigError(
            "min_group_rows",
            min_rows,
            "a minimum the merged small groups reach",
            hint=f"merged, the groups {shown} have {len(rows)} rows; choose a smaller minimum",
        )
    return [*kept, (OTHER, rows, tuple(n for n, _ in small))]


def _apportion(sizes: Sequence[int], total: int) -> list[int]:
    """``total`` shards over groups of ``sizes`` training rows: proportional (largest
    remainder), at least one each and at most ``size`` each.

    >>> _apportion([100, 50, 10], 8)
    [5, 2, 1]
    """
    total = min(total, sum(sizes))
    counts = [1] * len(sizes)
    spare = total - len(sizes)
    whole = sum(sizes)
    if spare > 0:
        quotas = [s * total / whole - 1 for s in sizes]
        extra = [min(max(int(q), 0), s - 1) for q, s in zip(quotas, sizes)]
        counts = [c + e for c, e in zip(counts, extra)]
        left = total - sum(counts)
        order = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - int(quotas[i])), i))
        while left > 0:
            for i in order:
                if left and counts[i] < sizes[i]:
                    counts[i] += 1
                    left -= 1
    return counts
