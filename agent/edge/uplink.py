"""Sends the outbox's alerts to the relay and deletes them when the relay acknowledges them.

``AlertUplink`` owns one task. While the MQTT session is connected it publishes
the oldest pending alerts (at most ``window`` unacknowledged at a time) on the
device's ``alert`` topic (QoS 1). An alert stays in the outbox until an
``alert/ack`` naming it comes back; one not acknowledged within
``ack_timeout`` is sent again, and so is everything unacknowledged after the
session reconnects (the relay may have lost it with its connection). The relay
stores each alert id once and acknowledges duplicates too, so resending is
always safe, and stops once the ack gets through.

Acks arrive on the session's receive stream, which the call runtime reads; it
hands each ``alert/ack`` payload to ``on_ack`` (synchronous, never blocks: the
ids are deleted from the outbox by the uplink's task, on the outbox's thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from agent.edge.alerts import Alert, AlertError, decode_ack
from agent.edge.outbox import Outbox
from agent.service.systemd import journal_fields
from agent.signaling.mqtt import MqttError, MqttSession
from agent.signaling.topics import Kind
from agent.tasks import cancel_and_wait

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UplinkConfig:
    """Timers and window of the uplink (tests shrink the timers)."""

    ack_timeout: float = 30.0
    """Seconds to wait for the relay's ack before sending an alert again."""
    window: int = 32
    """Alerts sent and not yet acknowledged, at most."""
    poll_interval: float = 1.0
    """Seconds between looks at the session's connection state while idle."""
    retry_delay: float = 2.0
    """Seconds before trying again after the outbox itself failed (e.g. a full disk)."""

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("uplink window must be at least 1")
        for name in ("ack_timeout", "poll_interval", "retry_delay"):
            if getattr(self, name) <= 0:
                raise ValueError(f"uplink {name} must be positive")


@dataclass(slots=True)
class UplinkStats:
    """Counters since start."""

    sent: int = 0
    """Publishes the broker confirmed (first sends and resends)."""
    resent: int = 0
    """Sends of an alert already sent before (ack timeout or reconnect)."""
    acked: int = 0
    """Alerts deleted from the outbox on the relay's ack."""
    publish_failed: int = 0
    bad_acks: Counter[str] = field(default_factory=Counter)
    """``alert/ack`` payloads refused, by ``AlertError.label``."""
    outbox_failed: int = 0
    """Rounds in which the outbox raised (each retried after ``retry_delay``)."""


DRAIN_POLL_S = 0.05
"""How often ``drain`` looks whether the outbox is empty yet."""


class AlertUplink:
    """Publishes pending alerts and applies acks; ``start()``, then ``close()``."""

    def __init__(
        self,
        session: MqttSession,
        outbox: Outbox,
        config: UplinkConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._outbox = outbox
        self.config = config or UplinkConfig()
        self._clock = clock
        self._stats = UplinkStats()
        self._sent_at: dict[str, float] = {}
        """Alerts sent and not acknowledged yet, by id: when (``clock``) they went out."""
        self._publishing: dict[str, asyncio.Task[None]] = {}
        self._acks: list[str] = []
        """Acknowledged ids the task has not deleted yet."""
        self._wake = asyncio.Event()
        """Set by ``submit``/``on_ack``/publish results; cleared only by the task, before it
        looks at the state again, so no wake-up is missed."""
        self._look = True
        """The outbox may hold alerts the task has not considered yet."""
        self._connects = -1
        self._task: asyncio.Task[None] | None = None

    @property
    def stats(self) -> UplinkStats:
        """A snapshot of the counters."""
        return replace(self._stats, bad_acks=Counter(self._stats.bad_acks))

    @property
    def unacked(self) -> int:
        """Alerts sent and waiting for their ack."""
        return len(self._sent_at)

    async def drain(self, within_s: float) -> int:
        """Wait up to ``within_s`` for the relay to acknowledge all the outbox holds (a
        clean stop sends what it can); how many alerts are left, kept for the next start."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                # The outbox is a database: there is no event to wait on, so look again.
                while self._session.connected and await self._outbox.count() > 0:  # noqa: ASYNC110
                    await asyncio.sleep(DRAIN_POLL_S)
        return await self._outbox.count()

    def start(self) -> None:
        """Start the task (the session may still be connecting)."""
        if self._task is not None:
            raise RuntimeError("AlertUplink already started")
        device = self._session.device_id
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"alert-uplink-{device}"
        )

    async def close(self) -> None:
        """Stop the task and any publish in progress; the outbox keeps what is unacked."""
        tasks = [self._task, *self._publishing.values()]
        self._task = None
        self._publishing.clear()
        await cancel_and_wait(*tasks)

    async def submit(self, alert: Alert, *, held: bool = False) -> str:
        """Store ``alert`` in the outbox (durably) and have it sent; its id. ``held``: sent
        only once ``release`` gives its final form (it waits for its clip)."""
        alert_id = await self._outbox.add(alert, held=held)
        if not held:
            self._look = True
            self._wake.set()
        return alert_id

    async def release(self, alert: Alert) -> bool:
        """Send the held alert of ``alert.id`` as ``alert``; False if it is gone (dropped)."""
        released = await self._outbox.release(alert)
        self._look = True
        self._wake.set()
        return released

    def on_ack(self, payload: bytes) -> None:
        """An ``alert/ack`` payload from the session; malformed ones are counted and logged."""
        try:
            ids = decode_ack(payload)
        except AlertError as exc:
            self._stats.bad_acks[exc.label] += 1
            logger.warning("%s: bad alert ack: %s", self._session.device_id, exc)
            return
        self._acks.extend(ids)
        self._wake.set()

    # --- the task ---

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                timeout = await self._round()
            except Exception:
                self._stats.outbox_failed += 1
                logger.exception("%s: alert uplink round failed", self._session.device_id)
                timeout = self.config.retry_delay
                self._look = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _round(self) -> float:
        """Apply acks, send what is due; seconds until something is due again."""
        if self._acks:
            ids, self._acks = self._acks, []
            try:
                self._stats.acked += await self._outbox.acked(ids)
            except BaseException:
                self._acks[:0] = ids
                raise
            for alert_id in ids:
                self._sent_at.pop(alert_id, None)
            self._look = True  # the window has room again
        connects = self._session.stats.connects
        if connects != self._connects:
            # A new connection: what the relay had not acknowledged may be lost with the
            # old one. Everything unacknowledged goes again.
            self._connects = connects
            self._sent_at = dict.fromkeys(self._sent_at, -math.inf)
            self._look = True
        if not self._session.connected:
            return self.config.poll_interval
        now = self._clock()
        timeout = self.config.ack_timeout
        if any(now - sent >= timeout for sent in self._sent_at.values()):
            self._look = True
        if self._look:
            self._look = False
            for alert in await self._outbox.pending(self.config.window):
                self._maybe_send(alert, now)
        due = [sent + timeout - now for sent in self._sent_at.values()]
        return max(0.0, min([self.config.poll_interval, *due]))

    def _maybe_send(self, alert: Alert, now: float) -> None:
        if alert.id in self._publishing:
            return
        sent = self._sent_at.get(alert.id)
        if sent is not None and now - sent < self.config.ack_timeout:
            return
        if sent is not None:
            self._stats.resent += 1
            logger.info("%s: alert %s not acknowledged: sending it again",
                        self._session.device_id, alert.id)  # fmt: skip
        self._sent_at[alert.id] = now
        with journal_fields(ALERT_ID=alert.id):  # the publish task's lines carry it
            self._publishing[alert.id] = asyncio.get_running_loop().create_task(
                self._publish(alert), name=f"alert-publish-{alert.id[:8]}"
            )

    async def _publish(self, alert: Alert) -> None:
        try:
            await self._session.publish(Kind.ALERT, alert.to_json())
        except (MqttError, AlertError) as exc:
            self._stats.publish_failed += 1
            logger.warning("%s: alert %s not sent: %s", self._session.device_id, alert.id, exc)
            if alert.id in self._sent_at:  # not acked meanwhile: due after ``retry_delay``
                self._sent_at[alert.id] = (
                    self._clock() - self.config.ack_timeout + self.config.retry_delay
                )
        else:
            self._stats.sent += 1
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s: alert %s sent", self._session.device_id, alert.id)
        finally:
            self._publishing.pop(alert.id, None)
            self._wake.set()


__all__ = ["AlertUplink", "UplinkConfig", "UplinkStats"]
