"""The relay service: one MQTT connection, presence, call routing and commands over the store.

``Relay`` owns one ``MqttClient`` subscribed to every device's presence, the
shared subscription of every device's ``out`` (so several relay workers split the
signaling load; ``cloud_relay.sync`` keeps their call tables the same), the
workers' sync topic and every device's ``reply``. One task reads all messages in
order and dispatches them by topic kind. Publishes and store writes are
started in that order and not awaited by the reader, so a slow broker or
database never stalls routing; both are tracked and awaited in ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from agent.signaling import topics
from agent.signaling.envelope import to_json
from agent.signaling.mqtt import Message, MqttClient, MqttConfig, PublishFailed
from agent.signaling.topics import Kind, TopicError
from cloud_relay.commands import CommandError, CommandTimeout, Requester
from cloud_relay.config import RelayConfig
from cloud_relay.presence import PresenceError, PresenceTable, parse_presence
from cloud_relay.routing import (
    Action,
    CallAnswered,
    CallEnded,
    CallEvent,
    CallStarted,
    Route,
    Router,
)
from cloud_relay.store import Store, utc_from_ms
from cloud_relay.sync import RELAY_SYNC_TOPIC, SyncError, decode, encode

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RelayStats:
    """Counters since start."""

    presence_updates: int = 0
    presence_malformed: int = 0
    received: int = 0
    """Messages taken from the ``out`` topics."""
    forwarded: int = 0
    rejected: int = 0
    """Invites answered by the relay with a decline."""
    forged: int = 0
    """Envelopes whose ``from`` was not the topic's device (overwritten, then routed)."""
    synced: int = 0
    """Call events applied from other relay workers."""
    publish_failed: int = 0
    store_failed: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    """Dropped messages by reason (``malformed-<field>``, ``stale``, ``unknown-call``, ...)."""


def mqtt_config(config: RelayConfig) -> MqttConfig:
    host, port = config.broker.endpoint()
    connection = config.mqtt.mqtt_config(config.mqtt.client_id, host, port)
    return replace(connection, max_incoming=10_000)


SUBSCRIPTIONS = (
    topics.all_devices(Kind.PRESENCE),
    topics.RELAY_OUT_FILTER,
    topics.all_devices(Kind.REPLY),
    RELAY_SYNC_TOPIC,
)


class Relay:
    """Presence, routing and commands; ``start()`` then ``close()``."""

    def __init__(
        self,
        config: RelayConfig,
        store: Store,
        *,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self.config = config
        self.worker = config.mqtt.client_id
        self.store = store
        self.stats = RelayStats()
        self.client = MqttClient(mqtt_config(config), subscriptions=SUBSCRIPTIONS)
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self.presence = PresenceTable()
        self.router = Router(self.presence, config.policy, config.routing)
        self.requester = Requester(self.client)
        self._reader: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Future[Any]] = set()

    async def start(self) -> None:
        """Load state from the store, connect (``ConnectFailed`` after the connect timeout)."""
        known = await self.store.run(self.store.devices)
        self.presence = PresenceTable({d.id: d.presence for d in known})
        self.router.presence = self.presence
        open_calls = await self.store.run(lambda: self.store.calls(open_only=True))
        self.router.restore((c.id, c.caller, c.callee, c.answered is not None) for c in open_calls)
        logger.info("loaded %d devices and %d open calls", len(known), len(open_calls))
        await self.client.start()
        self._reader = asyncio.create_task(self._read(), name="relay-reader")

    async def close(self) -> None:
        """Stop reading, let started publishes and writes finish, disconnect."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        self.requester.cancel_all()
        if self._pending:
            await asyncio.wait(self._pending, timeout=self.config.mqtt.publish_timeout)
        await self.client.close()
        if (current := asyncio.current_task()) is not None and current.cancelling():
            raise asyncio.CancelledError

    async def send_command(
        self,
        device: str,
        name: str,
        args: Mapping[str, Any] | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109 (also the request's MQTT expiry)
    ) -> dict[str, Any]:
        """Send a command, record it and its outcome in the store, return the reply."""
        correlation = secrets.token_bytes(16)
        args = dict(args or {})
        sent = utc_from_ms(self._clock_ms())
        await self.store.run(self.store.command_sent, correlation.hex(), device, name, args, sent)
        try:
            reply = await self.requester.request(device, name, args, timeout, correlation)
        except CommandTimeout:
            self._write(self.store.command_finished, correlation.hex(), "timeout")
            raise
        except (CommandError, PublishFailed) as exc:
            error = {"error": str(exc)}
            self._write(self.store.command_finished, correlation.hex(), "failed", error)
            raise
        status = "ok" if reply.get("ok", True) is not False else "error"
        self._write(self.store.command_finished, correlation.hex(), status, reply)
        return reply

    # --- the reader ---

    async def _read(self) -> None:
        while True:
            msg = await self.client.recv()
            try:
                self._dispatch(msg)
            except Exception:
                logger.exception("relay: failed to handle a message on %s", msg.topic[:120])

    def _dispatch(self, msg: Message) -> None:
        if msg.topic == RELAY_SYNC_TOPIC:
            self._on_sync(msg.payload)
            return
        try:
            device, kind = topics.parse_topic(msg.topic)
        except TopicError as exc:
            self.stats.dropped["bad-topic"] += 1
            logger.warning("dropped message: %s", exc)
            return
        if kind is Kind.PRESENCE:
            self._on_presence(device, msg.payload)
        elif kind is Kind.OUT:
            self._on_out(device, msg.payload)
        elif kind is Kind.REPLY:
            if not self.requester.deliver(msg):
                logger.debug("%s: reply nobody waits for", device)
        else:
            self.stats.dropped["bad-topic"] += 1

    def _on_presence(self, device: str, payload: bytes) -> None:
        if not payload:
            return  # a retained presence being cleared
        try:
            presence = parse_presence(payload)
        except PresenceError as exc:
            self.stats.presence_malformed += 1
            logger.warning("%s: bad presence: %s", device, exc)
            return
        self.stats.presence_updates += 1
        changed = self.presence.update(device, presence.state)
        if changed:
            logger.info("%s: presence %s", device, presence.state)
        groups = sorted(self.config.policy.groups_of(device))
        self._write(
            self.store.record_presence,
            device,
            presence.state,
            utc_from_ms(self._clock_ms()),
            board=presence.board,
            version=presence.version,
            group=groups[0] if groups else None,
        )

    def _on_sync(self, payload: bytes) -> None:
        try:
            worker, events = decode(payload)
        except SyncError as exc:
            self.stats.dropped["bad-sync"] += 1
            logger.warning("dropped a sync message: %s", exc)
            return
        if worker == self.worker:
            return  # our own, back from the broker
        self.stats.synced += len(events)
        for event in events:
            self.router.apply(event)

    def _on_out(self, device: str, payload: bytes) -> None:
        self.stats.received += 1
        now = self._clock_ms()
        route = self.router.route(device, payload, now)
        if route.forged:
            self.stats.forged += 1
            logger.warning("%s: claimed another sender; 'from' overwritten", device)
        self._record(route, now)
        env = route.envelope
        if route.action is Action.DROP or env is None:
            self.stats.dropped[route.reason] += 1
            logger.warning(
                "%s: dropped %s (call %s): %s",
                device,
                env.type if env is not None else "message",
                env.call if env is not None else "-",
                route.reason,
            )
            return
        if route.action is Action.REJECT:
            self.stats.rejected += 1
            logger.info("%s: invite %s refused: %s", device, env.call, route.reason)
        else:
            self.stats.forwarded += 1
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s -> %s: %s (call %s)", env.from_, env.to, env.type, env.call)
            if route.events:
                # Before the forward: the other workers must know the call first (sync.py).
                self._track(self._publish(RELAY_SYNC_TOPIC, encode(self.worker, route.events)))
        self._track(self._publish(topics.device_topic(env.to, Kind.IN), to_json(env).encode()))

    def _record(self, route: Route, now_ms: int) -> None:
        at = utc_from_ms(now_ms)
        for event in route.events:
            self._record_event(event, at)

    def _record_event(self, event: CallEvent, at: Any) -> None:
        match event:
            case CallStarted(call=call, caller=caller, callee=callee, mode=mode):
                self._write(self.store.call_started, call, caller, callee, mode, at)
            case CallAnswered(call=call):
                self._write(self.store.call_answered, call, at)
            case CallEnded(call=call, reason=reason):
                self._write(self.store.call_ended, call, reason, at)

    async def _publish(self, topic: str, payload: bytes) -> None:
        try:
            await self.client.publish(topic, payload, qos=1)
        except PublishFailed as exc:
            self.stats.publish_failed += 1
            logger.warning("publish to %s failed: %s", topic, exc)

    def _write(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        fut = self.store.submit(lambda: fn(*args, **kwargs))
        self._pending.add(fut)
        fut.add_done_callback(self._write_done)

    def _write_done(self, fut: asyncio.Future[Any]) -> None:
        self._pending.discard(fut)
        if not fut.cancelled() and (exc := fut.exception()) is not None:
            self.stats.store_failed += 1
            logger.error("store write failed: %r", exc)

    def _track(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
