"""Search-space dimensions: ``choice``, ``uniform``, ``loguniform``, ``randint``, ``quniform``.

A search space is a plain ``dict`` from parameter name to a dimension (or a constant value, which
is treated as a one-element choice). Each dimension samples from a ``numpy.random.Generator``.

Values that come out of a space are plain Python values (NumPy scalars are converted), so that the
records can store them as JSON. A list, set, range, array or other iterable is refused as a
constant: it is almost always meant as the options of a ``choice``.

Example:
    >>> import cerebro
    >>> space = {"lr": cerebro.loguniform(1e-4, 1e-1), "batch_size": cerebro.choice([32, 64])}
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError, check_int, check_number, is_int, is_number


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

    def __post_init__(self) -> None:
        # NumPy scalars become Python ones here, so that every sample is a plain value that the
        # records can store as JSON and that compares equal after a round trip through them.
        object.__setattr__(self, "values", tuple(_plain(v) for v in self.values))

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
        return is_number(value) and self.low <= value <= self.high


@dataclass(frozen=True)
class LogUniform(Dimension):
    """A float whose logarithm is uniform on [log(low), log(high)]."""

    low: float
    high: float

    def sample(self, rng: np.random.Generator) -> float:
        return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))

    def contains(self, value: Any) -> bool:
        return is_number(value) and self.low <= value <= self.high


@dataclass(frozen=True)
class RandInt(Dimension):
    """An integer drawn uniformly from [low, high] (both ends included)."""

    low: int
    high: int

    def sample(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.low, self.high + 1))

    def contains(self, value: Any) -> bool:
        # bool(): a NumPy integer compares to a numpy.bool, not a bool.
        return is_int(value) and bool(self.low <= value <= self.high)


# quniform values are ``k * q`` rounded to 12 decimals, so that float noise such as
# 0.30000000000000004 neither shows in the records nor breaks comparisons. TPESearch and PBT round
# their quniform values the same way (search/tpe.py, search/pbt.py).
_Q_DECIMALS = 12
# Rounding to 12 decimals moves a value by up to 5e-13; from q >= 1e-9 on that is at most 5e-4 q,
# so the rounded values are still multiples of q (within float noise) and all distinct.
_MIN_Q = 1e-9
# Past about 1e12 multiples of q from 0, the spacing of floats near the bounds (2.2e-16 * |x|)
# comes within 1e-3 q: neighbouring multiples would no longer be told apart reliably.
_MAX_MULTIPLES = 1e12


@dataclass(frozen=True)
class QUniform(Dimension):
    """A multiple of ``q`` inside [low, high]: ``k * q`` for an integer k with
    ``low <= k * q <= high`` (up to float noise), rounded to 12 decimals.

    :meth:`sample` draws x uniformly from [low, high] and takes the nearest multiple,
    ``round(x / q) * q``, like hyperopt's ``quniform``; where that multiple falls outside the range
    (a bound that is not itself a multiple), the nearest multiple inside is taken instead. So every
    sample is one of the multiples, and :meth:`contains` accepts exactly those.
    """

    low: float
    high: float
    q: float

    def multipliers(self) -> tuple[int, int]:
        """``(first, last)``: the values are ``value(k)`` for ``first <= k <= last``; first > last
        when no multiple of q lies in [low, high]."""
        first = math.ceil(self.low / self.q - 1e-9)
        last = math.floor(self.high / self.q + 1e-9)
        # The 12-decimal rounding can move a multiple at a bound just outside it: drop it then.
        while first <= last and self.value(first) < self.low - self._tolerance(self.low):
            first += 1
        while last >= first and self.value(last) > self.high + self._tolerance(self.high):
            last -= 1
        return first, last

    def value(self, k: int) -> float:
        """The k-th multiple of q, as :meth:`sample` gives it."""
        return float(round(k * self.q, _Q_DECIMALS))

    def nearest(self, x: float) -> float:
        """The value of this dimension nearest to ``x``."""
        first, last = self.multipliers()
        if first > last:
            raise _no_multiple(self.low, self.high, self.q)
        return self.value(min(max(round(x / self.q), first), last))

    def sample(self, rng: np.random.Generator) -> float:
        return self.nearest(float(rng.uniform(self.low, self.high)))

    def contains(self, value: Any) -> bool:
        if not is_number(value):
            return False
        first, last = self.multipliers()
        k = round(value / self.q)
        if not first <= k <= last:
            return False
        # The k-th multiple up to float noise: a value computed by hand (3 * 0.1) or read back
        # from the records equals the sampled one only to a few units in the last place.
        return abs(value - self.value(k)) <= self._tolerance(value)

    def _tolerance(self, x: float) -> float:
        # 1e-9 q for quotient noise, 1e-12 for the 12-decimal rounding, and a few floats' spacing
        # at x; all together well under q for the q accepted (see _MIN_Q and _MAX_MULTIPLES).
        return 1e-9 * self.q + 1e-12 + 1e-15 * abs(x)


def choice(values: Sequence[Any]) -> Choice:
    """A categorical dimension: one of ``values``.

    >>> choice([32, 64]).values
    (32, 64)
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ConfigError("choice(values)", values, "a non-empty list or tuple of values")
    if len(values) == 0:
        raise ConfigError("choice(values)", values, "a non-empty list or tuple of values")
    for value in values:
        if _holds_array(value):
            # The records store parameters as JSON, which has no arrays: such an option would
            # fail there, after the workers have started.
            raise ConfigError(
                "choice(values)",
                values,
                "a list or tuple of values without arrays or tensors among them",
                hint="convert each one with .tolist()",
            )
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
        check_int(f"randint({name})", value)
    _check_bounds("randint", low, high)
    return RandInt(int(low), int(high))


def quniform(low: float, high: float, q: float) -> QUniform:
    """A multiple of ``q`` inside [low, high] (see :class:`QUniform`); at least one multiple
    must lie in the range, and q must be >= 1e-9 (values are rounded to 12 decimals).

    >>> quniform(0.0, 0.01, 0.001).contains(0.003)
    True
    """
    _check_bounds("quniform", low, high)
    if not is_number(q) or q <= 0:
        raise ConfigError("quniform(q)", q, "a number > 0")
    if q < _MIN_Q:
        raise ConfigError(
            "quniform(q)",
            q,
            f"a number >= {_MIN_Q:g}",
            hint="values are rounded to 12 decimals, which a finer q does not survive; "
            "rescale the parameter",
        )
    if max(abs(low), abs(high)) / q > _MAX_MULTIPLES:
        raise ConfigError(
            "quniform(q)",
            q,
            f"a number >= max(|low|, |high|) / {_MAX_MULTIPLES:g} = "
            f"{max(abs(low), abs(high)) / _MAX_MULTIPLES:g}",
            hint="floats cannot tell so many multiples of q apart; use uniform(low, high)",
        )
    dim = QUniform(float(low), float(high), float(q))
    first, last = dim.multipliers()
    if first > last:
        raise _no_multiple(low, high, q)
    return dim


def _no_multiple(low: float, high: float, q: float) -> ConfigError:
    # Without one, every sample would be a clipped bound that contains() itself rejects.
    below = math.floor(low / q)
    return ConfigError(
        "quniform",
        (low, high, q),
        "a range [low, high] holding at least one multiple of q",
        hint=f"the nearest multiples of q={q:g} are {round(below * q, _Q_DECIMALS):g} and "
        f"{round((below + 1) * q, _Q_DECIMALS):g}; widen the range or use a smaller q",
    )


_ACCEPTED = (
    "a dimension (cerebro.choice, uniform, loguniform, randint, quniform) or a single "
    "constant value (a number, str, bool, None...)"
)


def as_dimension(name: str, value: Any, argument: str = "space") -> Dimension:
    """A space entry as a Dimension: constants become one-element choices.

    An iterable other than a string is refused rather than taken as one constant: it is almost
    always meant as the options of a choice, and as a constant it fails late (in the records, or
    in every model's build), after the workers have started.
    """
    if isinstance(value, Dimension):
        return value
    where = f"{argument}[{name!r}]"
    if _is_array(value):
        raise ConfigError(
            where,
            value,
            _ACCEPTED,
            hint="for one of its elements use cerebro.choice(values.tolist()); to pass it "
            "whole, cerebro.choice([values.tolist()]); for a single number, values.item()",
        )
    if isinstance(value, Mapping):
        raise ConfigError(
            where,
            value,
            _ACCEPTED,
            hint="a space is flat; to pass this dict as one value, use cerebro.choice([value])",
        )
    if isinstance(value, (set, frozenset)):
        raise ConfigError(
            where,
            value,
            _ACCEPTED,
            hint="for one of its items use cerebro.choice(sorted(...)): a set has no fixed "
            "order, and a search must list its options in the same order in every run",
        )
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        raise ConfigError(
            where,
            value,
            _ACCEPTED,
            hint="wrap the options in cerebro.choice([...]), "
            "or pass it whole as one value with cerebro.choice([value])",
        )
    return Choice((value,))


def normalize_space(space: Any, argument: str = "space") -> dict[str, Dimension]:
    """Check a search space and return it with every entry as a Dimension.

    Every search (GridSearch, RandomSearch, TPESearch, ASHA, Hyperband, PBT) takes its space in
    through here, so a bad entry is refused when the search is made, before any work starts.
    """
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(argument, space, "a non-empty dict of parameter name -> dimension")
    result = {}
    for name, value in space.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{argument} key", name, "a non-empty string parameter name")
        result[name] = as_dimension(name, value, argument)
    return result


def _plain(value: Any) -> Any:
    """``value`` with NumPy scalars (also inside lists, tuples and dicts) as Python ones."""
    if isinstance(value, np.generic):
        return value.item()
    if type(value) in (list, tuple):
        return type(value)(_plain(v) for v in value)
    if type(value) is dict:
        return {k: _plain(v) for k, v in value.items()}
    return value


def _is_array(value: Any) -> bool:
    """A NumPy array, a torch tensor, a pandas Series...: anything converted with ``.tolist()``
    (NumPy scalars have ``.tolist()`` too, but are plain values)."""
    return hasattr(value, "tolist") and hasattr(value, "item") and not isinstance(value, np.generic)


def _holds_array(value: Any) -> bool:
    """Whether ``value`` is an array or holds one in its lists, tuples or dicts."""
    if _is_array(value):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_array(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_array(v) for v in value.values())
    return False


def _check_bounds(kind: str, low: Any, high: Any) -> None:
    for name, value in (("low", low), ("high", high)):
        check_number(f"{kind}({name})", value)
    if low > high:
        raise ConfigError(f"{kind}(high)", high, f"a number >= low={low}")


def space_digest(space: Mapping[str, Dimension], ordered: bool) -> str:
    """A short digest of a search space, for a search's fingerprint (a resumed experiment must
    use the same space).

    ``ordered``: whether the order of the dimensions counts (it does for searches whose draws
    follow it, such as TPE's); unordered digests are the ones ASHA, Hyperband and PBT have
    always recorded, kept so that their recorded experiments still resume.

    Example:
        >>> a = {"lr": loguniform(1e-4, 1e-1), "width": choice([32, 64])}
        >>> b = dict(reversed(list(a.items())))
        >>> space_digest(a, ordered=False) == space_digest(b, ordered=False)
        True
        >>> space_digest(a, ordered=True) == space_digest(b, ordered=True)
        False
    """
    if ordered:
        text = json.dumps([[name, repr(dim)] for name, dim in space.items()])
    else:
        text = json.dumps({name: repr(dim) for name, dim in space.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
