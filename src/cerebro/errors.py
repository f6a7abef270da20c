"""Errors raised by Cerebro.

Every error about user input is a :class:`ConfigError`, a subclass of :class:`ValueError`, whose
message names the argument, the value given and what would be accepted.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, TypeVar, overload

_Options = TypeVar("_Options")


class CerebroError(Exception):
    """Base class of every error Cerebro raises on purpose."""


class ConfigError(CerebroError, ValueError):
    """Bad input: an argument whose value cannot be accepted.

    Example:
        >>> raise ConfigError("num_shards", 0, "an integer >= 1")
        Traceback (most recent call last):
        ...
        cerebro.errors.ConfigError: num_shards=0 is not accepted: expected an integer >= 1
    """

    def __init__(self, argument: str, value: Any, accepted: str, hint: str = "") -> None:
        self.argument = argument
        self.value = value
        self.accepted = accepted
        self.hint = hint
        shown = _short_repr(value)
        message = f"{argument}={shown} is not accepted: expected {accepted}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class RecordsTooNew(ConfigError):
    """Records whose schema version this Cerebro does not know: a newer Cerebro wrote them.

    Example:
        >>> raise RecordsTooNew("x/cerebro.db", "0003", "0002")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        cerebro.errors.RecordsTooNew: records at x/cerebro.db are schema version 3, newer than ...
    """

    def __init__(self, where: str, found: str, supported: str) -> None:
        self.argument, self.value, self.hint = "records", where, ""
        self.found, self.supported = found, supported
        shown = [str(int(r)) if r.isdigit() else repr(r) for r in (found, supported)]
        self.accepted = f"records of schema version {shown[1]} or older"
        CerebroError.__init__(
            self,
            f"records at {where} are schema version {shown[0]}, newer than this Cerebro's "
            f"{shown[1]}: upgrade cerebro (pip install -U cerebro) to open them",
        )


class WorkerError(CerebroError, RuntimeError):
    """A worker process stopped or could not start."""


class DurabilityError(CerebroError, RuntimeError):
    """Model states could not be written to their state files for as many hops as the
    experiment's ``durable_lag`` allows; the run stops (what is recorded is kept)."""


class ModelFailed(CerebroError, RuntimeError):
    """Raised inside a unit when a model cannot go on (e.g. its loss is not finite)."""


class AllModelsFailed(CerebroError, RuntimeError):
    """Raised by ``Experiment.run()`` when every model failed and none trained to its end.

    The records are written first: ``cerebro.load(path).models`` holds each model's error.
    """


def is_int(value: Any) -> bool:
    """An integer (Python's or NumPy's), and not a bool (``True`` is an int to Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite real number that is not a bool."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


@overload
def check_int(
    argument: str,
    value: Any,
    minimum: int | None = None,
    maximum: int | None = None,
    unit: str = "",
    hint: str = "",
    allow_none: Literal[False] = False,
) -> int: ...


@overload
def check_int(
    argument: str,
    value: Any,
    minimum: int | None = None,
    maximum: int | None = None,
    unit: str = "",
    hint: str = "",
    *,
    allow_none: bool,
) -> int | None: ...


def check_int(
    argument: str,
    value: Any,
    minimum: int | None = None,
    maximum: int | None = None,
    unit: str = "",
    hint: str = "",
    allow_none: bool = False,
) -> int | None:
    """``value`` as an int, or ConfigError naming ``argument``, the value and the range.

    Example:
        >>> check_int("num_models", 8, minimum=1)
        8
        >>> check_int("epochs", 0, minimum=1, unit="epochs")
        Traceback (most recent call last):
        ...
        cerebro.errors.ConfigError: epochs=0 is not accepted: expected an integer >= 1 (epochs)
        >>> check_int("parallelism", None, minimum=1, allow_none=True) is None
        True
    """
    if value is None and allow_none:
        return None
    ok = is_int(value)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        accepted = _in_range("an integer", "an integer", minimum, maximum, unit)
        raise ConfigError(argument, value, accepted + (" or None" if allow_none else ""), hint)
    return int(value)


def check_number(
    argument: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    unit: str = "",
    hint: str = "",
) -> float:
    """``value`` as a float (a finite real number, not a bool, inside the bounds given).

    Example:
        >>> check_number("validation", 1.5, minimum=0, maximum=1)
        Traceback (most recent call last):
        ...
        cerebro.errors.ConfigError: validation=1.5 is not accepted: expected a number in [0, 1]
    """
    ok = is_number(value)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        accepted = _in_range("a number", "a finite number", minimum, maximum, unit)
        raise ConfigError(argument, value, accepted, hint)
    return float(value)


def check_bool(argument: str, value: Any, hint: str = "") -> bool:
    """``value`` as a bool if it is True or False, Python's or NumPy's (not 0, 1 or a string).

    Example:
        >>> check_bool("deterministic", "yes")
        Traceback (most recent call last):
        ...
        cerebro.errors.ConfigError: deterministic='yes' is not accepted: expected True or False
    """
    if not (isinstance(value, bool) or _is_numpy_bool(value)):
        raise ConfigError(argument, value, "True or False", hint)
    return bool(value)


def check_options(
    argument: str, value: Any, kind: type[_Options], accepted: str
) -> _Options | None:
    """An on/off switch that also takes options: ``True`` gives ``kind()`` (the defaults),
    ``False`` or None gives None (off), an instance of ``kind`` is itself.

    Example:
        >>> from fractions import Fraction
        >>> check_options("ratio", True, Fraction, "True, False or a Fraction")
        Fraction(0, 1)
        >>> check_options("ratio", "half", Fraction, "True, False or a Fraction")
        Traceback (most recent call last):
        ...
        cerebro.errors.ConfigError: ratio='half' is not accepted: expected True, False or a Fraction
    """
    if isinstance(value, kind):
        return value
    if value is True:
        return kind()
    if value is False or value is None:
        return None
    raise ConfigError(argument, value, accepted)


def _is_numpy_bool(value: Any) -> bool:
    # By name, so that this module does not import NumPy (``import cerebro`` stays cheap).
    kind = type(value)
    return kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool")


def _in_range(
    kind: str, unbounded: str, minimum: float | None, maximum: float | None, unit: str
) -> str:
    """What a bounded check accepts, e.g. "an integer >= 1 (epochs)", "a number in [0, 1]"."""
    if minimum is not None and maximum is not None:
        text = f"{kind} in [{minimum}, {maximum}]"
    elif minimum is not None:
        text = f"{kind} >= {minimum}"
    elif maximum is not None:
        text = f"{kind} <= {maximum}"
    else:
        text = unbounded
    return text + (f" ({unit})" if unit else "")


def first_line(error: BaseException) -> str:
    """The first line of an error's message (driver errors span many lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def raised(traceback_text: str | None) -> str:
    """What a formatted traceback says was raised: its last line (the error and its message).

    >>> raised("Traceback (most recent call last):\\n  ...\\nOSError: [Errno 5] I/O error\\n")
    'OSError: [Errno 5] I/O error'
    """
    lines = [line for line in (traceback_text or "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "unknown error"


def shown_url(url: str) -> str:
    """A database URL safe to print: the password replaced by ***."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing to hide
        return url


def _short_repr(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
