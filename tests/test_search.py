from __future__ import annotations

import cerebro
from cerebro.search import Trial


def test_grid_enumerates_every_combination_in_key_order():
    grid = cerebro.GridSearch(
        {"a": cerebro.choice([1, 2]), "b": cerebro.choice(["x", "y"]), "c": 0}
    )
    assert grid.configurations() == [
        {"a": 1, "b": "x", "c": 0},
        {"a": 1, "b": "y", "c": 0},
        {"a": 2, "b": "x", "c": 0},
        {"a": 2, "b": "y", "c": 0},
    ]


def test_fixed_searches_propose_what_the_records_do_not_hold_yet():
    grid = cerebro.GridSearch({"a": cerebro.choice([1, 2, 3])})
    assert len(grid.propose([])) == 3
    done = [Trial(0, {"a": 1}, "completed")]
    assert grid.propose(done) == [{"a": 2}, {"a": 3}]
    assert not grid.is_finished(done) and grid.is_finished(done * 3)


def test_random_search_is_seeded_and_in_bounds():
    space = {
        "lr": cerebro.loguniform(1e-4, 1e-1),
        "bs": cerebro.choice([32, 64]),
        "w": cerebro.randint(16, 128),
        "d": cerebro.uniform(0, 0.5),
        "l2": cerebro.quniform(0.0, 0.01, 0.001),
    }
    a = cerebro.RandomSearch(space, num_models=50, seed=3).configurations()
    assert a == cerebro.RandomSearch(space, num_models=50, seed=3).configurations()
    assert a != cerebro.RandomSearch(space, num_models=50, seed=4).configurations()
    for config in a:
        for name, dim in space.items():
            assert dim.contains(config[name]), (name, config[name])
    assert len({c["lr"] for c in a}) == 50
    assert {c["bs"] for c in a} == {32, 64}


def test_each_dimension_has_its_own_stream():
    base = {"lr": cerebro.loguniform(1e-4, 1e-1), "w": cerebro.randint(1, 100)}
    wider = {**base, "d": cerebro.uniform(0, 1)}
    a = cerebro.RandomSearch(base, num_models=10).configurations()
    b = cerebro.RandomSearch(wider, num_models=10).configurations()
    assert [c["lr"] for c in a] == [c["lr"] for c in b]
    assert [c["w"] for c in a] == [c["w"] for c in b]
