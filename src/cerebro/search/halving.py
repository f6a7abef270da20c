"""Successive halving: :class:`ASHA` (asynchronous) and :class:`Hyperband`.

Both train many configurations for a few epochs and give more epochs only to the best ones.
Their decisions (:meth:`~cerebro.search.base.Scheduler.decide`) are computed from the trial
records alone, so a resumed experiment decides what an uninterrupted one would.

Each comes in two forms:

* a *scheduler*, given no space: ``Experiment(search=TPESearch(space, 27),
  scheduler=ASHA(max_epochs=9))``. It decides what the search's models do after each epoch and
  proposes nothing;
* a *search*, given a space: ``ASHA(space, num_models=27, max_epochs=9)`` is shorthand for
  ``RandomSearch(space, num_models, seed)`` proposing and the scheduler deciding, with the
  proposal-side rules of the algorithm (ASHA's ``parallelism``, Hyperband's whole brackets).
  The decisions are the scheduler's, the same for the same records.

Conventions shared by both:

* A *rung* is a number of finished epochs (``trial.epochs_done``) at which models are compared;
  the metric "at rung r" is the one recorded for the r-th finished epoch (``history[r - 1]``).
* Only the search's own trials (``origin == "search"``) take part in rungs and brackets. Models
  added or cloned by a person are never ranked, never paused and train to their own epochs.
* A trial whose metric at a rung is missing or not finite is stopped there (and not counted).
* Own trials are told to stop when they reach the search's ``max_epochs`` but the experiment's
  ``epochs`` is larger (the driver had better give them ``max_epochs = search.max_epochs``, so
  that they complete instead).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from ..errors import ConfigError, check_int
from ..history import metric_after
from ..kinds import Action, Origin
from ..space import normalize_space, space_digest
from .base import (
    COMPLETED,
    CONTINUE,
    FAILED,
    PAUSED,
    PRUNED,
    RUNNING,
    STOPPED,
    Decision,
    Scheduler,
    Search,
    SearchContext,
    Trial,
    own_trials,
)
from .random import RandomSearch

# A trial in one of these statuses will not reach another rung (unless a person resumes it).
_ENDED = frozenset({COMPLETED, FAILED, STOPPED, PRUNED})


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _with_trial(trial: Trial, trials: Sequence[Trial]) -> list[Trial]:
    """Own trials of ``trials`` with ``trial`` itself in them (as given), sorted by model id."""
    own = [t for t in own_trials(trials) if t.model_id != trial.model_id]
    own.append(trial)
    return sorted(own, key=lambda t: t.model_id)


class _Halving(Search, Scheduler):
    """Argument checks, configurations and fingerprint shared by ASHA and Hyperband.

    With a space it is a search that proposes ``RandomSearch(space, num_models, seed)``'s
    configurations and decides itself; without one, a scheduler (``proposes`` is False).
    """

    # Always set by __init__ (unlike Search.max_epochs, which may be None).
    max_epochs: int
    # Models wait at a rung for others to catch up.
    pauses = True

    def __init__(
        self,
        space: dict[str, Any] | None,
        num_models: int | None,
        max_epochs: int | None,
        reduction_factor: int,
        seed: int,
        min_epochs: int,
        parallelism: int | None,
    ) -> None:
        name = type(self).__name__
        if space is None:
            self.space = None
            if num_models is not None:
                raise ConfigError(
                    "space",
                    None,
                    "a search space when num_models is given",
                    hint=f"{name}(space, num_models, max_epochs) proposes configurations itself; "
                    f"{name}(max_epochs=...) without either is a scheduler for another search",
                )
            self.num_models = None
        else:
            self.space = normalize_space(space)
            self.num_models = check_int(
                "num_models",
                num_models,
                minimum=1,
                hint=_hint_if_missing(
                    num_models, f"{name} given a space proposes num_models models"
                ),
            )
        self.max_epochs = check_int(
            "max_epochs",
            max_epochs,
            minimum=1,
            hint=_hint_if_missing(max_epochs, "the most epochs one model trains"),
        )
        self.reduction_factor: int = check_int(
            "reduction_factor",
            reduction_factor,
            minimum=2,
            hint="each rung keeps 1/reduction_factor of the models; 3 is usual",
        )
        self.seed: int = check_int("seed", seed)
        if self.space is None and self.seed != 0:
            raise ConfigError(
                "seed",
                seed,
                "0 (the default) when no space is given",
                hint=f"{name} as a scheduler draws nothing: seed the search that proposes",
            )
        self.min_epochs: int = check_int("min_epochs", min_epochs, minimum=1)
        if self.min_epochs > self.max_epochs:
            raise ConfigError(
                "min_epochs", min_epochs, f"an integer <= max_epochs ({self.max_epochs})"
            )
        if parallelism is not None and self.space is None:
            raise ConfigError(
                "parallelism",
                parallelism,
                "None when no space is given",
                hint=f"{name} as a scheduler proposes nothing: the search decides how many "
                "models it keeps in flight",
            )
        self.parallelism: int | None = check_int(
            "parallelism", parallelism, minimum=1, allow_none=True
        )
        self._configs: list[dict[str, Any]] = (
            []
            if self.space is None or self.num_models is None
            else RandomSearch(self.space, self.num_models, self.seed).configurations()
        )

    # -- shared machinery ------------------------------------------------------------------

    @property
    def proposes(self) -> bool:
        """True given a space (a search); False without one (a scheduler)."""
        return self.space is not None

    def _proposal_count(self) -> int:
        """``num_models``, for the methods of the search form."""
        if self.num_models is None:
            raise RuntimeError(
                f"{self!r} has no space: it is a scheduler and proposes nothing; pass it as "
                f"Experiment(search=..., scheduler={type(self).__name__}(...))"
            )
        return self.num_models

    def configurations(self) -> list[dict[str, Any]]:
        """Every configuration this search may start, in the order it starts them (the same as
        ``RandomSearch(space, num_models, seed).configurations()``)."""
        self._proposal_count()
        return [dict(c) for c in self._configs]

    def attach(self, context: SearchContext) -> None:
        if context.max_epochs < self.max_epochs:
            what = "search" if self.proposes else "scheduler"
            raise ConfigError(
                "epochs",
                context.max_epochs,
                f"an integer >= the {what}'s max_epochs ({self.max_epochs})",
                hint=f"raise the experiment's epochs or lower {type(self).__name__}(max_epochs=)",
            )
        super().attach(context)

    def _context(self) -> SearchContext:
        if self.context is None:
            raise RuntimeError(f"{type(self).__name__} must be attached to an experiment first")
        return self.context

    def _parallelism(self) -> int:
        if self.parallelism is not None:
            return self.parallelism
        context = self._context()
        return max(context.num_shards, context.num_workers, 1)

    def is_finished(self, trials: Sequence[Trial]) -> bool:
        return len(own_trials(trials)) >= self._proposal_count()

    def _past_max(self, trial: Trial) -> Decision | None:
        if trial.epochs_done >= self.max_epochs:
            what = "search" if self.proposes else "scheduler"
            return Decision(
                Action.STOP,
                reason=f"reached the {what}'s max_epochs ({self.max_epochs})",
            )
        return None

    def __repr__(self) -> str:
        name = type(self).__name__
        if self.num_models is None:
            return (
                f"{name}(max_epochs={self.max_epochs}, reduction_factor={self.reduction_factor}, "
                f"min_epochs={self.min_epochs})"
            )
        parallelism = "" if self.parallelism is None else f", parallelism={self.parallelism}"
        return (
            f"{name}(num_models={self.num_models}, max_epochs={self.max_epochs}, "
            f"reduction_factor={self.reduction_factor}, seed={self.seed}, "
            f"min_epochs={self.min_epochs}{parallelism})"
        )

    def fingerprint(self) -> str:
        if self.space is None:
            return repr(self)
        return f"{self!r}:space={space_digest(self.space, ordered=False)}"


def _hint_if_missing(value: Any, hint: str) -> str:
    """``hint`` for a missing (None) argument, nothing for a wrong one."""
    return hint if value is None else ""


class ASHA(_Halving):
    """Asynchronous successive halving (Li et al. 2020, "A System for Massively Parallel
    Hyperparameter Tuning"), promotion-based.

    Rungs are at ``min_epochs * reduction_factor**k`` finished epochs, for every k with a value
    below ``max_epochs``. With eta = ``reduction_factor``, a model reaching rung k continues if

    * it is among the top ``floor(n_k / eta)`` results recorded at rung k so far, where n_k
      counts the own trials with a finite metric at rung k (whatever their status now: a model
      that later failed, or was pruned at the rung, still counts), ranked by the metric with
      ties broken by the smaller model id; and
    * fewer than ``floor(n_k / eta)`` models have been promoted from rung k, counting the better
      paused models of the top ``floor(n_k / eta)`` at rung k as promoted first.

    Otherwise it pauses; it is asked again whenever new results arrive, and promoted as soon as
    the rung has grown enough ("no waiting for a rung to fill"). A model counts as promoted from
    rung k when it has more than r_k finished epochs, or exactly r_k and status running (it was
    told to continue); a promoted model that fails, or is stopped or pruned, before it finishes
    another epoch gives its promotion back. The answer for a paused model does not depend on the
    order in which paused models are asked: the best ones win. At most ``floor(n_k / eta)``
    models ever train past rung k, so when all ``num_models`` reached the first rung, at least
    ``1 - 1/eta`` of them stop there; a model still paused when the run ends is pruned by the
    driver.

    As a scheduler (``ASHA(max_epochs=9)``, no space), it decides so for the models of any
    search (``Experiment(search=TPESearch(space, 27), scheduler=ASHA(max_epochs=9))``). The
    search then says how many models start and when; a search that keeps a number of models in
    flight (TPESearch) counts only running ones while ASHA may pause some
    (``SearchContext.scheduler_pauses``), so that paused models wait for new results rather
    than for each other.

    As a search (given ``space`` and ``num_models``), :meth:`propose` keeps ``parallelism`` own
    models running (paused ones do not count; default ``max(num_shards, num_workers)``), with at
    most ``num_models`` in total, taking the configurations of
    ``RandomSearch(space, num_models, seed)`` in order.

    Example:
        >>> from cerebro import loguniform
        >>> from cerebro.search.halving import ASHA
        >>> asha = ASHA({"lr": loguniform(1e-4, 1e-1)}, num_models=27, max_epochs=9)
        >>> asha.rungs
        (1, 3)
        >>> ASHA(max_epochs=9, reduction_factor=3)  # a scheduler, for another search's models
        ASHA(max_epochs=9, reduction_factor=3, min_epochs=1)
    """

    def __init__(
        self,
        space: dict[str, Any] | None = None,
        num_models: int | None = None,
        max_epochs: int | None = None,
        reduction_factor: int = 3,
        seed: int = 0,
        min_epochs: int = 1,
        parallelism: int | None = None,
    ) -> None:
        super().__init__(
            space, num_models, max_epochs, reduction_factor, seed, min_epochs, parallelism
        )
        rungs = []
        rung = self.min_epochs
        while rung < self.max_epochs:
            rungs.append(rung)
            rung *= self.reduction_factor
        self.rungs: tuple[int, ...] = tuple(rungs)

    def propose(self, trials: Sequence[Trial]) -> list[dict[str, Any]]:
        total = self._proposal_count()
        own = own_trials(trials)
        running = sum(t.status is RUNNING for t in own)
        free = min(self._parallelism() - running, total - len(own))
        if free <= 0:
            return []
        return [dict(c) for c in self._configs[len(own) : len(own) + free]]

    def decide(self, trial: Trial, trials: Sequence[Trial]) -> Decision:
        context = self._context()
        if trial.origin is not Origin.SEARCH:
            return CONTINUE
        stop = self._past_max(trial)
        if stop is not None:
            return stop
        done = trial.epochs_done
        if done not in self.rungs:
            return CONTINUE
        k = self.rungs.index(done)
        where = f"rung {k} ({_epochs(done)})"
        metric = context.metric
        if metric_after(trial.history, metric, done) is None:
            return Decision(Action.STOP, reason=f"{where}: {metric} is missing or not finite")
        own = _with_trial(trial, trials)
        scored = [(t, v) for t in own if (v := metric_after(t.history, metric, done)) is not None]
        scored.sort(key=lambda tv: (-context.score(tv[1]), tv[0].model_id))
        ranked = [t for t, _ in scored]
        n = len(ranked)
        quota = n // self.reduction_factor
        rank = next(i for i, t in enumerate(ranked) if t.model_id == trial.model_id) + 1
        head = f"{where}: rank {rank} of {n}, top {quota} continue"
        if rank > quota:
            return Decision(Action.PAUSE, reason=head)
        promoted = {
            t.model_id
            for t in own
            if t.model_id != trial.model_id
            and (t.epochs_done > done or (t.epochs_done == done and t.status is RUNNING))
        }
        # Better models of the top that wait at this rung take the free promotions first, so
        # that asking paused models in another order gives the same promotions.
        ahead = [
            t
            for t in ranked[: rank - 1]
            if t.model_id not in promoted and t.status is PAUSED and t.epochs_done == done
        ]
        if len(promoted) + len(ahead) < quota:
            return Decision(Action.CONTINUE, reason=head)
        why = f"{len(promoted)} of {quota} promotions used"
        if ahead:
            why += f", {len(ahead)} better paused model{'s' if len(ahead) > 1 else ''} first"
        return Decision(Action.PAUSE, reason=f"{head}; {why}")


@dataclass(frozen=True)
class Bracket:
    """One successive-halving bracket of :class:`Hyperband`.

    Attributes:
        index: its position in the order brackets start (0, 1, ...).
        s: Hyperband's bracket number (``s_max`` for the most exploratory one, 0 for the one that
            trains every model to ``max_epochs``).
        size: its number of configurations (the last bracket may be cut short).
        first: the index of its first configuration among the search's configurations.
        rungs: the epochs at which it is halved, strictly increasing; the last is ``max_epochs``.
    """

    index: int
    s: int
    size: int
    first: int
    rungs: tuple[int, ...]


class Hyperband(_Halving):
    """Hyperband (Li et al. 2018) with synchronous successive halving inside each bracket.

    With eta = ``reduction_factor``, ``s_max = floor(log_eta(max_epochs / min_epochs))``. One
    Hyperband iteration runs brackets ``s = s_max, ..., 0``; bracket s starts
    ``n_s = ceil((s_max + 1) / (s + 1) * eta**s)`` configurations at
    ``r_s = max_epochs * eta**-s`` epochs, with rungs ``r_s * eta**i`` up to ``max_epochs``
    (rounded to integers >= 1, duplicates dropped). The search's configurations (those of
    ``RandomSearch(space, num_models, seed)``) fill the brackets in order: bracket s_max first,
    then s_max - 1, ..., 0, then s_max again if ``num_models`` is more than one iteration; the
    last bracket gets what remains of ``num_models``. Own trials belong to brackets in model-id
    order (the driver gives ids in the order it adds models).

    Inside a bracket, a model reaching a rung pauses until every member promoted to that rung
    has reached it or ended (failed, stopped or pruned). Then the top ``floor(m / eta)`` (at least
    1) of the m members with a finite metric at the rung continue, and the others stop.

    As a search (given ``space`` and ``num_models``), its proposals are whole brackets.
    :meth:`propose` starts the next bracket whenever fewer than ``parallelism`` own models are
    running (paused ones do not count; default ``max(num_shards, num_workers)``), and keeps
    starting brackets in the same call until at least ``parallelism`` are, so that the brackets
    overlap in time and workers are not left idle while a bracket waits for its slowest member.

    As a scheduler (``Hyperband(max_epochs=27)``, no space), it sizes its brackets at
    :meth:`attach` from the search's ``num_models`` (``SearchContext.num_models``: a ConfigError
    if the search does not say it), and the search's own trials fill them in model-id order,
    whenever the search proposes them. A bracket's first rung waits for all its members, so the
    search must go on proposing while models wait: RandomSearch and GridSearch propose all at
    once; TPESearch keeps ``parallelism`` running (it does not count the models Hyperband
    pauses), so a bracket fills as its first models pause.

    Example:
        >>> from cerebro import loguniform
        >>> from cerebro.search.halving import Hyperband
        >>> hb = Hyperband({"lr": loguniform(1e-4, 1e-1)}, num_models=49, max_epochs=27)
        >>> [(b.size, b.rungs) for b in hb.brackets]
        [(27, (1, 3, 9, 27)), (12, (3, 9, 27)), (6, (9, 27)), (4, (27,))]
    """

    def __init__(
        self,
        space: dict[str, Any] | None = None,
        num_models: int | None = None,
        max_epochs: int | None = None,
        reduction_factor: int = 3,
        seed: int = 0,
        min_epochs: int = 1,
        parallelism: int | None = None,
    ) -> None:
        super().__init__(
            space, num_models, max_epochs, reduction_factor, seed, min_epochs, parallelism
        )
        eta = self.reduction_factor
        s_max = 0
        while self.min_epochs * eta ** (s_max + 1) <= self.max_epochs:
            s_max += 1
        self.s_max = s_max
        # A scheduler learns the number of models at attach().
        self.brackets: tuple[Bracket, ...] = (
            () if self.num_models is None else self._brackets_for(self.num_models)
        )

    def _brackets_for(self, num_models: int) -> tuple[Bracket, ...]:
        eta, s_max = self.reduction_factor, self.s_max
        brackets: list[Bracket] = []
        first = 0
        while first < num_models:
            for s in range(s_max, -1, -1):
                if first >= num_models:
                    break
                n_s = math.ceil(Fraction(s_max + 1, s + 1) * eta**s)
                size = min(n_s, num_models - first)
                brackets.append(Bracket(len(brackets), s, size, first, self._rungs_of(s)))
                first += size
        return tuple(brackets)

    def attach(self, context: SearchContext) -> None:
        super().attach(context)
        if self.proposes:
            return
        if context.num_models is None:
            raise ConfigError(
                "scheduler",
                self,
                "a search that says how many configurations it proposes (its num_models), "
                "for Hyperband to size its brackets",
                hint="use RandomSearch, GridSearch or TPESearch, or ASHA as the scheduler",
            )
        self.brackets = self._brackets_for(context.num_models)

    def _rungs_of(self, s: int) -> tuple[int, ...]:
        eta = self.reduction_factor
        rungs: list[int] = []
        for i in range(s + 1):
            exact = Fraction(self.max_epochs, eta ** (s - i))
            rung = max(1, math.floor(exact + Fraction(1, 2)))
            if not rungs or rung > rungs[-1]:
                rungs.append(rung)
        return tuple(rungs)

    def _bracket_at(self, position: int) -> Bracket | None:
        return next((b for b in self.brackets if b.first <= position < b.first + b.size), None)

    def propose(self, trials: Sequence[Trial]) -> list[dict[str, Any]]:
        self._proposal_count()
        own = own_trials(trials)
        count = len(own)
        bracket = self._bracket_at(count)
        if bracket is None:
            return []
        if count > bracket.first:  # a bracket only partly added: add the rest of it now
            return [dict(c) for c in self._configs[count : bracket.first + bracket.size]]
        running = sum(t.status is RUNNING for t in own)
        start = count
        while running < self._parallelism() and (bracket := self._bracket_at(start)):
            start += bracket.size
            running += bracket.size
        return [dict(c) for c in self._configs[count:start]]

    def _ranked(self, group: list[Trial], rung: int) -> list[Trial]:
        """The members of ``group`` with a finite metric at ``rung``, best first."""
        context = self._context()
        scored = [
            (t, v)
            for t in group
            if (v := metric_after(t.history, context.metric, rung)) is not None
        ]
        scored.sort(key=lambda tv: (-context.score(tv[1]), tv[0].model_id))
        return [t for t, _ in scored]

    def _top(self, group: list[Trial], rung: int) -> list[Trial]:
        """The members of ``group`` that continue after ``rung``, best first."""
        ranked = self._ranked(group, rung)
        return ranked[: max(1, len(ranked) // self.reduction_factor)]

    def decide(self, trial: Trial, trials: Sequence[Trial]) -> Decision:
        context = self._context()
        if trial.origin is not Origin.SEARCH:
            return CONTINUE
        own = _with_trial(trial, trials)
        position = next(i for i, t in enumerate(own) if t.model_id == trial.model_id)
        bracket = self._bracket_at(position)
        if bracket is None:  # more own trials than num_models: not one of the brackets
            return CONTINUE
        stop = self._past_max(trial)
        if stop is not None:
            return stop
        done = trial.epochs_done
        if done not in bracket.rungs[:-1]:
            return CONTINUE
        i = bracket.rungs.index(done)
        where = f"bracket {bracket.index} (s={bracket.s}) rung {i} ({_epochs(done)})"
        if metric_after(trial.history, context.metric, done) is None:
            return Decision(
                Action.STOP, reason=f"{where}: {context.metric} is missing or not finite"
            )
        members = own[bracket.first : bracket.first + bracket.size]
        # The members promoted to rung i: everyone for rung 0, then the top of each lower rung
        # (plus any member that went past it, which covers a person's resuming a stopped one).
        group = list(members)
        for lower in bracket.rungs[:i]:
            top = {t.model_id for t in self._top(group, lower)}
            group = [t for t in members if t.epochs_done > lower or t.model_id in top]
        missing = bracket.size - len(members) if i == 0 else 0
        waiting = missing + sum(t.epochs_done < done and t.status not in _ENDED for t in group)
        if waiting:
            expected = len(group) + missing
            return Decision(
                Action.PAUSE, reason=f"{where}: waiting for {waiting} of {expected} models"
            )
        ranked = self._ranked(group, done)
        keep = max(1, len(ranked) // self.reduction_factor)
        rank = next(r for r, t in enumerate(ranked, 1) if t.model_id == trial.model_id)
        reason = f"{where}: rank {rank} of {len(ranked)}, top {keep} continue"
        return Decision(Action.CONTINUE if rank <= keep else Action.STOP, reason=reason)
