"""The datagram transport a media session runs over, and its plain-UDP implementation.

ICE (next issue) implements the same ``DatagramTransport`` protocol, so the
media session does not change when the path to the peer does.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from dataclasses import dataclass
from typing import Protocol

logger = logging.getLogger(__name__)

Address = tuple[str, int]
_MAX_DATAGRAM = 2048  # RTP audio packets are ~100-500 bytes; larger ones are not ours


class TransportClosed(ConnectionError):
    """The transport was closed; no more datagrams will arrive."""


class DatagramTransport(Protocol):
    """Connected, unreliable, message-oriented: one datagram per call."""

    async def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes:
        """Next datagram from the peer; TransportClosed once closed."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class UdpStats:
    received: int
    sent: int
    dropped_overflow: int
    """Datagrams dropped because the reader fell behind (oldest first)."""
    dropped_foreign: int
    """Datagrams from an address other than the peer's."""
    send_errors: int


class UdpTransport:
    """A UDP socket bound first (port 0 is fine) and pointed at the peer later.

    Incoming datagrams go into a bounded queue; when the reader falls behind the
    oldest is dropped, since stale audio is worth less than fresh audio.
    """

    def __init__(self, sock: socket.socket, queue_size: int = 256) -> None:
        self._sock = sock
        self._queue: collections.deque[bytes] = collections.deque(maxlen=queue_size)
        self._waiter: asyncio.Future[None] | None = None
        self._remote: Address | None = None
        self._is_closed = False
        self._received_count = 0
        self._sent = 0
        self._overflow = 0
        self._foreign = 0
        self._send_errors = 0

    @classmethod
    async def bind(
        cls, host: str = "127.0.0.1", port: int = 0, queue_size: int = 256
    ) -> UdpTransport:
        # A plain non-blocking socket on the loop's reader: asyncio's datagram transport
        # allocates a 256 KiB buffer (an mmap) for every packet it reads.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        self = cls(sock, queue_size)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        return self

    @property
    def local_address(self) -> Address:
        host, port = self._sock.getsockname()[:2]
        return host, port

    def connect(self, remote: Address) -> None:
        """Send to and accept datagrams only from ``remote``."""
        self._remote = remote

    @property
    def stats(self) -> UdpStats:
        return UdpStats(
            self._received_count, self._sent, self._overflow, self._foreign, self._send_errors
        )

    def _readable(self) -> None:
        # Drain everything queued in the kernel: one loop wake-up for a burst of datagrams.
        while True:
            try:
                data, addr = self._sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # ICMP unreachable while the peer is not up yet
                self._send_errors += 1
                logger.debug("udp error: %s", exc)
                break
            if addr[:2] != self._remote:
                self._foreign += 1
                continue
            if len(self._queue) == self._queue.maxlen:
                self._overflow += 1
            self._queue.append(data)
            self._received_count += 1
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _closed(self) -> None:
        self._is_closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def send(self, data: bytes) -> None:
        if self._is_closed:
            raise TransportClosed("udp transport closed")
        if self._remote is None:
            raise TransportClosed("udp transport has no peer address yet")
        try:
            self._sock.sendto(data, self._remote)
            self._sent += 1
        except (BlockingIOError, InterruptedError):
            self._send_errors += 1  # socket buffer full: drop, as the network would
        except OSError as exc:
            self._send_errors += 1
            logger.debug("udp send failed: %s", exc)

    async def recv(self) -> bytes:
        while not self._queue:
            if self._is_closed:
                raise TransportClosed("udp transport closed")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    async def close(self) -> None:
        if not self._is_closed:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
        self._closed()
