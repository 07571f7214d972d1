"""Adaptive jitter buffer for 20 ms Opus frames: pure, driven by pushes and a playout clock.

Frames are keyed by index (unwrapped RTP timestamp / frame size, relative to the first
packet). The playout clock pops one frame per 20 ms: a present frame plays, a missing one
with later frames present is a loss (FEC from the next frame, else PLC), and with nothing
buffered the buffer WAITs without advancing, which stretches time instead of losing a
frame that is merely late.

The target delay is a high percentile of the relative delay spread of recent packets plus
one frame, raised after losses so redundant copies can arrive in time. The buffer grows
only through those WAITs and shrinks by dropping a frame when it stays above target, which
also absorbs sender clock drift.
"""

from __future__ import annotations

import bisect
import enum
import logging
import math
from collections import deque
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_TS_MOD = 1 << 32
_TS_HALF = 1 << 31
_TS_MASK = _TS_MOD - 1
_HISTORY = 256  # frames remembered as received, to tell duplicates from late packets
_SPREAD_EPSILON = 1e-6  # seconds; keeps float noise from rounding a spread up a frame


@dataclass(frozen=True, slots=True)
class JitterConfig:
    """Jitter buffer tuning; delays are rounded to whole frames."""

    clock_rate: int = 48_000
    """RTP clock rate in Hz."""
    frame_samples: int = 960
    """RTP timestamp increment per frame (20 ms at 48 kHz)."""
    min_delay_ms: int = 20
    """Lowest target delay; what the buffer settles at with no jitter and no loss."""
    max_delay_ms: int = 400
    """Highest target delay and the most audio ever held; packets further ahead are dropped."""
    window_s: float = 3.0
    """How much arrival history the jitter estimate looks at."""
    percentile: float = 95.0
    """Share of packets (in percent) the target delay should wait for."""
    hysteresis_frames: int = 2
    """How far above target the buffer may sit before the quick latency cut applies."""
    hold_s: float = 0.5
    """How long the buffer must stay above target + hysteresis before a frame is dropped."""
    settle_s: float = 5.0
    """How long the buffer must stay above target at all before a frame is dropped; brings
    latency back to target after jitter subsides and absorbs a faster sender clock."""
    loss_memory_s: float = 10.0
    """How long after a loss the target stays at least at the loss-recovery floor."""
    resync_packets: int = 3
    """Consecutive out-of-range packets (sender restart, timestamp jump) before resyncing."""
    small_payload_bytes: int = 3
    """Payloads up to this size are Opus DTX/silence: the cheapest frames to drop."""
    jitter_tolerance_ms: float = 5.0
    """Jitter this small adds no frame of delay: the phase between arrivals and the playback
    clock absorbs it, and an unlucky phase shifts by itself after one underrun."""

    def __post_init__(self) -> None:
        if self.jitter_tolerance_ms < 0:
            raise ValueError("jitter_tolerance_ms must be >= 0")
        if self.clock_rate <= 0 or self.frame_samples <= 0:
            raise ValueError("clock_rate and frame_samples must be > 0")
        if not 0 < self.min_delay_ms <= self.max_delay_ms:
            raise ValueError("need 0 < min_delay_ms <= max_delay_ms")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError("percentile must be in (0, 100]")
        if min(self.window_s, self.hold_s, self.settle_s, self.loss_memory_s) <= 0.0:
            raise ValueError("window_s, hold_s, settle_s and loss_memory_s must be > 0")
        if self.hysteresis_frames < 0 or self.small_payload_bytes < 0:
            raise ValueError("hysteresis_frames and small_payload_bytes must be >= 0")
        if self.resync_packets < 1:
            raise ValueError("resync_packets must be >= 1")

    @property
    def frame_s(self) -> float:
        """Frame duration in seconds."""
        return self.frame_samples / self.clock_rate


class PushResult(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # this frame was already received
    LATE = "late"  # its playout time has passed
    TOO_FAR = "too_far"  # further ahead than max_delay_ms (or far behind): dropped
    RESYNC = "resync"  # accepted after a persistent timestamp jump reset the playout position


class PlayoutKind(enum.Enum):
    NORMAL = "normal"  # decode payload
    FEC = "fec"  # frame lost, payload is the next frame: decode its in-band FEC
    PLC = "plc"  # frame lost: conceal
    WAIT = "wait"  # nothing to play yet; the playout position did not advance


@dataclass(frozen=True, slots=True)
class Playout:
    kind: PlayoutKind
    payload: bytes | None = None


@dataclass(frozen=True, slots=True)
class JitterStats:
    pushed: int
    accepted: int  # includes the packets that triggered a resync
    duplicates: int
    late: int
    too_far: int
    pops: int
    played: int  # NORMAL
    fec: int
    plc: int
    waits: int  # every WAIT, including before start
    underruns: int  # WAITs after start because the buffer ran dry
    skipped: int  # missing frames passed over without a pop (their time was already waited)
    dropped_for_latency: int  # received frames thrown away to cut latency
    resyncs: int
    target_delay_ms: float
    buffered_ms: float


_WAIT = Playout(PlayoutKind.WAIT)
_PLC = Playout(PlayoutKind.PLC)


class JitterBuffer:
    """One receive stream's jitter buffer. Not thread-safe; times are seconds on one clock."""

    def __init__(self, config: JitterConfig | None = None) -> None:
        cfg = config if config is not None else JitterConfig()
        self._cfg = cfg
        self._frame_s = cfg.frame_s
        per_frame = 1000 * cfg.frame_samples  # ms x Hz in one frame; integer maths, no rounding
        self._min_frames = max(1, -(-cfg.min_delay_ms * cfg.clock_rate // per_frame))
        self._max_frames = max(self._min_frames, cfg.max_delay_ms * cfg.clock_rate // per_frame)
        self._hold_pops = max(1, round(cfg.hold_s / self._frame_s))
        self._settle_pops = max(1, round(cfg.settle_s / self._frame_s))
        # Room for a few arrivals per frame; bounds memory if arrival times stop advancing.
        self._window_cap = 4 * max(1, math.ceil(cfg.window_s / self._frame_s))
        self._recovery_frames = 1
        self._last_loss: float | None = None
        self._loss_floor = False
        self._jitter_frames = self._min_frames
        self._target = self._min_frames
        self._pushed = self._accepted = self._duplicates = self._late = self._too_far = 0
        self._pops = self._played = self._fec = self._plc = 0
        self._waits = self._underruns = self._skipped = self._dropped = self._resyncs = 0
        self._frames: dict[int, bytes] = {}
        self._delays: deque[tuple[float, float]] = deque()  # (arrival, relative delay)
        self._sorted_delays: list[float] = []
        self._restart(0)

    def _restart(self, ext: int) -> None:
        """Make ext frame index 0 and forget the stream's state (first packet, resync)."""
        self._base = ext  # extended timestamp of frame index 0
        self._ref = ext  # extended timestamp the next one is unwrapped against
        self._next = 0  # frame index to play next
        self._highest = 0  # highest buffered index; meaningful while frames are buffered
        self._started = False
        self._credit = 0  # WAITs since playout last advanced
        self._in_silence = False  # the last frame played was a DTX/silence packet
        self._skip: int | None = None  # frame dropped for latency that playout hops over
        self._over_hysteresis = self._over_target = 0
        self._jump_run = 0
        self._jump_last = 0
        self._frames.clear()
        self._history: list[int | None] = [None] * _HISTORY
        # A jump moves every relative delay; old ones would read as huge jitter.
        self._delays.clear()
        self._sorted_delays.clear()
        self._jitter_frames = self._min_frames
        self._update_target()

    # -- receive ---------------------------------------------------------------

    def push(
        self, timestamp: int, payload: bytes, arrival: float, *, redundant: bool = False
    ) -> PushResult:
        """Add one frame. Redundant (RED) copies do not feed the delay estimate."""
        _check_time(arrival)
        self._pushed += 1
        if self._pushed == 1:
            self._restart(timestamp & _TS_MASK)
        ext = self._unwrap(timestamp)
        idx = self._index(ext)
        max_frames = self._max_frames
        if self._started:
            lo = self._next
        else:  # before playout starts, earlier frames may still join the head
            lo = (self._highest if self._frames else self._next) - max_frames + 1
        hi = self._next + self._credit + max_frames
        result = PushResult.ACCEPTED
        if (idx < lo - max_frames or idx >= hi) and not self._received(idx):
            if not self._jumped(idx):
                if idx >= hi:
                    self._too_far += 1
                    return PushResult.TOO_FAR
                self._late += 1
                return PushResult.LATE
            logger.info("timestamp jump persisted for %d packets: resynchronising", self._jump_run)
            self._resyncs += 1
            self._restart(ext)
            idx, lo, result = 0, 0, PushResult.RESYNC
        self._jump_run = 0
        if not redundant and idx >= lo - max_frames:
            self._observe(arrival, idx)
        if self._received(idx):
            self._duplicates += 1
            return PushResult.DUPLICATE
        if idx < lo:
            self._late += 1
            return PushResult.LATE
        frames = self._frames
        self._highest = max(self._highest, idx) if frames else idx
        frames[idx] = payload
        self._history[idx % _HISTORY] = idx
        self._next = min(self._next, idx)
        self._ref = ext
        self._accepted += 1
        return result

    def _unwrap(self, timestamp: int) -> int:
        delta = ((timestamp - self._ref + _TS_HALF) & _TS_MASK) - _TS_HALF
        return self._ref + delta

    def _index(self, ext: int) -> int:
        samples = self._cfg.frame_samples
        return (ext - self._base + samples // 2) // samples

    def _received(self, idx: int) -> bool:
        return idx in self._frames or self._history[idx % _HISTORY] == idx

    def _jumped(self, idx: int) -> bool:
        """Count an out-of-range packet; True once enough consistent ones came in a row."""
        if self._jump_run and abs(idx - self._jump_last) < self._max_frames:
            self._jump_run += 1
        else:
            self._jump_run = 1
        self._jump_last = idx
        return self._jump_run >= self._cfg.resync_packets

    def _observe(self, arrival: float, idx: int) -> None:
        """Add a relative delay sample and recompute the jitter part of the target."""
        delay = arrival - idx * self._frame_s
        delays, ordered = self._delays, self._sorted_delays
        delays.append((arrival, delay))
        # The window holds at most a few hundred samples: insort stays cheap.
        bisect.insort(ordered, delay)
        cutoff = arrival - self._cfg.window_s
        while delays[0][0] < cutoff or len(delays) > self._window_cap:
            _, old = delays.popleft()
            del ordered[bisect.bisect_left(ordered, old)]
        rank = max(0, math.ceil(self._cfg.percentile / 100.0 * len(ordered)) - 1)
        spread = ordered[rank] - ordered[0]
        excess = max(0.0, spread - self._cfg.jitter_tolerance_ms / 1000.0)
        self._jitter_frames = math.ceil(excess / self._frame_s - _SPREAD_EPSILON) + 1
        self._update_target()

    # -- playout ---------------------------------------------------------------

    def pop(self, now: float) -> Playout:
        """What to play for the next 20 ms."""
        _check_time(now)
        self._pops += 1
        loss_floor = self._last_loss is not None and now - self._last_loss < self._cfg.loss_memory_s
        if loss_floor != self._loss_floor:
            self._loss_floor = loss_floor
            self._update_target()
        if not self._frames:
            if self._started:
                self._underruns += 1
                self._credit += 1
            self._waits += 1
            return _WAIT
        if not self._started:
            if self._span() < self._target:
                self._waits += 1
                return _WAIT
            self._started = True
        elif self._credit:
            # The WAITs already filled the time of frames that never came (DTX, loss). Within
            # speech the frame just before a packet is kept: that packet's FEC can rebuild it.
            frames = self._frames
            while self._credit and self._next not in frames:
                if not self._in_silence and not self._small(self._next + 1, if_missing=True):
                    break
                self._credit -= 1
                self._skipped += 1
                self._advance()
            self._credit = 0
        self._control_latency()
        return self._play(now)

    def _play(self, now: float) -> Playout:
        frames = self._frames
        payload = frames.pop(self._next, None)
        if payload is not None:
            self._played += 1
            self._in_silence = len(payload) <= self._cfg.small_payload_bytes
            self._advance()
            return Playout(PlayoutKind.NORMAL, payload)
        self._last_loss = now
        if not self._loss_floor:
            self._loss_floor = True
            self._update_target()
        following = frames.get(self._next + 1)
        self._advance()
        if following is not None:
            self._fec += 1
            return Playout(PlayoutKind.FEC, following)
        self._plc += 1
        return _PLC

    def _advance(self) -> None:
        self._next += 1
        if self._next == self._skip:
            self._next += 1
            self._skip = None

    def _span(self) -> int:
        """Buffered frames from the playout position to the newest, holes included."""
        if not self._frames:
            return 0
        return self._highest - self._next + 1 - (self._skip is not None)

    def _control_latency(self) -> None:
        while self._span() > self._max_frames:
            self._drop_oldest()
        span, target = self._span(), self._target
        self._over_hysteresis = (
            self._over_hysteresis + 1 if span > target + self._cfg.hysteresis_frames else 0
        )
        self._over_target = self._over_target + 1 if span > target else 0
        if self._over_hysteresis >= self._hold_pops or self._over_target >= self._settle_pops:
            self._over_hysteresis = self._over_target = 0
            self._shorten()

    def _shorten(self) -> None:
        """Drop one frame: inside a run of silence if there is one, else the oldest."""
        if self._skip is None:
            for idx in range(self._next + 1, self._highest):
                if self._small(idx - 1) and self._small(idx) and self._small(idx + 1):
                    del self._frames[idx]
                    self._skip = idx
                    self._dropped += 1
                    logger.debug("dropped silent frame %d to cut latency", idx)
                    return
        self._drop_oldest()
        logger.debug("dropped oldest frame to cut latency")

    def _small(self, idx: int, *, if_missing: bool = False) -> bool:
        """Whether frame idx is a DTX/silence packet; if_missing when it is not buffered."""
        payload = self._frames.get(idx)
        if payload is None:
            return if_missing
        return len(payload) <= self._cfg.small_payload_bytes

    def _drop_oldest(self) -> None:
        if self._frames.pop(self._next, None) is not None:
            self._dropped += 1
        else:
            self._skipped += 1
        self._advance()

    # -- target ----------------------------------------------------------------

    def set_recovery_frames(self, frames: int) -> None:
        """How many later packets can carry a lost frame (RED distance, 1 for FEC only).

        After a loss the target covers the frame itself plus that many, so the copy arrives
        before the frame is due. 0 turns the floor off.
        """
        if frames < 0:
            raise ValueError("recovery frames must be >= 0")
        self._recovery_frames = frames
        self._update_target()

    def _update_target(self) -> None:
        frames = self._jitter_frames
        if self._loss_floor:
            frames = max(frames, self._recovery_frames + 1)
        self._target = min(max(frames, self._min_frames), self._max_frames)

    @property
    def stats(self) -> JitterStats:
        frame_ms = self._frame_s * 1000.0
        return JitterStats(
            pushed=self._pushed,
            accepted=self._accepted,
            duplicates=self._duplicates,
            late=self._late,
            too_far=self._too_far,
            pops=self._pops,
            played=self._played,
            fec=self._fec,
            plc=self._plc,
            waits=self._waits,
            underruns=self._underruns,
            skipped=self._skipped,
            dropped_for_latency=self._dropped,
            resyncs=self._resyncs,
            target_delay_ms=self._target * frame_ms,
            buffered_ms=self._span() * frame_ms,
        )


def _check_time(t: float) -> None:
    if not math.isfinite(t):
        raise ValueError(f"time must be finite, got {t}")
