"""The dashboard's token: every API call carries it, as Jupyter's server does.

A script sends ``Authorization: Bearer <token>``; a browser opens the printed URL
(``http://127.0.0.1:8300/?token=...``) once, and the server answers with an HttpOnly,
SameSite=Strict cookie holding it, so the token leaves the address bar. A state-changing request
authenticated by the cookie must also carry the header ``X-Cerebro-Csrf: 1``, which another
site's form or script cannot send: the cookie alone never changes anything.

Example:
    >>> token = new_token()
    >>> len(token) >= 32, token_matches(token, token), token_matches(token, "guess")
    (True, True, False)
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from enum import Enum

COOKIE = "cerebro_token"
CSRF_HEADER = "x-cerebro-csrf"
WHO_HEADER = "x-cerebro-user"  # a name the page lets a person give, recorded with their requests


class Via(Enum):
    """How a request proved it holds the token."""

    HEADER = "bearer header"
    COOKIE = "cookie"


@dataclass(frozen=True)
class Caller:
    """Who made an authenticated request: recorded with each control request."""

    via: Via
    host: str
    name: str | None

    @property
    def who(self) -> str:
        """e.g. ``"alice via dashboard (127.0.0.1)"``."""
        return f"{self.name or 'anonymous'} via dashboard ({self.host})"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_matches(expected: str, given: str | None) -> bool:
    """Compared in constant time, so the token cannot be guessed a character at a time."""
    return given is not None and secrets.compare_digest(expected.encode(), given.encode())


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (None without one)."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def person_name(header: str | None) -> str | None:
    """The name a page sent, kept printable and short (it goes into the records)."""
    if not header:
        return None
    name = "".join(c for c in header if c.isprintable()).strip()[:60]
    return name or None
