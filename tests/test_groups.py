"""Models per data subgroup: grouped datasets (``prepare_data(group_by=...)``) and per-group
model selection (``Experiment(per_group=True)``)."""

from __future__ import annotations

import builders
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import state_equal
from rich.console import Console

import cerebro
from cerebro import cli, training
from cerebro.cli import leaderboard_table
from cerebro.engine.groups import GroupShards, PerGroup, weighted_mean
from cerebro.kinds import ModelStatus
from cerebro.search.base import Trial

SEED = 3
SIZES = {"north": 700, "south": 600, "west": 497}  # 1797 digits rows, three sites


@pytest.fixture(scope="module")
def grouped(tmp_path_factory, digits_arrays):
    """Digits with a 'site' column: three groups of different sizes."""
    sites = np.repeat(list(SIZES), list(SIZES.values()))
    source = {**digits_arrays, "site": sites, "row": np.arange(len(sites))}
    path = tmp_path_factory.mktemp("data") / "grouped"
    ds = cerebro.prepare_data(
        source, path, label="y", features=["x"], num_shards=6, validation=0.2, group_by="site"
    )
    return ds, source


def _rows_of_shards(ds, source):
    """Each shard's source rows, found by content (the row index column is not stored)."""
    index = {source["x"][i].tobytes(): i for i in range(len(source["y"]))}
    found = {}
    for split in ("train", "val"):
        for shard in range(ds.num_shards):
            shard_data = ds.load_shard(split, shard)
            found[split, shard] = [
                index[x.numpy().astype(np.float32).tobytes()] for x in shard_data.x
            ]
    return found


# Grouped datasets -------------------------------------------------------------------------------


def test_shards_never_mix_groups_and_each_group_is_split_on_its_own(grouped):
    ds, source = grouped
    groups = {g.name: g for g in ds.groups}
    assert list(groups) == sorted(SIZES)
    assert {n: g.rows for n, g in groups.items()} == SIZES
    assert sum(len(g.shards) for g in groups.values()) == ds.num_shards == 6
    assert ds.features == ["x"] and ds.group_by == "site"
    rows = _rows_of_shards(ds, source)
    for (split, shard), members in rows.items():
        sites = {source["site"][i] for i in members}
        assert sites <= {ds.shard_group(shard)}, (split, shard, sites)
    for name, group in groups.items():
        train = [i for s in group.shards for i in rows["train", s]]
        val = [i for s in group.shards for i in rows["val", s]]
        assert len(train) == group.train_rows and len(val) == group.val_rows
        assert sorted(train + val) == sorted(np.flatnonzero(source["site"] == name))
        assert group.val_rows == round(0.2 * group.rows)  # the split is made within the group
    # The largest group spans more shards than the smallest.
    assert len(groups["north"].shards) >= len(groups["west"].shards)


def test_the_manifest_lists_each_shards_group_and_reopens_the_same(grouped, tmp_path):
    ds, source = grouped
    again = cerebro.Dataset.open(ds.path)
    assert again.groups == ds.groups
    assert [again.shard_group(s) for s in range(again.num_shards)] == [
        g.name for g in ds.groups for _ in g.shards
    ]
    for shard in range(ds.num_shards):  # the group column is not written into the shards
        assert pq.read_schema(ds.shard_path("train", shard)).names == ["x", "y"]
    same = cerebro.prepare_data(
        source, ds.path, label="y", features=["x"], num_shards=6, validation=0.2, group_by="site"
    )
    assert same.fingerprint == ds.fingerprint
    with pytest.raises(cerebro.ConfigError, match="holds this same dataset"):  # ungrouped
        cerebro.prepare_data(
            source, ds.path, label="y", features=["x"], num_shards=6, validation=0.2
        )


def test_small_groups_are_refused_by_name_or_merged_into_other(tmp_path):
    rng = np.random.default_rng(0)
    who = np.repeat(["ann", "bob", "cy", "dee"], [40, 30, 6, 5])
    rows = {"x": rng.normal(size=(len(who), 2)), "y": rng.integers(0, 2, len(who)), "who": who}
    with pytest.raises(cerebro.ConfigError) as refused:
        cerebro.prepare_data(rows, tmp_path / "a", group_by="who")
    message = str(refused.value)
    assert (
        "min_group_rows" in message and "'cy' (6 rows)" in message and "'dee' (5 rows)" in message
    )
    assert not (tmp_path / "a" / "manifest.json").exists()
    ds = cerebro.prepare_data(rows, tmp_path / "b", group_by="who", small_groups="merge")
    assert [(g.name, g.rows, g.merged) for g in ds.groups] == [
        ("ann", 40, ()),
        ("bob", 30, ()),
        ("other", 11, ("cy", "dee")),
    ]
    fine = cerebro.prepare_data(rows, tmp_path / "c", group_by="who", min_group_rows=5)
    assert len(fine.groups) == 4
    with pytest.raises(cerebro.ConfigError, match="merged, the groups"):
        cerebro.prepare_data(
            rows, tmp_path / "d", group_by="who", small_groups="merge", min_group_rows=12
        )


def test_integer_groups_and_more_groups_than_shards(tmp_path):
    rng = np.random.default_rng(1)
    part = np.repeat(np.arange(7), 20)
    rows = {"x": rng.normal(size=(140, 2)), "y": rng.integers(0, 3, 140), "part": part}
    ds = cerebro.prepare_data(rows, tmp_path / "ints", group_by="part", num_shards=2)
    assert [g.name for g in ds.groups] == list(range(7))
    assert ds.num_shards == 7 and all(len(g.shards) == 1 for g in ds.groups)


@pytest.mark.parametrize(
    ("column", "expected"),
    [
        ("nope", r"group_by.*'nope'.*one of the source's columns"),
        ("y", "a column other than the label"),
        ("nulls", r"group_by.*'nulls'.*2 rows have none.*row 3"),
        ("nan", r"group_by.*'nan'.*1 rows have none.*row 0"),
        ("floats", "integers or strings"),
    ],
)
def test_bad_group_columns_are_refused_before_anything_is_written(tmp_path, column, expected):
    n = 40
    rows = pd.DataFrame(
        {
            "x": np.arange(n, dtype=float),
            "y": np.arange(n) % 2,
            "nulls": ["a" if i not in (3, 9) else None for i in range(n)],
            "nan": [np.nan] + [1.0] * (n - 1),
            "floats": np.linspace(0, 1, n),
        }
    )
    with pytest.raises(cerebro.ConfigError, match=expected):
        cerebro.prepare_data(rows, tmp_path / "bad", features=["x"], group_by=column)
    assert not (tmp_path / "bad").exists()


def test_bad_group_arguments(tmp_path):
    rows = {"x": np.zeros((20, 1)), "y": np.arange(20) % 2, "g": np.arange(20) % 2}
    with pytest.raises(cerebro.ConfigError, match="small_groups"):
        cerebro.prepare_data(rows, tmp_path / "a", group_by="g", small_groups="drop")
    with pytest.raises(cerebro.ConfigError, match="min_group_rows"):
        cerebro.prepare_data(rows, tmp_path / "b", group_by="g", min_group_rows=0)
    with pytest.raises(cerebro.ConfigError, match="features.*group_by column 'g'"):
        cerebro.prepare_data(rows, tmp_path / "c", features=["x", "g"], group_by="g")
    ds = cerebro.prepare_data(rows, tmp_path / "d", group_by="g", min_group_rows=5)
    with pytest.raises(cerebro.ConfigError, match="without group_by"):
        ds.append(rows)


# Per-group model selection ----------------------------------------------------------------------


def test_per_group_needs_a_grouped_dataset(digits, tmp_path):
    with pytest.raises(cerebro.ConfigError, match=r"per_group.*has no groups") as refused:
        cerebro.Experiment(
            builders.mlp, digits, cerebro.GridSearch({"lr": cerebro.choice([0.01])}),
            per_group=True, path=tmp_path / "run", progress=False,
        )  # fmt: skip
    assert digits.path in str(refused.value)
    with pytest.raises(cerebro.ConfigError, match="per_group"):
        cerebro.Experiment(
            builders.mlp, digits, cerebro.GridSearch({"lr": cerebro.choice([0.01])}),
            per_group="yes", path=tmp_path / "run", progress=False,
        )  # fmt: skip


def _replay(ds, params, model_id, epochs_order):
    """The configuration trained alone in this process over its recorded shard order."""
    spec = training.build_spec(builders.mlp, params, training.init_seed(SEED, model_id))
    for epoch, order in enumerate(epochs_order):
        for i, shard in enumerate(order):
            torch.manual_seed(training.hop_rng_seed(SEED, model_id, epoch, shard))
            training.run_train_hop(
                spec,
                ds.load_shard("train", shard),
                training.shuffle_seed(SEED, model_id, epoch, shard),
                torch.device("cpu"),
                end_of_epoch=i == len(order) - 1,
            )
    return spec.model


def test_three_groups_by_four_configurations_train_twelve_models_on_their_own_shards(
    grouped, tmp_path, capsys
):
    ds, _ = grouped
    space = {"lr": cerebro.choice([0.003, 0.01, 0.03]), "width": cerebro.choice([16, 32])}
    exp = cerebro.Experiment(
        builders.mlp,
        ds,
        cerebro.RandomSearch(space, num_models=4, seed=0),
        epochs=2,
        metric="val_accuracy",
        mode="max",
        backend=cerebro.LocalBackend(workers=2, threads_per_worker=1),
        path=tmp_path / "run",
        seed=SEED,
        deterministic=True,
        progress=False,
        per_group=True,
    )
    result = exp.run()
    groups = {g.name: g for g in ds.groups}
    assert len(result.models) == 12
    assert all(m.status == "completed" for m in result.models)
    by_config: dict[int, list] = {}
    for m in result.models:
        by_config.setdefault(m.configuration, []).append(m)
    assert sorted(by_config) == [0, 1, 2, 3]
    for members in by_config.values():
        assert sorted(m.group for m in members) == sorted(SIZES)
        assert len({repr(m.params) for m in members}) == 1

    hops = result.hops
    for m in result.models:
        mine = hops[hops.model_id == m.id]
        shards = set(groups[m.group].shards)
        assert set(mine.shard) <= shards, (m.id, m.group)  # only its group's shards
        for epoch in range(2):
            trained = mine[(mine.epoch == epoch) & (mine.kind == "train")]
            # MOP invariant 1, per group: every shard of its group once per epoch.
            assert sorted(trained.shard) == sorted(shards)
            evaluated = mine[(mine.epoch == epoch) & (mine.kind == "eval")]
            assert sorted(evaluated.shard) == sorted(shards)
            assert trained.rows.sum() == groups[m.group].train_rows
            assert evaluated.rows.sum() == groups[m.group].val_rows
    # Invariants 2 and 3: no model on two workers at once, no worker on two units at once.
    for key in ("model_id", "worker"):
        for _, rows in hops.groupby(key):
            spans = rows.sort_values("start")[["start", "end"]].to_numpy()
            assert all(
                a_end <= b_start + 1e-9 for (_, a_end), (b_start, _) in zip(spans, spans[1:])
            )

    # Invariant 4: each model equals its configuration trained alone on its group's shards in
    # the recorded order, bit for bit.
    for m in result.models:
        mine = hops[(hops.model_id == m.id) & (hops.kind == "train")].sort_values("start")
        order = [list(mine[mine.epoch == e].shard) for e in range(2)]
        alone = _replay(ds, m.params, m.id, order)
        assert state_equal(result.load_model(m.id).state_dict(), alone.state_dict()), m.id

    history = result.history
    assert {"model_id", "group", "configuration", "val_accuracy"} <= set(history.columns)
    assert len(history) == 24
    assert set(history.group) == set(SIZES)
    board = result.leaderboard()
    assert list(board.columns[:3]) == ["model_id", "group", "configuration"]

    best = result.best_by_group
    assert list(best) == sorted(SIZES)
    for name, chosen in best.items():
        candidates = [m for m in result.models if m.group == name]
        top = max(m.metrics["val_accuracy"] for m in candidates)
        assert chosen.metrics["val_accuracy"] == top
        assert chosen.id == min(m.id for m in candidates if m.metrics["val_accuracy"] == top)

    # The command line shows each model's group, and marks each group's best.
    console = Console(record=True, width=200)
    console.print(leaderboard_table(result))
    board_text = console.export_text()
    assert "group" in board_text and "* the best model of its group" in board_text
    assert board_text.count(" * │") == 3
    assert cli.main(["models", str(tmp_path / "run")]) == 0
    assert "south" in capsys.readouterr().out
    frame = cerebro.control(tmp_path / "run").models()
    assert dict(zip(frame.model_id, frame.group)) == {m.id: m.group for m in result.models}

    events = [e for e in result.events if e["kind"] == "group_model"]
    assert len(events) == 12
    # The same records read back from another process's view.
    again = cerebro.load(tmp_path / "run")
    assert {g: m.id for g, m in again.best_by_group.items()} == {g: m.id for g, m in best.items()}


def test_the_search_sees_one_row_weighted_trial_per_configuration():
    groups = PerGroup(
        [
            GroupShards("a", frozenset({0, 1}), frozenset({0, 1}), 300, 100),
            GroupShards("b", frozenset({2}), frozenset({2}), 100, 25),
        ]
    )
    from cerebro.engine.roster import ModelRun

    def run(model_id, group, configuration, history, status=ModelStatus.RUNNING):
        return ModelRun(
            model_id, {"lr": configuration}, "", status=status, history=history,
            group=group, configuration=configuration,
        )  # fmt: skip

    models = [
        run(0, "a", 0, [{"epoch": 0, "val_loss": 1.0, "train_loss": 2.0}]),
        run(1, "b", 0, [{"epoch": 0, "val_loss": 2.0, "train_loss": 4.0}]),
        run(2, "a", 1, [{"epoch": 0, "val_loss": 1.0}, {"epoch": 1, "val_loss": 0.5}]),
        run(3, "b", 1, [{"epoch": 0, "val_loss": 3.0}], status=ModelStatus.PRUNED),
    ]
    trials = groups.trials(models, lambda m: 5)
    assert [t.model_id for t in trials] == [0, 1]
    assert trials[0].history == [{"epoch": 0, "val_loss": (100 + 50) / 125, "train_loss": 2.5}]
    # A group model pruned after epoch 0 no longer holds its configuration's later epochs back.
    assert trials[1].history == [
        {"epoch": 0, "val_loss": (100 + 75) / 125},
        {"epoch": 1, "val_loss": 0.5},
    ]
    assert trials[1].status is ModelStatus.RUNNING
    assert weighted_mean([({"val_x": 1.0}, groups["b"])]) == {"val_x": 1.0}
    assert isinstance(trials[0], Trial)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_best_by_group_follows_the_metric_and_mode(grouped, tmp_path, mode):
    ds, _ = grouped
    exp = cerebro.Experiment(
        builders.mlp,
        ds,
        cerebro.GridSearch({"lr": cerebro.choice([0.001, 0.05])}),
        epochs=1,
        metric="val_loss",
        mode=mode,
        backend=cerebro.LocalBackend(workers=2),
        path=tmp_path / mode,
        seed=SEED,
        progress=False,
        per_group=True,
    )
    result = exp.run()
    pick = min if mode == "min" else max
    for name, chosen in result.best_by_group.items():
        candidates = [m for m in result.models if m.group == name]
        assert len(candidates) == 2
        assert chosen.metrics["val_loss"] == pick(m.metrics["val_loss"] for m in candidates)


def test_a_scheduler_decides_per_configuration_for_all_its_group_models(grouped, tmp_path):
    """ASHA sees 4 configuration trials; each rung decision applies to every group model of a
    configuration, so a configuration's group models all train the same number of epochs."""
    ds, _ = grouped
    exp = cerebro.Experiment(
        builders.mlp,
        ds,
        cerebro.GridSearch({"lr": cerebro.choice([0.0005, 0.002, 0.01, 0.05])}),
        epochs=3,
        metric="val_loss",
        mode="min",
        scheduler=cerebro.ASHA(max_epochs=3, reduction_factor=2),
        backend=cerebro.LocalBackend(workers=2),
        path=tmp_path / "asha",
        seed=SEED,
        progress=False,
        per_group=True,
    )
    result = exp.run()
    assert len(result.models) == 12
    epochs: dict[int, set[int]] = {}
    for m in result.models:
        epochs.setdefault(m.configuration, set()).add(len(m.history))
    assert all(len(done) == 1 for done in epochs.values()), epochs
    assert sorted(max(d) for d in epochs.values())[-1] == 3  # the best went on to the end
    assert min(min(d) for d in epochs.values()) < 3  # and some configuration was cut at a rung
    waited = [e for e in result.events if e["kind"] == "paused" and "waiting" in str(e["detail"])]
    assert waited  # a group model that finished first waited for its configuration's others


def test_a_rerun_reads_the_groups_back_and_per_group_is_part_of_the_experiment(grouped, tmp_path):
    ds, _ = grouped

    def experiment(**overrides):
        arguments = dict(
            build=builders.mlp,
            dataset=ds,
            search=cerebro.GridSearch({"lr": cerebro.choice([0.01])}),
            epochs=1,
            metric="val_accuracy",
            mode="max",
            backend=cerebro.LocalBackend(workers=2),
            path=tmp_path / "run",
            seed=SEED,
            progress=False,
            per_group=True,
        )
        return cerebro.Experiment(**{**arguments, **overrides})

    first = experiment().run()
    again = experiment().run()  # finished: the records are read back, nothing retrains
    assert [(m.id, m.group, m.configuration) for m in again.models] == [
        (m.id, m.group, m.configuration) for m in first.models
    ]
    assert len(again.hops) == len(first.hops)
    with pytest.raises(cerebro.ConfigError, match="per_group"):
        experiment(per_group=False).run()


RESUME_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import builders, cerebro
if __name__ == "__main__":
    space = {{"lr": cerebro.choice([0.003, 0.01, 0.03]), "width": cerebro.choice([16, 32])}}
    cerebro.Experiment(builders.mlp, {data!r}, cerebro.RandomSearch(space, num_models=3, seed=0),
                       epochs=3, metric="val_accuracy", mode="max",
                       backend=cerebro.LocalBackend(workers=2), path=sys.argv[1], seed={seed},
                       progress=False, deterministic=True, per_group=True).run()
"""


@pytest.mark.slow  # 35 s: three drivers; the default run's resume test covers the plain case
def test_a_per_group_run_killed_mid_run_resumes_with_its_groups_and_the_same_results(
    grouped, tmp_path
):
    """SIGKILL of the driver of a per-group experiment half-way through its training hops;
    the same script run again reads each model's group back from the records, trains each
    unfinished group model on its own group's shards only, and ends bit for bit as a run that
    was never interrupted (deterministic mode)."""
    import os
    import subprocess
    import sys

    from conftest import assert_same_results, kill_mid_run

    ds, _ = grouped
    groups = {g.name: g for g in ds.groups}
    script = tmp_path / "run.py"
    script.write_text(
        RESUME_SCRIPT.format(tests=os.path.dirname(__file__), data=ds.path, seed=SEED)
    )

    def run(path) -> None:
        done = subprocess.run(
            [sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr

    uninterrupted = tmp_path / "uninterrupted"
    run(uninterrupted)
    reference = cerebro.load(uninterrupted)
    assert len(reference.models) == 9  # 3 configurations x 3 groups
    total_train_hops = sum(len(g.shards) for g in ds.groups) * 3 * 3  # shards x configs x epochs

    crashed = tmp_path / "crashed"
    at_kill = kill_mid_run(script, crashed, min_train_hops=total_train_hops // 2)
    assert at_kill.experiment["status"] == "interrupted"
    assert [m for m in at_kill.models if m.status != "completed"], "the kill came too late"
    killed_hops = len(at_kill.hops)

    run(crashed)  # the same script again: it continues the experiment
    resumed = cerebro.load(crashed)
    assert resumed.experiment["status"] == "completed"
    assert {m.status for m in resumed.models} == {"completed"}
    # Every model's group and configuration as recorded in the uninterrupted run.
    assert [(m.id, m.group, m.configuration) for m in resumed.models] == [
        (m.id, m.group, m.configuration) for m in reference.models
    ]
    group_events = [e for e in resumed.events if e["kind"] == "group_model"]
    # One group_model event per model: the rerun read them back instead of recording anew.
    assert sorted((e["detail"]["model"], e["detail"]["group"]) for e in group_events) == [
        (m.id, m.group) for m in reference.models
    ]
    assert_same_results(resumed, reference)  # history (with its group column) and weights
    assert {g: m.id for g, m in resumed.best_by_group.items()} == {
        g: m.id for g, m in reference.best_by_group.items()
    }
    # The hops after the kill stayed on each model's own group's shards, and the records read
    # as if nothing had happened: every shard of its group once per model and epoch.
    after = resumed.hops.iloc[killed_hops:]
    by_id = {m.id: m for m in resumed.models}
    assert len(after) > 0
    for row in after.itertuples():
        assert row.shard in groups[by_id[row.model_id].group].shards, row
    key = ["model_id", "epoch", "kind", "shard"]
    assert not resumed.hops.duplicated(key).any()
    pd.testing.assert_frame_equal(
        resumed.hops[key].sort_values(key, ignore_index=True),
        reference.hops[key].sort_values(key, ignore_index=True),
    )
