"""RFC 2198 redundant audio (RED) as browsers use it for Opus: same-PT blocks, oldest first."""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

OPUS_PAYLOAD_TYPE = 111
MAX_TIMESTAMP_OFFSET = (1 << 14) - 1
MAX_BLOCK_LENGTH = (1 << 10) - 1
MAX_DISTANCE = 5
MAX_REACH = 16
"""Deepest frame a packet may repeat: 16 frames of 20 ms fit the 14-bit timestamp offset."""

# Redundant block header: F=1, PT (7), timestamp offset (14), block length (10).
_BLOCK_HEADER = struct.Struct("!I")
_PRIMARY_HEADERS = tuple(bytes((pt,)) for pt in range(0x80))  # F=0 and the payload type
_TS_MASK = 0xFFFFFFFF


class RedError(ValueError):
    """Raised for RED payloads that cannot be parsed or blocks that cannot be encoded."""


@dataclass(frozen=True, slots=True)
class RedBlock:
    payload_type: int
    timestamp_offset: int  # how far before the RTP packet's timestamp this block starts
    payload: bytes


def encode_red(primary_pt: int, primary: bytes, redundant: Sequence[tuple[int, bytes]]) -> bytes:
    """Build a RED payload: redundant (offset, payload) blocks oldest first, then the primary.

    Redundant blocks use primary_pt. Blocks whose offset or length does not fit the
    14/10-bit header fields are left out, as libwebrtc does.
    """
    if not 0 <= primary_pt <= 0x7F:
        raise RedError(f"payload type {primary_pt} out of range 0..127")
    parts = []
    blocks = []
    block_flag = (0x80 | primary_pt) << 24
    for offset, payload in redundant:
        if offset < 0:
            raise RedError(f"negative timestamp offset {offset}")
        length = len(payload)
        if offset > MAX_TIMESTAMP_OFFSET or length > MAX_BLOCK_LENGTH:
            continue
        parts.append(_BLOCK_HEADER.pack(block_flag | (offset << 10) | length))
        blocks.append(payload)
    parts.append(_PRIMARY_HEADERS[primary_pt])
    parts += blocks
    parts.append(primary)
    return b"".join(parts)


def split_red(data: bytes) -> list[tuple[int, int, bytes]]:
    """``(payload_type, timestamp_offset, payload)`` of each block of a RED payload, oldest
    first, the primary last with offset 0: ``decode_red`` without building ``RedBlock``s
    (the media path splits 50 payloads a second)."""
    size = len(data)
    headers: list[tuple[int, int, int]] = []
    offset = 0
    while True:
        if offset >= size:
            raise RedError("RED payload truncated inside the block headers")
        if not data[offset] & 0x80:
            primary_pt = data[offset]
            offset += 1
            break
        if size - offset < _BLOCK_HEADER.size:
            raise RedError("RED payload truncated inside a redundant block header")
        (word,) = _BLOCK_HEADER.unpack_from(data, offset)
        offset += _BLOCK_HEADER.size
        headers.append(((word >> 24) & 0x7F, (word >> 10) & MAX_TIMESTAMP_OFFSET, word & 0x3FF))
    result = []
    for payload_type, ts_offset, length in headers:
        end = offset + length
        if end > size:
            raise RedError(f"RED block of {length} bytes overruns the {size}-byte payload")
        result.append((payload_type, ts_offset, data[offset:end]))
        offset = end
    result.append((primary_pt, 0, data[offset:]))
    return result


def decode_red(data: bytes) -> list[RedBlock]:
    """Split a RED payload into blocks, oldest first; the primary comes last with offset 0."""
    return [RedBlock(pt, offset, bytes(payload)) for pt, offset, payload in split_red(data)]


def spread_offsets(distance: int, reach: int) -> tuple[int, ...]:
    """Which earlier frames (1: the one before) each packet repeats, oldest first: ``distance``
    of them from 1 out to ``reach`` in geometric steps (8, 5, 3, 2, 1 for five reaching 8).

    A frame is lost only with its own packet and every packet that repeats it. One burst of
    loss thus loses no frame if it is at most ``reach`` packets long; contiguous copies
    (``reach == distance``) cover bursts up to ``distance`` for the same bandwidth. With a
    mean burst of 3 at 10 % loss, five copies out to 8 leave 0.44 % of frames unrecovered,
    contiguous ones 1.33 %; the receiver pays by waiting ``reach`` frames for the copies.
    """
    if not 0 <= distance <= MAX_DISTANCE:
        raise ValueError(f"RED distance {distance} out of range 0..{MAX_DISTANCE}")
    if not distance <= reach <= MAX_REACH:
        raise ValueError(f"RED reach {reach} out of range {distance}..{MAX_REACH}")
    offsets: list[int] = []
    for i in range(distance):
        step = round(reach ** (i / (distance - 1))) if distance > 1 else 1
        offsets.append(max(step, offsets[-1] + 1 if offsets else 1))
    return tuple(reversed(offsets))


class RedEncoder:
    """Produces the RED payload for each new frame, repeating ``distance`` earlier frames
    that reach back ``reach`` frames (``spread_offsets``)."""

    __slots__ = ("_history", "_offsets", "_payload_type")

    def __init__(
        self,
        distance: int = 2,
        *,
        reach: int | None = None,
        payload_type: int = OPUS_PAYLOAD_TYPE,
    ) -> None:
        if not 0 <= payload_type <= 0x7F:
            raise ValueError(f"payload type {payload_type} out of range 0..127")
        self._payload_type = payload_type
        self._offsets = spread_offsets(distance, distance if reach is None else reach)
        self._history: deque[tuple[int, bytes]] = deque(maxlen=self.reach)

    @property
    def distance(self) -> int:
        return len(self._offsets)

    @property
    def reach(self) -> int:
        return self._offsets[0] if self._offsets else 0

    def set_distance(self, distance: int, reach: int | None = None) -> None:
        """Repeat ``distance`` earlier frames out to ``reach`` (default: the ``distance``
        newest) from now on; the frames already sent are kept."""
        offsets = spread_offsets(distance, distance if reach is None else reach)
        if offsets != self._offsets:
            self._offsets = offsets
            self._history = deque(self._history, maxlen=self.reach)

    def encode(self, timestamp: int, payload: bytes) -> bytes:
        """RED payload for the frame at RTP `timestamp` (the RTP packet carries this timestamp)."""
        redundant = []
        history = self._history
        kept = len(history)
        for back in self._offsets:
            if back > kept:
                continue
            old_timestamp, old_payload = history[kept - back]
            # Older frames have offsets in 1..16383; a timestamp jump backwards wraps to a
            # huge offset and is dropped, as are DTX frames that carry nothing worth repeating.
            ts_offset = (timestamp - old_timestamp) & _TS_MASK
            if old_payload and 0 < ts_offset <= MAX_TIMESTAMP_OFFSET:
                redundant.append((ts_offset, old_payload))
        self._history.append((timestamp & _TS_MASK, payload))
        return encode_red(self._payload_type, payload, redundant)
