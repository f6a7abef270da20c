"""Model fusion end to end: experiments whose same-shape models train as fused units on real
workers, compared with the same models trained alone."""

from __future__ import annotations

import builders
import pandas as pd
import pytest
import torch
from conftest import (
    assert_same_results,
    make_backend,
    replay_epoch,
    small_experiment,
    state_equal,
)

import cerebro
from cerebro import training
from cerebro.store.checkpoints import epoch_path, model_dir, origin_path, state_path

SPACE = {
    "lr": cerebro.choice([0.003, 0.01, 0.03, 0.05]),
    "dropout": cerebro.choice([0.0]),
}


def _fused(digits, path, **overrides) -> cerebro.Result:
    arguments = dict(
        search=cerebro.GridSearch(SPACE), epochs=2, fusion=True, seed=5, deterministic=True
    )
    arguments.update(overrides)
    return small_experiment(digits, path, **arguments).run()


def _visits(result: cerebro.Result, model_id: int, epochs: int) -> list[list[int]]:
    """The shards a model trained on, epoch by epoch, in the order it visited them."""
    hops = result.hops[(result.hops.model_id == model_id) & (result.hops.kind == "train")]
    hops = hops.sort_values("start")
    return [list(hops[hops.epoch == e].shard) for e in range(epochs)]


@pytest.mark.parametrize("deterministic", [True, False])
def test_fused_members_train_as_they_would_alone(digits, tmp_path, deterministic):
    """Each member of a fused unit ends as the same model trained alone in one process over the
    shards it visited, in the same order. Tolerance: float32 rounding of batched matrix
    products may differ from single ones; 2 epochs of Adam keep it well under 1e-4. In free
    mode dropout draws from each model's own stream, which hops with its state."""
    space = {**SPACE, "dropout": cerebro.choice([0.0 if deterministic else 0.2])}
    result = _fused(
        digits, tmp_path / "run", deterministic=deterministic, search=cerebro.GridSearch(space)
    )
    assert len(result.fused_models) == 4
    units = result.hops.groupby("unit").model_id.nunique()
    # Deterministic: one cohort of four. Free mode splits ready models over idle workers, so
    # its units depend on timing.
    assert units.max() == 4 if deterministic else units.max() >= 2
    shards = [digits.load_shard("train", s) for s in range(digits.num_shards)]
    for record in result.models:
        alone = training.train_in_process(
            builders.mlp, record.params, shards, _visits(result, record.id, 2), 5, record.id
        )
        fused = result.load_model(record.id).state_dict()
        for name, tensor in alone.model.state_dict().items():
            assert torch.allclose(fused[name], tensor, rtol=0, atol=1e-4), (record.id, name)


def test_deterministic_fused_runs_are_identical_on_1_2_and_3_workers(digits, tmp_path):
    one = _fused(digits, tmp_path / "one", backend=cerebro.LocalBackend(workers=1))
    for workers in (2, 3):
        other = _fused(
            digits, tmp_path / f"w{workers}", backend=cerebro.LocalBackend(workers=workers)
        )
        assert_same_results(other, one)


def test_the_records_say_which_models_trained_fused_and_why_one_did_not(digits, tmp_path):
    search = cerebro.GridSearch({"lr": cerebro.choice([0.01, 0.03]), "width": cerebro.choice(
        [32, 48])})  # fmt: skip
    result = _fused(digits, tmp_path / "run", search=search, build=builders.mlp_or_custom)
    custom = [m.id for m in result.models if m.params["width"] == 48]
    assert result.fused_models == {m.id for m in result.models} - set(custom)
    reasons = {e["detail"]["model"]: e["detail"]["reason"] for e in result.events
               if e["kind"] == "not_fused"}  # fmt: skip
    assert set(reasons) == set(custom)
    assert all("Residual" in reason for reason in reasons.values()), reasons
    assert "fused" in result.leaderboard().columns


def test_a_model_that_turns_nan_in_a_fused_unit_fails_alone(digits, tmp_path):
    search = cerebro.GridSearch({"lr": cerebro.choice([0.01, 0.05, 1e30])})
    result = _fused(
        digits, tmp_path / "run", search=search, build=builders.sgd_mlp, deterministic=False
    )
    by_lr = {m.params["lr"]: m for m in result.models}
    assert by_lr[1e30].status == "failed"
    assert f"model {by_lr[1e30].id}" in by_lr[1e30].error
    assert by_lr[0.01].status == by_lr[0.05].status == "completed"
    assert {by_lr[0.01].id, by_lr[0.05].id} <= result.fused_models


def test_fusion_off_and_on_select_equally_good_models(digits, tmp_path):
    """Free mode: the shard orders differ between the runs, so only the quality compares."""
    fused = _fused(digits, tmp_path / "fused", deterministic=False)
    alone = _fused(digits, tmp_path / "alone", fusion=False, deterministic=False)
    assert not alone.fused_models and fused.fused_models
    accuracy = fused.best.metrics["val_accuracy"]
    assert accuracy == pytest.approx(alone.best.metrics["val_accuracy"], abs=0.03)


def test_models_leaving_fused_units_under_asha_keep_deterministic_results(digits, tmp_path):
    """ASHA pauses and prunes members of fused units at their rungs; the others go on fused, a
    promoted model resumes from its exact state: 1 and 2 workers give the same results."""
    space = {"lr": cerebro.loguniform(1e-3, 1e-1), "dropout": cerebro.uniform(0.0, 0.3)}
    runs = []
    for workers in (1, 2):
        runs.append(
            _fused(
                digits,
                tmp_path / f"w{workers}",
                search=cerebro.ASHA(space, num_models=6, max_epochs=3),
                epochs=3,
                backend=cerebro.LocalBackend(workers=workers),
            )
        )
    one, two = runs
    assert_same_results(two, one)
    statuses = {m.status for m in one.models}
    assert "pruned" in statuses or "paused" in statuses or len(set(one.history.epoch)) < 3
    assert len(one.fused_models) >= 2


def test_a_clone_of_a_fused_member_leaves_with_its_exact_state(digits, tmp_path):
    """A finished fused run reopened with a clone of member 0 at a new learning rate: the clone
    starts from member 0's exact state file (weights, Adam moments and steps, random stream)
    with the new rate, trains its own epoch as that state trained alone would (float32
    rounding: 1e-5, as in tests/test_fused_runner.py), and nothing already trained trains
    again."""
    path = tmp_path / "run"
    first = _fused(digits, path, epochs=1, keep_checkpoints="all")
    checkpoints = str(path / "checkpoints")
    frozen = training.load_state(state_path(checkpoints, 0))
    cloned = cerebro.control(path).clone(0, params={"lr": 0.02, "dropout": 0.0}, force=True)
    result = _fused(digits, path, epochs=1, keep_checkpoints="all")

    clone_id = cloned.wait(0)["model_id"]
    assert result.model(clone_id).parent == 0 and clone_id in result.fused_models
    origin = training.load_state(origin_path(model_dir(checkpoints, clone_id)))
    assert state_equal(origin["model"], frozen["model"])
    assert state_equal(origin["optimizer"]["state"], frozen["optimizer"]["state"])
    assert state_equal(origin["rng"], frozen["rng"])
    assert [g["lr"] for g in origin["optimizer"]["param_groups"]] == [0.02]
    train = result.hops[result.hops.kind == "train"]
    assert len(train[train.model_id < clone_id]) == len(first.hops[first.hops.kind == "train"])

    visits = train[train.model_id == clone_id].sort_values("start")
    replayed = replay_epoch(
        digits, builders.mlp, {"lr": 0.02, "dropout": 0.0}, origin, 5, clone_id, 0,
        list(visits.shard),
    )  # fmt: skip
    recorded = training.load_state(epoch_path(model_dir(checkpoints, clone_id), 0))["model"]
    for name, tensor in replayed.state_dict().items():
        assert torch.allclose(recorded[name], tensor, rtol=0, atol=1e-5), name


def test_a_pbt_exploit_that_changes_the_batch_size_takes_the_model_out_of_its_group(
    digits, tmp_path
):
    """PBT explores a new batch size: the model's fusion key changes with it, so from its next
    epoch it trains with models of its new batch size (or alone), never with its old cohort."""
    space = {"lr": cerebro.choice([0.003, 0.01, 0.03, 0.05]),
             "batch_size": cerebro.choice([16, 32])}  # fmt: skip
    pbt = cerebro.PBT(
        space, population=4, perturb_every=1, quantile=0.5, mutable=["batch_size"],
        resample_probability=1.0, seed=2,
    )  # fmt: skip
    # PBT ranks the members that have reported so far (timing decides which, even in
    # deterministic mode): 5 epochs make an exploit that changes the batch size near certain.
    result = _fused(digits, tmp_path / "run", search=pbt, epochs=5)
    assert {m.status for m in result.models} == {"completed"}, [m.error for m in result.models]
    exploits = [e["detail"] for e in result.events if e["kind"] == "exploit"]
    changed = [e for e in exploits if e["params"]["batch_size"] != e["params_before"]["batch_size"]]
    assert changed, exploits

    def batch_size(model_id: int, epoch: int) -> int:
        """An exploit recorded at epoch E changes the params from epoch E + 1 on."""
        later = [e for e in exploits if e["model"] == model_id and e["epoch"] >= epoch]
        if later:
            return min(later, key=lambda e: e["epoch"])["params_before"]["batch_size"]
        return result.model(model_id).params["batch_size"]

    train = result.hops[result.hops.kind == "train"]
    assert train.groupby("unit").model_id.nunique().max() >= 2
    for _, unit in train.groupby("unit"):
        sizes = {batch_size(m, e) for m, e in zip(unit.model_id, unit.epoch, strict=True)}
        assert len(sizes) == 1, unit


@pytest.mark.slow  # Ray's start-up (the default run stays under 10 minutes)
def test_fused_units_on_ray_give_the_local_results(digits, tmp_path):
    """The driver, not the backend, forms fused units: on Ray actors a deterministic fused run
    is bit-identical to the same run on local worker processes."""
    local = _fused(digits, tmp_path / "local", backend=make_backend("local"))
    on_ray = _fused(digits, tmp_path / "ray", backend=make_backend("ray"))
    assert len(on_ray.fused_models) == 4
    assert (on_ray.hops.groupby("unit").model_id.nunique() == 4).any()
    assert_same_results(on_ray, local)


def test_a_member_whose_state_cannot_be_handed_over_runs_again_alone_the_others_go_on(
    digits, tmp_path
):
    # The members of a fused unit are handed over one by one: the one whose state cannot be
    # written runs the unit again (and fails after max_unit_failures), the others go on as in
    # a run without the failure.
    flag, absent = tmp_path / "fail-always", tmp_path / "absent"
    search = cerebro.GridSearch(
        {"lr": cerebro.choice([0.003, 0.03]), "flag": cerebro.choice([str(flag), str(absent)])}
    )
    options = dict(search=search, build=builders.handover_fails, max_unit_failures=2)
    reference = _fused(digits, tmp_path / "ref", **options)
    flag.write_text("always")
    with pytest.warns(RuntimeWarning, match="it runs again"):
        result = _fused(digits, tmp_path / "run", **options)

    failing = {m.id for m in result.models if m.params["flag"] == str(flag)}
    going_on = {m.id for m in result.models} - failing
    assert {m.id for m in result.models if m.status == "failed"} == failing
    assert {m.id for m in result.models if m.status == "completed"} == going_on
    assert going_on <= result.fused_models and going_on <= reference.fused_models
    failed = [e["detail"] for e in result.events if e["kind"] == "handover_failed"]
    assert sorted((f["model"], f["failures"]) for f in failed) == [
        (m, n) for m in sorted(failing) for n in (1, 2)
    ]
    history, expected = result.history, reference.history
    pd.testing.assert_frame_equal(
        history[history.model_id.isin(going_on)].reset_index(drop=True),
        expected[expected.model_id.isin(going_on)].reset_index(drop=True),
        check_exact=True,
    )
    for model_id in going_on:
        assert state_equal(
            result.load_model(model_id).state_dict(), reference.load_model(model_id).state_dict()
        ), model_id
