"""The bookkeeping a model's training state carries: its counters and the hops of its epoch.

A state file (see :mod:`cerebro.training`) holds the weights, optimizer, scheduler and RNG state,
and ``"counters"``: a plain dict, so that state files written by any version of Cerebro stay
readable. These dataclasses are how code reads and writes that dict.

Example:
    >>> hop = HopRecord(shard=2, rows=100, sums={"loss": 42.0}, worker=1, start=0.0, end=0.5)
    >>> counters = Counters(version=3, epoch=1, init_seed=7).after_hop(hop)
    >>> counters.version, counters.visited, Counters.from_dict(counters.to_dict()) == counters
    (4, [2], True)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class HopRecord:
    """What one unit measured for one model on one shard.

    ``sums`` are row-weighted sums (a metric's mean is ``sums[name] / rows``); ``start``/``end``
    bound the computation (wall clock, seconds) and ``load_s`` is the time spent before it
    bringing the model's state in. ``unit`` is the id of the unit that ran it (None in state
    files written before units had ids in the records).
    """

    shard: int
    rows: int
    sums: dict[str, float]
    worker: int
    start: float
    end: float
    load_s: float = 0.0
    unit: int | None = None

    def means(self) -> dict[str, float]:
        """Each metric's mean over the hop's rows (empty for a hop of no rows)."""
        return {k: v / self.rows for k, v in self.sums.items()} if self.rows else {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "rows": self.rows,
            "sums": dict(self.sums),
            "worker": self.worker,
            "start": self.start,
            "end": self.end,
            "load_s": self.load_s,
            "unit": self.unit,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HopRecord:
        return cls(
            shard=int(data["shard"]),
            rows=int(data["rows"]),
            sums=dict(data["sums"]),
            worker=int(data["worker"]),
            start=float(data["start"]),
            end=float(data["end"]),
            load_s=float(data.get("load_s", 0.0)),
            unit=data.get("unit"),
        )


@dataclass(frozen=True)
class Counters:
    """A training state's progress.

    Attributes:
        version: how many training hops (and exploits) produced this state; 0 for the initial one.
        epoch: the epoch its hops belong to (the last one trained, or 0).
        init_seed: the seed its weights were initialized with.
        hops: the hops of ``epoch`` so far, in order, so a resumed driver rebuilds the epoch's
            progress from the state file alone (records may lag it by one hop).
        params: the hyper-parameters it was last changed to by a PBT exploit (None otherwise).
    """

    version: int = 0
    epoch: int = 0
    init_seed: int | None = None
    hops: tuple[HopRecord, ...] = field(default_factory=tuple)
    params: dict[str, Any] | None = None

    @property
    def visited(self) -> list[int]:
        """The shards ``epoch`` has trained on so far."""
        return [h.shard for h in self.hops]

    def after_hop(self, hop: HopRecord, epoch: int | None = None) -> Counters:
        """The counters after one more training hop (of ``epoch``, by default the same one)."""
        epoch = self.epoch if epoch is None else epoch
        hops = (*(self.hops if epoch == self.epoch else ()), hop)
        return replace(self, version=self.version + 1, epoch=epoch, hops=hops)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "version": self.version,
            "epoch": self.epoch,
            "init_seed": self.init_seed,
            "visited": self.visited,
            "hops": [h.to_dict() for h in self.hops],
        }
        if self.params is not None:
            data["params"] = dict(self.params)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Counters:
        params = data.get("params")
        return cls(
            version=int(data["version"]),
            epoch=int(data.get("epoch", 0)),
            init_seed=data.get("init_seed"),
            hops=tuple(HopRecord.from_dict(h) for h in data.get("hops", [])),
            params=None if params is None else dict(params),
        )
