"""Whole calls set up the WebRTC way: SDP offer/answer, ICE, DTLS-SRTP, then audio.

Agent to agent in one process, and agent to aiortc (a stack nobody here wrote)
in both directions: each side must hear the other's tone, aiortc's RTCP must
reach our statistics, and hang-up must be clean on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace

import numpy as np
import pytest

from agent.audio.format import SAMPLE_RATE
from agent.audio.sources import MemorySink, ToneSource
from agent.media import sdp
from agent.media.dtls import DtlsCertificate, DtlsTimers
from agent.media.peer import CallSetupError, MediaPeer, PeerConfig
from agent.media.session import EndReason, MediaConfig
from agent.net.ice import IceConfig, IceTimers
from tools.lab.aiortc_peer import AiortcPeer

LOOPBACK = IceConfig(host_addresses=("127.0.0.1",), timers=IceTimers(connect_timeout=10.0))
CONFIG = PeerConfig(
    ice=LOOPBACK,
    media=MediaConfig(rtcp_interval_s=0.2, media_timeout_s=2.0),
    dtls=DtlsTimers(retransmit_s=0.2, handshake_timeout_s=5.0),
)
CERT_A = DtlsCertificate.generate("door-a")
CERT_B = DtlsCertificate.generate("door-b")


def peak_hz(samples: np.ndarray) -> float:
    x = samples.astype(float)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)[int(np.argmax(spectrum))])


def _peer(
    cert: DtlsCertificate, hz: float, config: PeerConfig = CONFIG
) -> tuple[MediaPeer, MemorySink]:
    sink = MemorySink(paced=True)
    return MediaPeer(config, cert, ToneSource(hz, paced=True), sink, call_id=f"tone{hz:g}"), sink


async def _trickle(src: MediaPeer, dst: MediaPeer) -> None:
    async for candidate in src.local_candidates():
        await dst.add_remote_candidate(candidate)
    await dst.add_remote_candidate(None)


@contextlib.asynccontextmanager
async def _connected(a: MediaPeer, b: MediaPeer, *, trickle: bool) -> AsyncIterator[None]:
    try:
        offer = await a.create_offer(trickle=trickle)
        answer = await b.accept_offer(offer, trickle=trickle)
        await a.accept_answer(answer)
        async with asyncio.TaskGroup() as tg:
            if trickle:
                tg.create_task(_trickle(a, b))
                tg.create_task(_trickle(b, a))
            tg.create_task(a.connect())
            tg.create_task(b.connect())
        yield
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("trickle", [True, False])
async def test_two_agents_hear_each_other_over_ice_and_dtls(trickle: bool) -> None:
    (a, heard_by_a), (b, heard_by_b) = _peer(CERT_A, 440.0), _peer(CERT_B, 1000.0)
    async with _connected(a, b, trickle=trickle):
        assert a.session is not None and b.session is not None
        await asyncio.wait_for(a.session.first_audio(), 5)
        await asyncio.sleep(1.0)
        assert a.ice is not None and a.ice.selected_pair is not None
        assert a.ice.selected_pair.local.type == "host"
        assert b.negotiated is not None and b.negotiated.red
    assert await b.ended() is EndReason.REMOTE_BYE
    assert peak_hz(heard_by_a.samples()[-SAMPLE_RATE // 2 :]) == pytest.approx(1000, abs=5)
    assert peak_hz(heard_by_b.samples()[-SAMPLE_RATE // 2 :]) == pytest.approx(440, abs=5)


async def test_a_forged_fingerprint_fails_the_call() -> None:
    (a, _), (b, _) = _peer(CERT_A, 440.0), _peer(CERT_B, 1000.0)
    offer = await a.create_offer(trickle=False)
    impostor = DtlsCertificate.generate("impostor").fingerprint.value
    forged = offer.replace(CERT_A.fingerprint.value, impostor)
    try:
        answer = await b.accept_offer(forged, trickle=False)
        await a.accept_answer(answer)
        results = await asyncio.gather(a.connect(), b.connect(), return_exceptions=True)
        assert isinstance(results[1], CallSetupError)
        assert "matches no fingerprint" in str(results[1])
        assert isinstance(results[0], CallSetupError)
    finally:
        await a.close()
        await b.close()


async def test_garbage_offer_is_refused_with_a_clear_error() -> None:
    b, _ = _peer(CERT_B, 1000.0)
    with pytest.raises(sdp.SdpError, match="line"):
        await b.accept_offer("v=0\r\nthis is not sdp\r\n")
    await b.close()


async def _closed(peer: AiortcPeer) -> None:
    while peer.pc.connectionState != "closed":
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("agent_offers", "agent_hangs_up"), [(True, False), (False, True), (True, True)]
)
async def test_agent_and_aiortc_hear_each_other(agent_offers: bool, agent_hangs_up: bool) -> None:
    agent, heard_by_agent = _peer(CERT_A, 440.0)
    other = AiortcPeer(1000.0)
    try:
        if agent_offers:
            answer = await other.answer(await agent.create_offer(trickle=False))
            await agent.accept_answer(answer)
        else:
            answer = await agent.accept_offer(await other.offer(), trickle=False)
            await other.accept(answer)
        session = await asyncio.wait_for(agent.connect(), 20)
        await asyncio.wait_for(other.first_audio, 10)
        await asyncio.wait_for(session.first_audio(), 10)
        await asyncio.sleep(2.0)
        stats = session.stats
        assert stats.rtt_ms is not None  # aiortc's receiver reports were parsed
        assert stats.malformed == 0 and stats.unknown_payload_type == 0
        if agent_hangs_up:
            assert await agent.close() is EndReason.LOCAL_HANGUP
            await asyncio.wait_for(_closed(other), 5)  # our close_notify reached aiortc
        else:
            await other.close()  # aiortc hangs up: BYE and close_notify
            assert await asyncio.wait_for(agent.ended(), 5) is EndReason.REMOTE_BYE
    finally:
        await agent.close()
        await other.close()
    assert peak_hz(heard_by_agent.samples()[-SAMPLE_RATE // 2 :]) == pytest.approx(1000, abs=5)
    assert peak_hz(other.samples()[-SAMPLE_RATE // 2 :]) == pytest.approx(440, abs=5)


async def test_a_listen_only_call_sends_nothing_the_other_way() -> None:
    listener, heard_by_listener = _peer(
        CERT_A, 440.0, replace(CONFIG, direction=sdp.Direction.RECVONLY)
    )
    talker, heard_by_talker = _peer(CERT_B, 1000.0)
    async with _connected(listener, talker, trickle=True):
        assert talker.negotiated is not None
        assert talker.negotiated.direction is sdp.Direction.SENDONLY
        assert listener.session is not None and talker.session is not None
        await asyncio.wait_for(listener.session.first_audio(), 5)
        await asyncio.sleep(1.0)
        assert listener.session.stats.packets_sent == 0
        assert talker.session.stats.packets_received == 0
        assert talker.session.running  # RTCP alone keeps the call alive
    assert peak_hz(heard_by_listener.samples()[-SAMPLE_RATE // 2 :]) == pytest.approx(1000, abs=5)
    assert not heard_by_talker.samples().any()
