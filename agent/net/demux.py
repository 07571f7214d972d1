"""Splits one datagram transport into a DTLS channel and an RTP/RTCP channel (RFC 7983).

DTLS-SRTP runs its handshake and the media on the same 5-tuple; the first byte
of each datagram tells them apart:

    0..3      STUN     (answered inside ICE; reaching us is unexpected)
    20..63    DTLS
    128..191  RTP/RTCP (SRTP/SRTCP once keyed)

Anything else (ZRTP, TURN channel data, noise) is dropped and counted. Each
channel is itself a ``PushTransport``: ``send`` goes straight to the
underlying transport, ``recv`` reads that channel's bounded queue, which drops
its oldest datagram when the reader falls behind, and a receiver attached to
the channel gets each of its datagrams at once. The demux is itself attached
to the underlying transport: a datagram goes from the socket's read callback to
its channel's reader without a task or a loop iteration in between.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from agent.net.transport import DatagramQueue, DatagramReceiver, PushTransport, TransportClosed

logger = logging.getLogger(__name__)

# What the first byte of a datagram says it is (RFC 7983 section 7).
_UNKNOWN, _STUN, _DTLS, _MEDIA = 0, 1, 2, 3


def _kind_of(first_byte: int) -> int:
    if first_byte <= 3:
        return _STUN
    if 20 <= first_byte <= 63:
        return _DTLS
    if 128 <= first_byte <= 191:
        return _MEDIA
    return _UNKNOWN


# A table lookup per datagram instead of a chain of comparisons.
_KIND: tuple[int, ...] = tuple(_kind_of(b) for b in range(256))


@dataclass(frozen=True, slots=True)
class DemuxStats:
    dtls: int
    """Datagrams queued for the DTLS channel."""
    media: int
    """Datagrams queued for the RTP/RTCP channel."""
    unexpected_stun: int
    """STUN datagrams (first byte 0..3): ICE answers those, they should not reach us."""
    dropped_unknown: int
    """Empty datagrams and datagrams whose first byte belongs to no protocol we run."""
    dtls_overflow: int
    """DTLS datagrams dropped (oldest first) because its reader fell behind."""
    media_overflow: int
    """RTP/RTCP datagrams dropped (oldest first) because its reader fell behind."""


class DemuxChannel:
    """One side of a ``Demux``: a ``PushTransport`` for one protocol.

    ``close()`` closes only this channel (its datagrams are then dropped and
    counted as overflow); the demux and the underlying transport go on.
    """

    def __init__(self, name: str, underlying: PushTransport, queue_size: int) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.name = name
        self._underlying = underlying
        self._inbox = DatagramQueue(queue_size)
        self._late = 0  # arrived after this channel closed

    @property
    def queued(self) -> int:
        return self._inbox.queued

    @property
    def overflow(self) -> int:
        return self._inbox.dropped + self._late

    def _push(self, data: bytes) -> None:
        """Called by the demux for each datagram of this channel."""
        if not self._inbox.put(data):
            self._late += 1

    def _end(self, *, discard: bool) -> None:
        """No more datagrams: ``recv`` raises once the queue is empty (at once if discarded)."""
        self._inbox.close(f"demux {self.name} channel closed", discard=discard)

    @property
    def closed(self) -> bool:
        return self._inbox.closed_reason is not None

    async def send(self, data: bytes) -> None:
        if self.closed:
            raise TransportClosed(f"demux {self.name} channel closed")
        await self._underlying.send(data)

    async def recv(self) -> bytes:
        return await self._inbox.get()

    def attach(self, receiver: DatagramReceiver) -> None:
        self._inbox.attach(receiver)

    def detach(self) -> None:
        self._inbox.detach()

    async def close(self) -> None:
        self._end(discard=True)


class Demux:
    """The one reader of ``transport``: hands each datagram to its channel as it arrives.

    The demux does not own ``transport``: ``close()`` detaches from it and closes
    both channels, and whoever made the transport closes it. When the transport
    closes by itself, both channels deliver what they hold and then raise
    ``TransportClosed``.
    """

    def __init__(
        self,
        transport: PushTransport,
        *,
        dtls_queue_size: int = 32,
        media_queue_size: int = 256,
        name: str = "-",
    ) -> None:
        self._transport = transport
        self._name = name
        self.dtls = DemuxChannel("dtls", transport, dtls_queue_size)
        self.media = DemuxChannel("media", transport, media_queue_size)
        self._stun = 0
        self._unknown = 0
        self._running = True
        # Bound once: the per-datagram path is a table lookup and one call.
        self._media_push = self.media._push
        self._dtls_push = self.dtls._push
        transport.attach(self)

    @property
    def stats(self) -> DemuxStats:
        return DemuxStats(
            dtls=self.dtls.queued,
            media=self.media.queued,
            unexpected_stun=self._stun,
            dropped_unknown=self._unknown,
            dtls_overflow=self.dtls.overflow,
            media_overflow=self.media.overflow,
        )

    @property
    def running(self) -> bool:
        """Still reading (the demux is not closed and the transport is open)."""
        return self._running

    # DatagramReceiver: called by the transport.

    def datagram_received(self, data: bytes) -> None:
        kind = _KIND[data[0]] if data else _UNKNOWN
        if kind == _MEDIA:
            self._media_push(data)
        elif kind == _DTLS:
            self._dtls_push(data)
        elif kind == _STUN:
            self._stun += 1
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("demux %s: unexpected STUN datagram (%d bytes)", self._name, len(data))
        else:
            self._unknown += 1
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "demux %s: dropped datagram, first byte %s",
                    self._name, data[0] if data else "(empty)",
                )  # fmt: skip

    def transport_closed(self, reason: str) -> None:
        logger.debug("demux %s: underlying transport closed: %s", self._name, reason)
        self._running = False
        self.dtls._end(discard=False)
        self.media._end(discard=False)

    async def close(self) -> None:
        """Stop reading; both channels raise ``TransportClosed`` from now on."""
        if self._running:
            self._running = False
            self._transport.detach()
        self.dtls._end(discard=True)
        self.media._end(discard=True)
