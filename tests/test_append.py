"""Dataset.append: a grown dataset is a new version whose first shards are the old ones, byte for
byte; bad input is refused before anything is written; and a finished model selection goes on
with the grown dataset, its next epochs visiting every shard."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from conftest import small_experiment

import cerebro

FIRST = 1200  # digits rows prepared first; the other 597 are appended


def _rows(arrays, start, stop=None):
    return {k: v[start:stop] for k, v in arrays.items()}


def _files(path) -> dict[str, bytes]:
    """Every file under ``path`` and its bytes."""
    found = {}
    for folder, _, names in os.walk(path):
        for name in names:
            full = os.path.join(folder, name)
            with open(full, "rb") as f:
                found[os.path.relpath(full, path)] = f.read()
    return found


@pytest.fixture
def first(digits_arrays, tmp_path) -> cerebro.Dataset:
    return cerebro.prepare_data(_rows(digits_arrays, 0, FIRST), tmp_path / "d", num_shards=4)


def test_append_adds_new_shards_after_the_untouched_old_ones(first, digits_arrays):
    before = _files(first.path)
    grown = first.append(_rows(digits_arrays, FIRST))

    assert (grown.version, grown.num_rows) == (2, 1797)
    # 478 new training rows at about 240 per shard: 2 new shards per split.
    assert grown.num_shards == 6 and first.num_shards == 4
    assert [(v.version, v.shards, v.rows) for v in grown.versions] == [
        (1, range(0, 4), FIRST),
        (2, range(4, 6), 597),
    ]
    assert grown.versions[0].fingerprint == first.fingerprint != grown.fingerprint
    assert cerebro.Dataset.open(first.path).fingerprint == grown.fingerprint
    assert grown.version_of(first.fingerprint) == grown.versions[0]
    assert grown.version_of("not a fingerprint") is None
    # Old shard files keep their bytes and digests; the new ones are new.
    after = _files(first.path)
    assert {n: b for n, b in after.items() if n != "manifest.json"} == {
        **{n: b for n, b in before.items() if n != "manifest.json"},
        **{n: after[n] for n in after if "shard-00004" in n or "shard-00005" in n},
    }
    for split in ("train", "val"):
        old = [first.shard_digest(split, s) for s in range(4)]
        assert [grown.shard_digest(split, s) for s in range(4)] == old
        new = {grown.shard_digest(split, s) for s in (4, 5)}
        assert len(new) == 2 and not new & set(old)
    # The same validation fraction; every appended row is in exactly one new shard.
    new_val = sum(grown.shard_rows("val")[4:])
    assert new_val == round(0.2 * 597)
    xs = np.concatenate(
        [
            grown.load_shard(sp, s).x.numpy().reshape(-1, 64)
            for sp in ("train", "val")
            for s in (4, 5)
        ]
    )
    assert sorted(map(bytes, xs)) == sorted(map(bytes, digits_arrays["x"][FIRST:].reshape(-1, 64)))
    # The object opened at version 1 still reads version 1.
    assert first.version == 1 and first.load_shard("train", 3).rows == first.shard_rows("train")[3]


def test_the_split_of_appended_rows_is_seeded(digits_arrays, tmp_path):
    digests = []
    for name in ("a", "b"):
        ds = cerebro.prepare_data(_rows(digits_arrays, 0, FIRST), tmp_path / name, num_shards=4)
        grown = ds.append(_rows(digits_arrays, FIRST), num_shards=3)
        digests.append([grown.shard_digest(sp, s) for sp in ("train", "val") for s in range(7)])
        assert grown.num_shards == 7
    assert digests[0] == digests[1]
    # A second append draws its own split (seeded by the version number too).
    third = grown.append(_rows(digits_arrays, 100, 300))
    assert third.version == 3 and third.versions[2].shards.start == 7


def test_string_labels_keep_their_codes_and_a_new_class_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=60), "label": rng.choice(["ant", "bee", "cat"], 60)})
    ds = cerebro.prepare_data(frame, tmp_path / "d", label="label", num_shards=2)
    more = pd.DataFrame({"a": rng.normal(size=30), "label": rng.choice(["bee", "cat"], 30)})
    grown = ds.append(more)
    assert grown.label_classes == ["ant", "bee", "cat"]
    rows = [grown.load_shard(sp, s) for sp in ("train", "val") for s in range(2, grown.num_shards)]
    a = np.concatenate([r.x.numpy()[:, 0] for r in rows])
    labels = [grown.label_classes[c] for r in rows for c in r.y.tolist()]
    expected = dict(zip(more["a"].astype(np.float32), more["label"]))
    assert [expected[v] for v in a] == labels

    new_class = pd.DataFrame({"a": [0.5, 1.5], "label": ["bee", "dog"]})
    with pytest.raises(cerebro.ConfigError, match=r"source\['label'\]='dog'.*classes \['ant'"):
        grown.append(new_class)


def test_an_integer_class_the_dataset_does_not_hold_is_refused(digits_arrays, tmp_path):
    seen = digits_arrays["y"] < 9
    ds = cerebro.prepare_data(
        {k: v[seen][:400] for k, v in digits_arrays.items()}, tmp_path / "d", num_shards=2
    )
    with pytest.raises(cerebro.ConfigError, match=r"source\['y'\]=9 .*1 new class \[9\]"):
        ds.append({k: v[~seen][:20] for k, v in digits_arrays.items()})


def _bad_sources(arrays):
    rest = _rows(arrays, FIRST)
    x, y = rest["x"], rest["y"]
    return [
        ({"x": x, "y": y, "z": y}, r"source=\['x', 'y', 'z'\].*the dataset's columns \['y', 'x'\]"),
        ({"y": y, "w": x}, r"source=\['w', 'y'\].*it lacks \['x'\]; it also has \['w'\]"),
        ({"x": x, "label": y}, r"source=\['label', 'x'\].*include the dataset's label 'y'"),
        ({"x": x.reshape(-1, 4, 16), "y": y}, r"source\['x'\]=.*shape \(4, 16\).*\(8, 8\)"),
        ({"x": x.astype(np.float64), "y": y}, r"source\['x'\]='float64'.*dtype float32"),
        ({"x": x[:0], "y": y[:0]}, r"source=.*at least one row"),
        ({"x": x, "y": y.astype(np.float32)}, r"source\['y'\]='float32'.*integer class labels"),
        ({"x": x, "y": y.astype(str)}, r"source\['y'\]=.*integer class labels"),
        (_rows(arrays, 0, FIRST), r"source=.*made version 1 of the dataset"),
    ]


def test_bad_sources_are_refused_before_anything_is_written(first, digits_arrays):
    before = _files(first.path)
    for source, message in _bad_sources(digits_arrays):
        with pytest.raises(cerebro.ConfigError, match=message):
            first.append(source)
        assert _files(first.path) == before
    for bad in ({"num_shards": 0}, {"drop_invalid": "yes"}):
        with pytest.raises(cerebro.ConfigError, match=next(iter(bad))):
            first.append(_rows(digits_arrays, FIRST), **bad)
    with pytest.raises(
        cerebro.ConfigError, match=r"num_shards=500 .*at most the number of training"
    ):
        first.append(_rows(digits_arrays, FIRST), num_shards=500)
    assert _files(first.path) == before


def test_invalid_rows_are_dropped_as_the_dataset_was_prepared(digits_arrays, tmp_path):
    rows = _rows(digits_arrays, 0, FIRST)
    ds = cerebro.prepare_data(rows, tmp_path / "d", num_shards=4, drop_invalid=True)
    more = _rows(digits_arrays, FIRST)
    more["x"] = more["x"].copy()
    more["x"][[3, 7], 0, 0] = np.nan
    grown = ds.append(more)
    assert (grown.dropped_rows, grown.num_rows, grown.versions[1].rows) == (2, 1795, 595)
    with pytest.raises(cerebro.ConfigError, match=r"features\['x'\]=nan .*first at row 3"):
        ds.append({"x": more["x"][:50], "y": more["y"][:50]}, drop_invalid=False)


def test_prepare_data_again_reopens_the_grown_dataset_and_overwrite_removes_it(
    first, digits_arrays
):
    grown = first.append(_rows(digits_arrays, FIRST))
    again = cerebro.prepare_data(_rows(digits_arrays, 0, FIRST), first.path, num_shards=4)
    assert (again.version, again.fingerprint) == (2, grown.fingerprint)
    fresh = cerebro.prepare_data(
        _rows(digits_arrays, 0, 600), first.path, num_shards=2, overwrite=True
    )
    assert fresh.version == 1 and sorted(_files(first.path)) == [
        "manifest.json",
        *[f"{sp}/shard-0000{s}.parquet" for sp in ("train", "val") for s in (0, 1)],
    ]


def test_a_failure_part_way_leaves_the_old_version_whole(first, digits_arrays):
    before = _files(first.path)
    # The last new shard cannot be written: its name is taken by a folder.
    blocker = os.path.join(first.path, "train", "shard-00005.parquet")
    os.mkdir(blocker)
    with pytest.raises(OSError):
        first.append(_rows(digits_arrays, FIRST), num_shards=2)
    os.rmdir(blocker)
    assert _files(first.path) == before
    reopened = cerebro.Dataset.open(first.path)
    assert (reopened.version, reopened.num_shards) == (1, 4)
    assert reopened.load_shard("train", 3).rows == first.shard_rows("train")[3]
    # Nothing is left in the way: the same append now succeeds.
    assert first.append(_rows(digits_arrays, FIRST), num_shards=2).version == 2


def test_a_finished_experiment_goes_on_with_the_grown_dataset(first, digits_arrays, tmp_path):
    path = tmp_path / "run"
    done = small_experiment(first, path, deterministic=True).run()
    epoch0 = done.history
    grown = first.append(_rows(digits_arrays, FIRST))

    ctl = cerebro.control(path)
    for model in done.models:
        ctl.set_epochs(model.id, 2)
    cloned = ctl.clone(0, params={"lr": 0.02}, epochs=1, force=True)
    result = small_experiment(grown, path, deterministic=True).run()
    assert [m.status for m in result.models] == ["completed"] * 3

    train = result.hops[result.hops.kind == "train"]
    for model in done.models:
        mine = train[train.model_id == model.id]
        assert sorted(mine[mine.epoch == 0].shard) == [0, 1, 2, 3]
        assert sorted(mine[mine.epoch == 1].shard) == list(range(grown.num_shards))
    clone = train[train.model_id == cloned.wait(0)["model_id"]]
    assert sorted(clone.shard) == list(range(grown.num_shards))  # its one epoch, on the new version
    # Epoch 0 stays as it was recorded: its metrics and its hops.
    history = result.history
    kept = history[history.model_id.isin(epoch0.model_id) & (history.epoch == 0)]
    pd.testing.assert_frame_equal(kept.reset_index(drop=True), epoch0, check_exact=True)
    hops = result.hops[result.hops.model_id.isin(epoch0.model_id) & (result.hops.epoch == 0)]
    pd.testing.assert_frame_equal(hops.reset_index(drop=True), done.hops, check_exact=True)
    config = result.experiment["config"]
    assert (config["dataset_fingerprint"], config["dataset_version"]) == (grown.fingerprint, 2)
    [event] = [e for e in result.events if e["kind"] == "dataset_grown"]
    assert event["detail"]["from_version"] == 1 and event["detail"]["version"] == 2
    # The records are now of the grown dataset: the old version, or another dataset, is refused.
    for other in (first, cerebro.prepare_data(digits_arrays, tmp_path / "other", num_shards=4)):
        with pytest.raises(cerebro.ConfigError, match=r"different one \(dataset_fingerprint"):
            small_experiment(other, path, deterministic=True).run()
