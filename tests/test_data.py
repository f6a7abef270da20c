from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cerebro


def test_dict_of_arrays_keeps_image_shape_and_shards_both_splits(digits_arrays, tmp_path):
    ds = cerebro.prepare_data(digits_arrays, tmp_path / "d", num_shards=3, validation=0.25, seed=5)
    assert ds.num_shards == 3 and ds.num_rows == 1797
    assert ds.features == ["x"] and ds.label == "y"
    assert ds.split_rows("val") == round(0.25 * 1797)
    assert ds.split_rows("train") + ds.split_rows("val") == 1797
    assert max(ds.shard_rows("train")) - min(ds.shard_rows("train")) <= 1
    shard = ds.load_shard("train", 1)
    assert shard.x.shape[1:] == (8, 8) and shard.x.dtype.is_floating_point
    assert shard.y.dtype == np.int64 or str(shard.y.dtype) == "torch.int64"
    reopened = cerebro.Dataset.open(tmp_path / "d")
    assert reopened.fingerprint == ds.fingerprint
    # Every row lands in exactly one shard of one split.
    xs = np.concatenate(
        [
            ds.load_shard(sp, s).x.numpy().reshape(-1, 64)
            for sp in ("train", "val")
            for s in range(3)
        ]
    )
    original = digits_arrays["x"].reshape(-1, 64)
    assert sorted(map(bytes, xs)) == sorted(map(bytes, original))


def test_split_is_seeded(digits_arrays, tmp_path):
    a = cerebro.prepare_data(digits_arrays, tmp_path / "a", num_shards=2, seed=1)
    b = cerebro.prepare_data(digits_arrays, tmp_path / "b", num_shards=2, seed=1)
    c = cerebro.prepare_data(digits_arrays, tmp_path / "c", num_shards=2, seed=2)
    assert a.fingerprint == b.fingerprint != c.fingerprint


@pytest.fixture
def table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "a": rng.normal(size=50),
            "b": rng.integers(0, 5, 50),
            "label": rng.choice(["cat", "dog"], 50),
        }
    )


def test_dataframe_with_string_label(table, tmp_path):
    ds = cerebro.prepare_data(table, tmp_path / "d", label="label", num_shards=2)
    assert ds.label_classes == ["cat", "dog"]
    shard = ds.load_shard("train", 0)
    assert shard.x.shape == (shard.rows, 2)  # two scalar columns side by side
    assert set(shard.y.tolist()) <= {0, 1}


@pytest.mark.parametrize("kind", ["parquet", "csv", "parquet-folder", "csv-folder"])
def test_files_and_folders(table, tmp_path, kind):
    src = tmp_path / "src"
    src.mkdir()
    halves = [table.iloc[:25], table.iloc[25:]]
    if kind == "parquet":
        target = src / "t.parquet"
        table.to_parquet(target)
    elif kind == "csv":
        target = src / "t.csv"
        table.to_csv(target, index=False)
    else:
        target = src
        for i, half in enumerate(halves):
            if kind == "parquet-folder":
                half.to_parquet(src / f"part-{i}.parquet")
            else:
                half.to_csv(src / f"part-{i}.csv", index=False)
    ds = cerebro.prepare_data(
        str(target), tmp_path / "d", label="label", features=["a"], num_shards=2, validation=0.2
    )
    assert ds.num_rows == 50 and ds.features == ["a"]


def test_parquet_with_list_column(tmp_path):
    images = np.arange(40 * 6, dtype=np.float32).reshape(40, 6)
    pq.write_table(
        pa.table({"img": [list(r) for r in images], "y": np.arange(40) % 3}), tmp_path / "t.parquet"
    )
    ds = cerebro.prepare_data(str(tmp_path / "t.parquet"), tmp_path / "d", num_shards=2)
    assert ds.load_shard("train", 0).x.shape[1:] == (6,)


def test_a_dataset_reopens_from_an_fsspec_url_and_trains(digits, tmp_path):
    """Workers on other machines read shards from object storage through fsspec; ``local://``
    is fsspec's local filesystem, reachable from worker processes like a bucket would be."""
    import builders
    import torch

    remote = cerebro.Dataset.open(f"local://{digits.path}")
    assert remote.num_shards == digits.num_shards
    assert remote.shard_path("train", 1).startswith("local://")
    for split in ("train", "val"):
        a, b = remote.load_shard(split, 1), digits.load_shard(split, 1)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    result = cerebro.Experiment(
        builders.mlp,
        remote,
        cerebro.GridSearch({"lr": cerebro.choice([0.01])}),
        epochs=1,
        metric="val_loss",
        mode="min",
        backend=cerebro.LocalBackend(workers=2),
        path=tmp_path / "run",
        progress=False,
    ).run()
    assert result.models[0].status == "completed"


def test_a_url_without_a_dataset_is_refused(tmp_path):
    with pytest.raises(cerebro.ConfigError, match="no manifest.json"):
        cerebro.Dataset.open(f"local://{tmp_path}")
