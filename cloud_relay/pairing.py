"""Pairing tokens and the limits on pairing attempts (pure; issue 5).

A pairing token is what an operator hands to a new board (as text or a QR code): where
the relay's pairing endpoint is, a one-time secret, and the SHA-256 fingerprint of the
relay's HTTPS certificate, so that the board talks to that relay and no other even on
a network it does not trust. Its text form is one line of URL-safe characters::

    eipair1.<base64url JSON {"u": URL, "s": SECRET, "f": FINGERPRINT}>

The secret has 128 bits of entropy (``SECRET_BYTES``); the relay keeps only its
SHA-256 (``secret_digest``), so its database does not hold usable tokens.

``AttemptLimiter`` decides whether a pairing attempt may be tried at all: at most
``per_source`` attempts per source address and ``overall`` in all per ``window_s``,
and after ``lockout_after`` failures in a window pairing closes for ``lockout_s``.
The clock is passed in (monotonic seconds).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import re
import secrets
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

PREFIX = "eipair1."
SECRET_BYTES = 16
"""128 bits: guessing is hopeless even before the attempt limits."""
MAX_TOKEN_CHARS = 1024
_FINGERPRINT = re.compile(r"(?:[0-9A-F]{2}:){31}[0-9A-F]{2}")


class TokenError(ValueError):
    """A token that cannot be used; the text says why, for the person who typed it."""


@dataclass(frozen=True, slots=True)
class PairingToken:
    url: str
    """The relay's pairing endpoint, ``https://host[:port]``."""
    secret: str
    """One-time secret, base64url without padding."""
    fingerprint: str
    """SHA-256 of the relay's HTTPS certificate, ``AB:CD:...`` (32 bytes)."""

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
            raise TokenError(f"relay URL must be https://host[:port], not {self.url[:80]!r}")
        try:
            raw = _b64decode(self.secret)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != SECRET_BYTES:
            raise TokenError("the token's secret is damaged (wrong length or characters)")
        if _FINGERPRINT.fullmatch(self.fingerprint) is None:
            raise TokenError("the token's certificate fingerprint is damaged")

    @classmethod
    def new(cls, url: str, fingerprint: str) -> PairingToken:
        secret = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).rstrip(b"=")
        return cls(url, secret.decode(), fingerprint)

    def text(self) -> str:
        body = json.dumps(
            {"u": self.url, "s": self.secret, "f": self.fingerprint}, separators=(",", ":")
        )
        return PREFIX + base64.urlsafe_b64encode(body.encode()).rstrip(b"=").decode()

    @classmethod
    def parse(cls, text: str) -> PairingToken:
        """The token in ``text`` (surrounding white space ignored); ``TokenError`` if it is
        not one, damaged, or cut short."""
        text = text.strip()
        if len(text) > MAX_TOKEN_CHARS or not text.startswith(PREFIX):
            raise TokenError(f"not a pairing token (it must start with {PREFIX!r})")
        b64 = text[len(PREFIX) :]
        try:
            raw = json.loads(_b64decode(b64))
        except (binascii.Error, ValueError, UnicodeDecodeError):
            raise TokenError("the pairing token is damaged or incomplete") from None
        if not isinstance(raw, dict) or not all(isinstance(raw.get(k), str) for k in "usf"):
            raise TokenError("the pairing token is damaged or incomplete")
        return cls(raw["u"], raw["s"], raw["f"])


def _b64decode(text: str) -> bytes:
    """Strict base64url without padding: any other character is damage, not noise."""
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def secret_digest(secret: str) -> str:
    """What the relay stores of a token's secret (hex SHA-256)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, digest: str) -> bool:
    return hmac.compare_digest(secret_digest(secret), digest)


class Verdict(enum.StrEnum):
    ALLOWED = "allowed"
    SOURCE_LIMITED = "source-limited"
    OVERALL_LIMITED = "overall-limited"
    LOCKED = "locked"


@dataclass(slots=True)
class AttemptLimiter:
    """Sliding-window limits on pairing attempts; see the module docstring."""

    per_source: int = 5
    overall: int = 30
    window_s: float = 60.0
    lockout_after: int = 20
    lockout_s: float = 600.0
    _attempts: deque[tuple[float, str]] = field(default_factory=deque, init=False)
    _failures: deque[float] = field(default_factory=deque, init=False)
    _locked_until: float = field(default=float("-inf"), init=False)

    def attempt(self, source: str, now: float) -> Verdict:
        """Whether an attempt from ``source`` may go ahead (a ``Verdict``); allowed ones
        count against the limits."""
        self._forget(now)
        if now < self._locked_until:
            return Verdict.LOCKED
        if len(self._attempts) >= self.overall:
            return Verdict.OVERALL_LIMITED
        if sum(1 for _, s in self._attempts if s == source) >= self.per_source:
            return Verdict.SOURCE_LIMITED
        self._attempts.append((now, source))
        return Verdict.ALLOWED

    def failed(self, now: float) -> None:
        """An allowed attempt failed (bad, used or expired token)."""
        self._forget(now)
        self._failures.append(now)
        if len(self._failures) >= self.lockout_after:
            self._locked_until = now + self.lockout_s
            self._failures.clear()

    def locked(self, now: float) -> bool:
        return now < self._locked_until

    def _forget(self, now: float) -> None:
        while self._attempts and self._attempts[0][0] <= now - self.window_s:
            self._attempts.popleft()
        while self._failures and self._failures[0] <= now - self.window_s:
            self._failures.popleft()
