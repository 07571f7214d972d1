"""RTCP compound parsing/serialisation and NTP/RTT helpers."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.media.rtcp import (
    Bye,
    ReceiverReport,
    ReportBlock,
    RtcpError,
    RtcpPacket,
    Sdes,
    SenderReport,
    ntp_middle32,
    ntp_now,
    parse_compound,
    rtt_from_report,
    serialize_compound,
)

# SR with one report block, laid out per RFC 3550 6.4.1.
SR_BYTES = bytes.fromhex(
    "81c8000c"  # V=2 P=0 RC=1, PT=200, length 12 words (52 bytes total)
    "11223344"  # sender SSRC
    "e1e2e3e4f1f2f3f4"  # NTP timestamp
    "000003c0"  # RTP timestamp 960
    "00000064"  # sender packet count 100
    "00003e80"  # sender octet count 16000
    "55667788"  # report block: source SSRC
    "40fffffe"  # fraction lost 0x40, cumulative lost -2
    "00010005"  # extended highest sequence number (1 cycle + 5)
    "00000030"  # jitter 48
    "b7052000"  # LSR
    "00054000"  # DLSR
)
SR = SenderReport(
    ssrc=0x11223344,
    ntp_timestamp=0xE1E2E3E4F1F2F3F4,
    rtp_timestamp=960,
    packet_count=100,
    octet_count=16000,
    reports=(
        ReportBlock(
            ssrc=0x55667788,
            fraction_lost=0x40,
            packets_lost=-2,
            highest_seq=0x10005,
            jitter=48,
            lsr=0xB7052000,
            dlsr=0x00054000,
        ),
    ),
)
# SDES with one chunk: SSRC, CNAME "abcd", null terminator, padding to 32 bits.
SDES_BYTES = bytes.fromhex("81ca0003112233440104616263640000")
SDES = Sdes(((0x11223344, "abcd"),))
RR_BYTES = bytes.fromhex("80c9000111223344")  # RR with no report blocks
RR = ReceiverReport(0x11223344)
BYE_BYTES = bytes.fromhex("81cb00021122334403627965")  # BYE with reason "bye"
BYE = Bye((0x11223344,), "bye")


def test_sender_report_and_sdes_compound() -> None:
    data = SR_BYTES + SDES_BYTES
    assert parse_compound(data) == [SR, SDES]
    assert serialize_compound([SR, SDES]) == data


def test_receiver_report_and_bye_compound() -> None:
    data = RR_BYTES + BYE_BYTES
    assert parse_compound(data) == [RR, BYE]
    assert serialize_compound([RR, BYE]) == data


def test_bye_without_reason_and_with_several_ssrcs() -> None:
    data = bytes.fromhex("82cb00020000000100000002")
    assert parse_compound(data) == [Bye((1, 2))]
    assert serialize_compound([Bye((1, 2))]) == data


def test_sdes_skips_other_items_and_handles_several_chunks() -> None:
    data = bytes.fromhex(
        "82ca0006"
        "00000001" "0203" "616263" "0101" "78" "00000000"  # NAME "abc", CNAME "x"
        "00000002" "00000000"  # chunk with no items at all
    )  # fmt: skip
    assert parse_compound(data) == [Sdes(((1, "x"), (2, "")))]


def test_sdes_cname_exactly_filling_the_chunk_gets_a_whole_null_word() -> None:
    # 4 (SSRC) + 2 + 6 = 12 bytes, so the terminator needs four more zero bytes.
    sdes = Sdes(((7, "abcdef"),))
    data = serialize_compound([sdes])
    assert data == bytes.fromhex("81ca000400000007010661626364656600000000")
    assert parse_compound(data) == [sdes]


def test_unknown_packet_types_are_skipped() -> None:
    nack = bytes.fromhex("81cd0003112233445566778800640003")  # RTPFB generic NACK
    pli = bytes.fromhex("81ce00021122334455667788")  # PSFB PLI
    app = bytes.fromhex("80cc0003112233446e616d6501020304")  # APP "name"
    xr = bytes.fromhex("80cf000111223344")  # XR without report blocks
    data = RR_BYTES + nack + pli + app + xr + BYE_BYTES
    assert parse_compound(data) == [RR, BYE]
    assert parse_compound(nack + pli) == []


def test_padding_on_the_last_packet_is_ignored() -> None:
    data = RR_BYTES + bytes.fromhex("a1cb00021122334400000004")  # BYE, 4 pad bytes
    assert parse_compound(data) == [RR, Bye((0x11223344,))]


def test_sender_report_profile_extension_is_ignored() -> None:
    data = bytearray(SR_BYTES + b"\xde\xad\xbe\xef")
    data[3] += 1
    assert parse_compound(bytes(data)) == [SR]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (RR_BYTES[:3], "header truncated"),
        (RR_BYTES + b"\x80\xc9", "header truncated"),
        (bytes.fromhex("40c9000111223344"), "version 1"),
        (RR_BYTES[:-1], "claims 8 bytes, 7 left"),
        (bytes.fromhex("80c9000211223344"), "claims"),
        (SR_BYTES[:3] + b"\x06" + SR_BYTES[4:28], "SR too short"),
        (bytes.fromhex("81c9000111223344"), "RR too short"),
        (bytes.fromhex("81c80000"), "SR too short"),
        (bytes.fromhex("81ca000101020304"), "no terminating null"),
        (bytes.fromhex("81ca00020102030401080000"), "overruns"),
        (bytes.fromhex("81ca00020102030401"), "claims"),
        (bytes.fromhex("81ca0001010203"), "claims"),
        (bytes.fromhex("81ca0000"), "before a chunk SSRC"),
        # The null item is the last byte before RTCP padding, its own padding runs over.
        (bytes.fromhex("a1ca0003010203040103787878000002"), "padding overruns"),
        (bytes.fromhex("82cb000111223344"), "BYE too short"),
        (bytes.fromhex("81cb00021122334405627965"), "reason of 5 bytes"),
        (bytes.fromhex("a0c9000111223300"), "padding count 0"),
        (bytes.fromhex("a0c9000111223305"), "padding count 5"),
    ],
)
def test_parse_rejects_malformed(data: bytes, message: str) -> None:
    with pytest.raises(RtcpError, match=message):
        parse_compound(data)


def _block(**changes: int) -> ReportBlock:
    fields = {
        "ssrc": 1,
        "fraction_lost": 0,
        "packets_lost": 0,
        "highest_seq": 0,
        "jitter": 0,
        "lsr": 0,
        "dlsr": 0,
    }
    fields.update(changes)
    return ReportBlock(**fields)


@pytest.mark.parametrize(
    "packet",
    [
        ReceiverReport(1, (_block(),) * 32),
        ReceiverReport(1, (_block(packets_lost=0x800000),)),
        ReceiverReport(1, (_block(packets_lost=-0x800001),)),
        ReceiverReport(1, (_block(fraction_lost=256),)),
        ReceiverReport(1, (_block(jitter=1 << 32),)),
        ReceiverReport(1 << 32),
        SenderReport(1, 1 << 64, 0, 0, 0),
        Sdes(((1, "x" * 256),)),
        Sdes(((1, "\ud800"),)),
        Sdes(tuple((i, "x") for i in range(32))),
        Bye(tuple(range(32))),
        Bye((1,), "é" * 128),
    ],
)
def test_serialize_rejects_unrepresentable(packet: RtcpPacket) -> None:
    with pytest.raises(RtcpError):
        serialize_compound([packet])


def test_packets_lost_sign_extension_limits() -> None:
    rr = ReceiverReport(
        9, (_block(packets_lost=0x7FFFFF, fraction_lost=255), _block(packets_lost=-0x800000))
    )
    data = serialize_compound([rr])
    assert data[12:16] == bytes.fromhex("ff7fffff")
    assert data[36:40] == bytes.fromhex("00800000")
    assert parse_compound(data) == [rr]


def test_ntp_now() -> None:
    assert ntp_now(0.0) == 2_208_988_800 << 32
    assert ntp_now(1.75) == (2_208_988_801 << 32) | 0xC0000000
    assert ntp_now(1_700_000_000.5) == ((1_700_000_000 + 2_208_988_800) << 32) | 0x80000000
    # Rounding up to a whole second carries into the seconds field.
    assert ntp_now(2.0 - 1e-12) == 2_208_988_802 << 32
    # NTP era 0 ends on 2036-02-07 06:28:16 UTC; the 64-bit value wraps to era 1.
    assert ntp_now(2_085_978_496.0) == 0
    assert ntp_now(2_085_978_497.25) == (1 << 32) | 0x40000000


def test_ntp_middle32() -> None:
    assert ntp_middle32(0xAABBCCDDEEFF0011) == 0xCCDDEEFF
    assert ntp_middle32(ntp_now(1.5)) == ((2_208_988_801 & 0xFFFF) << 16) | 0x8000


def test_rtt_rfc3550_figure_2() -> None:
    # A = 46864.500 s, LSR = 46853.125 s, DLSR = 5.250 s (RFC 3550 section 6.4.1).
    block = _block(lsr=0xB7052000, dlsr=0x00054000)
    assert rtt_from_report(block, 0xB7108000) == 6.125


def test_rtt_from_wall_clock_times() -> None:
    # SR sent at t=1000.0, held 0.25 s by the peer, report back at t=1000.3: RTT 50 ms.
    block = _block(lsr=ntp_middle32(ntp_now(1000.0)), dlsr=int(0.25 * 65536))
    rtt = rtt_from_report(block, ntp_middle32(ntp_now(1000.3)))
    assert rtt is not None
    assert rtt == pytest.approx(0.05, abs=2 / 65536)


def test_rtt_across_middle32_wrap() -> None:
    # LSR is 0.5 s before the wrap, arrival 1 s after it, the peer held it 0.5 s: RTT 1 s.
    block = _block(lsr=0xFFFF8000, dlsr=0x00008000)
    assert rtt_from_report(block, 0x00010000) == 1.0


def test_rtt_none_without_sender_report_or_when_negative() -> None:
    assert rtt_from_report(_block(lsr=0, dlsr=0), 0x12345678) is None
    assert rtt_from_report(_block(lsr=0x00010000, dlsr=0x00020000), 0x00020000) is None
    assert rtt_from_report(_block(lsr=0x00010000, dlsr=0x00010000), 0x00020000) == 0.0


u32 = st.integers(0, 0xFFFFFFFF)
blocks = st.builds(
    ReportBlock,
    ssrc=u32,
    fraction_lost=st.integers(0, 255),
    packets_lost=st.integers(-0x800000, 0x7FFFFF),
    highest_seq=u32,
    jitter=u32,
    lsr=u32,
    dlsr=u32,
)
report_lists = st.lists(blocks, max_size=4).map(tuple)
# Up to 60 characters of at most 4 UTF-8 bytes each always fits the 255-byte limit.
texts = st.text(max_size=60)
rtcp_packets: st.SearchStrategy[RtcpPacket] = st.one_of(
    st.builds(
        SenderReport,
        ssrc=u32,
        ntp_timestamp=st.integers(0, (1 << 64) - 1),
        rtp_timestamp=u32,
        packet_count=u32,
        octet_count=u32,
        reports=report_lists,
    ),
    st.builds(ReceiverReport, ssrc=u32, reports=report_lists),
    st.builds(Sdes, chunks=st.lists(st.tuples(u32, texts), max_size=4).map(tuple)),
    st.builds(Bye, ssrcs=st.lists(u32, max_size=4).map(tuple), reason=texts),
)


@given(st.lists(rtcp_packets, min_size=1, max_size=5))
def test_round_trip(packets: list[RtcpPacket]) -> None:
    data = serialize_compound(packets)
    assert len(data) % 4 == 0
    assert parse_compound(data) == packets


@given(st.lists(rtcp_packets, min_size=1, max_size=3), st.data())
def test_truncation_raises_rtcp_error(packets: list[RtcpPacket], data: st.DataObject) -> None:
    raw = serialize_compound(packets)
    cut = data.draw(st.integers(0, len(raw) - 1))
    boundaries = [len(serialize_compound(packets[:n])) for n in range(1, len(packets))]
    if cut in boundaries:
        assert parse_compound(raw[:cut]) == packets[: boundaries.index(cut) + 1]
    else:
        with pytest.raises(RtcpError):
            parse_compound(raw[:cut])


@given(st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_raise_rtcp_error(data: bytes) -> None:
    try:
        packets = parse_compound(data)
    except RtcpError:
        return
    assert len(data) % 4 == 0
    assert all(isinstance(p, SenderReport | ReceiverReport | Sdes | Bye) for p in packets)


@given(st.integers(0, 31), st.sampled_from([200, 201, 202, 203]), st.binary(max_size=160))
def test_known_types_with_arbitrary_bodies(count: int, packet_type: int, body: bytes) -> None:
    body += bytes(-len(body) % 4)
    data = bytes([0x80 | count, packet_type, 0, len(body) // 4]) + body
    try:
        packets = parse_compound(data)
    except RtcpError:
        return
    assert len(packets) == 1
    assert isinstance(packets[0], (SenderReport, ReceiverReport, Sdes, Bye)[packet_type - 200])
    try:
        again = serialize_compound(packets)
    except RtcpError:
        # Only text that was not valid UTF-8 can grow past 255 bytes when re-encoded.
        packet = packets[0]
        assert isinstance(packet, Sdes | Bye)
        text = packet.reason if isinstance(packet, Bye) else "".join(c for _, c in packet.chunks)
        assert "\ufffd" in text
    else:
        assert parse_compound(again) == packets
