"""Which frozen-prefix outputs an experiment keeps: feature materialization's share of the engine.

With ``Experiment(materialize=...)``, every model whose spec has a frozen prefix trains on the
prefix's output instead of running the prefix on every batch (see
:mod:`cerebro.techniques.materialized`). Keeping the output of a depth costs storage (its bytes
per row times the dataset's rows) and saves, for every configuration that reads it, that depth's
layers on every row of every epoch. Under a storage budget the choice of depths to keep is a
small MILP (SciPy's HiGHS): minimize estimated compute, each model reading from one kept depth
of its own chain (or from the raw rows), subject to the budget. Costs per layer are profiled
once per distinct prefix on a few rows.

The plan only decides speed: features are the same bits whichever depth they are computed from
(fixed chunks of rows), so results do not depend on the budget.

Example:
    >>> planner = FeaturePlanner(Materialize(budget_mb=None), rows=1000, epochs=5, folder="f")
    >>> facts = PrefixFacts(chain=("a", "ab"), row_bytes=(400, 40), row_seconds=(1e-5, 1e-6))
    >>> planner.enroll({0: facts, 1: facts})["kept"]
    ['ab']
    >>> planner.plan(0).kept
    (2,)
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, check_number, check_options
from ..kinds import EventKind
from ..techniques.features import FeaturePlan
from ..techniques.prefix import chain, layers_of


@dataclass(frozen=True)
class Materialize:
    """Keep frozen prefixes' outputs and train on them (``Experiment(materialize=...)``).

    Args:
        budget_mb: the most storage kept features may take, all depths and shards together
            (None: no limit; 0: keep nothing, and configurations that share a prefix train in
            one unit that runs the prefix once for all of them).
        memory_mb: kept features a worker holds in memory; beyond it they are read back from
            their files.
        folder: where kept features are written (None: ``features/`` in the experiment's
            path). Features are named by prefix and shard content, so experiments that share a
            folder share them: a second experiment over the same backbone and data, or over a
            grown dataset's old shards, computes nothing again.

    Example:
        >>> import cerebro
        >>> cerebro.Materialize(budget_mb=512)
        Materialize(budget_mb=512.0, memory_mb=1024.0, folder=None)
        >>> cerebro.Materialize(budget_mb=-1)
        Traceback (most recent call last):
        ...
        cerebro.errors.ConfigError: Materialize.budget_mb=-1 is not accepted: expected a number \
>= 0 (megabytes), or None for no limit
    """

    budget_mb: float | None = None
    memory_mb: float = 1024.0
    folder: str | None = None

    def __post_init__(self) -> None:
        if self.budget_mb is not None:
            try:
                budget = check_number("Materialize.budget_mb", self.budget_mb, minimum=0.0)
            except ConfigError:
                raise ConfigError(
                    "Materialize.budget_mb", self.budget_mb,
                    "a number >= 0 (megabytes), or None for no limit",
                ) from None  # fmt: skip
            object.__setattr__(self, "budget_mb", budget)
        memory = check_number("Materialize.memory_mb", self.memory_mb, minimum=0.0)
        object.__setattr__(self, "memory_mb", memory)
        if self.folder is not None:
            if not isinstance(self.folder, (str, os.PathLike)):
                raise ConfigError("Materialize.folder", self.folder, "a local folder, or None")
            object.__setattr__(self, "folder", os.path.abspath(os.fspath(self.folder)))

    @property
    def budget_bytes(self) -> float | None:
        return None if self.budget_mb is None else self.budget_mb * 2**20


def materialize_option(value: Any) -> Materialize | None:
    """``Experiment(materialize=...)`` as options (None: off).

    >>> materialize_option(True), materialize_option(False)
    (Materialize(budget_mb=None, memory_mb=1024.0, folder=None), None)
    >>> materialize_option(100)
    Traceback (most recent call last):
    ...
    cerebro.errors.ConfigError: materialize=100 is not accepted: expected True, False or \
cerebro.Materialize(budget_mb=..., memory_mb=...)
    """
    return check_options(
        "materialize",
        value,
        Materialize,
        "True, False or cerebro.Materialize(budget_mb=..., memory_mb=...)",
    )


@dataclass(frozen=True)
class PrefixFacts:
    """A model's frozen prefix as the planner sees it: its chain (one digest per depth), the
    bytes of one row's output at each depth, and each depth's layer cost per row (seconds)."""

    chain: tuple[str, ...]
    row_bytes: tuple[int, ...]
    row_seconds: tuple[float, ...]

    def event(self) -> dict[str, Any]:
        return {"chain": list(self.chain), "row_bytes": list(self.row_bytes),
                "row_seconds": list(self.row_seconds)}  # fmt: skip

    @classmethod
    def from_event(cls, detail: Mapping[str, Any]) -> PrefixFacts:
        return cls(
            tuple(str(d) for d in detail["chain"]),
            tuple(int(b) for b in detail["row_bytes"]),
            tuple(float(s) for s in detail["row_seconds"]),
        )


def profile_prefix(frozen: torch.nn.Module, rows: torch.Tensor) -> PrefixFacts:
    """Measure ``frozen``'s layers on ``rows`` (a few of the dataset's inputs): each depth's
    output size and time per row (the faster of two passes, after a warm-up)."""
    layers = layers_of(frozen)
    for layer in layers:
        layer.eval()
    sizes, seconds = [], []
    x = rows
    with torch.no_grad():
        for layer in layers:
            layer(x)  # warm-up
            best = float("inf")
            for _ in range(2):
                began = time.perf_counter()
                out = layer(x)
                best = min(best, time.perf_counter() - began)
            n = max(len(x), 1)
            sizes.append(int(out.element_size() * out.nelement() // n))
            seconds.append(best / n)
            x = out
    return PrefixFacts(chain(frozen), tuple(sizes), tuple(seconds))


class FeaturePlanner:
    """Every prefixed model's chain, the depths kept, and each model's :class:`FeaturePlan`.

    Args:
        options: the experiment's :class:`Materialize`.
        rows: rows of the dataset, both splits (a kept depth stores this many rows).
        epochs: epochs a model trains (what a kept depth saves is per epoch).
        folder: where workers write kept features.
    """

    def __init__(self, options: Materialize, rows: int, epochs: int, folder: str) -> None:
        self.options = options
        self.rows = rows
        self.epochs = epochs
        self.folder = folder
        self._facts: dict[int, PrefixFacts] = {}
        self.kept: set[str] = set()

    def has(self, model_id: int) -> bool:
        return model_id in self._facts

    def facts(self, model_id: int) -> PrefixFacts:
        return self._facts[model_id]

    def reads_kept(self, model_id: int) -> bool:
        """Whether the model's own depth is kept (it then computes nothing of its prefix)."""
        facts = self._facts[model_id]
        return facts.chain[-1] in self.kept

    def plan(self, model_id: int) -> FeaturePlan:
        facts = self._facts[model_id]
        kept = tuple(d + 1 for d, digest in enumerate(facts.chain) if digest in self.kept)
        return FeaturePlan(facts.chain, kept, self.folder, self.options.memory_mb)

    def changes(self, model_id: int, facts: PrefixFacts | None) -> bool:
        """Whether ``facts`` (None: no prefix) differ from what the planner has of the model."""
        return self._facts.get(model_id) != facts

    def enroll(self, facts: Mapping[int, PrefixFacts | None]) -> dict[str, Any]:
        """Add models (None: a model that no longer has a prefix, after a PBT exploit) and plan
        again over every model known; the event to record (kept depths already chosen stay
        kept: their features may be written already)."""
        for model_id, fact in facts.items():
            self._set(model_id, fact)
        self.kept |= set(self._solve())
        return {
            "models": {str(i): None if f is None else f.event() for i, f in sorted(facts.items())},
            "kept": sorted(self.kept),
        }

    def _set(self, model_id: int, facts: PrefixFacts | None) -> None:
        if facts is None:
            self._facts.pop(model_id, None)
        else:
            self._facts[model_id] = facts

    def restore(self, events: Sequence[Mapping[str, Any]]) -> None:
        """The plans a run recorded (its ``feature_plan`` events), after a restart."""
        for event in events:
            if event["kind"] == EventKind.FEATURE_PLAN.value:
                detail = event["detail"]
                for model_id, fact in detail["models"].items():
                    self._set(int(model_id), None if fact is None else PrefixFacts.from_event(fact))
                self.kept |= set(detail["kept"])

    def stored_bytes(self, digests: set[str]) -> float:
        sizes = self._sizes()
        return sum(sizes[d] for d in digests) * self.rows

    def _sizes(self) -> dict[str, int]:
        return {d: f.row_bytes[i] for f in self._facts.values() for i, d in enumerate(f.chain)}

    def _solve(self) -> list[str]:
        """The depths to keep: a MILP over every known model's chain (see the module)."""
        from scipy.optimize import Bounds, LinearConstraint, milp

        budget = self.options.budget_bytes
        if not self._facts or (budget is not None and budget <= 0):
            return []
        sizes = self._sizes()
        nodes = sorted(sizes)
        index = {d: i for i, d in enumerate(nodes)}
        # The one-off cost of keeping a depth: its own layer over every row (it is computed from
        # the depth below, when that is kept too; at most one epoch's prefix otherwise). A byte
        # costs a little, so that of equal plans the smaller one is kept.
        own = {}
        for f in self._facts.values():
            for i, d in enumerate(f.chain):
                own[d] = f.row_seconds[i]
        choices = []  # (model, depth read from: 0 raw), as variables after the nodes
        cost = [self.rows * own[d] + 1e-15 * sizes[d] * self.rows for d in nodes]
        for model_id, f in sorted(self._facts.items()):
            for depth in range(len(f.chain) + 1):
                choices.append((model_id, depth))
                # One measurement per depth (``own``), the same one the keeping cost uses: two
                # models' timings of a shared layer differ by noise, which would flip near-ties.
                cost.append(self.epochs * self.rows * sum(own[d] for d in f.chain[depth:]))
        n = len(nodes) + len(choices)
        rows: list[np.ndarray] = []
        lower: list[float] = []
        upper: list[float] = []
        for model_id in sorted(self._facts):  # each model reads from exactly one depth
            row = np.zeros(n)
            for j, (m, _) in enumerate(choices):
                if m == model_id:
                    row[len(nodes) + j] = 1
            rows.append(row)
            lower.append(1)
            upper.append(1)
        for j, (m, depth) in enumerate(choices):  # ... and only from a kept one
            if depth == 0:
                continue
            row = np.zeros(n)
            row[len(nodes) + j] = 1
            row[index[self._facts[m].chain[depth - 1]]] = -1
            rows.append(row)
            lower.append(-np.inf)
            upper.append(0)
        if budget is not None:
            row = np.zeros(n)
            for d in nodes:
                row[index[d]] = sizes[d] * self.rows
            rows.append(row)
            lower.append(-np.inf)
            upper.append(budget)
        low = np.zeros(n)
        for d in self.kept:  # kept before: stays kept (and counts against the budget)
            if d in index:
                low[index[d]] = 1
        result = milp(
            c=np.array(cost),
            constraints=LinearConstraint(np.array(rows), lower, upper),
            integrality=np.ones(n),
            bounds=Bounds(low, np.ones(n)),
        )
        if result.x is None:  # infeasible: what is kept already exceeds a budget
            return []
        return [d for d in nodes if result.x[index[d]] > 0.5]
