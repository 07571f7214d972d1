"""Receiver statistics: sequence tracking, loss, fraction lost and jitter (RFC 3550 A.1/A.3/A.8)."""

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.media.rtcp import ReceiverReport, parse_compound, serialize_compound
from agent.media.stats import ReceiverStats

FRAME = 960
PERIOD = 0.02


def feed(stats: ReceiverStats, seqs: list[int], start: int = 0) -> None:
    """Packets with the given sequence numbers, timestamps and arrivals matching the seq."""
    for seq in seqs:
        offset = (seq - start) & 0xFFFF
        stats.update(seq, offset * FRAME, 10.0 + offset * PERIOD)


def test_in_order_stream() -> None:
    stats = ReceiverStats()
    feed(stats, list(range(100)))
    assert stats.packets_received == 100
    assert stats.packets_lost == 0
    assert stats.extended_highest_seq == 99
    assert stats.expected == 100
    block = stats.report_block(0xAB, lsr=0x1234, dlsr=0x10)
    assert (block.ssrc, block.lsr, block.dlsr) == (0xAB, 0x1234, 0x10)
    assert block.fraction_lost == 0
    assert block.packets_lost == 0
    assert block.highest_seq == 99
    assert stats.loss_fraction == 0.0


def test_losses_and_duplicates_over_two_intervals() -> None:
    stats = ReceiverStats()
    # Interval 1: 0..99 with 5 lost and 2 duplicated -> 97 received, net loss 3.
    seqs = [s for s in range(100) if s not in {10, 20, 30, 40, 50}]
    seqs += [60, 70]
    feed(stats, seqs)
    assert stats.packets_received == 97
    assert stats.packets_lost == 3
    block = stats.report_block(1, 0, 0)
    assert block.packets_lost == 3
    assert block.fraction_lost == 3 * 256 // 100  # 7
    assert stats.loss_fraction == pytest.approx(0.03)

    # Interval 2: 100..199 with 10 lost -> fraction 25 (10/100 * 256 = 25.6).
    feed(stats, [s for s in range(100, 200) if s % 10 != 5])
    block = stats.report_block(1, 0, 0)
    assert block.packets_lost == 13
    assert block.fraction_lost == 25
    assert block.highest_seq == 199
    assert stats.loss_fraction == pytest.approx(0.10)

    # Interval 3: only duplicates -> more received than expected, fraction clamps to 0.
    feed(stats, [198, 199, 199])
    block = stats.report_block(1, 0, 0)
    assert block.fraction_lost == 0
    assert block.packets_lost == 10
    assert stats.loss_fraction == 0.0


def test_duplicates_make_cumulative_loss_negative() -> None:
    stats = ReceiverStats()
    feed(stats, [0, 1, 2, 2, 2])
    assert stats.packets_lost == -2
    assert stats.report_block(1, 0, 0).packets_lost == -2


def test_reordering_is_not_loss() -> None:
    stats = ReceiverStats()
    feed(stats, [0, 1, 3, 2, 4, 6, 5])
    assert stats.packets_lost == 0
    assert stats.extended_highest_seq == 6


def test_sequence_wrap() -> None:
    stats = ReceiverStats()
    seqs = [65530, 65531, 65532, 65533, 65535, 0, 1, 2]  # 65534 lost
    feed(stats, seqs, start=65530)
    assert stats.extended_highest_seq == 65536 + 2
    assert stats.expected == 9
    assert stats.packets_lost == 1
    # Late 65534 arrives after the wrap: counted, highest unchanged.
    feed(stats, [65534], start=65530)
    assert stats.packets_lost == 0
    assert stats.extended_highest_seq == 65538
    # Many cycles: the extended highest sequence grows monotonically.
    feed(stats, [(65538 + 1000 * k) & 0xFFFF for k in range(1, 201)], start=65530)
    assert stats.extended_highest_seq == 65538 + 200_000
    block = stats.report_block(1, 0, 0)
    assert block.highest_seq == stats.extended_highest_seq


def test_single_stray_jump_is_discarded() -> None:
    stats = ReceiverStats()
    feed(stats, list(range(10)))
    assert stats.update(40000, 0, 11.0) is False
    feed(stats, [10, 11])
    assert stats.packets_received == 12
    assert stats.extended_highest_seq == 11
    assert stats.packets_lost == 0


def test_restart_after_two_sequential_packets() -> None:
    stats = ReceiverStats()
    feed(stats, list(range(10)))
    stats.report_block(1, 0, 0)
    assert stats.update(20000, 5_000_000, 11.0) is False
    assert stats.update(20001, 5_000_960, 11.02) is True
    assert stats.update(20002, 5_001_920, 11.04) is True
    assert stats.packets_received == 2
    assert stats.extended_highest_seq == 20002
    assert stats.packets_lost == 0
    assert stats.report_block(1, 0, 0).fraction_lost == 0
    # The timestamp jump at the restart does not pollute the jitter estimate.
    assert stats.jitter == pytest.approx(0.0, abs=1e-6)


def test_jump_backwards_beyond_misorder_is_discarded() -> None:
    stats = ReceiverStats()
    feed(stats, list(range(200)))
    assert stats.update(50, 50 * FRAME, 20.0) is False  # 150 behind > MAX_MISORDER
    assert stats.update(150, 150 * FRAME, 20.0) is True  # 50 behind: a late packet
    assert stats.packets_received == 201
    assert stats.extended_highest_seq == 199


def test_jump_forward_within_dropout_counts_as_loss() -> None:
    stats = ReceiverStats()
    feed(stats, [0, 1, 2, 2999])
    assert stats.packets_lost == 2996
    assert stats.update(6000, 0, 99.0) is False


def test_cumulative_loss_clamps_to_24_bits() -> None:
    stats = ReceiverStats()
    seq = 0
    for _ in range(2800):  # 2800 * 2998 lost > 0x7FFFFF
        stats.update(seq, 0, 0.0)
        seq = (seq + 2999) & 0xFFFF
    assert stats.expected - stats.packets_received > 0x7FFFFF
    assert stats.packets_lost == 0x7FFFFF
    block = stats.report_block(1, 0, 0)
    assert block.packets_lost == 0x7FFFFF
    assert block.fraction_lost == 255
    assert parse_compound(serialize_compound([ReceiverReport(2, (block,))])) == [
        ReceiverReport(2, (block,))
    ]


def test_report_before_any_packet_is_all_zero() -> None:
    stats = ReceiverStats()
    block = stats.report_block(5, 0, 0)
    assert (block.fraction_lost, block.packets_lost, block.highest_seq, block.jitter) == (0,) * 4
    assert stats.packets_received == 0
    assert stats.packets_lost == 0


def test_constant_delay_has_zero_jitter_across_timestamp_wrap() -> None:
    stats = ReceiverStats()
    ts0 = 0xFFFFFFFF - 5 * FRAME
    for i in range(20):
        stats.update(i, (ts0 + i * FRAME) & 0xFFFFFFFF, 3.0 + i * PERIOD + 0.150)
    assert stats.jitter == pytest.approx(0.0, abs=1e-6)


def test_alternating_delay_converges_to_known_jitter() -> None:
    # Network delay alternates 20 ms / 30 ms, so every |D| is 10 ms = 480 timestamp units.
    stats = ReceiverStats(48_000)
    stats.update(0, 0, 0.020)
    stats.update(1, FRAME, PERIOD + 0.030)
    assert stats.jitter == pytest.approx(480 / 16)
    stats.update(2, 2 * FRAME, 2 * PERIOD + 0.020)
    assert stats.jitter == pytest.approx(480 / 16 + (480 - 480 / 16) / 16)
    for i in range(3, 500):
        stats.update(i, i * FRAME, i * PERIOD + (0.030 if i % 2 else 0.020))
    assert stats.jitter == pytest.approx(480.0)
    assert stats.jitter_ms == pytest.approx(10.0)
    assert stats.report_block(1, 0, 0).jitter in (479, 480)


def test_jitter_units_follow_the_clock_rate() -> None:
    stats = ReceiverStats(8000)
    for i in range(400):
        stats.update(i, i * 160, i * PERIOD + (0.030 if i % 2 else 0.020))
    assert stats.jitter == pytest.approx(80.0)
    assert stats.jitter_ms == pytest.approx(10.0)


def test_random_delay_jitter_matches_theory() -> None:
    # With i.i.d. delays uniform on [0, a], E|D| = a / 3, which J tracks on average.
    rng = random.Random(1234)
    stats = ReceiverStats()
    samples = []
    for i in range(20_000):
        stats.update(i & 0xFFFF, i * FRAME, i * PERIOD + rng.uniform(0.0, 0.030))
        if i > 1000:
            samples.append(stats.jitter_ms)
    assert sum(samples) / len(samples) == pytest.approx(10.0, rel=0.05)


def test_rejects_bad_clock_rate() -> None:
    with pytest.raises(ValueError, match="clock rate"):
        ReceiverStats(0)


@given(
    st.lists(
        st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.floats(0, 1e6)),
        max_size=60,
    ),
    st.lists(st.integers(1, 60), max_size=3),
)
def test_arbitrary_input_gives_serialisable_reports(
    packets: list[tuple[int, int, float]], report_points: list[int]
) -> None:
    stats = ReceiverStats()
    for i, (seq, ts, arrival) in enumerate(packets):
        stats.update(seq, ts, arrival)
        if i in report_points:
            stats.report_block(1, 0, 0)
    block = stats.report_block(3, 4, 5)
    assert 0 <= stats.loss_fraction <= 1
    assert stats.jitter >= 0
    assert stats.packets_received <= len(packets)
    assert parse_compound(serialize_compound([ReceiverReport(2, (block,))])) == [
        ReceiverReport(2, (block,))
    ]


@given(st.integers(0, 0xFFFF), st.lists(st.booleans(), min_size=1, max_size=300))
def test_loss_counts_match_dropped_packets(start: int, delivered: list[bool]) -> None:
    delivered[0] = True
    delivered[-1] = True
    stats = ReceiverStats()
    for i, ok in enumerate(delivered):
        if ok:
            stats.update((start + i) & 0xFFFF, i * FRAME, i * PERIOD)
    lost = delivered.count(False)
    assert stats.packets_lost == lost
    assert stats.extended_highest_seq - start == len(delivered) - 1
    assert stats.report_block(1, 0, 0).fraction_lost == lost * 256 // len(delivered)
