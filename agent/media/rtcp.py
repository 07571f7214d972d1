"""RTCP compound packets (RFC 3550 section 6): SR, RR, SDES CNAME and BYE, plus RTT helpers."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass

RTCP_VERSION = 2
PT_SR = 200
PT_RR = 201
PT_SDES = 202
PT_BYE = 203
SDES_CNAME = 1
MAX_COUNT = 31  # the 5-bit RC/SC field

# Seconds from the NTP epoch (1900) to the Unix epoch (1970).
NTP_UNIX_OFFSET = 2_208_988_800
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1

_HEADER = struct.Struct("!BBH")
_U32_STRUCT = struct.Struct("!I")
_SENDER_INFO = struct.Struct("!IQIII")  # ssrc, NTP, RTP timestamp, packets, octets
_BLOCK = struct.Struct("!IIIIII")
_ITEM = struct.Struct("!BB")


class RtcpError(ValueError):
    """Raised for RTCP bytes that cannot be parsed or packets that cannot be serialised."""


@dataclass(frozen=True, slots=True)
class ReportBlock:
    ssrc: int
    fraction_lost: int  # 0..255, fixed point with the binary point at the left edge
    packets_lost: int  # cumulative, signed 24-bit
    highest_seq: int  # extended highest sequence number received
    jitter: int  # interarrival jitter in RTP timestamp units
    lsr: int  # middle 32 bits of the NTP time of the last SR received, 0 if none
    dlsr: int  # delay since that SR, in 1/65536 s


@dataclass(frozen=True, slots=True)
class SenderReport:
    ssrc: int
    ntp_timestamp: int
    rtp_timestamp: int
    packet_count: int
    octet_count: int
    reports: tuple[ReportBlock, ...] = ()


@dataclass(frozen=True, slots=True)
class ReceiverReport:
    ssrc: int
    reports: tuple[ReportBlock, ...] = ()


@dataclass(frozen=True, slots=True)
class Sdes:
    # (ssrc, cname); other SDES items are dropped on parse, a chunk without CNAME gets "".
    chunks: tuple[tuple[int, str], ...]


@dataclass(frozen=True, slots=True)
class Bye:
    ssrcs: tuple[int, ...]
    reason: str = ""


RtcpPacket = SenderReport | ReceiverReport | Sdes | Bye


def _parse_blocks(data: bytes, offset: int, count: int) -> tuple[ReportBlock, ...]:
    blocks = []
    for _ in range(count):
        ssrc, lost_word, highest, jitter, lsr, dlsr = _BLOCK.unpack_from(data, offset)
        offset += _BLOCK.size
        lost = lost_word & 0xFFFFFF
        if lost & 0x800000:
            lost -= 0x1000000
        blocks.append(ReportBlock(ssrc, lost_word >> 24, lost, highest, jitter, lsr, dlsr))
    return tuple(blocks)


def _parse_sdes(data: bytes, offset: int, end: int, count: int) -> Sdes:
    chunks = []
    for _ in range(count):
        if end - offset < 4:
            raise RtcpError("SDES truncated before a chunk SSRC")
        (ssrc,) = _U32_STRUCT.unpack_from(data, offset)
        offset += 4
        cname = ""
        while True:
            if offset >= end:
                raise RtcpError("SDES chunk has no terminating null item")
            kind = data[offset]
            if kind == 0:
                # The null item is followed by zero padding up to the next 32-bit boundary.
                offset = (offset + 4) & ~3
                break
            if end - offset < 2:
                raise RtcpError("SDES item truncated inside its header")
            length = data[offset + 1]
            start = offset + 2
            offset = start + length
            if offset > end:
                raise RtcpError(f"SDES item of {length} bytes overruns the packet")
            if kind == SDES_CNAME:
                cname = bytes(data[start:offset]).decode("utf-8", "replace")
        chunks.append((ssrc, cname))
    if offset > end:
        raise RtcpError("SDES chunk padding overruns the packet")
    return Sdes(tuple(chunks))


def _parse_bye(data: bytes, offset: int, end: int, count: int) -> Bye:
    if end - offset < 4 * count:
        raise RtcpError(f"BYE too short for {count} SSRCs")
    ssrcs = struct.unpack_from(f"!{count}I", data, offset)
    offset += 4 * count
    reason = ""
    if offset < end:
        length = data[offset]
        if offset + 1 + length > end:
            raise RtcpError(f"BYE reason of {length} bytes overruns the packet")
        reason = bytes(data[offset + 1 : offset + 1 + length]).decode("utf-8", "replace")
    return Bye(ssrcs, reason)


def parse_compound(data: bytes) -> list[RtcpPacket]:
    """Parse a compound RTCP packet; packet types other than SR/RR/SDES/BYE are skipped."""
    packets: list[RtcpPacket] = []
    size = len(data)
    if size == 0:
        raise RtcpError("empty RTCP packet")
    offset = 0
    while offset < size:
        if size - offset < _HEADER.size:
            raise RtcpError(f"RTCP header truncated at offset {offset}")
        first, packet_type, words = _HEADER.unpack_from(data, offset)
        if first >> 6 != RTCP_VERSION:
            raise RtcpError(f"RTCP version {first >> 6} at offset {offset}, expected 2")
        end = offset + 4 * (words + 1)
        if end > size:
            raise RtcpError(
                f"RTCP packet at offset {offset} claims {end - offset} bytes, {size - offset} left"
            )
        body_end = end
        if first & 0x20:
            padding = data[end - 1]
            if padding == 0 or padding > end - offset - _HEADER.size:
                raise RtcpError(f"RTCP padding count {padding} invalid at offset {offset}")
            body_end -= padding
        count = first & 0x1F
        body = offset + _HEADER.size
        if packet_type == PT_SR:
            if body_end - body < _SENDER_INFO.size + count * _BLOCK.size:
                raise RtcpError(f"SR too short for {count} report blocks")
            ssrc, ntp, rtp_ts, packets_sent, octets = _SENDER_INFO.unpack_from(data, body)
            blocks = _parse_blocks(data, body + _SENDER_INFO.size, count)
            packets.append(SenderReport(ssrc, ntp, rtp_ts, packets_sent, octets, blocks))
        elif packet_type == PT_RR:
            if body_end - body < 4 + count * _BLOCK.size:
                raise RtcpError(f"RR too short for {count} report blocks")
            (ssrc,) = _U32_STRUCT.unpack_from(data, body)
            packets.append(ReceiverReport(ssrc, _parse_blocks(data, body + 4, count)))
        elif packet_type == PT_SDES:
            packets.append(_parse_sdes(data, body, body_end, count))
        elif packet_type == PT_BYE:
            packets.append(_parse_bye(data, body, body_end, count))
        offset = end
    return packets


def _header(count: int, packet_type: int, body_size: int) -> bytes:
    return _HEADER.pack((RTCP_VERSION << 6) | count, packet_type, body_size // 4)


def _check_count(count: int, what: str) -> None:
    if count > MAX_COUNT:
        raise RtcpError(f"{count} {what} do not fit in one RTCP packet (max {MAX_COUNT})")


def _pack_blocks(blocks: tuple[ReportBlock, ...]) -> bytes:
    _check_count(len(blocks), "report blocks")
    parts = []
    for b in blocks:
        if not 0 <= b.fraction_lost <= 0xFF:
            raise RtcpError(f"fraction_lost {b.fraction_lost} out of range 0..255")
        if not -0x800000 <= b.packets_lost <= 0x7FFFFF:
            raise RtcpError(f"packets_lost {b.packets_lost} out of signed 24-bit range")
        lost_word = (b.fraction_lost << 24) | (b.packets_lost & 0xFFFFFF)
        parts.append(_BLOCK.pack(b.ssrc, lost_word, b.highest_seq, b.jitter, b.lsr, b.dlsr))
    return b"".join(parts)


def _encode_text(text: str, what: str) -> bytes:
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RtcpError(f"{what} is not encodable as UTF-8") from exc
    if len(raw) > 0xFF:
        raise RtcpError(f"{what} is {len(raw)} bytes, at most 255 fit")
    return raw


def _pad4(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def _serialize_one(packet: RtcpPacket) -> bytes:
    if isinstance(packet, SenderReport):
        body = _SENDER_INFO.pack(
            packet.ssrc,
            packet.ntp_timestamp,
            packet.rtp_timestamp,
            packet.packet_count,
            packet.octet_count,
        ) + _pack_blocks(packet.reports)
        return _header(len(packet.reports), PT_SR, len(body)) + body
    if isinstance(packet, ReceiverReport):
        body = _U32_STRUCT.pack(packet.ssrc) + _pack_blocks(packet.reports)
        return _header(len(packet.reports), PT_RR, len(body)) + body
    if isinstance(packet, Sdes):
        _check_count(len(packet.chunks), "SDES chunks")
        parts = []
        for ssrc, cname in packet.chunks:
            raw = _encode_text(cname, "CNAME")
            # Item, then at least one null byte as terminator, padded to 32 bits.
            chunk = _U32_STRUCT.pack(ssrc) + _ITEM.pack(SDES_CNAME, len(raw)) + raw + b"\0"
            parts.append(_pad4(chunk))
        body = b"".join(parts)
        return _header(len(packet.chunks), PT_SDES, len(body)) + body
    _check_count(len(packet.ssrcs), "BYE SSRCs")
    body = struct.pack(f"!{len(packet.ssrcs)}I", *packet.ssrcs)
    if packet.reason:
        raw = _encode_text(packet.reason, "BYE reason")
        body += _pad4(bytes((len(raw),)) + raw)
    return _header(len(packet.ssrcs), PT_BYE, len(body)) + body


def serialize_compound(packets: Iterable[RtcpPacket]) -> bytes:
    """Serialise packets back to back into one compound RTCP packet (no padding)."""
    try:
        return b"".join(_serialize_one(p) for p in packets)
    except struct.error as exc:
        raise RtcpError(f"RTCP field out of range: {exc}") from exc


def ntp_now(wallclock: float) -> int:
    """64-bit NTP timestamp (32.32 fixed point since 1900) for a Unix time in seconds."""
    seconds = math.floor(wallclock)
    fraction = round((wallclock - seconds) * (1 << 32))
    # Rounding can carry into the seconds; masking wraps NTP era 0 into era 1 after 2036.
    return (((seconds + NTP_UNIX_OFFSET) << 32) + fraction) & _U64


def ntp_middle32(ntp: int) -> int:
    """The middle 32 bits of a 64-bit NTP timestamp, as used for LSR and RTT (16.16 s)."""
    return (ntp >> 16) & _U32


def rtt_from_report(block: ReportBlock, arrival_ntp_middle32: int) -> float | None:
    """Round-trip time in seconds per RFC 3550 A.8: A - LSR - DLSR.

    None when the peer has not received an SR yet (LSR 0) or the result is negative
    (clock steps, reordered reports).
    """
    if block.lsr == 0:
        return None
    # Modular arithmetic copes with the 16.16 clock wrapping every ~18 hours.
    rtt = (arrival_ntp_middle32 - block.lsr - block.dlsr) & _U32
    if rtt & 0x80000000:
        return None
    return rtt / 65536.0
