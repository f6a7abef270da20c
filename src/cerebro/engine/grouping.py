"""Which models hop together: model fusion's share of the engine.

With fusion on, models whose built specs are fusable (same structure, shapes, batch size, loss
and optimizer class: :func:`cerebro.techniques.fusable.fusability`) may train as one unit, a
*bundle*, when they are ready at the same point: same epoch, same phase, same shards left. The
fused runner gives each member the same sequential SGD it would do alone, so a bundle is a
matter of speed, not of results.

Deterministic mode fixes each epoch's shard order per model. Members of a bundle must visit the
same shards in the same order, so there each fusable model belongs to a *cohort*, fixed when it
is registered: the models of one registration (the first proposals, say) with the same fusion
key, cut in id order into near-equal cohorts of at most ``max_models``. A cohort's models share
the shard order of its first model (its *anchor*), whatever the timing and the number of
workers; only models of one cohort are bundled. A model without a cohort keeps its own order.

Example:
    >>> from cerebro.techniques.fusable import Fusability
    >>> grouping = Grouping(Fusion(max_models=2), deterministic=True)
    >>> same = Fusability(key="mlp", reason=None, nbytes=1000)
    >>> [c.models for c in grouping.enroll({0: same, 1: same, 2: same})]
    [(0, 1), (2,)]
    >>> grouping.anchor(1), grouping.anchor(2), grouping.anchor(7)
    (0, 2, 7)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ConfigError, check_int, check_number, check_options
from ..kinds import EventKind

if TYPE_CHECKING:
    from ..techniques.fusable import Fusability
    from .roster import ModelRun

_T = TypeVar("_T")


@dataclass(frozen=True)
class Fusion:
    """How models of one shape are fused into one unit (``Experiment(fusion=...)``).

    Args:
        max_models: the most models one fused unit trains.
        memory_mb: the most estimated training memory (weights, gradients, optimizer state,
            activations) of one fused unit; None: no limit beyond ``max_models``.

    Example:
        >>> import cerebro
        >>> cerebro.Fusion(max_models=16)
        Fusion(max_models=16, memory_mb=None)
        >>> cerebro.Fusion(max_models=0)
        Traceback (most recent call last):
        ...
        cerebro.errors.ConfigError: Fusion.max_models=0 is not accepted: expected an integer >= 1
    """

    max_models: int = 32
    memory_mb: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "max_models", check_int("Fusion.max_models", self.max_models, minimum=1)
        )
        if self.memory_mb is not None:
            memory = check_number("Fusion.memory_mb", self.memory_mb, minimum=0.0)
            if memory <= 0:
                raise ConfigError("Fusion.memory_mb", self.memory_mb, "a number > 0, or None")
            object.__setattr__(self, "memory_mb", memory)

    def most_members(self, nbytes: int) -> int:
        """How many models of ``nbytes`` each one unit may hold."""
        if self.memory_mb is None or nbytes <= 0:
            return self.max_models
        return max(1, min(self.max_models, int(self.memory_mb * 2**20 // nbytes)))


def fusion_option(value: Any) -> Fusion | None:
    """``Experiment(fusion=...)`` as options (None: off).

    >>> fusion_option(True), fusion_option(False)
    (Fusion(max_models=32, memory_mb=None), None)
    >>> fusion_option("yes")
    Traceback (most recent call last):
    ...
    cerebro.errors.ConfigError: fusion='yes' is not accepted: expected True, False or \
cerebro.Fusion(max_models=..., memory_mb=...)
    """
    return check_options(
        "fusion", value, Fusion, "True, False or cerebro.Fusion(max_models=..., memory_mb=...)"
    )


@dataclass(frozen=True)
class Cohort:
    """Fusable models registered together with one fusion key (``key`` is its digest)."""

    anchor: int
    models: tuple[int, ...]
    key: str
    nbytes: int

    def event(self) -> dict[str, Any]:
        return {"anchor": self.anchor, "models": list(self.models), "key": self.key,
                "nbytes": self.nbytes}  # fmt: skip


class Grouping:
    """Every model's fusion key and cohort, and the rule that bundles ready models.

    Args:
        fusion: the options (None: fusion is off and every unit holds one model).
        deterministic: bundle only models of one cohort (see the module's docstring).
    """

    def __init__(self, fusion: Fusion | None, deterministic: bool) -> None:
        self.fusion = fusion
        self.deterministic = deterministic
        self._keys: dict[int, str] = {}
        self._nbytes: dict[int, int] = {}
        self._anchors: dict[int, int] = {}

    @property
    def enabled(self) -> bool:
        return self.fusion is not None

    def enroll(self, fusable: Mapping[int, Fusability]) -> list[Cohort]:
        """Give the models registered together their cohorts (those with a key)."""
        if self.fusion is None:
            return []
        by_key: dict[str, list[int]] = {}
        for model_id in sorted(fusable):
            facts = fusable[model_id]
            if facts.key is not None:
                by_key.setdefault(_digest(facts.key), []).append(model_id)
                self._nbytes[model_id] = facts.nbytes
        cohorts = []
        for key, ids in by_key.items():
            nbytes = max(self._nbytes[i] for i in ids)
            size = self.fusion.most_members(nbytes)
            parts = math.ceil(len(ids) / size)
            for members in _split(ids, parts):
                cohorts.append(Cohort(members[0], tuple(members), key, nbytes))
        for cohort in cohorts:
            self._add(cohort)
        return sorted(cohorts, key=lambda c: c.anchor)

    def _add(self, cohort: Cohort) -> None:
        for model_id in cohort.models:
            self._keys[model_id] = cohort.key
            self._anchors[model_id] = cohort.anchor
            self._nbytes[model_id] = cohort.nbytes

    def rekey(self, model_id: int, facts: Fusability) -> dict[str, Any] | None:
        """A model's new fusability after its params changed (a PBT exploit); the event to
        record when its key changed, else None.

        It keeps its anchor, so in deterministic mode its shard order does not depend on whom
        it is fused with; it is bundled only with models of its new key.

        >>> from cerebro.techniques.fusable import Fusability
        >>> grouping = Grouping(Fusion(), deterministic=True)
        >>> _ = grouping.enroll({0: Fusability("a", None, 8), 1: Fusability("a", None, 8)})
        >>> grouping.rekey(1, Fusability("a", None, 8)) is None
        True
        >>> grouping.rekey(1, Fusability(None, "a custom layer", 0))
        {'model': 1, 'key': None, 'nbytes': 0}
        >>> grouping.fusable(1), grouping.anchor(1)
        (False, 0)
        """
        key = None if facts.key is None else _digest(facts.key)
        if key == self._keys.get(model_id):
            return None
        self._set_key(model_id, key, facts.nbytes)
        return {"model": model_id, "key": key, "nbytes": facts.nbytes}

    def _set_key(self, model_id: int, key: str | None, nbytes: int) -> None:
        if key is None:
            self._keys.pop(model_id, None)
        else:
            self._keys[model_id] = key
            self._nbytes[model_id] = nbytes

    def restore(self, events: Sequence[Mapping[str, Any]]) -> None:
        """The cohorts and key changes a run recorded (its ``fusion_cohort`` and ``fusion_key``
        events, in order), after a restart."""
        for event in events:
            if event["kind"] == EventKind.FUSION_KEY.value:
                detail = event["detail"]
                self._set_key(int(detail["model"]), detail["key"], int(detail["nbytes"]))
            if event["kind"] == EventKind.FUSION_COHORT.value:
                detail = event["detail"]
                self._add(
                    Cohort(
                        int(detail["anchor"]),
                        tuple(int(i) for i in detail["models"]),
                        str(detail["key"]),
                        int(detail.get("nbytes", 0)),
                    )
                )

    def anchor(self, model_id: int) -> int:
        """The model whose shard order ``model_id`` follows in deterministic mode."""
        return self._anchors.get(model_id, model_id)

    def fusable(self, model_id: int) -> bool:
        return model_id in self._keys

    def bundles(self, ready: Sequence[ModelRun], idle_workers: int) -> list[list[ModelRun]]:
        """Ready models (running, idle, with shards left) cut into the units they run as.

        Models at the same point with the same key (and cohort, in deterministic mode) go
        together, at most as many as the options allow. In free mode a set of them is split
        further so that every idle worker can take a part: fusing beyond that would leave
        workers idle for speed a single worker cannot give back.
        """
        if self.fusion is None:
            return [[m] for m in ready]
        together: dict[tuple[Any, ...], list[ModelRun]] = {}
        alone: list[list[ModelRun]] = []
        for model in sorted(ready, key=lambda m: m.model_id):
            if model.model_id not in self._keys:
                alone.append([model])
                continue
            point = (
                self._keys[model.model_id],
                self.anchor(model.model_id) if self.deterministic else None,
                model.epoch,
                model.phase,
                tuple(model.remaining),
            )
            together.setdefault(point, []).append(model)
        bundles = alone
        for models in together.values():
            size = self.fusion.most_members(max(self._nbytes.get(m.model_id, 0) for m in models))
            parts = math.ceil(len(models) / size)
            if not self.deterministic:  # a cohort's parts would only queue for the same shard
                parts = max(parts, min(idle_workers, len(models)))
            bundles += _split(models, parts)
        return sorted(bundles, key=lambda b: b[0].model_id)


def _split(items: list[_T], parts: int) -> list[list[_T]]:
    """``items`` cut into ``parts`` runs of near-equal length, the longer ones first.

    >>> _split([0, 1, 2, 3, 4], 2)
    [[0, 1, 2], [3, 4]]
    """
    bounds = [-(-p * len(items) // parts) for p in range(parts + 1)]  # ceilings
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]
