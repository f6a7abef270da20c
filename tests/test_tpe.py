from __future__ import annotations

import math
import random

import numpy as np
import optuna
import pytest

import cerebro
from cerebro.errors import ConfigError
from cerebro.search.base import SearchContext, Trial
from cerebro.search.random import RandomSearch
from cerebro.search.tpe import TPESearch

SPACE = {
    "lr": cerebro.loguniform(1e-5, 1e-1),
    "dropout": cerebro.uniform(0.0, 0.8),
    "width": cerebro.randint(8, 256),
    "batch_size": cerebro.choice([16, 32, 64, 128]),
}
BATCH_PENALTY = {16: 0.4, 32: 0.0, 64: 0.2, 128: 0.8}
CONTEXT = SearchContext("val_loss", "min", max_epochs=1, num_shards=4, num_workers=2)


def synthetic_loss(params: dict, rng: np.random.Generator) -> float:
    """A bowl with its minimum at lr=1e-3, dropout=0.3, width=96, batch_size=32, plus noise."""
    return (
        ((math.log10(params["lr"]) + 3.0) / 0.6) ** 2
        + ((params["dropout"] - 0.3) / 0.15) ** 2
        + ((params["width"] - 96) / 48) ** 2
        + BATCH_PENALTY[params["batch_size"]]
        + 0.05 * rng.standard_normal()
    )


def simulate(search, seed: int, parallelism: int = 4) -> list[Trial]:
    """Play the driver: start what the search proposes (at most ``parallelism`` in flight),
    finish the oldest running model each step, until the search is finished and none runs."""
    search.attach(CONTEXT)
    rng = np.random.default_rng(seed)
    trials: list[Trial] = []
    while True:
        running = [t for t in trials if t.status == "running"]
        for params in search.propose(trials)[: parallelism - len(running)]:
            trials.append(Trial(len(trials), params, "running"))
        running = [t for t in trials if t.status == "running"]
        if not running:
            assert search.is_finished(trials)
            return trials
        oldest = running[0]
        loss = synthetic_loss(oldest.params, rng)
        trials[oldest.model_id] = Trial(
            oldest.model_id, oldest.params, "completed", [{"epoch": 0, "val_loss": loss}]
        )


def best(trials: list[Trial]) -> float:
    return min(t.value("val_loss") for t in trials)


def test_tpe_beats_random_search_on_a_synthetic_objective():
    seeds, num_models = range(20), 40
    tpe = [best(simulate(TPESearch(SPACE, num_models, seed=s), s)) for s in seeds]
    rnd = [best(simulate(RandomSearch(SPACE, num_models, seed=s), s)) for s in seeds]
    wins = sum(a < b for a, b in zip(tpe, rnd))
    print(
        f"\nbest val_loss over {len(seeds)} seeds, {num_models} models each, 4 in flight: "
        f"TPE mean {np.mean(tpe):.3f} (median {np.median(tpe):.3f}), "
        f"random mean {np.mean(rnd):.3f} (median {np.median(rnd):.3f}), "
        f"TPE better on {wins}/{len(seeds)} seeds"
    )
    assert np.mean(tpe) < 0.7 * np.mean(rnd)
    assert wins >= 14


def partial_history() -> list[Trial]:
    """Some finished, running, paused, pruned, failed and hand-added trials."""
    trials = simulate(TPESearch(SPACE, 12, seed=5), seed=5)
    params = [t.params for t in trials]
    return [
        *trials[:8],
        Trial(8, params[8], "running"),
        Trial(9, params[9], "paused", [{"epoch": 0, "val_loss": 2.0}]),
        Trial(10, params[10], "pruned", [{"epoch": 0, "val_loss": 3.0}]),
        Trial(11, params[11], "failed"),
        Trial(12, dict(params[0], lr=2e-3), "completed", [{"epoch": 0, "val_loss": 0.1}], "add"),
    ]


def test_proposals_are_a_pure_function_of_the_trials():
    trials = partial_history()
    a = TPESearch(SPACE, 30, seed=7)
    b = TPESearch(SPACE, 30, seed=7)
    a.attach(CONTEXT)
    b.attach(CONTEXT)
    first = a.propose(trials)
    assert len(first) == 4 - 2  # one running and one paused of its own
    assert first == a.propose(trials) == b.propose(trials)
    shuffled = list(trials)
    random.Random(0).shuffle(shuffled)
    assert b.propose(shuffled) == first
    assert first[0] != first[1]  # the second one asked knows the first is running
    other = TPESearch(SPACE, 30, seed=8)
    other.attach(CONTEXT)
    assert other.propose(trials) != first


def test_keeps_parallelism_models_in_flight_and_stops_at_num_models():
    search = TPESearch(SPACE, 10, seed=0)
    search.attach(CONTEXT)
    assert search.effective_parallelism() == 4  # max(num_shards=4, num_workers=2)
    first = search.propose([])
    assert len(first) == 4
    running = [Trial(i, p, "running") for i, p in enumerate(first)]
    assert search.propose(running) == []
    one_done = [Trial(0, first[0], "completed", [{"epoch": 0, "val_loss": 1.0}]), *running[1:]]
    assert len(search.propose(one_done)) == 1
    paused = [Trial(i, p, "paused") for i, p in enumerate(first[:2])]
    assert len(search.propose(paused)) == 2

    done = [Trial(i, first[0], "completed", [{"epoch": 0, "val_loss": 1.0}]) for i in range(8)]
    assert len(search.propose(done)) == 2  # 10 - 8, though 4 could run
    assert not search.is_finished(done)
    ten = done + [Trial(8 + i, first[0], "running") for i in range(2)]
    assert search.propose(ten) == [] and search.is_finished(ten)

    more_workers = TPESearch(SPACE, 20)
    more_workers.attach(SearchContext("val_loss", "min", 1, num_shards=2, num_workers=6))
    assert len(more_workers.propose([])) == 6
    explicit = TPESearch(SPACE, 20, parallelism=7)
    explicit.attach(CONTEXT)
    assert len(explicit.propose([])) == 7
    below_shards = TPESearch(SPACE, 20, parallelism=2)  # raised to num_shards
    below_shards.attach(CONTEXT)
    assert len(below_shards.propose([])) == 4
    few = TPESearch(SPACE, 3)
    few.attach(CONTEXT)
    assert len(few.propose([])) == 3
    assert len(simulate(TPESearch(SPACE, 9, seed=1), seed=1)) == 9


def told_trials(monkeypatch, search: TPESearch, trials: list[Trial]) -> list:
    """The Optuna trials ``search.propose(trials)`` tells its study."""
    told: list = []
    add_trials = optuna.study.Study.add_trials

    def spy(study, frozen):
        frozen = list(frozen)
        told.extend(frozen)
        add_trials(study, frozen)

    monkeypatch.setattr(optuna.study.Study, "add_trials", spy)
    search.propose(trials)
    return told


def test_what_is_told_to_the_study(monkeypatch):
    State = optuna.trial.TrialState
    p = {"lr": 1e-3, "dropout": 0.3, "width": 96, "batch_size": 32}
    trials = [
        Trial(0, p, "completed", [{"epoch": 0, "val_loss": 2.0}, {"epoch": 1, "val_loss": 1.0}]),
        Trial(1, p, "completed", [{"epoch": 0, "val_loss": float("nan")}]),
        Trial(2, p, "pruned", [{"epoch": 0, "val_loss": 3.0}, {"epoch": 1, "val_loss": 2.5}]),
        Trial(3, p, "stopped", [{"epoch": 0, "val_loss": 4.0}]),
        Trial(4, p, "pruned"),  # no history: nothing to tell
        Trial(5, p, "failed"),
        Trial(6, p, "running"),
        Trial(7, p, "paused", [{"epoch": 0, "val_loss": 1.5}]),
        Trial(8, p, "pruned", [{"epoch": 0, "val_loss": float("inf")}]),
    ]
    search = TPESearch(SPACE, 20)
    search.attach(CONTEXT)
    told = told_trials(monkeypatch, search, trials)
    assert [t.state for t in told] == [
        State.COMPLETE,
        State.FAIL,
        State.PRUNED,
        State.PRUNED,
        State.FAIL,
        State.RUNNING,
        State.RUNNING,
        State.FAIL,
    ]
    assert told[0].value == 1.0 and told[0].params == p
    assert told[2].intermediate_values == {0: 3.0, 1: 2.5}

    maximize = TPESearch(SPACE, 20)
    maximize.attach(SearchContext("accuracy", "max", 1, 4, 2))
    accuracy = Trial(0, p, "completed", [{"epoch": 0, "accuracy": 0.9}])
    assert told_trials(monkeypatch, maximize, [accuracy])[0].value == 0.9


def test_added_models_are_used_but_do_not_count(monkeypatch):
    search = TPESearch(SPACE, 5)
    search.attach(CONTEXT)
    inside = {"lr": 1e-3, "dropout": 0.3, "width": 96, "batch_size": 32}
    outside = [
        dict(inside, lr=0.5),  # above the loguniform's high
        dict(inside, batch_size=48),  # not a choice
        dict(inside, width=96.5),  # not an integer
        {"lr": 1e-3},  # parameters missing
        dict(inside, width="wide"),
    ]
    result = [{"epoch": 0, "val_loss": 0.5}]
    added = [Trial(0, inside, "completed", result, origin="add")]
    added += [Trial(i + 1, p, "completed", result, origin="add") for i, p in enumerate(outside)]
    added.append(Trial(6, inside, "running", origin="clone"))
    told = told_trials(monkeypatch, search, added)
    assert [t.params for t in told] == [inside, inside]
    assert len(search.propose(added)) == 4  # added models neither fill slots nor the budget
    assert not search.is_finished(added)
    mine = [Trial(7 + i, inside, "completed", result) for i in range(5)]
    assert search.is_finished(added + mine) and search.propose(added + mine) == []


def test_bad_arguments_raise_config_errors_naming_them():
    cases = [
        ({"num_models": 0}, "num_models"),
        ({"num_models": 2.5}, "num_models"),
        ({"num_models": True}, "num_models"),
        ({"seed": "1"}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"parallelism": 0}, "parallelism"),
        ({"parallelism": 2.0}, "parallelism"),
        ({"n_startup_trials": 0}, "n_startup_trials"),
        ({"n_startup_trials": "5"}, "n_startup_trials"),
    ]
    for kwargs, argument in cases:
        with pytest.raises(ConfigError, match=argument) as caught:
            TPESearch(SPACE, **{"num_models": 10, **kwargs})
        assert isinstance(caught.value, ValueError) and caught.value.argument == argument
    with pytest.raises(ConfigError, match="space"):
        TPESearch({}, 10)
    with pytest.raises(ConfigError, match="layers") as caught:
        TPESearch({**SPACE, "layers": cerebro.choice([(64,), (64, 64)])}, 10)
    assert "None, bool, int, float or str" in str(caught.value)
    with pytest.raises(ConfigError, match="q"):
        TPESearch({"q": cerebro.quniform(0.1, 0.2, 0.5)}, 10)  # no multiple of q inside
    with pytest.raises(RuntimeError, match="attach"):
        TPESearch(SPACE, 10).propose([])


def test_proposals_are_plain_values_inside_the_space():
    space = {
        **SPACE,
        "l2": cerebro.quniform(0.05, 1.0, 0.1),
        "act": cerebro.choice(["relu", "gelu", None]),
        "flag": cerebro.choice([np.bool_(True), np.bool_(False)]),
        "heads": cerebro.choice([np.int64(2), np.int64(4)]),
        "scale": cerebro.choice([np.float32(0.5), 1.0]),
        "const": 7,
    }

    class Driver(TPESearch):
        def __init__(self) -> None:
            super().__init__(space, num_models=24, seed=3, n_startup_trials=4)
            self.proposed: list[dict] = []

        def propose(self, trials):
            configs = super().propose(trials)
            self.proposed.extend(configs)
            return configs

    search = Driver()
    simulate(search, seed=3)
    assert len(search.proposed) == 24
    for config in search.proposed:
        assert list(config) == list(space)
        for name, dim in space.items():
            value = config[name]
            assert type(value) in (int, float, str, bool, type(None)), (name, value, type(value))
            if isinstance(dim, cerebro.space.Dimension):
                assert dim.contains(value), (name, value)
        assert config["const"] == 7 and round(config["l2"], 12) == config["l2"]
    assert len({c["lr"] for c in search.proposed}) == 24


def test_fingerprint_and_quiet_logging(capsys):
    a = TPESearch(SPACE, 10, seed=1)
    assert a.fingerprint() == TPESearch(dict(reversed(SPACE.items())), 10, seed=1).fingerprint()
    assert a.fingerprint() != TPESearch(SPACE, 10, seed=2).fingerprint()
    assert a.fingerprint() != TPESearch(SPACE, 11, seed=1).fingerprint()
    assert (
        a.fingerprint() != TPESearch(dict(SPACE, width=cerebro.randint(8, 512)), 10).fingerprint()
    )
    assert "TPESearch" in repr(a) and "num_models=10" in repr(a)

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        a.attach(CONTEXT)
        a.propose([])
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
    finally:
        optuna.logging.set_verbosity(before)
    captured = capsys.readouterr()
    assert "study" not in captured.err.lower() and "study" not in captured.out.lower()
