"""Search spaces that used to be silently wrong (issue 12) are refused or made right when the
search is made: quniform ranges without a multiple of q, iterables taken as constants, and NumPy
values that the records (JSON) cannot store."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import cerebro
from cerebro.errors import ConfigError
from cerebro.search.base import SearchContext
from cerebro.search.pbt import PBT, perturb
from cerebro.search.tpe import TPESearch, _multiples
from cerebro.space import QUniform, choice, describe_space, normalize_space, quniform

CONTEXT = SearchContext("val_loss", "min", max_epochs=4, num_shards=2, num_workers=2)

# Every search takes its space in through normalize_space; each must refuse a bad entry when it
# is made, before any model is built.
SEARCHES = {
    "GridSearch": lambda space: cerebro.GridSearch(space),
    "RandomSearch": lambda space: cerebro.RandomSearch(space, num_models=4),
    "TPESearch": lambda space: TPESearch(space, num_models=4),
    "ASHA": lambda space: cerebro.ASHA(space, num_models=4, max_epochs=3),
    "Hyperband": lambda space: cerebro.Hyperband(space, num_models=4, max_epochs=3),
    "PBT": lambda space: PBT(space, population=4, perturb_every=1),
    "perturb": lambda space: perturb({"width": 16}, space, np.random.default_rng(0)),
}

# A value that is meant as the options of a choice, given as a constant. Factories, so that each
# case gets a fresh generator or iterator.
NOT_CONSTANTS = {
    "numpy array": lambda: np.array([16, 32]),
    "0-d numpy array": lambda: np.array(16),
    "torch tensor": lambda: torch.tensor([16, 32]),
    "range": lambda: range(16, 64, 16),
    "set": lambda: {16, 32},
    "frozenset": lambda: frozenset({16, 32}),
    "generator": lambda: (w for w in (16, 32)),
    "iterator": lambda: iter([16, 32]),
    "dict_keys": lambda: {16: "a", 32: "b"}.keys(),
    "dict_values": lambda: {"a": 16, "b": 32}.values(),
    "list": lambda: [16, 32],
    "tuple": lambda: (16, 32),
    "dict": lambda: {"small": 16},
}


@pytest.mark.parametrize("search", list(SEARCHES))
@pytest.mark.parametrize("kind", list(NOT_CONSTANTS))
def test_an_iterable_is_not_taken_as_a_constant(search, kind):
    space = {"lr": cerebro.loguniform(1e-3, 1e-1), "width": NOT_CONSTANTS[kind]()}
    with pytest.raises(ConfigError) as caught:
        SEARCHES[search](space)
    error = caught.value
    assert error.argument == "space['width']"
    assert str(error).startswith("space['width']="), str(error)
    assert "cerebro.choice(" in str(error)  # the hint says what to write instead


def test_a_set_is_refused_with_a_hint_to_sort_it():
    with pytest.raises(ConfigError, match=r"choice\(sorted") as caught:
        normalize_space({"act": {"relu", "gelu"}})
    assert caught.value.argument == "space['act']"


CONSTANTS = {
    "int": (3, 3),
    "float": (0.5, 0.5),
    "str": ("relu", "relu"),
    "bool": (True, True),
    "None": (None, None),
    "np.int64": (np.int64(3), 3),
    "np.int32": (np.int32(-2), -2),
    "np.float32": (np.float32(0.5), 0.5),
    "np.float64": (np.float64(0.25), 0.25),
    "np.bool_": (np.bool_(True), True),
    "np.str_": (np.str_("gelu"), "gelu"),
}


@pytest.mark.parametrize("kind", list(CONSTANTS))
def test_a_constant_stays_a_constant_as_a_plain_python_value(kind):
    given_value, expected = CONSTANTS[kind]
    dim = normalize_space({"c": given_value})["c"]
    assert dim.values == (expected,)
    (value,) = dim.values
    assert type(value) is type(expected)
    assert dim.contains(given_value) and dim.contains(expected)


def _configurations(name: str, space: dict) -> list[dict]:
    search = SEARCHES[name](space)
    if name == "TPESearch":
        search.attach(CONTEXT)
        return search.propose([])
    return search.configurations()


@pytest.mark.parametrize("search", [s for s in SEARCHES if s != "perturb"])
def test_numpy_values_come_out_of_every_search_as_json(search):
    space = {
        "lr": 0.01 if search == "GridSearch" else cerebro.loguniform(1e-3, 1e-1),
        "width": np.int64(64),
        "scale": np.float32(0.5),
        "flag": np.bool_(False),
        "heads": choice([np.int64(2), np.int64(4)]),
        "act": choice([np.str_("relu"), "gelu"]),
    }
    configs = _configurations(search, space)
    assert configs
    for config in configs:
        for name, value in config.items():
            assert type(value) in (int, float, str, bool), (name, value, type(value))
        # Strict JSON, as the records store it: no default= to fall back on.
        assert json.loads(json.dumps(config, allow_nan=False)) == config
        assert config["width"] == 64 and config["scale"] == 0.5 and config["flag"] is False
    described = describe_space(normalize_space(space))
    assert json.loads(json.dumps(described, allow_nan=False)) == described


def test_choice_values_are_plain_python_values():
    dim = choice([np.int64(2), np.float32(0.5), np.bool_(True), np.str_("a"), (np.int64(1), 2)])
    assert dim.values == (2, 0.5, True, "a", (1, 2))
    assert [type(v) for v in dim.values] == [int, float, bool, str, tuple]
    assert type(dim.values[-1][0]) is int
    rng = np.random.default_rng(0)
    for _ in range(20):
        json.dumps(dim.sample(rng), allow_nan=False)


@pytest.mark.parametrize(
    "option",
    [np.array([1, 2]), np.array(3), torch.tensor([1.0]), [np.array([1, 2])], {"w": np.ones(2)}],
    ids=["array", "0-d array", "tensor", "list of arrays", "dict of arrays"],
)
def test_choice_refuses_arrays_among_its_options(option):
    with pytest.raises(ConfigError, match=r"\.tolist\(\)") as caught:
        choice([option, 1])
    assert caught.value.argument == "choice(values)"


# -- quniform -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "low, high, q",
    [(0.05, 0.1, 0.3), (0.1, 0.2, 0.5), (0.31, 0.39, 0.1), (-0.9, -0.6, 1.0), (1, 1, 0.3)],
)
def test_quniform_refuses_a_range_without_a_multiple_of_q(low, high, q):
    with pytest.raises(ConfigError) as caught:
        quniform(low, high, q)
    error = caught.value
    assert error.argument == "quniform" and error.value == (low, high, q)
    assert "a range [low, high] holding at least one multiple of q" in str(error)


@pytest.mark.parametrize(
    "low, high, q, argument",
    [
        (0, 1, 0, "quniform(q)"),
        (0, 1, -0.1, "quniform(q)"),
        (0, 1, math.nan, "quniform(q)"),
        (0, 1, math.inf, "quniform(q)"),
        (0, 1, 1e-12, "quniform(q)"),  # finer than the 12-decimal rounding keeps
        (0, 1e9, 1e-6, "quniform(q)"),  # more multiples than floats tell apart
        (0, math.inf, 0.1, "quniform(high)"),
        (1, 0, 0.1, "quniform(high)"),
    ],
)
def test_quniform_refuses_a_q_it_cannot_honour(low, high, q, argument):
    with pytest.raises(ConfigError) as caught:
        quniform(low, high, q)
    assert caught.value.argument == argument


def test_quniform_keeps_every_value_a_multiple_of_q_near_a_bound_that_is_not_one():
    # The old sampler clipped round(x/q)*q into the range, giving 0.05 here, which contains()
    # rejected; now the nearest multiple inside the range is taken.
    dim = quniform(0.05, 1.0, 0.1)
    values = {dim.sample(np.random.default_rng(seed)) for seed in range(500)}
    assert values == {round(k * 0.1, 12) for k in range(1, 11)}
    assert all(dim.contains(v) for v in values)
    assert not dim.contains(0.05) and not dim.contains(0.0)
    configs = cerebro.RandomSearch({"l2": dim}, num_models=200).configurations()
    assert all(dim.contains(c["l2"]) for c in configs)
    assert quniform(0.05, 0.35, 0.3).sample(np.random.default_rng(0)) == 0.3  # one multiple


def test_quniform_small_steps_keep_working():
    dim = quniform(0.0, 0.01, 0.001)
    grid = [round(k * 0.001, 12) for k in range(11)]
    for k, value in enumerate(grid):
        assert dim.contains(value) and dim.contains(k * 0.001), k  # rounded or as computed
    assert dim.contains(0.003) and dim.contains(3 * 0.001) and dim.contains(0)
    assert not dim.contains(0.0035) and not dim.contains(0.011) and not dim.contains(-0.001)
    assert not dim.contains(True) and not dim.contains("0.003") and not dim.contains(math.nan)
    values = {dim.sample(np.random.default_rng(seed)) for seed in range(1000)}
    assert values == set(grid)
    assert quniform(0.1 * 3, 1.0, 0.1).contains(0.3)  # a bound with float noise in it


def test_quniform_samples_as_before_when_the_bounds_are_multiples():
    # Seeded experiments must resume with the values they started with.
    for low, high, q in [(0.0, 0.01, 0.001), (0.0, 1.0, 0.05), (-2.0, 3.0, 0.5), (10, 500, 10)]:
        dim = quniform(low, high, q)
        for seed in range(50):
            x = np.random.default_rng(seed).uniform(low, high)
            old = float(round(min(max(round(x / q) * q, low), high), 12))
            assert dim.sample(np.random.default_rng(seed)) == old


def test_tpe_search_proposes_the_same_multiples():
    dim = quniform(0.05, 1.0, 0.1)
    first, last = dim.multipliers()
    assert _multiples(dim) == (first, last + 1) == (1, 11)
    search = TPESearch({"l2": dim}, num_models=8)
    search.attach(CONTEXT)
    assert all(dim.contains(c["l2"]) for c in search.propose([]))


finite = {"allow_nan": False, "allow_infinity": False}


@st.composite
def quniform_args(draw) -> tuple[float, float, float]:
    q = draw(
        st.one_of(
            st.sampled_from([1e-9, 1e-6, 0.001, 0.01, 0.05, 0.1, 0.25, 0.3, 1.0, 7.0, 100.0]),
            st.floats(min_value=1e-9, max_value=1e3, **finite),
        )
    )
    low = draw(
        st.one_of(
            st.floats(min_value=-1e6, max_value=1e6, **finite),
            st.integers(-1000, 1000).map(lambda k: k * q),  # a multiple, with float noise
        )
    )
    width = draw(st.one_of(st.floats(min_value=0, max_value=1e6, **finite), st.just(0.0)))
    return low, low + width, q


def _accepted(low: float, high: float, q: float) -> QUniform | None:
    try:
        return quniform(low, high, q)
    except ConfigError as error:
        assert error.argument in ("quniform", "quniform(q)"), error
        return None


@settings(max_examples=300, deadline=None)
@given(args=quniform_args(), seed=st.integers(0, 2**32 - 1))
def test_every_quniform_sample_is_contained(args, seed):
    low, high, q = args
    dim = _accepted(low, high, q)
    assume(dim is not None)
    first, last = dim.multipliers()
    assert first <= last
    rng = np.random.default_rng(seed)
    for _ in range(20):
        value = dim.sample(rng)
        assert type(value) is float and dim.contains(value), (dim, value)
        k = round(value / q)
        assert first <= k <= last and value == dim.value(k)
        slack = 2e-3 * q  # at most float noise past a bound
        assert low - slack <= value <= high + slack
    # contains() accepts exactly the multiples that sample() can give, and TPE proposes them too.
    for k in {first, last, (first + last) // 2}:
        assert dim.contains(dim.value(k)) and dim.contains(k * q)
        assert not dim.contains(dim.value(k) + q / 2)
    assert not dim.contains(dim.value(first - 1)) and not dim.contains(dim.value(last + 1))
    assert _multiples(dim) == (first, last + 1)


@settings(max_examples=300, deadline=None)
@given(args=quniform_args())
def test_quniform_refuses_exactly_the_ranges_without_a_multiple(args):
    low, high, q = args
    assume(max(abs(low), abs(high)) / q <= 1e12)
    # Decided in units of q, with a margin (0.01 q) past the float noise quniform tolerates: a
    # multiple clearly inside the range makes it accepted, a range clearly between two neighbouring
    # multiples is refused.
    a, b, margin = low / q, high / q, 0.01
    inside = math.ceil(a + margin) <= math.floor(b - margin)
    between = math.floor(a) == math.floor(b) and a - math.floor(a) > margin < math.ceil(b) - b
    dim = _accepted(low, high, q)
    if inside:
        assert dim is not None
    if between:
        assert dim is None
