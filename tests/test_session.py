"""MediaSession over real UDP on loopback: audio both ways, hang-up reasons, attackers refused."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.audio.format import SAMPLE_RATE
from agent.audio.sources import MemorySink, ToneSource, WavSource
from agent.codec.opus import OpusConfig, OpusEncoder
from agent.media import rtcp
from agent.media.rtp import RtpPacket
from agent.media.session import EndReason, MediaConfig, MediaSession
from agent.media.srtp import PresharedKeying, SrtpContext, SrtpProfile
from agent.net.impair import Impairment, ImpairmentProxy
from agent.net.transport import DatagramQueue, DatagramReceiver, UdpTransport
from tools.lab.virtual_audio import write_wav

KEYS = PresharedKeying.from_secret(b"k" * 32, offerer=True, profile=SrtpProfile.AEAD_AES_128_GCM)
FAST = MediaConfig(rtcp_interval_s=0.2, media_timeout_s=1.0)


def peak_hz(frames: list[bytes]) -> float:
    x = np.frombuffer(b"".join(frames), "<i2").astype(float)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)[int(np.argmax(spectrum))])


@dataclass
class Call:
    a: MediaSession
    b: MediaSession
    heard_by_a: MemorySink
    heard_by_b: MemorySink
    transports: tuple[UdpTransport, UdpTransport]


@contextlib.asynccontextmanager
async def _call(
    impairment: Impairment = Impairment(), config: MediaConfig = FAST
) -> AsyncIterator[Call]:
    ta, tb = await UdpTransport.bind(), await UdpTransport.bind()
    proxy = await ImpairmentProxy.start()
    proxy.connect(ta.local_address, tb.local_address, impairment, impairment)
    ta.connect(proxy.address_for_a)
    tb.connect(proxy.address_for_b)
    sink_a, sink_b = MemorySink(paced=True), MemorySink(paced=True)
    a = MediaSession(ta, KEYS, ToneSource(440.0, paced=True), sink_a, config, call_id="a")
    b = MediaSession(
        tb, KEYS.reversed(), ToneSource(1000.0, paced=True), sink_b, config, call_id="b"
    )
    await a.start()
    await b.start()
    try:
        yield Call(a, b, sink_a, sink_b, (ta, tb))
    finally:
        for s in (a, b):
            await s.close()
        for t in (ta, tb):
            await t.close()
        await proxy.close()


@pytest.fixture
async def call() -> AsyncIterator[Call]:
    async with _call(Impairment(loss=0.1, mean_burst=2.0, jitter_ms=10.0, seed=5)) as c:
        yield c


async def _wait_for(condition: Callable[[], bool], limit_s: float = 10.0) -> None:
    async with asyncio.timeout(limit_s):
        while not condition():
            await asyncio.sleep(0.02)


async def test_full_duplex_audio_over_a_lossy_network(call: Call) -> None:
    await _wait_for(lambda: len(call.heard_by_a.frames) > 150 and len(call.heard_by_b.frames) > 150)
    assert abs(peak_hz(call.heard_by_b.frames[50:]) - 440.0) < 5.0
    assert abs(peak_hz(call.heard_by_a.frames[50:]) - 1000.0) < 5.0
    await _wait_for(lambda: call.a.stats.rtt_ms is not None and call.a.stats.loss_fraction > 0)
    stats = call.b.stats
    assert stats.packets_lost > 0
    assert stats.red_recovered + stats.fec_recovered > 0
    # RED repeats every frame twice, so FEC is left the ~0.1 % of frames RED cannot save.
    assert call.a.stats.encoder_loss_hint <= 2


async def test_fec_follows_reported_loss_without_red() -> None:
    config = MediaConfig(red_distance=0, rtcp_interval_s=0.2, media_timeout_s=1.0)
    async with _call(Impairment(loss=0.2, seed=8), config) as c:
        await _wait_for(lambda: c.a.stats.packets_sent > 150 and c.a.stats.encoder_loss_hint > 0)
        await asyncio.sleep(0.5)  # a report over a full interval, not the first few packets
        assert 5 <= c.a.stats.encoder_loss_hint <= 40
        assert c.b.stats.red_recovered == 0


@pytest.mark.parametrize(("reach", "target_ms"), [(8, 180.0), (5, 120.0)])
async def test_under_heavy_loss_red_reaches_back_and_the_peer_waits_for_its_copies(
    reach: int, target_ms: float
) -> None:
    # Five copies reaching back `reach` frames: the receiver's buffer holds that many frames
    # plus the one being played, so that a copy arrives before its frame is due.
    config = MediaConfig(red_reach=reach, rtcp_interval_s=0.2, media_timeout_s=1.0)
    async with _call(Impairment(loss=0.15, mean_burst=3.0, seed=3), config) as c:
        await _wait_for(lambda: c.b.stats.jitter_target_ms >= target_ms)
        await asyncio.sleep(0.5)
        assert c.b.stats.jitter_target_ms == target_ms
        assert c.b.stats.red_recovered > 0


async def test_hangup_reaches_the_peer_as_bye(call: Call) -> None:
    await _wait_for(lambda: call.b.stats.packets_received > 10)
    assert await call.a.close() is EndReason.LOCAL_HANGUP
    assert await asyncio.wait_for(call.b.ended(), 5) is EndReason.REMOTE_BYE


async def test_silent_peer_times_out() -> None:
    async with _call() as c:
        await _wait_for(lambda: c.a.stats.packets_received > 5)
        await c.transports[1].close()  # b's network is gone: no BYE, nothing at all
        assert await asyncio.wait_for(c.a.ended(), 5) is EndReason.MEDIA_TIMEOUT


async def test_bad_datagrams_are_counted_and_the_call_goes_on() -> None:
    """A scripted peer sends a tone and, mid-call, every kind of bad datagram."""
    ours, theirs = await UdpTransport.bind(), await UdpTransport.bind()
    ours.connect(theirs.local_address)
    theirs.connect(ours.local_address)
    heard = MemorySink(paced=True)
    session = MediaSession(ours, KEYS, ToneSource(300.0, paced=True), heard, FAST)
    await session.start()
    peer = SrtpContext(KEYS.reversed().pair)
    encoder = OpusEncoder(OpusConfig())
    tone = ToneSource(1000.0)
    ssrc, sent = 0x5EED, []
    seqs = iter(range(1_000))

    def rtp(frame: int, pt: int = 111, payload: bytes = b"", ssrc: int = ssrc) -> bytes:
        return peer.protect(RtpPacket(pt, next(seqs), frame * 960, ssrc, payload).to_bytes())

    for frame in range(150):
        packet = rtp(frame, payload=encoder.encode(await tone.read()))
        sent.append(packet)
        await theirs.send(packet)
        if frame == 60:
            for bad in (
                os.urandom(120),  # off-path junk: fails authentication
                sent[10],  # a replayed packet
                rtp(frame, 63, b"\xff\xff"),  # RED header overruns the payload
                rtp(frame, 99, b"x" * 20),  # payload type never negotiated
                rtp(frame, 111, b"\xff" * 10, ssrc=ssrc ^ 1),  # someone else's stream
                peer.protect_rtcp(b"\x80\xc9\x00\x09" + bytes(4)),  # RTCP length overruns
            ):
                await theirs.send(bad)
        await asyncio.sleep(0.02)
    stats = session.stats
    assert stats.srtp_auth_failed >= 1
    assert stats.srtp_replayed >= 1
    assert stats.malformed >= 2
    assert stats.unknown_payload_type >= 1
    assert stats.wrong_ssrc >= 1
    assert session.running
    assert abs(peak_hz(heard.frames[-40:]) - 1000.0) < 5.0
    await session.close()
    await ours.close()
    await theirs.close()


async def test_source_end_ends_the_call_for_both(tmp_path: Path) -> None:
    short = write_wav(tmp_path / "short.wav", np.zeros(SAMPLE_RATE // 2))
    ta, tb = await UdpTransport.bind(), await UdpTransport.bind()
    ta.connect(tb.local_address)
    tb.connect(ta.local_address)
    a = MediaSession(ta, KEYS, WavSource(short, paced=True), MemorySink(paced=True), FAST)
    b = MediaSession(
        tb, KEYS.reversed(), ToneSource(600.0, paced=True), MemorySink(paced=True), FAST
    )
    await a.start()
    await b.start()
    assert await asyncio.wait_for(a.ended(), 5) is EndReason.SOURCE_ENDED
    assert await a.close() is EndReason.SOURCE_ENDED
    assert await asyncio.wait_for(b.ended(), 5) is EndReason.REMOTE_BYE
    await b.close()
    for t in (ta, tb):
        await t.close()


class QueueTransport:
    """In-memory transport for fuzzing the receive path without sockets."""

    def __init__(self) -> None:
        self.inbox = DatagramQueue(1024)

    async def send(self, data: bytes) -> None:
        return None

    async def recv(self) -> bytes:
        return await self.inbox.get()

    def attach(self, receiver: DatagramReceiver) -> None:
        self.inbox.attach(receiver)

    def detach(self) -> None:
        self.inbox.detach()

    async def close(self) -> None:
        return None


# Sequence numbers are filled in when sealing: libsrtp refuses to protect one twice.
_sealed_rtp = st.builds(
    lambda pt, ts, ssrc, payload: ("rtp", RtpPacket(pt, 0, ts, ssrc, payload).to_bytes()),
    st.sampled_from([63, 111, 0, 127]),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.binary(max_size=300),
)
_sealed_rtcp = st.builds(
    lambda pt, body: ("rtcp", bytes([0x80, pt]) + struct.pack("!H", len(body) // 4) + body),
    st.integers(192, 223),
    st.binary(min_size=4, max_size=200),
)
_raw = st.binary(max_size=400).map(lambda b: ("raw", b))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(_raw, _sealed_rtp, _sealed_rtcp), max_size=30))
def test_any_datagram_sequence_is_survived(datagrams: list[tuple[str, bytes]]) -> None:
    """Garbage, even authenticated (a peer holding the keys), never ends a session."""

    async def run() -> None:
        transport = QueueTransport()
        session = MediaSession(
            transport, KEYS, ToneSource(300.0, paced=True), MemorySink(paced=True), FAST
        )
        await session.start()
        sealer = SrtpContext(KEYS.reversed().pair)
        for seq, (kind, data) in enumerate(datagrams):
            if kind == "rtp":
                transport.inbox.put(sealer.protect(data[:2] + struct.pack("!H", seq) + data[4:]))
            elif kind == "rtcp":
                transport.inbox.put(sealer.protect_rtcp(data))
            else:
                transport.inbox.put(data)
            await asyncio.sleep(0)  # the session's tasks run in between, as with a socket
        assert session.running

        # Still receiving (a failure in the receive path would have detached it): one more
        # datagram is checked and counted.
        def refused() -> int:
            return session.stats.srtp_auth_failed + session.stats.srtp_replayed

        before = refused()
        transport.inbox.put(b"\x80\x6f" + bytes(40))
        assert refused() == before + 1
        assert await session.close() is EndReason.LOCAL_HANGUP

    asyncio.run(run())


class ClosedTransport(QueueTransport):
    def __init__(self) -> None:
        super().__init__()
        self.inbox.close("gone")


async def test_close_is_idempotent_and_safe_before_start() -> None:
    unstarted = MediaSession(QueueTransport(), KEYS, ToneSource(300.0), MemorySink(), FAST)
    assert await unstarted.close() is EndReason.LOCAL_HANGUP
    session = MediaSession(
        ClosedTransport(), KEYS, ToneSource(300.0, paced=True), MemorySink(paced=True), FAST
    )
    await session.start()
    assert await asyncio.wait_for(session.ended(), 2) is EndReason.TRANSPORT_CLOSED
    assert await session.close() is EndReason.TRANSPORT_CLOSED
    assert await session.close(EndReason.LOCAL_HANGUP) is EndReason.TRANSPORT_CLOSED


async def test_only_a_bye_for_the_peers_source_ends_the_session() -> None:
    """RFC 3550: a BYE says the sources it lists have left. One that lists none, or
    another source, is counted (``wrong_ssrc``) and the call goes on; the peer's own
    ends it, and its reason for leaving is kept."""
    transport = QueueTransport()
    session = MediaSession(
        transport, KEYS, ToneSource(300.0, paced=True), MemorySink(paced=True), FAST
    )
    await session.start()
    sealer = SrtpContext(KEYS.reversed().pair)
    peer = 0x1234ABCD
    encoder = OpusEncoder(OpusConfig())
    frame = encoder.encode(bytes(1920))
    transport.inbox.put(sealer.protect(RtpPacket(111, 1, 960, peer, frame).to_bytes()))
    await asyncio.sleep(0)
    for bye in (rtcp.Bye(()), rtcp.Bye((peer ^ 1,), "shutdown")):
        report = rtcp.ReceiverReport(ssrc=peer, reports=())  # compound RTCP starts with one
        transport.inbox.put(sealer.protect_rtcp(rtcp.serialize_compound([report, bye])))
        await asyncio.sleep(0)
    assert session.running
    assert session.stats.wrong_ssrc == 2
    leaving = rtcp.serialize_compound(
        [rtcp.ReceiverReport(ssrc=peer, reports=()), rtcp.Bye((peer,), "shutdown")]
    )
    transport.inbox.put(sealer.protect_rtcp(leaving))
    assert await asyncio.wait_for(session.ended(), 5) is EndReason.REMOTE_BYE
    assert session.bye_reason == "shutdown"
    await session.close()
