"""RTP packets (RFC 3550 section 5), RTP/RTCP demux (RFC 5761) and counter arithmetic."""

from __future__ import annotations

import struct
from dataclasses import dataclass

RTP_VERSION = 2
HEADER_SIZE = 12
MAX_CSRCS = 15

_HEADER = struct.Struct("!BBHII")
_EXT_HEADER = struct.Struct("!HH")
# One precompiled unpacker per CSRC count so parsing never builds a format string.
_CSRC_LISTS = tuple(struct.Struct(f"!{n}I") for n in range(MAX_CSRCS + 1))

_SEQ_MOD = 1 << 16
_SEQ_MASK = _SEQ_MOD - 1
_SEQ_HALF = _SEQ_MOD >> 1


class RtpError(ValueError):
    """Raised for RTP bytes that cannot be parsed or fields that cannot be serialised."""


@dataclass(frozen=True, slots=True)
class RtpPacket:
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes
    marker: bool = False
    csrcs: tuple[int, ...] = ()
    # None means no header extension; the profile is the 16-bit "defined by profile" field.
    extension_profile: int | None = None
    # Extension body without its 4-byte header; a multiple of 4 bytes long.
    extension: bytes = b""

    def to_bytes(self) -> bytes:
        """Serialise without padding (SRTP and our transports never need it)."""
        if not 0 <= self.payload_type <= 0x7F:
            raise RtpError(f"payload type {self.payload_type} out of range 0..127")
        ncsrc = len(self.csrcs)
        if ncsrc > MAX_CSRCS:
            raise RtpError(f"{ncsrc} CSRCs, at most {MAX_CSRCS} fit in the header")
        first = (RTP_VERSION << 6) | ncsrc
        if self.extension_profile is not None:
            first |= 0x10
        elif self.extension:
            raise RtpError("extension data given without extension_profile")
        second = (0x80 if self.marker else 0) | self.payload_type
        try:
            header = _HEADER.pack(first, second, self.sequence, self.timestamp, self.ssrc)
            if not ncsrc and self.extension_profile is None:
                return header + self.payload
            parts = [header]
            if ncsrc:
                parts.append(_CSRC_LISTS[ncsrc].pack(*self.csrcs))
            if self.extension_profile is not None:
                words, rest = divmod(len(self.extension), 4)
                if rest:
                    raise RtpError(f"extension length {len(self.extension)} is not a multiple of 4")
                parts.append(_EXT_HEADER.pack(self.extension_profile, words))
                parts.append(self.extension)
        except struct.error as exc:
            raise RtpError(f"RTP field out of range: {exc}") from exc
        parts.append(self.payload)
        return b"".join(parts)

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        """Parse one RTP packet, stripping any padding."""
        first, second, sequence, timestamp, ssrc, offset, end = _layout(data)
        ncsrc = first & 0x0F
        csrcs: tuple[int, ...] = _CSRC_LISTS[ncsrc].unpack_from(data, HEADER_SIZE) if ncsrc else ()
        extension_profile: int | None = None
        extension = b""
        if first & 0x10:
            at = HEADER_SIZE + 4 * ncsrc
            extension_profile, words = _EXT_HEADER.unpack_from(data, at)
            extension = bytes(data[at + 4 : at + 4 + 4 * words])
        return cls(
            payload_type=second & 0x7F,
            sequence=sequence,
            timestamp=timestamp,
            ssrc=ssrc,
            payload=bytes(data[offset:end]),
            marker=bool(second & 0x80),
            csrcs=csrcs,
            extension_profile=extension_profile,
            extension=extension,
        )


def _layout(data: bytes) -> tuple[int, int, int, int, int, int, int]:
    """Check an RTP packet's layout: its first two bytes, sequence number, timestamp, SSRC,
    and where the payload starts and ends (after CSRCs and extension, before padding)."""
    size = len(data)
    if size < HEADER_SIZE:
        raise RtpError(f"RTP packet too short: {size} bytes, header needs {HEADER_SIZE}")
    first, second, sequence, timestamp, ssrc = _HEADER.unpack_from(data)
    if first >> 6 != RTP_VERSION:
        raise RtpError(f"RTP version {first >> 6}, expected {RTP_VERSION}")
    ncsrc = first & 0x0F
    offset = HEADER_SIZE + 4 * ncsrc
    if size < offset:
        raise RtpError(f"RTP packet of {size} bytes truncated inside {ncsrc} CSRCs")
    if first & 0x10:
        if size < offset + 4:
            raise RtpError("RTP packet truncated inside the header extension header")
        _, words = _EXT_HEADER.unpack_from(data, offset)
        offset += 4 + 4 * words
        if size < offset:
            raise RtpError(
                f"RTP header extension of {4 * words} bytes overruns the {size}-byte packet"
            )
    end = size
    if first & 0x20:
        if end == offset:
            raise RtpError("RTP padding bit set but no padding byte")
        padding = data[-1]
        if padding == 0 or padding > end - offset:
            raise RtpError(f"RTP padding count {padding} invalid for {end - offset} bytes")
        end -= padding
    return first, second, sequence, timestamp, ssrc, offset, end


def parse_media(data: bytes) -> tuple[int, int, int, int, bytes]:
    """``(payload_type, sequence, timestamp, ssrc, payload)`` of one RTP packet.

    The fields the media path reads, checked as ``RtpPacket.parse`` checks them, without
    building the ``RtpPacket`` (50 of them a second, each a frozen dataclass of nine fields).
    """
    _, second, sequence, timestamp, ssrc, offset, end = _layout(data)
    return second & 0x7F, sequence, timestamp, ssrc, data[offset:end]


def pack_media(
    payload_type: int, sequence: int, timestamp: int, ssrc: int, payload: bytes
) -> bytes:
    """The bytes of an RTP packet with no marker, CSRCs, extension or padding: what the media
    path sends, equal to ``RtpPacket(...).to_bytes()`` without building the ``RtpPacket``."""
    if not 0 <= payload_type <= 0x7F:
        raise RtpError(f"payload type {payload_type} out of range 0..127")
    try:
        return _HEADER.pack(RTP_VERSION << 6, payload_type, sequence, timestamp, ssrc) + payload
    except struct.error as exc:
        raise RtpError(f"RTP field out of range: {exc}") from exc


def is_rtcp(data: bytes) -> bool:
    """RFC 5761 section 4: with RTP and RTCP on one port, RTCP has packet type 192..223."""
    return len(data) >= 2 and 192 <= data[1] <= 223


def seq_diff(a: int, b: int) -> int:
    """Signed distance a - b between 16-bit sequence numbers, in -32768..32767."""
    return ((a - b + _SEQ_HALF) & _SEQ_MASK) - _SEQ_HALF


def seq_gt(a: int, b: int) -> bool:
    """True when sequence number a is newer than b (modulo 2**16)."""
    return 0 < ((a - b) & _SEQ_MASK) < _SEQ_HALF


class Unwrapper:
    """Extends a wrapping N-bit counter (RTP seq: 16, RTP timestamp: 32) to an unbounded int.

    Each value is placed at the shortest signed distance from the previous one, so
    reordering across the wrap point maps back correctly. Values older than the first
    one seen map below it and can be negative.
    """

    __slots__ = ("_half", "_last", "_mask")

    def __init__(self, bits: int) -> None:
        if bits < 2:
            raise ValueError(f"counter width must be at least 2 bits, got {bits}")
        self._mask = (1 << bits) - 1
        self._half = 1 << (bits - 1)
        self._last: int | None = None

    def unwrap(self, value: int) -> int:
        if not 0 <= value <= self._mask:
            bits = self._mask.bit_length()
            raise ValueError(f"value {value} out of range for a {bits}-bit counter")
        last = self._last
        if last is None:
            self._last = value
            return value
        unwrapped = last + (((value - last + self._half) & self._mask) - self._half)
        self._last = unwrapped
        return unwrapped
