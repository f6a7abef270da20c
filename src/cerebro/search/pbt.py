"""Population-based training (Jaderberg et al. 2017, "Population Based Training of Neural
Networks"): a population trains side by side; now and then the worst members copy the weights of
the best ones ("exploit") and train on with perturbed hyper-parameters ("explore").

:class:`PBT` is a scheduler (``PBT(perturb_every=2)``: it exploits and explores among the models
of any search, perturbing within the search's space), or, given a space and a ``population``, a
search: shorthand for ``RandomSearch(space, population, seed)`` proposing the population at once
and the scheduler deciding."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, check_int, check_number, is_number
from ..kinds import Action, Origin
from ..seeding import derive_seed
from ..space import (
    Choice,
    Dimension,
    LogUniform,
    QUniform,
    RandInt,
    Uniform,
    normalize_space,
    space_digest,
)
from .base import (
    COMPLETED,
    CONTINUE,
    PAUSED,
    RUNNING,
    Decision,
    Scheduler,
    Search,
    SearchContext,
    Trial,
    own_trials,
)
from .random import RandomSearch

# Members whose latest weights may be compared and copied (failed, stopped and pruned ones are
# left out: their last values are stale, and a failed model's weights may be the reason).
_RANKED_STATUSES = frozenset({RUNNING, PAUSED, COMPLETED})

_FACTORS = (0.8, 1.2)


def _fixed(dim: Dimension) -> bool:
    return isinstance(dim, Choice) and len(dim.values) == 1


def _perturb_one(dim: Dimension, value: Any, rng: np.random.Generator) -> Any:
    """``value`` moved a small step inside ``dim`` (resampled when it is not one of dim's)."""
    factor = _FACTORS[int(rng.integers(2))]
    up = factor > 1
    if isinstance(dim, Choice):
        index = next((i for i, v in enumerate(dim.values) if v == value), None)
        if index is None:
            return dim.sample(rng)
        index = min(max(index + (1 if up else -1), 0), len(dim.values) - 1)
        return dim.values[index]
    if not is_number(value):
        return dim.sample(rng)
    if isinstance(dim, RandInt):
        moved = int(round(value * factor))
        if moved == value:  # x0.8 / x1.2 of a small integer rounds back: move by one instead
            moved = int(value) + (1 if (up == (value >= 0)) else -1)
        return int(min(max(moved, dim.low), dim.high))
    if isinstance(dim, QUniform):
        return dim.nearest(value * factor)  # a multiple of q inside the range
    if isinstance(dim, (Uniform, LogUniform)):
        return float(min(max(value * factor, dim.low), dim.high))
    return dim.sample(rng)  # a dimension type this helper does not know: resample it


def perturb(
    params: Mapping[str, Any],
    space: Mapping[str, Any],
    rng: np.random.Generator,
    mutable: Iterable[str] | None = None,
    resample_probability: float = 0.25,
) -> dict[str, Any]:
    """PBT's "explore" step: a copy of ``params`` with each ``mutable`` hyper-parameter changed.

    ``mutable`` defaults to every dimension of ``space`` that is not a single value. Each mutable
    parameter (taken in the space's order, so the draws are reproducible) is, with probability
    ``resample_probability``, drawn afresh from its dimension; otherwise it is moved one step:

    * ``uniform``, ``loguniform``: multiplied by 0.8 or 1.2, clipped to the bounds;
    * ``quniform``: the same, then rounded to a multiple of ``q`` as ``QUniform.sample`` rounds;
    * ``randint``: multiplied by 0.8 or 1.2 and rounded, clipped; when the rounding gives the
      same integer back (small values), moved by 1 in that direction instead;
    * ``choice``: moved to the neighbouring value in the list (clipped at the ends).

    A value that does not belong to its dimension's type (e.g. from a model added by hand) is
    resampled. Every other entry of ``params`` is copied unchanged.

    Example:
        >>> import numpy as np
        >>> from cerebro import loguniform
        >>> from cerebro.search.pbt import perturb
        >>> new = perturb({"lr": 0.01, "width": 64}, {"lr": loguniform(1e-4, 1e-1), "width": 64},
        ...               np.random.default_rng(0), resample_probability=0.0)
        >>> new["width"], round(new["lr"], 6) in (0.008, 0.012)
        (64, True)
    """
    dims = normalize_space(dict(space))
    names = _mutable_names(dims, mutable, argument="mutable")
    probability = _probability(resample_probability)
    result = dict(params)
    for name in dims:
        if name not in names:
            continue
        dim = dims[name]
        if float(rng.random()) < probability or name not in result:
            result[name] = dim.sample(rng)
        else:
            result[name] = _perturb_one(dim, result[name], rng)
    return result


def _check_name_list(argument: str, mutable: Any) -> list[str]:
    """A list (or other iterable, not a string) of parameter names."""
    if isinstance(mutable, str) or not isinstance(mutable, Iterable):
        raise ConfigError(argument, mutable, "a list of parameter names of the space")
    return list(mutable)


def _mutable_names(
    dims: Mapping[str, Dimension], mutable: Iterable[str] | None, argument: str
) -> frozenset[str]:
    if mutable is None:
        return frozenset(name for name, dim in dims.items() if not _fixed(dim))
    names = _check_name_list(argument, mutable)
    unknown = [n for n in names if not isinstance(n, str) or n not in dims]
    if unknown:
        raise ConfigError(
            argument,
            mutable,
            f"names of the space's parameters ({', '.join(dims)})",
            hint=f"not in the space: {', '.join(map(repr, unknown))}",
        )
    return frozenset(names)


def _probability(value: Any) -> float:
    return check_number("resample_probability", value, minimum=0, maximum=1)


class PBT(Search, Scheduler):
    """Population-based training: exploit the best members, explore around them.

    After every ``perturb_every``-th epoch of a member (``trial.epochs_done % perturb_every ==
    0``), :meth:`decide` ranks the population: the search's own members that are running,
    paused or completed and have a finite latest metric, each by its latest recorded value (ties
    by the smaller model id). Models added by a person are not ranked, never copied from and
    never perturbed. With n ranked members (n >= 2), the top and bottom quantiles hold
    ``max(1, floor(quantile * n))`` members each. A member in the bottom quantile (or whose own
    latest metric is not finite) gets ``Decision("exploit", source=..., params=...)``: it copies
    the weights and optimizer state of a source drawn uniformly from the top quantile, with the
    source's hyper-parameters perturbed by :func:`perturb` (the draws use a generator seeded by
    ``derive_seed(seed, "pbt", model_id, epochs_done)``, so the same records give the same
    decision). Everyone else continues.

    Two forms:

    * a scheduler, ``PBT(perturb_every=2)``: the population is the search's models
      (``Experiment(search=RandomSearch(space, 8), scheduler=PBT(perturb_every=2))``), perturbed
      within the search's space (``SearchContext.space``), or within ``space`` if given one
      (then without ``population``);
    * a search, ``PBT(space, population, perturb_every)``: shorthand for
      ``RandomSearch(space, population, seed)`` proposing the whole population at once, and the
      scheduler deciding.

    The perturbed (``mutable``) hyper-parameters must be ones that can change on a live model —
    learning rate, weight decay, momentum, dropout probability and the like — because the target
    takes the source's weights and optimizer state and only the hyper-parameters change; the
    others (architecture: widths, layer counts...) are copied from the source unchanged.
    ``mutable`` defaults to every dimension that is not a single value, so name them when the
    space also holds architecture parameters.

    Example:
        >>> from cerebro import loguniform, uniform
        >>> from cerebro.search.pbt import PBT
        >>> pbt = PBT({"lr": loguniform(1e-4, 1e-1), "momentum": uniform(0.8, 0.99)},
        ...           population=8, perturb_every=2)
        >>> len(pbt.propose([]))
        8
        >>> PBT(perturb_every=2, mutable=["lr"])  # a scheduler, for another search's models
        PBT(perturb_every=2, quantile=0.25, seed=0, mutable=['lr'], resample_probability=0.25)
    """

    def __init__(
        self,
        space: dict[str, Any] | None = None,
        population: int | None = None,
        perturb_every: int | None = None,
        quantile: float = 0.25,
        seed: int = 0,
        mutable: Iterable[str] | None = None,
        resample_probability: float = 0.25,
    ) -> None:
        self._own_space: dict[str, Dimension] | None = (
            None if space is None else normalize_space(space)
        )
        if population is not None and self._own_space is None:
            raise ConfigError(
                "space",
                None,
                "a search space when population is given",
                hint="PBT(space, population, perturb_every) proposes its population; "
                "PBT(perturb_every=...) is a scheduler for another search's models",
            )
        # A search proposes from its space; a scheduler given a space only perturbs within it.
        self.space = self._own_space if population is not None else None
        self.population: int | None = (
            None
            if population is None
            else check_int("population", population, minimum=2, hint="PBT copies between members")
        )
        self.num_models = self.population
        self.perturb_every: int = check_int(
            "perturb_every",
            perturb_every,
            minimum=1,
            unit="epochs",
            hint="" if perturb_every is not None else "how often the population is ranked",
        )
        if not is_number(quantile) or not 0.0 < float(quantile) <= 0.5:
            raise ConfigError("quantile", quantile, "a number in (0, 0.5]")
        self.quantile: float = float(quantile)
        self.seed: int = check_int("seed", seed)
        self._mutable_given: tuple[str, ...] | None = (
            None if mutable is None else tuple(_check_name_list("mutable", mutable))
        )
        self.mutable: tuple[str, ...] = ()
        if self._own_space is not None:
            self.mutable = self._mutable_of(self._own_space)
        self.resample_probability: float = _probability(resample_probability)
        self._configs: list[dict[str, Any]] = (
            []
            if self.space is None or self.population is None
            else RandomSearch(self.space, self.population, self.seed).configurations()
        )

    def _mutable_of(self, space: Mapping[str, Dimension]) -> tuple[str, ...]:
        names = _mutable_names(space, self._mutable_given, argument="mutable")
        return tuple(n for n in space if n in names)

    @property
    def proposes(self) -> bool:
        """True given a space and a population (a search); False otherwise (a scheduler)."""
        return self.population is not None

    def _population(self) -> int:
        if self.population is None:
            raise RuntimeError(
                f"{self!r} has no population: it is a scheduler and proposes nothing; pass it "
                "as Experiment(search=..., scheduler=PBT(...))"
            )
        return self.population

    def _explore_space(self) -> dict[str, Dimension]:
        """The space PBT perturbs within: its own, or the search's (known once attached)."""
        if self._own_space is not None:
            return self._own_space
        context = self.context
        if context is None or context.space is None:
            raise RuntimeError("PBT must be attached to an experiment first")
        return normalize_space(dict(context.space))

    def configurations(self) -> list[dict[str, Any]]:
        """The population's starting configurations, in order."""
        self._population()
        return [dict(c) for c in self._configs]

    def attach(self, context: SearchContext) -> None:
        if self.perturb_every >= context.max_epochs:
            raise ConfigError(
                "perturb_every",
                self.perturb_every,
                f"an integer < the experiment's epochs ({context.max_epochs})",
                hint="otherwise PBT never exploits and is plain random search",
            )
        if self._own_space is None:
            if context.space is None:
                raise ConfigError(
                    "scheduler",
                    self,
                    "a search with a space for PBT to perturb within",
                    hint="give PBT its own: PBT(space, perturb_every=...)",
                )
            self.mutable = self._mutable_of(normalize_space(dict(context.space)))
        super().attach(context)

    def propose(self, trials: Sequence[Trial]) -> list[dict[str, Any]]:
        self._population()
        return [dict(c) for c in self._configs[len(own_trials(trials)) :]]

    def is_finished(self, trials: Sequence[Trial]) -> bool:
        return len(own_trials(trials)) >= self._population()

    def decide(self, trial: Trial, trials: Sequence[Trial]) -> Decision:
        if self.context is None:
            raise RuntimeError("PBT must be attached to an experiment first")
        context = self.context
        done = trial.epochs_done
        if trial.origin is not Origin.SEARCH or done == 0 or done % self.perturb_every:
            return CONTINUE
        metric = context.metric
        own_value = trial.value(metric)
        worst = (math.inf, math.inf)  # a trial whose own latest metric is not finite ranks last
        entries = [(trial, own_value)] + [
            (t, v)
            for t in own_trials(trials)
            if t.model_id != trial.model_id
            and t.status in _RANKED_STATUSES
            and (v := t.value(metric)) is not None
        ]
        entries.sort(
            key=lambda tv: worst if tv[1] is None else (-context.score(tv[1]), tv[0].model_id)
        )
        n = len(entries)
        if n < 2:
            return CONTINUE
        k = max(1, math.floor(self.quantile * n + 1e-9))  # 1e-9: 0.3 * 10 is 3, not 2.99...
        rank = next(r for r, (t, _) in enumerate(entries, 1) if t.model_id == trial.model_id)
        where = f"epoch {done}"
        if rank <= n - k:
            return Decision(
                Action.CONTINUE, reason=f"{where}: rank {rank} of {n}, bottom {k} exploit"
            )
        rng = np.random.default_rng(derive_seed(self.seed, "pbt", trial.model_id, done))
        source, source_value = entries[int(rng.integers(k))]
        params = perturb(
            source.params, self._explore_space(), rng, self.mutable, self.resample_probability
        )
        shown = "not finite" if own_value is None else f"{own_value:.4g}"
        changed = [name for name in self.mutable if params.get(name) != source.params.get(name)]
        return Decision(
            Action.EXPLOIT,
            source=source.model_id,
            params=params,
            reason=(
                f"{where}: {metric} {shown}, rank {rank} of {n} (bottom {k}); copying model "
                f"{source.model_id} ({metric} {source_value:.4g}, top {k}), "
                f"perturbed {', '.join(changed) if changed else 'nothing'}"
            ),
        )

    def __repr__(self) -> str:
        if self.population is None:
            mutable = None if self._mutable_given is None else list(self._mutable_given)
            return (
                f"PBT(perturb_every={self.perturb_every}, quantile={self.quantile}, "
                f"seed={self.seed}, mutable={mutable}, "
                f"resample_probability={self.resample_probability})"
            )
        return (
            f"PBT(population={self.population}, perturb_every={self.perturb_every}, "
            f"quantile={self.quantile}, seed={self.seed}, mutable={list(self.mutable)}, "
            f"resample_probability={self.resample_probability})"
        )

    def fingerprint(self) -> str:
        if self._own_space is None:
            return repr(self)  # the space is the search's, in the search's fingerprint
        return f"{self!r}:space={space_digest(self._own_space, ordered=False)}"
