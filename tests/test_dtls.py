"""DTLS-SRTP keying between real peers on loopback UDP, each behind a Demux."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
import random
import stat
import time
import typing
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiortc.rtcdtlstransport import (
    RTCCertificate,
    RTCDtlsFingerprint,
    RTCDtlsParameters,
    RTCDtlsTransport,
)
from aiortc.rtcicetransport import RTCIceTransport
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given
from hypothesis import strategies as st

from agent.media.dtls import (
    CERT_FILE,
    KEY_FILE,
    DtlsCertificate,
    DtlsEnd,
    DtlsError,
    DtlsFingerprintError,
    DtlsKeying,
    DtlsRole,
    DtlsTimeout,
    DtlsTimers,
    _datagrams,
    _whole_records,
)
from agent.media.rtp import RtpPacket
from agent.media.sdp import Fingerprint
from agent.media.srtp import KeyPair, SrtpContext, SrtpProfile
from agent.net.demux import Demux
from agent.net.transport import DatagramReceiver, DatagramTransport, PushTransport, UdpTransport

GCM = SrtpProfile.AEAD_AES_128_GCM
CM = SrtpProfile.AES_CM_128_HMAC_SHA1_80
BOTH = (GCM, CM)
# Retransmit quickly so that loss costs milliseconds; give up late so a slow machine
# never turns a good handshake into a timeout.
FAST = DtlsTimers(retransmit_s=0.02, retransmit_max_s=0.2, handshake_timeout_s=20.0)

CLIENT_CERT = DtlsCertificate.generate("client-device")
SERVER_CERT = DtlsCertificate.generate("server-device")


# -- transport-boundary fakes ------------------------------------------------------------


def _flight(data: bytes) -> str:
    """Which DTLS 1.2 flight a datagram starts: told by its first record and message."""
    if len(data) < 14:
        return "?"
    if data[0] == 20:
        return "server_final"  # ChangeCipherSpec first: the server's last flight
    if data[0] == 22 and data[3:5] == b"\x00\x00":
        return {1: "client_hello", 2: "server_flight", 11: "client_flight"}.get(data[13], "?")
    return "?"


class Lossy:
    """Wraps a channel and drops some datagrams it sends: ``drop(datagram)`` decides."""

    def __init__(self, inner: DatagramTransport, drop: Callable[[bytes], bool]) -> None:
        self._inner = inner
        self._drop = drop
        self.dropped = 0

    async def send(self, data: bytes) -> None:
        if self._drop(data):
            self.dropped += 1
            return
        await self._inner.send(data)

    async def recv(self) -> bytes:
        return await self._inner.recv()

    async def close(self) -> None:
        await self._inner.close()


def drop_first(flight: str, count: int) -> Callable[[bytes], bool]:
    """Drop the first ``count`` copies of one flight (the original, then retransmissions)."""
    seen = 0

    def drop(data: bytes) -> bool:
        nonlocal seen
        if _flight(data) != flight or seen >= count:
            return False
        seen += 1
        return True

    return drop


def drop_randomly(seed: int, loss: float) -> Callable[[bytes], bool]:
    rng = random.Random(seed)
    return lambda _data: rng.random() < loss


class Injecting:
    """Wraps a transport and slips extra datagrams in before each one it receives."""

    def __init__(self, inner: PushTransport, extra: Callable[[bytes], list[bytes]]) -> None:
        self._inner = inner
        self._extra = extra
        self._pending: list[bytes] = []

    async def send(self, data: bytes) -> None:
        await self._inner.send(data)

    async def recv(self) -> bytes:
        if not self._pending:
            data = await self._inner.recv()
            self._pending = [*self._extra(data), data]
        return self._pending.pop(0)

    def attach(self, receiver: DatagramReceiver) -> None:
        self._inner.attach(_Slipping(receiver, self._extra))

    def detach(self) -> None:
        self._inner.detach()

    async def close(self) -> None:
        await self._inner.close()


class _Slipping:
    """The receiver side of ``Injecting``."""

    def __init__(self, receiver: DatagramReceiver, extra: Callable[[bytes], list[bytes]]) -> None:
        self._receiver = receiver
        self._extra = extra

    def datagram_received(self, data: bytes) -> None:
        for datagram in [*self._extra(data), data]:
            self._receiver.datagram_received(datagram)

    def transport_closed(self, reason: str) -> None:
        self._receiver.transport_closed(reason)


# -- two ends ------------------------------------------------------------------------------


@dataclass
class End:
    udp: UdpTransport
    demux: Demux
    keying: DtlsKeying


@dataclass
class Setup:
    """How to build one end; the defaults make a working pair."""

    role: DtlsRole
    cert: DtlsCertificate
    profiles: Sequence[SrtpProfile] = BOTH
    expect: Sequence[Fingerprint] | None = None
    timers: DtlsTimers = FAST
    wrap_channel: Callable[[DatagramTransport], DatagramTransport] = lambda c: c
    wrap_transport: Callable[[UdpTransport], PushTransport] = lambda t: t


@asynccontextmanager
async def pair(
    client: Setup | None = None, server: Setup | None = None
) -> AsyncIterator[tuple[End, End]]:
    client = client or Setup(DtlsRole.CLIENT, CLIENT_CERT)
    server = server or Setup(DtlsRole.SERVER, SERVER_CERT)
    a, b = await UdpTransport.bind(), await UdpTransport.bind()
    a.connect(b.local_address)
    b.connect(a.local_address)
    ends: list[End] = []
    try:
        for setup, udp, other in ((client, a, server), (server, b, client)):
            demux = Demux(setup.wrap_transport(udp))
            channel = setup.wrap_channel(demux.dtls)
            expect = setup.expect if setup.expect is not None else [other.cert.fingerprint]
            keying = DtlsKeying(
                channel, setup.cert, setup.role, expect, setup.profiles, timers=setup.timers
            )
            ends.append(End(udp, demux, keying))
        yield ends[0], ends[1]
    finally:
        for end in ends:
            await end.keying.close()
            await end.demux.close()
        await a.close()
        await b.close()


async def both_keys(client: End, server: End) -> tuple[KeyPair, KeyPair]:
    async with asyncio.timeout(30):
        return await asyncio.gather(client.keying.keys(), server.keying.keys())


async def outcomes(client: End, server: End) -> tuple[KeyPair | BaseException, ...]:
    async with asyncio.timeout(30):
        return await asyncio.gather(
            client.keying.keys(), server.keying.keys(), return_exceptions=True
        )


def assert_mirrored(client: KeyPair, server: KeyPair) -> None:
    assert client.tx == server.rx
    assert client.rx == server.tx
    assert client.tx != client.rx


# -- handshake -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_profiles", "server_profiles", "chosen"),
    [
        ((GCM, CM), (GCM, CM), GCM),
        ((CM, GCM), (CM, GCM), CM),
        ((GCM,), (GCM,), GCM),
        ((CM,), (CM,), CM),
        # The server's preference decides when both lists hold both (as in OpenSSL).
        ((CM, GCM), (GCM, CM), GCM),
        ((GCM, CM), (CM, GCM), CM),
        # One side accepts one profile only: that one.
        ((GCM, CM), (CM,), CM),
        ((CM,), (GCM, CM), CM),
        ((GCM,), (CM, GCM), GCM),
    ],
)
async def test_handshake_yields_mirrored_keys(
    client_profiles: tuple[SrtpProfile, ...],
    server_profiles: tuple[SrtpProfile, ...],
    chosen: SrtpProfile,
) -> None:
    async with pair(
        Setup(DtlsRole.CLIENT, CLIENT_CERT, client_profiles),
        Setup(DtlsRole.SERVER, SERVER_CERT, server_profiles),
    ) as (client, server):
        client_keys, server_keys = await both_keys(client, server)
        assert_mirrored(client_keys, server_keys)
        assert client_keys.tx.profile is chosen
        assert server_keys.tx.profile is chosen
        # keys() again: the same result, no second handshake.
        assert await client.keying.keys() == client_keys
        assert client.keying.stats.handshake_s is not None
        assert client.keying.stats.malformed == 0


async def test_no_common_profile_fails_both_sides() -> None:
    async with pair(
        Setup(DtlsRole.CLIENT, CLIENT_CERT, (GCM,)),
        Setup(DtlsRole.SERVER, SERVER_CERT, (CM,)),
    ) as (client, server):
        results = await outcomes(client, server)
        for result in results:
            assert isinstance(result, DtlsError)
            assert not isinstance(result, DtlsTimeout)
            assert "no SRTP profile in common" in str(result)
        assert await client.keying.ended() is DtlsEnd.FAILED


@pytest.mark.parametrize("profile", [GCM, CM])
async def test_exported_keys_carry_srtp_both_ways_over_the_media_channel(
    profile: SrtpProfile,
) -> None:
    async with pair(
        Setup(DtlsRole.CLIENT, CLIENT_CERT, (profile,)),
        Setup(DtlsRole.SERVER, SERVER_CERT, (profile,)),
    ) as (client, server):
        client_keys, server_keys = await both_keys(client, server)
        contexts = SrtpContext(client_keys), SrtpContext(server_keys)
        for (src, dst), (tx, rx) in zip(
            ((client, server), (server, client)), (contexts, contexts[::-1]), strict=True
        ):
            for seq in range(3):
                rtp = RtpPacket(111, seq, seq * 960, 0x1234, b"opus frame %d" % seq).to_bytes()
                await src.demux.media.send(tx.protect(rtp))
                async with asyncio.timeout(5):
                    assert rx.unprotect(await dst.demux.media.recv()) == rtp
            rtcp = bytes([0x80, 201, 0, 1]) + (0x1234).to_bytes(4, "big")
            await src.demux.media.send(tx.protect_rtcp(rtcp))
            async with asyncio.timeout(5):
                assert rx.unprotect_rtcp(await dst.demux.media.recv()) == rtcp


@pytest.mark.parametrize("checking_side", ["client", "server"])
async def test_wrong_fingerprint_fails_the_call(checking_side: str) -> None:
    wrong = [DtlsCertificate.generate("impostor").fingerprint]
    client = Setup(DtlsRole.CLIENT, CLIENT_CERT)
    server = Setup(DtlsRole.SERVER, SERVER_CERT)
    checker = client if checking_side == "client" else server
    checker.expect = wrong
    async with pair(client, server) as ends:
        results = await outcomes(*ends)
    checked = results[0] if checking_side == "client" else results[1]
    other = results[1] if checking_side == "client" else results[0]
    assert isinstance(checked, DtlsFingerprintError)
    assert "matches no fingerprint" in str(checked)
    # The other side hears our alert and fails too, without keys.
    assert isinstance(other, DtlsError)
    assert not isinstance(other, DtlsTimeout)


async def test_any_matching_fingerprint_among_several_is_enough() -> None:
    expect = [
        DtlsCertificate.generate("other").fingerprint,
        SERVER_CERT.fingerprint_with("sha-512"),
        Fingerprint("sha-1", "00:11"),  # too weak: ignored
    ]
    async with pair(Setup(DtlsRole.CLIENT, CLIENT_CERT, expect=expect)) as (client, server):
        assert_mirrored(*await both_keys(client, server))


def test_fingerprints_must_be_usable() -> None:
    with pytest.raises(ValueError, match="no usable remote fingerprint"):
        DtlsKeying(_NeverTransport(), CLIENT_CERT, DtlsRole.CLIENT, [Fingerprint("md5", "00")])
    with pytest.raises(ValueError, match="profiles"):
        DtlsKeying(_NeverTransport(), CLIENT_CERT, DtlsRole.CLIENT, [SERVER_CERT.fingerprint], ())
    with pytest.raises(ValueError, match="mtu"):
        DtlsKeying(
            _NeverTransport(), CLIENT_CERT, DtlsRole.CLIENT, [SERVER_CERT.fingerprint], mtu=100
        )
    with pytest.raises(ValueError, match="retransmit"):
        DtlsTimers(retransmit_s=2.0, retransmit_max_s=1.0)
    with pytest.raises(ValueError, match="handshake_timeout_s"):
        DtlsTimers(handshake_timeout_s=0)


class _NeverTransport:
    """A channel nobody answers on."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send(self, data: bytes) -> None:
        self.sent.append(data)

    async def recv(self) -> bytes:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("role", [DtlsRole.CLIENT, DtlsRole.SERVER])
async def test_no_peer_times_out_within_the_configured_timeout(role: DtlsRole) -> None:
    channel = _NeverTransport()
    timers = DtlsTimers(retransmit_s=0.02, retransmit_max_s=0.08, handshake_timeout_s=0.4)
    keying = DtlsKeying(channel, CLIENT_CERT, role, [SERVER_CERT.fingerprint], timers=timers)
    started = time.monotonic()
    try:
        with pytest.raises(DtlsTimeout, match=r"timed out after 0\.4 s"):
            async with asyncio.timeout(20):
                await keying.keys()
        assert time.monotonic() - started >= 0.4
        assert await keying.ended() is DtlsEnd.FAILED
        if role is DtlsRole.CLIENT:
            # The ClientHello went out again on our timer, backing off to the cap.
            assert keying.stats.retransmissions >= 3
            assert len(set(channel.sent)) == 1
        else:
            assert channel.sent == []
    finally:
        await keying.close()


# -- loss and garbage ----------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize(
    "flight", ["client_hello", "server_flight", "client_flight", "server_final"]
)
async def test_a_lost_flight_is_retransmitted(flight: str, count: int) -> None:
    sender = "server" if flight.startswith("server") else "client"
    lossy: list[Lossy] = []

    def wrap(channel: DatagramTransport) -> DatagramTransport:
        lossy.append(Lossy(channel, drop_first(flight, count)))
        return lossy[-1]

    client = Setup(DtlsRole.CLIENT, CLIENT_CERT)
    server = Setup(DtlsRole.SERVER, SERVER_CERT)
    (client if sender == "client" else server).wrap_channel = wrap
    async with pair(client, server) as (c, s):
        assert_mirrored(*await both_keys(c, s))
        assert lossy[0].dropped == count
        total = c.keying.stats.retransmissions + s.keying.stats.retransmissions
        assert total >= 1
        if flight == "server_final":
            # Only the client's timer runs now; the server answers its repeated flight.
            assert s.keying.stats.final_flight_resends >= 1


async def test_openssl_timer_recovers_a_lost_final_flight_with_fresh_records() -> None:
    """What a browser peer relies on: with our timer slower than OpenSSL's 1 s one, the
    client's OpenSSL retransmits with new record numbers and the server's OpenSSL answers
    by itself."""
    lossy: list[Lossy] = []

    def wrap(channel: DatagramTransport) -> DatagramTransport:
        lossy.append(Lossy(channel, drop_first("server_final", 1)))
        return lossy[-1]

    slow = DtlsTimers(retransmit_s=30.0, retransmit_max_s=60.0, handshake_timeout_s=20.0)
    async with pair(
        Setup(DtlsRole.CLIENT, CLIENT_CERT, timers=slow),
        Setup(DtlsRole.SERVER, SERVER_CERT, timers=slow, wrap_channel=wrap),
    ) as (client, server):
        assert_mirrored(*await both_keys(client, server))
        assert lossy[0].dropped == 1
        assert client.keying.stats.retransmissions >= 1
        # The server's OpenSSL resent its final flight; our byte-for-byte resend was not needed.
        assert server.keying.stats.final_flight_resends == 0
        assert server.keying.stats.sent >= 3


@pytest.mark.parametrize("seed", range(8))
async def test_handshake_survives_heavy_random_loss_both_ways(seed: int) -> None:
    lossy: list[Lossy] = []

    def wrap(offset: int) -> Callable[[DatagramTransport], DatagramTransport]:
        def inner(channel: DatagramTransport) -> DatagramTransport:
            lossy.append(Lossy(channel, drop_randomly(seed * 2 + offset, 0.4)))
            return lossy[-1]

        return inner

    async with pair(
        Setup(DtlsRole.CLIENT, CLIENT_CERT, wrap_channel=wrap(0)),
        Setup(DtlsRole.SERVER, SERVER_CERT, wrap_channel=wrap(1)),
    ) as (client, server):
        assert_mirrored(*await both_keys(client, server))


def _garbage(rng: random.Random) -> Callable[[bytes], list[bytes]]:
    """Junk of every kind slipped in before each real datagram."""

    def extra(real: bytes) -> list[bytes]:
        junk = [
            b"",
            bytes([rng.randrange(64, 128)]) + rng.randbytes(20),  # nobody's
            b"\x00\x01\x00\x00" + rng.randbytes(16),  # STUN
            bytes([rng.randrange(20, 64)]) + rng.randbytes(rng.randrange(0, 40)),  # "DTLS"
            b"\x17\xfe\xfd\x00\x01" + rng.randbytes(6) + b"\x00\x20" + rng.randbytes(32),
            b"\x16\xfe\xfd\x00\x00",  # a header cut short
        ]
        if real[:1] and 20 <= real[0] <= 63 and len(real) > 20:
            junk.append(real[: rng.randrange(1, len(real))])  # a truncated copy
        return junk

    return extra


async def test_garbage_is_counted_and_the_handshake_completes() -> None:
    rng = random.Random(7)
    async with pair(
        Setup(DtlsRole.CLIENT, CLIENT_CERT, wrap_transport=lambda t: Injecting(t, _garbage(rng))),
        Setup(DtlsRole.SERVER, SERVER_CERT, wrap_transport=lambda t: Injecting(t, _garbage(rng))),
    ) as (client, server):
        assert_mirrored(*await both_keys(client, server))
        for end in (client, server):
            assert end.demux.stats.unexpected_stun >= 1
            assert end.demux.stats.dropped_unknown >= 2
            assert end.keying.stats.malformed >= 2
        # Junk after the handshake does not end the association either.
        await client.keying.close()
        async with asyncio.timeout(10):
            assert await server.keying.ended() is DtlsEnd.PEER_CLOSED


@pytest.mark.parametrize("seed", range(12))
async def test_mutated_records_complete_or_fail_cleanly(seed: int) -> None:
    rng = random.Random(seed)

    def mutate(real: bytes) -> list[bytes]:
        if not (real[:1] and 20 <= real[0] <= 63) or rng.random() < 0.5:
            return []
        copy = bytearray(real)
        for _ in range(rng.randrange(1, 4)):
            copy[rng.randrange(len(copy))] ^= 1 << rng.randrange(8)
        return [bytes(copy)]

    timers = DtlsTimers(retransmit_s=0.02, retransmit_max_s=0.2, handshake_timeout_s=4.0)
    async with pair(
        Setup(DtlsRole.CLIENT, CLIENT_CERT, timers=timers),
        Setup(
            DtlsRole.SERVER,
            SERVER_CERT,
            timers=timers,
            wrap_transport=lambda t: Injecting(t, mutate),
        ),
    ) as (client, server):
        results = await outcomes(client, server)
        for result in results:
            assert isinstance(result, (KeyPair, DtlsError)), result
        client_keys, server_keys = results
        if isinstance(client_keys, KeyPair) and isinstance(server_keys, KeyPair):
            assert_mirrored(client_keys, server_keys)


# -- after the handshake ---------------------------------------------------------------


async def test_close_notify_ends_the_peer() -> None:
    async with pair() as (client, server):
        await both_keys(client, server)
        closed_before = server.keying.closed_by_peer
        await client.keying.close()
        async with asyncio.timeout(10):
            assert await server.keying.ended() is DtlsEnd.PEER_CLOSED
            assert await client.keying.ended() is DtlsEnd.LOCAL_CLOSE
        assert (closed_before, server.keying.closed_by_peer) == (False, True)
        assert not client.keying.closed_by_peer
        await client.keying.close()  # again: nothing happens


async def test_server_close_notify_ends_the_client() -> None:
    async with pair() as (client, server):
        await both_keys(client, server)
        await server.keying.close()
        async with asyncio.timeout(10):
            assert await client.keying.ended() is DtlsEnd.PEER_CLOSED
        assert client.keying.closed_by_peer


async def test_transport_close_ends_the_association() -> None:
    async with pair() as (client, server):
        await both_keys(client, server)
        await server.udp.close()
        async with asyncio.timeout(10):
            assert await server.keying.ended() is DtlsEnd.TRANSPORT_CLOSED


@pytest.mark.parametrize("role", [DtlsRole.CLIENT, DtlsRole.SERVER])
async def test_a_transport_closed_during_the_handshake_fails_it(role: DtlsRole) -> None:
    udp = await UdpTransport.bind()
    udp.connect(("127.0.0.1", 9))
    demux = Demux(udp)
    keying = DtlsKeying(demux.dtls, CLIENT_CERT, role, [SERVER_CERT.fingerprint], timers=FAST)
    try:
        keying.start()
        await asyncio.sleep(0.01)
        await udp.close()
        with pytest.raises(DtlsError) as caught:
            async with asyncio.timeout(10):
                await keying.keys()
        assert not isinstance(caught.value, DtlsTimeout)
        assert await keying.ended() is DtlsEnd.FAILED
    finally:
        await keying.close()
        await demux.close()


async def test_close_during_the_handshake_fails_keys() -> None:
    keying = DtlsKeying(_NeverTransport(), CLIENT_CERT, DtlsRole.SERVER, [CLIENT_CERT.fingerprint])
    waiter = asyncio.create_task(keying.keys())
    await asyncio.sleep(0.01)
    await keying.close()
    with pytest.raises(DtlsError, match="closed before the handshake"):
        await asyncio.wait_for(waiter, 5)
    assert await keying.ended() is DtlsEnd.LOCAL_CLOSE
    with pytest.raises(DtlsError):
        keying.start()


# -- interop ---------------------------------------------------------------------------------


class _AiortcIce:
    """What aiortc's RTCDtlsTransport uses of its RTCIceTransport, over plain UDP."""

    def __init__(self, udp: UdpTransport, role: str) -> None:
        self._udp = udp
        self.role = role

    async def _send(self, data: bytes) -> None:
        await self._udp.send(data)

    async def _recv(self) -> bytes:
        return await self._udp.recv()


@pytest.mark.parametrize("our_role", [DtlsRole.CLIENT, DtlsRole.SERVER])
async def test_interop_with_aiortc(our_role: DtlsRole) -> None:
    ours_udp, theirs_udp = await UdpTransport.bind(), await UdpTransport.bind()
    ours_udp.connect(theirs_udp.local_address)
    theirs_udp.connect(ours_udp.local_address)
    ice = typing.cast(RTCIceTransport, _AiortcIce(theirs_udp, "controlled"))
    theirs = RTCDtlsTransport(ice, [RTCCertificate.generateCertificate()])
    their_fingerprints = [
        Fingerprint(f.algorithm, f.value) for f in theirs.getLocalParameters().fingerprints
    ]
    demux = Demux(ours_udp)
    ours = DtlsKeying(demux.dtls, CLIENT_CERT, our_role, their_fingerprints, timers=FAST)
    theirs._set_role("server" if our_role is DtlsRole.CLIENT else "client")
    mine = CLIENT_CERT.fingerprint
    try:
        async with asyncio.timeout(30):
            keys, _ = await asyncio.gather(
                ours.keys(),
                theirs.start(
                    RTCDtlsParameters(fingerprints=[RTCDtlsFingerprint(mine.algorithm, mine.value)])
                ),
            )
        assert theirs.state == "connected"
        assert keys.tx.profile is GCM  # aiortc prefers AES-256-GCM, which we do not offer
        srtp = SrtpContext(keys)
        rtp = RtpPacket(111, 1, 960, 0xABCD, b"hello aiortc").to_bytes()
        assert bytes(theirs._rx_srtp.unprotect(srtp.protect(rtp))) == rtp
        reply = RtpPacket(111, 7, 960, 0xDCBA, b"hello edge").to_bytes()
        assert srtp.unprotect(bytes(theirs._tx_srtp.protect(reply))) == reply
        await theirs._send_data(b"data channel bytes we do not run")
        async with asyncio.timeout(10):
            while ours.stats.app_data_dropped == 0:
                await asyncio.sleep(0.005)
        await theirs.stop()
        async with asyncio.timeout(10):
            assert await ours.ended() is DtlsEnd.PEER_CLOSED
    finally:
        await theirs.stop()
        await ours.close()
        await demux.close()
        await ours_udp.close()
        await theirs_udp.close()


# -- pure helpers ----------------------------------------------------------------------------


_RECORD = 13  # DTLS 1.2 record header


def _record(content_type: int, body: bytes, epoch: int = 0) -> bytes:
    return (
        bytes([content_type, 0xFE, 0xFD])
        + epoch.to_bytes(2, "big")
        + b"\x00" * 6
        + len(body).to_bytes(2, "big")
        + body
    )


@given(st.lists(st.binary(max_size=400), min_size=1, max_size=12), st.integers(256, 1500))
def test_records_pack_into_datagrams_without_splitting_any(bodies: list[bytes], mtu: int) -> None:
    records = [_record(22, body) for body in bodies]
    datagrams = _datagrams(b"".join(records), mtu)
    assert b"".join(datagrams) == b"".join(records)
    for datagram in datagrams:
        assert _whole_records(datagram) == len(datagram)
        first = _RECORD + int.from_bytes(datagram[11:13], "big")
        assert len(datagram) <= mtu or first == len(datagram)  # an oversized record goes alone
    for this, following in itertools.pairwise(datagrams):  # packed greedily
        assert len(this) + _RECORD + int.from_bytes(following[11:13], "big") > mtu


@given(st.binary(max_size=300))
def test_whole_records_is_a_prefix_of_whole_records(data: bytes) -> None:
    whole = _whole_records(data)
    assert 0 <= whole <= len(data)
    assert _whole_records(data[:whole]) == whole


def test_whole_records_cuts_at_the_first_bad_record() -> None:
    good = _record(22, b"x" * 10) + _record(20, b"\x01")
    assert _whole_records(good) == len(good)
    assert _whole_records(good + b"\x16\xfe\xfd") == len(good)
    assert _whole_records(good + _record(24, b"hb")) == len(good)  # not a DTLS 1.2 type
    assert _whole_records(good + b"\x16\x03\x03" + good[3:]) == len(good)  # TLS version
    assert _whole_records(good[:-1]) == len(good) - 14


# -- certificates ----------------------------------------------------------------------------


def test_certificate_fingerprint_is_sha256_of_der_in_colon_hex() -> None:
    fp = CLIENT_CERT.fingerprint
    assert isinstance(fp, Fingerprint)
    assert fp.algorithm == "sha-256"
    parts = fp.value.split(":")
    assert len(parts) == 32
    assert all(len(p) == 2 and p == p.upper() for p in parts)
    int(fp.value.replace(":", ""), 16)
    assert CLIENT_CERT.common_name == "client-device"
    assert "client-device" in repr(CLIENT_CERT)


def test_certificate_is_created_then_reused(tmp_path: Path) -> None:
    store = tmp_path / "dtls"
    first = DtlsCertificate.load_or_create(store, "door-1")
    assert stat.S_IMODE((store / KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    assert b"PRIVATE KEY" in (store / KEY_FILE).read_bytes()
    assert b"CERTIFICATE" in (store / CERT_FILE).read_bytes()
    assert [p.name for p in store.iterdir() if p.name.startswith(".")] == []
    again = DtlsCertificate.load_or_create(store, "door-1")
    assert again.fingerprint == first.fingerprint
    now = datetime.datetime.now(datetime.UTC)
    assert first.not_valid_after - now > datetime.timedelta(days=360)


def test_loose_key_permissions_are_tightened(tmp_path: Path) -> None:
    first = DtlsCertificate.load_or_create(tmp_path, "door-1")
    (tmp_path / KEY_FILE).chmod(0o644)
    assert DtlsCertificate.load_or_create(tmp_path, "door-1").fingerprint == first.fingerprint
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / KEY_FILE).write_bytes(b"not a key"),
        lambda d: (d / CERT_FILE).write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n"),
        lambda d: (d / CERT_FILE).unlink(),
        lambda d: (d / CERT_FILE).write_bytes(
            DtlsCertificate.generate("door-1")._cert.public_bytes(Encoding.PEM)  # another key's
        ),
    ],
    ids=["corrupt-key", "corrupt-cert", "missing-cert", "mismatched-pair"],
)
def test_unusable_files_are_replaced(
    tmp_path: Path, damage: Callable[[Path], object], caplog: pytest.LogCaptureFixture
) -> None:
    first = DtlsCertificate.load_or_create(tmp_path, "door-1")
    damage(tmp_path)
    with caplog.at_level(logging.WARNING, logger="agent.media.dtls"):
        second = DtlsCertificate.load_or_create(tmp_path, "door-1")
    assert second.fingerprint != first.fingerprint
    assert "dtls certificate generated" in caplog.text
    assert DtlsCertificate.load_or_create(tmp_path, "door-1").fingerprint == second.fingerprint
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600


def test_expiring_or_foreign_certificates_are_replaced(tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    first = DtlsCertificate.load_or_create(tmp_path, "door-1", now=now)
    later = now + datetime.timedelta(days=300)
    kept = DtlsCertificate.load_or_create(tmp_path, "door-1", now=later)
    assert kept.fingerprint == first.fingerprint
    near_expiry = now + datetime.timedelta(days=340)
    renewed = DtlsCertificate.load_or_create(tmp_path, "door-1", now=near_expiry)
    assert renewed.fingerprint != first.fingerprint
    assert renewed.not_valid_after > near_expiry + datetime.timedelta(days=360)
    other_device = DtlsCertificate.load_or_create(tmp_path, "door-2", now=near_expiry)
    assert other_device.fingerprint != renewed.fingerprint
    assert other_device.common_name == "door-2"
