"""The fused runner against the plain one: each member of a fused group ends a hop as the same
model trained alone, its state in the same format, whatever else the group holds."""

from __future__ import annotations

import pytest
import torch
from conftest import state_equal

import cerebro
from cerebro import training
from cerebro.data import Shard
from cerebro.state import Counters
from cerebro.techniques.base import MemberSeeds, ModelInHand
from cerebro.techniques.fusable import fusability
from cerebro.techniques.fused import FusedRunner

CPU = torch.device("cpu")
# Batched matrix products (bmm) and stacked optimizer arithmetic round like their one-model
# counterparts here, but nothing in torch promises it: members are compared with float32
# rounding room. 3 hops of SGD or Adam stay under 1e-6 in these tests (measured: 3e-7 at most).
WEIGHTS_ATOL = 1e-5


def build(params: dict) -> cerebro.ModelSpec:
    layers = [torch.nn.Flatten(), torch.nn.Linear(64, 24), torch.nn.Tanh()]
    layers += [torch.nn.Dropout(params.get("dropout", 0.0)), torch.nn.Linear(24, 10)]
    model = torch.nn.Sequential(*layers)
    name = params["optimizer"]
    if name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(),
            lr=params["lr"],
            momentum=params.get("momentum", 0.9),
            nesterov=params.get("nesterov", False),
            weight_decay=params.get("wd", 0.0),
        )
    elif name == "adam":
        optimizer = torch.optim.Adam(
            model.parameters(), lr=params["lr"], betas=params.get("betas", (0.9, 0.999)),
            weight_decay=params.get("wd", 0.0),
        )  # fmt: skip
    else:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=params["lr"], weight_decay=params.get("wd", 0.01),
            eps=params.get("eps", 1e-8),
        )  # fmt: skip
    schedule = params.get("schedule")
    scheduler = None
    if schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    elif schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
    return cerebro.ModelSpec(
        model=model,
        optimizer=optimizer,
        loss=torch.nn.CrossEntropyLoss(),
        batch_size=32,
        metrics={"accuracy": cerebro.metrics.accuracy},
        lr_scheduler=scheduler,
        lr_scheduler_interval="batch" if schedule == "cosine" else "epoch",
    )


@pytest.fixture(scope="module")
def shards(digits_arrays) -> list[Shard]:
    x = torch.from_numpy(digits_arrays["x"][:600])
    y = torch.from_numpy(digits_arrays["y"][:600])
    return [Shard(x[i::3].contiguous(), y[i::3].contiguous()) for i in range(3)]


def _hand(model_id: int, params: dict) -> ModelInHand:
    spec = training.build_spec(build, params, init_seed=100 + model_id)
    rng = {"rng": torch.Generator().manual_seed(100 + model_id).get_state()}
    return ModelInHand(model_id, spec, rng, Counters(0, 0, 100 + model_id), params)


def _train(group: list[ModelInHand], shards: list[Shard], deterministic: bool, fused: bool):
    """Three hops (one epoch over three shards), fused as a group or each model alone."""
    stats = []
    for hop, shard in enumerate(shards):
        seeds = [
            MemberSeeds(1000 * hop + m.model_id, 7 * hop + m.model_id if deterministic else None)
            for m in group
        ]
        if fused:
            stats.append(FusedRunner().train(group, seeds, shard, CPU, hop == len(shards) - 1))
            continue
        for model, seed in zip(group, seeds):
            if seed.rng_seed is not None:
                torch.manual_seed(seed.rng_seed)
            else:
                torch.set_rng_state(model.rng["rng"])
            s = training.run_train_hop(model.spec, shard, seed.shuffle_seed, CPU, hop == 2)
            model.rng = {"rng": torch.get_rng_state()}
            stats.append([s])
    return stats


GROUPS = {
    "sgd momentum, step schedule": [
        {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "step"},
        {"optimizer": "sgd", "lr": 0.02, "momentum": 0.5, "wd": 1e-3, "schedule": "step"},
    ],
    "sgd nesterov, cosine per batch": [
        {"optimizer": "sgd", "lr": 0.05, "nesterov": True, "schedule": "cosine"},
        {"optimizer": "sgd", "lr": 0.1, "nesterov": True, "momentum": 0.8, "schedule": "cosine"},
    ],
    "adam with dropout": [
        {"optimizer": "adam", "lr": 0.01, "dropout": 0.2},
        {"optimizer": "adam", "lr": 0.003, "dropout": 0.5, "betas": (0.8, 0.99), "wd": 1e-4},
        {"optimizer": "adam", "lr": 0.02, "dropout": 0.0},
    ],
    "adamw, step schedule": [
        {"optimizer": "adamw", "lr": 0.01, "schedule": "step"},
        {"optimizer": "adamw", "lr": 0.005, "wd": 0.1, "eps": 1e-6, "schedule": "step"},
    ],
}


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("name", list(GROUPS))
def test_each_fused_member_ends_as_it_would_alone(shards, name, deterministic):
    params = GROUPS[name]
    fused = [_hand(i, p) for i, p in enumerate(params)]
    alone = [_hand(i, p) for i, p in enumerate(params)]
    fused_stats = _train(fused, shards, deterministic, fused=True)
    alone_stats = _train(alone, shards, deterministic, fused=False)
    for k, (f, a) in enumerate(zip(fused, alone)):
        for key, tensor in a.spec.model.state_dict().items():
            diff = (f.spec.model.state_dict()[key] - tensor).abs().max().item()
            assert diff <= WEIGHTS_ATOL, (name, k, key, diff)
        # The same dropout masks were drawn from the same stream: it ends in the same state.
        assert torch.equal(f.rng["rng"], a.rng["rng"])
        # Its LR schedule advanced as alone, and its optimizer state has torch's format.
        assert f.spec.optimizer.param_groups[0]["lr"] == a.spec.optimizer.param_groups[0]["lr"]
        fs, as_ = f.spec.optimizer.state_dict()["state"], a.spec.optimizer.state_dict()["state"]
        assert fs.keys() == as_.keys()
        for index in as_:
            assert fs[index].keys() == as_[index].keys()
            for field, value in as_[index].items():
                assert fs[index][field].dtype == value.dtype
                assert fs[index][field].shape == value.shape
        for hop in range(3):
            fused_loss = fused_stats[hop][k].sums["loss"]
            alone_loss = alone_stats[hop * len(params) + k][0].sums["loss"]
            assert fused_loss == pytest.approx(alone_loss, rel=1e-4)  # 4 significant digits


def test_a_members_result_does_not_depend_on_the_others(shards):
    """Bit for bit on CPU: deterministic mode and resumed runs rely on it, since how many
    models share a unit may differ between two runs of one experiment."""
    params = GROUPS["adam with dropout"]
    together = [_hand(i, p) for i, p in enumerate(params)]
    alone = [_hand(1, params[1])]
    _train(together, shards, True, fused=True)
    _train(alone, shards, True, fused=True)
    assert state_equal(together[1].spec.model.state_dict(), alone[0].spec.model.state_dict())
    assert state_equal(
        together[1].spec.optimizer.state_dict(), alone[0].spec.optimizer.state_dict()
    )


def test_a_member_goes_on_alone_and_back_in_a_group(shards):
    params = GROUPS["sgd momentum, step schedule"]
    mixed = [_hand(i, p) for i, p in enumerate(params)]
    reference = [_hand(i, p) for i, p in enumerate(params)]
    _train(mixed, shards, True, fused=True)  # epoch 0 fused
    _train(mixed, shards, True, fused=False)  # epoch 1 alone (plain runner)
    _train(mixed, shards, True, fused=True)  # epoch 2 fused again
    for _ in range(3):
        _train(reference, shards, True, fused=False)
    for m, r in zip(mixed, reference):
        for key, tensor in r.spec.model.state_dict().items():
            assert (m.spec.model.state_dict()[key] - tensor).abs().max() <= WEIGHTS_ATOL


def test_a_member_whose_loss_overflows_fails_alone_and_names_itself(shards):
    group = [_hand(0, {"optimizer": "sgd", "lr": 0.05}), _hand(1, {"optimizer": "sgd",
             "lr": float("inf")})]  # fmt: skip
    outcomes = FusedRunner().train(group, [MemberSeeds(1, 1), MemberSeeds(2, 2)], shards[0],
                                   CPU, False)  # fmt: skip
    assert isinstance(outcomes[0], training.HopStats)
    assert isinstance(outcomes[1], cerebro.ModelFailed)
    assert "model 1" in str(outcomes[1]) and "non-finite" in str(outcomes[1])


def test_evaluation_matches_the_plain_pass(shards):
    group = [_hand(i, p) for i, p in enumerate(GROUPS["adam with dropout"])]
    fused = FusedRunner().evaluate(group, shards[1], CPU)
    for model, outcome in zip(group, fused):
        alone = training.run_eval_hop(model.spec, shards[1], CPU)
        assert outcome.sums["loss"] == pytest.approx(alone.sums["loss"], rel=1e-6)
        assert outcome.sums["accuracy"] == alone.sums["accuracy"]


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x) * 2


def _spec_with(model=None, optimizer=None, scheduler=None, batch_size=32):
    model = model or torch.nn.Sequential(torch.nn.Linear(4, 3))
    optimizer = optimizer(model) if optimizer else torch.optim.SGD(model.parameters(), lr=0.1)
    return cerebro.ModelSpec(model=model, optimizer=optimizer, loss=torch.nn.MSELoss(),
                             batch_size=batch_size, lr_scheduler=scheduler and scheduler(
                                 optimizer))  # fmt: skip


@pytest.mark.parametrize(
    "spec, reason",
    [
        (lambda: _spec_with(torch.nn.Sequential(_Block())), "layer 0 (_Block) is not a layer"),
        (lambda: _spec_with(torch.nn.Linear(4, 3)), "is a Linear, not an nn.Sequential"),
        (
            lambda: _spec_with(optimizer=lambda m: torch.optim.RMSprop(m.parameters())),
            "optimizer RMSprop is not supported (SGD, Adam, AdamW)",
        ),
        (
            lambda: _spec_with(optimizer=lambda m: torch.optim.Adam(m.parameters(), amsgrad=True)),
            "Adam(amsgrad=True) is not supported",
        ),
        (
            lambda: _spec_with(scheduler=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o)),
            "LR scheduler ReduceLROnPlateau is not supported",
        ),
        (
            lambda: _spec_with(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))),
            "layer 0 (Conv2d) is not a layer",
        ),
    ],
)
def test_fusability_says_why_a_model_cannot_be_fused(spec, reason):
    facts = fusability(spec())
    assert facts.key is None
    assert reason in facts.reason


def test_a_replaced_forward_is_not_fused():
    spec = _spec_with()
    spec.model.forward = lambda x: x
    assert "forward was replaced" in fusability(spec).reason


def test_what_differs_per_member_keeps_one_key_and_shapes_do_not():
    base = fusability(_spec_with())
    other_lr = fusability(_spec_with(optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=3)))
    assert base.key is not None and base.key == other_lr.key
    assert fusability(_spec_with(torch.nn.Sequential(torch.nn.Linear(4, 5)))).key != base.key
    assert fusability(_spec_with(batch_size=64)).key != base.key
    adam = fusability(_spec_with(optimizer=lambda m: torch.optim.Adam(m.parameters())))
    assert adam.key != base.key


def test_a_group_of_different_models_is_refused(shards):
    a = _hand(0, {"optimizer": "sgd", "lr": 0.1})
    b = _hand(1, {"optimizer": "adam", "lr": 0.1})
    with pytest.raises(ValueError, match=r"models \[1\] cannot be fused with model 0"):
        FusedRunner().train([a, b], [MemberSeeds(0, 0)] * 2, shards[0], CPU, False)


@pytest.mark.gpu
def test_fused_members_match_alone_on_a_gpu(shards):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    device = torch.device("cuda")
    on_gpu = [Shard(s.x.to(device), s.y.to(device)) for s in shards]
    params = GROUPS["adamw, step schedule"]
    fused = [_hand(i, p) for i, p in enumerate(params)]
    alone = [_hand(i, p) for i, p in enumerate(params)]
    for m in fused + alone:
        m.spec.model.to(device)
    for hop, shard in enumerate(on_gpu):
        seeds = [MemberSeeds(hop * 10 + m.model_id, hop + m.model_id) for m in fused]
        FusedRunner().train(fused, seeds, shard, device, hop == 2)
        for m, s in zip(alone, seeds):
            torch.manual_seed(s.rng_seed)
            training.run_train_hop(m.spec, shard, s.shuffle_seed, device, hop == 2)
    for f, a in zip(fused, alone):
        for key, tensor in a.spec.model.state_dict().items():
            assert (f.spec.model.state_dict()[key] - tensor).abs().max().item() <= 1e-4
