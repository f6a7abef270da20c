"""The fused runner trains each member exactly as a plain hop would (issue 14).

Every comparison trains the same members twice from the same initial states and seeds: fused in
one group, and each alone with the plain runner (``run_train_hop``). The fused runner uses the
same kernels as the plain hop wherever torch's batched ones would round differently (a
convolution per member; tiny Linear products per member, where torch's bmm takes a naive loop),
draws each member's dropout masks with F.dropout's own call from its own generator, and applies
torch.optim's formulas in the same operation order. That made the two bit-identical on the CPU
where it was written, but not on every CPU (MKL picks kernels by shape and instruction set: off
by 5e-8 after an epoch here). So the assertions allow 1e-5 on weights (float32 rounding of a few
last bits over 9 hops of small steps) and 4 significant digits on losses: the group's
cross-entropy sums each member's rows in another order than the mean of a plain hop does, which
changes the reported loss in its last bits only, never the gradient.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import builders
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cerebro
from cerebro import training
from cerebro.data import Shard
from cerebro.errors import ModelFailed
from cerebro.state import Counters
from cerebro.techniques import Technique, runner_for
from cerebro.techniques.base import MemberSeeds, ModelInHand
from cerebro.techniques.fusable import fusability
from cerebro.techniques.fused import FusedRunner
from cerebro.techniques.plain import PlainRunner

CPU = torch.device("cpu")
WEIGHT_TOLERANCE = 1e-5
LOSS_RELATIVE = 5e-5  # 4 significant digits


@pytest.fixture(scope="module")
def digit_shards() -> list[Shard]:
    """600 digit images (1 x 8 x 8) in 3 shards of 200 rows (batches of 32: a short last one)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:600] / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target[:600], dtype=torch.int64)
    return [Shard(x[i::3].contiguous(), y[i::3].contiguous()) for i in range(3)]


# Builds: one architecture, one optimizer and one scheduler per case; members differ in the
# per-member settings (lr, weight decay, momentum, betas, dropout).


def _model(arch: str, dropout: float) -> nn.Sequential:
    if arch == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Sequential(nn.Linear(32, 16), nn.Tanh()),  # nested
            nn.Linear(16, 10),
        )
    # No bias right before a BatchNorm (as usual): its true gradient is zero, so what it gets
    # is rounding noise, which Adam divides by its own tiny running size into lr-sized steps;
    # its value would then follow the last bit of a sum rather than the training.
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(dropout),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8, affine=False),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(32, 16, bias=False),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(dropout / 2),
        nn.Linear(16, 10),
    )


def build(params: dict) -> cerebro.ModelSpec:
    model = _model(params["arch"], params.get("dropout", 0.0))
    opt = params["opt"]
    if opt == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(),
            lr=params["lr"],
            momentum=params.get("momentum", 0.9),
            dampening=params.get("dampening", 0.0),
            weight_decay=params.get("wd", 0.0),
            nesterov=params.get("nesterov", False),
        )
    elif opt == "adam":
        optimizer = torch.optim.Adam(
            model.parameters(),
            lr=params["lr"],
            betas=params.get("betas", (0.9, 0.999)),
            weight_decay=params.get("wd", 0.0),
        )
    else:
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=params["lr"],
            betas=params.get("betas", (0.9, 0.999)),
            weight_decay=params.get("wd", 0.01),
            eps=params.get("eps", 1e-8),
        )
    sched, interval = params.get("sched"), "epoch"
    scheduler = None
    if sched == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=params["gamma"])
    elif sched == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params["t_max"])
    elif sched == "batch":
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=params["gamma"])
        interval = "batch"
    return cerebro.ModelSpec(
        model=model,
        optimizer=optimizer,
        loss=params.get("loss", nn.CrossEntropyLoss()),
        batch_size=32,
        metrics={"accuracy": cerebro.metrics.accuracy},
        lr_scheduler=scheduler,
        lr_scheduler_interval=interval,
    )


CASES = {
    "mlp-sgd-momentum-constant": (
        {"arch": "mlp", "opt": "sgd"},
        [
            {"lr": 0.05, "momentum": 0.9},
            {"lr": 0.1, "momentum": 0.5, "wd": 1e-3, "dropout": 0.2},
            {"lr": 0.02, "momentum": 0.8, "dampening": 0.1, "dropout": 0.5},
        ],
    ),
    "mlp-sgd-nesterov-steplr": (
        {"arch": "mlp", "opt": "sgd", "nesterov": True, "sched": "step"},
        [{"lr": 0.05, "gamma": 0.5, "wd": 1e-4}, {"lr": 0.1, "gamma": 0.9, "dropout": 0.3}],
    ),
    "mlp-adam-cosine": (
        {"arch": "mlp", "opt": "adam", "sched": "cosine"},
        [
            {"lr": 3e-3, "t_max": 3},
            {"lr": 1e-2, "betas": (0.8, 0.99), "wd": 1e-3, "t_max": 5, "dropout": 0.25},
        ],
    ),
    "mlp-adamw-batch-schedule": (
        {"arch": "mlp", "opt": "adamw", "sched": "batch"},
        [{"lr": 3e-3, "gamma": 0.99}, {"lr": 1e-2, "gamma": 0.97, "wd": 0.1, "dropout": 0.1}],
    ),
    "cnn-sgd-momentum-steplr": (
        {"arch": "cnn", "opt": "sgd", "sched": "step"},
        [
            {"lr": 0.05, "gamma": 0.7, "dropout": 0.2},
            {"lr": 0.02, "momentum": 0.5, "gamma": 0.9, "wd": 1e-3, "dropout": 0.4},
        ],
    ),
    "cnn-adamw-batch-schedule": (
        {"arch": "cnn", "opt": "adamw", "sched": "batch"},
        [
            {"lr": 3e-3, "gamma": 0.995, "dropout": 0.3},
            {"lr": 1e-3, "betas": (0.85, 0.98), "gamma": 0.99, "eps": 1e-6},
        ],
    ),
}


@dataclass
class Trained:
    """A group's members trained over some hops, and what each hop returned."""

    models: list[ModelInHand]
    outcomes: list[list] = field(default_factory=list)  # [hop][member]


def _hands(params: list[dict], seed: int = 0) -> list[ModelInHand]:
    hands = []
    for i, p in enumerate(params):
        init = 1000 * seed + i
        spec = training.build_spec(build, p, init)
        hands.append(ModelInHand(i, spec, {"rng": torch.get_rng_state()}, Counters(0, 0, init), p))
    return hands


def _seeds(hop: int, members: int, deterministic: bool = False) -> list[MemberSeeds]:
    return [
        MemberSeeds(7919 * hop + 31 * k, 104729 * hop + k if deterministic else None)
        for k in range(members)
    ]


def _hop(runner, models, shards, hop, end, deterministic=False):
    shard = shards[hop % len(shards)]
    if isinstance(runner, PlainRunner):
        return [
            runner.train([m], [s], shard, CPU, end)[0]
            for m, s in zip(models, _seeds(hop, len(models), deterministic), strict=True)
        ]
    return runner.train(models, _seeds(hop, len(models), deterministic), shard, CPU, end)


def _train(runner, params, shards, epochs, deterministic=False) -> Trained:
    trained = Trained(_hands(params))
    for hop in range(epochs * len(shards)):
        end = hop % len(shards) == len(shards) - 1
        trained.outcomes.append(_hop(runner, trained.models, shards, hop, end, deterministic))
    return trained


def _max_weight_diff(a: ModelInHand, b: ModelInHand) -> float:
    sa, sb = a.spec.model.state_dict(), b.spec.model.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


def _assert_same_sums(fused, plain) -> None:
    assert fused.rows == plain.rows
    assert fused.sums.keys() == plain.sums.keys()
    for name, value in plain.sums.items():
        assert fused.sums[name] == pytest.approx(value, rel=LOSS_RELATIVE), name
    assert fused.sums["accuracy"] == plain.sums["accuracy"]  # a count of rows: exact


@pytest.mark.parametrize("case", list(CASES))
def test_fused_members_match_plain_hops(case, digit_shards):
    common, members = CASES[case]
    params = [{**common, **m} for m in members]
    fused = _train(FusedRunner(), params, digit_shards, epochs=3)
    plain = _train(PlainRunner(), params, digit_shards, epochs=3)
    for hop_f, hop_p in zip(fused.outcomes, plain.outcomes, strict=True):
        for f, p in zip(hop_f, hop_p, strict=True):
            _assert_same_sums(f, p)
    for f, p in zip(fused.models, plain.models, strict=True):
        assert _max_weight_diff(f, p) <= WEIGHT_TOLERANCE
        assert torch.equal(f.rng["rng"], p.rng["rng"])  # the same draws from each stream
        assert f.spec.optimizer.param_groups[0]["lr"] == p.spec.optimizer.param_groups[0]["lr"]
        if p.spec.lr_scheduler is not None:
            assert f.spec.lr_scheduler.state_dict() == p.spec.lr_scheduler.state_dict()
    evaluated = FusedRunner().evaluate(fused.models, digit_shards[0], CPU)
    for e, m in zip(evaluated, plain.models, strict=True):
        _assert_same_sums(e, PlainRunner().evaluate([m], digit_shards[0], CPU)[0])


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_a_member_does_not_depend_on_its_group(arch, digit_shards):
    """Member 0 fused alone and fused among 7 others (deterministic seeds, as in deterministic
    mode): bit-identical weights, optimizer state, rng and sums."""
    base = {"arch": arch, "opt": "adam", "dropout": 0.2}
    params = [{**base, "lr": 1e-3 * (k + 1), "betas": (0.9 - 0.01 * k, 0.999)} for k in range(8)]
    alone = _train(FusedRunner(), params[:1], digit_shards, epochs=1, deterministic=True)
    group = _train(FusedRunner(), params, digit_shards, epochs=1, deterministic=True)
    a, g = alone.models[0], group.models[0]
    assert _max_weight_diff(a, g) == 0.0
    assert torch.equal(a.rng["rng"], g.rng["rng"])
    sa, sg = a.spec.optimizer.state_dict()["state"], g.spec.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i][k], sg[i][k]) for i in sa for k in sa[i])
    assert [o[0].sums for o in alone.outcomes] == [o[0].sums for o in group.outcomes]


def _structure(state: dict) -> dict:
    return {
        i: {k: (type(v).__name__, tuple(v.shape), v.dtype, v.device.type) for k, v in s.items()}
        for i, s in state["state"].items()
    }


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_optimizer_state_has_plain_format_and_hops_mix(opt, digit_shards):
    """After a fused hop a member's optimizer state_dict is what a plain hop leaves; and a
    member trained fused, then plain, then fused equals one trained plain throughout."""
    params = [
        {"arch": "cnn", "opt": opt, "lr": 0.01, "dropout": 0.1},
        {"arch": "cnn", "opt": opt, "lr": 0.02},
    ]
    fused, plain = _hands(params), _hands(params)
    _hop(FusedRunner(), fused, digit_shards, 0, False)
    _hop(PlainRunner(), plain, digit_shards, 0, False)
    for f, p in zip(fused, plain, strict=True):
        sf, sp = f.spec.optimizer.state_dict(), p.spec.optimizer.state_dict()
        assert _structure(sf) == _structure(sp)
        assert sf["param_groups"] == sp["param_groups"]
        state = f.spec.optimizer.state[next(f.spec.model.parameters())]
        assert list(state) == list(p.spec.optimizer.state[next(p.spec.model.parameters())])
        # captured in the one per-model format, and loadable into a fresh build
        captured = training.capture_state(f.spec, {"version": 1}, CPU)
        fresh = training.build_spec(build, f.params, init_seed=None)
        training.restore_state(fresh, captured, CPU)
    _hop(PlainRunner(), fused, digit_shards, 1, False)
    _hop(PlainRunner(), plain, digit_shards, 1, False)
    _hop(FusedRunner(), fused, digit_shards, 2, True)
    _hop(PlainRunner(), plain, digit_shards, 2, True)
    for f, p in zip(fused, plain, strict=True):
        assert _max_weight_diff(f, p) <= WEIGHT_TOLERANCE
        assert f.spec.model[1].num_batches_tracked == p.spec.model[1].num_batches_tracked


def test_sgd_without_momentum_keeps_no_buffer(digit_shards):
    params = [{"arch": "mlp", "opt": "sgd", "lr": 0.1, "momentum": 0.0}] * 2
    (fused,) = _hands(params[:1])
    _hop(FusedRunner(), [fused], digit_shards, 0, True)
    assert len(fused.spec.optimizer.state) == 0  # torch.optim.SGD keeps none either


def _scaled_ce(outputs, targets, scale: float):
    return F.cross_entropy(outputs, targets) * scale


def test_a_non_finite_member_fails_alone(digit_shards):
    """A member whose loss is NaN gets ModelFailed naming it; the others' sums and weights are
    those of plain hops (its NaNs never reach them). Its loss is a plain callable, which the
    fused runner calls member by member."""
    params = [
        {
            "arch": "mlp",
            "opt": "adam",
            "lr": 1e-3,
            "loss": functools.partial(_scaled_ce, scale=1.0),
        },
        {
            "arch": "mlp",
            "opt": "adam",
            "lr": 1e-3,
            "loss": functools.partial(_scaled_ce, scale=float("nan")),
        },
        {
            "arch": "mlp",
            "opt": "adam",
            "lr": 3e-3,
            "loss": functools.partial(_scaled_ce, scale=1.0),
        },
    ]
    fusions = {fusability(training.build_spec(build, p, 0)).key for p in params}
    assert len(fusions) == 1
    fused = _hands(params)
    fused[1].model_id = 41
    outcomes = _hop(FusedRunner(), fused, digit_shards, 0, True)
    assert isinstance(outcomes[1], ModelFailed)
    assert str(outcomes[1]).startswith("model 41: training produced non-finite values:")
    plain = _hands(params)
    expected = _hop(PlainRunner(), [plain[0]], digit_shards, 0, True)
    _assert_same_sums(outcomes[0], expected[0])
    assert _max_weight_diff(fused[0], plain[0]) <= WEIGHT_TOLERANCE
    assert not isinstance(outcomes[2], ModelFailed)
    (evaluated,) = [FusedRunner().evaluate(fused, digit_shards[1], CPU)[1]]
    assert isinstance(evaluated, ModelFailed)
    assert "model 41: validation produced non-finite values" in str(evaluated)


# Which models may be fused -----------------------------------------------------------------------


class _Block(nn.Module):
    def forward(self, x):
        return x


def _spec(params: dict) -> cerebro.ModelSpec:
    return build({"arch": "mlp", "opt": "adam", "lr": 1e-3, **params})


def test_fusability_reasons():
    spec = _spec({})
    spec.model.insert(3, _Block())
    assert fusability(spec).reason == "layer 3 (_Block) is not a supported layer"

    flaky = builders.flaky({"fail": "forward"})
    assert fusability(flaky).reason == "the model has its forward replaced on the instance"

    spec = _spec({})
    spec.optimizer = torch.optim.RMSprop(spec.model.parameters())
    spec.lr_scheduler = None
    assert fusability(spec).reason == "optimizer RMSprop is not supported (SGD, Adam, AdamW)"

    spec = _spec({})
    spec.optimizer = torch.optim.Adam(spec.model.parameters(), amsgrad=True)
    spec.lr_scheduler = None
    assert fusability(spec).reason == "optimizer Adam with amsgrad=True is not supported"

    spec = _spec({})
    spec.lr_scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(spec.optimizer)
    assert "ReduceLROnPlateau is not supported" in (fusability(spec).reason or "")

    spec = _spec({})
    spec.model = nn.Sequential(nn.Linear(64, 10))
    spec.model.register_forward_hook(lambda *a: None)
    spec.optimizer = torch.optim.SGD(spec.model.parameters(), lr=0.1)
    spec.lr_scheduler = None
    assert fusability(spec).reason == "the model has hooks"

    spec = _spec({})
    spec.model = nn.Linear(64, 10)  # type: ignore[assignment]
    assert fusability(spec).reason == "model is not an nn.Sequential"

    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2))
    spec = cerebro.ModelSpec(
        grouped, torch.optim.SGD(grouped.parameters(), lr=0.1), nn.CrossEntropyLoss(), 8
    )
    assert fusability(spec).reason == "layer 0 (Conv2d) has groups=2 (only 1 is supported)"


def test_fusability_keys():
    plain = fusability(_spec({}))
    assert plain.key is not None and plain.reason is None
    # per-member settings: same key
    assert (
        fusability(_spec({"lr": 0.3, "wd": 0.1, "betas": (0.5, 0.9), "dropout": 0.4})).key
        == plain.key
    )
    assert fusability(_spec({"sched": "step", "gamma": 0.5})).key == plain.key
    # shapes, optimizer, architecture: other keys
    assert (
        fusability(builders.mlp({"width": 32})).key != fusability(builders.mlp({"width": 64})).key
    )
    assert fusability(_spec({"opt": "sgd"})).key != plain.key
    assert fusability(_spec({"arch": "cnn"})).key != plain.key
    assert fusability(_spec({"loss": functools.partial(_scaled_ce, scale=1.0)})).key != plain.key
    # memory: weights, gradients, Adam's two moments, and activations at batch 32
    weights = sum(p.numel() * 4 for p in _spec({}).model.parameters())
    assert plain.nbytes > 4 * weights
    cnn = fusability(_spec({"arch": "cnn"}), input_shape=(1, 8, 8))
    assert cnn.nbytes > 0


def test_runner_checks_its_group(digit_shards):
    with pytest.raises(ValueError, match="at least one model, not 0"):
        FusedRunner().check(0)
    FusedRunner().check(1)
    assert isinstance(runner_for(Technique.FUSED), FusedRunner)
    mixed = _hands([{"arch": "mlp", "opt": "adam", "lr": 1e-3}])
    other = ModelInHand(9, builders.mlp({}), {"rng": torch.get_rng_state()}, Counters(0, 0, 1), {})
    with pytest.raises(ValueError, match=r"models \[0, 9\] cannot be fused together: models \[9\]"):
        FusedRunner().train(mixed + [other], _seeds(0, 2), digit_shards[0], CPU, False)


# GPU --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["mlp-adamw-batch-schedule", "cnn-sgd-momentum-steplr"])
def test_fused_members_match_plain_hops_on_cuda(case, digit_shards):
    """On CUDA the convolution is grouped (one kernel for the group) and dropout masks come
    from each member's CUDA stream through native_dropout, F.dropout's kernel there: weights
    agree to float32 rounding (TF32 off), not bit for bit."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    shards = [Shard(s.x.to(device), s.y.to(device)) for s in digit_shards]
    common, members = CASES[case]
    params = [{**common, **m} for m in members]

    def on_device(hands):
        for h in hands:
            h.spec.model.to(device)
        return hands

    fused, plain = on_device(_hands(params)), on_device(_hands(params))
    for hop in range(len(shards)):
        end = hop == len(shards) - 1
        seeds = _seeds(hop, len(params))
        f_out = FusedRunner().train(fused, seeds, shards[hop], device, end)
        p_out = [
            PlainRunner().train([m], [s], shards[hop], device, end)[0]
            for m, s in zip(plain, seeds, strict=True)
        ]
        for f, p in zip(f_out, p_out, strict=True):
            assert f.sums["loss"] == pytest.approx(p.sums["loss"], rel=1e-3)
    for f, p in zip(fused, plain, strict=True):
        assert _max_weight_diff(f, p) <= 1e-4
        assert torch.equal(f.rng["cuda_rng"], p.rng["cuda_rng"])
