"""ASHA and Hyperband: pure decision logic, played through a small simulated driver."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cerebro.errors import ConfigError
from cerebro.search.base import (
    COMPLETED,
    FAILED,
    PAUSED,
    PRUNED,
    RUNNING,
    Decision,
    Search,
    SearchContext,
    Trial,
    own_trials,
)
from cerebro.search.halving import ASHA, Hyperband
from cerebro.search.random import RandomSearch
from cerebro.space import choice, loguniform, uniform

SPACE = {"lr": loguniform(1e-4, 1e-1), "width": choice([16, 32, 64])}


def context(max_epochs: int, mode: str = "min", shards: int = 4, workers: int = 2):
    return SearchContext("loss", mode, max_epochs, shards, workers)


def trial(model_id, values, status=RUNNING, origin="search", params=None):
    history = [{"epoch": e, "loss": v} for e, v in enumerate(values)]
    return Trial(model_id, params or {}, status, history, origin)


_STATUS = {"continue": RUNNING, "pause": PAUSED, "stop": PRUNED}


class Driver:
    """Plays the driver's side of the search contract on in-memory records.

    After each result it asks the finished model, then every paused model (one at a time, in
    model-id order, updating statuses between answers). It does the same after a model fails, and
    once more before pruning the models still paused when nothing else can change.
    """

    def __init__(self, search, ctx, value, rng=None, fail_rate=0.0, check_order=True):
        self.search, self.ctx, self.value = search, ctx, value
        self.rng = rng or np.random.default_rng(0)
        self.fail_rate, self.check_order = fail_rate, check_order
        self.trials: dict[int, Trial] = {}
        self.log: list[tuple[int, int, Decision]] = []  # (model, epochs_done, decision)
        self.max_running = 0
        search.attach(ctx)

    def all(self):
        return [self.trials[i] for i in sorted(self.trials)]

    def propose(self):
        for params in self.search.propose(self.all()):
            i = len(self.trials)
            self.trials[i] = Trial(i, params, RUNNING)
        running = sum(t.status == RUNNING for t in self.trials.values())
        self.max_running = max(self.max_running, running)

    def _apply(self, trials, t, decision):
        assert decision.action in _STATUS, decision
        trials[t.model_id] = replace(t, status=_STATUS[decision.action])

    def ask_paused(self, order=None):
        ids = sorted(i for i, t in self.trials.items() if t.status == PAUSED)
        if self.check_order and len(ids) > 1:
            # The same round with another order must give the same statuses.
            other = dict(self.trials)
            for i in self.rng.permutation(ids):
                self._apply(
                    other, other[int(i)], self.search.decide(other[int(i)], list(other.values()))
                )
        for i in ids:
            t = self.trials[i]
            d = self.search.decide(t, self.all())
            self.log.append((i, t.epochs_done, d))
            self._apply(self.trials, t, d)
        if self.check_order and len(ids) > 1:
            assert {i: other[i].status for i in ids} == {i: self.trials[i].status for i in ids}

    def result(self, model_id, value=None):
        """Model ``model_id`` finishes an epoch; returns the decision (None if it completed)."""
        t = self.trials[model_id]
        assert t.status == RUNNING
        e = t.epochs_done + 1
        value = self.value(model_id, e) if value is None else value
        t = replace(t, history=[*t.history, {"epoch": e - 1, "loss": value}])
        self.trials[model_id] = t
        decision = None
        if e >= self.ctx.max_epochs:
            self.trials[model_id] = replace(t, status=COMPLETED)
        else:
            decision = self.search.decide(t, self.all())
            self.log.append((model_id, e, decision))
            self._apply(self.trials, t, decision)
        self.ask_paused()
        self.propose()
        return decision

    def run(self, limit=100_000):
        self.propose()
        for _ in range(limit):
            running = sorted(i for i, t in self.trials.items() if t.status == RUNNING)
            if not running:
                if self.search.is_finished(self.all()):
                    break
                self.propose()
                assert any(t.status == RUNNING for t in self.trials.values()), "stalled"
                continue
            i = int(self.rng.choice(running))
            if self.rng.random() < self.fail_rate:
                self.trials[i] = replace(self.trials[i], status=FAILED)
                self.ask_paused()
                self.propose()
            else:
                self.result(i)
        else:
            raise AssertionError("the run did not end")
        self.ask_paused()
        assert not any(t.status == RUNNING for t in self.trials.values())
        self.leftover = sorted(i for i, t in self.trials.items() if t.status == PAUSED)
        for i in self.leftover:
            self.trials[i] = replace(self.trials[i], status=PRUNED)
        return self.all()


class Trickle(Search):
    """Proposes ``RandomSearch(space, num_models, seed)``'s configurations keeping
    ``parallelism`` own models running (as ASHA's search form does), for a scheduler."""

    def __init__(self, space, num_models, seed, parallelism):
        self.inner = RandomSearch(space, num_models, seed)
        self.space, self.num_models, self.parallelism = self.inner.space, num_models, parallelism

    def propose(self, trials):
        own = own_trials(trials)
        running = sum(t.status == RUNNING for t in own)
        free = min(self.parallelism - running, self.num_models - len(own))
        return self.inner.configurations()[len(own) : len(own) + max(free, 0)]

    def is_finished(self, trials):
        return len(own_trials(trials)) >= self.num_models


class Composed:
    """A search proposing and a scheduler deciding, attached as Experiment attaches them."""

    def __init__(self, search, scheduler):
        self.search, self.scheduler = search, scheduler

    def attach(self, ctx):
        ctx = replace(
            ctx,
            num_models=self.search.num_models,
            space=self.search.space,
            scheduler_pauses=self.scheduler.pauses,
        )
        self.search.attach(ctx)
        self.scheduler.attach(ctx)

    def propose(self, trials):
        return self.search.propose(trials)

    def is_finished(self, trials):
        return self.search.is_finished(trials)

    def decide(self, trial, trials):
        return self.scheduler.decide(trial, trials)


# --------------------------------------------------------------------------------------------
# ASHA


def test_asha_rungs_and_configurations():
    asha = ASHA(SPACE, num_models=9, max_epochs=9, seed=5)
    assert asha.rungs == (1, 3)  # 9 is the budget, not a rung
    assert ASHA(SPACE, 5, max_epochs=20, min_epochs=2).rungs == (2, 6, 18)
    assert ASHA(SPACE, 5, max_epochs=16, reduction_factor=2).rungs == (1, 2, 4, 8)
    assert ASHA(SPACE, 5, max_epochs=3, min_epochs=3).rungs == ()
    assert asha.configurations() == RandomSearch(SPACE, 9, seed=5).configurations()


def test_asha_propose_keeps_parallelism_running_up_to_num_models():
    asha = ASHA(SPACE, num_models=5, max_epochs=9, seed=1, parallelism=2)
    asha.attach(context(9))
    configs = RandomSearch(SPACE, 5, seed=1).configurations()
    assert asha.propose([]) == configs[:2]
    two = [Trial(0, configs[0], RUNNING), Trial(1, configs[1], PAUSED)]
    assert asha.propose(two) == configs[2:3]  # paused models do not count
    added = Trial(7, {"lr": 1.0}, RUNNING, origin="add")  # a person's model does not count
    assert asha.propose([two[0], replace(two[1], status=RUNNING), added]) == []
    four = [Trial(i, configs[i], PRUNED) for i in range(4)]
    assert asha.propose(four) == configs[4:5]  # never more than num_models
    assert not asha.is_finished(four)
    assert asha.is_finished([*four, Trial(4, configs[4], RUNNING)])
    # Default parallelism: max(num_shards, num_workers).
    default = ASHA(SPACE, num_models=20, max_epochs=9)
    default.attach(context(9, shards=3, workers=5))
    assert len(default.propose([])) == 5


def test_asha_hand_computed_rung_promotions():
    """eta=3, rungs at 1 and 3 epochs (max_epochs=9), mode min, 9 models arriving at rung 0."""
    asha = ASHA(SPACE, num_models=9, max_epochs=9, parallelism=9)
    d = Driver(asha, context(9), value=None, check_order=True)
    d.propose()
    assert sorted(d.trials) == list(range(9))

    def paused():
        return sorted(i for i, t in d.trials.items() if t.status == PAUSED)

    def running():
        return sorted(i for i, t in d.trials.items() if t.status == RUNNING)

    # n=1, floor(1/3)=0 promotions allowed: pause.
    assert d.result(0, 0.5).action == "pause"
    # n=2, still 0: pause.
    assert d.result(1, 0.9).action == "pause"
    # n=3, 1 promotion; ranking 2 (0.3), 0 (0.5), 1 (0.9): model 2 is promoted.
    dec = d.result(2, 0.3)
    assert dec.action == "continue"
    assert dec.reason == "rung 0 (1 epoch): rank 1 of 3, top 1 continue"
    assert paused() == [0, 1]
    # n=4, 1 promotion (used by 2); model 3 ranks 2nd: pause.
    assert d.result(3, 0.4).action == "pause"
    # n=5, 1 promotion; model 4 is the best (0.1) but model 2 already used the promotion.
    dec = d.result(4, 0.1)
    assert dec.action == "pause"
    assert dec.reason == "rung 0 (1 epoch): rank 1 of 5, top 1 continue; 1 of 1 promotions used"
    assert paused() == [0, 1, 3, 4]
    # n=6, 2 promotions: top 2 are 4 (0.1) and 2 (0.3); model 5 (0.6) pauses, and the paused
    # model 4 is promoted now that the rung has grown.
    assert d.result(5, 0.6).action == "pause"
    assert paused() == [0, 1, 3, 5]
    assert running() == [2, 4, 6, 7, 8]
    # n=7, 2 promotions (2 and 4): model 6 ranks 2nd (0.2) but both are used.
    assert d.result(6, 0.2).action == "pause"
    # n=8, 2 promotions: model 7 is the best (0.05) but both are used.
    assert d.result(7, 0.05).action == "pause"
    # n=9, 3 promotions: top 3 are 7 (0.05), 4 (0.1), 8 (0.15); 2 and 4 used two. The free one
    # goes to the better of the waiting top models, 7, not to 8 which arrived just now.
    dec = d.result(8, 0.15)
    assert dec.action == "pause"
    assert "better paused model" in dec.reason
    assert running() == [2, 4, 7]
    assert paused() == [0, 1, 3, 5, 6, 8]
    # Asking the paused models in reverse order promotes the same one (Driver also checks a
    # random order at every round).
    trials = d.all()
    reverse = {}
    current = {t.model_id: replace(t, status=PAUSED) if t.model_id == 7 else t for t in trials}
    for i in sorted(current, reverse=True):
        if current[i].status == PAUSED:
            reverse[i] = asha.decide(current[i], list(current.values())).action
            current[i] = replace(current[i], status=_STATUS[reverse[i]])
    assert reverse == {
        8: "pause",
        7: "continue",
        6: "pause",
        5: "pause",
        3: "pause",
        1: "pause",
        0: "pause",
    }

    # Rung 1 (3 epochs): 2, 4 and 7 arrive; a non-rung epoch always continues.
    assert d.result(2, 0.28).action == "continue"
    assert d.result(2, 0.25).action == "pause"  # n=1
    d.result(4, 0.09)
    assert d.result(4, 0.08).action == "pause"  # n=2
    d.result(7, 0.06)
    dec = d.result(7, 0.07)  # n=3: 7 (0.07) is the top 1
    assert dec.action == "continue" and dec.reason.startswith("rung 1 (3 epochs): rank 1 of 3")
    assert running() == [7]
    for _ in range(5):
        d.result(7, 0.05)
    assert d.result(7, 0.04) is None and d.trials[7].status == COMPLETED
    final = d.run()
    assert d.leftover == [0, 1, 2, 3, 4, 5, 6, 8]
    assert [t.epochs_done for t in final] == [1, 1, 3, 1, 3, 1, 1, 9, 1]
    # 6 of 9 (1 - 1/3) stopped at the first rung.
    assert sum(t.epochs_done == 1 for t in final) == 6


def test_asha_counts_only_own_finite_results_and_stops_non_finite():
    asha = ASHA(SPACE, num_models=9, max_epochs=9)
    asha.attach(context(9))
    others = [trial(i, [0.5 + i], PAUSED) for i in range(2)]
    failed = trial(2, [math.nan], FAILED)
    person = trial(3, [0.1], origin="add")
    me = trial(4, [0.2])
    # Only 0, 1 and 4 count at rung 0: n=3, top 1 is model 4.
    dec = asha.decide(me, [*others, failed, person, me])
    assert dec == Decision("continue", "rung 0 (1 epoch): rank 1 of 3, top 1 continue")
    assert asha.decide(person, [*others, person]).action == "continue"  # not ranked
    assert asha.decide(trial(5, [math.inf]), others).action == "stop"
    # A model past the search's max_epochs (the experiment has more epochs) is stopped.
    asha.attach(context(12))
    assert asha.decide(trial(6, [0.1] * 9), others).action == "stop"


@pytest.mark.parametrize("form", ["search", "scheduler"])
@pytest.mark.parametrize("seed", range(40))
def test_asha_simulated_runs_respect_the_promotion_quota(seed, form):
    rng = np.random.default_rng(seed)
    eta = int(rng.integers(2, 5))
    min_epochs = int(rng.integers(1, 3))
    max_epochs = int(rng.integers(min_epochs, 20))
    num_models = int(rng.integers(1, 40))
    fail_rate = 0.0 if seed % 2 else 0.03
    mode = "min" if seed % 3 else "max"
    quality = rng.normal(size=num_models)
    noise = rng.normal(scale=0.3, size=(num_models, max_epochs + 1))
    # Ties on purpose: values rounded to one decimal.
    value = lambda i, e: float(np.round(quality[i] + noise[i, e] / e, 1))  # noqa: E731
    parallelism = int(rng.integers(1, 7))
    if form == "search":
        asha = ASHA(
            SPACE,
            num_models,
            max_epochs,
            reduction_factor=eta,
            seed=seed,
            min_epochs=min_epochs,
            parallelism=parallelism,
        )
        played = asha
    else:  # the pure scheduler, behind a search that keeps `parallelism` running
        asha = ASHA(max_epochs=max_epochs, reduction_factor=eta, min_epochs=min_epochs)
        played = Composed(Trickle(SPACE, num_models, seed, parallelism), asha)
    driver = Driver(played, context(max_epochs, mode), value, rng=rng, fail_rate=fail_rate)
    final = driver.run()
    assert len(final) == num_models
    assert driver.max_running <= parallelism
    check_asha_rung_rules(asha, driver, final, every_promotion_given=fail_rate == 0)
    if fail_rate == 0 and asha.rungs:
        assert sum(t.epochs_done >= asha.rungs[0] for t in final) == num_models


@settings(max_examples=40, deadline=None)
@given(
    eta=st.integers(2, 4),
    min_epochs=st.integers(1, 2),
    extra_epochs=st.integers(0, 12),
    num_models=st.integers(1, 30),
    parallelism=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["min", "max"]),
)
def test_pure_asha_scheduler_keeps_the_rung_rules_for_any_arrival_order(
    eta, min_epochs, extra_epochs, num_models, parallelism, seed, mode
):
    """The rung rule with ASHA as a scheduler: another search proposes (here, RandomSearch's
    configurations kept ``parallelism`` running), hypothesis picks the sizes, values and the
    order in which models finish their epochs."""
    max_epochs = min_epochs + extra_epochs
    rng = np.random.default_rng(seed)
    quality = rng.normal(size=num_models)
    value = lambda i, e: float(np.round(quality[i] + rng.normal(scale=0.3) / e, 1))  # noqa: E731
    asha = ASHA(max_epochs=max_epochs, reduction_factor=eta, min_epochs=min_epochs)
    played = Composed(Trickle(SPACE, num_models, seed, parallelism), asha)
    driver = Driver(played, context(max_epochs, mode), value, rng=rng)
    final = driver.run()
    assert len(final) == num_models and driver.max_running <= parallelism
    check_asha_rung_rules(asha, driver, final, every_promotion_given=True)


def check_asha_rung_rules(asha, driver, final, every_promotion_given):
    """ASHA's rung rule, from the records (``final``, every metric finite) and the decision
    log: at most floor(n_k / eta) models trained past rung k (exactly that many when no model
    failed), at least 1 - 1/eta stopped at the first rung, and every promotion went to a model
    ranked within the top floor(n / eta) of the results at the rung when it was promoted."""
    eta = asha.reduction_factor
    assert all(t.status in (COMPLETED, PRUNED, FAILED) for t in final)
    for k, rung in enumerate(asha.rungs):
        n_k = sum(t.epochs_done >= rung for t in final)  # all results here are finite
        promoted = sum(t.epochs_done > rung for t in final)
        assert promoted <= n_k // eta, (k, rung)
        if every_promotion_given:
            assert promoted == n_k // eta, (k, rung)  # every free promotion was given
        if k == 0:
            assert (n_k - promoted) * eta >= (eta - 1) * n_k  # at least 1 - 1/eta stop here
    # A promotion goes to the best of the rung, or to a model that was in the top when promoted.
    for _, e, dec in driver.log:
        if dec.action == "continue" and e in asha.rungs:
            rank, _, quota = _numbers(dec.reason)
            assert rank <= quota


def _numbers(reason: str) -> tuple[int, int, int]:
    words = reason.split(":", 1)[1].replace(",", "").replace(";", "").split()
    return int(words[1]), int(words[3]), int(words[5])


# --------------------------------------------------------------------------------------------
# Hyperband


def test_hyperband_brackets_for_27_epochs():
    hb = Hyperband(SPACE, num_models=49, max_epochs=27)
    assert hb.s_max == 3
    assert [(b.s, b.size, b.first, b.rungs) for b in hb.brackets] == [
        (3, 27, 0, (1, 3, 9, 27)),
        (2, 12, 27, (3, 9, 27)),
        (1, 6, 39, (9, 27)),
        (0, 4, 45, (27,)),
    ]
    # Cut short, and cycling through a second iteration.
    assert [b.size for b in Hyperband(SPACE, 30, 27).brackets] == [27, 3]
    cycled = Hyperband(SPACE, 60, 27).brackets
    assert [(b.s, b.size) for b in cycled] == [(3, 27), (2, 12), (1, 6), (0, 4), (3, 11)]
    # Rungs rounded to integers when max_epochs is not a power of eta.
    ten = Hyperband(SPACE, 17, 10).brackets
    assert [(b.size, b.rungs) for b in ten] == [(9, (1, 3, 10)), (5, (3, 10)), (3, (10,))]
    # min_epochs=2: s_max = floor(log3(27 / 2)) = 2.
    two = Hyperband(SPACE, 17, 27, min_epochs=2).brackets
    assert [(b.size, b.rungs) for b in two] == [(9, (3, 9, 27)), (5, (9, 27)), (3, (27,))]
    assert [b.size for b in Hyperband(SPACE, 3, 5, min_epochs=5).brackets] == [1, 1, 1]


def test_hyperband_proposes_whole_brackets():
    hb = Hyperband(SPACE, num_models=49, max_epochs=27, seed=2, parallelism=4)
    hb.attach(context(27))
    configs = RandomSearch(SPACE, 49, seed=2).configurations()
    assert hb.propose([]) == configs[:27]
    first = [Trial(i, c, RUNNING) for i, c in enumerate(configs[:27])]
    assert hb.propose(first) == []
    # Fewer than 4 running (the rest paused or pruned): the next whole bracket starts.
    quiet = [replace(t, status=RUNNING if t.model_id < 3 else PAUSED) for t in first]
    assert hb.propose(quiet) == configs[27:39]
    part = quiet + [Trial(i, configs[i], RUNNING) for i in range(27, 30)]
    assert hb.propose(part) == configs[30:39]  # finish a bracket added in part
    wide = Hyperband(SPACE, num_models=49, max_epochs=27, seed=2, parallelism=40)
    wide.attach(context(27))
    assert wide.propose([]) == configs[:45]  # 27 + 12 < 40, so a third bracket starts too


def test_hyperband_waits_for_the_rung_then_keeps_the_top():
    hb = Hyperband(SPACE, num_models=6, max_epochs=9)  # s_max=2: bracket 0 has 6 of 9 models
    hb.attach(context(9))
    assert hb.brackets[0].size == 6 and hb.brackets[0].rungs == (1, 3, 9)
    done = [trial(i, [v]) for i, v in enumerate([0.4, 0.2, 0.6, 0.1])]
    rest = [trial(4, []), trial(5, [], FAILED)]
    dec = hb.decide(done[0], done + rest)
    assert dec.action == "pause" and dec.reason.endswith("waiting for 1 of 6 models")
    rest[0] = trial(4, [0.3])
    paused = [replace(t, status=PAUSED) for t in done]
    # m=5 finite, floor(5/3)=1 continues: model 3 (0.1).
    assert hb.decide(rest[0], paused + rest).action == "stop"
    assert hb.decide(paused[3], paused + rest).action == "continue"
    assert hb.decide(paused[1], paused + rest) == Decision(
        "stop", "bracket 0 (s=2) rung 0 (1 epoch): rank 2 of 5, top 1 continue"
    )
    # Rung 1 has one member (model 3): at least one model continues.
    three = trial(3, [0.1, 0.1, 0.05])
    assert hb.decide(three, [*paused[:3], three, *rest]).action == "continue"
    # A person's model is not in any bracket.
    assert hb.decide(trial(9, [5.0], origin="clone"), paused).action == "continue"


@pytest.mark.parametrize("form", ["search", "scheduler"])
@pytest.mark.parametrize("seed", range(6))
def test_hyperband_simulated_run_keeps_the_top_third(seed, form):
    rng = np.random.default_rng(seed)
    if form == "search":
        hb = Hyperband(SPACE, num_models=49, max_epochs=27, seed=seed, parallelism=4)
        played = hb
    else:  # brackets sized from the search's num_models, filled as the search proposes
        hb = Hyperband(max_epochs=27)
        played = Composed(Trickle(SPACE, 49, seed, parallelism=4), hb)
    quality = rng.permutation(49).astype(float)  # distinct: no ties
    driver = Driver(played, context(27), lambda i, e: quality[i] / e, rng=rng, check_order=True)
    final = driver.run()
    assert driver.leftover == []  # every paused model was decided
    assert all(t.status in (COMPLETED, PRUNED) for t in final)
    for b in hb.brackets:
        members = final[b.first : b.first + b.size]
        reached = members
        for rung in b.rungs[:-1]:
            at = [t for t in reached if t.epochs_done >= rung]
            keep = max(1, len(at) // 3)
            expected = sorted(at, key=lambda t: quality[t.model_id])[:keep]
            went_on = [t for t in at if t.epochs_done > rung]
            assert {t.model_id for t in went_on} == {t.model_id for t in expected}
            reached = went_on
        # The models left after the last halving train to max_epochs; the rest were pruned.
        assert [t.status == COMPLETED for t in members] == [t in reached for t in members]
    # Epochs: bracket 3: 27*1 + 9*2 + 3*6 + 1*18 = 81; bracket 2: 12*3 + 4*6 + 1*18 = 78;
    # bracket 1: 6*9 + 2*18 = 90; bracket 0: 4*27 = 108. Total 357.
    assert sum(t.epochs_done for t in final) == 81 + 78 + 90 + 108 == 357


def test_hyperband_rung_completes_when_a_member_fails():
    hb = Hyperband(SPACE, num_models=3, max_epochs=3)  # s_max=1: bracket of 3 at (1, 3)
    hb.attach(context(3))
    assert hb.brackets[0].rungs == (1, 3)
    a, b = trial(0, [0.5], PAUSED), trial(1, [0.7], PAUSED)
    c = trial(2, [], RUNNING)
    assert hb.decide(a, [a, b, c]).action == "pause"
    c = replace(c, status=FAILED)
    assert hb.decide(a, [a, b, c]).action == "continue"  # m=2: at least 1 continues
    assert hb.decide(b, [a, b, c]).action == "stop"


# --------------------------------------------------------------------------------------------
# Shared: validation, attach, fingerprint


@pytest.mark.parametrize("cls", [ASHA, Hyperband])
@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"num_models": 0}, "num_models"),
        ({"num_models": 2.5}, "num_models"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"max_epochs": "9"}, "max_epochs"),
        ({"reduction_factor": 1}, "reduction_factor"),
        ({"reduction_factor": 2.5}, "reduction_factor"),
        ({"reduction_factor": True}, "reduction_factor"),
        ({"seed": 1.5}, "seed"),
        ({"min_epochs": 0}, "min_epochs"),
        ({"min_epochs": 10}, "min_epochs"),
        ({"parallelism": 0}, "parallelism"),
        ({"space": {}}, "space"),
        ({"space": {"lr": [0.1, 0.2]}}, "space['lr']"),
    ],
)
def test_halving_bad_input(cls, kwargs, argument):
    args = {"space": SPACE, "num_models": 9, "max_epochs": 9, **kwargs}
    with pytest.raises(ConfigError) as info:
        cls(**args)
    assert isinstance(info.value, ValueError)
    assert info.value.argument == argument
    if argument == "reduction_factor":
        assert "an integer >= 2" in str(info.value)


@pytest.mark.parametrize("cls", [ASHA, Hyperband])
def test_halving_attach_needs_enough_epochs_and_fingerprints_are_stable(cls):
    search = cls(SPACE, num_models=9, max_epochs=9)
    with pytest.raises(ConfigError) as info:
        search.attach(context(5))
    assert info.value.argument == "epochs" and ">= the search's max_epochs (9)" in str(info.value)
    search.attach(context(9))
    assert search.fingerprint() == cls(SPACE, num_models=9, max_epochs=9).fingerprint()
    assert search.fingerprint() != cls(SPACE, 9, 9, reduction_factor=2).fingerprint()
    other_space = {**SPACE, "lr": uniform(0.0, 1.0)}
    assert search.fingerprint() != cls(other_space, 9, 9).fingerprint()
    assert repr(search).startswith(f"{cls.__name__}(num_models=9, max_epochs=9")
