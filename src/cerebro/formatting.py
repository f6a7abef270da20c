"""How numbers are shown to people: one format for metrics wherever they appear (the live
progress line, the leaderboard, ``cerebro models``, a Result's repr), so that the same value
always reads the same."""

from __future__ import annotations

import math


def format_metric(value: object) -> str:
    """A metric to 4 significant digits; ``-`` when there is none.

    Example:
        >>> format_metric(0.988888), format_metric(None), format_metric(12.3456)
        ('0.9889', '-', '12.35')
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_params(params: dict) -> str:
    """``{"lr": 0.0241226, "arch": "cnn"}`` -> ``"lr=0.0241 arch=cnn"`` (3 significant digits).

    Example:
        >>> format_params({"lr": 0.0241226, "arch": "cnn"})
        'lr=0.0241 arch=cnn'
    """
    return " ".join(f"{k}={f'{v:.3g}' if isinstance(v, float) else v}" for k, v in params.items())
