"""Successive-halving searches: :class:`ASHA` (asynchronous) and :class:`Hyperband`.

Both train many configurations for a few epochs and give more epochs only to the best ones.
Their decisions (:meth:`~cerebro.search.base.Search.decide`) are computed from the trial records
alone, so a resumed experiment decides what an uninterrupted one would.

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

import hashlib
import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from ..errors import ConfigError
from ..space import normalize_space
from .base import (
    COMPLETED,
    CONTINUE,
    FAILED,
    PAUSED,
    PRUNED,
    RUNNING,
    STOPPED,
    Decision,
    Search,
    SearchContext,
    Trial,
    own_trials,
)
from .random import RandomSearch

# A trial in one of these statuses will not reach another rung (unless a person resumes it).
_ENDED = frozenset({COMPLETED, FAILED, STOPPED, PRUNED})


def _int_arg(argument: str, value: Any, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ConfigError(argument, value, f"an integer >= {minimum}")
    return int(value)


def _value_after(trial: Trial, metric: str, epochs: int) -> float | None:
    """The metric recorded for the ``epochs``-th finished epoch; None if absent or not finite."""
    if epochs < 1 or epochs > len(trial.history):
        return None
    value = trial.history[epochs - 1].get(metric)
    try:
        value = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _space_digest(space: dict[str, Any]) -> str:
    text = json.dumps({name: repr(dim) for name, dim in space.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _with_trial(trial: Trial, trials: Sequence[Trial]) -> list[Trial]:
    """Own trials of ``trials`` with ``trial`` itself in them (as given), sorted by model id."""
    own = [t for t in own_trials(trials) if t.model_id != trial.model_id]
    own.append(trial)
    return sorted(own, key=lambda t: t.model_id)


class _Halving(Search):
    """Argument checks, configurations and fingerprint shared by ASHA and Hyperband."""

    # Always set by __init__ (unlike Search.max_epochs, which may be None).
    max_epochs: int

    def __init__(
        self,
        space: dict[str, Any],
        num_models: int,
        max_epochs: int,
        reduction_factor: int,
        seed: int,
        min_epochs: int,
        parallelism: int | None,
    ) -> None:
        self.space = normalize_space(space)
        self.num_models = _int_arg("num_models", num_models, 1)
        self.max_epochs = _int_arg("max_epochs", max_epochs, 1)
        if (
            not isinstance(reduction_factor, numbers.Integral)
            or isinstance(reduction_factor, bool)
            or reduction_factor < 2
        ):
            raise ConfigError(
                "reduction_factor",
                reduction_factor,
                "an integer >= 2",
                hint="each rung keeps 1/reduction_factor of the models; 3 is usual",
            )
        self.reduction_factor: int = int(reduction_factor)
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise ConfigError("seed", seed, "an integer")
        self.seed: int = int(seed)
        self.min_epochs: int = _int_arg("min_epochs", min_epochs, 1)
        if self.min_epochs > self.max_epochs:
            raise ConfigError(
                "min_epochs", min_epochs, f"an integer <= max_epochs ({self.max_epochs})"
            )
        if parallelism is not None:
            parallelism = _int_arg("parallelism", parallelism, 1)
        self.parallelism: int | None = parallelism
        self._configs: list[dict[str, Any]] = RandomSearch(
            self.space, self.num_models, self.seed
        ).configurations()

    # -- shared machinery ------------------------------------------------------------------

    def configurations(self) -> list[dict[str, Any]]:
        """Every configuration this search may start, in the order it starts them (the same as
        ``RandomSearch(space, num_models, seed).configurations()``)."""
        return [dict(c) for c in self._configs]

    def attach(self, context: SearchContext) -> None:
        if context.max_epochs < self.max_epochs:
            raise ConfigError(
                "epochs",
                context.max_epochs,
                f"an integer >= the search's max_epochs ({self.max_epochs})",
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
        return len(own_trials(trials)) >= self.num_models

    def _past_max(self, trial: Trial) -> Decision | None:
        if trial.epochs_done >= self.max_epochs:
            return Decision(
                "stop",
                reason=f"reached the search's max_epochs ({self.max_epochs})",
            )
        return None

    def __repr__(self) -> str:
        parallelism = "" if self.parallelism is None else f", parallelism={self.parallelism}"
        return (
            f"{type(self).__name__}(num_models={self.num_models}, max_epochs={self.max_epochs}, "
            f"reduction_factor={self.reduction_factor}, seed={self.seed}, "
            f"min_epochs={self.min_epochs}{parallelism})"
        )

    def fingerprint(self) -> str:
        return f"{self!r}:space={_space_digest(self.space)}"


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

    :meth:`propose` keeps ``parallelism`` own models running (paused ones do not count; default
    ``max(num_shards, num_workers)``), with at most ``num_models`` in total, taking the
    configurations of ``RandomSearch(space, num_models, seed)`` in order.

    Example:
        >>> from cerebro import loguniform
        >>> from cerebro.search.halving import ASHA
        >>> asha = ASHA({"lr": loguniform(1e-4, 1e-1)}, num_models=27, max_epochs=9)
        >>> asha.rungs
        (1, 3)
    """

    def __init__(
        self,
        space: dict[str, Any],
        num_models: int,
        max_epochs: int,
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
        own = own_trials(trials)
        running = sum(t.status == RUNNING for t in own)
        free = min(self._parallelism() - running, self.num_models - len(own))
        if free <= 0:
            return []
        return [dict(c) for c in self._configs[len(own) : len(own) + free]]

    def decide(self, trial: Trial, trials: Sequence[Trial]) -> Decision:
        context = self._context()
        if trial.origin != "search":
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
        if _value_after(trial, metric, done) is None:
            return Decision("stop", reason=f"{where}: {metric} is missing or not finite")
        own = _with_trial(trial, trials)
        scored = [(t, v) for t in own if (v := _value_after(t, metric, done)) is not None]
        scored.sort(key=lambda tv: (-context.score(tv[1]), tv[0].model_id))
        ranked = [t for t, _ in scored]
        n = len(ranked)
        quota = n // self.reduction_factor
        rank = next(i for i, t in enumerate(ranked) if t.model_id == trial.model_id) + 1
        head = f"{where}: rank {rank} of {n}, top {quota} continue"
        if rank > quota:
            return Decision("pause", reason=head)
        promoted = {
            t.model_id
            for t in own
            if t.model_id != trial.model_id
            and (t.epochs_done > done or (t.epochs_done == done and t.status == RUNNING))
        }
        # Better models of the top that wait at this rung take the free promotions first, so
        # that asking paused models in another order gives the same promotions.
        ahead = [
            t
            for t in ranked[: rank - 1]
            if t.model_id not in promoted and t.status == PAUSED and t.epochs_done == done
        ]
        if len(promoted) + len(ahead) < quota:
            return Decision("continue", reason=head)
        why = f"{len(promoted)} of {quota} promotions used"
        if ahead:
            why += f", {len(ahead)} better paused model{'s' if len(ahead) > 1 else ''} first"
        return Decision("pause", reason=f"{head}; {why}")


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

    Proposals: whole brackets. :meth:`propose` starts the next bracket whenever fewer than
    ``parallelism`` own models are running (paused ones do not count; default
    ``max(num_shards, num_workers)``), and keeps starting brackets in the same call until at
    least ``parallelism`` are, so that the brackets overlap in time and workers are not left
    idle while a bracket waits for its slowest member.

    Example:
        >>> from cerebro import loguniform
        >>> from cerebro.search.halving import Hyperband
        >>> hb = Hyperband({"lr": loguniform(1e-4, 1e-1)}, num_models=49, max_epochs=27)
        >>> [(b.size, b.rungs) for b in hb.brackets]
        [(27, (1, 3, 9, 27)), (12, (3, 9, 27)), (6, (9, 27)), (4, (27,))]
    """

    def __init__(
        self,
        space: dict[str, Any],
        num_models: int,
        max_epochs: int,
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
        brackets: list[Bracket] = []
        first = 0
        while first < self.num_models:
            for s in range(s_max, -1, -1):
                if first >= self.num_models:
                    break
                n_s = math.ceil(Fraction(s_max + 1, s + 1) * eta**s)
                size = min(n_s, self.num_models - first)
                brackets.append(Bracket(len(brackets), s, size, first, self._rungs_of(s)))
                first += size
        self.brackets: tuple[Bracket, ...] = tuple(brackets)

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
        own = own_trials(trials)
        count = len(own)
        bracket = self._bracket_at(count)
        if bracket is None:
            return []
        if count > bracket.first:  # a bracket only partly added: add the rest of it now
            return [dict(c) for c in self._configs[count : bracket.first + bracket.size]]
        running = sum(t.status == RUNNING for t in own)
        start = count
        while running < self._parallelism() and (bracket := self._bracket_at(start)):
            start += bracket.size
            running += bracket.size
        return [dict(c) for c in self._configs[count:start]]

    def _ranked(self, group: list[Trial], rung: int) -> list[Trial]:
        """The members of ``group`` with a finite metric at ``rung``, best first."""
        context = self._context()
        scored = [(t, v) for t in group if (v := _value_after(t, context.metric, rung)) is not None]
        scored.sort(key=lambda tv: (-context.score(tv[1]), tv[0].model_id))
        return [t for t, _ in scored]

    def _top(self, group: list[Trial], rung: int) -> list[Trial]:
        """The members of ``group`` that continue after ``rung``, best first."""
        ranked = self._ranked(group, rung)
        return ranked[: max(1, len(ranked) // self.reduction_factor)]

    def decide(self, trial: Trial, trials: Sequence[Trial]) -> Decision:
        context = self._context()
        if trial.origin != "search":
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
        if _value_after(trial, context.metric, done) is None:
            return Decision("stop", reason=f"{where}: {context.metric} is missing or not finite")
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
            return Decision("pause", reason=f"{where}: waiting for {waiting} of {expected} models")
        ranked = self._ranked(group, done)
        keep = max(1, len(ranked) // self.reduction_factor)
        rank = next(r for r, t in enumerate(ranked, 1) if t.model_id == trial.model_id)
        reason = f"{where}: rank {rank} of {len(ranked)}, top {keep} continue"
        return Decision("continue" if rank <= keep else "stop", reason=reason)
