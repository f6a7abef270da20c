"""Errors raised by Cerebro.

Every error about user input is a :class:`ConfigError`, a subclass of :class:`ValueError`, whose
message names the argument, the value given and what would be accepted.
"""

from __future__ import annotations

from typing import Any


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
        shown = _short_repr(value)
        message = f"{argument}={shown} is not accepted: expected {accepted}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class WorkerError(CerebroError, RuntimeError):
    """A worker process stopped or could not start."""


class ModelFailed(CerebroError, RuntimeError):
    """Raised inside a unit when a model cannot go on (e.g. its loss is not finite)."""


def _short_repr(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
