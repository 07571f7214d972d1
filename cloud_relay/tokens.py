"""API tokens: minting them, and checking the ``Authorization: Bearer`` of each API request.

A token is ``eirt_`` and 256 random bits (base64url), shown once when minted
(``edge-intercom-relay token new``); the store keeps its SHA-256 digest with a name,
its creation and expiry, when it was last used and when it was revoked. A request's
token is found by its digest: no stored secret is compared in Python, so there is no
comparison whose time depends on how much of a guess was right (an index lookup by
digest leaks at most something about the digest, and a digest says nothing of a
token it was not made from).

``Authenticator.check`` runs for every API request: a source that sent
``max_failures`` bad tokens within ``window_s`` is refused (429, ``Retry-After``)
until the oldest of them leaves the window, good token or not. Every refusal is
counted by reason and logged with its source, never with the token.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import hashlib
import logging
import re
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cloud_relay.store import ApiTokenRecord, Store

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "eirt_"
"""Marks an edge-intercom relay token, for people and for secret scanners."""
_TOKEN = re.compile(TOKEN_PREFIX + r"[A-Za-z0-9_-]{43}")
LAST_USED_EVERY_S = 60.0
"""``last_used`` is written at most this often per token: not one write per request."""


def new_token() -> str:
    """``eirt_`` and 256 random bits, base64url without padding (43 characters)."""
    return TOKEN_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def token_digest(token: str) -> str:
    """What the store keeps of a token (hex SHA-256).

    A fast hash is enough here, unlike for passwords: a token is 256 random bits, so
    there is no dictionary to try and a stolen digest cannot be searched back to its
    token; a slow hash would only slow every API request."""
    return hashlib.sha256(token.encode()).hexdigest()


async def mint_api_token(
    store: Store, name: str, *, ttl_s: float | None = None, now: datetime | None = None
) -> tuple[str, ApiTokenRecord]:
    """A new token named ``name``, valid for ``ttl_s`` (None: until revoked); returns the
    token (to show once) and its record. Only its digest is stored."""
    name = name.strip()
    if not 0 < len(name) <= 200:
        raise ValueError("token name must be 1 to 200 characters")
    if ttl_s is not None and ttl_s <= 0:
        raise ValueError("token lifetime must be > 0")
    created = datetime.now(UTC) if now is None else now
    expires = None if ttl_s is None else created + timedelta(seconds=ttl_s)
    record = ApiTokenRecord(secrets.token_hex(6), name, created, expires)
    token = new_token()
    await store.run(store.add_api_token, record, token_digest(token))
    return token, record


class Refusal(enum.StrEnum):
    """Why a request was refused: counted and logged, never told to the client."""

    MISSING = "missing"
    MALFORMED = "malformed"
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    REVOKED = "revoked"
    RATE_LIMITED = "rate-limited"


@dataclass(frozen=True, slots=True)
class Refused:
    """A request the ``Authenticator`` turned away."""

    reason: Refusal
    retry_after_s: int = 0
    """For ``RATE_LIMITED``: whole seconds until the source may try again."""


class FailureLimiter:
    """Bad tokens per source in a sliding window.

    Not ``pairing.AttemptLimiter``: that counts every attempt and, after enough failures,
    closes pairing to everyone; an API that a dashboard calls many times a minute must
    not count good requests, nor let one source lock the operators out."""

    def __init__(
        self, max_failures: int = 10, window_s: float = 60.0, sources: int = 10_000
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._sources = sources
        """Most sources tracked; the one least recently failing is forgotten first."""
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, source: str, now: float) -> float:
        """Seconds until ``source`` may try again; 0 if it may now."""
        failures = self._recent(source, now)
        if len(failures) < self.max_failures:
            return 0.0
        return failures[0] + self.window_s - now

    def failed(self, source: str, now: float) -> None:
        failures = self._recent(source, now)
        failures.append(now)
        self._failures[source] = failures
        self._failures.move_to_end(source)
        while len(self._failures) > self._sources:
            self._failures.popitem(last=False)

    def _recent(self, source: str, now: float) -> deque[float]:
        failures = self._failures.get(source, deque())
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        if not failures:
            self._failures.pop(source, None)
        return failures


class Authenticator:
    """Checks API requests' tokens against the store; one per relay process."""

    def __init__(
        self,
        store: Store,
        limiter: FailureLimiter | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._limiter = limiter or FailureLimiter()
        self._clock = clock
        self.refusals: Counter[Refusal] = Counter()

    async def check(self, source: str, authorization: str | None) -> ApiTokenRecord | Refused:
        """The token record of a request from ``source`` with this ``Authorization``
        header, or why it is refused."""
        wait = self._limiter.retry_after(source, self._clock())
        if wait > 0:
            return self._refuse(source, Refused(Refusal.RATE_LIMITED, max(1, round(wait))))
        reason, record = await self._lookup(authorization)
        if reason is not None:
            if reason is not Refusal.MISSING:  # no token guesses nothing
                self._limiter.failed(source, self._clock())
            return self._refuse(source, Refused(reason))
        assert record is not None
        now = datetime.now(UTC)
        stale = record.last_used is None or (now - record.last_used).total_seconds() > (
            LAST_USED_EVERY_S
        )
        if stale:  # nobody waits for it: a failure is only logged
            self._store.write(self._store.api_token_used, record.id, now).add_done_callback(
                _log_failure
            )
        return record

    async def _lookup(
        self, authorization: str | None
    ) -> tuple[Refusal | None, ApiTokenRecord | None]:
        if not authorization:
            return Refusal.MISSING, None
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or _TOKEN.fullmatch(token) is None:
            return Refusal.MALFORMED, None
        record = await self._store.run(self._store.api_token, token_digest(token))
        if record is None:
            return Refusal.UNKNOWN, None
        if record.revoked is not None:
            return Refusal.REVOKED, None
        if not record.usable(datetime.now(UTC)):
            return Refusal.EXPIRED, None
        return None, record

    def _refuse(self, source: str, refused: Refused) -> Refused:
        self.refusals[refused.reason] += 1
        logger.warning("API request from %s refused (%s)", source, refused.reason)
        return refused


def _log_failure(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and (exc := done.exception()) is not None:
        logger.error("recording an API token's last use failed: %s", exc)
