"""Byte-counting proxies on loopback: what one endpoint sends and receives, and at what cost
on the wire.

``CountingTcpProxy`` listens on 127.0.0.1 (a free port, kept bound) and forwards every
connection to a target. Per direction it counts the bytes it relays (the TCP payload:
for a TLS client, whole TLS records), and, from the kernel's ``TCP_INFO`` of the socket
facing the client, the TCP segments that carried them, pure ACKs included. A tap
(``on_data``) sees every chunk as it passes, e.g. to split TLS records.

``CountingUdpRelay`` sits between two UDP endpoints the way ``agent.net.impair``'s proxy
does (A sends to ``address_for_a``, B to ``address_for_b``; each side latches onto its
first sender) and counts the datagrams and bytes of each direction.

``ip_bytes`` adds the IPv4 and TCP/UDP headers a packet carries on a real network:
loopback has no link layer and a 64 KiB MTU, so only small writes (one segment each, as
on Ethernet) map one to one; a bulk transfer would show fewer, larger segments here.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import socket
import struct
import typing
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from agent.net.transport import Address

logger = logging.getLogger(__name__)

IPV4_HEADER = 20
TCP_HEADER = 20
TCP_TIMESTAMPS = 12
"""The timestamps option (10 bytes, padded) that Linux puts on every segment by default."""
UDP_HEADER = 8
CONNECT_TIMEOUT_S = 10.0

_TCPI_OPT_TIMESTAMPS = 1
_TCP_INFO = struct.Struct("<QQII")
"""``struct tcp_info`` from ``tcpi_bytes_acked`` on: bytes acked, bytes received,
segments out, segments in (Linux >= 4.2)."""
_TCP_INFO_OFFSET = 120


class Direction(enum.Enum):
    UP = "up"
    """Client to target."""
    DOWN = "down"
    """Target to client."""


@dataclass(frozen=True, slots=True)
class Flow:
    """Bytes and packets in one direction."""

    payload_bytes: int = 0
    packets: int = 0
    """TCP segments (pure ACKs included) or UDP datagrams."""
    header_bytes: int = 0
    """IPv4 + TCP/UDP headers of those packets."""

    @property
    def ip_bytes(self) -> int:
        """Everything in IP packets: payload and headers."""
        return self.payload_bytes + self.header_bytes

    def __add__(self, other: Flow) -> Flow:
        return Flow(
            self.payload_bytes + other.payload_bytes,
            self.packets + other.packets,
            self.header_bytes + other.header_bytes,
        )

    def __sub__(self, other: Flow) -> Flow:
        return Flow(
            self.payload_bytes - other.payload_bytes,
            self.packets - other.packets,
            self.header_bytes - other.header_bytes,
        )

    def to_json(self) -> dict[str, int]:
        return {
            "payload_bytes": self.payload_bytes,
            "packets": self.packets,
            "header_bytes": self.header_bytes,
            "ip_bytes": self.ip_bytes,
        }


@dataclass(frozen=True, slots=True)
class Traffic:
    """Both directions at one instant."""

    up: Flow = Flow()
    down: Flow = Flow()

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.up + other.up, self.down + other.down)

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(self.up - other.up, self.down - other.down)


def tcp_traffic(sock: socket.socket, up_bytes: int, down_bytes: int) -> Traffic:
    """A client-facing socket's segments from ``TCP_INFO`` (received: up, sent: down), with
    the payload the proxy counted itself."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    if len(info) < _TCP_INFO_OFFSET + _TCP_INFO.size:
        raise OSError(f"TCP_INFO of {len(info)} bytes has no segment counters")
    _, _, segs_out, segs_in = _TCP_INFO.unpack_from(info, _TCP_INFO_OFFSET)
    header = IPV4_HEADER + TCP_HEADER + (TCP_TIMESTAMPS if info[5] & _TCPI_OPT_TIMESTAMPS else 0)
    return Traffic(
        Flow(up_bytes, segs_in, segs_in * header), Flow(down_bytes, segs_out, segs_out * header)
    )


class _Connection:
    """One client's connection and its counters."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.bytes = {Direction.UP: 0, Direction.DOWN: 0}
        self.last = Traffic()
        self.closed = False

    def traffic(self) -> Traffic:
        """The current reading; once closed (or reset: the socket is gone), the last one, with
        the bytes counted since."""
        up, down = self.bytes[Direction.UP], self.bytes[Direction.DOWN]
        if not self.closed:
            try:
                self.last = tcp_traffic(self.client.get_extra_info("socket"), up, down)
            except OSError:
                self.closed = True
        last = self.last
        return Traffic(replace(last.up, payload_bytes=up), replace(last.down, payload_bytes=down))

    def close(self) -> None:
        self.traffic()
        self.closed = True
        self.client.close()


Tap = Callable[[Direction, bytes], None]


class CountingTcpProxy:
    """``async with CountingTcpProxy.running(target) as proxy``: clients connect to
    ``proxy.port``; ``proxy.traffic()`` sums every connection so far."""

    def __init__(self, target: Address, on_data: Tap | None) -> None:
        self.target = target
        self.on_data = on_data
        self.connections: list[_Connection] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls, target: Address, on_data: Tap | None = None
    ) -> AsyncIterator[CountingTcpProxy]:
        self = cls(target, on_data)
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        try:
            yield self
        finally:
            self._server.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

    def traffic(self) -> Traffic:
        """Both directions, summed over every connection (open or closed) so far."""
        total = Traffic()
        for connection in self.connections:
            total += connection.traffic()
        return total

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Owned by the proxy (cancelled by its exit), not by the server's handler task.
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        connection = _Connection(writer)
        self.connections.append(connection)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except (OSError, TimeoutError) as exc:
            logger.warning("proxy to %s:%d: cannot connect: %s", *self.target, exc)
            connection.close()
            self._tasks.discard(task)
            return
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pump(reader, up_writer, connection, Direction.UP))
                group.create_task(self._pump(up_reader, writer, connection, Direction.DOWN))
        finally:
            connection.close()
            up_writer.close()
            self._tasks.discard(task)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        connection: _Connection,
        direction: Direction,
    ) -> None:
        """Copy until end of stream or a reset, then end the other side's writing too."""
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                connection.bytes[direction] += len(data)
                if self.on_data is not None:
                    self.on_data(direction, data)
                writer.write(data)
                await writer.drain()
        if not writer.is_closing() and writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()


class _Port(asyncio.DatagramProtocol):
    def __init__(self, received: Callable[[bytes, Address], None]) -> None:
        self.received = received
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.received(data, addr[:2])

    @property
    def address(self) -> Address:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port


@dataclass(slots=True)
class _Counter:
    payload_bytes: int = 0
    packets: int = 0

    def flow(self) -> Flow:
        return Flow(self.payload_bytes, self.packets, self.packets * (IPV4_HEADER + UDP_HEADER))


class CountingUdpRelay:
    """``async with CountingUdpRelay.running() as relay``; ``traffic()``: up is A to B."""

    def __init__(self) -> None:
        self._ports: dict[str, _Port] = {}
        self._peers: dict[str, Address] = {}
        self._counts = {"a": _Counter(), "b": _Counter()}

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls) -> AsyncIterator[CountingUdpRelay]:
        self = cls()
        try:
            await self._bind("a", "b")
            await self._bind("b", "a")
            yield self
        finally:
            for port in self._ports.values():
                if port.transport is not None:
                    port.transport.close()

    async def _bind(self, side: str, other: str) -> None:
        port = self._ports[side] = _Port(functools.partial(self._relay, side, other))
        await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: port, local_addr=("127.0.0.1", 0)
        )

    @property
    def address_for_a(self) -> Address:
        return self._ports["a"].address

    @property
    def address_for_b(self) -> Address:
        return self._ports["b"].address

    def _relay(self, side: str, other: str, data: bytes, addr: Address) -> None:
        if self._peers.setdefault(side, addr) != addr:
            return  # not the endpoint this side latched onto
        count = self._counts[side]
        count.payload_bytes += len(data)
        count.packets += 1
        transport, to = self._ports[other].transport, self._peers.get(other)
        if transport is not None and to is not None:
            transport.sendto(data, to)

    def traffic(self) -> Traffic:
        return Traffic(self._counts["a"].flow(), self._counts["b"].flow())
