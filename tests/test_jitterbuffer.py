"""Jitter buffer behaviour on simulated time: ordering, loss, jumps, jitter and clock drift."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.media.jitterbuffer import (
    JitterBuffer,
    JitterConfig,
    JitterStats,
    Playout,
    PlayoutKind,
    PushResult,
)

FRAME = 0.020
SAMPLES = 960
NORMAL, FEC, PLC, WAIT = PlayoutKind.NORMAL, PlayoutKind.FEC, PlayoutKind.PLC, PlayoutKind.WAIT


def speech(k: int) -> bytes:
    """A speech-sized payload that names its frame."""
    return k.to_bytes(4, "big") * 20


def silence(k: int) -> bytes:
    """A DTX-sized payload that names its frame (modulo 256)."""
    return bytes((1, k % 256))


def frame_of(payload: bytes | None) -> int:
    assert payload is not None and len(payload) == 80
    return int.from_bytes(payload[:4], "big")


@dataclass(frozen=True, slots=True)
class Packet:
    arrival: float
    frame: int
    payload: bytes
    redundant: bool = False
    ts0: int = 0

    @property
    def timestamp(self) -> int:
        return (self.ts0 + self.frame * SAMPLES) % 2**32


@dataclass(slots=True)
class Trace:
    outs: list[Playout] = field(default_factory=list)
    pushes: list[PushResult] = field(default_factory=list)
    targets: list[float] = field(default_factory=list)
    buffered: list[float] = field(default_factory=list)

    def kinds(self) -> list[PlayoutKind]:
        return [o.kind for o in self.outs]

    def played_frames(self) -> list[int]:
        return [frame_of(o.payload) for o in self.outs if o.kind is NORMAL]


def simulate(jb: JitterBuffer, packets: Iterable[Packet], pop_times: Iterable[float]) -> Trace:
    """Push every packet that has arrived by each pop time, then pop."""
    queue = sorted(packets, key=lambda p: p.arrival)
    trace = Trace()
    i = 0
    for t in pop_times:
        while i < len(queue) and queue[i].arrival <= t:
            p = queue[i]
            trace.pushes.append(jb.push(p.timestamp, p.payload, p.arrival, redundant=p.redundant))
            i += 1
        stats = jb.stats  # as the pop sees it
        trace.buffered.append(stats.buffered_ms)
        trace.targets.append(stats.target_delay_ms)
        trace.outs.append(jb.pop(t))
    return trace


def steady(frames: int, delay: float = 0.030, ts0: int = 0) -> list[Packet]:
    return [Packet(k * FRAME + delay, k, speech(k), ts0=ts0) for k in range(frames)]


def pops(count: int, phase: float = 0.037) -> list[float]:
    return [j * FRAME + phase for j in range(count)]


def assert_consistent(s: JitterStats) -> None:
    assert s.played + s.fec + s.plc + s.waits == s.pops
    assert s.underruns <= s.waits
    assert s.accepted + s.duplicates + s.late + s.too_far == s.pushed
    assert s.played + s.dropped_for_latency <= s.accepted
    assert s.resyncs <= s.accepted
    assert 20.0 <= s.target_delay_ms <= 400.0
    assert s.buffered_ms >= 0.0


def test_in_order_stream_plays_every_frame_at_minimum_target() -> None:
    jb = JitterBuffer()
    trace = simulate(jb, steady(500), pops(510))
    assert trace.played_frames() == list(range(500))
    assert set(trace.kinds()) == {NORMAL, WAIT}
    assert set(trace.targets) == {20.0}
    assert max(trace.buffered) <= 20.0
    s = jb.stats
    assert (s.fec, s.plc, s.late, s.duplicates, s.dropped_for_latency) == (0, 0, 0, 0, 0)
    assert_consistent(s)


def test_first_pops_wait_until_the_target_is_buffered() -> None:
    jb = JitterBuffer(JitterConfig(min_delay_ms=60))
    assert jb.pop(0.0).kind is WAIT
    for k in range(3):
        jb.push(k * SAMPLES, speech(k), 0.01 * k)
        kind = jb.pop(0.01 * k).kind
        assert kind is (NORMAL if k == 2 else WAIT)
    assert jb.stats.underruns == 0 and jb.stats.waits == 3


def test_swapped_pairs_still_play_in_order() -> None:
    packets = [
        Packet(k * FRAME + 0.030 + (0.021 if k % 2 == 0 else 0.0), k, speech(k)) for k in range(400)
    ]
    jb = JitterBuffer()
    trace = simulate(jb, packets, pops(420))
    assert trace.played_frames() == list(range(400))
    s = jb.stats
    assert (s.fec, s.plc, s.late) == (0, 0, 0)
    assert_consistent(s)


def test_duplicates_are_counted_and_played_once() -> None:
    packets = steady(200)
    # RED copies one and two packets later, and one original arriving after its copy.
    packets += [Packet(p.arrival + FRAME, p.frame, p.payload, redundant=True) for p in packets]
    packets += [Packet(p.arrival + 2 * FRAME, p.frame, p.payload, redundant=True) for p in packets]
    packets.append(Packet(100 * FRAME + 0.030 + 0.050, 100, speech(100)))
    jb = JitterBuffer()
    trace = simulate(jb, packets, pops(220))
    assert trace.played_frames() == list(range(200))
    s = jb.stats
    assert s.duplicates == 3 * 200 + 1
    assert s.late == 0
    assert_consistent(s)


def batch(jb: JitterBuffer, frames: Iterable[int], at: float = 0.0) -> None:
    for k in frames:
        assert jb.push(k * SAMPLES, speech(k), at) is PushResult.ACCEPTED


def test_single_loss_is_recovered_with_fec_from_the_next_frame() -> None:
    jb = JitterBuffer()
    batch(jb, [k for k in range(10) if k != 4])
    outs = [jb.pop(0.001 * j) for j in range(10)]
    assert [o.kind for o in outs] == [NORMAL] * 4 + [FEC] + [NORMAL] * 5
    assert frame_of(outs[4].payload) == 5
    assert [frame_of(o.payload) for o in outs if o.kind is NORMAL] == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert jb.stats.fec == 1 and jb.stats.plc == 0


def test_two_lost_in_a_row_are_concealed_then_recovered_with_fec() -> None:
    jb = JitterBuffer()
    batch(jb, [k for k in range(10) if k not in (4, 5)])
    outs = [jb.pop(0.001 * j) for j in range(10)]
    assert [o.kind for o in outs] == [NORMAL] * 4 + [PLC, FEC] + [NORMAL] * 4
    assert outs[4].payload is None
    assert frame_of(outs[5].payload) == 6
    assert (jb.stats.plc, jb.stats.fec, jb.stats.played) == (1, 1, 8)


def test_packet_for_a_played_slot_is_late_and_a_played_frame_duplicate() -> None:
    jb = JitterBuffer()
    batch(jb, [0, 1, 3, 4, 5])
    assert [jb.pop(0.0).kind for _ in range(4)] == [NORMAL, NORMAL, FEC, NORMAL]
    assert jb.push(2 * SAMPLES, speech(2), 0.1) is PushResult.LATE
    assert jb.push(1 * SAMPLES, speech(1), 0.1, redundant=True) is PushResult.DUPLICATE
    assert jb.push(4 * SAMPLES, speech(4), 0.1) is PushResult.DUPLICATE
    assert frame_of(jb.pop(0.1).payload) == 4
    s = jb.stats
    assert (s.late, s.duplicates, s.played) == (1, 2, 4)
    assert_consistent(s)


def test_timestamp_wrap_around_mid_stream() -> None:
    jb = JitterBuffer()
    trace = simulate(jb, steady(100, ts0=2**32 - 10 * SAMPLES), pops(110))
    assert trace.played_frames() == list(range(100))
    assert set(trace.pushes) == {PushResult.ACCEPTED}
    assert jb.stats.resyncs == 0


@pytest.mark.parametrize(
    ("jump", "dropped_as"),
    [
        (48_000 * 1000, PushResult.TOO_FAR),
        (-48_000 * 1000, PushResult.LATE),
        (3 * 2**30, PushResult.LATE),  # more than half the timestamp range: reads as backwards
    ],
)
def test_persistent_timestamp_jump_resyncs(jump: int, dropped_as: PushResult) -> None:
    before = steady(100)
    # The sender restarts 2 s of stream time later with its timestamps moved by `jump`.
    after = [
        Packet(k * FRAME + 0.030, k, speech(k), ts0=jump - 100 * SAMPLES) for k in range(100, 300)
    ]
    jb = JitterBuffer()
    trace = simulate(jb, before + after, pops(320))
    assert trace.pushes[100:103] == [dropped_as, dropped_as, PushResult.RESYNC]
    assert set(trace.pushes[103:]) == {PushResult.ACCEPTED}
    assert trace.played_frames() == list(range(100)) + list(range(102, 300))
    assert jb.stats.resyncs == 1
    assert_consistent(jb.stats)


def test_a_stray_packet_far_ahead_is_dropped_without_resync() -> None:
    packets = steady(200)
    packets.append(Packet(50 * FRAME + 0.031, 10_000, speech(10_000)))
    jb = JitterBuffer()
    trace = simulate(jb, packets, pops(210))
    assert trace.played_frames() == list(range(200))
    assert (jb.stats.too_far, jb.stats.resyncs) == (1, 0)


def test_dtx_gaps_do_not_add_latency_or_resync() -> None:
    # 2 s speech, 6 s of DTX (one tiny packet per 400 ms), 2 s speech.
    frames = [*range(100), *range(100, 400, 20), *range(400, 500)]
    packets = [
        Packet(k * FRAME + 0.030, k, speech(k) if k < 100 or k >= 400 else silence(k))
        for k in frames
    ]
    jb = JitterBuffer()
    trace = simulate(jb, packets, pops(510))
    played = [
        (t, o.payload) for t, o in zip(pops(510), trace.outs, strict=True) if o.kind is NORMAL
    ]
    assert len(played) == len(frames)
    # Every frame plays at the same distance behind its send time as before the DTX run.
    lags = {round(t - k * FRAME, 6) for (t, _), k in zip(played, frames, strict=True)}
    assert len(lags) == 1
    s = jb.stats
    assert (s.too_far, s.resyncs, s.fec, s.plc) == (0, 0, 0, 0)
    assert s.skipped == 15 * 19
    assert_consistent(s)


def jittered(frames: int, jitter: float, seed: int, start: int = 0) -> list[Packet]:
    rng = random.Random(seed)
    return [
        Packet(k * FRAME + 0.030 + rng.uniform(0.0, jitter), k, speech(k))
        for k in range(start, start + frames)
    ]


def test_jitter_raises_the_target_and_it_falls_back_when_jitter_stops() -> None:
    # 20 s with 0..60 ms random delay, then 20 s clean.
    packets = jittered(1000, 0.060, seed=7) + jittered(1000, 0.0, seed=7, start=1000)
    jb = JitterBuffer()
    trace = simulate(jb, packets, pops(2010))
    jittery_targets = trace.targets[250:1000]
    assert min(jittery_targets) >= 60.0
    s = jb.stats
    assert s.late <= 20  # 1 % of the jittered frames
    assert s.played >= 2000 - 25
    # The loss floor has expired, the window holds only clean arrivals and the extra
    # buffering has been dropped again.
    assert trace.targets[-1] == 20.0
    assert max(trace.buffered[1800:2000]) <= 40.0
    assert_consistent(s)


def test_redundant_copies_do_not_move_the_target() -> None:
    def run(redundant: bool) -> Trace:
        packets = steady(300)
        packets += [
            Packet(p.arrival + d * FRAME, p.frame, p.payload, redundant=redundant)
            for p in steady(300)
            for d in (1, 2)
        ]
        return simulate(JitterBuffer(), packets, pops(310))

    assert set(run(redundant=True).targets) == {20.0}
    # The same late arrivals as originals would read as jitter.
    assert max(run(redundant=False).targets) > 20.0


def test_recovery_floor_raises_the_target_after_a_loss_then_expires() -> None:
    packets = [p for p in steady(1000) if p.frame != 100]
    jb = JitterBuffer()
    jb.set_recovery_frames(2)
    trace = simulate(jb, packets, pops(1010))
    lost_at = trace.kinds().index(WAIT, 5)  # nothing buffered when frame 100 is due
    assert set(trace.targets[:lost_at]) == {20.0}
    assert trace.targets[lost_at + 5] == 60.0  # frame itself + two RED copies
    assert trace.targets[lost_at + 400] == 60.0
    assert trace.targets[-1] == 20.0  # 10 s after the loss
    assert jb.stats.fec + jb.stats.plc == 1


@pytest.mark.parametrize(("ppm", "direction"), [(200.0, "fast"), (-200.0, "slow")])
def test_clock_drift_keeps_latency_bounded_for_30_minutes(ppm: float, direction: str) -> None:
    frames = 90_000
    period = FRAME / (1.0 + ppm * 1e-6)  # the sender's 20 ms in receiver time
    rng = random.Random(3)
    packets = [
        Packet(k * period + 0.030 + rng.uniform(0.0, 0.004), k, speech(k)) for k in range(frames)
    ]
    jb = JitterBuffer()
    trace = simulate(jb, packets, pops(round(frames * period / FRAME) + 5))
    assert max(trace.buffered) <= max(trace.targets) + 100.0
    assert max(trace.buffered) <= 100.0
    s = jb.stats
    drift_frames = frames * abs(ppm) * 1e-6  # 18
    assert s.played >= frames - 2 * drift_frames
    if direction == "fast":
        assert drift_frames / 2 <= s.dropped_for_latency <= 2 * drift_frames
    else:
        assert drift_frames / 2 <= s.underruns <= 2 * drift_frames
    assert s.fec + s.plc <= 5
    assert_consistent(s)


@pytest.mark.parametrize("silent", [False, True])
def test_latency_cut_prefers_a_frame_inside_silence(silent: bool) -> None:
    jb = JitterBuffer(JitterConfig(max_delay_ms=1000))
    for k in range(40):
        payload = silence(k) if silent and k >= 30 else speech(k)
        jb.push(k * SAMPLES, payload, k * FRAME)  # on time, only played out late
    outs = [jb.pop(1.0) for _ in range(40)]
    assert jb.stats.dropped_for_latency == 1
    played = [o.payload for o in outs if o.kind is NORMAL]
    if silent:
        # Frame 31 sits inside the silent run 30..39 and is the one skipped.
        assert [frame_of(p) for p in played[:30]] == list(range(30))
        assert played[30:] == [silence(k) for k in range(30, 40) if k != 31]
    else:
        assert [frame_of(p) for p in played] == [k for k in range(40) if k != 24]
    assert {o.kind for o in outs} == {NORMAL, WAIT}


def test_never_holds_more_than_max_delay() -> None:
    jb = JitterBuffer()
    # A long stall leaves WAIT credit; then a burst of everything arrives at once.
    jb.push(0, speech(0), 0.0)
    jb.pop(0.0)
    for j in range(100):
        jb.pop(0.02 * j)
    results = [jb.push(k * SAMPLES, speech(k), 2.0) for k in range(1, 101)]
    assert set(results) == {PushResult.ACCEPTED}
    jb.pop(2.0)
    assert jb.stats.buffered_ms <= 400.0


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        JitterConfig(min_delay_ms=0)
    with pytest.raises(ValueError):
        JitterConfig(min_delay_ms=100, max_delay_ms=40)
    with pytest.raises(ValueError):
        JitterConfig(percentile=0.0)
    with pytest.raises(ValueError):
        JitterBuffer().set_recovery_frames(-1)
    with pytest.raises(ValueError):
        JitterBuffer().pop(float("nan"))


_push = st.tuples(
    st.just("push"),
    st.one_of(
        st.integers(-40, 80).map(lambda k: k * SAMPLES),
        st.integers(-40 * SAMPLES, 80 * SAMPLES),
        st.integers(0, 2**32 - 1),
    ),
    st.binary(max_size=8),
    st.floats(0.0, 0.5),
    st.booleans(),
)
_pop = st.tuples(st.just("pop"), st.just(0), st.just(b""), st.floats(0.0, 0.05), st.just(False))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_push, _pop), max_size=200), st.integers(0, 3))
def test_arbitrary_push_pop_sequences_keep_stats_consistent(
    ops: list[tuple[str, int, bytes, float, bool]], recovery: int
) -> None:
    jb = JitterBuffer(JitterConfig(hold_s=0.1, settle_s=0.2))
    jb.set_recovery_frames(recovery)
    now = 1000.0
    for op, offset, payload, dt, redundant in ops:
        now += dt
        if op == "push":
            result = jb.push((123_456 + offset) % 2**32, payload, now, redundant=redundant)
            assert isinstance(result, PushResult)
        else:
            out = jb.pop(now)
            assert (out.payload is None) == (out.kind in (PLC, WAIT))
            assert jb.stats.buffered_ms <= 400.0
        assert_consistent(jb.stats)
