"""What a materialized unit carries and reports: the plan of its members' features, and each
kept depth a worker computed (plain dataclasses: backends and records import them without
torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeaturePlan:
    """What a unit's members read: their prefix ``chain`` (one digest per depth), the depths of
    it whose outputs are kept (``kept``, 1-based), where kept outputs are written, and how much
    of them a worker keeps in memory."""

    chain: tuple[str, ...]
    kept: tuple[int, ...]
    folder: str
    memory_mb: float


@dataclass(frozen=True)
class Materialization:
    """One kept depth of a prefix computed for one shard of one split (the records keep each)."""

    features: str  # the chain's digest at ``depth``: what the features are of
    depth: int
    split: str
    shard: int
    shard_digest: str
    rows: int
    nbytes: int
    seconds: float
