"""The relay service: one MQTT connection, presence, call routing and commands over the store.

``Relay`` owns one ``MqttClient`` subscribed to every device's presence, the
shared subscription of every device's ``out`` (so several relay workers split the
signaling load; ``cloud_relay.sync`` keeps their call tables the same), the
workers' sync topic and every device's ``reply``. One task reads all messages in
order and dispatches them by topic kind. Publishes and store writes are
started in that order and not awaited by the reader, so a slow broker or
database never stalls routing; both are tracked and awaited in ``close()``.

Under load the reader takes many messages per wake-up. What routing them
publishes goes out once the reader has taken every message waiting: first one
sync message with all their call events (``cloud_relay.sync``: the other workers
learn of the calls before any forward, as before), then the forwards and
rejections in routing order. One sync message per batch instead of one per call
event is a good part of what lets one relay route thousands of messages a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from agent.edge.alerts import Alert, AlertError, decode_alert, encode_ack
from agent.edge.clip import ClipError, public_key_text
from agent.service.status import outage_line
from agent.signaling import topics
from agent.signaling.envelope import Envelope, EnvelopeError, InviteBody, from_json, to_json
from agent.signaling.mqtt import Message, MqttClient, MqttConfig, MqttTls, PublishFailed
from agent.signaling.signing import SignatureError
from agent.signaling.topics import Kind, TopicError
from cloud_relay.clips import ClipInfo, ClipKey, check_clip
from cloud_relay.commands import CommandError, Requester, command_summary, decode_reply
from cloud_relay.config import RelayConfig
from cloud_relay.presence import Presence, PresenceError, PresenceTable, parse_presence
from cloud_relay.routing import (
    Action,
    CallAnswered,
    CallEnded,
    CallEvent,
    CallStarted,
    Route,
    Router,
)
from cloud_relay.signatures import FORGED_FROM, Senders
from cloud_relay.store import Store, stored_body, utc_from_ms
from cloud_relay.sync import RELAY_SYNC_TOPIC, SyncError, decode, encode
from cloud_relay.telemetry import TelemetryError, parse_telemetry
from cloud_relay.turn import CallTurnCredentials, call_credentials
from cloud_relay.webhooks import Webhooks

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RelayStats:
    """Counters since start."""

    presence_updates: int = 0
    presence_malformed: int = 0
    offline_absorbed: int = 0
    """Offline reports dropped because the device was back within the grace."""
    received: int = 0
    """Messages taken from the ``out`` topics."""
    forwarded: int = 0
    rejected: int = 0
    """Invites answered by the relay with a decline."""
    forged: int = 0
    """Envelopes whose ``from`` was not the topic's device (signatures required: dropped;
    else overwritten, then routed)."""
    commands_seen: int = 0
    """Commands to devices recorded (from any operator client)."""
    synced: int = 0
    """Call events applied from other relay workers."""
    publish_failed: int = 0
    store_failed: int = 0
    turn_minted: int = 0
    """TURN credentials minted: sent to devices (on their ``config``) and given to web
    pages for their calls (``cloud_relay.webcall``)."""
    store_retried: int = 0
    """Answers and ends written again because another worker's call was not stored yet."""
    alerts_received: int = 0
    """Well-formed alerts taken from the ``alert`` topics (resends included)."""
    alerts_stored: int = 0
    alerts_duplicate: int = 0
    """Alerts whose id was stored already (a resend, or another worker's copy): acked again."""
    alerts_with_clip: int = 0
    """Alerts received with a clip that opened (bad clips: ``dropped[clip-<label>]``)."""
    commands_finished: Counter[str] = field(default_factory=Counter)
    """Commands this worker recorded, by outcome (``ok``, ``error``, ``timeout``)."""
    dropped: Counter[str] = field(default_factory=Counter)
    """Dropped messages by reason (``malformed-<field>``, ``stale``, ``unknown-call``, ...)."""

    def summary(self) -> str:
        """One line for the log: every counter that is not zero."""
        counts = {f.name: getattr(self, f.name) for f in fields(self)}
        parts = [f"{k}={v}" for k, v in counts.items() if v and not isinstance(v, Counter)]
        parts += [f"{k}[{label}]={n}" for k, v in counts.items() if isinstance(v, Counter)
                  for label, n in sorted(v.items())]  # fmt: skip
        return " ".join(parts) or "nothing"


class RelayObserver:
    """Told what the relay takes in, as it happens (``cloud_relay.metrics``,
    ``cloud_relay.homeassistant``). The reader calls these, so each must return at once;
    the defaults ignore it."""

    def presence(self, device: str, presence: Presence) -> None:
        """A presence report the relay took (after the offline grace), changed or not."""

    def alert(self, device: str, alert: Alert) -> None:
        """An alert stored for the first time (not its resends)."""

    def call(self, event: CallEvent) -> None:
        """A call event of a message this worker routed."""

    def routed(self, seconds: float) -> None:
        """A forward handed to the broker ``seconds`` (loop clock) after the reader took
        its message in (a wait for the sender's certificate included); not for messages
        parked until another worker's sync message."""

    def command_reply(self, device: str, cmd_id: str, status: str, reply: dict[str, Any]) -> None:
        """A device's reply to a command (``status``: ``ok`` or ``error``), seen by every
        worker."""


def mqtt_config(config: RelayConfig, tls: MqttTls | None = None) -> MqttConfig:
    """The relay's connection: one client carries every device's signaling, so its windows
    are a device's times the load. Unacknowledged QoS 1 publishes: with an agent's 20, the
    relay could forward no more than 20 per broker round trip, and the round trip grows
    with the load, so a burst stalled it (publishes failed with queue-full)."""
    host, port = config.broker.endpoint()
    connection = config.mqtt.mqtt_config(config.mqtt.client_id, host, port)
    return replace(connection, max_incoming=20_000, max_inflight=1_000, max_queued=20_000, tls=tls)


RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
"""Seconds before writing an answer, an end or a command's outcome again while its row is
not in the store: another worker took the invite or command and has not committed it yet
(6.35 s in all)."""

PARK_S = 2.0
"""How long a message of a call this worker does not know waits for the sync message of
the worker that routed its invite (on one broker, milliseconds)."""

COMMAND_EXPIRY_S = 60
"""A command seen without a message expiry counts as timed out after this long."""

SYNC_EVENTS_PER_MESSAGE = 50
"""At most this many call events per sync message (each well under 300 bytes encoded,
so a message stays below ``sync.MAX_SYNC_BYTES``)."""

SUBSCRIPTIONS = (
    topics.all_devices(Kind.PRESENCE),
    topics.RELAY_OUT_FILTER,
    # Commands from any operator client (the CLI, the API, a dashboard): one worker
    # records each; every worker sees the replies and matches them by correlation data.
    topics.shared(topics.all_devices(Kind.CMD)),
    topics.all_devices(Kind.REPLY),
    RELAY_SYNC_TOPIC,
    # Alerts: one worker takes each; the store drops the copies of resends by alert id.
    topics.shared(topics.all_devices(Kind.ALERT)),
    # Telemetry: one worker stores each record.
    topics.shared(topics.all_devices(Kind.TELEMETRY)),
)


class Relay:
    """Presence, routing and commands; ``start()`` then ``close()``."""

    def __init__(
        self,
        config: RelayConfig,
        store: Store,
        *,
        clock_ms: Callable[[], int] | None = None,
        tls: MqttTls | None = None,
        senders: Senders | None = None,
        turn_secret: str | None = None,
        webhooks: Webhooks | None = None,
        clip_key: ClipKey | None = None,
        observers: Sequence[RelayObserver] = (),
    ) -> None:
        """``tls``: the relay's client certificate, for a broker that takes only those;
        ``senders``: signatures required (paired devices), checked with these;
        ``turn_secret``: coturn's shared secret, to mint TURN credentials with (None: the
        devices get none); ``webhooks``: where new alerts are forwarded (started and
        closed with the relay); ``clip_key``: the relay's clip key, which devices get on
        their ``config`` and seal their alerts' clips to (None: clips are dropped);
        ``observers``: told of presence, alerts, calls and routing as they happen."""
        self.config = config
        self.worker = config.mqtt.client_id
        self.store = store
        self.stats = RelayStats()
        self.client = MqttClient(mqtt_config(config, tls), subscriptions=SUBSCRIPTIONS)
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self.presence = PresenceTable()
        self.router = Router(self.presence, config.policy, config.routing)
        self.requester = Requester(self.client)
        self._reader: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Future[Any]] = set()
        self._sync_events: list[CallEvent] = []
        """Call events of the messages routed since the last flush, for the other workers."""
        self._outbox: list[tuple[str, bytes, float | None]] = []
        """(topic, payload, when its message was taken in) routed since the last flush, in
        routing order; the time (loop clock) only for a forward of a message taken in."""
        self._taken_at: float | None = None
        """When the reader took in the ``out`` message being routed now (loop clock)."""
        self._observers = tuple(observers)
        self._flush_handle: asyncio.Handle | None = None
        self._retries: dict[int, asyncio.TimerHandle] = {}
        """Call and command updates waiting to be written again (``_write_to_record``)."""
        self._retry_keys = itertools.count()
        self._closing = False
        self._offline: dict[str, tuple[asyncio.TimerHandle, Presence, int]] = {}
        """Offline reports waiting out ``presence.offline_grace_s``, by device."""
        self._park_timers: dict[str, asyncio.TimerHandle] = {}
        """Calls with parked messages (``Router``), each until ``PARK_S`` has passed."""
        self._expiries: dict[str, asyncio.TimerHandle] = {}
        """Commands recorded as sent, by id: marked timed out when their expiry passes."""
        self._senders = senders
        self._turn_secret = turn_secret if config.turn.urls else None
        self._turn_issued: dict[str, float] = {}
        """Devices by when (monotonic s) their current TURN credentials were minted."""
        self._turn_refresher: asyncio.Task[None] | None = None
        self.webhooks = webhooks
        self._clip_key = clip_key
        self._fetching: dict[str, list[tuple[bytes, float]]] = {}
        """Devices whose certificate is being read from the store, with their messages
        meanwhile and when they were taken in (routed in order once it is there)."""
        self.web_peers: Callable[[Envelope], None] | None = None
        """Takes what is routed to a web peer (``cloud_relay.webcall``) instead of the broker."""

    def describe(self) -> str:
        """The STATUS line while serving: the broker's state, devices online, calls up."""
        if (outage := self.client.outage) is not None:
            broker = f"{self.client.config.host}:{self.client.config.port}"
            return outage_line(broker, outage, asyncio.get_running_loop().time())
        return (
            f"serving: {self.presence.online()} device(s) online, "
            f"{self.router.open_calls()} call(s) up"
        )

    async def start(self) -> None:
        """Load state from the store, connect (``ConnectFailed`` after the connect timeout)."""
        known = await self.store.run(self.store.devices)
        self.presence = PresenceTable({d.id: d.presence for d in known})
        self.router.presence = self.presence
        if self._senders is not None:
            for device, cert in (await self.store.run(self.store.device_certificates)).items():
                self._senders.learn(device, cert)
        open_calls = await self.store.run(lambda: self.store.calls(open_only=True))
        self.router.restore((c.id, c.caller, c.callee, c.answered is not None) for c in open_calls)
        logger.info("loaded %d devices and %d open calls", len(known), len(open_calls))
        await self.client.start()
        if self.webhooks is not None:
            await self.webhooks.start()
        self._reader = asyncio.create_task(self._read(), name="relay-reader")
        if self._turn_secret is not None:
            self._turn_refresher = asyncio.create_task(self._refresh_turn(), name="relay-turn")

    async def close(self) -> None:
        """Stop reading, let started publishes and writes finish, disconnect."""
        self._closing = True
        for task in (self._reader, self._turn_refresher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._reader = self._turn_refresher = None
        for device, (handle, presence, at_ms) in list(self._offline.items()):
            handle.cancel()  # taken now: nothing will tell a restarted relay otherwise
            self._take_presence(device, presence, at_ms)
        self._flush()  # what the reader routed last
        if self._retries:
            logger.warning("%d updates of calls or commands not in the store dropped at close",
                           len(self._retries))  # fmt: skip
        # Commands in flight stay "sent": their outcome is not known here.
        for handle in (*self._retries.values(), *self._expiries.values(),
                       *self._park_timers.values()):  # fmt: skip
            handle.cancel()
        self._retries.clear()
        self._expiries.clear()
        self._park_timers.clear()
        self.requester.cancel_all()
        if self._pending:
            await asyncio.wait(self._pending, timeout=self.config.mqtt.publish_timeout)
        if self.webhooks is not None:
            await self.webhooks.close()  # undone deliveries stay pending in the store
        await self.client.close()
        if (current := asyncio.current_task()) is not None and current.cancelling():
            raise asyncio.CancelledError

    def originate(self, env: Envelope) -> None:
        """Route a message of a web peer (``cloud_relay.webcall``) as if it had come in on an
        ``out`` topic, signed with the relay's key (``Router.originate``)."""
        if self._senders is not None:
            env = self._senders.sign(env)
        now = self._clock_ms()
        self._after_route(env.from_, self.router.originate(env, now), now)

    async def send_command(
        self,
        device: str,
        name: str,
        args: Mapping[str, Any] | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109 (also the request's MQTT expiry)
    ) -> dict[str, Any]:
        """Send a command and return the reply; the store records it as it records every
        operator's commands (``_on_command``)."""
        correlation = secrets.token_bytes(16)
        return await self.requester.request(device, name, dict(args or {}), timeout, correlation)

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
        elif kind is Kind.CMD:
            self._on_command(device, msg)
        elif kind is Kind.REPLY:
            self._on_reply(device, msg)
        elif kind is Kind.ALERT:
            self._on_alert(device, msg.payload)
        elif kind is Kind.TELEMETRY:
            self._on_telemetry(device, msg.payload)
        else:
            self.stats.dropped["bad-topic"] += 1

    def _on_command(self, device: str, msg: Message) -> None:
        """Record a command some operator client sent to ``device``; its reply (or its
        expiry) finishes the record."""
        if msg.correlation_data is None:
            self.stats.dropped["command-uncorrelated"] += 1
            return  # nobody can match a reply to it: the device answers nothing useful
        cmd_id = msg.correlation_data.hex()[:32]
        name, args = command_summary(msg.payload)
        self.stats.commands_seen += 1
        self._write(self.store.command_sent, cmd_id, device, name, args,
                    utc_from_ms(self._clock_ms()))  # fmt: skip
        expiry = msg.message_expiry if msg.message_expiry is not None else COMMAND_EXPIRY_S
        # Still "sent" by then: nobody answered within the request's own lifetime.
        self._expiries[cmd_id] = asyncio.get_running_loop().call_later(
            expiry + 1, self._command_expired, cmd_id
        )

    def _command_expired(self, cmd_id: str) -> None:
        del self._expiries[cmd_id]
        self.stats.commands_finished["timeout"] += 1
        self._write(self.store.command_finished, cmd_id, "timeout")

    def _on_reply(self, device: str, msg: Message) -> None:
        if not self.requester.deliver(msg):
            logger.debug("%s: reply nobody here waits for", device)
        if msg.correlation_data is None:
            return
        try:
            reply: dict[str, Any] = decode_reply(msg.payload)
        except CommandError as exc:
            reply = {"ok": False, "error": f"bad reply: {exc}"}
        status = "ok" if reply.get("ok", True) is not False else "error"
        cmd_id = msg.correlation_data.hex()[:32]
        if (expiry := self._expiries.pop(cmd_id, None)) is not None:
            expiry.cancel()
            self.stats.commands_finished[status] += 1  # here: this worker recorded it
        self._write_to_record(0, self.store.command_finished, cmd_id, status, reply)
        for observer in self._observers:
            observer.command_reply(device, cmd_id, status, reply)

    def _on_telemetry(self, device: str, payload: bytes) -> None:
        """Store the record; a call's media statistics also become its quality."""
        try:
            record = parse_telemetry(payload)
        except TelemetryError as exc:
            self.stats.dropped["telemetry-malformed"] += 1
            logger.warning("%s: dropped telemetry: %s", device, exc)
            return
        at = utc_from_ms(self._clock_ms())
        self._write(self.store.record_telemetry, device, at, record.event, record.record)
        if (stats := record.call_stats()) is not None:
            self._write_to_record(0, self.store.call_quality, stats[0], device, stats[1])

    def _on_alert(self, device: str, payload: bytes) -> None:
        """Store the alert, then (once committed) acknowledge it to the device, duplicates
        too: a device whose ack was lost sends the alert until one gets through."""
        try:
            alert = decode_alert(payload)
        except AlertError as exc:
            self.stats.dropped[f"alert-{exc.label}"] += 1
            logger.warning("%s: dropped an alert: %s", device, exc)
            return
        self.stats.alerts_received += 1
        clip = self._check_clip(device, alert)
        received = utc_from_ms(self._clock_ms())
        fut = self._write(self.store.record_alert, device, alert, received, clip)
        fut.add_done_callback(functools.partial(self._alert_stored, device, alert, clip))

    def _check_clip(self, device: str, alert: Alert) -> ClipInfo | None:
        """The alert's clip, opened once to prove it whole; a bad one is dropped (counted
        and logged) and the alert stored without it."""
        if alert.clip is None:
            return None
        try:
            if self._clip_key is None:
                raise ClipError("this relay has no clip key", "no-key")
            clip = check_clip(alert.clip, self._clip_key, alert.id)
        except ClipError as exc:
            self.stats.dropped[f"clip-{exc.label}"] += 1
            logger.warning("%s: alert %s stored without its clip: %s", device, alert.id, exc)
            return None
        self.stats.alerts_with_clip += 1
        return clip

    def _alert_stored(
        self, device: str, alert: Alert, clip: ClipInfo | None, fut: asyncio.Future[bool]
    ) -> None:
        alert_id = alert.id
        if fut.cancelled() or fut.exception() is not None:
            return  # counted and logged by ``_write_done``; the device sends it again
        if fut.result():
            self.stats.alerts_stored += 1
            for observer in self._observers:
                observer.alert(device, alert)
            logger.info("%s: alert %s stored%s", device, alert_id, " with a clip" if clip else "")
            if self.webhooks is not None:  # once per alert: only the first store is new
                self.webhooks.submit(device, stored_body(alert, clip))
        else:
            self.stats.alerts_duplicate += 1
        self._publish(topics.device_topic(device, Kind.ALERT_ACK), encode_ack([alert_id]))

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
        now = self._clock_ms()
        grace = self.config.presence.offline_grace_s
        held = self._offline.pop(device, None)
        if held is not None:
            held[0].cancel()
            if presence.reachable:
                self.stats.offline_absorbed += 1
                logger.info("%s: back within the offline grace", device)
        if not presence.reachable and grace > 0 and self.presence.reachable(device):
            handle = asyncio.get_running_loop().call_later(
                grace, self._take_presence, device, presence, now
            )
            self._offline[device] = (handle, presence, now)
            return
        self._take_presence(device, presence, now)

    def _take_presence(self, device: str, presence: Presence, at_ms: int) -> None:
        self._offline.pop(device, None)
        if self.presence.update(device, presence.state):
            logger.info("%s: presence %s", device, presence.state)
            if presence.reachable:
                self._send_config(device)
        for observer in self._observers:
            observer.presence(device, presence)
        groups = sorted(self.config.policy.groups_of(device))
        self._write(
            self.store.record_presence,
            device,
            presence.state,
            utc_from_ms(at_ms),
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
        now = self._clock_ms()
        for event in events:
            for route in self.router.apply(event):
                self._after_route(route.envelope.from_ if route.envelope else "-", route, now)
            if (timer := self._park_timers.pop(event.call, None)) is not None:
                timer.cancel()

    def _on_out(self, device: str, payload: bytes) -> None:
        self.stats.received += 1
        taken_at = asyncio.get_running_loop().time()
        if (waiting := self._fetching.get(device)) is not None:
            waiting.append((payload, taken_at))  # behind the certificate lookup, in order
            return
        self._route_taken(device, payload, taken_at, refetch=True)

    def _route_taken(self, device: str, payload: bytes, taken_at: float, *, refetch: bool) -> None:
        self._taken_at = taken_at
        try:
            self._route_signed(device, payload, refetch=refetch)
        finally:
            self._taken_at = None

    def _route_signed(self, device: str, payload: bytes, *, refetch: bool) -> None:
        now = self._clock_ms()
        senders = self._senders
        if senders is None:
            self._after_route(device, self.router.route(device, payload, now), now)
            return
        try:
            env = from_json(payload)
        except EnvelopeError as exc:
            self._after_route(device, Route(Action.DROP, reason=exc.label), now)
            return
        if env.from_ != device:
            self.stats.forged += 1
            self._after_route(device, Route(Action.DROP, env, reason=FORGED_FROM), now)
            return
        if not senders.knows(device):
            self._fetch_certificate(device, payload)
            return
        try:
            env = senders.check(env)
        except SignatureError as exc:
            if refetch and exc.reason in ("bad-signature", "wrong-signer"):
                # Paired again since we read its certificate? Read it once more.
                self._fetch_certificate(device, payload)
                return
            self._after_route(device, Route(Action.DROP, env, reason=exc.reason), now)
            return
        self._after_route(device, self.router.route_envelope(device, env, now), now)

    def _fetch_certificate(self, device: str, payload: bytes) -> None:
        assert self._taken_at is not None  # only for a message being taken in
        self._fetching[device] = [(payload, self._taken_at)]
        fut = self.store.submit(self.store.device_certificate, device)
        fut.add_done_callback(functools.partial(self._certificate_read, device))

    def _certificate_read(self, device: str, fut: asyncio.Future[str | None]) -> None:
        waiting = self._fetching.pop(device, [])
        if self._closing:
            return
        cert = None if fut.cancelled() or fut.exception() is not None else fut.result()
        assert self._senders is not None
        changed = cert is not None and self._senders.learn(device, cert)
        now = self._clock_ms()
        for payload, taken_at in waiting:
            if not self._senders.knows(device):
                self._after_route(device, Route(Action.DROP, reason="unpaired-sender"), now)
                continue
            self._route_taken(device, payload, taken_at, refetch=False)
        if cert is None:
            logger.warning("%s: no certificate in the store (not paired here?)", device)
        elif changed:
            logger.info("%s: certificate read from the store", device)

    def _expire_parked(self, call: str) -> None:
        del self._park_timers[call]
        now = self._clock_ms()
        for route in self.router.expire(call):
            self._after_route(route.envelope.from_ if route.envelope else "-", route, now)

    def _after_route(self, device: str, route: Route, now: int) -> None:
        if route.action is Action.PARK:
            if route.envelope is not None and route.envelope.call not in self._park_timers:
                call = route.envelope.call
                self._park_timers[call] = asyncio.get_running_loop().call_later(
                    PARK_S, self._expire_parked, call
                )
            return
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
            if self._senders is not None:
                env = self._senders.sign(env)
        else:
            self.stats.forwarded += 1
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s -> %s: %s (call %s)", env.from_, env.to, env.type, env.call)
            # Published before the forward: the other workers must know the call first.
            self._sync_events += route.events
            if isinstance(env.body, InviteBody):
                # Each party's TURN credentials serve one call: the callee's arrive before
                # the invite (for this call), the caller's for its next one.
                self._send_turn(env.to)
                self._send_turn(env.from_)
        if topics.is_web_peer(env.to):  # the relay is its endpoint: no topic, no broker
            if self.web_peers is not None:
                self.web_peers(env)
        else:
            taken_at = self._taken_at if route.action is Action.FORWARD else None
            topic = topics.device_topic(env.to, Kind.IN)
            self._outbox.append((topic, to_json(env).encode(), taken_at))
        if self._flush_handle is None:
            # After the reader has taken every message waiting now (it does not yield
            # while the receive queue has more).
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Publish the sync message(s) of everything routed since the last flush, then the
        routed messages."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        events, self._sync_events = self._sync_events, []
        outbox, self._outbox = self._outbox, []
        for start in range(0, len(events), SYNC_EVENTS_PER_MESSAGE):
            chunk = events[start : start + SYNC_EVENTS_PER_MESSAGE]
            self._publish(RELAY_SYNC_TOPIC, encode(self.worker, chunk))
        for topic, payload, _ in outbox:
            self._publish(topic, payload)
        if self._observers:
            now = asyncio.get_running_loop().time()
            for *_, taken_at in outbox:
                if taken_at is not None:
                    for observer in self._observers:
                        observer.routed(now - taken_at)

    def _record(self, route: Route, now_ms: int) -> None:
        at = utc_from_ms(now_ms)
        for event in route.events:
            self._record_event(event, at)
            for observer in self._observers:
                observer.call(event)

    def _record_event(self, event: CallEvent, at: Any) -> None:
        match event:
            case CallStarted(call=call, caller=caller, callee=callee, mode=mode):
                self._write(self.store.call_started, call, caller, callee, mode, at)
            case CallAnswered(call=call):
                self._write_to_record(0, self.store.call_answered, call, at)
            case CallEnded(call=call, reason=reason):
                self._write_to_record(0, self.store.call_ended, call, reason, at)

    def _write_to_record(self, attempt: int, fn: Callable[..., bool], key: str, *args: Any) -> None:
        """Update the call or command ``key``; again later while the store has no such row.

        Another worker may have routed the invite (or taken the command) and not committed
        it yet (its writes are not ordered with ours), so a missing row is tried again
        after each of ``RETRY_DELAYS`` before it is given up with a warning.
        """
        fut = self._write(fn, key, *args)

        def done(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled() or fut.exception() is not None or fut.result():
                return
            if self._closing or attempt >= len(RETRY_DELAYS):
                self.stats.dropped["record-not-stored"] += 1
                if not self._closing:
                    logger.warning("%s %s: not recorded: no such row in the store",
                                   fn.__name__, key)  # fmt: skip
                return
            self.stats.store_retried += 1
            handle = next(self._retry_keys)
            self._retries[handle] = asyncio.get_running_loop().call_later(
                RETRY_DELAYS[attempt], self._retry, handle, attempt + 1, fn, key, *args
            )

        fut.add_done_callback(done)

    def _retry(
        self, handle: int, attempt: int, fn: Callable[..., bool], key: str, *args: Any
    ) -> None:
        del self._retries[handle]
        self._write_to_record(attempt, fn, key, *args)

    def _send_turn(self, device: str) -> None:
        """Fresh TURN credentials on the device's retained ``config`` (if there are any)."""
        if self._turn_secret is not None and topics.is_device_id(device):  # not a web peer
            self._send_config(device)

    def _send_config(self, device: str) -> None:
        """The device's retained ``config``, whole (a retained message is replaced, not
        merged): fresh TURN credentials and the relay's clip key."""
        desired: dict[str, Any] = {}
        if (creds := self.turn_credentials()) is not None:
            desired["turn"] = [creds.to_json()]
            self._turn_issued[device] = time.monotonic()
        if self._clip_key is not None:
            desired["clip_key"] = public_key_text(self._clip_key.public)
        if desired:
            payload = json.dumps(desired, separators=(",", ":")).encode()
            self._publish(topics.device_topic(device, Kind.CONFIG), payload, retain=True)

    def turn_credentials(self) -> CallTurnCredentials | None:
        """Fresh TURN credentials for one call party (a device's ``config``, a web page's
        call: ``cloud_relay.webcall``); None when the relay has no TURN server."""
        if self._turn_secret is None:
            return None
        self.stats.turn_minted += 1
        return call_credentials(self.config.turn, self._turn_secret)

    async def _refresh_turn(self) -> None:
        """Before a device's credentials pass half their lifetime it gets new ones, so it
        always holds some that coturn takes for a new allocation."""
        half = self.config.turn.lifetime_s / 2
        while True:
            now = time.monotonic()
            for device in self.presence.devices():
                stale = now - self._turn_issued.get(device, now - half) >= half
                if stale and self.presence.reachable(device):
                    self._send_turn(device)
            await asyncio.sleep(half / 4)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """``_publish`` for the relay's add-ons (``cloud_relay.homeassistant``)."""
        self._publish(topic, payload, retain=retain)

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 without waiting; a failure is counted and logged."""
        try:
            fut = self.client.publish_nowait(topic, payload, qos=1, retain=retain)
        except PublishFailed as exc:
            self._publish_failed(topic, exc)
            return
        self._pending.add(fut)
        fut.add_done_callback(functools.partial(self._published, topic))

    def _published(self, topic: str, fut: asyncio.Future[None]) -> None:
        self._pending.discard(fut)
        if not fut.cancelled() and isinstance(exc := fut.exception(), PublishFailed):
            self._publish_failed(topic, exc)

    def _publish_failed(self, topic: str, exc: PublishFailed) -> None:
        self.stats.publish_failed += 1
        logger.warning("publish to %s failed: %s", topic, exc)

    def _write(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        fut = self.store.write(fn, *args, **kwargs)
        self._pending.add(fut)
        fut.add_done_callback(self._write_done)
        return fut

    def _write_done(self, fut: asyncio.Future[Any]) -> None:
        self._pending.discard(fut)
        if not fut.cancelled() and (exc := fut.exception()) is not None:
            self.stats.store_failed += 1
            logger.error("store write failed: %r", exc)
