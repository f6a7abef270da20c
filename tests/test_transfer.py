"""Transfer learning: frozen prefixes computed once per shard (materialized), shared by
configurations, chosen under a storage budget, and equal to training end to end with the prefix
frozen."""

from __future__ import annotations

import builders
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_same_results, make_backend, small_experiment

import cerebro
from cerebro import training
from cerebro.engine.materializing import FeaturePlanner, Materialize, PrefixFacts
from cerebro.techniques.prefix import chain, cut, run_layers

WEIGHTS = "weights.pt"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, digits_arrays) -> str:
    """The backbone trained on another task (digit parity), saved as a state dict: what a
    downloaded pre-trained network would be."""
    torch.manual_seed(0)
    net, head = builders.backbone(), torch.nn.Linear(64, 2)
    optimizer = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=1e-2)
    x, y = torch.tensor(digits_arrays["x"]), torch.tensor(digits_arrays["y"] % 2)
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(net(x)), y).backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("pretrained") / WEIGHTS
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def exact(pretrained, digits_arrays) -> bool:
    """Whether this CPU's kernels give each row of the prefix the same bits whatever the batch
    (one thread, as in a worker): the batches of 32 an end-to-end replay runs against the
    larger chunks kept features are computed in. Some CPUs' kernels (seen with AVX-512) round
    by batch: there the comparisons below allow float32 rounding instead of equal bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for rows in (300, 359):  # a shard's rows: chunks of 256, the last one partial
            x = torch.tensor(digits_arrays["x"][:rows])
            for depth in (3, 6, 8):
                frozen = builders.transfer({"weights": pretrained, "freeze": depth}).frozen
                assert frozen is not None
                chunked = run_layers(list(frozen), x)
                with torch.no_grad():
                    batched = torch.cat([frozen(x[i : i + 32]) for i in range(0, rows, 32)])
                if not torch.equal(chunked, batched):
                    return False
    finally:
        torch.set_num_threads(threads)
    return True


def _same(a: torch.Tensor, b: torch.Tensor, exact: bool) -> bool:
    return torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-3, atol=1e-5)


def _space(weights: str, freeze=(3, 6, 8), **more) -> dict:
    return {"weights": cerebro.choice([weights]), "freeze": cerebro.choice(list(freeze)),
            "lr": cerebro.choice([0.003, 0.01]), **more}  # fmt: skip


def _run(digits, path, weights, materialize, **overrides) -> cerebro.Result:
    arguments = dict(
        build=builders.transfer,
        search=cerebro.GridSearch(_space(weights)),
        epochs=2,
        seed=1,
        deterministic=True,
        materialize=materialize,
    )
    arguments.update(overrides)
    return small_experiment(digits, path, **arguments).run()


def _visits(result: cerebro.Result, model_id: int, epochs: int) -> list[list[int]]:
    hops = result.hops[(result.hops.model_id == model_id) & (result.hops.kind == "train")]
    hops = hops.sort_values("start")
    return [list(hops[hops.epoch == e].shard) for e in range(epochs)]


def test_materialized_training_equals_training_with_the_prefix_frozen(
    digits, tmp_path, pretrained, exact
):
    """Each configuration, trained on kept features, equals the same configuration trained in
    one process over the same shards in the same order with its prefix run on every batch
    (``requires_grad`` off, eval mode): bit for bit where the prefix's kernels (conv, linear,
    pooling on one thread) give each row the same bits whatever the batch (``exact``), else up
    to float32 rounding."""
    result = _run(digits, tmp_path / "run", pretrained, True)
    assert {m.status for m in result.models} == {"completed"}
    shards = [digits.load_shard("train", s) for s in range(digits.num_shards)]
    for record in result.models:
        alone = training.train_in_process(
            builders.transfer, record.params, shards, _visits(result, record.id, 2), 1, record.id
        )
        trained = result.load_model(record.id)
        assert isinstance(trained, torch.nn.Sequential) and len(trained) == 2  # frozen + model
        for name, tensor in alone.model.state_dict().items():
            assert _same(trained[1].state_dict()[name], tensor, exact), (record.id, name)


def test_each_cut_and_shard_is_computed_once_across_configurations_and_epochs(
    digits, tmp_path, pretrained
):
    result = _run(digits, tmp_path / "run", pretrained, True, epochs=3)
    made = result.materialized
    cuts = {m.params["freeze"] for m in result.models}
    assert not made.duplicated(["prefix", "split", "shard"]).any()
    assert set(made.cut) == cuts  # unlimited budget: every configuration's own depth is kept
    for cut_depth in cuts:
        rows = made[made.cut == cut_depth]
        assert sorted(zip(rows.split, rows.shard)) == sorted(
            (split, s) for split in ("train", "val") for s in range(digits.num_shards)
        )
    assert (made.bytes > 0).all() and (made.rows > 0).all()
    assert (tmp_path / "run" / "features").is_dir()


def test_unlimited_budget_gives_the_results_of_materialize_off_bit_for_bit(
    digits, tmp_path, pretrained, exact
):
    """Each configuration reads its own kept depth and trains alone, in the shard order it has
    without materialization: the same records and weights as current practice (bit for bit
    where the kernels give each row the same bits whatever the batch: see above)."""
    on = _run(digits, tmp_path / "on", pretrained, True)
    off = _run(digits, tmp_path / "off", pretrained, False)
    assert off.materialized.empty and not on.materialized.empty
    assert not on.fused_models
    if exact:
        assert_same_results(on, off)
        return
    pd.testing.assert_frame_equal(on.history, off.history, rtol=1e-3, atol=1e-5)
    for record in off.models:
        for name, tensor in off.load_model(record.id).state_dict().items():
            assert _same(on.load_model(record.id).state_dict()[name], tensor, exact), name


@pytest.mark.slow  # four selections (the default run stays under 10 minutes)
@pytest.mark.parametrize("fraction", [0.25, 0.0])
def test_under_a_budget_each_model_still_trains_as_with_its_prefix_frozen(
    digits, tmp_path, pretrained, fraction, exact
):
    """A quarter of the storage (or none): fewer depths kept, the others computed from the
    nearest kept depth below in each unit, which configurations of one prefix share. Features
    are computed in fixed chunks, so each model still equals its end-to-end replay (up to
    float32 rounding where kernels round by batch: see ``exact``)."""
    need = _run(digits, tmp_path / "full", pretrained, True).materialized.bytes.sum()
    result = _run(
        digits, tmp_path / "run", pretrained, Materialize(budget_mb=fraction * need / 2**20)
    )
    assert result.materialized.bytes.sum() <= fraction * need
    assert (result.materialized.bytes.sum() > 0) == (fraction > 0)
    assert len(result.fused_models) >= 2  # models computing part of their prefix share units
    shards = [digits.load_shard("train", s) for s in range(digits.num_shards)]
    for record in result.models:
        alone = training.train_in_process(
            builders.transfer, record.params, shards, _visits(result, record.id, 2), 1, record.id
        )
        trained = result.load_model(record.id)[1].state_dict()
        for name, tensor in alone.model.state_dict().items():
            assert _same(trained[name], tensor, exact), (record.id, name)


def test_configurations_sharing_a_prefix_train_in_one_unit(digits, tmp_path, pretrained):
    """With nothing kept, configurations of one cut hop together: the prefix runs once per
    unit for all their heads (heads of different widths, too)."""
    search = cerebro.GridSearch(_space(pretrained, freeze=(6,), head=cerebro.choice([16, 32])))
    result = _run(digits, tmp_path / "run", pretrained, Materialize(budget_mb=0), search=search)
    units = result.hops[result.hops.kind == "train"].groupby("unit").model_id.nunique()
    assert units.max() == 4
    assert result.fused_models == {m.id for m in result.models}


def test_a_head_that_does_not_fit_its_prefix_fails_alone_with_both_shapes(
    digits, tmp_path, pretrained
):
    search = cerebro.GridSearch(_space(pretrained, freeze=(6,), head_in=cerebro.choice([64, 99])))
    result = _run(digits, tmp_path / "run", pretrained, True, search=search)
    bad = [m for m in result.models if m.params["head_in"] == 99]
    good = [m for m in result.models if m.params["head_in"] == 64]
    assert {m.status for m in bad} == {"failed"} and {m.status for m in good} == {"completed"}
    # Depth 6 ends after pooling: 16 channels x 4 x 4 per row; the rest of the backbone
    # flattens them and gives 64 features, where the head's Linear wants 99.
    assert "output has shape (16, 4, 4) per row" in bad[0].error, bad[0].error
    assert "64 and 99x32" in bad[0].error


def test_a_head_mismatch_names_the_models_first_layer(digits, tmp_path, pretrained):
    search = cerebro.GridSearch(_space(pretrained, freeze=(8,), head_in=cerebro.choice([99])))
    with pytest.raises(cerebro.AllModelsFailed) as raised:
        _run(digits, tmp_path / "run", pretrained, True, search=search)
    message = str(raised.value)
    assert "output has shape (64,) per row" in message, message
    assert "first layer 1.0 (Linear) takes 99 features" in message, message


def test_experiments_sharing_a_feature_folder_compute_nothing_again(digits, tmp_path, pretrained):
    """Kept features are named by prefix and shard content: a second experiment (other lrs)
    over the same backbone and shards reads the first one's files."""
    shared = Materialize(folder=str(tmp_path / "features"))
    first = _run(digits, tmp_path / "one", pretrained, shared, epochs=1)
    assert len(first.materialized) == 3 * 2 * digits.num_shards
    search = cerebro.GridSearch({**_space(pretrained), "lr": cerebro.choice([0.001])})
    again = _run(digits, tmp_path / "two", pretrained, shared, epochs=1, search=search)
    assert again.materialized.empty
    alone = _run(digits, tmp_path / "alone", pretrained, True, epochs=1, search=search)
    assert_same_results(again, alone)


@pytest.mark.slow  # two selections, for the spill path alone
def test_features_beyond_a_workers_memory_are_read_back_from_their_files(
    digits, tmp_path, pretrained
):
    """memory_mb=0: nothing stays in memory, every unit reads its features from the file."""
    spilled = _run(digits, tmp_path / "spilled", pretrained, Materialize(memory_mb=0))
    held = _run(digits, tmp_path / "held", pretrained, True)
    assert len(spilled.materialized) == len(held.materialized)
    assert_same_results(spilled, held)


def test_a_damaged_feature_file_is_computed_again(digits, tmp_path, pretrained):
    shared = Materialize(folder=str(tmp_path / "features"))
    first = _run(digits, tmp_path / "one", pretrained, shared, epochs=1)
    damaged = next((tmp_path / "features").rglob("*.pt"))
    damaged.write_bytes(b"not a tensor")
    again = _run(digits, tmp_path / "two", pretrained, shared, epochs=1)
    assert len(again.materialized) == 1
    assert_same_results(again, first)


@pytest.mark.slow  # Ray's start-up
def test_materialized_units_on_ray_give_the_local_results(digits, tmp_path, pretrained):
    local = _run(digits, tmp_path / "local", pretrained, Materialize(budget_mb=0.5))
    on_ray = _run(
        digits, tmp_path / "ray", pretrained, Materialize(budget_mb=0.5),
        backend=make_backend("ray"),
    )  # fmt: skip
    assert len(on_ray.materialized) == len(local.materialized) > 0
    assert_same_results(on_ray, local)


def test_after_append_only_the_new_shards_are_computed(digits_arrays, tmp_path, pretrained):
    """A finished selection continued on the grown dataset: the old shards' features are read
    back (they are named by content), only the new shards' are computed."""
    first = cerebro.prepare_data(
        {k: v[:1200] for k, v in digits_arrays.items()}, tmp_path / "d", num_shards=4
    )
    path = tmp_path / "run"
    done = _run(first, path, pretrained, True, epochs=1)
    before = done.materialized
    assert set(before.shard) == {0, 1, 2, 3}
    grown = first.append({k: v[1200:] for k, v in digits_arrays.items()})
    ctl = cerebro.control(path)
    for model in done.models:
        ctl.set_epochs(model.id, 2)
    result = _run(grown, path, pretrained, True, epochs=1)
    assert {m.status for m in result.models} == {"completed"}
    made = result.materialized
    assert not made.duplicated(["prefix", "split", "shard"]).any()
    new = made.iloc[len(before) :]
    assert set(new.shard) == set(range(4, grown.num_shards))
    assert len(new) == 3 * 2 * (grown.num_shards - 4)  # 3 cuts x 2 splits x the new shards


def test_load_model_gives_prefix_and_model_in_one_module(digits, tmp_path, pretrained):
    result = _run(digits, tmp_path / "run", pretrained, True, epochs=1)
    model = result.load_model()
    x = digits.load_shard("val", 0).x
    spec = builders.transfer(result.best.params)
    with torch.no_grad():
        expected = spec.model(spec.frozen(x))
        assert model(x).shape == expected.shape == (len(x), 10)
    assert not any(p.requires_grad for p in model[0].parameters())


# The planner --------------------------------------------------------------------------------


def _facts(depths: int, row_bytes: int = 100, seconds: float = 1e-5, tag: str = "a") -> PrefixFacts:
    return PrefixFacts(
        tuple(f"{tag}{i}" for i in range(1, depths + 1)),
        (row_bytes,) * depths,
        (seconds,) * depths,
    )


def test_unlimited_budget_keeps_each_configurations_own_depth():
    planner = FeaturePlanner(Materialize(), rows=1000, epochs=5, folder="f")
    planner.enroll({0: _facts(2), 1: _facts(3), 2: _facts(3)})
    assert planner.kept == {"a2", "a3"}
    assert planner.plan(1).kept == (2, 3) and planner.plan(0).kept == (2,)


def test_a_budget_keeps_what_saves_most_within_it():
    """Room for one depth's features: the shared depth 2 serves both configurations, where
    depth 3 would serve only one."""
    planner = FeaturePlanner(Materialize(budget_mb=1000 * 100 / 2**20), 1000, 5, "f")
    planner.enroll({0: _facts(2), 1: _facts(3)})
    assert planner.kept == {"a2"}
    assert planner.stored_bytes(planner.kept) <= 1000 * 100


def test_nothing_is_kept_with_a_budget_of_zero_and_plans_come_back_after_restart():
    planner = FeaturePlanner(Materialize(budget_mb=0), 1000, 5, "f")
    event = planner.enroll({0: _facts(2)})
    assert planner.kept == set() and planner.plan(0).kept == ()
    again = FeaturePlanner(Materialize(budget_mb=0), 1000, 5, "f")
    again.restore([{"kind": "feature_plan", "detail": event}])
    assert again.plan(0) == planner.plan(0)


def test_chains_of_cuts_of_one_backbone_share_their_common_depths():
    net = builders.backbone()
    two, _ = cut(net, 2)
    three, _ = cut(net, 3)
    assert chain(three)[:2] == chain(two) and len(set(chain(three))) == 3
    other = builders.backbone()  # other weights: other digests from the first layer with weights
    assert chain(cut(other, 2)[0])[1] != chain(two)[1]


# Bad input ----------------------------------------------------------------------------------


def test_frozen_must_be_a_module():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(cerebro.ConfigError, match="ModelSpec.frozen"):
        cerebro.ModelSpec(model, torch.optim.SGD(model.parameters(), lr=0.1),
                          torch.nn.MSELoss(), 4, frozen="resnet")  # fmt: skip


def test_an_optimizer_over_frozen_parameters_is_refused():
    frozen, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD([*frozen.parameters(), *model.parameters()], lr=0.1)
    with pytest.raises(cerebro.ConfigError, match="parameters of ModelSpec.frozen"):
        cerebro.ModelSpec(model, optimizer, torch.nn.MSELoss(), 4, frozen=frozen)


@pytest.mark.parametrize("depth", [-1, 9, 2.5, True])
def test_a_cut_outside_the_backbone_is_refused(depth):
    with pytest.raises(cerebro.ConfigError, match=r"expected an integer from 0 to 8"):
        cut(builders.backbone(), depth)


def test_only_sequential_backbones_are_cut():
    with pytest.raises(cerebro.ConfigError, match="backbone='Linear'"):
        cut(torch.nn.Linear(2, 2), 1)


@pytest.mark.parametrize(
    "value, match",
    [
        ("yes", "materialize='yes'"),
        (1.0, "materialize=1.0"),
    ],
)
def test_materialize_accepts_bools_and_options_only(digits, tmp_path, value, match):
    with pytest.raises(cerebro.ConfigError, match=match):
        small_experiment(digits, tmp_path, materialize=value)


@pytest.mark.parametrize("kwargs", [{"budget_mb": -1}, {"budget_mb": "big"}, {"memory_mb": -5}])
def test_materialize_limits_are_checked(kwargs):
    with pytest.raises(cerebro.ConfigError, match="Materialize"):
        Materialize(**kwargs)


def test_a_build_that_changes_its_frozen_weights_fails_its_model_with_the_reason(digits, tmp_path):
    """A frozen prefix initialized at random on each build (no weights loaded) computes other
    features on every worker: refused, not silently trained on."""
    search = cerebro.GridSearch({"freeze": cerebro.choice([3])})
    with pytest.raises(cerebro.AllModelsFailed, match="frozen prefix built here differs"):
        small_experiment(
            digits, tmp_path, build=builders.transfer_unseeded, search=search, materialize=True
        ).run()


def test_features_are_the_same_bits_from_any_kept_depth():
    from cerebro.techniques.prefix import layers_of, run_layers

    torch.manual_seed(0)
    frozen, _ = cut(builders.backbone(), 8)
    x = torch.tensor(np.random.default_rng(0).random((700, 8, 8), dtype=np.float32))
    layers = layers_of(frozen)
    direct = run_layers(layers, x)
    stepwise = run_layers(layers[5:], run_layers(layers[:5], x))
    assert torch.equal(direct, stepwise)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_materialized_features_on_gpu_workers_match_the_cpu_run(digits, tmp_path, pretrained):
    """Features computed and kept on the GPU (saved to files from host copies); each model ends
    near its CPU run (float32 kernels differ between devices: 1e-3 after 2 epochs)."""
    cpu = _run(digits, tmp_path / "cpu", pretrained, True)
    gpu = _run(
        digits, tmp_path / "gpu", pretrained, True,
        backend=cerebro.LocalBackend(workers=2, devices=["cuda:0"]),
    )  # fmt: skip
    assert len(gpu.materialized) == len(cpu.materialized)
    for record in cpu.models:
        a, b = cpu.load_model(record.id).state_dict(), gpu.load_model(record.id).state_dict()
        for name, tensor in a.items():
            assert torch.allclose(b[name], tensor, atol=1e-3), (record.id, name)
