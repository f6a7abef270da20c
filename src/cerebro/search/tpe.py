"""TPE search: Optuna's Tree-structured Parzen Estimator, driven from Cerebro's records.

The search keeps no state between calls. Each :meth:`TPESearch.propose` rebuilds an in-memory
Optuna study from the trials it is given (completed ones with their final metric, pruned and
stopped ones with their per-epoch metrics, running and paused ones as ``RUNNING`` so that the
constant-liar strategy steers new proposals away from them) and asks it for new configurations.
A resumed experiment therefore proposes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from ..errors import ConfigError, check_int
from ..history import as_finite
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
    FAILED,
    PAUSED,
    PRUNED,
    RUNNING,
    STOPPED,
    Search,
    SearchContext,
    Trial,
    own_trials,
)

_OPTUNA_CHOICE_TYPES = (type(None), bool, int, float, str)


class TPESearch(Search):
    """Propose ``num_models`` configurations with Optuna's TPE sampler (``TPESampler``).

    Args:
        space: the search space (``cerebro.choice``, ``uniform``, ``loguniform``, ``randint``,
            ``quniform`` dimensions or constants). ``choice`` values must be None, bool, int,
            float or str (what Optuna can handle).
        num_models: how many configurations this search proposes in all. Models a person adds
            or clones do not count, but their results are used.
        seed: seeds the sampler (together with the number of trials so far).
        parallelism: how many of this search's models are kept in flight (running or paused) at
            once. Default: ``max(num_shards, num_workers)`` of the experiment. A value below
            ``num_shards`` is raised to ``num_shards``, so that model hopping always has a model
            for every shard. A lower parallelism lets TPE learn from more results per proposal;
            a higher one keeps more workers busy. Under a scheduler that pauses models (ASHA,
            Hyperband: ``SearchContext.scheduler_pauses``), only running models count: a paused
            one waits for results that only new models can bring.
        n_startup_trials: how many finished (completed or pruned) trials the study needs before
            TPE replaces random sampling. Default: ``min(10, max(3, num_models // 4))``.

    The objective is the experiment's ``metric`` (minimized or maximized by its ``mode``): a
    completed model's value is its last epoch's metric; pruned and stopped models are told as
    Optuna ``PRUNED`` trials with their per-epoch metrics; failed ones as ``FAIL``; running and
    paused ones as ``RUNNING`` (the constant liar keeps new proposals away from them). Trials whose
    parameters fall outside ``space`` (e.g. models added by hand) are left out.

    ``quniform(low, high, q)`` is sampled as an integer multiplier ``k`` (Optuna's
    ``IntDistribution``) and returned as ``k * q``, so that values are multiples of ``q`` inside
    ``[low, high]`` without float drift; TPE treats it as it would ``FloatDistribution(step=q)``.

    Example:
        >>> import cerebro
        >>> from cerebro.search.base import SearchContext
        >>> from cerebro.search.tpe import TPESearch
        >>> search = TPESearch({"lr": cerebro.loguniform(1e-4, 1e-1)}, num_models=20, seed=1)
        >>> search.attach(SearchContext("val_loss", "min", max_epochs=5, num_shards=4,
        ...                             num_workers=2))
        >>> configs = search.propose([])
        >>> len(configs), all(1e-4 <= c["lr"] <= 1e-1 for c in configs)
        (4, True)
    """

    def __init__(
        self,
        space: dict[str, Any],
        num_models: int,
        seed: int = 0,
        parallelism: int | None = None,
        n_startup_trials: int | None = None,
    ) -> None:
        self.space: dict[str, Dimension] = normalize_space(space)
        self.num_models: int = check_int("num_models", num_models, minimum=1)
        self.seed: int = check_int("seed", seed)
        self.parallelism: int | None = check_int(
            "parallelism",
            parallelism,
            minimum=1,
            hint="None (the default) is max(num_shards, num_workers)",
            allow_none=True,
        )
        startup = check_int(
            "n_startup_trials",
            n_startup_trials,
            minimum=1,
            hint="None (the default) is min(10, max(3, num_models // 4))",
            allow_none=True,
        )
        self.n_startup_trials: int = (
            min(10, max(3, self.num_models // 4)) if startup is None else startup
        )
        # Optuna distributions in a fixed (sorted) order, so that the dict order of the space
        # does not change what is sampled.
        self._dims = {name: self.space[name] for name in sorted(self.space)}
        self._multiples = {
            name: _multiples(dim) for name, dim in self._dims.items() if isinstance(dim, QUniform)
        }
        self._distributions = {name: _distribution(name, dim) for name, dim in self._dims.items()}

    # -- the Search interface ---------------------------------------------------------------

    def effective_parallelism(self) -> int:
        """How many of this search's models it keeps in flight (needs :meth:`attach`)."""
        context = self._require_context()
        if self.parallelism is None:
            return max(context.num_shards, context.num_workers, 1)
        return max(self.parallelism, context.num_shards)

    def propose(self, trials: Sequence[Trial]) -> list[dict[str, Any]]:
        """New configurations to start: enough to bring this search's models in flight up to
        the parallelism, never past ``num_models`` in all. A pure function of ``trials``."""
        context = self._require_context()
        own = own_trials(trials)
        flying = (RUNNING,) if context.scheduler_pauses else (RUNNING, PAUSED)
        in_flight = sum(t.status in flying for t in own)
        count = max(0, min(self.effective_parallelism() - in_flight, self.num_models - len(own)))
        if count == 0:
            return []
        ordered = sorted(trials, key=lambda t: t.model_id)
        sampler_seed = derive_seed(self.seed, "tpe", len(own), len(trials)) % 2**32
        with _quiet_optuna():
            sampler = optuna.samplers.TPESampler(
                seed=sampler_seed,
                n_startup_trials=self.n_startup_trials,
                constant_liar=True,
            )
            study = optuna.create_study(
                direction="maximize" if context.mode == "max" else "minimize",
                sampler=sampler,
            )
            study.add_trials(
                frozen
                for frozen in (self._to_optuna(t, context.metric) for t in ordered)
                if frozen is not None
            )
            configs = []
            for _ in range(count):
                # Each asked trial stays RUNNING, so the constant liar spreads the next ones.
                asked = study.ask(fixed_distributions=self._distributions)
                configs.append(self._from_optuna(asked.params))
        return configs

    def is_finished(self, trials: Sequence[Trial]) -> bool:
        return len(own_trials(trials)) >= self.num_models

    def fingerprint(self) -> str:
        return repr(self)

    def __repr__(self) -> str:
        return (
            f"TPESearch(num_models={self.num_models}, seed={self.seed}, "
            f"parallelism={self.parallelism}, n_startup_trials={self.n_startup_trials}, "
            f"space={self._space_hash()})"
        )

    # -- helpers ----------------------------------------------------------------------------

    def _require_context(self) -> SearchContext:
        if self.context is None:
            raise RuntimeError(
                "TPESearch.propose needs the experiment's metric, mode and shards: call "
                "search.attach(SearchContext(...)) first (the driver does this before the run)"
            )
        return self.context

    def _space_hash(self) -> str:
        return space_digest(self._dims, ordered=True)  # its draws follow the space's order

    def _to_optuna(self, trial: Trial, metric: str) -> optuna.trial.FrozenTrial | None:
        """``trial`` as an Optuna trial, or None if it tells nothing (or is outside the space)."""
        params = self._optuna_params(trial.params)
        if params is None:
            return None
        kwargs: dict[str, Any] = {"params": params, "distributions": self._distributions}
        if trial.status == COMPLETED:
            value = trial.value(metric)
            if value is None:
                return optuna.trial.create_trial(state=TrialState.FAIL, **kwargs)
            return optuna.trial.create_trial(state=TrialState.COMPLETE, value=value, **kwargs)
        if trial.status in (PRUNED, STOPPED):
            if not trial.history:
                return None
            steps = {}
            for i, entry in enumerate(trial.history):
                value = as_finite(entry.get(metric))
                if value is not None:
                    steps[int(entry.get("epoch", i))] = value
            if not steps:
                return optuna.trial.create_trial(state=TrialState.FAIL, **kwargs)
            return optuna.trial.create_trial(
                state=TrialState.PRUNED, intermediate_values=steps, **kwargs
            )
        if trial.status == FAILED:
            return optuna.trial.create_trial(state=TrialState.FAIL, **kwargs)
        if trial.status in (RUNNING, PAUSED):
            return optuna.trial.create_trial(state=TrialState.RUNNING, **kwargs)
        return None

    def _optuna_params(self, params: dict[str, Any]) -> dict[str, Any] | None:
        """Cerebro params in Optuna's terms, or None if any is missing or outside the space."""
        result = {}
        for name, dim in self._dims.items():
            if name not in params:
                return None
            value = params[name]
            try:
                inside = bool(dim.contains(value))
            except Exception:  # an odd value (e.g. an array): not in the space
                inside = False
            if not inside:
                return None
            if isinstance(dim, Choice):
                distribution = self._distributions[name]
                # _distribution() makes a CategoricalDistribution for every Choice.
                assert isinstance(distribution, CategoricalDistribution)
                choices = distribution.choices
                match = [c for c in choices if _same_choice(_plain(value), c)]
                if not match:
                    return None
                result[name] = match[0]
            elif isinstance(dim, QUniform):
                multiple = round(float(value) / dim.q)
                first, stop = self._multiples[name]
                if not first <= multiple < stop:
                    return None
                result[name] = multiple
            elif isinstance(dim, RandInt):
                result[name] = int(value)
            else:
                result[name] = float(value)
        return result

    def _from_optuna(self, params: dict[str, Any]) -> dict[str, Any]:
        """Optuna's sampled params as plain Python values of the space, in the space's order."""
        result = {}
        for name in self.space:
            dim, value = self._dims[name], params[name]
            if isinstance(dim, Choice):
                result[name] = value
            elif isinstance(dim, QUniform):
                result[name] = _quniform_value(dim, int(value))
            elif isinstance(dim, RandInt):
                result[name] = min(max(int(value), dim.low), dim.high)
            else:
                # _distribution() refused every other kind of dimension in __init__.
                assert isinstance(dim, (Uniform, LogUniform))
                result[name] = min(max(float(value), dim.low), dim.high)
        return result


def _distribution(name: str, dim: Dimension) -> BaseDistribution:
    if isinstance(dim, Choice):
        choices = tuple(_plain(v) for v in dim.values)
        if not all(isinstance(c, _OPTUNA_CHOICE_TYPES) for c in choices):
            raise ConfigError(
                f"space[{name!r}]",
                dim.values,
                "a choice of None, bool, int, float or str values for TPESearch",
                hint="Optuna's TPE cannot handle other values; choose among their names or "
                "indices and map them in the model function, or use RandomSearch",
            )
        return CategoricalDistribution(choices)
    if isinstance(dim, RandInt):
        return IntDistribution(int(dim.low), int(dim.high))
    if isinstance(dim, QUniform):
        first, stop = _multiples(dim)
        if first >= stop:
            raise ConfigError(
                f"space[{name!r}]",
                dim,
                "a quniform(low, high, q) with a multiple of q inside [low, high] for TPESearch",
            )
        return IntDistribution(first, stop - 1)
    if isinstance(dim, LogUniform):
        return FloatDistribution(float(dim.low), float(dim.high), log=True)
    if isinstance(dim, Uniform):
        return FloatDistribution(float(dim.low), float(dim.high))
    raise ConfigError(
        f"space[{name!r}]",
        dim,
        "a choice, uniform, loguniform, randint or quniform dimension for TPESearch",
    )


def _multiples(dim: QUniform) -> tuple[int, int]:
    """``(first, stop)``: the multipliers k with ``k * q`` in the dimension are first..stop-1."""
    first = math.ceil(dim.low / dim.q - 1e-9)
    last = math.floor(dim.high / dim.q + 1e-9)
    while first <= last and not dim.contains(_quniform_value(dim, first)):
        first += 1
    while last >= first and not dim.contains(_quniform_value(dim, last)):
        last -= 1
    return first, last + 1


def _quniform_value(dim: QUniform, multiple: int) -> float:
    # Rounded like QUniform.sample, so that values print and compare cleanly.
    return float(round(multiple * dim.q, 12))


def _plain(value: Any) -> Any:
    """A NumPy scalar as the equivalent Python value (other values unchanged)."""
    return value.item() if isinstance(value, np.generic) else value


def _same_choice(value: Any, choice: Any) -> bool:
    if type(value) is bool or type(choice) is bool:  # keep True and 1 apart
        return type(value) is type(choice) and value == choice
    return bool(value == choice)


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Silence Optuna's INFO logs (study created, ...) and warnings, restoring them after."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)
