"""The median stopping rule, on hand-computed examples (values exact in binary)."""

from __future__ import annotations

import math

import pytest

from cerebro.errors import ConfigError
from cerebro.search.base import COMPLETED, PRUNED, RUNNING, SearchContext, Trial
from cerebro.search.early_stopping import MedianStopping


def trial(model_id, values, status=RUNNING, origin="search"):
    return Trial(model_id, {}, status, [{"epoch": e, "m": v} for e, v in enumerate(values)], origin)


def rule(mode, **kwargs) -> MedianStopping:
    r = MedianStopping(**kwargs)
    r.attach(SearchContext("m", mode, 10, 4, 2))
    return r


def test_mode_min():
    # Running averages at t=2: A (0.5 + 0.25) / 2 = 0.375, B (0.75 + 0.25) / 2 = 0.5,
    # C (1.0 + 0.5) / 2 = 0.75 (its third epoch is not counted); D has 1 epoch: left out.
    # Median of (0.375, 0.5, 0.75) = 0.5.
    others = [
        trial(0, [0.5, 0.25], COMPLETED),
        trial(1, [0.75, 0.25], PRUNED),
        trial(2, [1.0, 0.5, 0.25]),
        trial(3, [0.125]),
    ]
    r = rule("min")
    x = trial(4, [0.75, 0.625])  # best 0.625 > 0.5: worse than the median
    reason = r.should_stop(x, [*others, x])
    assert reason == (
        "median stopping: best m 0.625 after 2 epochs is worse than the median 0.5 of the "
        "running averages of 3 other models at epoch 2"
    )
    y = trial(4, [0.75, 0.5])  # best 0.5 == median: not strictly worse
    assert r.should_stop(y, [*others, y]) is None
    z = trial(4, [0.25, 1.0])  # best 0.25
    assert r.should_stop(z, [*others, z]) is None
    # Within the grace epochs, or with fewer than min_trials others: never.
    assert r.should_stop(trial(4, [5.0]), [*others]) is None
    assert rule("min", min_trials=4).should_stop(x, [*others, x]) is None
    assert rule("min", grace_epochs=2).should_stop(x, [*others, x]) is None
    # grace_epochs=0: after 1 epoch, the others' averages are 0.5, 0.75, 1.0, 0.125 -> median
    # (0.5 + 0.75) / 2 = 0.625; 0.75 is worse.
    assert rule("min", grace_epochs=0).should_stop(trial(4, [0.75]), others) is not None
    assert rule("min", grace_epochs=0).should_stop(trial(4, [0.625]), others) is None


def test_mode_max():
    # Averages at t=2: A 0.625, B 0.75, C 0.25, D (first two epochs) 0.25.
    # Median of (0.25, 0.25, 0.625, 0.75) = (0.25 + 0.625) / 2 = 0.4375.
    others = [
        trial(0, [0.5, 0.75]),
        trial(1, [0.75, 0.75]),
        trial(2, [0.25, 0.25]),
        trial(3, [0.125, 0.375, 1.0], origin="add"),  # every other model counts
    ]
    r = rule("max")
    x = trial(4, [0.25, 0.375])  # best 0.375 < 0.4375
    assert "median 0.4375 of the running averages of 4 other" in r.should_stop(x, [*others, x])
    y = trial(4, [0.4375, 0.25])  # best (the first epoch) == median
    assert r.should_stop(y, [*others, y]) is None


def test_non_finite_values_are_left_out():
    r = rule("min")
    others = [trial(0, [0.5, math.nan]), trial(1, [math.nan, math.nan]), trial(2, [0.25, 0.75])]
    # 0 averages its finite epoch (0.5), 1 has none and does not count: 2 others < 3.
    x = trial(3, [1.0, 1.0])
    assert r.should_stop(x, [*others, x]) is None
    more = [*others, trial(4, [0.5, 0.5])]  # averages 0.5, 0.5, 0.5 -> median 0.5
    assert r.should_stop(x, [*more, x]) is not None
    assert r.should_stop(trial(3, [math.nan, math.nan]), more) is None


def test_needs_attach_and_bad_input():
    with pytest.raises(RuntimeError):
        MedianStopping().should_stop(trial(0, [1.0, 1.0]), [])
    for kwargs, argument in (
        ({"grace_epochs": -1}, "grace_epochs"),
        ({"grace_epochs": 1.5}, "grace_epochs"),
        ({"grace_epochs": True}, "grace_epochs"),
        ({"min_trials": 0}, "min_trials"),
        ({"min_trials": "3"}, "min_trials"),
    ):
        with pytest.raises(ConfigError) as info:
            MedianStopping(**kwargs)
        assert isinstance(info.value, ValueError) and info.value.argument == argument
    assert repr(MedianStopping()) == "MedianStopping(grace_epochs=1, min_trials=3)"
