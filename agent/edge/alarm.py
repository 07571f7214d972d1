"""Smoke (temporal-three) and CO (temporal-four) alarm detection on the capture stream.

How: each 20 ms frame gets one Hann-windowed FFT (50 Hz bins). In every bin of the
alarm range a tone is "on" while its peak stands ``prominence_db`` above the
neighbouring bins (a pure tone, whatever the broadband level) and within
``release_db`` of its loudest frame (so a room's reverberant tail ends it). Each bin
runs that on/off state machine, vectorised over bins, and turns runs into tones
(start, end). Only when a tone ends does Python look at the bin's recent tones and
match the ISO 8201 rhythms with +-``tolerance`` on every tone, gap and pause:

- ``smoke_alarm``: a T3 group (3 tones, 2 gaps), its pause, and the next cycle's first
  two tones: ~5.5 s at nominal timing, 7.2 s at +30 %. One group alone is not enough:
  a microwave's three beeps look exactly like it.
- ``co_alarm``: two T4 groups (4 tones, 3 gaps each) with the pause between them.
- ``alarm_sound``: in the piezo (2-4 kHz) or 520 Hz bands, a tone that goes on for
  ``unclassified_min_s``, or beeps regularly that long, without being T3/T4: older and
  EN 14604 alarms. Lower severity; the detail says it is unclassified. Short beepers
  (timers, microwaves, trucks, alarm clocks) stop long before.

Rooms and low SNR: a tone that falls soon after its onset but stays prominent is put on
trial (``settle_frames``) rather than ended, for the reflections may cancel part of the
direct sound while it lasts; and a T4 match whose tones are uneven or whose pause holds
speech is still accepted when the bin's stored prominence contrasts sharply between the
tones and the pause (``_contrast``: a matched filter over the cycle); T4 groups that
do not match by their tones' lengths and gaps (a tone cut in two, a blip between two)
are matched by their onsets' pace (``_match_t4_onsets``). Speech and TV at
low SNR cut T3 tones into pieces: if the tones as tracked do not match, they are
matched again with the pieces joined (``_join``). A room's tail also lengthens T3 tones
and shortens their gaps: a T3 off by that much is accepted at T3's pace (``_paced``).
A longer tail fills T4's 0.1 s gaps and merges a group's tones into one, but each tone
still rises sharply out of the tail: T4 also sees such a tone cut at those onsets
(``_pieces``).

Per-bin tracking means a 520 Hz square wave is tracked at its fundamental and each odd
harmonic separately; whichever is clearest over the background matches. At low SNR
speech masks each of them in turn, cutting every bin's tones into pieces, so square
waves also get harmonic channels: for each candidate fundamental (``square_hz``, 10 Hz
apart) a channel whose prominence and level are the geometric means over its odd
harmonics' bins. Masking that hits one harmonic at a time costs the channel a quarter
of its prominence in dB instead of the whole tone. The channels run through the same
tracker as the bins (they are extra columns of its arrays). A match on a channel must
rest on three of its harmonics (``_partials``): one strong partial (a note of the
music) lifts a channel too, and the chance peaks of the floor in its other bins then
cut it into tones of any rhythm.

Music: two close partials of a chord beat, so their bin sounds in lobes at a clockwork
pace, and the chord comes again seconds later: T4. Such lobes fade with the note, tone
by tone (``_fading``); an alarm's tones do not.

An episode (one kind) reports once, then stays quiet while its bins keep sounding and
until they have been silent for ``cooldown_s``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from agent.audio.format import FRAME_SAMPLES, SAMPLE_RATE
from agent.edge.base import Detection, FrameSpectrum

logger = logging.getLogger(__name__)

_BIN_HZ = SAMPLE_RATE / FRAME_SAMPLES  # 50 Hz
_FRAME_S = FRAME_SAMPLES / SAMPLE_RATE  # 0.02 s
_NEAR = (3, 8)  # neighbour bins (distance from the peak) that give a tone's local floor
_KEEP_S = 45.0  # tones older than this are forgotten
_FULL_SCALE = 32768.0
_WEAKER_DB = 10.0  # one alarm's tones are within this level of each other
_LENGTH_SLACK_S = 0.04  # ... and their lengths within this plus _LENGTH_SPREAD of the median
_LENGTH_SPREAD = 0.15
_PERIODIC_MAX_PERIOD_S = 2.5  # an unclassified alarm beeps at least this often on average
_PERIODIC_MIN_BEEP_S = 0.08  # ... with beeps this long at least (speech's blips are shorter)
_BUILD_UP_FRAMES = 3  # a room's reflections build up within this after a tone's onset
_TRIAL_PROMINENCE_DB = 16.0  # ... and a tone cut by them still stands this far out
_CONTRAST_DB = 12.0  # T4 tones over their pause (90th percentile), see ``_contrast``
_PAUSE_LOUD_SHARE = 0.015  # ... and the share of the pause about as prominent as the tones
_PERIOD_SPREAD_S = 0.05  # ... and how regular their onsets are (to 20 ms frames)
_JOIN_GAP_S = 0.2  # pieces of one T3 tone, see ``_join``
_JOIN_SOUNDING = 0.7  # ... sound this share of the tone at least (beeps sound half)
_SQUARE_STEP_HZ = 10.0  # harmonic channels' spacing: the 7th harmonic stays in its bin +-1
_PARTIALS = 3  # a harmonic channel's match needs this many of its harmonics ...
_PARTIAL_DB = 5.0  # ... standing out this far over the matched tones, see ``_partials``
_FADE_DB = 2.5  # T4 groups fading tone by tone this much are a beating note, see ``_fading``
_ROOM_S = 0.1  # a room's tail lengthens T3 tones and shortens their gaps this much, see ``_paced``
_NEVER = 1 << 62  # a frame number no stream reaches


@dataclass(frozen=True, slots=True)
class AlarmSettings:
    """Tuning of ``AlarmDetector``; the defaults follow ISO 8201 and field-drifted alarms."""

    min_freq_hz: float = 450.0
    """Lowest tone tracked (520 Hz square-wave alarms, with margin)."""
    max_freq_hz: float = 4400.0
    """Highest tone tracked (piezo alarms are 2-4 kHz, with margin)."""
    alarm_bands_hz: tuple[float, ...] = (470.0, 580.0, 1410.0, 1740.0, 1800.0, 4400.0)
    """Pairs (low, high) where alarms sound: a 520 Hz square wave's fundamental and odd
    harmonics (3rd; 5th and 7th fall in the piezo band), and the piezo band 2-4 kHz with
    margin. Tones elsewhere (a note at 1 kHz) are no alarm, whatever their rhythm."""
    square_hz: tuple[float, ...] = (470.0, 580.0)
    """Fundamentals (low, high) of square-wave alarms given harmonic channels; () for none."""
    square_harmonics: tuple[int, ...] = (1, 3, 5, 7)
    """The harmonics such a channel combines (a square wave has odd ones only)."""
    prominence_db: float = 10.0
    """How far a tone's peak bin must stand above the neighbouring bins' mean."""
    hold_prominence_db: float = 6.0
    """Prominence that keeps a started tone on (hysteresis: speech can mask it briefly)."""
    min_level_dbfs: float = -75.0
    """Quietest tone considered at all (dBFS of the tone, full-scale sine = 0)."""
    release_db: float = 6.0
    """A tone ends when it falls this far below its recent loudest frame (reverb tails)."""
    release_decay_db: float = 0.5
    """How fast (dB per 20 ms) that reference forgets: a tone that settles lower after its
    onset (the room's reflections interfering with the direct sound) must not be cut,
    while a reverberant tail (>= 1.2 dB per frame for RT60 <= 1 s) still ends quickly."""
    onset_db: float = 6.0
    """A new tone in a bin must rise this far above the lowest level since the last one."""
    settle_frames: int = 7
    """A tone that falls ``release_db`` within a few frames of its onset but stays
    clearly prominent is on trial: if it decays ``tail_decay_db`` further (a reverberant
    tail) it ends where it fell; if it holds at the lower level for this many frames
    (the room's reflections cancelling part of the direct sound) it goes on; if it rises
    ``onset_db`` again, a new tone starts. Longer than a T4 gap, so that a tail in one
    never settles into a tone."""
    tail_decay_db: float = 4.0
    """How far below its fall a tone on trial must decay to count as a tail."""
    hang_frames: int = 2
    """Off frames needed to end a tone; shorter dropouts (noise) are bridged."""
    min_tone_frames: int = 2
    """Runs shorter than this many 20 ms frames are ignored (clicks, noise)."""
    tolerance: float = 0.3
    """Accepted relative deviation of each tone, gap and pause from nominal."""
    slack_s: float = 0.04
    """Added to every timing window: what 20 ms frames (at both ends of a tone) blur."""
    t3_on_s: float = 0.5
    t3_gap_s: float = 0.5
    t3_pause_s: float = 1.5
    t4_on_s: float = 0.1
    t4_gap_s: float = 0.1
    t4_pause_s: float = 5.0
    cooldown_s: float = 20.0
    """Silence in an episode's bins after which the same kind may be reported again."""
    unclassified: bool = True
    """Report ``alarm_sound`` for sustained tones that are neither T3 nor T4."""
    unclassified_min_s: float = 20.0
    """How long a tone must keep sounding (continuously or beeping) for ``alarm_sound``."""
    unclassified_max_gap_s: float = 4.0
    """Longest silence inside a beeping that still counts as one sound."""
    unclassified_regularity: float = 0.05
    """Largest relative deviation (std/mean, beyond 30 ms) of the beeping's period: alarms
    beep like clockwork, music and speech do not."""
    unclassified_prominence_db: float = 15.0
    """Mean prominence the tones of an ``alarm_sound`` need ("loud" over the background)."""

    def __post_init__(self) -> None:
        nyquist = SAMPLE_RATE / 2 - _BIN_HZ * (_NEAR[1] + 2)
        if not 0 < self.min_freq_hz < self.max_freq_hz <= nyquist:
            raise ValueError(f"need 0 < min_freq_hz < max_freq_hz <= {nyquist:g}")
        if self.min_freq_hz < _BIN_HZ * (_NEAR[1] + 1):
            raise ValueError("min_freq_hz is too low for the tone floor estimate")
        bands = self.alarm_bands_hz
        if len(bands) % 2 or any(lo >= hi for lo, hi in zip(bands[::2], bands[1::2], strict=True)):
            raise ValueError("alarm_bands_hz must be (low, high) pairs with low < high")
        for name in (
            "prominence_db",
            "hold_prominence_db",
            "release_db",
            "release_decay_db",
            "onset_db",
            "tail_decay_db",
            "unclassified_prominence_db",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.square_hz:
            if len(self.square_hz) != 2 or not 0 < self.square_hz[0] <= self.square_hz[1]:
                raise ValueError("square_hz must be (low, high) with 0 < low <= high, or ()")
            top = self.square_hz[1] * max(self.square_harmonics, default=0)
            if not self.square_harmonics or min(self.square_harmonics) < 1:
                raise ValueError("square_harmonics must be harmonic numbers >= 1")
            if self.square_hz[0] < self.min_freq_hz or top > self.max_freq_hz:
                raise ValueError("square_hz times square_harmonics must lie in the tracked range")
        if self.hold_prominence_db > self.prominence_db:
            raise ValueError("hold_prominence_db must be <= prominence_db")
        if self.min_level_dbfs >= 0:
            raise ValueError("min_level_dbfs must be < 0")
        if self.hang_frames < 1 or self.min_tone_frames < 1 or self.settle_frames < 2:
            raise ValueError("hang_frames, min_tone_frames must be >= 1, settle_frames >= 2")
        if not 0 <= self.tolerance < 1 or self.slack_s < 0:
            raise ValueError("tolerance must be in [0, 1) and slack_s >= 0")
        for name in ("t3_on_s", "t3_gap_s", "t3_pause_s", "t4_on_s", "t4_gap_s", "t4_pause_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.t3_on_s * (1 - self.tolerance) <= self.t4_on_s * (1 + self.tolerance):
            raise ValueError("T3 and T4 tone lengths overlap at this tolerance")
        if self.cooldown_s <= 0 or self.unclassified_min_s <= 0:
            raise ValueError("cooldown_s and unclassified_min_s must be > 0")
        if self.unclassified_max_gap_s <= 0 or self.unclassified_regularity <= 0:
            raise ValueError("unclassified_max_gap_s and unclassified_regularity must be > 0")
        if self.unclassified_min_s + self.unclassified_max_gap_s > _KEEP_S:
            raise ValueError(f"unclassified_min_s + unclassified_max_gap_s must be <= {_KEEP_S}")


class _Tone(NamedTuple):
    """One tone of a bin. A named tuple: a busy bin ends a few tones a second, and a
    tuple is made in a third of a frozen dataclass's time."""

    start_s: float
    end_s: float
    power: float  # peak bin power (FFT units)
    prominence_db: float
    length_s: float


@dataclass(frozen=True, slots=True)
class _Match:
    """Evidence for one report: the tones and how far their timing is off."""

    error: float  # worst relative timing deviation found
    scale: float  # the deviation that scores zero
    tones: list[_Tone]
    how: str = "periodic"


@dataclass(slots=True)
class _Trial:
    """A tone that fell soon after its onset while staying prominent (see ``_judge``)."""

    fall: float  # its level (peak bin power) when it fell
    dip: float  # the lowest level since
    frames: int = 0


@dataclass(slots=True)
class _Episode:
    last_s: float
    bins: set[int] = field(default_factory=set)


class _Window:
    """An accepted range around a nominal time; ``error`` is the relative deviation."""

    __slots__ = ("high", "low", "nominal")

    def __init__(self, nominal: float, tolerance: float, slack: float) -> None:
        self.nominal = nominal
        self.low = nominal * (1 - tolerance) - slack
        self.high = nominal * (1 + tolerance) + slack

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high

    def error(self, value: float) -> float:
        return abs(value - self.nominal) / self.nominal

    def widened(self, *, shorter: float = 0.0, longer: float = 0.0) -> _Window:
        """This window, also taking values up to ``shorter`` below and ``longer`` above it."""
        wide = _Window(self.nominal, 0.0, 0.0)
        wide.low, wide.high = self.low - shorter, self.high + longer
        return wide


@dataclass(frozen=True, slots=True)
class _Pattern:
    """Timing windows of one temporal pattern."""

    count: int
    on: _Window
    gap: _Window
    pause: _Window

    @property
    def horizon_s(self) -> float:
        """How far back a match can reach: two groups and a pause, at their longest."""
        return 2 * self.count * (self.on.high + self.gap.high) + self.pause.high


def _db(ratio: float) -> float:
    return 10 * math.log10(max(ratio, 1e-30))


def _fading(tones: Sequence[_Tone]) -> bool:
    """Both T4 groups fade tone by tone, ``_FADE_DB`` or more each: a beating note.

    Two close partials of a chord (a fifth's 3rd and 2nd harmonics, 0.1 % apart) beat
    a few times a second, so a bin holding both sounds in lobes at a clockwork pace as
    long as the note lasts, and the chord comes again seconds later: T4's rhythm. But
    the lobes fade with the note, each weaker than the one before, while an alarm's
    tones are steady (masking and a room's reflections raise some of them at random).
    """
    for group in (tones[:4], tones[4:]):
        powers = [x.power for x in group]
        if any(b >= a for a, b in itertools.pairwise(powers)):
            return False
        if powers[0] < powers[-1] * 10 ** (_FADE_DB / 10):
            return False
    return True


class AlarmDetector:
    """Detects smoke (T3), CO (T4) and unclassified alarm sounds; see the module docstring."""

    name = "alarm"

    def __init__(
        self, settings: AlarmSettings | None = None, spectrum: FrameSpectrum | None = None
    ) -> None:
        """``spectrum``: shared with the other detectors of the stream (one FFT a frame)."""
        s = self.settings = settings or AlarmSettings()
        self._spectrum = spectrum or FrameSpectrum()
        self._lo = math.floor(s.min_freq_hz / _BIN_HZ)
        self._hi = math.ceil(s.max_freq_hz / _BIN_HZ) + 1  # band bins: [lo, hi)
        self._off = _NEAR[1] + 1  # first band bin's index in the extended spectrum slice
        # Power of a full-scale sine in its own bin (Hann: |X| = A N / 4), for dBFS.
        self._full_power = (_FULL_SCALE * FRAME_SAMPLES / 4) ** 2
        self._min_power = self._full_power * 10 ** (s.min_level_dbfs / 10)
        self._prominence = 10 ** (s.prominence_db / 10)
        self._hold = 10 ** (s.hold_prominence_db / 10)
        self._release = 10 ** (-s.release_db / 10)
        self._ref_decay = 10 ** (-s.release_decay_db / 10)
        self._onset = 10 ** (s.onset_db / 10)
        self._tail_decay = 10 ** (-s.tail_decay_db / 10)
        self._trial_ratio = 10 ** (_TRIAL_PROMINENCE_DB / 10)
        freqs = np.arange(self._lo, self._hi) * _BIN_HZ
        in_band = np.zeros(len(freqs), dtype=bool)
        for lo, hi in zip(s.alarm_bands_hz[::2], s.alarm_bands_hz[1::2], strict=True):
            in_band |= (freqs >= lo) & (freqs <= hi)
        # Harmonic channels: column ``n + v`` combines the bins of ``_harmonics[v]``.
        fundamentals = (
            np.arange(s.square_hz[0], s.square_hz[1] + 1e-9, _SQUARE_STEP_HZ)
            if s.square_hz
            else np.zeros(0)
        )
        self._harmonics = (
            np.rint(np.outer(fundamentals, s.square_harmonics) / _BIN_HZ).astype(np.intp) - self._lo
        )
        self._bins = len(freqs)
        self._freqs = np.concatenate((freqs, fundamentals))
        # Each frame's figures, written in place (numpy's per-call cost dominates a frame):
        # peak and prominence of the bins then the channels; the bins' peak + 1 then floor.
        self._peak_now = np.zeros(len(self._freqs))
        self._ratio_now = np.zeros(len(self._freqs))
        self._logs_of = np.zeros(2 * self._bins)
        self._logs_at = np.stack((self._harmonics, self._harmonics + self._bins))
        self._in_alarm_band = np.concatenate((in_band, np.ones(len(fundamentals), dtype=bool)))
        # Bins whose tones are looked at: in an alarm band, or next to one (``_even``). The
        # others (speech's 700-1300 Hz) need no tone list.
        self._heard = self._in_alarm_band.copy()
        for j in np.flatnonzero(self._in_alarm_band):
            self._heard[self._near(int(j))] = True
        tol, slack = s.tolerance, s.slack_s
        self._t3 = _Pattern(
            3,
            _Window(s.t3_on_s, tol, slack),
            _Window(s.t3_gap_s, tol, slack),
            _Window(s.t3_pause_s, tol, slack),
        )
        self._t4 = _Pattern(
            4,
            _Window(s.t4_on_s, tol, slack),
            _Window(s.t4_gap_s, tol, slack),
            _Window(s.t4_pause_s, tol, slack),
        )
        # In a room: T3 tones longer and gaps shorter by a tail, at T3's pace (``_paced``).
        self._t3_room = dataclasses.replace(
            self._t3,
            on=self._t3.on.widened(longer=_ROOM_S),
            gap=self._t3.gap.widened(shorter=_ROOM_S),
        )
        self._t3_period = _Window(s.t3_on_s + s.t3_gap_s, tol, slack)
        # T4's pace: from one tone's onset to the next.
        self._t4_period = _Window(s.t4_on_s + s.t4_gap_s, tol, slack)
        # How far before a T4 group's last onset the one before it lies, and its first one
        # at most, however the group is told (tone lengths and gaps, or onsets at the
        # pace), a frame to spare: ``_match_t4`` rules out most short tones with them.
        t4, step = self._t4, self._t4_period
        self._t4_next = (
            min(t4.on.low + t4.gap.low, step.low) - _FRAME_S,
            max(t4.on.high + t4.gap.high, step.high) + _FRAME_S,
        )
        self._t4_reach = 3 * max(t4.on.high + t4.gap.high, step.high + _PERIOD_SPREAD_S) + _FRAME_S
        self._weaker = 10 ** (-_WEAKER_DB / 10)
        self._csum = np.zeros(self._hi - self._lo + 2 * self._off + 1)
        self._continuous_frames = round(s.unclassified_min_s / _FRAME_S)
        self._history_frames = math.ceil(self._t4.horizon_s / _FRAME_S) + 8
        self.reset()

    def reset(self) -> None:
        """Forget all tones and episodes; the clock restarts at 0."""
        n = len(self._freqs)
        self._frame = 0
        self._pending = np.zeros(0, dtype=np.int16)
        self._active = np.zeros(n, dtype=bool)
        self._start = np.zeros(n, dtype=np.int64)
        self._last_on = np.zeros(n, dtype=np.int64)
        self._off_count = np.zeros(n, dtype=np.int64)
        self._peak = np.zeros(n)
        self._ref = np.zeros(n)
        self._peak_ratio = np.zeros(n)
        self._valley = np.zeros(n)
        self._trials: dict[int, _Trial] = {}
        # No alarm band tone can have sounded ``unclassified_min_s`` before this frame.
        self._long_from = self._continuous_frames
        # Each bin's prominence over the last T4 cycle and more, for ``_contrast``.
        self._history = np.zeros((self._history_frames, n), dtype=np.float32)
        self._tones: dict[int, deque[_Tone]] = {}
        # Each bin's level in the last two frames (raised by ``onset_db``); the onsets inside
        # its sounding tone; its tones as T4 sees them where a room's tail merged some and
        # when the last such tone ended (see ``_pieces``).
        self._recent = np.zeros((2, n))
        self._reonsets: dict[int, list[int]] = {}
        self._split: dict[int, deque[_Tone]] = {}
        self._cut_s: dict[int, float] = {}
        self._episodes: dict[str, _Episode] = {}

    # --- per frame --------------------------------------------------------------------

    def feed(self, frame: np.ndarray) -> list[Detection]:
        """Analyse 20 ms of 48 kHz mono int16; other lengths are re-blocked internally."""
        if len(frame) == FRAME_SAMPLES and not len(self._pending):
            return self._analyse(frame)
        data = np.concatenate([self._pending, np.asarray(frame, dtype=np.int16)])
        out: list[Detection] = []
        whole = len(data) // FRAME_SAMPLES * FRAME_SAMPLES
        for i in range(0, whole, FRAME_SAMPLES):
            out += self._analyse(data[i : i + FRAME_SAMPLES])
        self._pending = data[whole:]
        return out

    def _analyse(self, frame: np.ndarray) -> list[Detection]:
        f = self._frame
        self._frame = f + 1
        near_lo, near_hi = _NEAR
        power = self._spectrum.power(frame, f)[self._lo - self._off : self._hi + self._off]
        o, n = self._off, self._bins
        peak, ratio = self._peak_now, self._ratio_now
        # A tone may straddle two bins: the band bin sees the max of itself and neighbours.
        np.maximum(power[o - 1 : o + n - 1], power[o : o + n], out=peak[:n])
        np.maximum(peak[:n], power[o + 1 : o + n + 1], out=peak[:n])
        csum = self._csum
        np.add.accumulate(power, out=csum[1:])  # cumsum, without its Python layer
        width = near_hi - near_lo + 1
        sums = csum[width:] - csum[:-width]  # sums[i]: bins i .. i + width - 1
        # The quieter side: a speech or music harmonic on one side does not mask the tone.
        a, c = o - near_hi, o + near_lo
        logs_of = self._logs_of
        floor = logs_of[n:]
        np.minimum(sums[a : a + n], sums[c : c + n], out=floor)
        floor *= 1 / width
        floor += 1.0
        np.divide(peak[:n], floor, out=ratio[:n])
        if len(self._harmonics):
            # Geometric means over each channel's harmonics of peak + 1 and of the floor.
            np.add(peak[:n], 1.0, out=logs_of[:n])
            means = np.add.reduce(np.log(logs_of[self._logs_at]), axis=2)
            means /= self._harmonics.shape[1]
            np.exp(means[0], out=peak[n:])
            means[0] -= means[1]
            np.exp(means[0], out=ratio[n:])
        self._history[f % len(self._history)] = ratio
        kept = ratio > self._hold
        kept &= peak > self._min_power
        tonal = ratio > self._prominence
        tonal &= kept

        # count_nonzero: a bool array's cheapest "any" (ndarray.any goes through Python).
        active = self._active
        if not np.count_nonzero(tonal) and not np.count_nonzero(active):  # nothing sounds
            np.minimum(self._valley, peak, out=self._valley)
            if self._episodes:
                self._refresh_episodes(f)
            return []
        ref = self._ref
        ref *= self._ref_decay
        falling = peak < ref * self._release
        # A much louder tone starting in a bin that already holds a weak one (a note of
        # the music under the alarm) starts a tone of its own.
        jump = active & tonal
        jump &= peak >= ref * self._onset
        # A sounding tone rising ``onset_db`` out of its last two frames, back to its level.
        rise = np.minimum(self._recent[0], self._recent[1])
        np.maximum(rise, ref, out=rise)
        rise = rise <= peak
        rise &= active
        np.multiply(peak, self._onset, out=self._recent[f % 2])
        if np.count_nonzero(rise):
            self._note_onsets(f, rise.nonzero()[0])
        # On bool arrays ``a > b`` is ``a & ~b`` in one numpy call instead of two.
        holding = active & kept
        np.greater(holding, falling | jump, out=holding)
        waiting: list[int] = []
        decayed: list[int] = []
        if self._trials:
            self._judge(
                peak,
                kept,
                tonal=tonal,
                falling=falling,
                jump=jump,
                holding=holding,
                waiting=waiting,
                decayed=decayed,
            )
        lapsed = active > holding
        first = lapsed & (self._off_count == 0)
        first &= ratio > self._trial_ratio  # fallen (or jumped) but still clearly prominent
        if np.count_nonzero(first):
            self._put_on_trial(f, (first > jump).nonzero()[0], peak, waiting)
        off_count = self._off_count
        off_count += lapsed
        off_count[holding] = 0
        ended = off_count >= self.settings.hang_frames
        ended &= lapsed
        np.greater(ended, jump, out=ended)
        if waiting:
            ended[waiting] = False
        if decayed:
            ended[decayed] = True
        onset = tonal > active
        onset &= peak >= self._valley * self._onset

        out: list[Detection] = []
        if np.count_nonzero(ended):
            for j in (ended & self._heard).nonzero()[0].tolist():
                out += self._tone_ended(j, f)
            np.greater(active, ended, out=active)
            # After a fall (a tail) a new tone must rise; after masking it may just resume.
            np.copyto(self._valley, np.where(falling, peak, 0.0), where=ended)
        np.maximum(ref, peak, out=ref, where=holding)
        if np.count_nonzero(jump):
            for j in (jump & self._heard).nonzero()[0].tolist():
                out += self._tone_ended(j, f)
            onset |= jump
        if self._trials:
            for gone in [k for k in self._trials if not active[k]]:
                del self._trials[gone]
        grow = peak > self._peak
        grow &= holding
        if np.count_nonzero(grow):
            np.copyto(self._peak, peak, where=grow)
            np.copyto(self._peak_ratio, ratio, where=grow)
        self._last_on[holding] = f
        if np.count_nonzero(onset):
            active |= onset
            self._start[onset] = f
            self._long_from = min(self._long_from, f + self._continuous_frames)
            self._last_on[onset] = f
            self._off_count[onset] = 0
            np.copyto(self._peak, peak, where=onset)
            np.copyto(ref, peak, where=onset)
            np.copyto(self._peak_ratio, ratio, where=onset)
        idle = ~active
        np.minimum(self._valley, peak, out=self._valley, where=idle)

        if self.settings.unclassified and f >= self._long_from:
            out += self._check_continuous(f)
        if self._episodes:
            self._refresh_episodes(f)
        return out

    def _note_onsets(self, f: int, rising: np.ndarray) -> None:
        """Onsets inside sounding tones, each at T4's pace from the one before and standing
        ``_TRIAL_PROMINENCE_DB`` out (a room's tail filling the gap is a pure tone too)."""
        step = self._t4_period
        for j in rising.tolist():
            if not self._in_alarm_band.item(j) or self._ratio_now.item(j) <= self._trial_ratio:
                continue
            onsets = self._reonsets.setdefault(j, [])
            last = onsets[-1] if onsets else self._start.item(j)
            if step.low <= (f - last) * _FRAME_S <= step.high:
                onsets.append(f)

    def _put_on_trial(self, f: int, fell: np.ndarray, peak: np.ndarray, waiting: list[int]) -> None:
        """Tones that fell soon after their onset but stay prominent go on trial."""
        for j in fell.tolist():
            if f - self._start[j] <= _BUILD_UP_FRAMES:
                level = float(peak[j])
                self._trials[j] = _Trial(level, level)
                waiting.append(j)

    def _judge(
        self,
        peak: np.ndarray,
        kept: np.ndarray,
        *,
        tonal: np.ndarray,
        falling: np.ndarray,
        jump: np.ndarray,
        holding: np.ndarray,
        waiting: list[int],
        decayed: list[int],
    ) -> None:
        """One frame of the tones on trial; updates ``jump`` and ``holding`` in place.

        A reverberant tail decays ``tail_decay_db`` below the fall (it ends the tone
        where it fell); a tone whose direct sound the room's reflections partly cancel
        holds at the lower level for ``settle_frames`` (it goes on); a rise of
        ``onset_db`` above the lowest level since the fall starts a new tone. The
        trials are few (young tones only), so this runs per bin in Python.
        """
        s = self.settings
        for j, trial in list(self._trials.items()):
            if not kept[j]:  # no longer prominent: it lapses as any tone
                continue
            level = float(peak[j])
            trial.frames += 1
            trial.dip = min(trial.dip, level)
            if jump[j] or (trial.frames >= 2 and tonal[j] and level >= trial.dip * self._onset):
                jump[j] = True
                del self._trials[j]
            elif level < trial.fall * self._tail_decay:
                decayed.append(j)
                del self._trials[j]
            elif trial.frames == 1 and not falling[j]:  # a one-frame dip, as any masking
                holding[j] = True
                del self._trials[j]
            elif trial.frames >= s.settle_frames:  # settled lower: the new reference
                holding[j] = True
                self._ref[j] = level
                del self._trials[j]
            else:
                waiting.append(j)

    # --- tones and patterns -----------------------------------------------------------

    def _near(self, j: int) -> range:
        """``j`` and its neighbours of the same kind (bins, or harmonic channels)."""
        lo, hi = (0, self._bins) if j < self._bins else (self._bins, len(self._freqs))
        return range(max(lo, j - 2), min(hi, j + 3))

    def _tone_ended(self, j: int, f: int) -> list[Detection]:
        start, last = self._start.item(j), self._last_on.item(j)
        onsets = [x for x in self._reonsets.pop(j, ()) if x <= last]
        if last + 1 - start < self.settings.min_tone_frames:
            return []
        tone = _Tone(
            start * _FRAME_S,
            (last + 1) * _FRAME_S,
            self._peak.item(j),
            _db(self._peak_ratio.item(j)),
            (last + 1 - start) * _FRAME_S,
        )
        tones = self._tones.get(j)
        if tones is None:
            tones = self._tones[j] = deque(maxlen=256)
        tones.append(tone)
        while tones[0].end_s < tone.end_s - _KEEP_S:
            tones.popleft()
        for episode in self._episodes.values():
            if j in episode.bins:
                episode.last_s = tone.end_s
        now = f * _FRAME_S
        out: list[Detection] = []
        if not self._in_alarm_band.item(j):
            return out
        split = self._pieces(j, tones, start, onsets) if onsets or j in self._split else None
        # Cheap tests first: most tones (music, speech) are not of any pattern's length.
        found: _Match | None = None
        if tone.length_s in self._t4.on:
            found = self._match_t4(j, tones)
        if (
            found is None
            and split is not None
            and (onsets or tone.length_s in self._t4.on)
            and self._group_near(split)
        ):
            found = self._match_t4_onsets(j, self._strong(split, self._t4.horizon_s))
        if found is not None:
            out += self._report("co_alarm", j, now, found)
        # A T3 tone ends, whole or in pieces (a T4 group joined is no T3: no 0.5 s gaps).
        if found is None and (
            tone.length_s in self._t3_room.on or self._joined_length(tones) in self._t3.on
        ):
            found = self._match_t3(j, tones)
            if found is not None:
                out += self._report("smoke_alarm", j, now, found)
        if self.settings.unclassified and tone.length_s >= _PERIODIC_MIN_BEEP_S:
            found = self._match_periodic(tones)
            if found is not None:
                out += self._report("alarm_sound", j, now, found)
        return out

    def _pieces(
        self, j: int, tones: deque[_Tone], start: int, onsets: list[int]
    ) -> deque[_Tone] | None:
        """The bin's tones as T4 sees them, or None while none within T4's reach had
        onsets inside it.

        A room's tail longer than T4's 0.1 s gaps merges a group's four tones into one
        (RT60 0.45-0.8 s), but each tone still rises sharply out of the tail, at T4's pace.
        Cut at those ``onsets`` (frames), the pieces are the group's tones again, each
        lasting until two frames before the next onset (the gap is lost in the tail), the
        last no longer. They are matched by their onsets only (``_match_t4_onsets``, with
        its contrast check); T3 and the other patterns keep the tones whole.
        """
        split = self._split.get(j)
        whole = tones[-1]
        if not onsets:
            if split is None:
                return None
            if whole.end_s - self._cut_s[j] > self._t4.horizon_s:  # no piece within reach
                del self._split[j], self._cut_s[j]
                return None
            split.append(whole)
        else:
            self._cut_s[j] = whole.end_s
            if split is None:
                split = self._split[j] = deque(itertools.islice(tones, len(tones) - 1), 256)
            starts = [start, *onsets]
            longest = max(b - a for a, b in itertools.pairwise(starts)) - 2
            ends = [x - 2 for x in onsets] + [
                min(round(whole.end_s / _FRAME_S), onsets[-1] + longest)
            ]
            for a, b in zip(starts, ends, strict=True):
                split.append(
                    _Tone(
                        a * _FRAME_S,
                        b * _FRAME_S,
                        whole.power,
                        whole.prominence_db,
                        (b - a) * _FRAME_S,
                    )
                )
        while split and split[0].end_s < whole.end_s - _KEEP_S:
            split.popleft()
        return split

    def _match_group(self, tones: list[_Tone], first: int, count: int, t: _Pattern) -> float | None:
        """Largest timing error of ``count`` tones from index ``first`` as one group, or None."""
        if first < 0:
            return None
        worst = 0.0
        for i in range(first, first + count):
            length = tones[i].length_s
            if length not in t.on:
                return None
            worst = max(worst, t.on.error(length))
            if i > first:
                g = tones[i].start_s - tones[i - 1].end_s
                if g not in t.gap:
                    return None
                worst = max(worst, t.gap.error(g))
        if first > 0:  # the tone before must not belong to the group (1 Hz beepers)
            before = tones[first - 1]
            if before.length_s in t.on and tones[first].start_s - before.end_s in t.gap:
                return None
        return worst

    def _after_pause(self, tones: list[_Tone], start_s: float, t: _Pattern) -> list[int]:
        """Indices of tones ending a pause before ``start_s`` (latest first).

        Whatever sounded inside the pause (speech, a clink) is skipped, not held against
        the alarm.
        """
        found = []
        for i in range(len(tones) - 1, -1, -1):
            p = start_s - tones[i].end_s
            if p > t.pause.high:
                break
            if p >= t.pause.low:
                found.append(i)
        return found

    def _joined_length(self, tones: deque[_Tone]) -> float:
        """Length of the last tone with the pieces just before it (see ``_join``)."""
        last = tones[-1]
        start = last.start_s
        for x in itertools.islice(reversed(tones), 1, None):
            if start - x.end_s > _JOIN_GAP_S:
                break
            start = min(start, x.start_s)
        return last.end_s - start

    @classmethod
    def _joined(cls, tones: deque[_Tone], t: _Pattern, gap_s: float) -> list[_Tone] | None:
        """The recent tones with pieces of one tone put back together, if any were."""
        since = tones[-1].end_s - t.horizon_s
        recent = [x for x in tones if x.end_s >= since]
        out = cls._join(recent, t, gap_s)
        return out if len(out) < len(recent) else None

    @staticmethod
    def _join(tones: Iterable[_Tone], t: _Pattern, gap_s: float) -> list[_Tone]:
        """``tones`` (in order) with pieces of one tone put back together.

        At low SNR speech and TV cut a T3 tone (0.5 s) into pieces wherever they mask it;
        pieces less than ``_JOIN_GAP_S`` apart cannot be separate T3 tones (their gaps
        are 0.31 s at the least), so they are one. Pieces join only while they sound
        ``_JOIN_SOUNDING`` of the joined tone (a beeper's beeps, half on, stay apart)
        and it is no longer than the pattern's tones.
        """
        out: list[_Tone] = []
        sounding: list[float] = []  # how long each of ``out`` sounds (its pieces' lengths)
        for x in tones:
            if (
                out
                and x.start_s - out[-1].end_s <= gap_s
                and x.end_s - out[-1].start_s <= t.on.high
                and sounding[-1] + x.length_s >= _JOIN_SOUNDING * (x.end_s - out[-1].start_s)
            ):
                sounding[-1] += x.length_s
                p = out[-1]
                out[-1] = _Tone(
                    p.start_s,
                    x.end_s,
                    max(p.power, x.power),
                    max(p.prominence_db, x.prominence_db),
                    x.end_s - p.start_s,
                )
            else:
                out.append(x)
                sounding.append(x.length_s)
        return out

    def _strong(self, tones: Sequence[_Tone], horizon_s: float) -> list[_Tone]:
        """The recent tones at most ``_WEAKER_DB`` below the one that just ended."""
        last = tones[-1]
        floor = last.power * self._weaker
        since = last.end_s - horizon_s
        out = []
        for t in reversed(tones):  # in order of their ends
            if t.end_s < since:
                break
            if t.power >= floor:
                out.append(t)
        out.reverse()
        return out

    def _even(
        self,
        j: int,
        tones: list[_Tone],
        pause: tuple[float, float],
        t: _Pattern,
        gap_s: float | None,
    ) -> bool:
        """One alarm's tones are alike, and nothing like them sounds around its groups.

        Alike: within ``_WEAKER_DB`` in level and about equally long (an alarm is
        precise, chance tones from speech and music are not). Around: the pause may hold
        other sounds (speech in the same bin) but no tone as loud and long as the
        alarm's, and no such tone may precede the first group at the group's own pace
        (a steady beeper that lost one beep in this bin). Neighbouring bins count too,
        for a tone near a bin edge is sometimes seen in one bin only. ``gap_s``: the
        match joined pieces (``_join``), so the tones around are joined alike.
        """
        powers = [x.power for x in tones]
        low = min(powers)
        if low < max(powers) * self._weaker:
            return False
        lengths = sorted(x.length_s for x in tones)
        median = lengths[len(lengths) // 2]
        spread = _LENGTH_SLACK_S + _LENGTH_SPREAD * median
        if lengths[-1] - median > spread or median - lengths[0] > spread:
            return False
        first = tones[0].start_s
        before = (first - t.on.high - t.gap.high, first - t.on.low - t.gap.low)
        margin = 3 * _FRAME_S
        for b in self._near(j):
            around: Iterable[_Tone] = self._tones.get(b, ())
            if gap_s is not None:  # seen as the match was: pieces joined
                around = self._join(around, t, gap_s)
            for x in around:
                if x.power < low * 0.5 or x.length_s not in t.on:
                    continue
                if pause[0] + margin < x.start_s < pause[1] - margin:
                    return False
                if before[0] <= x.start_s <= before[1]:
                    return False
        return True

    def _match_t3(self, j: int, tones: deque[_Tone]) -> _Match | None:
        """T3 group, pause, first two tones of the next group (the second just ended).

        Two, not one: three beeps and, by chance, one tone of the music a pause later
        happen; two in the T3 rhythm rarely do.
        """
        t, room = self._t3, self._t3_room
        last = tones[-1].length_s
        found = self._match_t3_in(j, tones, None, t) if last in t.on else None
        # Tones cut into pieces: judged joined. Not always: a reverberant tail that swells
        # again just after a tone is no piece of it (it is skipped).
        if found is None and (joined := self._joined(tones, t, _JOIN_GAP_S)):
            found = self._match_t3_in(j, joined, _JOIN_GAP_S, t)
        if found is None and last in room.on:
            found = self._match_t3_in(j, tones, None, room)
        return found

    def _match_t3_in(
        self, j: int, tones: Sequence[_Tone], gap_s: float | None, t: _Pattern
    ) -> _Match | None:
        # Blips between the tones (a reverberant tail swelling again, a click of the
        # music) are skipped: T3 tones are long enough to tell apart from them.
        c = [x for x in self._strong(tones, t.horizon_s) if x.length_s in t.on]
        first = len(c) - 2
        b = self._match_group(c, first, 2, t) if first >= 3 else None
        if b is None:
            return None
        b1 = c[first]
        for i in self._after_pause(c[:first], b1.start_s, t):
            group = self._match_group(c, i - 2, 3, t)
            matched = [*c[i - 2 : i + 1], *c[first:]]
            if (
                group is not None
                and (t is self._t3 or self._paced(matched))
                and self._even(j, matched, (c[i].end_s, b1.start_s), t, gap_s)
                and self._partials(j, matched)
            ):
                error = max(group, b, t.pause.error(b1.start_s - c[i].end_s))
                return _Match(error, self.settings.tolerance, matched)
        return None

    def _paced(self, tones: list[_Tone]) -> bool:
        """The onsets of a T3 match (three, then two) keep T3's pace.

        A room's tail lengthens every tone and shortens every gap by as much: an alarm
        drifted towards long tones or short gaps then leaves T3's windows (a 0.64 s tone
        is tracked 0.74 s long at RT60 0.6 s). Its onsets do not move, so a T3 match with
        tones up to ``_ROOM_S`` longer and gaps that much shorter is accepted when they
        come at T3's pace (tone plus gap, within tolerance).
        """
        return all(
            b.start_s - a.start_s in self._t3_period
            for g in (tones[:3], tones[3:])
            for a, b in itertools.pairwise(g)
        )

    def _group_near(self, tones: deque[_Tone]) -> bool:
        """Three tones about as loud as the last one within a T4 group's reach before it,
        one of them at T4's pace: a cheap test most short tones (speech, music) fail."""
        last = tones[-1]
        reach, floor, before = last.start_s - self._t4_reach, last.power * self._weaker, 0
        low, high = self._t4_next
        paced = False
        for x in itertools.islice(reversed(tones), 1, None):
            if x.start_s < reach:
                break
            if x.power >= floor:
                before += 1
                paced = paced or low <= last.start_s - x.start_s <= high
        return before >= 3 and paced

    def _match_t4(self, j: int, tones: deque[_Tone]) -> _Match | None:
        """Two T4 groups with the pause between them (the second just ended)."""
        if not self._group_near(tones):
            return None
        t = self._t4
        c = self._strong(tones, t.horizon_s)
        if len(c) < 8:  # two groups of four, told by their lengths or by their onsets
            return None
        first = len(c) - 4
        b = self._match_group(c, first, 4, t)
        if b is None:
            return self._match_t4_onsets(j, c)
        for i in self._after_pause(c[:first], c[first].start_s, t):
            a = self._match_group(c, i - 3, 4, t)
            matched = [*c[i - 3 : i + 1], *c[first:]]
            pause = (c[i].end_s, c[first].start_s)
            if (
                a is not None
                and not _fading(matched)
                and self._partials(j, matched)
                and (self._even(j, matched, pause, t, None) or self._contrast(j, matched, pause))
            ):
                error = max(a, b, t.pause.error(c[first].start_s - c[i].end_s))
                return _Match(error, self.settings.tolerance, matched)
        # The last four make a group but no first group matches them: blips may sit
        # between its tones (speech cutting them), which only the onsets see past.
        return self._match_t4_onsets(j, c)

    def _onset_group(self, c: list[_Tone], last: int, period: float | None) -> list[int] | None:
        """Indices of four tones up to ``c[last]`` whose onsets are evenly spaced at T4's
        pace (``period``, if given, within ``_PERIOD_SPREAD_S``); tones between them (a
        ringing tail, a blip) are passed over."""
        pace = self._t4_period
        starts = [x.start_s for x in c]
        s4 = starts[last]
        for k3 in range(last - 1, -1, -1):
            p = s4 - starts[k3]
            if p > pace.high:
                break
            if p < pace.low or (period is not None and abs(p - period) > _PERIOD_SPREAD_S):
                continue
            group = [last, k3]
            for _ in range(2):
                want = starts[group[-1]] - p
                near = [
                    k
                    for k in range(group[-1] - 1, -1, -1)
                    if abs(starts[k] - want) <= _PERIOD_SPREAD_S
                ]
                if not near:
                    break
                group.append(min(near, key=lambda k: abs(starts[k] - want)))
            if len(group) == 4 and all(c[k].length_s < p for k in group):
                return group[::-1]
        return None

    def _match_t4_onsets(self, j: int, c: list[_Tone]) -> _Match | None:
        """Two T4 groups told by their onsets, for rooms and low SNR.

        A room's reverberation rings on into T4's 0.1 s gaps, and a masker cuts tones or
        adds blips, so tone lengths and gaps stop matching; the onsets keep the alarm's
        clockwork pace. Both groups must be about as loud (the median tone within
        ``_WEAKER_DB``), and the match must show the contrast ``_contrast`` asks for.
        """
        t = self._t4
        b = self._onset_group(c, len(c) - 1, None)
        if b is None:
            return None
        pace = c[b[3]].start_s - c[b[0]].start_s
        b1 = c[b[0]]
        for i in self._after_pause(c[: b[0]], b1.start_s, t):
            a = self._onset_group(c, i, pace / 3)
            if a is None:
                continue
            matched = [c[k] for k in a + b]
            pause = (c[i].end_s, b1.start_s)
            # One alarm: both groups about as loud (a tone or two may be masked).
            louder, softer = sorted(
                (float(np.median([c[k].power for k in g])) for g in (a, b)), reverse=True
            )
            if (
                softer >= louder * self._weaker
                and not _fading(matched)
                and self._partials(j, matched)
                and self._contrast(j, matched, pause)
            ):
                period = _Window(t.on.nominal + t.gap.nominal, self.settings.tolerance, 0.0)
                error = max(period.error(pace / 3), t.pause.error(pause[1] - pause[0]))
                return _Match(error, self.settings.tolerance, matched, "onsets")
        return None

    def _contrast(self, j: int, tones: list[_Tone], pause: tuple[float, float]) -> bool:
        """The bin stands out while the matched tones sound, and hardly ever in the pause.

        For T4 matches that ``_even`` rejects (at low SNR speech in the pause, a masked
        or swollen tone, a tone split in two). A matched filter over the cycle from the
        bin's stored prominence: the tones' onsets are as regular as an alarm's
        (``_PERIOD_SPREAD_S``); over the pause (whatever sounded in it) the 90th
        percentile is ``_CONTRAST_DB`` below the tones' median, and at most
        ``_PAUSE_LOUD_SHARE`` of its frames come within ``_WEAKER_DB`` / 2 of it; the
        slots one period before and after the first group are quieter than the weakest
        matched tone. A tune, beeper or timer that goes on through the pause fails. Runs
        only for the rare candidates that pass the timing, over stored prominence, so
        the per-frame cost is one row copy.
        """
        periods = [
            b.start_s - a.start_s for g in (tones[:4], tones[4:]) for a, b in itertools.pairwise(g)
        ]
        if max(periods) - min(periods) > _PERIOD_SPREAD_S:
            return False
        hist, size = self._history, len(self._history)
        if self._frame - round(tones[0].start_s / _FRAME_S) >= size:
            return False
        margin = 3
        off = np.arange(round(pause[0] / _FRAME_S) + margin, round(pause[1] / _FRAME_S) - margin)
        if len(off) < 10:
            return False
        frames = [np.arange(round(x.start_s / _FRAME_S), round(x.end_s / _FRAME_S)) for x in tones]
        level = float(np.median(hist[np.concatenate(frames) % size, j]))
        # No tone at the group's pace just before or after the first group, as loud as
        # the weakest matched one: the match would be one tone off (a speech blip taken
        # for the first tone, the true fourth left in the pause).
        weakest = min(float(np.median(hist[x % size, j])) for x in frames)
        period = round(sum(periods) / len(periods) / _FRAME_S)
        for x, at in ((frames[0], frames[0][0] - period), (frames[3], frames[3][0] + period)):
            if float(np.median(hist[(x - x[0] + at) % size, j])) >= weakest:
                return False
        rest = hist[off % size, j]
        if np.mean(rest >= level * 10 ** (-_WEAKER_DB / 20)) > _PAUSE_LOUD_SHARE:
            return False
        return _db(level / max(float(np.percentile(rest, 90)), 1e-9)) >= _CONTRAST_DB

    def _partials(self, j: int, tones: list[_Tone]) -> bool:
        """A harmonic channel's match rests on several of its harmonics, not on one.

        A square wave sounds all its odd harmonics. One strong partial alone (a note's
        harmonic, a sine alarm) lifts a channel's geometric mean too, and the chance
        peaks of the floor in its other bins then cut the channel into tones of any
        rhythm (music made a T3 so). So ``_PARTIALS`` of the channel's harmonics must
        stand ``_PARTIAL_DB`` out over the matched tones (median of their frames' stored
        prominence); masking that hides one harmonic still leaves three. A sine alarm is
        matched in its own bin. Runs only for matches on harmonic channels.
        """
        if j < self._bins:
            return True
        hist, size = self._history, len(self._history)
        frames = np.concatenate(
            [np.arange(round(x.start_s / _FRAME_S), round(x.end_s / _FRAME_S)) for x in tones]
        )
        frames = frames[frames > self._frame - size]
        if not len(frames):
            return False
        bins = self._harmonics[j - self._bins]
        level = np.median(hist[np.ix_(frames % size, bins)], axis=0)
        return int(np.count_nonzero(level >= 10 ** (_PARTIAL_DB / 10))) >= _PARTIALS

    def _match_periodic(self, tones: deque[_Tone]) -> _Match | None:
        """A regular beeping lasting ``unclassified_min_s`` (the last tone just ended).

        Only tones like the last one (level, length) count, so stray tones from speech
        or music in the same bin neither make nor break the rhythm; and it must beep at
        least every ``_PERIODIC_MAX_PERIOD_S`` on average, in a cycle of 1-3 beeps.
        """
        s = self.settings
        last = tones[-1]
        # A bin's tones do not overlap: the first one sets the longest span possible.
        if last.end_s - tones[0].start_s < s.unclassified_min_s:
            return None
        spread = _LENGTH_SLACK_S + 0.25 * last.length_s
        # Back from the last tone, while tones like it follow each other closely enough.
        since = last.end_s - (s.unclassified_min_s + s.unclassified_max_gap_s)
        low = max(last.power * self._weaker, last.power * 0.25)
        chain = [last]
        for t in itertools.islice(reversed(tones), 1, None):
            if t.end_s < since:
                break
            if t.power < low or abs(t.length_s - last.length_s) > spread:
                continue
            if chain[-1].start_s - t.end_s > s.unclassified_max_gap_s:
                break
            chain.append(t)
        chain.reverse()
        span = chain[-1].end_s - chain[0].start_s
        if span < s.unclassified_min_s or len(chain) < max(4, span / _PERIODIC_MAX_PERIOD_S):
            return None
        if sorted(t.length_s for t in chain)[len(chain) // 2] < _PERIODIC_MIN_BEEP_S:
            return None
        if np.mean([t.prominence_db for t in chain]) < s.unclassified_prominence_db:
            return None
        starts = np.array([t.start_s for t in chain])
        best = math.inf
        for lag in range(1, 4):
            if len(starts) < 3 * lag + 1:
                break
            period = starts[lag:] - starts[:-lag]
            jitter = float(np.std(period)) - _FRAME_S * 1.5  # what 20 ms frames blur
            best = min(best, jitter / float(np.mean(period)))
        if best > s.unclassified_regularity:
            return None
        return _Match(best, s.unclassified_regularity, chain)

    def _check_continuous(self, f: int) -> list[Detection]:
        """``alarm_sound`` for a tone that has not stopped for ``unclassified_min_s``."""
        long = self._start <= f - self._continuous_frames
        long &= self._active
        long &= self._in_alarm_band
        if not np.count_nonzero(long):
            # None yet: look again when the earliest tone sounding now (or one that
            # starts later) could have sounded long enough.
            sounding = self._active & self._in_alarm_band
            starts = self._start[sounding]
            self._long_from = int(starts.min()) + self._continuous_frames if len(starts) else _NEVER
            return []
        j = int(np.flatnonzero(long)[np.argmax(self._peak[long])])
        if _db(float(self._peak_ratio[j])) < self.settings.unclassified_prominence_db:
            return []
        tone = _Tone(
            self._start[j] * _FRAME_S,
            (f + 1) * _FRAME_S,
            float(self._peak[j]),
            _db(float(self._peak_ratio[j])),
            (f + 1 - int(self._start[j])) * _FRAME_S,
        )
        now = (f + 1) * _FRAME_S
        return self._report("alarm_sound", j, now, _Match(0.0, 1.0, [tone], "continuous"))

    # --- episodes ---------------------------------------------------------------------

    def _refresh_episodes(self, f: int) -> None:
        now = f * _FRAME_S
        for kind, episode in list(self._episodes.items()):
            if np.count_nonzero(self._active[list(episode.bins)]):
                episode.last_s = now
            elif now - episode.last_s > self.settings.cooldown_s:
                logger.debug("%s episode over at %.2f s", kind, now)
                del self._episodes[kind]

    def _report(
        self,
        kind: str,
        j: int,
        now: float,
        match: _Match,
    ) -> list[Detection]:
        episode = self._episodes.get(kind)
        near = set(self._near(j))
        if episode is not None:
            episode.bins |= near
            episode.last_s = now
            return []
        if kind == "alarm_sound" and (
            "smoke_alarm" in self._episodes or "co_alarm" in self._episodes
        ):
            return []
        self._episodes[kind] = _Episode(now, near)
        s = self.settings
        freq = float(self._freqs[j])
        tones, error = match.tones, match.error
        prominence = float(np.mean([t.prominence_db for t in tones]))
        timing = max(0.0, 1.0 - error / max(match.scale, 1e-9))
        strength = min(1.0, max(0.0, (prominence - s.prominence_db) / 20.0))
        if kind == "alarm_sound":
            confidence = 0.4 + 0.2 * timing + 0.15 * strength  # at most 0.75: unclassified
            detail = f"unclassified {match.how} tone at ~{freq:.0f} Hz, neither T3 nor T4"
        else:
            confidence = 0.55 + 0.25 * timing + 0.2 * strength
            pattern = "T3" if kind == "smoke_alarm" else "T4"
            detail = f"{pattern} at ~{freq:.0f} Hz, timing off nominal by {error:.0%} at most"
        level = _db(max(t.power for t in tones) / self._full_power)
        detection = Detection(
            detector=self.name,
            kind=kind,
            start_s=round(tones[0].start_s, 3),
            end_s=round(now, 3),
            confidence=round(confidence, 3),
            level_dbfs=round(level, 1),
            detail=detail + "; level: tone peak, dBFS re full-scale sine",
        )
        logger.info("%s at %.2f s: %s", kind, now, detail)
        return [detection]
