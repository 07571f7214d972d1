"""Alert forwarding to webhooks: HTTP POST of a signed JSON body, retried until it lands.

A new alert (stored for the first time) becomes one delivery per matching webhook. The
delivery is written to the store's ``webhook_deliveries`` table before it is tried, and
leaves it only when the receiver took it (2xx) or as a dead letter, so a relay restart
or crash resumes what was pending instead of losing it (at least once: a receiver may
see a delivery again after a restart and dedupes by ``X-Edge-Intercom-Delivery``).

Each webhook has one worker task that delivers in order. 5xx, 408, 429, timeouts and
connection errors are retried with exponential backoff and jitter; any other status
(3xx included: redirects are not followed, the signed body stays with the configured
host) is final. After ``max_tries`` the delivery is a dead letter, logged and counted.

Receivers check ``X-Edge-Intercom-Signature: sha256=<hex>``, the HMAC-SHA256 of the
exact body bytes with the webhook's secret.

An alert with an audio clip says so in ``alert.clip`` (``bytes``, ``seconds``,
``before_s``: ``cloud_relay.store.stored_body``); the audio itself never leaves the
relay this way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import secrets
import stat
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp

from agent.edge.alerts import Severity
from cloud_relay.store import DeliveryRecord, Store

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Edge-Intercom-Signature"
TIMESTAMP_HEADER = "X-Edge-Intercom-Timestamp"
DELIVERY_HEADER = "X-Edge-Intercom-Delivery"
MIN_SECRET_BYTES = 16
"""A shorter HMAC key is refused: it could be guessed."""
RETRIED_STATUSES = frozenset({408, 429})
"""Client errors worth another try (the receiver was slow or busy); every 5xx is too."""


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """One receiver of alerts (``[[webhooks]]`` in the relay's config)."""

    url: str
    """Where alerts are POSTed; ``https://`` (``http://`` only to a loopback host, for a
    local bridge or tests: anything else would send alerts in clear). Unique per relay."""
    secret_file: str
    """File holding the HMAC key (at least 16 bytes, surrounding whitespace dropped);
    refused if its group or others may access it."""
    timeout_s: float = 10.0
    """Bound on one attempt: connect, send, and the receiver's answer."""
    max_tries: int = 8
    """Attempts before the delivery becomes a dead letter."""
    backoff_min_s: float = 1.0
    """Delay before the second attempt; doubles per attempt (with jitter)."""
    backoff_max_s: float = 300.0
    """Largest delay between attempts."""
    kinds: tuple[str, ...] = ()
    """Alert kinds sent here (``smoke``, ``co``, ...); empty: every kind."""
    min_severity: Literal["info", "warning", "critical"] = "info"
    """Alerts below this severity are not sent here."""

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        if parts.scheme not in ("https", "http") or not host:
            raise ValueError(f"webhook URL {self.url!r}: expected https://host/...")
        if parts.scheme == "http" and not _loopback(host):
            raise ValueError(f"webhook URL {self.url!r}: https:// is required off loopback")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if self.max_tries < 1:
            raise ValueError("max_tries must be >= 1")
        if not 0 < self.backoff_min_s <= self.backoff_max_s:
            raise ValueError("need 0 < backoff_min_s <= backoff_max_s")

    def wants(self, alert: Mapping[str, Any]) -> bool:
        """Whether the alert (its wire dict) passes this webhook's kind and severity filter."""
        if self.kinds and alert.get("kind") not in self.kinds:
            return False
        try:
            rank = Severity(str(alert.get("severity"))).rank
        except ValueError:
            return False
        return rank >= Severity(self.min_severity).rank

    def backoff(self, tries: int, rng: random.Random) -> float:
        """Seconds to wait after ``tries`` failed attempts: doubling, capped, with the upper
        half jittered so that many deliveries failing together do not retry together."""
        base = min(self.backoff_max_s, self.backoff_min_s * 2.0 ** (tries - 1))
        return rng.uniform(base / 2, base)


def read_webhook_secret(path: Path) -> bytes:
    """The HMAC key in ``path``; ``ValueError`` if others may read it or it is too short."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"webhook secret file {path} is accessible to others (chmod 600)")
    secret = path.read_bytes().strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"webhook secret in {path} is shorter than {MIN_SECRET_BYTES} bytes")
    return secret


def encode_body(device: str, alert: Mapping[str, Any]) -> bytes:
    """The POST body: compact JSON, keys sorted, so the bytes are fixed per delivery."""
    data = {"device": device, "alert": dict(alert)}
    return json.dumps(data, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value for ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


@dataclass(slots=True)
class WebhookStats:
    delivered: int = 0
    retried: int = 0
    """Attempts that failed and were tried again."""
    dead: int = 0
    """Deliveries given up on (dead letters)."""
    resumed: int = 0
    """Pending deliveries taken up again at start (from before a restart), and dead letters
    sent again (``retry``)."""
    failed: Counter[str] = field(default_factory=Counter)
    """Failed attempts by class: ``timeout``, ``connection``, ``http-4xx`` and so on."""


@dataclass(slots=True)
class _Hook:
    settings: WebhookSettings
    secret: bytes
    queue: asyncio.Queue[DeliveryRecord] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None


class _Failed(Exception):
    def __init__(self, reason: str, *, retry: bool, label: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry
        self.label = label
        """The class of failure, for ``WebhookStats.failed`` (no URL: it may hold a key)."""


class Webhooks:
    """The relay's webhook deliveries: ``start()``, ``submit()`` per new alert, ``close()``."""

    def __init__(
        self,
        settings: Sequence[WebhookSettings],
        store: Store,
        *,
        worker: str,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        """``worker``: this relay worker's name; a restarted worker resumes the pending
        deliveries under its name (the other workers' stay theirs)."""
        urls = [s.url for s in settings]
        if len(set(urls)) != len(urls):
            raise ValueError("webhook URLs must be unique")
        self.settings = tuple(settings)
        self.store = store
        self.worker = worker
        self.stats = WebhookStats()
        self._clock = clock
        self._rng = rng or random.Random()
        self._hooks: dict[str, _Hook] = {}
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def start(self) -> None:
        """Read the secrets (``ValueError``/``OSError`` if one is unfit), take up the
        deliveries left pending, start one worker per webhook."""
        if self._session is not None:
            return
        for s in self.settings:
            secret = await asyncio.to_thread(read_webhook_secret, Path(s.secret_file))
            self._hooks[s.url] = _Hook(s, secret)
        await self.store.run(self.store.take_retries, self.worker)
        pending = await self.store.run(self.store.webhook_pending, self.worker)
        self._take(pending)
        if pending:
            logger.info("resumed %d pending webhook deliveries", self.stats.resumed)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None), raise_for_status=False
        )
        for url, hook in self._hooks.items():
            hook.task = asyncio.create_task(self._run(hook), name=f"webhook {url}")

    async def retry(self) -> int:
        """Take up the dead letters an operator sent again (``edge-intercom-relay webhooks
        retry``, then SIGHUP); how many."""
        if self._session is None or self._closed:
            return 0
        again = await self.store.run(self.store.take_retries, self.worker)
        self._take(again)
        if again:
            logger.info("trying %d dead letters again", len(again))
        return len(again)

    def _take(self, deliveries: Sequence[DeliveryRecord]) -> None:
        for d in deliveries:
            hook = self._hooks.get(d.webhook)
            if hook is None:
                self._dead(d, d.tries, "unconfigured")  # its webhook left the config
            else:
                hook.queue.put_nowait(d)
                self.stats.resumed += 1

    def submit(self, device: str, alert: Mapping[str, Any]) -> int:
        """Queue the alert for every webhook that wants it; how many that is.

        The delivery row is written (queued on the store thread, which keeps order)
        before the worker may try it, so it is in the store from then on.
        """
        count = 0
        now = datetime.fromtimestamp(self._clock(), UTC)
        for s in self.settings:
            if not s.wants(alert):
                continue
            d = DeliveryRecord(
                id=secrets.token_hex(16),
                webhook=s.url,
                worker=self.worker,
                device=device,
                alert_id=str(alert.get("id", "")),
                alert=dict(alert),
                created=now,
                tries=0,
            )
            try:
                self.store.write(self.store.webhook_queued, d)
            except RuntimeError:  # the store is closed: nothing can keep it
                logger.error("%s: alert %s not queued for %s: store closed",
                             device, d.alert_id, s.url)  # fmt: skip
                continue
            count += 1
            hook = self._hooks.get(s.url)
            if hook is not None and not self._closed:
                hook.queue.put_nowait(d)
            # else: not started or closing; the row is resumed at the next start
        return count

    async def close(self) -> None:
        """Stop the workers. Deliveries not done stay pending in the store and are resumed
        at the next start: they did not fail, so they are not dead letters (one being
        sent when stopped may reach its receiver twice; the delivery id tells)."""
        self._closed = True
        for hook in self._hooks.values():
            if hook.task is not None:
                hook.task.cancel()
        for hook in self._hooks.values():
            if hook.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await hook.task
                hook.task = None
        left = sum(h.queue.qsize() for h in self._hooks.values())
        if self._hooks:
            st = self.stats
            logger.info("webhooks stopped: delivered=%d retried=%d dead=%d resumed=%d; %d "
                        "left pending for the next start", st.delivered, st.retried, st.dead,
                        st.resumed, left)  # fmt: skip
        if self._session is not None:
            await self._session.close()
            self._session = None
        if (current := asyncio.current_task()) is not None and current.cancelling():
            raise asyncio.CancelledError

    async def _run(self, hook: _Hook) -> None:
        while True:
            d = await hook.queue.get()
            await self._deliver(hook, d)

    async def _deliver(self, hook: _Hook, d: DeliveryRecord) -> None:
        s = hook.settings
        body = encode_body(d.device, d.alert)
        tries = d.tries
        while True:
            tries += 1
            try:
                await self._attempt(hook, d.id, body)
            except _Failed as exc:
                self.stats.failed[exc.label] += 1
                if not exc.retry or tries >= s.max_tries:
                    self._dead(d, tries, exc.reason)
                    return
                delay = s.backoff(tries, self._rng)
                self.stats.retried += 1
                logger.info(
                    "%s: alert %s to %s: %s; try %d of %d in %.2fs",
                    d.device, d.alert_id, s.url, exc.reason, tries + 1, s.max_tries, delay,
                )  # fmt: skip
                self.store.write(self.store.webhook_tried, d.id, tries)
                await asyncio.sleep(delay)
                continue
            self.stats.delivered += 1
            self.store.write(self.store.webhook_delivered, d.id)
            logger.info("%s: alert %s delivered to %s (try %d)", d.device, d.alert_id, s.url,
                        tries)  # fmt: skip
            return

    async def _attempt(self, hook: _Hook, delivery: str, body: bytes) -> None:
        """One POST; returns on 2xx, raises ``_Failed`` otherwise."""
        assert self._session is not None
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(hook.secret, body),
            TIMESTAMP_HEADER: str(int(self._clock())),
            DELIVERY_HEADER: delivery,
        }
        try:
            async with asyncio.timeout(hook.settings.timeout_s):
                async with self._session.post(
                    hook.settings.url, data=body, headers=headers, allow_redirects=False
                ) as resp:
                    status = resp.status
                    await resp.content.read(4096)  # the answer is not used; bounded
        except TimeoutError:
            raise _Failed("timed out", retry=True, label="timeout") from None
        except aiohttp.ClientError as exc:
            raise _Failed(f"{type(exc).__name__}: {exc}", retry=True, label="connection") from None
        if 200 <= status < 300:
            return
        retry = status >= 500 or status in RETRIED_STATUSES
        raise _Failed(f"HTTP {status}", retry=retry, label=f"http-{status // 100}xx")

    def _dead(self, d: DeliveryRecord, tries: int, reason: str) -> None:
        self.stats.dead += 1
        logger.error("%s: alert %s to %s given up after %d tries: %s (dead letter %s)",
                     d.device, d.alert_id, d.webhook, tries, reason, d.id)  # fmt: skip
        now = datetime.fromtimestamp(self._clock(), UTC)
        self.store.write(self.store.dead_letter, d.id, tries, reason, now)


__all__ = [
    "DELIVERY_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "WebhookSettings",
    "WebhookStats",
    "Webhooks",
    "encode_body",
    "read_webhook_secret",
    "sign",
]
