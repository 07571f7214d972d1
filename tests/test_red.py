"""RFC 2198 RED encoding/decoding and the per-frame RedEncoder."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.media.red import (
    MAX_DISTANCE,
    MAX_REACH,
    RedBlock,
    RedEncoder,
    RedError,
    decode_red,
    encode_red,
    split_red,
    spread_offsets,
)


def test_no_redundancy_is_a_one_byte_header() -> None:
    data = encode_red(111, b"abc", [])
    assert data == b"\x6f" + b"abc"  # F=0, PT=111
    assert decode_red(data) == [RedBlock(111, 0, b"abc")]


def test_one_redundant_block_built_by_hand() -> None:
    data = encode_red(111, b"primary", [(960, b"xy")])
    # F=1 PT=111 -> 0xEF; offset 960 (0x3C0) << 10 | length 2 -> 0x0F0002.
    assert data == bytes([0xEF, 0x0F, 0x00, 0x02, 0x6F]) + b"xy" + b"primary"
    assert decode_red(data) == [RedBlock(111, 960, b"xy"), RedBlock(111, 0, b"primary")]


def test_two_redundant_blocks_oldest_first() -> None:
    data = encode_red(111, b"P", [(1920, b"old"), (960, b"mid!")])
    # 1920 << 10 | 3 -> 0x1E0003; 960 << 10 | 4 -> 0x0F0004.
    expected = bytes([0xEF, 0x1E, 0x00, 0x03, 0xEF, 0x0F, 0x00, 0x04, 0x6F]) + b"oldmid!P"
    assert data == expected
    assert decode_red(data) == [
        RedBlock(111, 1920, b"old"),
        RedBlock(111, 960, b"mid!"),
        RedBlock(111, 0, b"P"),
    ]


def test_field_limits() -> None:
    data = encode_red(111, b"p", [(16383, bytes(1023))])
    assert data[:4] == bytes([0xEF, 0xFF, 0xFF, 0xFF])
    assert decode_red(data)[0] == RedBlock(111, 16383, bytes(1023))


def test_oversize_blocks_are_left_out() -> None:
    data = encode_red(
        111,
        b"p",
        [(2880, bytes(1024)), (16384, b"far"), (1920, b"keep"), (960, bytes(2000))],
    )
    assert decode_red(data) == [RedBlock(111, 1920, b"keep"), RedBlock(111, 0, b"p")]


def test_primary_may_exceed_block_length_limit_and_be_empty() -> None:
    big = bytes(range(256)) * 5
    assert decode_red(encode_red(111, big, [(960, b"r")]))[-1] == RedBlock(111, 0, big)
    assert decode_red(b"\x6f") == [RedBlock(111, 0, b"")]


def test_decode_keeps_block_payload_types() -> None:
    data = bytes([0x80 | 0, 0x00, 0x04, 0x01, 0x08]) + b"a" + b"pcma"
    assert decode_red(data) == [RedBlock(0, 1, b"a"), RedBlock(8, 0, b"pcma")]


def test_encode_rejects_bad_arguments() -> None:
    with pytest.raises(RedError, match="payload type"):
        encode_red(128, b"", [])
    with pytest.raises(RedError, match="negative"):
        encode_red(111, b"", [(-960, b"x")])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "block headers"),
        (b"\xef", "redundant block header"),
        (b"\xef\x0f\x00", "redundant block header"),
        (b"\xef\x0f\x00\x02", "block headers"),
        (b"\xef\x0f\x00\x02\x6f" + b"x", "overruns"),
        (b"\xef\x0f\x00\x01\xef\x0f\x00\x01\x6f" + b"x", "overruns"),
    ],
)
def test_decode_rejects_malformed(data: bytes, message: str) -> None:
    with pytest.raises(RedError, match=message):
        decode_red(data)


def _offsets(data: bytes) -> list[tuple[int, bytes]]:
    return [(b.timestamp_offset, b.payload) for b in decode_red(data)]


def test_encoder_distance_two() -> None:
    enc = RedEncoder()
    assert _offsets(enc.encode(0, b"f0")) == [(0, b"f0")]
    assert _offsets(enc.encode(960, b"f1")) == [(960, b"f0"), (0, b"f1")]
    assert _offsets(enc.encode(1920, b"f2")) == [(1920, b"f0"), (960, b"f1"), (0, b"f2")]
    assert _offsets(enc.encode(2880, b"f3")) == [(1920, b"f1"), (960, b"f2"), (0, b"f3")]
    assert all(b.payload_type == 111 for b in decode_red(enc.encode(3840, b"f4")))


def test_encoder_skips_dtx_frames() -> None:
    enc = RedEncoder(2)
    enc.encode(0, b"f0")
    enc.encode(960, b"")
    assert _offsets(enc.encode(1920, b"f2")) == [(1920, b"f0"), (0, b"f2")]
    assert _offsets(enc.encode(2880, b"")) == [(960, b"f2"), (0, b"")]


def test_encoder_timestamp_wrap() -> None:
    enc = RedEncoder(2)
    enc.encode(0xFFFFFFFF - 959 - 960, b"a")
    enc.encode(0xFFFFFFFF - 959, b"b")
    assert _offsets(enc.encode(0, b"c")) == [(1920, b"a"), (960, b"b"), (0, b"c")]


def test_encoder_leaves_out_frames_outside_the_offset_range() -> None:
    enc = RedEncoder(2)
    enc.encode(1000, b"a")
    enc.encode(1000 + 16383, b"b")
    # "a" is now 16384 + 960 behind, "b" 960 behind.
    assert _offsets(enc.encode(1000 + 16383 + 960, b"c")) == [(960, b"b"), (0, b"c")]
    # A timestamp going backwards (sender reset) must not produce redundancy.
    assert _offsets(enc.encode(0, b"d")) == [(0, b"d")]
    # Nor must a repeated timestamp.
    assert _offsets(enc.encode(0, b"e")) == [(0, b"e")]


def test_encoder_leaves_out_oversize_frames() -> None:
    enc = RedEncoder(1)
    enc.encode(0, bytes(1024))
    assert _offsets(enc.encode(960, b"x")) == [(0, b"x")]


def test_encoder_distance_zero_and_three() -> None:
    enc0 = RedEncoder(0)
    enc0.encode(0, b"a")
    assert enc0.encode(960, b"b") == b"\x6fb"
    enc3 = RedEncoder(3, payload_type=100)
    for i in range(5):
        out = enc3.encode(960 * i, bytes([i]))
    assert decode_red(out) == [
        RedBlock(100, 2880, b"\x01"),
        RedBlock(100, 1920, b"\x02"),
        RedBlock(100, 960, b"\x03"),
        RedBlock(100, 0, b"\x04"),
    ]


def test_encoder_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="distance"):
        RedEncoder(MAX_DISTANCE + 1)
    with pytest.raises(ValueError, match="distance"):
        RedEncoder(-1)
    with pytest.raises(ValueError, match="payload type"):
        RedEncoder(2, payload_type=128)


redundant_blocks = st.lists(st.tuples(st.integers(0, 20000), st.binary(max_size=1100)), max_size=4)


@given(st.integers(0, 127), st.binary(max_size=1500), redundant_blocks)
def test_round_trip(pt: int, primary: bytes, redundant: list[tuple[int, bytes]]) -> None:
    kept = [(o, p) for o, p in redundant if o <= 16383 and len(p) <= 1023]
    expected = [RedBlock(pt, o, p) for o, p in kept] + [RedBlock(pt, 0, primary)]
    assert decode_red(encode_red(pt, primary, redundant)) == expected


@given(
    st.integers(0, 3),
    st.integers(0, 4),
    st.integers(0, 0xFFFFFFFF),
    st.lists(st.tuples(st.integers(1, 3000), st.binary(max_size=20)), min_size=1, max_size=8),
)
def test_encoder_blocks_reconstruct_their_timestamps(
    distance: int, further: int, start: int, frames: list[tuple[int, bytes]]
) -> None:
    enc = RedEncoder(distance, reach=distance + further)
    sent: dict[int, bytes] = {}
    ts = start
    for step, payload in frames:
        ts = (ts + step) & 0xFFFFFFFF
        blocks = decode_red(enc.encode(ts, payload))
        assert blocks[-1] == RedBlock(111, 0, payload)
        assert len(blocks) <= distance + 1
        for block in blocks[:-1]:
            assert 0 < block.timestamp_offset <= 16383
            assert block.payload
            assert sent[(ts - block.timestamp_offset) & 0xFFFFFFFF] == block.payload
        sent[ts] = payload


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_red_error(data: bytes) -> None:
    try:
        blocks = decode_red(data)
    except RedError:
        with pytest.raises(RedError):
            split_red(data)
        return
    assert [RedBlock(*block) for block in split_red(data)] == blocks
    assert sum(len(b.payload) for b in blocks) + 4 * (len(blocks) - 1) + 1 == len(data)
    assert blocks[-1].timestamp_offset == 0


def test_encoder_distance_can_change_mid_stream() -> None:
    enc = RedEncoder(1)
    for n in range(3):
        enc.encode(n * 960, bytes([n + 1]) * 10)
    enc.set_distance(3)
    assert enc.distance == 3
    blocks = decode_red(enc.encode(3 * 960, b"\x04" * 10))
    assert [b.timestamp_offset for b in blocks] == [960, 0]  # only the kept frame so far
    blocks = decode_red(enc.encode(4 * 960, b"\x05" * 10))
    assert [b.timestamp_offset for b in blocks] == [1920, 960, 0]
    enc.set_distance(1)
    assert [b.timestamp_offset for b in decode_red(enc.encode(5 * 960, b"\x06" * 10))] == [960, 0]
    with pytest.raises(ValueError):
        enc.set_distance(MAX_DISTANCE + 1)


def test_spread_offsets_reach_out_in_geometric_steps() -> None:
    assert spread_offsets(5, 8) == (8, 5, 3, 2, 1)
    assert spread_offsets(5, 5) == (5, 4, 3, 2, 1)  # contiguous, as browsers send
    assert spread_offsets(3, 8) == (8, 3, 1)
    assert spread_offsets(1, 1) == (1,)
    assert spread_offsets(0, 0) == ()
    with pytest.raises(ValueError, match="reach"):
        spread_offsets(5, 4)
    with pytest.raises(ValueError, match="reach"):
        spread_offsets(5, MAX_REACH + 1)


def _unrecovered(enc: RedEncoder, lost: range, frames: int = 40) -> list[int]:
    """Frames of which no copy arrives when the packets in ``lost`` are lost."""
    got: set[int] = set()
    for n in range(frames):
        payload = enc.encode(960 * n, n.to_bytes(2, "big"))
        if n not in lost:
            got.update(int.from_bytes(b.payload, "big") for b in decode_red(payload))
    return [n for n in range(frames) if n not in got]


def test_a_burst_as_long_as_the_reach_loses_no_frame() -> None:
    assert _unrecovered(RedEncoder(5, reach=8), range(10, 18)) == []
    # The same five copies side by side lose the burst's first three frames.
    assert _unrecovered(RedEncoder(5), range(10, 18)) == [10, 11, 12]
    # One packet more than the reach: only the burst's first frame is gone.
    assert _unrecovered(RedEncoder(5, reach=8), range(10, 19)) == [10]


def test_reach_can_change_mid_stream() -> None:
    enc = RedEncoder(2)
    for n in range(10):
        enc.encode(n * 960, bytes([n + 1]) * 10)
    enc.set_distance(5, 8)
    assert (enc.distance, enc.reach) == (5, 8)
    offsets = [b.timestamp_offset // 960 for b in decode_red(enc.encode(10 * 960, b"x"))]
    assert offsets == [2, 1, 0]  # only the two frames kept so far
    for n in range(11, 19):
        blocks = decode_red(enc.encode(n * 960, b"x"))
    assert [b.timestamp_offset // 960 for b in blocks] == [8, 5, 3, 2, 1, 0]
    enc.set_distance(2)
    assert (enc.distance, enc.reach) == (2, 2)
    blocks = decode_red(enc.encode(19 * 960, b"y"))
    assert [b.timestamp_offset // 960 for b in blocks] == [2, 1, 0]
