"""Turning a configuration into a model's initial training state, or into the reason it has none.

``build(params)`` is the user's code: it may raise, return something that is not a ModelSpec,
produce metrics other than the experiment's, or fail its first training step. In the first
proposals (``strict``) each of these is a ConfigError raised before anything is written; later
(a search's next proposal, a person's add or clone) the model is recorded as failed with the
reason, and the others go on.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import training
from ..data import Dataset
from ..errors import ConfigError, first_line
from ..spec import ModelSpec
from ..state import Counters
from ..techniques.fusable import Fusability, fusability
from ..techniques.prefix import chain
from .identity import Fingerprints
from .materializing import PrefixFacts, profile_prefix
from .preflight import Preflight, naming

_CPU = torch.device("cpu")


@dataclass(frozen=True)
class InitialState:
    """A built model's first training state, or why it could not be built (one is None);
    ``fusion``: whether it can train fused with others, when the experiment fuses models."""

    state: dict[str, Any] | None
    error: str | None
    fusion: Fusability | None = None
    prefix: PrefixFacts | None = None  # its frozen prefix, when the experiment materializes

    @classmethod
    def failed(cls, error: str) -> InitialState:
        return cls(None, error)


def metric_names(spec: ModelSpec, has_validation: bool) -> list[str]:
    """The metrics an experiment over ``spec`` records, e.g. train_loss, val_accuracy."""
    splits = ("train", "val") if has_validation else ("train",)
    return [f"{split}_{name}" for split in splits for name in spec.metric_names()]


def check_metric(metric: str, spec: ModelSpec, has_validation: bool) -> None:
    accepted = metric_names(spec, has_validation)
    if metric not in accepted:
        raise ConfigError("metric", metric, f"one of the metrics the spec produces: {accepted}")


class ModelBuilder:
    """Builds models of one experiment, checks each, and keeps their fingerprints.

    Args:
        build: the user's ``build(params) -> ModelSpec``.
        dataset: the experiment's dataset (the trial step runs on a few of its rows).
        metric: the experiment's metric (every spec must produce it).
        seed: the experiment's seed (model ``i`` is initialized from ``init_seed(seed, i)``).
        fusion: whether to tell, for each model, if it can train fused with others.
        materialize: whether to profile each model's frozen prefix for the feature planner.
    """

    def __init__(
        self,
        build: Callable[[dict[str, Any]], ModelSpec],
        dataset: Dataset,
        metric: str,
        seed: int,
        fusion: bool = False,
        materialize: bool = False,
    ) -> None:
        self.build = build
        self.fusion = fusion
        self.materialize = materialize
        self._profiles: dict[str, PrefixFacts] = {}  # by the prefix's last digest
        self.metric = metric
        self.seed = seed
        self.has_validation = any(n > 0 for n in dataset.shard_rows("val"))
        self.preflight = Preflight(dataset, build)
        self.fingerprints = Fingerprints()  # of every model built (the config keeps the first)

    def initial_state(self, model_id: int, params: dict[str, Any], strict: bool) -> InitialState:
        """Model ``model_id``'s state before its first hop (``strict``: raise ConfigError)."""
        seed = training.init_seed(self.seed, model_id)
        try:
            torch.manual_seed(seed)
            spec = self.build(dict(params))
        except ConfigError as e:  # ModelSpec refused a field: reported as the checks below are
            if strict:
                raise naming(e, params) from e
            return InitialState.failed(str(naming(e, params)))
        except Exception:
            return InitialState.failed(traceback.format_exc())
        try:
            training.check_is_spec(spec, self.build)
            check_metric(self.metric, spec, self.has_validation)
        except ConfigError as e:
            if strict:
                raise
            return InitialState.failed(str(e))
        self.fingerprints.add(model_id, params, spec)
        counters = Counters(version=0, epoch=0, init_seed=seed)
        state = training.capture_state(spec, counters.to_dict(), _CPU)
        try:
            self.preflight.check(spec, params)  # a trial step on copies, after the capture
        except ConfigError as e:
            # A head that does not fit its frozen prefix fails alone: the search space may
            # pair some cuts with heads of another width on purpose.
            if strict and not (spec.frozen is not None and e.argument == "ModelSpec.model"):
                raise
            return InitialState.failed(str(e))
        return InitialState(
            state,
            None,
            fusability(spec) if self.fusion else None,
            self._profile(spec) if self.materialize else None,
        )

    def prefix_facts(self, params: dict[str, Any]) -> PrefixFacts | None:
        """The frozen prefix of the model ``params`` builds, profiled (None: it has none, or
        materialization is off). For models whose state comes from elsewhere (a clone)."""
        if not self.materialize:
            return None
        try:
            return self._profile(training.build_spec(self.build, params, init_seed=None))
        except Exception:
            return None  # it fails where it trains, with its own error

    def _profile(self, spec: ModelSpec) -> PrefixFacts | None:
        if spec.frozen is None:
            return None
        digests = chain(spec.frozen)
        if digests[-1] not in self._profiles:
            self._profiles[digests[-1]] = profile_prefix(spec.frozen, self.preflight.sample().x)
        return self._profiles[digests[-1]]

    def fusability(self, params: dict[str, Any]) -> Fusability | None:
        """Whether the model ``params`` builds can train fused (None: fusion is off). For
        models whose state comes from elsewhere (a warm-started clone)."""
        if not self.fusion:
            return None
        try:
            return fusability(training.build_spec(self.build, params, init_seed=None))
        except Exception as e:
            return Fusability(None, f"building it again failed: {first_line(e)}", 0)

    def warm_started(
        self, params: dict[str, Any], source_state: dict[str, Any], counters: Counters
    ) -> dict[str, Any]:
        """A state that continues ``source_state`` under ``params`` (see
        :func:`cerebro.training.warm_start_state`); raises what building or loading raises."""
        return training.warm_start_state(self.build, params, source_state, counters.to_dict())
