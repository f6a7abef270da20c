"""PBT decisions and the perturb helper (pure logic, no training)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cerebro.errors import ConfigError
from cerebro.search.base import COMPLETED, FAILED, PAUSED, RUNNING, SearchContext, Trial
from cerebro.search.pbt import PBT, perturb
from cerebro.search.random import RandomSearch
from cerebro.space import choice, loguniform, normalize_space, quniform, randint, uniform

SPACE = {
    "lr": loguniform(1e-4, 1e-1),
    "momentum": uniform(0.5, 0.99),
    "wd": quniform(0.0, 0.01, 0.001),
    "warmup": randint(0, 10),
    "width": choice([16, 32, 64, 128]),
    "layers": 2,
}


def context(mode: str = "min", epochs: int = 10) -> SearchContext:
    return SearchContext("loss", mode, epochs, 4, 2)


def population(values, epochs=2, **kwargs):
    """Trials 0..n-1 whose latest loss is ``values[i]`` after ``epochs`` epochs."""
    configs = RandomSearch(SPACE, len(values), seed=0).configurations()
    return [
        Trial(
            i,
            configs[i],
            RUNNING,
            [{"epoch": e, "loss": 9.0} for e in range(epochs - 1)]
            + [{"epoch": epochs - 1, "loss": v}],
            **kwargs,
        )
        for i, v in enumerate(values)
    ]


def make_pbt(**kwargs) -> PBT:
    args = {"space": SPACE, "population": 8, "perturb_every": 2, "mutable": ["lr", "momentum"]}
    pbt = PBT(**{**args, **kwargs})
    pbt.attach(context())
    return pbt


def test_proposes_the_whole_population_at_once():
    pbt = make_pbt(seed=3)
    configs = RandomSearch(SPACE, 8, seed=3).configurations()
    assert pbt.propose([]) == configs
    trials = [Trial(i, c, RUNNING) for i, c in enumerate(configs[:5])]
    assert pbt.propose(trials) == configs[5:]
    assert not pbt.is_finished(trials)
    person = Trial(9, {"lr": 0.1}, RUNNING, origin="add")
    assert pbt.is_finished([*trials, *(Trial(i, c, RUNNING) for i, c in enumerate(configs[5:]))])
    assert not pbt.is_finished([*trials, person])


def test_bottom_quantile_exploits_the_top_and_the_rest_continue():
    # 8 members, quantile 0.25: floor(2) = 2 in the top (0.1, 0.2: models 3, 6) and 2 in the
    # bottom (0.8, 0.9: models 1, 5).
    values = [0.5, 0.8, 0.4, 0.1, 0.6, 0.9, 0.2, 0.3]
    trials = population(values)
    pbt = make_pbt()
    actions = {t.model_id: pbt.decide(t, trials) for t in trials}
    assert {i for i, d in actions.items() if d.action == "exploit"} == {1, 5}
    assert all(d.action == "continue" for i, d in actions.items() if i not in (1, 5))
    assert actions[3].reason == "epoch 2: rank 1 of 8, bottom 2 exploit"
    for i in (1, 5):
        d = actions[i]
        assert d.source in (3, 6)
        source = trials[d.source]
        # Non-mutable parameters come from the source; mutable ones stay in the space.
        for name in ("wd", "warmup", "width", "layers"):
            assert d.params[name] == source.params[name]
        assert SPACE["lr"].contains(d.params["lr"])
        assert SPACE["momentum"].contains(d.params["momentum"])
        assert d.reason.startswith(f"epoch 2: loss {values[i]:.4g}, rank ")
        assert f"copying model {d.source}" in d.reason
        # Deterministic: the same records give the same decision.
        assert pbt.decide(trials[i], trials) == d
        assert make_pbt().decide(trials[i], list(reversed(trials))) == d
    # Every top model is picked for some seed.
    sources = {make_pbt(seed=s).decide(trials[5], trials).source for s in range(20)}
    assert sources == {3, 6}


def test_mode_max_flips_the_ranking():
    trials = population([0.5, 0.8, 0.4, 0.1])  # n=4: max(1, floor(1)) = 1 each side
    pbt = PBT(SPACE, population=4, perturb_every=1, quantile=0.25)
    pbt.attach(context("max"))
    decisions = [pbt.decide(t, trials) for t in trials]
    assert [d.action for d in decisions] == ["continue", "continue", "continue", "exploit"]
    assert decisions[3].source == 1


def test_no_decision_off_the_perturbation_epochs():
    pbt = make_pbt(perturb_every=3)
    for epochs in (1, 2, 4, 5):
        trials = population([0.5, 0.8, 0.4, 0.1], epochs=epochs)
        assert all(pbt.decide(t, trials).action == "continue" for t in trials)
    trials = population([0.5, 0.8, 0.4, 0.1], epochs=6)
    assert pbt.decide(trials[1], trials).action == "exploit"


def test_who_is_ranked():
    pbt = make_pbt(quantile=0.5)
    trials = population([0.5, 0.8, 0.4, 0.1])
    # A failed member, a member without a finite value and a person's model are not ranked.
    trials[0] = Trial(0, trials[0].params, FAILED, trials[0].history)
    trials[2] = Trial(2, trials[2].params, RUNNING, [{"epoch": 0, "loss": math.nan}])
    person = Trial(7, {"lr": 0.1}, RUNNING, [{"epoch": 0, "loss": 0.01}], origin="clone")
    trials = [*trials, person]
    # Ranked: 3 (0.1), 1 (0.8) -> n=2, k=1: 1 copies 3.
    d = pbt.decide(trials[1], trials)
    assert d.action == "exploit" and d.source == 3 and "rank 2 of 2" in d.reason
    assert pbt.decide(person, trials).action == "continue"
    # A member whose own value is not finite ranks last (n counts it): it copies the top.
    nan = Trial(2, trials[2].params, RUNNING, [{"epoch": e, "loss": math.nan} for e in range(2)])
    d = pbt.decide(nan, [*trials[:2], nan, *trials[3:]])
    assert d.action == "exploit" and d.source == 3 and "loss not finite" in d.reason
    # Paused and completed members are ranked and may be copied.
    done = [
        Trial(t.model_id, t.params, COMPLETED if t.model_id == 3 else PAUSED, t.history)
        for t in population([0.5, 0.8, 0.4, 0.1])
    ]
    # (n=4, k=2: model 1 copies 3 or 2.)
    assert pbt.decide(done[1], done).source in (3, 2)
    # Alone (n < 2): nothing to copy.
    alone = population([0.5])
    assert pbt.decide(alone[0], alone).action == "continue"


def test_quantile_rounding():
    # floor(quantile * n), at least 1: n=3 -> 1; n=9 at 0.25 -> 2; n=10 at 0.5 -> 5.
    for values, quantile, bottom in (
        ([0.1, 0.2, 0.3], 0.25, 1),
        ([0.1 * i for i in range(1, 10)], 0.25, 2),
        ([0.1 * i for i in range(1, 11)], 0.5, 5),
    ):
        pbt = make_pbt(quantile=quantile)
        trials = population(values)
        actions = [pbt.decide(t, trials).action for t in trials]
        n = len(values)
        assert actions == ["continue"] * (n - bottom) + ["exploit"] * bottom
        sources = {pbt.decide(t, trials).source for t in trials[n - bottom :]}
        assert sources <= set(range(bottom))


def test_perturb_stays_in_the_space_and_copies_the_rest():
    configs = RandomSearch(SPACE, 30, seed=1).configurations()
    for seed, params in enumerate(configs):
        params = {**params, "extra": "kept"}
        for probability in (0.0, 0.25, 1.0):
            rng = np.random.default_rng(seed)
            new = perturb(params, SPACE, rng, resample_probability=probability)
            assert new["extra"] == "kept" and new["layers"] == 2
            for name, dim in normalize_space(SPACE).items():
                assert dim.contains(new[name]), (name, new[name])
            again = perturb(params, SPACE, np.random.default_rng(seed), None, probability)
            assert again == new  # same generator state, same result
    # Only the mutable names change.
    params = configs[0]
    new = perturb(params, SPACE, np.random.default_rng(0), mutable=["lr"], resample_probability=1)
    assert {k for k in params if new[k] != params[k]} <= {"lr"}


def test_perturb_steps():
    space = {
        "u": uniform(0.0, 1.0),
        "q": quniform(0.0, 1.0, 0.05),
        "i": randint(1, 10),
        "c": choice(["a", "b", "c"]),
    }
    seen = {name: set() for name in space}
    for seed in range(40):
        new = perturb(
            {"u": 0.5, "q": 0.5, "i": 5, "c": "b"},
            space,
            np.random.default_rng(seed),
            resample_probability=0.0,
        )
        for name in space:
            seen[name].add(new[name])
    assert {round(v, 12) for v in seen["u"]} == {0.4, 0.6}
    assert seen["q"] == {0.4, 0.6}
    assert seen["i"] == {4, 6}
    assert seen["c"] == {"a", "c"}
    # Clipped at the bounds; a small integer that rounds back moves by one.
    edge = {"u": 1.0, "q": 1.0, "i": 1, "c": "a"}
    for seed in range(20):
        new = perturb(edge, space, np.random.default_rng(seed), resample_probability=0.0)
        assert new["u"] in (0.8, 1.0) and new["q"] in (0.8, 1.0)
        assert new["i"] in (1, 2) and new["c"] in ("a", "b")
    # A value of the wrong type (a person's model) is resampled.
    new = perturb({"c": "zzz", "u": "x"}, space, np.random.default_rng(0), ["c", "u"], 0.0)
    assert space["c"].contains(new["c"]) and space["u"].contains(new["u"])


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"population": 1}, "population"),
        ({"population": 4.0}, "population"),
        ({"population": True}, "population"),
        ({"perturb_every": 0}, "perturb_every"),
        ({"perturb_every": 1.5}, "perturb_every"),
        ({"quantile": 0.0}, "quantile"),
        ({"quantile": 0.6}, "quantile"),
        ({"quantile": "0.25"}, "quantile"),
        ({"quantile": math.nan}, "quantile"),
        ({"seed": "1"}, "seed"),
        ({"mutable": ["lr", "nope"]}, "mutable"),
        ({"mutable": "lr"}, "mutable"),
        ({"resample_probability": -0.1}, "resample_probability"),
        ({"resample_probability": 1.5}, "resample_probability"),
        ({"space": {}}, "space"),
    ],
)
def test_bad_input(kwargs, argument):
    args = {"space": SPACE, "population": 4, "perturb_every": 2, **kwargs}
    with pytest.raises(ConfigError) as info:
        PBT(**args)
    assert isinstance(info.value, ValueError)
    assert info.value.argument == argument


def test_attach_needs_epochs_beyond_perturb_every_and_fingerprint_is_stable():
    pbt = PBT(SPACE, population=4, perturb_every=5)
    with pytest.raises(ConfigError) as info:
        pbt.attach(context(epochs=5))
    assert info.value.argument == "perturb_every"
    pbt.attach(context(epochs=6))
    assert pbt.fingerprint() == PBT(SPACE, population=4, perturb_every=5).fingerprint()
    assert pbt.fingerprint() != PBT(SPACE, population=4, perturb_every=4).fingerprint()
    assert pbt.fingerprint() != PBT({**SPACE, "layers": 3}, 4, 5).fingerprint()
    assert "PBT(population=4, perturb_every=5" in repr(pbt)
    # The default mutable names: every dimension that is not a single value.
    assert pbt.mutable == ("lr", "momentum", "wd", "warmup", "width")
    with pytest.raises(ConfigError):
        perturb({}, SPACE, np.random.default_rng(0), mutable=["nope"])
