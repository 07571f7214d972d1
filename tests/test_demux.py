"""The RFC 7983 demultiplexer on real loopback UDP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
from hypothesis import given
from hypothesis import strategies as st
from net_env import Receiver

from agent.net.demux import _DTLS, _KIND, _MEDIA, _STUN, _UNKNOWN, Demux, DemuxStats
from agent.net.transport import TransportClosed, UdpTransport


@asynccontextmanager
async def _demuxed(
    *, dtls_queue_size: int = 32, media_queue_size: int = 256
) -> AsyncIterator[tuple[UdpTransport, Demux]]:
    """A peer socket and a demux over the socket it talks to."""
    peer, ours = await UdpTransport.bind(), await UdpTransport.bind()
    peer.connect(ours.local_address)
    ours.connect(peer.local_address)
    demux = Demux(ours, dtls_queue_size=dtls_queue_size, media_queue_size=media_queue_size)
    try:
        yield peer, demux
    finally:
        await demux.close()
        await ours.close()
        await peer.close()


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.005)


@given(st.integers(0, 255))
def test_first_byte_classification_follows_rfc7983(first: int) -> None:
    if first <= 3:
        assert _KIND[first] == _STUN
    elif 20 <= first <= 63:
        assert _KIND[first] == _DTLS
    elif 128 <= first <= 191:
        assert _KIND[first] == _MEDIA
    else:
        assert _KIND[first] == _UNKNOWN


async def test_each_datagram_reaches_its_channel_and_the_rest_is_counted() -> None:
    async with _demuxed() as (peer, demux):
        sent = [
            b"\x16\xfe\xfd dtls handshake",
            b"\x80\x6f rtp",
            b"\x00\x01 stun binding request",
            b"\x03 stun",
            b"\x14 dtls ccs",
            b"\x3f dtls top",
            b"\xbf rtp top",
            b"\x04 below dtls",
            b"\x13 below dtls",
            b"\x40 above dtls",
            b"\x7f below rtp",
            b"\xc0 above rtp",
            b"\xff",
            b"",
        ]
        for data in sent:
            await peer.send(data)
        await _until(lambda: demux.stats.dropped_unknown == 7)
        assert [await demux.dtls.recv() for _ in range(3)] == [sent[0], sent[4], sent[5]]
        assert [await demux.media.recv() for _ in range(2)] == [sent[1], sent[6]]
        assert demux.stats == DemuxStats(
            dtls=3,
            media=2,
            unexpected_stun=2,
            dropped_unknown=7,
            dtls_overflow=0,
            media_overflow=0,
        )


async def test_channels_send_straight_to_the_peer() -> None:
    async with _demuxed() as (peer, demux):
        await demux.media.send(b"\x80 from media")
        await demux.dtls.send(b"\x16 from dtls")
        async with asyncio.timeout(5):
            assert await peer.recv() == b"\x80 from media"
            assert await peer.recv() == b"\x16 from dtls"


async def test_a_slow_reader_loses_the_oldest_and_it_is_counted() -> None:
    async with _demuxed(media_queue_size=4, dtls_queue_size=2) as (peer, demux):
        for i in range(10):
            await peer.send(bytes([0x80, i]))
        for i in range(3):
            await peer.send(bytes([0x16, i]))
        await _until(lambda: demux.stats.media + demux.stats.dtls == 13)
        assert [await demux.media.recv() for _ in range(4)] == [
            bytes([0x80, i]) for i in (6, 7, 8, 9)
        ]
        assert [await demux.dtls.recv() for _ in range(2)] == [bytes([0x16, i]) for i in (1, 2)]
        assert demux.stats.media_overflow == 6
        assert demux.stats.dtls_overflow == 1


async def test_closing_the_demux_ends_both_channels_even_mid_recv() -> None:
    async with _demuxed() as (peer, demux):
        await peer.send(b"\x80 queued")
        await _until(lambda: demux.stats.media == 1)
        waiting = asyncio.create_task(demux.dtls.recv())
        await asyncio.sleep(0)
        await demux.close()
        assert not demux.running
        with pytest.raises(TransportClosed):
            await asyncio.wait_for(waiting, 5)
        with pytest.raises(TransportClosed):
            await demux.media.recv()  # what was queued is discarded
        with pytest.raises(TransportClosed):
            await demux.media.send(b"\x80 late")
        with pytest.raises(TransportClosed):
            await demux.dtls.send(b"\x16 late")
        await demux.close()  # again: nothing happens


async def test_underlying_close_delivers_the_queue_then_ends_both_channels() -> None:
    peer, ours = await UdpTransport.bind(), await UdpTransport.bind()
    peer.connect(ours.local_address)
    ours.connect(peer.local_address)
    demux = Demux(ours)
    try:
        waiting = asyncio.create_task(demux.dtls.recv())
        await peer.send(b"\x80 last")
        await _until(lambda: demux.stats.media == 1)
        await ours.close()
        with pytest.raises(TransportClosed):
            await asyncio.wait_for(waiting, 5)
        await _until(lambda: not demux.running)
        assert await demux.media.recv() == b"\x80 last"
        with pytest.raises(TransportClosed):
            await asyncio.wait_for(demux.media.recv(), 5)
    finally:
        await demux.close()
        await peer.close()


async def test_closing_one_channel_leaves_the_other_running() -> None:
    async with _demuxed() as (peer, demux):
        await demux.dtls.close()
        with pytest.raises(TransportClosed):
            await demux.dtls.recv()
        await peer.send(b"\x16 unwanted")
        await peer.send(b"\x80 wanted")
        assert await asyncio.wait_for(demux.media.recv(), 5) == b"\x80 wanted"
        assert demux.stats.dtls_overflow == 1


async def test_a_cancelled_recv_loses_nothing() -> None:
    async with _demuxed() as (peer, demux):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(demux.media.recv(), 0.01)
        await peer.send(b"\x80 after")
        assert await asyncio.wait_for(demux.media.recv(), 5) == b"\x80 after"


async def test_a_receiver_on_a_channel_gets_its_datagrams_straight_from_the_socket() -> None:
    async with _demuxed() as (peer, demux):
        await peer.send(b"\x80 early")
        await _until(lambda: demux.stats.media == 1)
        receiver = Receiver()
        demux.media.attach(receiver)  # what was queued comes first
        await peer.send(b"\x16 dtls")
        await peer.send(b"\x80 late")
        await _until(lambda: len(receiver.datagrams) == 2)
        assert receiver.datagrams == [b"\x80 early", b"\x80 late"]
        assert await demux.dtls.recv() == b"\x16 dtls"
        await demux.close()
        assert receiver.closed == ["demux media channel closed"]


async def test_queue_size_must_be_positive() -> None:
    transport = await UdpTransport.bind()
    try:
        with pytest.raises(ValueError, match="queue_size"):
            Demux(transport, media_queue_size=0)
    finally:
        await transport.close()
