"""The datagram transport a media session runs over, and its plain-UDP implementation.

ICE implements the same protocols, so the media session does not change when
the path to the peer does. A reader either awaits ``recv()`` (a bounded queue,
as DTLS does) or, on a ``PushTransport``, attaches a ``DatagramReceiver`` that
is handed each datagram as it arrives: the media path does that, because a
queue and a reader task between each layer cost a loop iteration, a future and
a task switch per packet at every hop (50 packets a second each way).
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


class DatagramReceiver(Protocol):
    """Takes the datagrams of a ``PushTransport`` as they arrive, on the event loop."""

    def datagram_received(self, data: bytes) -> None:
        """One datagram from the peer. Runs inside the transport's own read callback: handle
        it and return, do not block."""

    def transport_closed(self, reason: str) -> None:
        """No more datagrams will come (said once; the receiver is detached by then)."""


class PushTransport(DatagramTransport, Protocol):
    """A ``DatagramTransport`` that can also hand its datagrams to a receiver."""

    def attach(self, receiver: DatagramReceiver) -> None:
        """From now on give every datagram to ``receiver`` instead of queueing it for
        ``recv`` (those already queued first). One reader: ``recv`` or a receiver."""

    def detach(self) -> None:
        """Queue datagrams for ``recv`` again."""


class DatagramQueue:
    """Received datagrams for one reader. An async reader (``get``) has a bounded queue: when
    it is full the oldest datagram is dropped (stale audio is worth less than fresh) and
    counted, and after ``close`` the reader gets what is still queued (unless discarded),
    then ``TransportClosed``. An attached ``DatagramReceiver`` gets each datagram at once."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("queue size must be at least 1")
        self._queue: collections.deque[bytes] = collections.deque(maxlen=size)
        self._waiter: asyncio.Future[None] | None = None
        self._receiver: DatagramReceiver | None = None
        self.closed_reason: str | None = None
        self.queued = 0
        """Datagrams accepted so far."""
        self.dropped = 0
        """Datagrams dropped because the reader fell behind."""

    def put(self, data: bytes) -> bool:
        """Queue (or hand over) one datagram; False (and nothing done) once closed."""
        if self.closed_reason is not None:
            return False
        self.queued += 1
        receiver = self._receiver
        if receiver is not None:
            receiver.datagram_received(data)
            return True
        queue = self._queue
        if len(queue) == queue.maxlen:
            self.dropped += 1  # the deque drops the oldest on append
        queue.append(data)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True

    def attach(self, receiver: DatagramReceiver) -> None:
        """Hand datagrams to ``receiver`` from now on, starting with those queued."""
        if self._receiver is not None or self._waiter is not None:
            raise RuntimeError("this datagram queue already has a reader")
        self._receiver = receiver
        queue = self._queue
        while queue and self._receiver is receiver:
            receiver.datagram_received(queue.popleft())
        if self.closed_reason is not None and self._receiver is receiver:
            self._receiver = None
            receiver.transport_closed(self.closed_reason)

    def detach(self) -> None:
        """Queue datagrams for ``get`` again."""
        self._receiver = None

    def close(self, reason: str, *, discard: bool = False) -> None:
        """No more datagrams; the first reason given is the one the reader sees."""
        if self.closed_reason is None:
            self.closed_reason = reason
        if discard:
            self._queue.clear()
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            receiver.transport_closed(self.closed_reason)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> bytes:
        if self._receiver is not None:
            raise RuntimeError("datagrams go to an attached receiver, not to get()")
        while not self._queue:
            if self.closed_reason is not None:
                raise TransportClosed(self.closed_reason)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()


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
    oldest is dropped, since stale audio is worth less than fresh audio. Or they go
    straight to an attached receiver (``PushTransport``).
    """

    def __init__(self, sock: socket.socket, queue_size: int = 256) -> None:
        self._sock = sock
        self._inbox = DatagramQueue(queue_size)
        self._remote: Address | None = None
        self._sent = 0
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
            self._inbox.queued, self._sent, self._inbox.dropped, self._foreign, self._send_errors
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
            self._inbox.put(data)

    async def send(self, data: bytes) -> None:
        if self._inbox.closed_reason is not None:
            raise TransportClosed(self._inbox.closed_reason)
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
        return await self._inbox.get()

    def attach(self, receiver: DatagramReceiver) -> None:
        self._inbox.attach(receiver)

    def detach(self) -> None:
        self._inbox.detach()

    async def close(self) -> None:
        if self._inbox.closed_reason is None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
        self._inbox.close("udp transport closed")
