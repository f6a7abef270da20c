"""Search-space dimensions: ``choice``, ``uniform``, ``loguniform``, ``randint``, ``quniform``.

A search space is a plain ``dict`` from parameter name to a dimension (or a constant value, which
is treated as a one-element choice). Each dimension samples from a ``numpy.random.Generator``.

Example:
    >>> import cerebro
    >>> space = {"lr": cerebro.loguniform(1e-4, 1e-1), "batch_size": cerebro.choice([32, 64])}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError


class Dimension:
    """One axis of a search space."""

    def sample(self, rng: np.random.Generator) -> Any:
        raise NotImplementedError

    def contains(self, value: Any) -> bool:
        raise NotImplementedError

    def __str__(self) -> str:
        """As it is written in a space, e.g. ``loguniform(0.0001, 0.1)``."""
        if isinstance(self, Choice):
            return f"choice({list(self.values)!r})"
        args = ", ".join(f"{v!r}" for v in self.__dict__.values())
        return f"{type(self).__name__.lower()}({args})"


@dataclass(frozen=True)
class Choice(Dimension):
    """One of a finite list of values (any type)."""

    values: tuple

    def sample(self, rng: np.random.Generator) -> Any:
        return self.values[int(rng.integers(len(self.values)))]

    def contains(self, value: Any) -> bool:
        return any(value == v for v in self.values)


@dataclass(frozen=True)
class Uniform(Dimension):
    """A float drawn uniformly from [low, high]."""

    low: float
    high: float

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.low, self.high))

    def contains(self, value: Any) -> bool:
        return _is_number(value) and self.low <= value <= self.high


@dataclass(frozen=True)
class LogUniform(Dimension):
    """A float whose logarithm is uniform on [log(low), log(high)]."""

    low: float
    high: float

    def sample(self, rng: np.random.Generator) -> float:
        return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))

    def contains(self, value: Any) -> bool:
        return _is_number(value) and self.low <= value <= self.high


@dataclass(frozen=True)
class RandInt(Dimension):
    """An integer drawn uniformly from [low, high] (both ends included)."""

    low: int
    high: int

    def sample(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.low, self.high + 1))

    def contains(self, value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and self.low <= value <= self.high


@dataclass(frozen=True)
class QUniform(Dimension):
    """A float uniform on [low, high], rounded to a multiple of ``q`` (kept inside the bounds)."""

    low: float
    high: float
    q: float

    def sample(self, rng: np.random.Generator) -> float:
        value = round(rng.uniform(self.low, self.high) / self.q) * self.q
        value = min(max(value, self.low), self.high)
        # Round away float noise such as 0.30000000000000004 so values print and compare cleanly.
        return float(round(value, 12))

    def contains(self, value: Any) -> bool:
        if not (_is_number(value) and self.low <= value <= self.high):
            return False
        return math.isclose(value / self.q, round(value / self.q), abs_tol=1e-9)


def choice(values: Sequence[Any]) -> Choice:
    """A categorical dimension: one of ``values``.

    >>> choice([32, 64]).values
    (32, 64)
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ConfigError("choice(values)", values, "a non-empty list or tuple of values")
    if len(values) == 0:
        raise ConfigError("choice(values)", values, "a non-empty list or tuple of values")
    return Choice(tuple(values))


def uniform(low: float, high: float) -> Uniform:
    """A float uniform on [low, high]."""
    _check_bounds("uniform", low, high)
    return Uniform(float(low), float(high))


def loguniform(low: float, high: float) -> LogUniform:
    """A float log-uniform on [low, high]; both bounds must be > 0."""
    _check_bounds("loguniform", low, high)
    if low <= 0:
        raise ConfigError("loguniform(low)", low, "a number > 0")
    return LogUniform(float(low), float(high))


def randint(low: int, high: int) -> RandInt:
    """An integer uniform on [low, high], both included."""
    for name, value in (("low", low), ("high", high)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ConfigError(f"randint({name})", value, "an integer")
    _check_bounds("randint", low, high)
    return RandInt(int(low), int(high))


def quniform(low: float, high: float, q: float) -> QUniform:
    """A float uniform on [low, high] rounded to a multiple of ``q`` (q > 0)."""
    _check_bounds("quniform", low, high)
    if not _is_number(q) or q <= 0:
        raise ConfigError("quniform(q)", q, "a number > 0")
    return QUniform(float(low), float(high), float(q))


def as_dimension(name: str, value: Any) -> Dimension:
    """A space entry as a Dimension: constants become one-element choices."""
    if isinstance(value, Dimension):
        return value
    if isinstance(value, (list, tuple, set, dict)):
        raise ConfigError(
            f"space[{name!r}]",
            value,
            "a dimension (cerebro.choice, uniform, loguniform, randint, quniform) or a constant",
            hint="wrap a list of options in cerebro.choice([...])",
        )
    return Choice((value,))


def normalize_space(space: Any, argument: str = "space") -> dict[str, Dimension]:
    """Check a search space and return it with every entry as a Dimension."""
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(argument, space, "a non-empty dict of parameter name -> dimension")
    result = {}
    for name, value in space.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{argument} key", name, "a non-empty string parameter name")
        result[name] = as_dimension(name, value)
    return result


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_bounds(kind: str, low: Any, high: Any) -> None:
    for name, value in (("low", low), ("high", high)):
        if not _is_number(value) or not math.isfinite(value):
            raise ConfigError(f"{kind}({name})", value, "a finite number")
    if low > high:
        raise ConfigError(f"{kind}(high)", high, f"a number >= low={low}")


def describe_space(space: Mapping[str, Dimension]) -> dict[str, dict[str, Any]]:
    """A normalized space as JSON-able dicts, kept in the records so that another process (the
    CLI, a controller) can check parameters against it without the user's script.

    >>> describe_space({"lr": loguniform(0.001, 0.1)})
    {'lr': {'kind': 'loguniform', 'low': 0.001, 'high': 0.1}}
    """
    kinds = {Uniform: "uniform", LogUniform: "loguniform", RandInt: "randint", QUniform: "quniform"}
    described = {}
    for name, dim in space.items():
        if isinstance(dim, Choice):
            described[name] = {"kind": "choice", "values": list(dim.values)}
        else:
            described[name] = {"kind": kinds[type(dim)], **dim.__dict__}
    return described


def space_from_description(described: Mapping[str, Mapping[str, Any]]) -> dict[str, Dimension]:
    """The inverse of :func:`describe_space`."""
    makers = {
        "choice": lambda d: Choice(tuple(d["values"])),
        "uniform": lambda d: Uniform(d["low"], d["high"]),
        "loguniform": lambda d: LogUniform(d["low"], d["high"]),
        "randint": lambda d: RandInt(d["low"], d["high"]),
        "quniform": lambda d: QUniform(d["low"], d["high"], d["q"]),
    }
    return {name: makers[d["kind"]](d) for name, d in described.items()}
