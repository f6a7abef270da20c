"""Reading a model's recorded epochs: one home for the metric readers every part uses.

A history is a list of one dict per finished epoch, ``{"epoch": e, "val_loss": ..., ...}``.

Example:
    >>> history = [{"epoch": 0, "val_loss": 0.5}, {"epoch": 1, "val_loss": float("nan")},
    ...            {"epoch": 2, "val_loss": 0.4}]
    >>> last_metrics(history), best_epoch(history, "val_loss", "min")
    ({'val_loss': 0.4}, 2)
    >>> metric_after(history, "val_loss", 2) is None   # the 2nd epoch's value is not finite
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .errors import is_number


def as_finite(value: Any) -> float | None:
    """``value`` as a float if it is a finite number (a string of one too), else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def ranking_key(mode: str) -> Callable[[float], float]:
    """Sort key under which the best value of a metric comes first (``mode`` "min"/"max")."""
    return (lambda value: -value) if mode == "max" else (lambda value: value)


def last_metrics(history: list[dict[str, float]]) -> dict[str, float]:
    """The metrics of a model's last recorded epoch (without the epoch number)."""
    if not history:
        return {}
    return {k: v for k, v in history[-1].items() if k != "epoch"}


def metric_after(history: list[dict[str, float]], metric: str, epochs: int) -> float | None:
    """The metric recorded for the ``epochs``-th finished epoch (1-based); None if there is no
    such epoch or its value is missing or not finite."""
    if epochs < 1 or epochs > len(history):
        return None
    return as_finite(history[epochs - 1].get(metric))


def best_epoch(history: list[dict[str, float]], metric: str, mode: str) -> int | None:
    """The epoch with the best finite value of ``metric`` (the first of equal ones)."""
    scored = [h for h in history if is_number(h.get(metric))]
    if not scored:
        return None
    rank = ranking_key(mode)
    return int(min(scored, key=lambda h: rank(h[metric]))["epoch"])
