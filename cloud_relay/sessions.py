"""Dashboard sessions: login with a name and password, a cookie, and its CSRF token.

A session id is 256 random bits (base64url), sent only as the cookie ``COOKIE``
(``HttpOnly; Secure; SameSite=Strict; Path=/``: the ``__Host-`` prefix makes browsers
refuse it otherwise). The store keeps its SHA-256 digest (as ``cloud_relay.tokens``
does for API tokens), with the user, a CSRF token, when it was made, last seen and
its absolute end. A session ends when idle for ``idle_s``, at ``absolute_s`` after
login, at logout, when its user is removed or gets a new password.

CSRF: a request authenticated by the cookie that changes anything must carry the
session's CSRF token in ``CSRF_HEADER`` (the synchronizer token pattern: the page
gets it from the login reply or ``GET /api/v1/session``, which another site cannot
read). API tokens are sent explicitly, never ambiently, so they need none.

Logins are limited: ``max_failures`` failures per source and per user name within
``window_s`` and further attempts get 429 with ``Retry-After`` without a password
check (``tokens.FailureLimiter`` per key). Failures are counted by reason and logged
with the source and the name, never the password.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from cloud_relay.store import SessionRecord, Store
from cloud_relay.tokens import FailureLimiter
from cloud_relay.users import MAX_PASSWORD, verify

logger = logging.getLogger(__name__)

COOKIE: Final = "__Host-ei-session"
CSRF_HEADER: Final = "X-CSRF-Token"
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")
SEEN_EVERY_S: Final = 60.0
"""``last_seen`` is written at most this often per session."""


@dataclass(frozen=True, slots=True)
class SessionSettings:
    idle_s: float = 1800.0
    """A session unused this long has ended."""
    absolute_s: float = 12 * 3600.0
    """A session ends this long after login, however busy."""
    max_failures: int = 5
    """Failed logins per source and per user name within ``window_s`` before 429s."""
    window_s: float = 60.0


@dataclass(frozen=True, slots=True)
class LoginLimited:
    """A login refused unchecked: too many failures from its source or for its name."""

    retry_after_s: int


@dataclass(frozen=True, slots=True)
class Session:
    """A checked session: its record and the digest the store knows it by."""

    digest: str
    record: SessionRecord

    def csrf_ok(self, header: str | None) -> bool:
        return header is not None and hmac.compare_digest(
            header.encode(), self.record.csrf.encode()
        )


def session_digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class Sessions:
    """Logins, session checks and logouts; one per relay process (the limits are per
    process)."""

    def __init__(
        self,
        store: Store,
        settings: SessionSettings = SessionSettings(),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self.settings = settings
        self._clock = clock
        self._sources = FailureLimiter(settings.max_failures, settings.window_s)
        self._names = FailureLimiter(settings.max_failures, settings.window_s)
        self.failures: Counter[str] = Counter()
        """Refused logins by reason (``bad-password``, ``unknown-user``, ``rate-limited``)."""
        self._pending: set[asyncio.Future[Any]] = set()

    async def login(
        self, source: str, name: str, password: str
    ) -> tuple[str, SessionRecord] | LoginLimited | None:
        """A new session (its id, for the cookie, and its record); ``LoginLimited``, or
        None for a wrong name or password."""
        now_s = self._clock()
        key = name.lower()[:64]
        wait = max(self._sources.retry_after(source, now_s), self._names.retry_after(key, now_s))
        if wait > 0:
            self.failures["rate-limited"] += 1
            logger.warning("login as %r from %s refused (rate-limited)", name[:64], source)
            return LoginLimited(max(1, round(wait)))
        stored = await self._store.run(self._store.user_password, name)
        if not await verify(password[: MAX_PASSWORD + 1], stored):
            reason = "unknown-user" if stored is None else "bad-password"
            self.failures[reason] += 1
            self._sources.failed(source, self._clock())
            self._names.failed(key, self._clock())
            logger.warning("login as %r from %s refused (%s)", name[:64], source, reason)
            return None
        now = datetime.now(UTC)
        session_id = secrets.token_urlsafe(32)
        record = SessionRecord(
            user=name,
            csrf=secrets.token_urlsafe(32),
            created=now,
            last_seen=now,
            expires=now + timedelta(seconds=self.settings.absolute_s),
        )
        await self._store.run(self._store.add_session, session_digest(session_id), record)
        self._background(
            self._store.end_stale_sessions, now, now - timedelta(seconds=self.settings.idle_s)
        )
        logger.info("%s logged in from %s", name, source)
        return session_id, record

    async def check(self, session_id: str | None) -> Session | None:
        """The live session of this cookie value, None if there is none (an ended one is
        deleted)."""
        if session_id is None or _SESSION_ID.fullmatch(session_id) is None:
            return None
        digest = session_digest(session_id)
        record = await self._store.run(self._store.session, digest)
        if record is None:
            return None
        now = datetime.now(UTC)
        idle = (now - record.last_seen).total_seconds()
        if now >= record.expires or idle > self.settings.idle_s:
            self._background(self._store.end_session, digest)
            logger.info("session of %s ended (%s)", record.user,
                        "expired" if now >= record.expires else "idle")  # fmt: skip
            return None
        if idle > SEEN_EVERY_S:
            self._background(self._store.session_seen, digest, now)
        return Session(digest, record)

    async def logout(self, session: Session) -> None:
        await self._store.run(self._store.end_session, session.digest)
        logger.info("%s logged out", session.record.user)

    async def close(self) -> None:
        """Wait for the writes started in the background."""
        if self._pending:
            await asyncio.wait(self._pending, timeout=5.0)

    def _background(self, fn: Callable[..., Any], *args: Any) -> None:
        """A write nobody waits for; a failure is only logged."""
        fut = self._store.write(fn, *args)
        self._pending.add(fut)
        fut.add_done_callback(self._written)

    def _written(self, fut: asyncio.Future[Any]) -> None:
        self._pending.discard(fut)
        if not fut.cancelled() and (exc := fut.exception()) is not None:
            logger.error("a session write failed: %s", exc)
