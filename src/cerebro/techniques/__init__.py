"""How a unit's models are trained or evaluated: one runner per technique.

The worker hands each :class:`~cerebro.backends.base.Unit` to the runner of its ``technique``.
A runner receives its members' states in the one per-model format (:mod:`cerebro.training`,
:mod:`cerebro.state`) and returns them in the same format, so nothing outside this package
knows how a group trains.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..kinds import _Named

if TYPE_CHECKING:
    from .base import Runner


class Technique(_Named):
    """The runners a unit may ask for."""

    PLAIN = "plain"  # one model, trained and evaluated as written
    FUSED = "fused"  # models of one shape, trained as one with stacked tensors
    MATERIALIZED = "materialized"  # models sharing a frozen prefix, trained on its output


def runner_for(technique: Technique) -> Runner:
    """The runner of a technique (imported here, on first use: backends import this package
    for :class:`Technique` alone, and the fused runner's imports are not needed without it)."""
    if Technique(technique) is Technique.FUSED:
        from .fused import FusedRunner

        return FusedRunner()
    if Technique(technique) is Technique.MATERIALIZED:
        from .materialized import MaterializedRunner

        return MaterializedRunner()
    from .plain import PlainRunner

    return PlainRunner()
