"""MQTT v5 on paho-mqtt, driven by the asyncio loop (ARCHITECTURE.md, "Control plane").

paho types stop in this module. There is no paho network thread: the socket is
watched with ``loop.add_reader``/``add_writer`` (paho's socket callbacks say when
it has something to write), keep-alive runs from a ``call_later`` timer calling
``loop_misc``, and only the blocking TCP/TLS connect (``Client.reconnect``) runs
in a worker thread, while nothing else touches the client, so that a slow or
unreachable broker never stalls the loop.

Two layers:

* ``MqttClient``: one connection with a fixed set of subscriptions, an optional
  status topic (retained "online" payload published on every connect, the same
  topic's "offline" payload as the will and on ``close()``), QoS 1 publishes that
  wait for their PUBACK, reconnection forever with exponential backoff and jitter,
  and incoming messages as a pull API. Tests, tools and the relay use it directly.
* ``MqttSession``: the agent's device session on top of it: topics from
  ``agent.signaling.topics``, JSON presence, ``publish(kind, ...)``, and
  ``recv()`` giving ``Incoming`` messages of the device's own subscribed kinds.

Delivery contract for QoS 1: ``publish`` returns once the broker's PUBACK arrived,
or raises ``PublishFailed`` with a reason (timeout, queue full, broker refusal,
session closed). Messages published while disconnected wait in a bounded queue
and go out after the next connect; messages unacknowledged when a connection
drops are sent again on the next one. A timeout after the message went out
means "not confirmed", not "not delivered": it may still have reached the broker,
and it is never sent again after the failure was reported. QoS 0 is
fire-and-forget: it fails at once while disconnected and is otherwise only handed
to the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import random
import socket
import ssl
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.signaling import topics
from agent.signaling.topics import Kind, TopicError

logger = logging.getLogger(__name__)

OFFLINE_PRESENCE: Final[Mapping[str, object]] = {"state": "offline"}
"""Presence of a device that is gone: the will (LWT) and what ``close()`` publishes."""


# --- configuration and public data -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MqttTls:
    """TLS towards the broker; pairing fills it in (device certificate and the relay's CA)."""

    ca_file: Path | None = None
    """CA bundle that signs the broker certificate; None: the system's trusted CAs."""
    cert_file: Path | None = None
    """PEM client certificate (its subject is the MQTT identity); None: no client certificate."""
    key_file: Path | None = None
    """PEM private key of ``cert_file``; None: the key is inside ``cert_file``."""

    def context(self) -> ssl.SSLContext:
        """A client context verifying the broker (TLS 1.2 or later)."""
        ctx = ssl.create_default_context(cafile=None if self.ca_file is None else str(self.ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            ctx.load_cert_chain(
                str(self.cert_file), None if self.key_file is None else str(self.key_file)
            )
        return ctx


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """One broker connection. Every protocol timer is here so that tests can shrink it."""

    client_id: str
    """MQTT client id; for an agent, its device id (it names the persistent session)."""
    host: str = "127.0.0.1"
    """Broker host name or address."""
    port: int = 1883
    """Broker TCP port (8883 is the usual one for TLS)."""
    keepalive: int = 30
    """MQTT keep-alive in whole seconds; the broker declares us gone after 1.5x this."""
    session_expiry: int = 3600
    """Seconds the broker keeps our session (subscriptions, queued QoS 1) after we go."""
    backoff_min: float = 0.5
    """First reconnect delay in seconds; it doubles after each failed attempt."""
    backoff_max: float = 60.0
    """Largest reconnect delay in seconds."""
    backoff_jitter: float = 0.5
    """Fraction of each delay that is random (0: none, 1: anywhere from 0 to the delay)."""
    connect_timeout: float = 10.0
    """Seconds one attempt may take (TCP, TLS, CONNACK, SUBACK); also ``start()``'s limit."""
    publish_timeout: float = 30.0
    """Seconds a QoS 1 publish may wait, queued and in flight, for its PUBACK."""
    misc_interval: float = 1.0
    """Seconds between keep-alive checks (paho ``loop_misc``); well below ``keepalive``."""
    max_inflight: int = 20
    """QoS 1 messages sent but not yet acknowledged, at most."""
    max_queued: int = 1000
    """Outgoing QoS 1 messages waiting or in flight, at most; more fail at once."""
    max_incoming: int = 256
    """Received messages waiting for ``recv()``, at most; more are dropped and counted."""
    max_packet_bytes: int = 256 * 1024
    """Largest packet the broker may send us (MQTT v5 Maximum Packet Size); it drops larger."""
    tls: MqttTls | None = None
    """TLS settings; None: plain TCP (loopback labs only)."""
    username: str | None = None
    """MQTT user name, if the broker wants one (with client certificates it is their subject)."""
    password: str | None = None
    """MQTT password, with ``username``."""

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ValueError("MqttConfig: client_id is required")
        if not 0 < self.port < 65536:
            raise ValueError(f"MqttConfig: bad port {self.port}")
        if not 0 < self.keepalive <= 65535:
            raise ValueError("MqttConfig: keepalive must be 1-65535 seconds")
        if not 0 <= self.session_expiry <= 0xFFFFFFFF:
            raise ValueError("MqttConfig: session_expiry must be 0-4294967295 seconds")
        if not 0 < self.backoff_min <= self.backoff_max:
            raise ValueError("MqttConfig: need 0 < backoff_min <= backoff_max")
        if not 0 <= self.backoff_jitter <= 1:
            raise ValueError("MqttConfig: backoff_jitter must be between 0 and 1")
        for name in ("connect_timeout", "publish_timeout", "misc_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MqttConfig: {name} must be > 0")
        for name in ("max_inflight", "max_queued", "max_incoming", "max_packet_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"MqttConfig: {name} must be >= 1")


@dataclass(frozen=True, slots=True)
class MqttTimers:
    """The session timers a configuration file sets (the agent's and the relay's ``[mqtt]``)."""

    keepalive: int = 30
    """MQTT keep-alive in seconds; the broker declares the client gone after 1.5x this."""
    session_expiry: int = 3600
    """Seconds the broker keeps the session (and queued QoS 1 messages) after a disconnect."""
    backoff_min: float = 0.5
    """First reconnect delay in seconds; doubles per failed attempt."""
    backoff_max: float = 30.0
    """Largest reconnect delay in seconds."""
    connect_timeout: float = 10.0
    """Seconds one connect attempt may take."""
    publish_timeout: float = 30.0
    """Seconds a QoS 1 publish may wait for its acknowledgement."""
    misc_interval: float = 1.0
    """Seconds between keep-alive checks."""

    def mqtt_config(self, client_id: str, host: str, port: int) -> MqttConfig:
        """The connection to ``host:port`` as ``client_id`` with these timers."""
        return MqttConfig(
            client_id=client_id,
            host=host,
            port=port,
            keepalive=self.keepalive,
            session_expiry=self.session_expiry,
            backoff_min=self.backoff_min,
            backoff_max=self.backoff_max,
            connect_timeout=self.connect_timeout,
            publish_timeout=self.publish_timeout,
            misc_interval=self.misc_interval,
        )


@dataclass(frozen=True, slots=True)
class Message:
    """A message from the broker, on any topic."""

    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None
    retained: bool = False
    message_expiry: int | None = None
    """Seconds the message has left to live (MQTT v5), as the broker forwarded it."""


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message for this device: ``kind`` is one of ``topics.DEVICE_SUBSCRIBES``.

    The payload is raw bytes, whatever arrived; checking it is the caller's job.
    """

    kind: Kind
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None
    retained: bool = False


@dataclass(slots=True)
class SessionStats:
    """Counters of one client since it was made."""

    connects: int = 0
    """Successful connects (CONNACK and SUBACK)."""
    disconnects: int = 0
    """Established connections that were lost or closed."""
    published: int = 0
    """Messages acknowledged (QoS 1) or handed to the socket (QoS 0)."""
    publish_failed: int = 0
    """Publishes that raised ``PublishFailed`` (internal status messages included)."""
    received: int = 0
    """Messages queued for ``recv()``."""
    dropped: int = 0
    """Received messages thrown away: ``recv()`` queue full, or a topic not ours."""


@dataclass(frozen=True, slots=True)
class Outage:
    """Why a client is not connected, and the loop time of its next attempt."""

    reason: str
    retry_at: float | None


class MqttError(RuntimeError):
    """Base of this module's errors."""


class ConnectFailed(MqttError):
    """``start()`` did not get connected within ``connect_timeout``; the text says why."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
        """The last attempt's failure alone (refused, TLS, timeout...)."""


class PublishFailed(MqttError):
    """A publish was not confirmed; ``reason`` is a short token, the text has details."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class SessionClosed(MqttError):
    """``recv()`` after ``close()`` and after every queued message was received."""


def backoff_delay(attempt: int, config: MqttConfig, rng: random.Random | None = None) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): exponential, capped, jittered."""
    base = min(config.backoff_max, config.backoff_min * 2.0 ** min(attempt, 62))
    spread = base * config.backoff_jitter
    return base - spread * (rng or random).random()


# --- the client ------------------------------------------------------------------------------


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class _AttemptFailed(Exception):
    pass


@dataclass(eq=False, slots=True)
class _Out:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None
    future: asyncio.Future[None]
    timer: asyncio.TimerHandle | None = None
    internal: bool = False
    """Status messages: failed (not resent) when a connection drops; a new one follows."""


@dataclass(frozen=True, slots=True)
class StatusTopic:
    """A retained status: ``online`` is published on every connect, ``offline`` is the will."""

    topic: str
    online: bytes
    offline: bytes


_END = object()

_READ_SIZE = 65536


class _Paho(paho.Client):
    """paho with fewer system calls; the rest of this module drives it like paho.

    paho reads a packet with up to five ``recv`` calls (its type, each length byte, the
    rest) and sends each packet with its own ``send``: for a relay that carries thousands
    of small messages a second, the system calls cost more than the packets' handling.
    Here one ``recv`` fills a buffer that paho's reads are served from (``MqttClient``
    calls ``loop_read`` again while it holds bytes), and the packets of one write pass
    are gathered and leave in one ``send`` with the last of them (what the socket does
    not take waits in ``_out``, and ``want_write`` stays true until it has gone).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in = memoryview(b"")
        self._out = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed to paho."""
        return len(self._in)

    def reconnect(self) -> MQTTErrorCode:
        self._in = memoryview(b"")
        self._out.clear()
        return super().reconnect()

    def want_write(self) -> bool:
        return bool(self._out) or super().want_write()

    def loop_write(self) -> MQTTErrorCode:
        if self._out and self._sock is not None:
            try:
                self._send_out()
            except OSError:
                self._out.clear()  # the connection is broken: the next read reports it
        return super().loop_write()

    def _sock_recv(self, bufsize: int) -> bytes:
        if not self._in:
            data = super()._sock_recv(_READ_SIZE)
            if not data:
                return data  # end of stream
            self._in = memoryview(data)
        chunk, self._in = self._in[:bufsize], self._in[bufsize:]
        return chunk.tobytes()

    def _sock_send(self, buf: bytes | bytearray) -> int:
        if self._sock is None:
            raise ConnectionError("self._sock is None")
        self._out += buf
        if not self._out_packet:  # paho's last packet of this pass: send them all
            self._send_out()
        return len(buf)

    def _send_out(self) -> None:
        assert self._sock is not None
        try:
            sent = self._sock.send(self._out)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return  # full: ``want_write`` keeps the writer registered
        del self._out[:sent]


class MqttClient:
    """One MQTT v5 connection kept up forever; see the module docstring."""

    def __init__(
        self,
        config: MqttConfig,
        *,
        subscriptions: Sequence[str] = (),
        status: StatusTopic | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._subscriptions = tuple(subscriptions)
        self._status = status
        self._online = status.online if status is not None else b""
        self._rng = rng or random.Random()
        self._state = _State.NEW
        self._stats = SessionStats()
        self._last_error = "no attempt yet"
        self._retry_at: float | None = None
        self._pending: deque[_Out] = deque()
        self._inflight: dict[int, _Out] = {}
        self._incoming: asyncio.Queue[Message | object] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._runner: asyncio.Task[None] | None = None
        self._misc: asyncio.TimerHandle | None = None
        self._fd: int | None = None
        self._writing = False
        self._is_connected = False
        self._connected_fut: asyncio.Future[None] | None = None
        self._connack: asyncio.Future[None] | None = None
        self._suback: asyncio.Future[None] | None = None
        self._suback_mid = -1
        self._lost: asyncio.Future[str] | None = None
        self._client = self._make_client()

    def _make_client(self) -> _Paho:
        cfg = self.config
        client = _Paho(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        client.connect_timeout = cfg.connect_timeout
        # The window is kept in ``_flush`` (``max_inflight``): paho's own, once full, walks
        # every message in flight on each PUBACK, which costs a relay with a large window
        # more than the rest of its routing.
        client.max_inflight_messages = 0
        client.max_queued_messages = 0  # bounded here, in ``_pending`` + ``_inflight``
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls is not None:
            client.tls_set_context(cfg.tls.context())  # verifies the broker's name: ``host``
        if self._status is not None:
            client.will_set(self._status.topic, self._status.offline, qos=1, retain=True)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = cfg.session_expiry
        props.MaximumPacketSize = cfg.max_packet_bytes
        client.connect_async(cfg.host, cfg.port, cfg.keepalive, clean_start=False, properties=props)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        return client

    # --- public API ---

    @property
    def connected(self) -> bool:
        """True while a connection is up (CONNACK and SUBACK received)."""
        return self._is_connected

    @property
    def outage(self) -> Outage | None:
        """None while connected; else the last failure and when the next attempt is."""
        if self._is_connected:
            return None
        return Outage(self._last_error, self._retry_at)

    @property
    def stats(self) -> SessionStats:
        """A snapshot of the counters."""
        return replace(self._stats)

    async def wait_connected(self) -> None:
        """Return when connected (at once if already); raises ``SessionClosed`` once closed."""
        while not self._is_connected:
            fut = self._connected_fut
            if self._state is not _State.RUNNING or fut is None:
                raise SessionClosed("session is not running")
            await asyncio.shield(fut)

    async def start(self) -> None:
        """Connect; raise ``ConnectFailed`` if not connected within ``connect_timeout``.

        Once connected it stays connected: lost connections are re-established with
        exponential backoff and jitter until ``close()``. After a failure nothing is
        left running and ``start()`` may be called again.
        """
        if self._state is not _State.NEW:
            raise RuntimeError(f"MqttClient.start() in state {self._state.value}")
        loop = self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._state = _State.RUNNING
        self._connected_fut = loop.create_future()
        self._misc = loop.call_later(self.config.misc_interval, self._misc_tick)
        self._runner = loop.create_task(self._run(), name=f"mqtt-{self.config.client_id}")
        waiter = asyncio.ensure_future(asyncio.shield(self._connected_fut))
        try:
            done, _ = await asyncio.wait(
                {waiter, self._runner},
                timeout=self.config.connect_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            waiter.cancel()
        if self._is_connected:
            return
        reason = self._last_error
        if self._runner in done and self._runner.exception() is not None:
            reason = f"internal error: {self._runner.exception()!r}"
        await self._shutdown("start failed")
        self._state = _State.NEW
        self._stats = SessionStats()
        raise ConnectFailed(
            f"{self.config.client_id}: not connected to {self.config.host}:{self.config.port} "
            f"within {self.config.connect_timeout}s: {reason}",
            reason,
        )

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        message_expiry: int | None = None,
    ) -> None:
        """Publish; with QoS 1 return only after the PUBACK (see the module docstring)."""
        out = self._enqueue(
            topic,
            payload,
            qos=qos,
            retain=retain,
            properties=_publish_properties(response_topic, correlation_data, message_expiry),
        )
        if out is None:
            return
        try:
            await out.future
        finally:
            if not out.future.done() or out.future.cancelled():
                self._forget(out)

    def publish_nowait(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        """``publish`` for a caller that does not wait: the future is done when ``publish``
        would return, or holds its ``PublishFailed``; cancelling it withdraws the message
        like cancelling ``publish``. Refusals that ``publish`` raises at once (closed,
        queue full) are raised here too. No task per message: what a relay that
        publishes thousands of messages a second needs.
        """
        out = self._enqueue(topic, payload, qos=qos, retain=retain, properties=None)
        if out is None:  # QoS 0: handed to the socket
            done = self._loop_or_fail().create_future()
            done.set_result(None)
            return done
        out.future.add_done_callback(lambda f: self._forget(out) if f.cancelled() else None)
        return out.future

    async def set_status(self, online: bytes) -> None:
        """Replace the retained "online" payload; publish it now if connected.

        While disconnected it is only stored: every connect publishes the latest one.
        """
        if self._status is None:
            raise RuntimeError("MqttClient has no status topic")
        self._online = online
        if self._is_connected:
            await self.publish(self._status.topic, online, qos=1, retain=True)

    async def recv(self) -> Message:
        """The next received message; ``SessionClosed`` after ``close()`` once all are taken."""
        item = await self._incoming.get()
        if isinstance(item, Message):
            return item
        self._incoming.put_nowait(item)  # keep the end marker for other receivers
        raise SessionClosed("session closed")

    async def close(self) -> None:
        """Publish the offline status, disconnect cleanly, stop everything; idempotent.

        Every publish still waiting fails with ``PublishFailed("closed")``.
        """
        if self._state is not _State.RUNNING:
            if self._state is _State.NEW:
                self._state = _State.CLOSED
                self._incoming.put_nowait(_END)
            return
        self._state = _State.CLOSING
        if self._is_connected and self._status is not None:
            out = self._enqueue(
                self._status.topic,
                self._status.offline,
                qos=1,
                retain=True,
                properties=None,
                closing=True,
            )
            try:
                if out is not None:
                    await out.future
            except PublishFailed as exc:
                logger.warning("%s: offline presence not confirmed: %s", self._id, exc)
        await self._stop_runner()
        if self._is_connected and self._lost is not None:
            lost = self._lost
            self._client.disconnect()
            try:
                async with asyncio.timeout(self.config.connect_timeout):
                    await asyncio.shield(lost)
            except TimeoutError:
                logger.warning("%s: DISCONNECT not written in time; closing the socket", self._id)
        await self._shutdown("closed")
        self._state = _State.CLOSED
        self._incoming.put_nowait(_END)

    # --- internals: lifecycle ---

    @property
    def _id(self) -> str:
        return self.config.client_id

    def _loop_or_fail(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("MqttClient not started")
        return self._loop

    async def _stop_runner(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        runner.cancel()
        try:
            await runner
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        except Exception:
            logger.exception("%s: MQTT runner failed", self._id)

    async def _shutdown(self, reason: str) -> None:
        await self._stop_runner()
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        if self._fd is not None:
            self._abort_socket()
            self._handle_lost(reason)
        self._client.drop_out_messages()
        for out in [*self._pending, *self._inflight.values()]:
            self._fail(out, "closed", "session closed")
        self._pending.clear()
        self._inflight.clear()
        fut, self._connected_fut = self._connected_fut, None
        if fut is not None and not fut.done():
            fut.set_result(None)  # wakes ``wait_connected``, which then sees the state

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._connect_once()
            except _AttemptFailed as exc:
                self._last_error = str(exc)
                delay = backoff_delay(attempt, self.config, self._rng)
                attempt += 1
                logger.info(
                    "%s: connect to %s:%s failed (%s); retry in %.2fs",
                    self._id,
                    self.config.host,
                    self.config.port,
                    exc,
                    delay,
                )
                self._retry_at = self._loop_or_fail().time() + delay
                await asyncio.sleep(delay)
                self._retry_at = None
                continue
            attempt = 0
            assert self._lost is not None
            reason = await asyncio.shield(self._lost)
            self._last_error = f"connection lost: {reason}"
            await asyncio.sleep(backoff_delay(0, self.config, self._rng))

    async def _connect_once(self) -> None:
        loop = self._loop_or_fail()
        deadline = loop.time() + self.config.connect_timeout
        self._connack = loop.create_future()
        self._suback = loop.create_future()
        self._lost = loop.create_future()
        self._client.drop_out_messages()  # ``_pending`` is the only source of what to send
        work = loop.run_in_executor(None, self._client.reconnect)
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            # The worker cannot be interrupted; it ends within connect_timeout.
            # Close whatever it opened.
            with contextlib.suppress(Exception):
                await work
            self._close_unregistered_socket()
            raise
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._close_unregistered_socket()
            raise _AttemptFailed(_describe(exc)) from None
        sock = self._client.socket()
        if sock is None:
            raise _AttemptFailed("no socket after connect")
        # Small messages that must leave at once (paho leaves Nagle on): without this a
        # publish waits for the TCP ACK of the previous one, which the broker delays.
        if isinstance(sock, socket.socket):  # TLS too: SSLSocket is one
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._fd = sock.fileno()
        loop.add_reader(self._fd, self._on_readable)
        self._writing = False
        if self._client.want_write():
            self._start_writing()
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(self._connack)
                self._after_connack()
                await asyncio.shield(self._suback)
        except TimeoutError:
            self._abort_socket()
            self._handle_lost("timeout")
            raise _AttemptFailed(
                f"no CONNACK/SUBACK within {self.config.connect_timeout}s"
            ) from None
        except _AttemptFailed as exc:
            if self._fd is not None:
                self._abort_socket()
                self._handle_lost(str(exc))
            raise
        self._is_connected = True
        self._stats.connects += 1
        assert self._connected_fut is not None
        if not self._connected_fut.done():
            self._connected_fut.set_result(None)
        logger.info("%s: connected to %s:%s", self._id, self.config.host, self.config.port)
        self._flush()

    def _after_connack(self) -> None:
        client = self._client
        if self._subscriptions:
            options = SubscribeOptions(
                qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
            )
            rc, mid = client.subscribe([(t, options) for t in self._subscriptions])
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                raise _AttemptFailed(f"subscribe: {paho.error_string(rc)}")
            self._suback_mid = mid
        elif self._suback is not None and not self._suback.done():
            self._suback.set_result(None)
        if self._status is not None:
            out = self._make_out(self._status.topic, self._online, 1, True, None, internal=True)
            self._pending.appendleft(out)

    # --- internals: outgoing ---

    def _make_out(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: Properties | None,
        *,
        internal: bool = False,
    ) -> _Out:
        loop = self._loop_or_fail()
        out = _Out(topic, bytes(payload), qos, retain, properties, loop.create_future())
        out.internal = internal
        out.timer = loop.call_later(self.config.publish_timeout, self._expire, out)
        if internal:
            out.future.add_done_callback(_log_internal_failure)
        return out

    def _enqueue(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool,
        properties: Properties | None,
        closing: bool = False,
    ) -> _Out | None:
        if qos not in (0, 1):
            raise ValueError(f"QoS {qos} is not used on this control plane (0 or 1)")
        if not (self._state is _State.RUNNING or (closing and self._state is _State.CLOSING)):
            self._stats.publish_failed += 1
            raise PublishFailed("closed", f"session is {self._state.value}")
        if qos == 0:
            if not self._is_connected:
                self._stats.publish_failed += 1
                raise PublishFailed("not-connected", "QoS 0 is not queued")
            info = self._client.publish(topic, payload, 0, retain, properties)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._stats.publish_failed += 1
                raise PublishFailed("not-sent", paho.error_string(info.rc))
            self._stats.published += 1
            return None
        if len(self._pending) + len(self._inflight) >= self.config.max_queued:
            self._stats.publish_failed += 1
            raise PublishFailed("queue-full", f"{self.config.max_queued} messages waiting")
        out = self._make_out(topic, payload, qos, retain, properties)
        self._pending.append(out)
        self._flush()
        return out

    def _flush(self) -> None:
        while (
            self._pending
            and len(self._inflight) < self.config.max_inflight
            and self._is_connected
            and self._client.is_connected()
        ):
            out = self._pending.popleft()
            info = self._client.publish(out.topic, out.payload, out.qos, out.retain, out.properties)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                # Not connected after all: keep it first in line; the next connect sends it.
                self._pending.appendleft(out)
                return
            self._inflight[info.mid] = out

    def _expire(self, out: _Out) -> None:
        was_sent = self._forget(out)
        if was_sent:
            self._fail(out, "timeout", f"no PUBACK within {self.config.publish_timeout}s")
        else:
            self._fail(
                out,
                "timeout",
                f"not connected within {self.config.publish_timeout}s ({self._last_error})",
            )

    def _forget(self, out: _Out) -> bool:
        """Take ``out`` off every queue; True if it had been handed to paho."""
        if out.timer is not None:
            out.timer.cancel()
        with contextlib.suppress(ValueError):
            self._pending.remove(out)
            return False
        for mid, other in list(self._inflight.items()):
            if other is out:
                del self._inflight[mid]
                self._flush()  # its place in the window is free
                return True
        return False

    def _fail(self, out: _Out, reason: str, detail: str) -> None:
        if out.timer is not None:
            out.timer.cancel()
        if not out.future.done():
            self._stats.publish_failed += 1
            out.future.set_exception(PublishFailed(reason, detail))

    # --- internals: connection loss ---

    def _handle_lost(self, reason: str) -> None:
        """The connection is gone (paho said so, or we aborted it): requeue and notify."""
        was_connected = self._is_connected
        self._is_connected = False
        if was_connected:
            self._stats.disconnects += 1
            if self._state is _State.RUNNING:
                logger.warning("%s: connection lost: %s", self._id, reason)
            loop = self._loop_or_fail()
            if self._connected_fut is None or self._connected_fut.done():
                self._connected_fut = loop.create_future()
        self._client.drop_out_messages()
        requeue = [out for out in self._inflight.values() if not out.future.done()]
        self._inflight.clear()
        for out in reversed(requeue):
            if out.internal:
                self._fail(out, "disconnected", reason)
            else:
                self._pending.appendleft(out)
        for pending in list(self._pending):
            if pending.internal:
                self._pending.remove(pending)
                self._fail(pending, "disconnected", reason)
        for fut in (self._connack, self._suback):
            if fut is not None and not fut.done():
                fut.set_exception(_AttemptFailed(f"connection closed: {reason}"))
                fut.exception()  # retrieved: the runner may be gone (close, start failure)
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(reason)

    def _abort_socket(self) -> None:
        """Close the socket without DISCONNECT (the broker then sends our will)."""
        self._unregister()
        sock = self._client.socket()
        if sock is not None:
            sock.close()

    def _close_unregistered_socket(self) -> None:
        sock = self._client.socket()
        if sock is not None and self._fd is None:
            sock.close()

    # --- internals: socket plumbing (loop thread only) ---

    def _in_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def _unregister(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and self._loop is not None:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        self._writing = False

    def _start_writing(self) -> None:
        if self._fd is not None and not self._writing and self._loop is not None:
            self._writing = True
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_readable(self) -> None:
        if self._fd is None:
            return
        client = self._client
        client.loop_read()
        # paho takes a few packets per call; the rest of what one recv() brought waits.
        while self._fd is not None and (left := client.buffered):
            client.loop_read()
            if client.buffered == left:
                break  # not taken (the connection is going away)
        if self._fd is not None and client.want_write():
            client.loop_write()  # the PUBACKs for what was read, at once and together
        sock = client.socket()
        # TLS may hold decrypted bytes the selector cannot see.
        if self._fd is not None and isinstance(sock, ssl.SSLSocket) and sock.pending():
            self._loop_or_fail().call_soon(self._on_readable)

    def _on_writable(self) -> None:
        if self._fd is not None:
            self._client.loop_write()

    def _misc_tick(self) -> None:
        if self._fd is not None:
            self._client.loop_misc()
        self._misc = self._loop_or_fail().call_later(self.config.misc_interval, self._misc_tick)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._in_loop_thread():
            self._unregister()

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # From the connect worker it is ignored: the runner checks want_write() afterwards.
        if self._in_loop_thread():
            self._start_writing()

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._in_loop_thread() and self._fd is not None and self._loop is not None:
            self._writing = False
            self._loop.remove_writer(self._fd)

    # --- internals: paho callbacks (loop thread, from loop_read/loop_write/loop_misc) ---

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        fut = self._connack
        if fut is None or fut.done():
            return
        if reason.is_failure:
            fut.set_exception(_AttemptFailed(f"broker refused: {reason}"))
            fut.exception()
        else:
            logger.debug("%s: CONNACK, session present: %s", self._id, flags.session_present)
            fut.set_result(None)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._unregister()
        if flags.is_disconnect_packet_from_server:
            text = f"broker sent DISCONNECT: {reason}"
        elif reason.value == 0x80:  # what paho reports for a reset or closed socket
            text = "socket closed or reset"
        else:
            text = str(reason)  # e.g. "Keep alive timeout"
        self._handle_lost(text)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [
            f"{t}: {r}" for t, r in zip(self._subscriptions, reasons, strict=False) if r.is_failure
        ]
        if refused:
            logger.error("%s: subscriptions refused: %s", self._id, "; ".join(refused))
        if mid == self._suback_mid and self._suback is not None and not self._suback.done():
            self._suback.set_result(None)

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        out = self._inflight.pop(mid, None)
        if out is None:
            return
        if out.timer is not None:
            out.timer.cancel()
        if reason.is_failure:
            self._fail(out, "refused", f"broker refused: {reason}")
        elif not out.future.done():
            self._stats.published += 1
            out.future.set_result(None)
        self._flush()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if self._incoming.qsize() >= self.config.max_incoming:
            self._stats.dropped += 1
            logger.warning(
                "%s: receive queue full (%d); dropped a message on %s",
                self._id,
                self.config.max_incoming,
                msg.topic[:120],
            )
            return
        props = msg.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        expiry = getattr(props, "MessageExpiryInterval", None) if props is not None else None
        self._stats.received += 1
        self._incoming.put_nowait(
            Message(
                topic=msg.topic,
                payload=bytes(msg.payload),
                response_topic=response_topic if isinstance(response_topic, str) else None,
                correlation_data=bytes(correlation)
                if isinstance(correlation, bytes | bytearray)
                else None,
                retained=bool(msg.retain),
                message_expiry=expiry if isinstance(expiry, int) else None,
            )
        )

    def _count_dropped(self) -> None:
        self._stats.dropped += 1


def _publish_properties(
    response_topic: str | None, correlation_data: bytes | None, message_expiry: int | None
) -> Properties | None:
    if response_topic is None and correlation_data is None and message_expiry is None:
        return None
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation_data is not None:
        props.CorrelationData = bytes(correlation_data)
    if message_expiry is not None:
        props.MessageExpiryInterval = message_expiry
    return props


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "TCP/TLS connect timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {exc.verify_message}"
    return f"{type(exc).__name__}: {exc}"


def _log_internal_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        logger.info("status message not confirmed: %s", fut.exception())


# --- the device session ----------------------------------------------------------------------


def _presence_bytes(presence: Mapping[str, object]) -> bytes:
    return json.dumps(dict(presence), sort_keys=True, separators=(",", ":")).encode("utf-8")


class MqttSession:
    """The agent's session: its device topics, presence, and the pull API for its messages."""

    def __init__(
        self,
        config: MqttConfig,
        presence: Mapping[str, object],
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.device_id = topics.check_device_id(config.client_id)
        self._presence_topic = topics.device_topic(self.device_id, Kind.PRESENCE)
        self._client = MqttClient(
            config,
            subscriptions=[
                topics.device_topic(self.device_id, k) for k in sorted(topics.DEVICE_SUBSCRIBES)
            ],
            status=StatusTopic(
                self._presence_topic, _presence_bytes(presence), _presence_bytes(OFFLINE_PRESENCE)
            ),
            rng=rng,
        )

    @property
    def config(self) -> MqttConfig:
        return self._client.config

    @property
    def connected(self) -> bool:
        """True while connected and subscribed."""
        return self._client.connected

    @property
    def stats(self) -> SessionStats:
        """A snapshot of the counters."""
        return self._client.stats

    @property
    def outage(self) -> Outage | None:
        """None while connected; else why not, and when it tries again."""
        return self._client.outage

    async def wait_connected(self) -> None:
        """Return when connected (at once if already)."""
        await self._client.wait_connected()

    async def start(self) -> None:
        """Connect (or raise ``ConnectFailed``), then stay connected; see ``MqttClient.start``."""
        await self._client.start()

    async def close(self) -> None:
        """Publish offline presence, disconnect, stop every task."""
        await self._client.close()

    async def set_presence(self, presence: Mapping[str, object]) -> None:
        """New online presence (JSON-encoded, retained); published now if connected."""
        await self._client.set_status(_presence_bytes(presence))

    async def publish(
        self,
        kind: Kind,
        payload: bytes,
        *,
        qos: int | None = None,
        retain: bool | None = None,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        message_expiry: int | None = None,
    ) -> None:
        """Publish on this device's ``kind`` topic; QoS and retain default to the topic table.

        Raises ``ValueError`` for kinds a device may not write, ``PublishFailed``
        when the message is not confirmed.
        """
        if kind not in topics.DEVICE_PUBLISHES:
            raise ValueError(f"a device does not publish on {kind}")
        await self._client.publish(
            topics.device_topic(self.device_id, kind),
            payload,
            qos=topics.QOS[kind] if qos is None else qos,
            retain=kind in topics.RETAINED if retain is None else retain,
            response_topic=response_topic,
            correlation_data=correlation_data,
            message_expiry=message_expiry,
        )

    async def recv(self) -> Incoming:
        """The next message for this device; ``SessionClosed`` after ``close()``."""
        while True:
            msg = await self._client.recv()
            try:
                device_id, kind = topics.parse_topic(msg.topic)
            except TopicError as exc:
                device_id, kind = "", None
                reason = str(exc)
            else:
                reason = "not ours"
            if device_id != self.device_id or kind not in topics.DEVICE_SUBSCRIBES:
                self._client._count_dropped()
                logger.warning(
                    "%s: dropped message on %s: %s", self.device_id, msg.topic[:120], reason
                )
                continue
            assert kind is not None
            return Incoming(
                kind=kind,
                payload=msg.payload,
                response_topic=msg.response_topic,
                correlation_data=msg.correlation_data,
                retained=msg.retained,
            )


__all__ = [
    "OFFLINE_PRESENCE",
    "ConnectFailed",
    "Incoming",
    "Message",
    "MqttClient",
    "MqttConfig",
    "MqttError",
    "MqttSession",
    "MqttTimers",
    "MqttTls",
    "Outage",
    "PublishFailed",
    "SessionClosed",
    "SessionStats",
    "StatusTopic",
    "backoff_delay",
]
