"""Per-group model selection (``Experiment(per_group=True)``).

Every configuration the search proposes becomes one model per group of a grouped dataset
(:func:`cerebro.prepare_data` with ``group_by``). Each model trains and validates only on its
group's shards; MOP schedules all of them together (a model's eligible shards are its group's).

The search and the scheduler see one :class:`~cerebro.search.Trial` per configuration, whose
``model_id`` is the configuration's number (0, 1, ... in the order proposed), so random, grid,
TPE, ASHA, Hyperband and PBT work unchanged. Its metrics at an epoch are the **row-weighted
mean** over the configuration's group models that finished that epoch: a ``val_*`` metric
weighted by each group's validation rows, a ``train_*`` metric by its training rows; that is
the metric the configuration would report on the union of the groups' rows. The epoch appears
once every group model still training has finished it.

Decisions: with a scheduler (or a search that schedules itself), a group model that finishes an
epoch before its configuration's other group models waits (paused, saying why) until the last
one has finished it; the decision made for the configuration then applies to each of them (a
PBT exploit copies, per group, the source configuration's model of the same group). Without one,
models go on at once, with no wait. An ``early_stopping`` rule acts per group: it compares a
model with the other models of its group.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..data import Dataset
from ..data.groups import GroupName
from ..errors import ConfigError, check_bool
from ..kinds import Action, EventKind, ModelStatus
from ..search import Decision, Trial
from ..search.base import CONTINUE, Search

if TYPE_CHECKING:
    from .roster import ModelRun


@dataclass(frozen=True)
class GroupShards:
    """One group as the engine sees it: the shards its models visit and its rows per split."""

    name: GroupName
    train: frozenset[int]
    val: frozenset[int]  # its validation shards that hold rows
    train_rows: int
    val_rows: int


class PerGroup:
    """The groups of a dataset, and the one-trial-per-configuration view of their models.

    Example:
        >>> groups = PerGroup([GroupShards("a", frozenset({0}), frozenset({0}), 30, 10),
        ...                    GroupShards("b", frozenset({1}), frozenset(), 10, 0)])
        >>> groups.names, groups["b"].train
        (['a', 'b'], frozenset({1}))
        >>> weighted_mean([({"val_loss": 1.0, "train_loss": 2.0}, groups["a"]),
        ...                ({"train_loss": 4.0}, groups["b"])])
        {'val_loss': 1.0, 'train_loss': 2.5}
    """

    def __init__(self, groups: Sequence[GroupShards]) -> None:
        self.groups = {g.name: g for g in groups}
        self.names = [g.name for g in groups]
        self._pending: dict[int, Decision] = {}  # decisions made for waiting group models

    @classmethod
    def of(cls, dataset: Dataset) -> PerGroup:
        val_rows = dataset.shard_rows("val")
        return cls(
            [
                GroupShards(
                    g.name,
                    frozenset(g.shards),
                    frozenset(s for s in g.shards if val_rows[s] > 0),
                    g.train_rows,
                    g.val_rows,
                )
                for g in dataset.groups
            ]
        )

    def __getitem__(self, name: GroupName) -> GroupShards:
        return self.groups[name]

    # The search's view -------------------------------------------------------------------------

    def trials(self, models: Iterable[ModelRun], budget: Any) -> list[Trial]:
        """One trial per configuration, in configuration order (see the module's docstring)."""
        by_configuration: dict[int, list[ModelRun]] = {}
        for model in models:
            if model.configuration is not None:
                by_configuration.setdefault(model.configuration, []).append(model)
        return [
            self.trial(number, members, budget)
            for number, members in sorted(by_configuration.items())
        ]

    def trial(self, number: int, members: Sequence[ModelRun], budget: Any) -> Trial:
        first = members[0]
        return Trial(
            number,
            dict(first.params),
            configuration_status([m.status for m in members]),
            self.history(members),
            origin=first.origin,
            max_epochs=max(budget(m) for m in members),
        )

    def history(self, members: Sequence[ModelRun]) -> list[dict[str, float]]:
        """The configuration's epochs: row-weighted means over its group models (an epoch is
        there once every member that has not ended before it has finished it)."""
        epochs: list[dict[str, float]] = []
        for epoch in range(max(len(m.history) for m in members)):
            have = [m for m in members if len(m.history) > epoch]
            ended = [m for m in members if m.status.ended_early and len(m.history) <= epoch]
            if len(have) + len(ended) < len(members):
                break
            means = weighted_mean([(m.history[epoch], self[m.group]) for m in have])
            epochs.append({"epoch": epoch, **means})
        return epochs

    # Decisions ---------------------------------------------------------------------------------

    def decide(
        self,
        model: ModelRun,
        fresh: bool,
        models: Sequence[ModelRun],
        decider: Any,
        early_stopping: Any,
        budget: Any,
    ) -> Decision:
        """What a group model does after an epoch (or while paused): see the module."""
        if fresh and early_stopping is not None:
            mine = [m.trial(budget(m)) for m in models if m.group == model.group]
            reason = early_stopping.should_stop(model.trial(budget(model)), mine)
            if reason:
                return Decision(
                    Action.STOP,
                    reason=f"{type(early_stopping).__name__} in group {model.group!r}: {reason}",
                )
        if model.model_id in self._pending:
            return self._pending.pop(model.model_id)
        if isinstance(decider, Search) and not decider.schedules:
            return CONTINUE
        siblings = [m for m in models if m.configuration == model.configuration]
        behind = [m for m in siblings if m.status.is_live and len(m.history) < len(model.history)]
        if behind:
            shown = ", ".join(repr(m.group) for m in behind)
            return Decision(
                Action.PAUSE,
                reason=f"waiting for its configuration's models of groups {shown} to finish "
                f"epoch {len(model.history) - 1}",
            )
        trials = self.trials(models, budget)
        trial = next(t for t in trials if t.model_id == model.configuration)
        decision = decider.decide(trial, trials)
        waiting = [
            m
            for m in siblings
            if m is not model
            and m.status is ModelStatus.PAUSED
            and len(m.history) == len(model.history)
        ]
        for sibling in waiting:
            self._pending[sibling.model_id] = self._for(sibling, decision, models)
        return self._for(model, decision, models)

    def _for(self, model: ModelRun, decision: Decision, models: Sequence[ModelRun]) -> Decision:
        """A configuration's decision as one of its group models takes it: an exploit copies
        the source configuration's model of the same group."""
        if decision.action is not Action.EXPLOIT:
            return decision
        source = next(
            (m for m in models if m.configuration == decision.source and m.group == model.group),
            None,
        )
        if source is None:
            return CONTINUE
        return Decision(Action.EXPLOIT, decision.reason, source.model_id, decision.params)

    # Records -----------------------------------------------------------------------------------

    @staticmethod
    def event(model: ModelRun) -> dict[str, Any]:
        """The ``group_model`` event that records which group and configuration a model is."""
        return {"model": model.model_id, "group": model.group, "configuration": model.configuration}

    @staticmethod
    def recorded(events: Iterable[Mapping[str, Any]]) -> dict[int, tuple[GroupName, int | None]]:
        """Each model's group and configuration, from a run's ``group_model`` events."""
        found = {}
        for event in events:
            if event["kind"] == EventKind.GROUP_MODEL.value:
                detail = event["detail"]
                found[int(detail["model"])] = (detail["group"], detail.get("configuration"))
        return found


def weighted_mean(entries: Sequence[tuple[Mapping[str, float], GroupShards]]) -> dict[str, float]:
    """Each metric's mean over ``entries`` (a group's metrics and the group), weighted by the
    group's rows in the metric's split (``val_*``: validation rows, else training rows)."""
    totals: dict[str, tuple[float, int]] = {}
    for metrics, group in entries:
        for name, value in metrics.items():
            if name == "epoch":
                continue
            rows = group.val_rows if name.startswith("val_") else group.train_rows
            total, weight = totals.get(name, (0.0, 0))
            totals[name] = (total + float(value) * rows, weight + rows)
    return {name: total / weight for name, (total, weight) in totals.items() if weight}


def configuration_status(statuses: Sequence[ModelStatus]) -> ModelStatus:
    """A configuration's status from its group models': running or paused while any is,
    completed if any completed, failed only if all failed."""
    for status in (ModelStatus.RUNNING, ModelStatus.PAUSED, ModelStatus.COMPLETED):
        if status in statuses:
            return status
    if all(s is ModelStatus.FAILED for s in statuses):
        return ModelStatus.FAILED
    return ModelStatus.PRUNED if ModelStatus.PRUNED in statuses else ModelStatus.STOPPED


def per_group_option(per_group: Any, dataset: Dataset) -> bool:
    """``per_group=``: True needs a dataset prepared with ``group_by``."""
    check_bool("per_group", per_group)
    if per_group and dataset.group_by is None:
        raise ConfigError(
            "per_group",
            True,
            "False, or a dataset prepared with prepare_data(..., group_by=column)",
            hint=f"the dataset at {dataset.path!r} has no groups",
        )
    return bool(per_group)


__all__ = ["GroupShards", "PerGroup", "configuration_status", "per_group_option"]
