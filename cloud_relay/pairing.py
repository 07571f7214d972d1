"""Pairing on the relay: minting one-time tokens and redeeming them for a certificate.

``mint_token`` stores a new token's digest (SHA-256 of its secret: the database never
holds a usable token) with the device it is for, and returns the token to hand to the
board (``agent.pairing.token``). ``Pairing.redeem`` is what the HTTPS endpoint runs
for each attempt: limits first (``AttemptLimiter``: at most ``per_source`` attempts
per source address and ``overall`` in all per ``window_s``; after ``lockout_after``
failures in a window pairing closes for ``lockout_s``), then the request and its CSR,
then the token (used once, by a conditional write, so two workers cannot both
redeem it), then the certificate. Every attempt is logged with its source and
outcome and counted in ``Pairing.outcomes``.

A token may name a device that is already paired: that board is being paired again
(replaced, or re-installed), so its earlier certificates are revoked as the new one
is issued.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import functools
import hashlib
import json
import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.pairing.token import PairingToken
from agent.signaling.topics import check_device_id, is_relay_name
from cloud_relay.pki import CsrError, RelayPki, check_csr
from cloud_relay.store import Store, TokenRefused

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 32_768
"""A pairing request is a secret and a CSR (under 1 KiB); anything larger is refused."""
MAX_TTL_S = 7 * 86_400


def secret_digest(secret: str) -> str:
    """What the relay stores of a token's secret (hex SHA-256)."""
    return hashlib.sha256(secret.encode()).hexdigest()


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


class Outcome(enum.StrEnum):
    """How a pairing attempt ended: the log, the counters and the HTTP status say it."""

    PAIRED = "paired"
    SOURCE_LIMITED = Verdict.SOURCE_LIMITED.value
    OVERALL_LIMITED = Verdict.OVERALL_LIMITED.value
    LOCKED = Verdict.LOCKED.value
    BAD_REQUEST = "bad-request"
    BAD_CSR = "bad-csr"
    UNKNOWN_TOKEN = "unknown-token"
    USED_TOKEN = "used-token"
    EXPIRED_TOKEN = "expired-token"
    FAILED = "failed"

    @property
    def http_status(self) -> int:
        if self is Outcome.PAIRED:
            return 200
        if self in (Outcome.BAD_REQUEST, Outcome.BAD_CSR):
            return 400
        if self in (Outcome.SOURCE_LIMITED, Outcome.OVERALL_LIMITED, Outcome.LOCKED):
            return 429
        if self is Outcome.FAILED:
            return 500
        return 403


def new_device_id() -> str:
    """A device id for a token minted without one: ``d-`` and 10 base32 characters."""
    return "d-" + base64.b32encode(secrets.token_bytes(10)).decode().lower()[:10]


async def mint_token(
    store: Store,
    url: str,
    fingerprint: str,
    *,
    device: str | None = None,
    name: str | None = None,
    site: str | None = None,
    ttl_s: float = 600.0,
    now: datetime | None = None,
) -> tuple[PairingToken, str]:
    """A new token for ``device`` (a fresh id if None), valid for ``ttl_s``; returns it
    and the device id. Only its secret's digest is stored."""
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"token lifetime must be within 0..{MAX_TTL_S} s, not {ttl_s}")
    device = new_device_id() if device is None else check_device_id(device)
    if is_relay_name(device):
        raise ValueError(f"{device!r} is a name of the relay's, not a device id")
    token = PairingToken.new(url, fingerprint)
    created = datetime.now(UTC) if now is None else now
    expires = created + timedelta(seconds=ttl_s)
    digest = secret_digest(token.secret)
    await store.run(
        functools.partial(store.add_pairing_token, name=name, site=site),
        digest,
        device,
        created,
        expires,
    )
    return token, device


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What a paired board is told besides its certificate."""

    broker_url: str
    """Where devices reach the broker, ``mqtts://host:port``."""
    turn: tuple[dict[str, Any], ...] = ()
    """TURN servers (``{"urls": [...]}``); credentials come per call."""


class Pairing:
    """Redeems pairing requests; one per relay process (the limits are per process)."""

    def __init__(
        self,
        store: Store,
        pki: RelayPki,
        enrollment: Enrollment,
        limiter: AttemptLimiter,
        *,
        on_repaired: Callable[[str], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._pki = pki
        self._enrollment = enrollment
        self._limiter = limiter
        self._on_repaired = on_repaired
        self._clock = clock
        self.outcomes: Counter[Outcome] = Counter()

    async def redeem(self, source: str, body: bytes) -> tuple[Outcome, dict[str, Any]]:
        """One attempt from ``source``: the outcome and the JSON body to answer with."""
        outcome, reply, device = await self._redeem(source, body)
        self.outcomes[outcome] += 1
        if outcome is Outcome.PAIRED:
            logger.info("pairing from %s: paired device %s", source, device)
        else:
            if outcome.http_status in {400, 403}:
                self._limiter.failed(self._clock())
            logger.warning("pairing from %s refused: %s", source, reply["message"])
        return outcome, reply

    async def _redeem(self, source: str, body: bytes) -> tuple[Outcome, dict[str, Any], str | None]:
        verdict = self._limiter.attempt(source, self._clock())
        if verdict is not Verdict.ALLOWED:
            return _refusal(Outcome(verdict.value), "too many pairing attempts; try later")
        try:
            if len(body) > MAX_REQUEST_BYTES:
                raise ValueError
            request = json.loads(body)
            secret, csr = request["secret"], request["csr"].encode()
            if not isinstance(secret, str):
                raise TypeError
        except (ValueError, TypeError, KeyError, AttributeError):
            return _refusal(Outcome.BAD_REQUEST, "expected JSON {secret, csr}")
        try:
            check_csr(csr)
        except CsrError as exc:
            return _refusal(Outcome.BAD_CSR, str(exc))
        now = datetime.now(UTC)
        try:
            grant = await self._store.run(
                self._store.redeem_pairing_token, secret_digest(secret), now, source
            )
        except TokenRefused as exc:
            return _refusal(_TOKEN_OUTCOMES[exc.reason], _TOKEN_MESSAGES[exc.reason])
        try:
            cert, ca, revoked = await asyncio.to_thread(self._issue, csr, grant.device)
            paired = functools.partial(self._store.device_paired, name=grant.name, site=grant.site)
            await self._store.run(paired, grant.device, cert.decode(), now)
        except (OSError, ValueError) as exc:  # the token is spent: the operator mints another
            logger.error("pairing device %s failed: %s", grant.device, exc)
            return _refusal(Outcome.FAILED, "the relay could not issue a certificate")
        if revoked and self._on_repaired is not None:
            await self._on_repaired(grant.device)
        reply = {
            "device_id": grant.device,
            "name": grant.name,
            "site": grant.site,
            "certificate": cert.decode(),
            "ca": ca.decode(),
            "broker": self._enrollment.broker_url,
            "turn": list(self._enrollment.turn),
        }
        return Outcome.PAIRED, reply, grant.device

    def _issue(self, csr: bytes, device: str) -> tuple[bytes, bytes, bool]:
        """The new certificate, the CA, and whether earlier certificates were revoked."""
        try:
            revoked = bool(self._pki.revoke(device))
        except LookupError:  # never paired before
            revoked = False
        cert = self._pki.issue_device(csr, device)
        return cert, self._pki.ca_path.read_bytes(), revoked


_TOKEN_OUTCOMES = {
    "unknown": Outcome.UNKNOWN_TOKEN,
    "used": Outcome.USED_TOKEN,
    "expired": Outcome.EXPIRED_TOKEN,
}
_TOKEN_MESSAGES = {
    "unknown": "this relay does not know the token (mistyped, or minted by another relay)",
    "used": "the token was already used: mint a new one",
    "expired": "the token has expired: mint a new one",
}


def _refusal(outcome: Outcome, message: str) -> tuple[Outcome, dict[str, Any], None]:
    return outcome, {"error": outcome.value, "message": message}, None
