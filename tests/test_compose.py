"""A search proposes, a scheduler decides: TPE + ASHA, random search + median stopping,
Hyperband and PBT behind random search; the shorthand forms (``ASHA(space, n, ...)``) equal to
the explicit composition; and the combinations that are refused before any work starts."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
from conftest import small_experiment
from test_halving import SPACE as HALVING_SPACE
from test_halving import Composed, Driver, check_asha_rung_rules, context

import cerebro
from cerebro.search.base import Action, Decision, FixedSearch, SearchContext, Trial
from cerebro.search.tpe import TPESearch

SPACE = {"lr": cerebro.loguniform(1e-4, 3e-1), "width": cerebro.choice([16, 32])}


def _run(digits, path, search, epochs, **overrides) -> cerebro.Result:
    return small_experiment(digits, path, search=search, epochs=epochs, seed=5, **overrides).run()


def _epochs(result: cerebro.Result) -> dict[int, int]:
    return {m.id: len(m.history) for m in result.models}


def _check_rung_counts(epochs: dict[int, int], rungs, eta: int) -> None:
    """At most floor(n_k / eta) models trained past each rung (every metric here is finite)."""
    for rung in rungs:
        n_k = sum(e >= rung for e in epochs.values())
        assert sum(e > rung for e in epochs.values()) <= n_k // eta, (rung, epochs)


def _check_epochs_are_whole(result: cerebro.Result, num_shards: int) -> None:
    train = result.hops[result.hops.kind == "train"]
    per_epoch = train.groupby(["model_id", "epoch"]).shard
    assert (per_epoch.nunique() == num_shards).all() and (per_epoch.size() == num_shards).all()


def _reason_numbers(reason: str) -> tuple[int, int, int]:
    """(rank, n, quota) of an ASHA reason "rung k (r epochs): rank a of n, top q continue"."""
    words = reason.split(":", 1)[1].replace(",", "").replace(";", "").split()
    return int(words[1]), int(words[3]), int(words[5])


# --------------------------------------------------------------------------------------------
# TPE proposing, ASHA stopping


def test_tpe_proposing_and_asha_stopping_end_to_end(digits, tmp_path):
    eta = 3
    asha = cerebro.ASHA(max_epochs=3, reduction_factor=eta)
    search = cerebro.TPESearch(SPACE, num_models=6, seed=0)
    result = _run(digits, tmp_path / "run", search, epochs=3, scheduler=asha)
    epochs = _epochs(result)
    assert len(epochs) == 6  # TPE proposed all of them: the paused ones did not hold it back
    assert asha.rungs == (1,)
    _check_rung_counts(epochs, asha.rungs, eta)
    assert sum(e == 3 for e in epochs.values()) == 6 // eta  # every promotion was given
    for model in result.models:
        assert model.status == ("completed" if len(model.history) == 3 else "pruned")
        assert SPACE["width"].contains(model.params["width"])
    # Promotions of paused models are recorded with ASHA's reason: each was within the quota.
    for event in result.events:
        if event["kind"] == "continued" and event["detail"]["reason"].startswith("rung"):
            rank, _, quota = _reason_numbers(event["detail"]["reason"])
            assert rank <= quota
    _check_epochs_are_whole(result, digits.num_shards)
    config = result.experiment["config"]
    assert (
        config["scheduler"]
        == asha.fingerprint()
        == "ASHA(max_epochs=3, reduction_factor=3, min_epochs=1)"
    )
    assert config["search"].startswith("TPESearch(num_models=6")


@pytest.mark.parametrize("seed", range(4))
def test_asha_rung_rules_hold_when_tpe_proposes(seed):
    """Played without processes: TPE proposes (learning from the results so far), the pure ASHA
    scheduler decides; from the records, at most floor(n_k / eta) models trained past each rung,
    every free promotion was given, and each went to a model ranked within the quota."""
    rng = np.random.default_rng(seed)
    quality = {}

    def value(i, e):  # a loss that depends on the proposed lr: TPE has something to learn
        lr = driver.trials[i].params["lr"]
        quality.setdefault(i, abs(np.log10(lr) + 2) + rng.normal(scale=0.1))
        return float(np.round(quality[i] + 0.5 / e, 2))

    asha = cerebro.ASHA(max_epochs=9, reduction_factor=3)
    tpe = TPESearch(HALVING_SPACE, num_models=15, seed=seed, parallelism=4)
    played = Composed(tpe, asha)
    driver = Driver(played, context(9, shards=4, workers=2), value, rng=rng)
    final = driver.run()
    assert len(final) == 15
    assert driver.max_running <= 4  # TPE kept 4 running, not counting the paused ones
    check_asha_rung_rules(asha, driver, final, every_promotion_given=True)


def test_hyperband_brackets_fill_when_tpe_proposes():
    """Played: Hyperband's rung 0 waits for its whole bracket; TPE, which does not count the
    models Hyperband pauses, goes on proposing until the bracket is there."""
    rng = np.random.default_rng(0)
    quality = rng.permutation(13).astype(float)  # distinct: no ties
    hb = cerebro.Hyperband(max_epochs=9)
    tpe = TPESearch(HALVING_SPACE, num_models=13, seed=0, parallelism=4)
    driver = Driver(Composed(tpe, hb), context(9), lambda i, e: quality[i] / e, rng=rng)
    final = driver.run()
    assert driver.leftover == []  # every paused model was decided, none pruned for waiting
    assert [(b.size, b.rungs) for b in hb.brackets] == [(9, (1, 3, 9)), (4, (3, 9))]
    assert sorted(t.epochs_done for t in final[:9]) == [1] * 6 + [3] * 2 + [9]
    assert sorted(t.epochs_done for t in final[9:]) == [3] * 3 + [9]


def test_tpe_counts_paused_models_in_flight_only_without_a_pausing_scheduler():
    tpe = TPESearch(SPACE, num_models=10, seed=0, parallelism=4)
    tpe.attach(SearchContext("val_loss", "min", 3, 4, 2))
    history = [{"epoch": 0, "val_loss": 1.0}]
    paused = [Trial(i, c, "paused", history) for i, c in enumerate(tpe.propose([]))]
    assert tpe.propose(paused) == []  # 4 paused are 4 in flight
    tpe.attach(SearchContext("val_loss", "min", 3, 4, 2, scheduler_pauses=True))
    assert len(tpe.propose(paused)) == 4  # under ASHA they wait for new results: propose more


# --------------------------------------------------------------------------------------------
# Other schedulers behind random search


def test_random_search_with_median_stopping_as_the_scheduler(digits, tmp_path):
    # Learning rates from useless (1e-6) to good: the slow learners fall below the median.
    space = {"lr": cerebro.loguniform(1e-6, 1e-1), "width": 32}
    rule = cerebro.MedianStopping(grace_epochs=1, min_trials=2)
    search = cerebro.RandomSearch(space, num_models=6, seed=0)
    result = _run(digits, tmp_path / "run", search, epochs=4, scheduler=rule)
    assert len(result.models) == 6
    pruned = [e for e in result.events if e["kind"] == "pruned"]
    assert pruned, [m.history for m in result.models]
    for event in pruned:
        assert event["detail"]["reason"].startswith("MedianStopping: median stopping: best")
    for model in result.models:  # MedianStopping never pauses: each completes or is pruned
        assert model.status == ("completed" if len(model.history) == 4 else "pruned")
    assert {e["detail"]["model"] for e in pruned} == {
        m.id for m in result.models if m.status == "pruned"
    }
    assert not [e for e in result.events if e["kind"] == "paused"]
    assert result.experiment["config"]["scheduler"] == repr(rule)


def test_hyperband_as_a_scheduler_behind_random_search(digits, tmp_path):
    hb = cerebro.Hyperband(max_epochs=3, reduction_factor=3)
    search = cerebro.RandomSearch(SPACE, num_models=5, seed=0)
    # Brackets from the search's 5 models: s=1 (3 models at 1 epoch, rungs 1, 3), then s=0 (2).
    result = _run(digits, tmp_path / "run", search, epochs=4, scheduler=hb)
    assert [(b.size, b.rungs) for b in hb.brackets] == [(3, (1, 3)), (2, (3,))]
    epochs = _epochs(result)
    assert sorted(epochs[i] for i in range(3)) == [1, 1, 3]  # the top 1 of 3 goes on
    assert epochs[3] == epochs[4] == 3  # the scheduler's max_epochs, not the experiment's 4
    assert {m.status for m in result.models if len(m.history) == 3} == {"completed"}
    _check_epochs_are_whole(result, digits.num_shards)


def test_pbt_as_a_scheduler_behind_random_search(digits, tmp_path):
    space = {"lr": cerebro.loguniform(1e-4, 3e-1), "width": 32}
    pbt = cerebro.PBT(perturb_every=1, quantile=0.25, seed=0)
    search = cerebro.RandomSearch(space, num_models=4, seed=0)
    result = _run(digits, tmp_path / "run", search, epochs=3, deterministic=True, scheduler=pbt)
    assert pbt.mutable == ("lr",)  # from the search's space: width is a single value
    exploits = [e["detail"] for e in result.events if e["kind"] == "exploit"]
    assert exploits  # the bottom model of four at some epoch boundary
    for exploit in exploits:
        assert exploit["source"] != exploit["model"]
        assert space["lr"].contains(exploit["params"]["lr"])
        assert exploit["params"]["width"] == 32
    last = exploits[-1]
    assert result.model(last["model"]).params == last["params"]
    assert {m.status for m in result.models} == {"completed"}
    # The same records give PBT's shorthand the same decision as the scheduler.
    shorthand = cerebro.PBT(space, population=4, perturb_every=1, quantile=0.25, seed=0)
    ctx = SearchContext("val_accuracy", "max", 3, 4, 2, num_models=4, space=search.space)
    shorthand.attach(ctx)
    trials = [Trial(m.id, m.params, "running", m.history[:1]) for m in result.models]
    for t in trials:
        assert shorthand.decide(t, trials) == pbt.decide(t, trials)


# --------------------------------------------------------------------------------------------
# Shorthand forms equal the explicit composition


class _Checked:
    """Plays a shorthand search, asking the explicit scheduler the same question each time."""

    def __init__(self, shorthand, scheduler):
        self.shorthand, self.scheduler = shorthand, scheduler
        self.asked = 0

    def attach(self, ctx):
        self.shorthand.attach(ctx)
        self.scheduler.attach(replace(ctx, num_models=self.shorthand.num_models))

    def propose(self, trials):
        return self.shorthand.propose(trials)

    def is_finished(self, trials):
        return self.shorthand.is_finished(trials)

    def decide(self, trial, trials):
        decision = self.shorthand.decide(trial, trials)
        assert self.scheduler.decide(trial, trials) == decision
        self.asked += 1
        return decision


@pytest.mark.parametrize("seed", range(5))
def test_shorthand_asha_and_hyperband_decide_as_the_scheduler(seed):
    """Exact equality where it can hold: on the same records, ``ASHA(space, n, ...)`` and
    ``ASHA(max_epochs=...)`` (Hyperband too) give the same decision, every time. Their
    proposals differ on purpose (the shorthand keeps ``parallelism`` running, RandomSearch
    proposes everything at once), so whole runs are compared at parallelism = num_models."""
    rng = np.random.default_rng(seed)
    quality = rng.normal(size=20)
    value = lambda i, e: float(np.round(quality[i] + rng.normal(scale=0.2) / e, 1))  # noqa: E731
    for shorthand, scheduler in (
        (
            cerebro.ASHA(HALVING_SPACE, 20, 9, seed=seed, parallelism=3),
            cerebro.ASHA(max_epochs=9),
        ),
        (
            cerebro.Hyperband(HALVING_SPACE, 20, 9, seed=seed, parallelism=3),
            cerebro.Hyperband(max_epochs=9),
        ),
    ):
        checked = _Checked(shorthand, scheduler)
        Driver(checked, context(9), value, rng=rng).run()
        assert checked.asked > 20
        if isinstance(shorthand, cerebro.Hyperband):
            assert scheduler.brackets == shorthand.brackets


def _play(played) -> tuple[list[Trial], list]:
    rng = np.random.default_rng(7)
    quality = rng.normal(size=13)
    value = lambda i, e: float(np.round(quality[i] + rng.normal(scale=0.2) / e, 1))  # noqa: E731
    driver = Driver(played, context(9), value, rng=rng)
    return driver.run(), driver.log


@pytest.mark.parametrize("cls", [cerebro.ASHA, cerebro.Hyperband])
def test_shorthand_runs_equal_random_search_with_the_scheduler(cls):
    """With parallelism = num_models the shorthand proposes everything at once, as RandomSearch
    does: the whole simulated runs (records and every decision) are equal."""
    shorthand = _play(cls(HALVING_SPACE, 13, 9, seed=3, parallelism=13))
    composed = _play(Composed(cerebro.RandomSearch(HALVING_SPACE, 13, seed=3), cls(max_epochs=9)))
    assert len(shorthand[1]) > 13
    assert shorthand == composed


def test_shorthand_asha_run_matches_random_search_with_the_asha_scheduler(digits, tmp_path):
    """End to end, deterministic mode: the same configurations under the same ids, and every
    epoch both runs trained has bit-identical metrics (a model's training depends on its own
    history only). Which models ASHA promotes may differ: it is asynchronous, so it depends on
    the order in which results arrive, which the workers' timing decides; what must hold is the
    rung rule in both runs."""
    runs = {}
    for form in ("shorthand", "composed"):
        if form == "shorthand":
            search, scheduler = cerebro.ASHA(SPACE, 6, 3, seed=2, parallelism=6), None
        else:
            search, scheduler = cerebro.RandomSearch(SPACE, 6, seed=2), cerebro.ASHA(max_epochs=3)
        runs[form] = _run(
            digits, tmp_path / form, search, epochs=3, deterministic=True, scheduler=scheduler
        )
    short, composed = runs["shorthand"], runs["composed"]
    assert [m.params for m in short.models] == [m.params for m in composed.models]
    for run in (short, composed):
        _check_rung_counts(_epochs(run), (1,), 3)
        assert sum(e == 3 for e in _epochs(run).values()) == 6 // 3  # every promotion given
    both = short.history.merge(composed.history, on=["model_id", "epoch"], suffixes=("", "_c"))
    assert len(both) >= 6 + 2  # everyone's first epoch, and at least one promoted in common
    for column in ("val_accuracy", "val_loss", "train_loss"):
        assert (both[column] == both[column + "_c"]).all(), column


# --------------------------------------------------------------------------------------------
# Refused before any work starts


def _refused(digits, tmp_path, argument, *parts, **overrides) -> cerebro.ConfigError:
    path = tmp_path / "refused"
    with pytest.raises(cerebro.ConfigError) as info:
        small_experiment(digits, path, **overrides)
    message = str(info.value)
    assert info.value.argument == argument and message.startswith(f"{argument}="), message
    for part in parts:
        assert part in message, message
    assert not os.path.exists(path)  # nothing written
    return info.value


def test_a_search_that_schedules_takes_no_scheduler(digits, tmp_path):
    asha = cerebro.ASHA(SPACE, 9, max_epochs=3)
    error = _refused(
        digits,
        tmp_path,
        "scheduler",
        "scheduler=PBT(perturb_every=1",
        "expected None, because search=ASHA(num_models=9, max_epochs=3",
        "already schedules its models",
        "(pass search=RandomSearch(space, n) or TPESearch(...) with scheduler=...)",
        search=asha,
        epochs=3,
        scheduler=cerebro.PBT(perturb_every=1),
    )
    assert isinstance(error, ValueError)
    for search in (
        cerebro.Hyperband(SPACE, 9, max_epochs=3),
        cerebro.PBT(SPACE, population=4, perturb_every=1),
    ):
        _refused(
            digits,
            tmp_path,
            "scheduler",
            f"search={type(search).__name__}(",
            search=search,
            epochs=3,
            scheduler=cerebro.MedianStopping(),
        )


def test_a_scheduler_is_not_a_search(digits, tmp_path):
    for scheduler in (
        cerebro.ASHA(max_epochs=3),
        cerebro.Hyperband(max_epochs=3),
        cerebro.PBT(perturb_every=1),
        cerebro.PBT(SPACE, perturb_every=1),  # a space to perturb within, but no population
    ):
        name = type(scheduler).__name__
        _refused(
            digits,
            tmp_path,
            "search",
            f"search={name}(",
            "a search that proposes configurations",
            f"pass it as scheduler={name}(...) with a search",
            search=scheduler,
            epochs=3,
        )
    # MedianStopping is neither a Search nor accepted as one.
    _refused(digits, tmp_path, "search", search=cerebro.MedianStopping())


def test_bad_schedulers(digits, tmp_path):
    _refused(
        digits, tmp_path, "scheduler", "scheduler='asha'", "None or a scheduler", scheduler="asha"
    )
    _refused(
        digits,
        tmp_path,
        "scheduler",
        "a scheduler that proposes nothing",
        "pass it as search=",
        epochs=3,
        scheduler=cerebro.ASHA(SPACE, 4, max_epochs=3),
    )
    _refused(
        digits,
        tmp_path,
        "epochs",
        "the scheduler's max_epochs (9)",
        epochs=3,
        scheduler=cerebro.ASHA(max_epochs=9),
    )

    class Unsized(FixedSearch):  # a search that does not say how many models it proposes
        def configurations(self):
            return [{"lr": 0.01}, {"lr": 0.03}]

    _refused(
        digits,
        tmp_path,
        "scheduler",
        "scheduler=Hyperband(max_epochs=3",
        "says how many configurations it proposes",
        search=Unsized(),
        epochs=3,
        scheduler=cerebro.Hyperband(max_epochs=3),
    )
    _refused(
        digits,
        tmp_path,
        "scheduler",
        "a search with a space for PBT to perturb within",
        search=Unsized(),
        epochs=3,
        scheduler=cerebro.PBT(perturb_every=1),
    )


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: cerebro.ASHA(SPACE, max_epochs=3), "num_models"),
        (lambda: cerebro.ASHA(num_models=3, max_epochs=3), "space"),
        (lambda: cerebro.ASHA(), "max_epochs"),
        (lambda: cerebro.ASHA(max_epochs=3, parallelism=2), "parallelism"),
        (lambda: cerebro.ASHA(max_epochs=3, seed=1), "seed"),
        (lambda: cerebro.Hyperband(max_epochs=0), "max_epochs"),
        (lambda: cerebro.PBT(population=4, perturb_every=1), "space"),
        (lambda: cerebro.PBT(), "perturb_every"),
        (lambda: cerebro.PBT(perturb_every=1, mutable="lr"), "mutable"),
        (lambda: cerebro.PBT(SPACE, perturb_every=1, mutable=["nope"]), "mutable"),
    ],
)
def test_scheduler_forms_check_their_arguments(make, argument):
    with pytest.raises(cerebro.ConfigError) as info:
        make()
    assert info.value.argument == argument


def test_pure_schedulers_propose_nothing():
    for scheduler in (cerebro.ASHA(max_epochs=3), cerebro.Hyperband(max_epochs=3)):
        assert not scheduler.proposes and isinstance(scheduler, cerebro.Scheduler)
        with pytest.raises(RuntimeError, match="it is a scheduler and proposes nothing"):
            scheduler.propose([])
    pbt = cerebro.PBT(perturb_every=1)
    assert not pbt.proposes
    with pytest.raises(RuntimeError, match="proposes nothing"):
        pbt.is_finished([])
    assert cerebro.ASHA(SPACE, 3, 3).proposes and cerebro.ASHA(SPACE, 3, 3).schedules
    assert not cerebro.RandomSearch(SPACE, 3).schedules
    assert cerebro.GridSearch({"lr": cerebro.choice([0.1, 0.2])}).num_models == 2
    rule = cerebro.MedianStopping()
    rule.attach(SearchContext("val_loss", "min", 3, 4, 2))
    assert rule.decide(Trial(0, {}, "running", []), []) == Decision(Action.CONTINUE)


def test_pbt_scheduler_perturbs_within_its_own_space_if_given_one():
    own = {"lr": cerebro.uniform(0.5, 0.6), "width": cerebro.choice([16, 32])}
    pbt = cerebro.PBT(own, perturb_every=1, mutable=["lr"])
    assert not pbt.proposes and pbt.mutable == ("lr",)
    pbt.attach(SearchContext("loss", "min", 3, 4, 2))  # the search has no space: PBT's own
    trials = [
        Trial(i, {"lr": 0.55, "width": 16}, "running", [{"loss": v}])
        for i, v in enumerate([1.0, 2.0])
    ]
    decision = pbt.decide(trials[1], trials)
    assert decision.action is Action.EXPLOIT and decision.source == 0
    assert 0.5 <= decision.params["lr"] <= 0.6 and decision.params["width"] == 16
    assert pbt.fingerprint() != cerebro.PBT(perturb_every=1, mutable=["lr"]).fingerprint()


# --------------------------------------------------------------------------------------------
# Identity: the scheduler is part of the experiment


def test_resuming_with_another_scheduler_is_refused_and_old_records_resume(digits, tmp_path):
    from sqlalchemy import select, update

    from cerebro.store import open_engine, sqlite_url
    from cerebro.store.records import experiments

    path = tmp_path / "run"
    rule = cerebro.MedianStopping()
    first = small_experiment(digits, path, scheduler=rule).run()
    assert first.experiment["config"]["scheduler"] == repr(rule)
    with pytest.raises(cerebro.ConfigError, match=r"different one \(scheduler: recorded 'Median"):
        small_experiment(digits, path).run()
    with pytest.raises(cerebro.ConfigError, match=r"different one \(scheduler: "):
        small_experiment(digits, path, scheduler=cerebro.MedianStopping(grace_epochs=2)).run()
    small_experiment(digits, path, scheduler=rule).run()  # the same one continues

    # Records written before schedulers existed have no "scheduler" key: read as None.
    other = tmp_path / "old"
    small_experiment(digits, other).run()
    engine = open_engine(sqlite_url(str(other)))
    with engine.begin() as conn:
        config = dict(conn.execute(select(experiments.c.config)).scalar_one())
        assert config.pop("scheduler") is None
        conn.execute(update(experiments).values(config=config))
    engine.dispose()
    again = small_experiment(digits, other).run()
    assert "scheduler" not in again.experiment["config"]  # continued, not started afresh
