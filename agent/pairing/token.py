"""Pairing tokens: what an operator hands a new board, as text or a QR code.

A token says where the relay's pairing endpoint is, carries a one-time secret, and the
SHA-256 fingerprint of the relay's HTTPS certificate, so that the board talks to that
relay and no other even on a network it does not trust. Its text form is one line of
URL-safe characters::

    eipair1.<base64url JSON {"u": URL, "s": SECRET, "f": FINGERPRINT}>

The secret has 128 bits of entropy (``SECRET_BYTES``). Both ends parse it: the relay
mints it (``cloud_relay.pairing``), the board redeems it (``agent.pairing.client``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from dataclasses import dataclass
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
