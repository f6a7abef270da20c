"""Grid search: every combination of ``choice`` dimensions."""

from __future__ import annotations

import itertools
from typing import Any

from ..errors import ConfigError
from ..space import Choice, normalize_space
from .base import FixedSearch


class GridSearch(FixedSearch):
    """Train every combination of the space's values.

    Only ``cerebro.choice`` dimensions (and constants) are accepted: a continuous dimension has no
    grid. Combinations are enumerated in the space's key order, the last key varying fastest.

    Example:
        >>> import cerebro
        >>> grid = cerebro.GridSearch({"lr": cerebro.choice([0.1, 0.01]), "bs": 32})
        >>> grid.configurations()
        [{'lr': 0.1, 'bs': 32}, {'lr': 0.01, 'bs': 32}]
    """

    def __init__(self, space: dict[str, Any]) -> None:
        self.space = normalize_space(space)
        choices: dict[str, Choice] = {}
        for name, dim in self.space.items():
            if not isinstance(dim, Choice):
                raise ConfigError(
                    f"space[{name!r}]",
                    dim,
                    "a cerebro.choice([...]) dimension or a constant for GridSearch",
                    hint="use RandomSearch for continuous dimensions",
                )
            choices[name] = dim
        names = list(self.space)
        values = [choices[n].values for n in names]
        self._configs = [dict(zip(names, combo)) for combo in itertools.product(*values)]
        self.num_models: int = len(self._configs)

    def configurations(self) -> list[dict[str, Any]]:
        return [dict(c) for c in self._configs]

    def __repr__(self) -> str:
        return f"GridSearch({len(self._configs)} configurations)"
