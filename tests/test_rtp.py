"""RTP packet parsing/serialisation, RFC 5761 demux and sequence arithmetic."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.media.rtp import (
    RtpError,
    RtpPacket,
    Unwrapper,
    is_rtcp,
    pack_media,
    parse_media,
    seq_diff,
    seq_gt,
)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


def test_parse_minimal_header_built_by_hand() -> None:
    data = bytes(
        [
            0x80,  # V=2, P=0, X=0, CC=0
            0xEF,  # M=1, PT=111
            0x12, 0x34,  # sequence
            0xDE, 0xAD, 0xBE, 0xEF,  # timestamp
            0x01, 0x02, 0x03, 0x04,  # SSRC
            0xAA, 0xBB,  # payload
        ]
    )  # fmt: skip
    packet = RtpPacket.parse(data)
    assert packet == RtpPacket(
        payload_type=111,
        sequence=0x1234,
        timestamp=0xDEADBEEF,
        ssrc=0x01020304,
        payload=b"\xaa\xbb",
        marker=True,
    )
    assert packet.to_bytes() == data


def test_parse_csrcs_and_extension_built_by_hand() -> None:
    data = bytes(
        [
            0x92,  # V=2, P=0, X=1, CC=2
            0x6F,  # M=0, PT=111
            0xFF, 0xFF,
            0x00, 0x00, 0x03, 0xC0,
            0xCA, 0xFE, 0xBA, 0xBE,
            0x00, 0x00, 0x00, 0x01,  # CSRC 1
            0x00, 0x00, 0x00, 0x02,  # CSRC 2
            0xBE, 0xDE, 0x00, 0x01,  # extension profile 0xBEDE, one 32-bit word
            0x10, 0x7F, 0x00, 0x00,  # extension body
            0x55,  # payload
        ]
    )  # fmt: skip
    packet = RtpPacket.parse(data)
    assert packet.payload_type == 111
    assert not packet.marker
    assert packet.sequence == 0xFFFF
    assert packet.timestamp == 960
    assert packet.ssrc == 0xCAFEBABE
    assert packet.csrcs == (1, 2)
    assert packet.extension_profile == 0xBEDE
    assert packet.extension == b"\x10\x7f\x00\x00"
    assert packet.payload == b"\x55"
    assert packet.to_bytes() == data


def test_padding_is_stripped() -> None:
    header = bytes([0xA0, 0x6F, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3])  # P=1
    packet = RtpPacket.parse(header + b"opus" + b"\x00\x00\x03")
    assert packet.payload == b"opus"
    assert packet.to_bytes() == bytes([0x80]) + header[1:] + b"opus"


def test_padding_may_consume_the_whole_payload() -> None:
    header = bytes([0xA0, 0x6F, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3])
    assert RtpPacket.parse(header + b"\x00\x00\x00\x04").payload == b""


def test_empty_payload_round_trip() -> None:
    packet = RtpPacket(111, 5, 6, 7, b"")
    assert len(packet.to_bytes()) == 12
    assert RtpPacket.parse(packet.to_bytes()) == packet


def test_extension_with_empty_body_round_trips() -> None:
    packet = RtpPacket(111, 1, 2, 3, b"x", extension_profile=0x1000)
    data = packet.to_bytes()
    assert data[0] == 0x90
    assert data[12:16] == b"\x10\x00\x00\x00"
    assert RtpPacket.parse(data) == packet


BASE = bytes([0x80, 0x6F, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "too short"),
        (BASE[:11], "too short"),
        (bytes([0x40]) + BASE[1:], "version 1"),
        (bytes([0x00]) + BASE[1:], "version 0"),
        (bytes([0x81]) + BASE[1:] + b"\x00\x00\x00", "CSRC"),
        (bytes([0x8F]) + BASE[1:] + bytes(56), "CSRC"),
        (bytes([0x90]) + BASE[1:] + b"\xbe\xde\x00", "extension header"),
        (bytes([0x90]) + BASE[1:] + b"\xbe\xde\x00\x02" + bytes(7), "overruns"),
        (bytes([0xA0]) + BASE[1:], "no padding byte"),
        (bytes([0xA0]) + BASE[1:] + b"ab\x00", "padding count 0"),
        (bytes([0xA0]) + BASE[1:] + b"ab\x04", "padding count 4"),
    ],
)
def test_parse_rejects_malformed(data: bytes, message: str) -> None:
    with pytest.raises(RtpError, match=message):
        RtpPacket.parse(data)


@pytest.mark.parametrize(
    "packet",
    [
        RtpPacket(128, 0, 0, 0, b""),
        RtpPacket(-1, 0, 0, 0, b""),
        RtpPacket(111, 0x10000, 0, 0, b""),
        RtpPacket(111, 0, 1 << 32, 0, b""),
        RtpPacket(111, 0, 0, -1, b""),
        RtpPacket(111, 0, 0, 0, b"", csrcs=tuple(range(16))),
        RtpPacket(111, 0, 0, 0, b"", csrcs=(1 << 32,)),
        RtpPacket(111, 0, 0, 0, b"", extension_profile=1, extension=b"abc"),
        RtpPacket(111, 0, 0, 0, b"", extension_profile=0x10000),
        RtpPacket(111, 0, 0, 0, b"", extension=b"abcd"),
    ],
)
def test_to_bytes_rejects_unrepresentable_fields(packet: RtpPacket) -> None:
    with pytest.raises(RtpError):
        packet.to_bytes()


def test_is_rtcp_demux() -> None:
    sr = bytes([0x80, 200, 0, 6])
    rr = bytes([0x80, 201, 0, 1])
    nack = bytes([0x81, 205, 0, 3])
    assert is_rtcp(sr)
    assert is_rtcp(rr)
    assert is_rtcp(nack)
    assert is_rtcp(bytes([0x80, 223]))
    assert not is_rtcp(bytes([0x80, 224]))
    assert not is_rtcp(bytes([0x80, 191]))
    assert not is_rtcp(RtpPacket(111, 1, 2, 3, b"x", marker=True).to_bytes())  # 0xEF
    assert not is_rtcp(RtpPacket(111, 1, 2, 3, b"x").to_bytes())  # 0x6F
    assert not is_rtcp(RtpPacket(63, 1, 2, 3, b"x", marker=True).to_bytes())  # RED, 0xBF
    assert not is_rtcp(b"\x80")
    assert not is_rtcp(b"")


def test_seq_diff_and_gt_across_wrap() -> None:
    assert seq_diff(0, 65535) == 1
    assert seq_diff(65535, 0) == -1
    assert seq_diff(5, 5) == 0
    assert seq_diff(100, 50) == 50
    assert seq_diff(10, 65530) == 16
    assert seq_diff(32767, 0) == 32767
    assert seq_diff(32768, 0) == -32768
    assert seq_gt(0, 65535)
    assert not seq_gt(65535, 0)
    assert not seq_gt(7, 7)
    assert seq_gt(32767, 0)
    assert not seq_gt(32768, 0)


@given(u16, st.integers(-32768, 32767))
def test_seq_diff_inverts_addition(base: int, delta: int) -> None:
    later = (base + delta) & 0xFFFF
    assert seq_diff(later, base) == delta
    assert seq_gt(later, base) == (delta > 0)


def test_unwrapper_sequence_wrap_with_reordering() -> None:
    unwrap = Unwrapper(16).unwrap
    assert [unwrap(s) for s in (65533, 65535, 0, 65534, 1, 2)] == [
        65533,
        65535,
        65536,
        65534,
        65537,
        65538,
    ]


def test_unwrapper_timestamp_wrap() -> None:
    unwrap = Unwrapper(32).unwrap
    start = 0xFFFFFFFF - 959 - 960  # two frames before the wrap
    values = [(start + 960 * i) & 0xFFFFFFFF for i in range(5)]
    assert [unwrap(v) for v in values] == [start + 960 * i for i in range(5)]
    # A late packet from before the wrap maps back below it.
    assert unwrap(start) == start


def test_unwrapper_is_monotonic_over_many_wraps() -> None:
    unwrap = Unwrapper(16).unwrap
    assert [unwrap((40000 + 7000 * i) & 0xFFFF) for i in range(100)] == [
        40000 + 7000 * i for i in range(100)
    ]


def test_unwrapper_values_before_the_first_go_negative() -> None:
    unwrap = Unwrapper(16).unwrap
    assert unwrap(1) == 1
    assert unwrap(65535) == -1


def test_unwrapper_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2 bits"):
        Unwrapper(1)
    with pytest.raises(ValueError, match="16-bit"):
        Unwrapper(16).unwrap(65536)
    with pytest.raises(ValueError):
        Unwrapper(16).unwrap(-1)


packets = st.builds(
    RtpPacket,
    payload_type=st.integers(0, 127),
    sequence=u16,
    timestamp=u32,
    ssrc=u32,
    payload=st.binary(max_size=200),
    marker=st.booleans(),
    csrcs=st.lists(u32, max_size=15).map(tuple),
    extension_profile=st.none() | u16,
    extension=st.just(b""),
).flatmap(
    lambda p: (
        st.just(p)
        if p.extension_profile is None
        else st.binary(max_size=40).map(
            lambda ext: RtpPacket(
                p.payload_type,
                p.sequence,
                p.timestamp,
                p.ssrc,
                p.payload,
                p.marker,
                p.csrcs,
                p.extension_profile,
                ext + bytes(-len(ext) % 4),
            )
        )
    )
)


@given(packets)
def test_round_trip(packet: RtpPacket) -> None:
    data = packet.to_bytes()
    assert RtpPacket.parse(data) == packet
    assert is_rtcp(data) == (packet.marker and 64 <= packet.payload_type <= 95)


@given(packets, st.integers(1, 255))
def test_round_trip_with_padding(packet: RtpPacket, padding: int) -> None:
    data = bytearray(packet.to_bytes())
    data[0] |= 0x20
    data += bytes(padding - 1) + bytes([padding])
    assert RtpPacket.parse(bytes(data)) == packet


@given(packets, st.data())
def test_truncated_packets_raise_rtp_error_or_parse(packet: RtpPacket, data: st.DataObject) -> None:
    raw = packet.to_bytes()
    header_size = len(raw) - len(packet.payload)
    cut = data.draw(st.integers(0, len(raw)))
    if cut < header_size:
        with pytest.raises(RtpError):
            RtpPacket.parse(raw[:cut])
    else:
        assert RtpPacket.parse(raw[:cut]).payload == packet.payload[: cut - header_size]


@given(st.binary(max_size=120))
def test_arbitrary_bytes_parse_or_raise_rtp_error(data: bytes) -> None:
    try:
        packet = RtpPacket.parse(data)
    except RtpError:
        return
    assert len(packet.to_bytes()) <= len(data)


@given(st.binary(min_size=11, max_size=120))
def test_arbitrary_bodies_with_valid_version(data: bytes) -> None:
    # Force version 2 so the fuzzer reaches the CSRC, extension and padding checks.
    data = bytes([0x80 | (data[0] & 0x3F)]) + data[1:]
    try:
        packet = RtpPacket.parse(data)
    except RtpError:
        return
    assert packet.payload in data
    assert struct.unpack_from("!H", data, 2)[0] == packet.sequence


@given(st.binary(max_size=120), st.booleans())
def test_parse_media_reads_what_parse_reads(data: bytes, version_two: bool) -> None:
    if version_two and data:
        data = bytes([0x80 | (data[0] & 0x3F)]) + data[1:]
    try:
        packet = RtpPacket.parse(data)
    except RtpError:
        with pytest.raises(RtpError):
            parse_media(data)
        return
    expected = (packet.payload_type, packet.sequence, packet.timestamp, packet.ssrc)
    assert parse_media(data) == (*expected, packet.payload)


@given(st.integers(0, 127), u16, u32, u32, st.binary(max_size=200))
def test_pack_media_is_to_bytes_of_a_plain_packet(
    pt: int, seq: int, ts: int, ssrc: int, payload: bytes
) -> None:
    assert (
        pack_media(pt, seq, ts, ssrc, payload) == RtpPacket(pt, seq, ts, ssrc, payload).to_bytes()
    )


def test_pack_media_rejects_unrepresentable_fields() -> None:
    with pytest.raises(RtpError, match="payload type"):
        pack_media(128, 0, 0, 0, b"")
    with pytest.raises(RtpError, match="out of range"):
        pack_media(111, 1 << 16, 0, 0, b"")
