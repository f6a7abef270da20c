"""prepare_data checks its source and its folder before writing anything (issue 12), reopens a
dataset prepared by the same call instead of failing (issue 11), and never deletes files it did
not write."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cerebro
from cerebro.data import prepare as prepare_module


def _arrays(rows: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(rows, 3)), "y": np.arange(rows) % 2}


def _with(column: str, row: int, value, dtype=None) -> dict[str, np.ndarray]:
    data = _arrays()
    data[column] = data[column].astype(dtype or data[column].dtype)
    data[column][row] = value
    return data


def _parquet(tmp_path: Path, table: pa.Table) -> str:
    pq.write_table(table, tmp_path / "t.parquet")
    return str(tmp_path / "t.parquet")


def _text(tmp_path: Path, name: str, content: str) -> str:
    (tmp_path / name).write_text(content)
    return str(tmp_path / name)


# Each case: (build the source from tmp_path, extra arguments, what the message must name).
BAD_SOURCES = [
    pytest.param(
        lambda t: _with("x", 7, np.nan), {}, ["features['x']", "nan", "row 7"], id="nan-feature"
    ),
    pytest.param(
        lambda t: {**_arrays(), "x": np.where(np.arange(60).reshape(20, 3) == 31, np.inf, 0.0)},
        {},
        ["features['x']", "inf", "row 10"],
        id="inf-in-an-array-feature",
    ),
    pytest.param(
        lambda t: _with("y", 4, np.inf, dtype=float),
        {},
        ["label['y']", "inf", "row 4"],
        id="inf-float-label",
    ),
    pytest.param(
        lambda t: pd.DataFrame({"a": np.arange(10.0), "y": [0, 1, None, 1, 0] * 2}),
        {},
        ["label['y']", "nan", "row 2", "drop_invalid=True"],
        id="int-label-with-a-missing-value",
    ),
    pytest.param(
        lambda t: pd.DataFrame({"a": np.arange(10.0), "y": ["a", "b", "a", None, "b"] * 2}),
        {},
        ["label['y']", "row 3"],
        id="text-label-with-a-missing-value",
    ),
    pytest.param(
        lambda t: pd.DataFrame({"a": np.arange(8.0), "y": [1, "1", 2, 2.0] * 2}),
        {},
        ["label['y']", "int, str, float", "row 1"],
        id="label-of-mixed-types",
    ),
    pytest.param(
        lambda t: pd.DataFrame({"a": np.arange(8.0), "y": [{"k": i} for i in range(8)]}),
        {},
        ["label['y']", "dict"],
        id="dict-label",
    ),
    pytest.param(
        lambda t: _parquet(t, pa.table({"a": np.arange(12.0), "y": [{"k": i} for i in range(12)]})),
        {},
        ["label['y']", "dict", "struct"],
        id="struct-label-in-parquet",
    ),
    pytest.param(
        lambda t: _text(t, "header.csv", "a,b,y\n"),
        {},
        ["source", "header.csv", "0 rows"],
        id="header-only-csv",
    ),
    pytest.param(
        lambda t: _text(t, "empty.csv", ""), {}, ["source", "empty.csv"], id="zero-byte-csv"
    ),
    pytest.param(
        lambda t: {"x": [[1, 2], [3]] * 5, "y": np.arange(10)},
        {},
        ["source['x']", "row 1"],
        id="ragged-lists-in-a-dict",
    ),
    pytest.param(
        lambda t: pd.DataFrame({"x": [[1, 2], [3, 4], [5]] * 5, "y": np.arange(15)}),
        {},
        ["source['x']", "row 2"],
        id="ragged-lists-in-a-dataframe",
    ),
    pytest.param(
        lambda t: pd.DataFrame({"x": [[1, 2], [3, 4], None] * 5, "y": np.arange(15)}),
        {},
        ["source['x']", "row 2"],
        id="none-in-a-dataframe-list-column",
    ),
    pytest.param(
        lambda t: _parquet(t, pa.table({"x": [[1.0, 2.0], None, [3.0, 4.0]] * 4, "y": range(12)})),
        {},
        ["source['x']", "row 1", "null"],
        id="null-in-a-parquet-list-column",
    ),
    pytest.param(
        lambda t: _parquet(t, pa.table({"x": [[1.0, 2.0], [3.0, 4.0], [5.0]] * 4, "y": range(12)})),
        {},
        ["source['x']", "row 2"],
        id="ragged-parquet-list-column",
    ),
    pytest.param(
        lambda t: _arrays(), {"drop_invalid": "yes"}, ["drop_invalid", "'yes'"], id="drop-not-bool"
    ),
]


@pytest.mark.parametrize("build, kwargs, named", BAD_SOURCES)
def test_bad_sources_are_refused_by_column_and_row_before_writing(tmp_path, build, kwargs, named):
    source = build(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(cerebro.ConfigError) as info:
        cerebro.prepare_data(source, out, num_shards=2, **kwargs)
    message = str(info.value)
    for part in named:
        assert part in message, message
    assert "expected" in message, message
    assert not out.exists()


def _a_file(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_text("mine")
    return tmp_path / "afile"


BAD_PATHS = [
    pytest.param(lambda t: _a_file(t), ["path", "afile", "is a file"], id="path-is-a-file"),
    pytest.param(
        lambda t: _a_file(t) / "d", ["path", "afile", "is a file"], id="path-below-a-file"
    ),
]


@pytest.mark.parametrize("build, named", BAD_PATHS)
def test_bad_paths_are_refused_by_name(tmp_path, build, named):
    path = build(tmp_path)
    with pytest.raises(cerebro.ConfigError) as info:
        cerebro.prepare_data(_arrays(), path, num_shards=2)
    for part in named:
        assert part in str(info.value), str(info.value)
    assert (tmp_path / "afile").read_text() == "mine"


def test_dataset_open_refuses_a_file_by_name(tmp_path):
    with pytest.raises(cerebro.ConfigError, match="afile.*is a file"):
        cerebro.Dataset.open(_a_file(tmp_path))


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into read-only folders"
)
def test_an_unwritable_path_is_refused_by_name(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(cerebro.ConfigError, match="path=.*locked.*not writable"):
            cerebro.prepare_data(_arrays(), locked / "d", num_shards=2)
    finally:
        locked.chmod(0o700)


def test_a_permission_error_while_writing_names_the_path(tmp_path, monkeypatch):
    # Root ignores file modes, so the refusal of the operating system is simulated here.
    def refuse(table, where, **kwargs):
        raise PermissionError(13, "Permission denied", str(where))

    monkeypatch.setattr(prepare_module.pq, "write_table", refuse)
    with pytest.raises(cerebro.ConfigError, match="path=.*d'.*may write.*Permission denied"):
        cerebro.prepare_data(_arrays(), tmp_path / "d", num_shards=2)
    assert not (tmp_path / "d").exists()


def test_drop_invalid_leaves_out_bad_rows_and_counts_them(tmp_path):
    data = _with("x", 7, np.nan)
    data["x"][9, 2] = -np.inf
    data["y"] = data["y"].astype(float)
    data["y"][3] = np.nan
    ds = cerebro.prepare_data(data, tmp_path / "d", num_shards=2, drop_invalid=True)
    assert ds.dropped_rows == 3 and ds.num_rows == 17
    assert cerebro.Dataset.open(tmp_path / "d").dropped_rows == 3
    for split in ("train", "val"):
        for shard in range(2):
            loaded = ds.load_shard(split, shard)
            assert loaded.x.isfinite().all() and loaded.y.isfinite().all()


def test_drop_invalid_that_leaves_no_rows_is_refused(tmp_path):
    data = _with("x", 0, np.nan)
    data["x"][:, 0] = np.nan
    with pytest.raises(cerebro.ConfigError, match="left out all 20 rows"):
        cerebro.prepare_data(data, tmp_path / "d", num_shards=2, drop_invalid=True)
    assert not (tmp_path / "d").exists()


def test_clean_data_drops_no_rows(tmp_path):
    ds = cerebro.prepare_data(_arrays(), tmp_path / "d", num_shards=2)
    assert ds.dropped_rows == 0


# Issue 11: re-running the same call reopens the dataset.


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize("kind", ["dict", "dataframe", "csv"])
def test_the_same_call_again_reopens_the_dataset_without_writing(tmp_path, kind):
    table = pd.DataFrame({"a": np.arange(30.0), "b": np.arange(30) % 7, "y": ["p", "q", "r"] * 10})
    if kind == "dict":
        source = {c: table[c].to_numpy() for c in table.columns}
    elif kind == "dataframe":
        source = table
    else:
        table.to_csv(tmp_path / "t.csv", index=False)
        source = str(tmp_path / "t.csv")
    kwargs = dict(label="y", num_shards=3, validation=0.2, seed=4)
    first = cerebro.prepare_data(source, tmp_path / "d", **kwargs)
    before = _mtimes(tmp_path / "d")
    again = cerebro.prepare_data(source, tmp_path / "d", **kwargs)
    assert _mtimes(tmp_path / "d") == before
    assert again.fingerprint == first.fingerprint and again.manifest == first.manifest
    assert again.label_classes == ["p", "q", "r"]


DIFFERENT_CALLS = [
    pytest.param({"num_shards": 8}, "with num_shards=4, now 8", id="num_shards"),
    pytest.param({"seed": 1}, "with seed=0, now 1", id="seed"),
    pytest.param({"validation": 0.5}, "with validation=0.2, now 0.5", id="validation"),
    pytest.param({"features": ["a"]}, "with features=['a', 'b'], now ['a']", id="features"),
    pytest.param({"label": "b", "features": ["a"]}, "with label='y', now 'b'", id="label"),
    pytest.param({"drop_invalid": True}, "drop_invalid=False, now True", id="drop_invalid"),
    pytest.param({"source": "changed"}, "from different source data", id="source"),
]


@pytest.mark.parametrize("change, named", DIFFERENT_CALLS)
def test_a_different_call_is_refused_saying_what_differs(tmp_path, change, named):
    source = {"a": np.arange(40.0), "b": np.arange(40.0) * 2, "y": np.arange(40) % 3}
    cerebro.prepare_data(source, tmp_path / "d")
    before = _mtimes(tmp_path / "d")
    kwargs = dict(change)
    if kwargs.pop("source", None):
        source = {**source, "a": source["a"] + 1}
    with pytest.raises(cerebro.ConfigError) as info:
        cerebro.prepare_data(source, tmp_path / "d", **kwargs)
    message = str(info.value)
    assert message.startswith("path=") and named in message, message
    assert "overwrite=True" in message, message
    assert _mtimes(tmp_path / "d") == before


def test_overwrite_replaces_a_different_dataset(tmp_path):
    old = cerebro.prepare_data(_arrays(40), tmp_path / "d", num_shards=4)
    new = cerebro.prepare_data(_arrays(40), tmp_path / "d", num_shards=2, overwrite=True)
    assert new.num_shards == 2 and new.fingerprint != old.fingerprint
    shards = sorted(p.name for p in (tmp_path / "d" / "train").iterdir())
    assert shards == ["shard-00000.parquet", "shard-00001.parquet"]  # the old 4 are gone
    assert cerebro.Dataset.open(tmp_path / "d").manifest == new.manifest


def test_a_dataset_of_an_older_version_is_refused_unless_overwrite(tmp_path):
    cerebro.prepare_data(_arrays(), tmp_path / "d", num_shards=2)
    manifest_path = tmp_path / "d" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for key in ("source_fingerprint", "arguments", "dropped_rows"):  # written before issue 11
        del manifest[key]
    manifest_path.write_text(json.dumps(manifest))
    assert cerebro.Dataset.open(tmp_path / "d").dropped_rows == 0
    with pytest.raises(cerebro.ConfigError, match="older version"):
        cerebro.prepare_data(_arrays(), tmp_path / "d", num_shards=2)
    ds = cerebro.prepare_data(_arrays(), tmp_path / "d", num_shards=2, overwrite=True)
    assert "source_fingerprint" in ds.manifest


def test_a_dataset_missing_a_shard_is_not_reopened(tmp_path):
    cerebro.prepare_data(_arrays(), tmp_path / "d", num_shards=2)
    (tmp_path / "d" / "train" / "shard-00001.parquet").unlink()
    with pytest.raises(cerebro.ConfigError, match="lacks train/shard-00001.parquet"):
        cerebro.prepare_data(_arrays(), tmp_path / "d", num_shards=2)


@pytest.mark.parametrize("stop", [OSError("disk full"), KeyboardInterrupt()], ids=repr)
def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch, stop):
    real = pq.write_table
    calls = []

    def write_then_fail(table, where, **kwargs):
        calls.append(where)
        if len(calls) == 3:
            raise stop
        real(table, where, **kwargs)

    monkeypatch.setattr(prepare_module.pq, "write_table", write_then_fail)
    with pytest.raises(type(stop)):
        cerebro.prepare_data(_arrays(), tmp_path / "new" / "d", num_shards=2)
    assert not (tmp_path / "new").exists()


# Issue 12: cerebro deletes only what it wrote.

NOT_DATASETS = [
    pytest.param({"thesis.tex": "chapter 1"}, id="user-file"),
    pytest.param(
        {"manifest.json": '{"name": "my-package"}', "notes.md": "x"}, id="foreign-manifest"
    ),
    pytest.param({"manifest.json": "not json"}, id="unreadable-manifest"),
    pytest.param({"train/shard-00000.parquet": "x"}, id="shards-without-manifest"),
]


@pytest.mark.parametrize("contents", NOT_DATASETS)
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_without_a_dataset_is_refused_and_left_intact(tmp_path, contents, overwrite):
    folder = tmp_path / "d"
    for name, text in contents.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    with pytest.raises(cerebro.ConfigError) as info:
        cerebro.prepare_data(_arrays(), folder, num_shards=2, overwrite=overwrite)
    message = str(info.value)
    assert message.startswith("path=") and "d'" in message, message
    assert next(iter(contents)).split("/")[0] in message, message  # names what is there
    for name, text in contents.items():
        assert (folder / name).read_text() == text


def test_overwrite_keeps_files_that_are_not_the_datasets(tmp_path):
    cerebro.prepare_data(_arrays(), tmp_path / "d", num_shards=2)
    (tmp_path / "d" / "notes.txt").write_text("mine")
    (tmp_path / "d" / "train" / "README").write_text("also mine")
    ds = cerebro.prepare_data(_arrays(), tmp_path / "d", num_shards=3, overwrite=True)
    assert ds.num_shards == 3
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "d" / "train" / "README").read_text() == "also mine"


def test_a_manifest_cannot_point_a_deletion_outside_the_dataset(tmp_path):
    (tmp_path / "thesis.tex").write_text("chapter 1")
    cerebro.prepare_data(_arrays(), tmp_path / "d", num_shards=2)
    manifest_path = tmp_path / "d" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["splits"]["train"]["files"].append("../thesis.tex")
    manifest_path.write_text(json.dumps(manifest))
    cerebro.prepare_data(_arrays(), tmp_path / "d", num_shards=3, overwrite=True)
    assert (tmp_path / "thesis.tex").read_text() == "chapter 1"
