"""Random search: independent samples of every dimension."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import check_int
from ..seeding import derive_seed
from ..space import normalize_space
from .base import FixedSearch


class RandomSearch(FixedSearch):
    """Sample ``num_models`` configurations at random.

    Each dimension draws from its own stream, seeded by ``seed`` and the dimension's name, so that
    adding or removing one dimension leaves the values of the others unchanged.

    Example:
        >>> import cerebro
        >>> search = cerebro.RandomSearch({"lr": cerebro.loguniform(1e-4, 1e-1)}, num_models=3)
        >>> len(search.configurations())
        3
    """

    def __init__(self, space: dict[str, Any], num_models: int, seed: int = 0) -> None:
        self.space = normalize_space(space)
        self.num_models: int = check_int("num_models", num_models, minimum=1)
        self.seed: int = check_int("seed", seed)
        columns = {}
        for name, dim in self.space.items():
            rng = np.random.default_rng(derive_seed(self.seed, "random-search:" + name))
            columns[name] = [dim.sample(rng) for _ in range(self.num_models)]
        self._configs = [{n: columns[n][i] for n in self.space} for i in range(self.num_models)]

    def configurations(self) -> list[dict[str, Any]]:
        return [dict(c) for c in self._configs]

    def __repr__(self) -> str:
        return f"RandomSearch(num_models={self.num_models}, seed={self.seed})"
