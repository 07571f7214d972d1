"""ICE on real loopback sockets and a real coturn: host pairs, relays, failures, consent."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Literal

import aioice
import pytest
from mqtt_env import until

from agent.net.candidate import Candidate, CandidateType
from agent.net.ice import (
    IceConfig,
    IceError,
    IceServer,
    IceTimers,
    IceTransport,
    TurnServer,
    _from_aioice,
    _to_aioice,
    mint_turn_credentials,
)
from agent.net.transport import TransportClosed
from tools.lab.turn import Coturn, CoturnError

LOOPBACK = IceConfig(host_addresses=("127.0.0.1",))
FAST = IceTimers(gather_timeout=2.0, connect_timeout=2.0, consent_interval=0.2, consent_timeout=1.5)
WAIT = 20.0  # outer bound for anything that should happen "soon"; never a measurement


@pytest.fixture(scope="module")
def coturn() -> Iterator[Coturn]:
    with Coturn.running() as server:
        yield server


@pytest.fixture
def silent_udp() -> Iterator[socket.socket]:
    """A bound UDP socket that never answers (kept bound: no port-reuse races)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s


def _host_candidate(sock: socket.socket) -> Candidate:
    host, port = sock.getsockname()
    return Candidate("x1", 1, "udp", 2130706431, host, port, CandidateType.HOST)


async def _exchange(a: IceTransport, b: IceTransport, *, end: bool = True) -> None:
    """Gather both sides and give each the other's parameters and candidates."""
    a_candidates = [c async for c in a.gather()]
    b_candidates = [c async for c in b.gather()]
    a.set_remote_parameters(b.local_parameters.ufrag, b.local_parameters.pwd)
    b.set_remote_parameters(a.local_parameters.ufrag, a.local_parameters.pwd)
    for c in b_candidates:
        await a.add_remote_candidate(c)
    for c in a_candidates:
        await b.add_remote_candidate(c)
    if end:
        await a.add_remote_candidate(None)
        await b.add_remote_candidate(None)


async def _connected(
    config_a: IceConfig, config_b: IceConfig | None = None
) -> tuple[IceTransport, IceTransport]:
    a = IceTransport(config_a, controlling=True, name="a")
    b = IceTransport(config_b or config_a, controlling=False, name="b")
    await _exchange(a, b)
    async with asyncio.timeout(WAIT):
        await asyncio.gather(a.connect(), b.connect())
    return a, b


async def _ping_pong(a: IceTransport, b: IceTransport, tag: bytes = b"") -> None:
    async with asyncio.timeout(WAIT):
        await a.send(b"ping" + tag)
        assert await b.recv() == b"ping" + tag
        await b.send(b"pong" + tag)
        assert await a.recv() == b"pong" + tag


async def _until(condition: Callable[[], object], what: str) -> None:
    await until(condition, what, wait=WAIT, interval=0.02)


# --- host candidates ------------------------------------------------------------------


async def test_host_candidates_connect_and_carry_datagrams_both_ways() -> None:
    a, b = await _connected(LOOPBACK)
    assert a.local_parameters.ice_lite is False
    assert (a.role, b.role) == ("controlling", "controlled")
    for i in range(20):
        await _ping_pong(a, b, bytes([65 + i]))
    pair = a.selected_pair
    assert pair is not None and (pair.local.type, pair.remote.type) == ("host", "host")
    assert not pair.relayed
    assert a.stats.packets_sent == 20 and a.stats.bytes_received == 20 * 5
    assert a.stats.local_type == "host" and a.stats.checks >= 1
    await a.close()
    await b.close()


async def test_candidates_trickled_while_connecting() -> None:
    a = IceTransport(LOOPBACK, controlling=True)
    b = IceTransport(LOOPBACK, controlling=False)
    a.set_remote_parameters(b.local_parameters.ufrag, b.local_parameters.pwd)
    b.set_remote_parameters(a.local_parameters.ufrag, a.local_parameters.pwd)
    connecting = asyncio.gather(a.connect(), b.connect())  # gathers by itself
    async with asyncio.timeout(WAIT):
        await _until(lambda: a.local_candidates and b.local_candidates, "gathered")
        for c in b.local_candidates:
            await a.add_remote_candidate(c)
        for c in a.local_candidates:
            await b.add_remote_candidate(c)
        await connecting
    await _ping_pong(a, b)
    await a.close()
    await b.close()


async def _stun_from(peer: socket.socket) -> tuple[aioice.stun.Message, tuple[str, int]]:
    data, addr = await asyncio.get_running_loop().sock_recvfrom(peer, 2048)
    return aioice.stun.parse_message(data), addr


async def test_a_check_from_the_peer_sends_our_unanswered_check_again_at_once() -> None:
    # The peer is a bare socket speaking STUN by hand. Our first check gets no answer (as
    # if the peer's NAT or TURN permission had not been open yet); the peer's own check
    # then shows the way is open, and ours must go again now, not after aioice's 500 ms.
    a = IceTransport(LOOPBACK, controlling=True, name="a")
    _ = [c async for c in a.gather()]
    ufrag, pwd = "peer", "p" * 22
    a.set_remote_parameters(ufrag, pwd)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", 0))
        peer.setblocking(False)
        await a.add_remote_candidate(_host_candidate(peer))
        await a.add_remote_candidate(None)
        connecting = asyncio.create_task(a.connect())
        async with asyncio.timeout(WAIT):
            ours, addr = await _stun_from(peer)  # left unanswered: "lost"
            assert "USE-CANDIDATE" in ours.attributes
            theirs = aioice.stun.Message(aioice.stun.Method.BINDING, aioice.stun.Class.REQUEST)
            theirs.attributes["USERNAME"] = f"{a.local_parameters.ufrag}:{ufrag}"
            theirs.attributes["PRIORITY"] = 2130706431
            theirs.attributes["ICE-CONTROLLED"] = 1
            theirs.add_message_integrity(a.local_parameters.pwd.encode())
            theirs.add_fingerprint()
            peer.sendto(bytes(theirs), addr)
            seen: dict[bytes, aioice.stun.Message] = {}
            while ours.transaction_id not in seen or theirs.transaction_id not in seen:
                message, _ = await _stun_from(peer)
                seen[message.transaction_id] = message
            assert seen[theirs.transaction_id].message_class == aioice.stun.Class.RESPONSE
            assert seen[ours.transaction_id].message_class == aioice.stun.Class.REQUEST
            assert a.stats.checks_resent == 1
            answer = aioice.stun.Message(
                aioice.stun.Method.BINDING, aioice.stun.Class.RESPONSE, ours.transaction_id
            )
            answer.attributes["XOR-MAPPED-ADDRESS"] = addr
            answer.add_message_integrity(pwd.encode())
            answer.add_fingerprint()
            peer.sendto(bytes(answer), addr)
            await connecting
        assert a.selected_pair is not None and a.selected_pair.remote.port == peer.getsockname()[1]
    await a.close()


async def test_slow_reader_loses_oldest_datagrams() -> None:
    a, b = await _connected(LOOPBACK, replace(LOOPBACK, queue_size=4))
    for i in range(10):
        await a.send(b"x" + bytes([i]))
    await _until(lambda: b.stats.packets_received == 10, "all received")
    assert [await b.recv() for _ in range(4)] == [b"x" + bytes([i]) for i in range(6, 10)]
    assert b.stats.dropped_overflow == 6
    await a.close()
    await b.close()


async def test_send_before_connect_is_refused() -> None:
    a = IceTransport(LOOPBACK, controlling=True)
    with pytest.raises(TransportClosed, match="not connected"):
        await a.send(b"early")
    await a.close()


# --- TURN -----------------------------------------------------------------------------


@pytest.mark.parametrize(("transport_a", "transport_b"), [("udp", "udp"), ("tcp", "tcp")])
async def test_relay_only_call_goes_through_coturn(
    coturn: Coturn, transport_a: Literal["udp", "tcp"], transport_b: Literal["udp", "tcp"]
) -> None:
    # a gets credentials minted by "the relay"; b mints its own from the shared secret.
    config_a = IceConfig(turn_servers=(coturn.turn_server(transport_a),), policy="relay")
    config_b = IceConfig(
        turn_servers=(coturn.turn_server(transport_b, shared_secret=True),), policy="relay"
    )
    a, b = await _connected(config_a, config_b)
    assert all(c.type == "relay" for c in a.local_candidates + b.local_candidates)
    for side in (a, b):
        pair = side.selected_pair
        assert pair is not None and pair.local.type == "relay" and pair.relayed
    await _ping_pong(a, b)
    assert a.stats.local_type == "relay"
    await a.close()
    await b.close()


async def test_relay_only_side_relays_even_when_the_peer_offers_host_candidates(
    coturn: Coturn,
) -> None:
    relay_only = IceConfig(turn_servers=(coturn.turn_server(),), policy="relay")
    a, b = await _connected(relay_only, LOOPBACK)
    pair = a.selected_pair
    assert pair is not None and pair.local.type == "relay"
    await _ping_pong(a, b)
    await a.close()
    await b.close()


async def test_gathering_streams_host_candidates_before_relay(coturn: Coturn) -> None:
    config = replace(
        LOOPBACK, stun_servers=(coturn.stun_server(),), turn_servers=(coturn.turn_server(),)
    )
    a = IceTransport(config, controlling=True)
    types = [c.type async for c in a.gather()]
    # On loopback the server-reflexive address equals the host one: redundant, dropped.
    assert types == ["host", "relay"]
    await a.close()


async def test_host_candidates_are_yielded_before_slow_servers_answer(
    silent_udp: socket.socket,
) -> None:
    host, port = silent_udp.getsockname()
    silent = TurnServer(host, port, username="u", password="p")
    config = replace(
        LOOPBACK, turn_servers=(silent,), timers=replace(FAST, gather_timeout=4 * WAIT)
    )
    a = IceTransport(config, controlling=True)
    candidates = a.gather()
    async with asyncio.timeout(WAIT):  # far less than the gather timeout
        first = await anext(candidates)
    assert first.type == "host" and a.local_candidates == (first,)
    await candidates.aclose()
    await a.close()  # stops the TURN allocation still waiting for an answer


async def test_wrong_turn_credentials_give_a_clear_error(coturn: Coturn) -> None:
    wrong = TurnServer(coturn.host, coturn.port, shared_secret="not-the-secret")
    a = IceTransport(IceConfig(turn_servers=(wrong,), policy="relay"), controlling=True)
    with pytest.raises(IceError, match="TURN allocation failed: 401"):
        async with asyncio.timeout(WAIT):
            _ = [c async for c in a.gather()]
    assert any("401" in f for f in a.stats.failures)
    await a.close()


async def test_expired_rest_credentials_are_refused_by_coturn(coturn: Coturn) -> None:
    creds = mint_turn_credentials(coturn.secret, "late", ttl=-60)
    turn = TurnServer(coturn.host, coturn.port, username=creds.username, password=creds.password)
    a = IceTransport(IceConfig(turn_servers=(turn,), policy="relay"), controlling=True)
    a.set_remote_parameters("abcd", "a" * 22)
    with pytest.raises(IceError, match="no local candidates: TURN allocation failed: 401"):
        async with asyncio.timeout(WAIT):
            await a.connect()  # gathers by itself
    await a.close()


async def test_silent_turn_server_fails_within_gather_timeout(silent_udp: socket.socket) -> None:
    host, port = silent_udp.getsockname()
    turn = TurnServer(host, port, username="u", password="p")
    config = IceConfig(
        turn_servers=(turn,), policy="relay", timers=replace(FAST, gather_timeout=0.5)
    )
    a = IceTransport(config, controlling=True)
    with pytest.raises(IceError, match=r"TURN allocation at .* timed out"):
        async with asyncio.timeout(WAIT):
            _ = [c async for c in a.gather()]
    await a.close()


def test_rest_credentials_match_coturns_scheme() -> None:
    # Expected password from `openssl dgst -sha1 -hmac secret -binary | base64`.
    creds = mint_turn_credentials("secret", "alice", ttl=100, now=1000)
    assert creds.username == "1100:alice"
    assert creds.password == "SI2jQwAa/xQnQEItsJiOrbPWT/A="
    assert creds.expires_at == 1100
    assert replace(creds, username="alice").expires_at is None
    with pytest.raises(ValueError, match="':'"):
        mint_turn_credentials("secret", "a:b", ttl=1)


def test_coturn_that_dies_reports_its_output() -> None:
    with (
        pytest.raises(CoturnError, match=r"(?s)exited with 3.*boom"),
        Coturn.running(argv_prefix=("sh", "-c", "echo boom; exit 3", "sh"), timeout=5),
    ):
        pass


# --- failures ---------------------------------------------------------------------------


async def test_no_remote_candidates_fails_at_end_of_candidates() -> None:
    a = IceTransport(replace(LOOPBACK, timers=FAST), controlling=True)
    a.set_remote_parameters("abcd", "a" * 22)
    await a.add_remote_candidate(None)
    with pytest.raises(IceError, match=r"no remote candidates \(end-of-candidates received\)"):
        async with asyncio.timeout(WAIT):
            await a.connect()
    await a.close()


async def test_no_remote_candidates_fails_at_the_timeout() -> None:
    a = IceTransport(replace(LOOPBACK, timers=FAST), controlling=False)
    a.set_remote_parameters("abcd", "a" * 22)
    with pytest.raises(IceError, match=r"no remote candidates \(timed out after 2 s\)"):
        async with asyncio.timeout(WAIT):
            await a.connect()
    await a.close()


async def test_unreachable_candidate_fails_within_the_timeout(silent_udp: socket.socket) -> None:
    a = IceTransport(replace(LOOPBACK, timers=FAST), controlling=True)
    a.set_remote_parameters("abcd", "a" * 22)
    await a.add_remote_candidate(_host_candidate(silent_udp))
    await a.add_remote_candidate(None)
    with pytest.raises(IceError, match=r"no candidate pair succeeded after 1 checks \(timed out"):
        async with asyncio.timeout(WAIT):
            await a.connect()
    assert a.stats.failures and a.selected_pair is None
    await a.close()


async def test_connect_needs_remote_parameters() -> None:
    a = IceTransport(LOOPBACK, controlling=True)
    with pytest.raises(IceError, match="ufrag/pwd"):
        await a.connect()
    with pytest.raises(ValueError, match="ice-pwd"):
        a.set_remote_parameters("abcd", "short")
    with pytest.raises(ValueError, match="ice-ufrag"):
        a.set_remote_parameters("a:b!", "a" * 22)
    await a.close()


# --- closing, consent, keep-alive ----------------------------------------------------------


async def test_close_ends_recv_here_and_consent_expires_at_the_far_end() -> None:
    a, b = await _connected(replace(LOOPBACK, timers=FAST))
    await _ping_pong(a, b)
    waiting = asyncio.create_task(a.recv())
    await a.close()
    with pytest.raises(TransportClosed, match="closed"):
        await asyncio.wait_for(waiting, WAIT)
    with pytest.raises(TransportClosed):
        await a.send(b"late")
    with pytest.raises(TransportClosed, match="consent expired"):
        await asyncio.wait_for(b.recv(), WAIT)
    with pytest.raises(TransportClosed, match="consent expired"):
        await b.send(b"late")
    assert b.stats.consent_failures >= 1
    await b.close()


async def test_consent_keeps_a_quiet_pair_alive() -> None:
    a, b = await _connected(replace(LOOPBACK, timers=FAST))
    # More consent checks than fit into the consent timeout, all answered.
    await _until(lambda: a.stats.consent_checks >= 10 and b.stats.consent_checks >= 10, "checks")
    assert a.stats.consent_failures == 0 and b.stats.consent_failures == 0
    await _ping_pong(a, b)
    await a.close()
    await b.close()


async def test_keepalives_go_out_on_an_idle_pair() -> None:
    timers = replace(FAST, consent_interval=30.0, consent_timeout=60.0, keepalive_interval=0.05)
    a, b = await _connected(replace(LOOPBACK, timers=timers))
    await _until(lambda: a.stats.keepalives >= 3 and b.stats.keepalives >= 3, "keep-alives")
    await _ping_pong(a, b)  # the peer ignored the indications
    assert b.stats.dropped_stun == 0
    await a.close()
    await b.close()


# --- hostile input ------------------------------------------------------------------------


def _stun(kind: int, body: bytes, length: int | None = None, tid: bytes = b"t" * 12) -> bytes:
    size = len(body) if length is None else length
    return struct.pack("!HHI12s", kind, size, 0x2112A442, tid) + body


async def test_garbage_datagrams_do_not_break_the_connection() -> None:
    a, b = await _connected(replace(LOOPBACK, timers=FAST))
    pair = b.selected_pair
    assert pair is not None
    rng = random.Random(7)
    garbage = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(50)]
    garbage += [
        b"\x00",  # too short for STUN
        _stun(0x0001, b"", length=40),  # length does not match
        _stun(0x0001, struct.pack("!HH", 0x000D, 2) + b"\x00\x01\x00\x00"),  # LIFETIME of 2 bytes
        _stun(0x0001, struct.pack("!HH", 0x0020, 4) + b"\x00\x09\x00\x00"),  # bad address family
        _stun(0x0001, b""),  # Binding request without credentials: answered 400
        _stun(0x0101, b""),  # a response nobody asked for
        _stun(0x3FFF, b""),  # unknown method
        b"\x80" + bytes(40),  # RTP-looking data from a stranger
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.bind(("127.0.0.1", 0))
        for datagram in garbage:
            stranger.sendto(datagram, pair.local.address)
        await _until(lambda: b.stats.dropped_stun + b.stats.dropped_foreign >= 5, "garbage dropped")
    await _ping_pong(a, b)  # the garbage was not delivered: the next datagram is real
    await _until(lambda: b.stats.consent_checks >= 3, "consent still answered")
    assert b.stats.dropped_foreign >= 1 and b.stats.dropped_stun >= 4
    assert b.stats.consent_failures == 0
    await _ping_pong(a, b, b"again")
    await a.close()
    await b.close()


# --- restart ----------------------------------------------------------------------------


async def test_restart_changes_credentials_and_keeps_media_flowing() -> None:
    a, b = await _connected(LOOPBACK)
    old_a, old_b = a.local_parameters, b.local_parameters
    await a.restart()
    await b.restart()
    assert a.local_parameters.ufrag != old_a.ufrag and b.local_parameters.pwd != old_b.pwd
    await _ping_pong(a, b, b"old pair")  # still on the old pair
    await _exchange(a, b)
    async with asyncio.timeout(WAIT):
        await asyncio.gather(a.connect(), b.connect())
    await _ping_pong(a, b, b"new pair")
    assert a.stats.restarts == 1 and a.stats.checks >= 2
    await a.close()
    await b.close()


async def test_failed_restart_keeps_the_old_pair(silent_udp: socket.socket) -> None:
    a, b = await _connected(replace(LOOPBACK, timers=replace(FAST, consent_timeout=30.0)))
    await a.restart()
    _ = [c async for c in a.gather()]
    a.set_remote_parameters("wxyz", "b" * 22)
    await a.add_remote_candidate(_host_candidate(silent_udp))
    await a.add_remote_candidate(None)
    with pytest.raises(IceError, match="no candidate pair succeeded"):
        await asyncio.wait_for(a.connect(), WAIT)
    await _ping_pong(a, b)
    await a.close()
    await b.close()


# --- the aioice edge and configuration ---------------------------------------------------


def test_candidates_convert_to_and_from_aioice() -> None:
    ours = Candidate(
        "r1", 1, "udp", 25108479, "203.0.113.9", 61441, CandidateType.RELAY,
        related_address="198.51.100.40", related_port=51234,
    )  # fmt: skip
    theirs = _to_aioice(ours)
    assert theirs.to_sdp() == ours.to_sdp()
    assert _from_aioice(theirs) == ours
    # A peer-reflexive candidate's priority is the peer's PRIORITY attribute: any 32 bits.
    for priority, clamped in [(0, 1), (2**32 - 1, 2**31 - 1)]:
        prflx = aioice.Candidate("p1", 1, "UDP", priority, "10.0.0.7", 5000, "prflx")
        assert _from_aioice(prflx) == Candidate(
            "p1", 1, "udp", clamped, "10.0.0.7", 5000, CandidateType.PRFLX
        )


async def test_relay_policy_without_any_turn_server_fails_clearly() -> None:
    transport = IceTransport(IceConfig(policy="relay"), controlling=True)
    try:
        with pytest.raises(IceError, match="no TURN server"):
            async for _ in transport.gather():
                pass
    finally:
        await transport.close()


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="one of"):
        TurnServer("turn.example", username="u", password="p", shared_secret="s")
    with pytest.raises(ValueError, match="both"):
        TurnServer("turn.example", username="u")
    with pytest.raises(ValueError, match="consent_timeout"):
        IceTimers(consent_timeout=0)
    with pytest.raises(ValueError, match="port"):
        IceServer("stun.example", 70000)
    secret = TurnServer("turn.example", shared_secret="hush")
    assert "hush" not in repr(IceConfig(turn_servers=(secret,), policy="relay"))
