"""Many simulated devices in one asyncio process, each on its own minimal MQTT v5 connection.

A full paho client per device is too heavy for ten thousand devices, so each ``Device`` is
an ``asyncio.Protocol`` speaking just enough MQTT v5 (OASIS Standard, March 2019) to look
like an agent to the broker and the relay:

- CONNECT with Clean Start, Session Expiry Interval 0, a keep-alive, and a will: the
  device's ``presence`` topic, QoS 1, retained, ``{"state":"offline"}``; no user name,
  password or TLS. Then, pipelined without waiting for CONNACK (section 3.1.4 allows it),
  SUBSCRIBE QoS 1 to the device's own ``in`` topic and PUBLISH of its retained QoS 1
  ``{"state":"online",...}`` presence. The device is ready once CONNACK, SUBACK and that
  PUBACK have all come back with success reason codes.
- PUBLISH QoS 0 and 1 both ways. Outgoing QoS 1 messages are tracked by packet identifier
  until their PUBACK (reason codes of 0x80 and up are counted as refused); incoming QoS 1
  messages are answered with PUBACK at once. Incoming publish properties are skipped.
- PINGREQ when the device has sent nothing for 50-90 % of its keep-alive (spread, seeded);
  PINGRESP is accepted.
- DISCONNECT (normal, so no will) on ``close()``; a DISCONNECT from the broker ends the
  device with its reason code.

Not implemented: QoS 2, retransmission and reconnection (a lost connection ends the
device, counted in ``Swarm.lost``), session state, AUTH, topic aliases, Receive Maximum
flow control (a device keeps at most a handful of messages in flight), maximum packet
sizes, and user properties.

Topics come from ``agent.signaling.topics`` and signaling payloads are real envelopes
(``agent.signaling.envelope``): ``Device.send`` publishes one on the device's ``out``
(through the relay) or straight on the recipient's ``in`` (the broker-only baseline).
Every wait is bounded and fails with ``SwarmError`` saying what did not happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from agent.signaling import topics
from agent.signaling.envelope import Envelope, to_json
from agent.signaling.mqtt import OFFLINE_PRESENCE
from agent.signaling.topics import Kind

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14

PROP_SESSION_EXPIRY = 0x11
PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"  # remaining length 0: reason 0x00, normal (no will)
MAX_PACKET_ID = 0xFFFF


class SwarmError(RuntimeError):
    """Devices that did not connect, acknowledge or close in time; the text says which."""


class ProtocolError(ValueError):
    """Bytes from the broker that are not the MQTT v5 this module understands."""


# --- packets (pure) ----------------------------------------------------------------------------


def varint(n: int) -> bytes:
    """MQTT Variable Byte Integer (section 1.5.5), 0..268,435,455."""
    if not 0 <= n <= 268_435_455:
        raise ValueError(f"{n} does not fit a variable byte integer")
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(text: str) -> bytes:
    """MQTT UTF-8 Encoded String: two length bytes, then the bytes."""
    data = text.encode("utf-8")
    return struct.pack("!H", len(data)) + data


def binary(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def packet(kind: int, flags: int, body: bytes) -> bytes:
    """Fixed header (type, flags, remaining length) + ``body``."""
    return bytes([kind << 4 | flags]) + varint(len(body)) + body


def connect_packet(
    client_id: str, keepalive: int, will_topic: str, will_payload: bytes, *, will_retain: bool
) -> bytes:
    """CONNECT: Clean Start, Session Expiry 0, a QoS 1 will."""
    flags = 0x02 | 0x04 | (1 << 3) | (0x20 if will_retain else 0)
    props = bytes([PROP_SESSION_EXPIRY]) + struct.pack("!I", 0)
    body = (
        utf8("MQTT")
        + bytes([5, flags])
        + struct.pack("!H", keepalive)
        + varint(len(props))
        + props
        + utf8(client_id)
        + varint(0)  # will properties
        + utf8(will_topic)
        + binary(will_payload)
    )
    return packet(CONNECT, 0, body)


def publish_packet(
    topic: str, payload: bytes, *, qos: int, retain: bool = False, packet_id: int = 0
) -> bytes:
    """PUBLISH with no properties; ``packet_id`` only for QoS 1."""
    if qos not in (0, 1):
        raise ValueError(f"QoS {qos} is not supported here")
    header = utf8(topic) + (struct.pack("!H", packet_id) if qos else b"") + b"\x00"
    return packet(PUBLISH, qos << 1 | int(retain), header + payload)


def subscribe_packet(packet_id: int, topic_filter: str, qos: int = 1) -> bytes:
    """SUBSCRIBE to one filter; options: ``qos``, No Local 0, Retain As Published 0."""
    return packet(
        SUBSCRIBE, 0x02, struct.pack("!H", packet_id) + b"\x00" + utf8(topic_filter) + bytes([qos])
    )


def puback_packet(packet_id: int) -> bytes:
    """PUBACK, short form: remaining length 2 means reason 0x00 (success), no properties."""
    return b"\x40\x02" + struct.pack("!H", packet_id)


def read_varint(data: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """(value, position after it), or None if ``data`` ends first."""
    value, shift = 0, 0
    for i in range(pos, min(pos + 4, len(data))):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    if len(data) >= pos + 4:
        raise ProtocolError("variable byte integer longer than 4 bytes")
    return None


def split_packets(buffer: bytearray) -> Iterator[tuple[int, int, bytes]]:
    """Take every complete packet off the front of ``buffer``: (type, flags, body)."""
    pos = 0
    try:
        while len(buffer) - pos >= 2:
            header = read_varint(buffer, pos + 1)
            if header is None:
                return
            length, start = header
            end = start + length
            if end > len(buffer):
                return
            first = buffer[pos]
            yield first >> 4, first & 0x0F, bytes(buffer[start:end])
            pos = end
    finally:
        del buffer[:pos]


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    packet_id: int


def parse_publish(flags: int, body: bytes) -> Publish:
    """An incoming PUBLISH body; its properties are skipped."""
    qos = (flags >> 1) & 0x03
    if qos > 1:
        raise ProtocolError(f"PUBLISH with QoS {qos}")
    (topic_len,) = struct.unpack_from("!H", body, 0)
    pos = 2 + topic_len
    topic = body[2:pos].decode("utf-8")
    packet_id = 0
    if qos:
        (packet_id,) = struct.unpack_from("!H", body, pos)
        pos += 2
    props = read_varint(body, pos)
    if props is None:
        raise ProtocolError("PUBLISH properties cut short")
    length, pos = props
    return Publish(topic, body[pos + length :], qos, bool(flags & 0x01), packet_id)


def parse_ack(body: bytes) -> tuple[int, int]:
    """(packet id, reason code) of a PUBACK; the short form means success."""
    (packet_id,) = struct.unpack_from("!H", body, 0)
    return packet_id, body[2] if len(body) > 2 else 0


def suback_reasons(body: bytes) -> bytes:
    """The reason codes of a SUBACK (after the packet id and the properties)."""
    props = read_varint(body, 2)
    if props is None:
        raise ProtocolError("SUBACK properties cut short")
    length, pos = props
    return body[pos + length :]


# --- devices -----------------------------------------------------------------------------------


def presence_payload(state: str, **extra: str) -> bytes:
    return json.dumps({"state": state, **extra}, sort_keys=True, separators=(",", ":")).encode()


OFFLINE = presence_payload(str(OFFLINE_PRESENCE["state"]))
ONLINE = presence_payload("online", board="swarm", version="bench")

MessageHandler = Callable[["Device", str, bytes], None]
"""Called with (device, topic, payload) for every PUBLISH a device receives."""


@dataclass(slots=True)
class SwarmStats:
    published: int = 0
    """QoS 1 messages sent (presence included)."""
    acked: int = 0
    """PUBACKs received with a success reason code."""
    refused: int = 0
    """PUBACKs with a failure reason code (0x80 and up)."""
    received: int = 0
    """PUBLISH packets received."""
    lost: int = 0
    """Devices whose connection ended before ``close()``."""
    abandoned: int = 0
    """QoS 1 messages still unacknowledged when their device's connection ended."""


class Device(asyncio.Protocol):
    """One simulated device: a device id, its topics and one MQTT v5 connection."""

    def __init__(self, swarm: Swarm, device_id: str) -> None:
        self.swarm = swarm
        self.id = topics.check_device_id(device_id)
        self.out_topic = topics.device_topic(device_id, Kind.OUT)
        self.in_topic = topics.device_topic(device_id, Kind.IN)
        self.presence_topic = topics.device_topic(device_id, Kind.PRESENCE)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.inflight: dict[int, float] = {}
        """QoS 1 packet ids sent and not yet acknowledged -> ``time.perf_counter()`` sent."""
        self.last_sent = time.monotonic()
        self.ping_after = swarm.keepalive * swarm.rng.uniform(0.5, 0.9)
        """Idle seconds before a PINGREQ; spread, so that devices connected together do
        not all ping in the same second."""
        self.error: str | None = None
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._next_id = 0
        self._waiting = {CONNACK, SUBACK, PUBACK}
        self._presence_id = 0
        self._closing = False

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._presence_id = self._packet_id()
        self._write(
            connect_packet(self.id, self.swarm.keepalive, self.presence_topic, OFFLINE,
                           will_retain=True)
            + subscribe_packet(self._packet_id(), self.in_topic)
            + self._publish(self.presence_topic, ONLINE, retain=True, packet_id=self._presence_id)
        )  # fmt: skip

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            for kind, flags, body in split_packets(self._buffer):
                self._on_packet(kind, flags, body)
        except (ProtocolError, struct.error, UnicodeDecodeError) as exc:
            self._fail(f"protocol error: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.swarm.stats.abandoned += len(self.inflight)
        self.inflight.clear()
        self.swarm.acknowledged()
        if not self._closing:
            self.swarm.stats.lost += 1
            self._fail(f"connection lost: {exc or 'closed by the broker'}")
        if not self.closed.done():
            self.closed.set_result(None)

    # --- API ---

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Send a PUBLISH now; QoS 1 is tracked until its PUBACK. Fails if not connected."""
        if not self.connected:
            raise SwarmError(f"{self.id}: not connected ({self.error or 'closed'})")
        packet_id = self._packet_id() if qos else 0
        self._write(self._publish(topic, payload, qos=qos, retain=retain, packet_id=packet_id))

    def send(self, env: Envelope, *, via_relay: bool = True) -> None:
        """Publish a signaling envelope: on our ``out`` (the relay routes it), or directly
        on the recipient's ``in`` (what the broker alone costs)."""
        topic = self.out_topic if via_relay else topics.device_topic(env.to, Kind.IN)
        self.publish(topic, to_json(env).encode())

    def ping(self) -> None:
        if self.connected:
            self._write(PINGREQ_PACKET)

    def close(self) -> None:
        """DISCONNECT (normal: the broker drops the will) and close the socket."""
        self._closing = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(DISCONNECT_PACKET)
            self._transport.close()
        elif not self.closed.done():
            self.closed.set_result(None)

    # --- internals ---

    def _packet_id(self) -> int:
        for _ in range(MAX_PACKET_ID):
            self._next_id = self._next_id % MAX_PACKET_ID + 1
            if self._next_id not in self.inflight:
                return self._next_id
        raise SwarmError(f"{self.id}: {MAX_PACKET_ID} messages in flight")

    def _publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, packet_id: int
    ) -> bytes:
        if qos:
            self.inflight[packet_id] = time.perf_counter()
            self.swarm.stats.published += 1
        return publish_packet(topic, payload, qos=qos, retain=retain, packet_id=packet_id)

    def _write(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)
        self.last_sent = time.monotonic()

    def _on_packet(self, kind: int, flags: int, body: bytes) -> None:
        stats = self.swarm.stats
        if kind == PUBLISH:
            msg = parse_publish(flags, body)
            stats.received += 1
            if msg.qos:
                self._write(puback_packet(msg.packet_id))
            self.swarm.on_message(self, msg.topic, msg.payload)
        elif kind == PUBACK:
            packet_id, reason = parse_ack(body)
            if self.inflight.pop(packet_id, None) is None:
                raise ProtocolError(f"PUBACK for unknown packet id {packet_id}")
            if reason >= 0x80:
                stats.refused += 1
            else:
                stats.acked += 1
            self.swarm.acknowledged()
            if packet_id == self._presence_id:
                if reason >= 0x80:
                    self._fail(f"presence refused with reason 0x{reason:02x}")
                else:
                    self._arrived(PUBACK)
        elif kind == CONNACK:
            if len(body) < 2 or body[1] != 0:
                self._fail(f"CONNACK reason 0x{body[1] if len(body) > 1 else 0xFF:02x}")
                return
            self._arrived(CONNACK)
        elif kind == SUBACK:
            reasons = suback_reasons(body)
            if not reasons or reasons[0] >= 0x80:
                self._fail(f"SUBACK reason 0x{reasons[0] if reasons else 0xFF:02x}")
                return
            self._arrived(SUBACK)
        elif kind == DISCONNECT:
            self._fail(f"broker sent DISCONNECT, reason 0x{body[0] if body else 0:02x}")
        elif kind != PINGRESP:
            raise ProtocolError(f"unexpected packet type {kind}")

    def _arrived(self, kind: int) -> None:
        self._waiting.discard(kind)
        if not self._waiting and not self.ready.done():
            self.ready.set_result(None)

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        if not self.ready.done():
            self.ready.set_exception(SwarmError(f"{self.id}: {reason}"))
            self.ready.exception()  # retrieved: a failed device is reported by the swarm
        if self._transport is not None:
            self._transport.abort()


def _factory(device: Device) -> Callable[[], Device]:
    return lambda: device


class Swarm:
    """Devices connected to one broker; ``connect()`` them in batches, then ``close()``."""

    def __init__(
        self,
        host: str,
        port: int,
        on_message: MessageHandler,
        *,
        keepalive: int = 60,
        timeout: float = 30.0,
        seed: int = 0,
    ) -> None:
        self.host = host
        self.port = port
        self.on_message = on_message
        self.keepalive = keepalive
        self.timeout = timeout
        """Upper bound of each wait: one batch getting ready, acknowledgements, closing."""
        self.stats = SwarmStats()
        self.rng = random.Random(seed)
        self.devices: dict[str, Device] = {}
        self._pinger: asyncio.Task[None] | None = None
        self._settled: asyncio.Future[None] | None = None
        """Set once nothing is left unacknowledged, while ``settle`` waits for that."""

    def acknowledged(self) -> None:
        """Messages were acknowledged or abandoned: wake ``settle`` once none is left."""
        if self._settled is not None and not self._settled.done() and not self.unacked():
            self._settled.set_result(None)

    async def connect(
        self,
        ids: Sequence[str],
        *,
        batch: int = 500,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Connect ``ids`` ``batch`` at a time; each batch must be ready within ``timeout``."""
        loop = asyncio.get_running_loop()
        if self._pinger is None:
            self._pinger = asyncio.create_task(self._ping_forever(), name="swarm-pinger")
        for start in range(0, len(ids), batch):
            chunk = [Device(self, i) for i in ids[start : start + batch]]
            try:
                async with asyncio.timeout(self.timeout):
                    for device in chunk:
                        self.devices[device.id] = device
                        await loop.create_connection(_factory(device), self.host, self.port)
                    await asyncio.wait([d.ready for d in chunk])
            except (TimeoutError, OSError) as exc:
                raise SwarmError(
                    f"devices {start}..{start + len(chunk) - 1} not connected within "
                    f"{self.timeout:g} s: {exc!r}; {self._describe(chunk)}"
                ) from None
            failed = [d for d in chunk if d.ready.exception() is not None]
            if failed:
                raise SwarmError(f"{len(failed)} devices failed: {self._describe(failed)}")
            if progress is not None:
                progress(len(self.devices))

    def unacked(self) -> int:
        """QoS 1 messages sent and not yet acknowledged, over every device."""
        stats = self.stats
        return stats.published - stats.acked - stats.refused - stats.abandoned

    async def settle(self) -> None:
        """Wait until every QoS 1 message sent was acknowledged."""
        if not self.unacked():
            return
        self._settled = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(self.timeout):
                await self._settled
        except TimeoutError:
            raise SwarmError(
                f"{self.unacked()} messages not acknowledged within {self.timeout:g} s"
            ) from None

    async def close(self) -> None:
        """Stop pinging, DISCONNECT every device and wait (bounded) for the sockets to close."""
        pinger, self._pinger = self._pinger, None
        if pinger is not None:
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pinger
        for device in self.devices.values():
            device.close()
        pending = [d.closed for d in self.devices.values() if not d.closed.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=self.timeout)
            if still:
                for device in self.devices.values():
                    if device._transport is not None:
                        device._transport.abort()
                raise SwarmError(f"{len(still)} devices not closed within {self.timeout:g} s")

    async def _ping_forever(self) -> None:
        """PINGREQ from every device idle for its ``ping_after`` (checked once a second)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for device in list(self.devices.values()):
                if now - device.last_sent > device.ping_after:
                    device.ping()

    @staticmethod
    def _describe(devices: Sequence[Device], shown: int = 3) -> str:
        states = [f"{d.id}: {d.error or 'waiting for CONNACK/SUBACK/PUBACK'}" for d in devices]
        more = f" (and {len(states) - shown} more)" if len(states) > shown else ""
        return "; ".join(states[:shown]) + more
