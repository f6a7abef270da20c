"""Adaptive searches in real multi-worker runs: ASHA and Hyperband prune at rungs, PBT's
exploit copies state exactly, TPE keeps MOP busy, median stopping prunes."""

from __future__ import annotations

import builders
import pandas as pd
import pytest
from conftest import replay_epoch, state_equal

import cerebro
from cerebro import training
from cerebro.store.checkpoints import epoch_path, model_dir, origin_path

SEED = 5
SPACE = {"lr": cerebro.loguniform(1e-4, 3e-1), "width": cerebro.choice([16, 32])}


def _run(digits, path, search, epochs, **overrides) -> cerebro.Result:
    options = dict(
        metric="val_accuracy",
        mode="max",
        backend=cerebro.LocalBackend(workers=2),
        path=path,
        seed=SEED,
        progress=False,
    )
    options.update(overrides)
    return cerebro.Experiment(builders.mlp, digits, search, epochs=epochs, **options).run()


def _epochs_per_model(result: cerebro.Result) -> dict[int, int]:
    return {m.id: len(m.history) for m in result.models}


def _check_epochs_are_whole(result: cerebro.Result, num_shards: int) -> None:
    train = result.hops[result.hops.kind == "train"]
    per_epoch = train.groupby(["model_id", "epoch"]).shard
    assert (per_epoch.nunique() == num_shards).all() and (per_epoch.size() == num_shards).all()


def test_asha_stops_most_models_at_the_first_rung(digits, tmp_path):
    eta = 3
    search = cerebro.ASHA(SPACE, num_models=9, max_epochs=9, reduction_factor=eta, seed=0)
    result = _run(digits, tmp_path / "asha", search, epochs=9)
    epochs = _epochs_per_model(result)
    assert len(epochs) == 9
    stopped_first = [i for i, n in epochs.items() if n == 1]
    assert len(stopped_first) * eta >= (eta - 1) * 9  # at least (1 - 1/eta) of them
    assert sum(n >= 3 for n in epochs.values()) <= 9 // eta  # at most 3 reach rung 1
    assert sum(n == 9 for n in epochs.values()) >= 1
    for model in result.models:
        assert model.status == ("completed" if len(model.history) == 9 else "pruned")
    pruned = {e["detail"]["model"] for e in result.events if e["kind"] == "pruned"}
    assert pruned == {m.id for m in result.models if m.status == "pruned"}
    _check_epochs_are_whole(result, digits.num_shards)
    # The winner is the best of the models that reached the last rung.
    assert result.best.id in [i for i, n in epochs.items() if n == 9]


def test_hyperband_runs_its_brackets_and_epochs_never_exceed_max_epochs(digits, tmp_path):
    search = cerebro.Hyperband(SPACE, num_models=13, max_epochs=9, reduction_factor=3, seed=0)
    # The experiment's epochs is the maximum: the search's max_epochs may be lower.
    result = _run(digits, tmp_path / "hyperband", search, epochs=12)
    epochs = _epochs_per_model(result)
    assert len(epochs) == 13 and max(epochs.values()) == 9
    # Bracket s=2 (9 models from 1 epoch): 3 go on to 3 epochs, 1 to 9; bracket s=1 starts
    # its models at 3 epochs.
    first = sorted(epochs[i] for i in range(9))
    assert first == [1] * 6 + [3] * 2 + [9]
    assert all(epochs[i] >= 3 for i in range(9, 13))
    _check_epochs_are_whole(result, digits.num_shards)


def test_pbt_exploit_copies_the_source_state_exactly(digits, tmp_path):
    space = {"lr": cerebro.loguniform(1e-4, 3e-1), "width": 32}
    search = cerebro.PBT(space, population=4, perturb_every=1, quantile=0.25, seed=0)
    path = tmp_path / "pbt"
    result = _run(digits, path, search, epochs=3, deterministic=True, keep_checkpoints="all")
    exploits = [e["detail"] for e in result.events if e["kind"] == "exploit"]
    assert exploits  # the bottom model of four at some epoch boundary
    checkpoints = str(path / "checkpoints")
    last = exploits[-1]
    target, source = last["model"], last["source"]
    assert source != target
    taken = training.load_state(origin_path(model_dir(checkpoints, target)))
    copied = training.load_state(epoch_path(model_dir(checkpoints, source), last["source_epoch"]))
    assert state_equal(taken["model"], copied["model"])
    assert state_equal(taken["optimizer"]["state"], copied["optimizer"]["state"])
    assert state_equal(taken["lr_scheduler"]["last_epoch"], copied["lr_scheduler"]["last_epoch"])
    assert [g["lr"] for g in taken["optimizer"]["param_groups"]] == [last["params"]["lr"]]
    assert last["params"]["lr"] != last["params_before"]["lr"]
    assert result.model(target).params == last["params"]
    # Its next epoch, replayed from the exploited state, gives its recorded weights (so the
    # workers did train from that state and not from a model they had cached).
    hops = result.hops
    epoch = last["epoch"] + 1
    mine = hops[(hops.model_id == target) & (hops.kind == "train") & (hops.epoch == epoch)]
    shards = list(mine.sort_values("start").shard)
    replayed = replay_epoch(
        digits, builders.mlp, last["params"], taken, SEED, target, epoch, shards
    )
    recorded = training.load_state(epoch_path(model_dir(checkpoints, target), epoch))["model"]
    assert state_equal(replayed.state_dict(), recorded)


def test_tpe_keeps_models_in_flight_and_median_stopping_prunes(digits, tmp_path):
    search = cerebro.TPESearch(SPACE, num_models=8, seed=0)
    rule = cerebro.MedianStopping(grace_epochs=1, min_trials=2)
    result = _run(digits, tmp_path / "tpe", search, epochs=3, early_stopping=rule)
    assert len(result.models) == 8
    statuses = pd.Series([m.status for m in result.models]).value_counts().to_dict()
    assert set(statuses) <= {"completed", "pruned"} and statuses.get("pruned", 0) >= 1
    for event in (e for e in result.events if e["kind"] == "pruned"):
        assert event["detail"]["reason"].startswith("MedianStopping")
    # At least num_shards models were in flight while the first ones trained.
    hops = result.hops
    first_end = hops.groupby("model_id").end.max().min()
    started = hops[hops.start < first_end].model_id.nunique()
    assert started >= digits.num_shards


def test_adaptive_search_arguments_are_checked_against_the_experiment(digits, tmp_path):
    with pytest.raises(cerebro.ConfigError) as caught:
        cerebro.Experiment(
            builders.mlp, digits, cerebro.ASHA(SPACE, 9, max_epochs=9), epochs=3, progress=False
        )
    assert caught.value.argument == "epochs"
    for bad in (
        lambda: cerebro.ASHA(SPACE, 9, max_epochs=9, reduction_factor=1),
        lambda: cerebro.Hyperband(SPACE, 9, max_epochs=9, reduction_factor=2.5),
        lambda: cerebro.PBT(SPACE, population=4, perturb_every=1, quantile=0.9),
        lambda: cerebro.TPESearch(SPACE, num_models=0),
    ):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(cerebro.ConfigError, match="early_stopping"):
        cerebro.Experiment(
            builders.mlp, digits, cerebro.RandomSearch(SPACE, 2), early_stopping="median"
        )
