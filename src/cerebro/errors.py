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
        self.hint = hint
        shown = _short_repr(value)
        message = f"{argument}={shown} is not accepted: expected {accepted}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class WorkerError(CerebroError, RuntimeError):
    """A worker process stopped or could not start."""


class ModelFailed(CerebroError, RuntimeError):
    """Raised inside a unit when a model cannot go on (e.g. its loss is not finite)."""


class AllModelsFailed(CerebroError, RuntimeError):
    """Raised by ``Experiment.run()`` when every model failed and none trained to its end.

    The records are written first: ``cerebro.load(path).models`` holds each model's error.
    """


def first_line(error: BaseException) -> str:
    """The first line of an error's message (driver errors span many lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
