"""ICE candidates: parsing browser and aioice forms, validation, round trips, garbage."""

from __future__ import annotations

import string
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.net.candidate import MAX_PRIORITY, Candidate, CandidateError, CandidateType, is_host

HOST, SRFLX, PRFLX, RELAY = CandidateType
MDNS = "cd02c5e1-1635-4d03-951f-d8f9a2c68e45.local"

# --- saved candidates ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (  # Safari: generation, ufrag, network-id and network-cost are dropped
            "candidate:1467250027 1 udp 2122260223 192.168.1.34 58462 typ host "
            "generation 0 ufrag gsu8 network-id 1 network-cost 10",
            Candidate("1467250027", 1, "udp", 2122260223, "192.168.1.34", 58462, HOST),
        ),
        (  # Chrome srflx, upper-case transport
            "candidate:842163049 1 UDP 1677729535 203.0.113.7 61665 typ srflx raddr 0.0.0.0 "
            "rport 0 generation 0 ufrag EsAw network-cost 999",
            Candidate(
                "842163049", 1, "udp", 1677729535, "203.0.113.7", 61665, SRFLX,
                related_address="0.0.0.0", related_port=0,
            ),
        ),
        (  # Firefox: an mDNS host name, no prefix
            f"1 1 UDP 2122187007 {MDNS} 60012 typ host",
            Candidate("1", 1, "udp", 2122187007, MDNS, 60012, HOST),
        ),
        (  # IPv6, and a link-local related address with a zone id
            "candidate:3 2 udp 1686052862 2001:db8::7 3478 typ prflx raddr fe80::1%eth0 rport 5",
            Candidate(
                "3", 2, "udp", 1686052862, "2001:db8::7", 3478, PRFLX,
                related_address="fe80::1%eth0", related_port=5,
            ),
        ),
        (
            "candidate:4 1 TCP 2105524479 10.0.0.2 9 typ host tcptype active",
            Candidate("4", 1, "tcp", 2105524479, "10.0.0.2", 9, HOST, tcptype="active"),
        ),
        (  # a TURN server named by DNS; ice-chars + and / in the foundation
            " candidate:r+/1 1 udp 25108479 turn.example.net. 3478 typ relay "
            "raddr 0.0.0.0 rport 0\r\n",
            Candidate(
                "r+/1", 1, "udp", 25108479, "turn.example.net.", 3478, RELAY,
                related_address="0.0.0.0", related_port=0,
            ),
        ),
    ],
)  # fmt: skip
def test_saved_candidates_parse(text: str, expected: Candidate) -> None:
    assert Candidate.parse(text) == expected
    assert not expected.to_sdp().startswith("candidate:")
    assert Candidate.parse(expected.to_sdp()) == expected
    assert Candidate.parse("candidate:" + expected.to_sdp()) == expected


def test_to_sdp_keeps_only_raddr_rport_and_tcptype() -> None:
    c = Candidate.parse(
        "candidate:842163049 1 UDP 1677729535 203.0.113.7 61665 typ srflx raddr 0.0.0.0 "
        "rport 0 generation 0 ufrag EsAw network-cost 999"
    )
    assert (
        c.to_sdp() == "842163049 1 udp 1677729535 203.0.113.7 61665 typ srflx raddr 0.0.0.0 rport 0"
    )
    assert c.address == ("203.0.113.7", 61665)
    assert c.type is SRFLX


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "8 fields"),
        ("candidate:", "8 fields"),
        ("candidate:1 1 udp 1 10.0.0.1 9 typ", "8 fields"),
        ("candidate:1 1 udp 1 10.0.0.1 9 type host", "field 7 is 'type', expected 'typ'"),
        ("candidate:1 1 udp 1 10.0.0.1 9 typ relayed", "type 'relayed' is not one of"),
        ("candidate:1 1 sctp 1 10.0.0.1 9 typ host", "transport 'sctp' is not udp or tcp"),
        ("candidate:1 0 udp 1 10.0.0.1 9 typ host", "component 0 out of range 1..256"),
        ("candidate:1 257 udp 1 10.0.0.1 9 typ host", "component 257 out of range"),
        ("candidate:1 1 udp 0 10.0.0.1 9 typ host", "priority 0 out of range"),
        ("candidate:1 1 udp 2147483648 10.0.0.1 9 typ host", "priority 2147483648 out of range"),
        ("candidate:1 1 udp -1 10.0.0.1 9 typ host", "priority '-1' is not a number"),
        ("candidate:1 1 udp 1e3 10.0.0.1 9 typ host", "priority '1e3' is not a number"),
        ("candidate:1 1 udp 1 10.0.0.1 99999 typ host", "port 99999 out of range"),
        ("candidate:1 1 udp 1 10.0.0.1 65536 typ host", "port 65536 out of range"),
        (f"candidate:1 1 udp 1 10.0.0.1 {'9' * 400} typ host", "port '9999.* out of range"),
        ("candidate:1 1 udp 1 10.0.0.1 \u0665\u0660 typ host", "port .* is not a number"),
        ("candidate:1 1 udp 1 bad_host! 9 typ host", "address 'bad_host!' is neither"),
        ("candidate:1 1 udp 1 under_score.local 9 typ host", "address .* is neither"),
        ("candidate:1 1 udp 1 -dash.local 9 typ host", "address .* is neither"),
        ("candidate:1 1 udp 1 10.0.0.1%eth0 9 typ host", "address .* is neither"),
        ("candidate:f@o 1 udp 1 10.0.0.1 9 typ host", "foundation 'f@o'"),
        ("candidate:f:o 1 udp 1 10.0.0.1 9 typ host", "foundation 'f:o'"),
        (f"candidate:{'f' * 33} 1 udp 1 10.0.0.1 9 typ host", "foundation .* 1..32"),
        ("candidate:1 1 udp 1 10.0.0.1 9 typ host raddr", "name/value pairs"),
        ("candidate:1 1 udp 1 10.0.0.1 9 typ srflx raddr no! rport 1", "raddr 'no!'"),
        ("candidate:1 1 udp 1 10.0.0.1 9 typ srflx rport x", "rport 'x' is not a number"),
        ("candidate:1 1 udp 1 10.0.0.1 9 typ srflx rport 70000", "rport 70000 out of range"),
        ("candidate:1 1 udp 1 10.0.0.1 9 typ srflx rport 1 rport 2", "rport twice"),
        ("candidate:1 1 udp 1 10.0.0.1 9 typ host tcptype active", "only for tcp"),
        ("candidate:1 1 tcp 1 10.0.0.1 9 typ host tcptype both", "tcptype 'both'"),
    ],
)
def test_bad_candidates_say_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(CandidateError, match=reason):
        Candidate.parse(text)


def test_construction_is_validated_too() -> None:
    good = Candidate("1", 1, "udp", MAX_PRIORITY, "10.0.0.1", 0, HOST)
    assert isinstance(CandidateError("x"), ValueError)
    for changes, reason in [
        ({"transport": "UDP"}, "transport 'UDP'"),
        ({"component": True}, "component 'True' is not an integer"),
        ({"priority": MAX_PRIORITY + 1}, "priority 2147483648 out of range"),
        ({"host": "10.0.0.1 typ relay"}, "address .* is neither"),
        ({"host": "a\nb"}, "address .* is neither"),
        ({"port": -1}, "port -1 out of range"),
        ({"type": "bogus"}, "type 'bogus'"),
        ({"related_port": 65536}, "rport 65536"),
    ]:
        with pytest.raises(CandidateError, match=reason):
            replace(good, **changes)  # type: ignore[arg-type]
    assert replace(good, type="relay").type is RELAY  # type: ignore[arg-type]


def test_host_names() -> None:
    for good in ("10.0.0.1", "::1", "fe80::1%eth0", MDNS, "turn.example.net", "a", "x.y."):
        assert is_host(good), good
    for bad in ("", ".", "a..b", "a_b", "-a", "a-", "é.local", "a b", "x" * 64, "a." * 127):
        assert not is_host(bad), bad


# --- hypothesis: round trips and garbage ---------------------------------------------------

ICE_CHARS = string.ascii_letters + string.digits + "+/"
_labels = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,8}[A-Za-z0-9])?", fullmatch=True)
hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.tuples(st.ip_addresses(v=6), st.text(string.ascii_letters + string.digits, min_size=1)).map(
        lambda pair: f"{pair[0]}%{pair[1]}"
    ),
    st.uuids().map(lambda u: f"{u}.local"),
    st.lists(_labels, min_size=1, max_size=4).map(".".join),
)
ports = st.integers(0, 65535)


@st.composite
def candidates(draw: st.DrawFn) -> Candidate:
    transport = draw(st.sampled_from(["udp", "tcp"]))
    return Candidate(
        foundation=draw(st.text(ICE_CHARS, min_size=1, max_size=32)),
        component=draw(st.integers(1, 256)),
        transport=transport,
        priority=draw(st.integers(1, MAX_PRIORITY)),
        host=draw(hosts),
        port=draw(ports),
        type=draw(st.sampled_from(CandidateType)),
        related_address=draw(st.none() | hosts),
        related_port=draw(st.none() | ports),
        tcptype=draw(st.none() | st.sampled_from(["active", "passive", "so"]))
        if transport == "tcp"
        else None,
    )


@given(candidates(), st.sampled_from(["", "candidate:", "  candidate:"]))
def test_any_candidate_round_trips(candidate: Candidate, prefix: str) -> None:
    assert Candidate.parse(prefix + candidate.to_sdp()) == candidate
    extended = candidate.to_sdp() + " generation 0 ufrag EsAw network-id 1 network-cost 999"
    assert Candidate.parse(extended) == candidate


def _parse_is_safe(text: str) -> None:
    """parse() either refuses with CandidateError or gives a candidate that round-trips."""
    try:
        candidate = Candidate.parse(text)
    except CandidateError:
        return
    assert Candidate.parse(candidate.to_sdp()) == candidate


@given(st.text(max_size=200) | st.text(max_size=200).map("candidate:".__add__))
def test_random_text_only_raises_candidate_error(text: str) -> None:
    _parse_is_safe(text)


TOKENS = [
    "candidate:1", "1", "0", "257", "udp", "TCP", "sctp", "2130706431", "4294967295", "-1",
    "10.0.0.1", "::1", "fe80::1%eth0", MDNS, "bad_host!", "9", "65536", "typ", "host",
    "srflx", "relay", "bogus", "raddr", "rport", "tcptype", "active", "so", "generation",
]  # fmt: skip


@given(st.lists(st.sampled_from(TOKENS), max_size=16))
def test_candidate_like_token_soup_only_raises_candidate_error(tokens: list[str]) -> None:
    _parse_is_safe(" ".join(tokens))
