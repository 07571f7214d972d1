"""Glass-break detector: a low-frequency impact, then broadband impulsive shatter.

Breaking glass has a two-phase signature: the pane flexes under the blow (a thud below
400 Hz with a fast attack) and, within ~0.2 s, breaks into shards whose hundreds of clicks and
short rings fill 4-16 kHz evenly (a flat spectrum) with sharp peaks (a high crest factor) for
a few hundred ms. Each phase alone is common in a home (a door slam, a dropped pan, a clank,
a hiss); the sequence, with the shatter's shape checked, is not. The shatter's onset is
judged per sub-band of 4-16 kHz against that sub-band's own recent background, with a
threshold scaled to how much the background itself moves (CFAR): in a steady hiss a 5 dB
rise is an event, in speech a fricative is not, and a shatter shows in the sub-bands that
speech leaves quiet. Look-alikes and why they fail: a mail slot or dropped keys (thud then
*tonal* metal ring: low spectral flatness), a door slam or a clap (the broadband crack lasts
one frame), a snare or a fricative (noise, but Gaussian: low crest and a smooth spectrum), a
cymbal (too long), a buzzer or a beep (harmonics that stay put from frame to frame, where
shards ring at new frequencies in each). At a low SNR the background's noise smooths the
clicks' peaks in time (the crest) before the rings' peaks in frequency: a clearly spiky,
broadband spectrum lets a crest close to noise's through.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import Enum

import numpy as np

from agent.audio.format import FRAME_SAMPLES, SAMPLE_RATE
from agent.edge.base import Detection, FrameSpectrum, check_settings
from agent.edge.level import FLOOR_DBFS, FULL_SCALE

log = logging.getLogger(__name__)

_BIN_HZ = SAMPLE_RATE / FRAME_SAMPLES  # 50 Hz
_RECENT_S = 0.5
_SMOOTH = np.full(11, 1 / 11)
_TINY = 1e-3
"""Added to band energies (~-170 dBFS), so that digital silence has a level ratio."""


@dataclass(frozen=True, slots=True)
class GlassBreakSettings:
    """Thresholds of the two phases; levels are band levels in dBFS (RMS re full scale)."""

    low_band_hz: tuple[float, float] = (40.0, 400.0)
    """Band of the impact (a pane's and a frame's low modes; speech lives mostly above)."""
    high_band_hz: tuple[float, float] = (4000.0, 16000.0)
    """Band of the shatter."""
    impact_min_dbfs: float = -50.0
    """Quietest impact (low-band level) considered."""
    impact_rise_db: float = 15.0
    """The impact's low-band level must be this far above the low band's background ..."""
    attack_db: float = 10.0
    """... and this far above the previous two frames (a fast attack, not a swell)."""
    impact_low_over_mid_db: float = 0.0
    """In the impact frame, the low band must exceed the 1-4 kHz band by this (claps do not)."""
    shatter_window_s: float = 0.2
    """The shatter must begin within this time of the impact."""
    shatter_min_dbfs: float = -60.0
    """Quietest shatter (high-band level) considered."""
    high_bands: int = 4
    """The shatter band is split into this many sub-bands (equal widths on a log scale), each
    judged against its own background: broadband shatter rises in all of them at once, while
    a background's energy (a fricative, a hum's harmonics, pink noise) sits in some."""
    onset_bands: int = 3
    """The shatter begins when at least this many sub-bands rise over their background ..."""
    shatter_rise_db: float = 10.0
    """... by this much where the background fluctuates (speech, music) ..."""
    min_rise_db: float = 4.0
    """... and by no less than this where it is steady (a fan, rain, a room's hiss) ..."""
    spread_factor: float = 3.0
    """... the rise needed in between being this many times the band's spread: the RMS of its
    frames' rises over its own background (a CFAR threshold)."""
    sustain_bands: int = 2
    """The shatter lasts while at least this many sub-bands stay over their background from
    before it ..."""
    sustain_db: float = 6.0
    """... by this much where the background fluctuates ..."""
    min_sustain_db: float = 3.0
    """... or no less than this where it is steady (the spread rule as for the rise) ..."""
    decay_range_db: float = 30.0
    """... and the high band stays within this range of its own peak."""
    gap_s: float = 0.06
    """Dips in the high band shorter than this do not end the shatter."""
    min_shatter_s: float = 0.1
    """Shorter high-band bursts (a crack, a clap, a click) are not shatter."""
    max_shatter_s: float = 1.5
    """Longer ones (a cymbal, a hiss, a running tap) are not either."""
    min_flatness: float = 0.08
    """Median spectral flatness of 4-16 kHz over the shatter (tonal metal is ~0.01) ..."""
    max_local_flatness: float = 0.58
    """Largest median flatness of the 4-16 kHz spectrum relative to its own smoothed shape:
    shards ring at their own frequencies, so a shatter's spectrum is spiky, while Gaussian
    noise of any colour (a hiss, a snare or a hi-hat, the room) gives ~0.62 (an exponential
    distribution's 0.56, raised by the smoothing)."""
    min_crest: float = 3.75
    """Median crest factor (peak/RMS) of the high-passed shatter frames (noise: ~3.5) ..."""
    crest_range_db: float = 10.0
    """... over the frames whose high band is within this of the shatter's loudest (the local
    flatness and the checks below too) ..."""
    spiky_local_flatness: float = 0.53
    """... or, when the spectrum is this spiky (median local flatness at most this), no less
    than ``min_spiky_crest``: at a low SNR the background fills in the clicks' peaks in time
    sooner than the rings' peaks in frequency, so a clearly spiky spectrum vouches for it ..."""
    min_spiky_crest: float = 3.3
    """... (smoother than noise is a tone) ..."""
    min_spiky_flatness: float = 0.13
    """... if its peaks spread over the whole band (median flatness at least this), where a
    beep's or a chord's harmonics, spiky too, leave most of it empty (~0.09) ..."""
    max_spiky_repeat: float = 0.3
    """... and move (``max_repeat``, no more than this): keys' partials ring 20-100 ms, over
    several frames (0.35-0.6), a shard's 3-20 ms."""
    max_repeat: float = 0.4
    """Largest median correlation between successive shatter frames' spectral peak patterns
    (the log of 4-16 kHz over its smoothed shape): shards ring at new frequencies in every
    frame (~0.15, at most ~0.3), while a buzzer's, a beep's or a chord's harmonics stay put
    (~0.5-0.95)."""
    cooldown_s: float = 5.0
    """After a detection, no other for this long (one break, however long its debris falls)."""
    floor_up_s: float = 5.0
    """Time constant with which the background level estimates rise ..."""
    floor_down_s: float = 0.2
    """... and fall (the impact band's minimum-tracking floor)."""
    spread_s: float = 2.0
    """Time constant of each shatter sub-band's spread (see ``spread_factor``)."""

    def __post_init__(self) -> None:
        check_settings(
            self,
            {
                "impact_min_dbfs": (-120.0, 0.0),
                "impact_rise_db": (0.0, 80.0),
                "attack_db": (0.0, 80.0),
                "impact_low_over_mid_db": (-40.0, 40.0),
                "shatter_window_s": (0.0, 2.0),
                "shatter_min_dbfs": (-120.0, 0.0),
                "high_bands": (1, 16),
                "onset_bands": (1, 16),
                "shatter_rise_db": (0.0, 80.0),
                "min_rise_db": (0.0, 80.0),
                "spread_factor": (0.0, 100.0),
                "sustain_bands": (1, 16),
                "sustain_db": (0.0, 80.0),
                "min_sustain_db": (0.0, 80.0),
                "decay_range_db": (1.0, 120.0),
                "gap_s": (0.0, 1.0),
                "min_shatter_s": (0.0, 10.0),
                "max_shatter_s": (0.02, 10.0),
                "min_flatness": (0.0, 1.0),
                "max_local_flatness": (0.0, 1.0),
                "min_crest": (0.0, 100.0),
                "spiky_local_flatness": (0.0, 1.0),
                "min_spiky_crest": (0.0, 100.0),
                "min_spiky_flatness": (0.0, 1.0),
                "max_spiky_repeat": (-1.0, 1.0),
                "max_repeat": (-1.0, 1.0),
                "crest_range_db": (0.0, 120.0),
                "cooldown_s": (0.0, 3600.0),
                "floor_up_s": (0.02, 600.0),
                "floor_down_s": (0.02, 600.0),
                "spread_s": (0.02, 600.0),
            },
        )
        for name in ("low_band_hz", "high_band_hz"):
            band = getattr(self, name)
            if (
                not isinstance(band, tuple | list)
                or len(band) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in band)
                or not 0 <= band[0] < band[1] <= SAMPLE_RATE / 2
            ):
                raise ValueError(
                    f"GlassBreakSettings.{name} must be (low, high) Hz with "
                    f"0 <= low < high <= {SAMPLE_RATE // 2}, got {band!r}"
                )
            object.__setattr__(self, name, (float(band[0]), float(band[1])))
        for name in ("onset_bands", "sustain_bands"):
            if getattr(self, name) > self.high_bands:
                raise ValueError(
                    f"GlassBreakSettings.{name} must be at most high_bands "
                    f"({self.high_bands}), got {getattr(self, name)!r}"
                )
        for low, high in (("min_rise_db", "shatter_rise_db"), ("min_sustain_db", "sustain_db")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(
                    f"GlassBreakSettings.{low} must not exceed {high}, got "
                    f"{getattr(self, low)!r} > {getattr(self, high)!r}"
                )
        if self.max_shatter_s <= self.min_shatter_s:
            raise ValueError(
                "GlassBreakSettings.max_shatter_s must exceed min_shatter_s, got "
                f"{self.max_shatter_s!r} <= {self.min_shatter_s!r}"
            )


class _State(Enum):
    IDLE = 1
    IMPACT = 2
    SHATTER = 3
    WAIT_QUIET = 4


def _bins(band: tuple[float, float]) -> tuple[int, int]:
    lo = max(1, math.ceil(band[0] / _BIN_HZ))
    hi = min(FRAME_SAMPLES // 2, math.floor(band[1] / _BIN_HZ))
    return lo, max(lo + 1, hi + 1)


def _sub_bands(band: tuple[float, float], count: int) -> np.ndarray:
    """Bin edges of ``count`` sub-bands of ``band``, equally wide on a log scale, each at least
    one bin (``count + 1`` increasing bin indices)."""
    lo, hi = _bins(band)
    ratio = band[1] / max(band[0], _BIN_HZ)
    edges = [lo]
    for i in range(1, count):
        edge = round(max(band[0], _BIN_HZ) * ratio ** (i / count) / _BIN_HZ)
        edges.append(min(max(edge, edges[-1] + 1), hi - (count - i)))
    edges.append(hi)
    return np.array(edges)


class GlassBreakDetector:
    """Impact then shatter (see the module docstring); one detection per break.

    Each shatter sub-band keeps a background: its mean energy over the last 0.5 s and its
    spread, the RMS of the frames' rises over that mean. The rise that counts as an onset is a
    multiple of the spread (so a steady background lets a quiet shatter through, a
    fluctuating one needs a clear rise), between ``min_rise_db`` and ``shatter_rise_db``.

    The decision comes when the shatter ends (typically 0.3-0.8 s after the impact).
    ``start_s`` is the impact, ``end_s`` the shatter's end; ``level_dbfs`` is the loudest
    frame's full-band level. Confidence is 0.5 when the shatter's flatness and crest just
    pass their thresholds (for the crest, the one that applied) and reaches 1.0 at twice each.
    """

    name = "glass_break"

    def __init__(
        self, settings: GlassBreakSettings | None = None, spectrum: FrameSpectrum | None = None
    ) -> None:
        """``spectrum``: shared with the other detectors of the stream (one FFT a frame)."""
        self.settings = s = settings or GlassBreakSettings()
        self._spectrum = spectrum or FrameSpectrum()
        # Band mean squares from the one-sided power spectrum: 2 |X|^2 / (N sum w^2).
        self._scale = 2.0 / (FRAME_SAMPLES * float(np.sum(self._spectrum.window**2)))
        self._to_db = 10.0 * math.log10(self._scale / (FULL_SCALE * FULL_SCALE))
        self._low = _bins(s.low_band_hz)
        self._mid = _bins((1000.0, 4000.0))
        edges = _sub_bands(s.high_band_hz, s.high_bands)
        self._high = (int(edges[0]), int(edges[-1]))
        self._starts = edges[:-1] - edges[0]
        frame_s = FRAME_SAMPLES / SAMPLE_RATE
        self._up = 1.0 - math.exp(-frame_s / s.floor_up_s)
        self._down = 1.0 - math.exp(-frame_s / s.floor_down_s)
        self._recent = 1.0 - math.exp(-frame_s / _RECENT_S)
        self._spread_rate = 1.0 - math.exp(-frame_s / s.spread_s)
        self.reset()

    def reset(self) -> None:
        s = self.settings
        self._samples = 0
        self._state = _State.IDLE
        self._floor_low: float | None = None
        self._recent_energy: np.ndarray | None = None
        """Each shatter sub-band's mean energy over the last ``_RECENT_S`` before an event
        (kept as energy: the mean of what sounded, not of its decibels)."""
        self._spread2 = np.full(s.high_bands, (s.shatter_rise_db / max(s.spread_factor, 1.0)) ** 2)
        """Each sub-band's mean square rise (dB^2) over its recent mean; starts cautious."""
        self._shatter_ref = np.ones(s.high_bands)
        self._sustain = np.full(s.high_bands, s.sustain_db)
        self._history = [FLOOR_DBFS, FLOOR_DBFS]
        self._quiet_until = 0.0
        self._impact_s = 0.0
        self._shatter_s = 0.0
        self._last_active_s = 0.0
        self._peak_high = FLOOR_DBFS
        self._peak_level = FLOOR_DBFS
        self._flatness: list[float] = []
        self._loud: list[tuple[float, float, float, float]] = []
        """(high-band level, crest factor, local flatness, repeat) of each frame of the
        shatter; repeat is the correlation of its peak pattern with the previous frame's."""
        self._pattern: np.ndarray | None = None

    def _db(self, energy: float) -> float:
        if energy <= 0:
            return FLOOR_DBFS
        return max(FLOOR_DBFS, 10.0 * math.log10(energy) + self._to_db)

    def _rise_needed(self, low: float, high: float) -> np.ndarray:
        """The rise over each sub-band's background that counts, from its spread."""
        spread = np.sqrt(self._spread2) * self.settings.spread_factor
        return np.asarray(np.clip(spread, low, high), dtype=np.float64)

    def feed(self, frame: np.ndarray) -> list[Detection]:
        if frame.shape != (FRAME_SAMPLES,) or frame.dtype != np.int16:
            raise ValueError(
                f"expected {FRAME_SAMPLES} int16 samples, got {frame.dtype} {frame.shape}"
            )
        s = self.settings
        power = self._spectrum.power(frame, self._samples // FRAME_SAMPLES)
        start = self._samples / SAMPLE_RATE
        self._samples += FRAME_SAMPLES
        now = self._samples / SAMPLE_RATE
        # np.add.reduce is ndarray.sum without its Python wrapper (a frame's cost is in such).
        low = self._db(float(np.add.reduce(power[self._low[0] : self._low[1]])))
        high_power = power[self._high[0] : self._high[1]]
        # Each sub-band's energy (a hair over zero, so that digital silence has a ratio).
        bands = np.add.reduceat(high_power, self._starts)
        high = self._db(float(np.add.reduce(bands)))
        bands += _TINY
        floor_low = low if self._floor_low is None else self._floor_low
        recent = bands if self._recent_energy is None else self._recent_energy
        rise = 10.0 * np.log10(bands / recent)  # each sub-band over its background, dB

        out: list[Detection] = []
        if (
            self._state is _State.SHATTER
            and now > self._quiet_until
            and self._is_impact(power, low, floor_low)
        ):
            # A new blow while the last candidate still runs (speech or music can look like
            # a long shatter): judge that one now and follow this one.
            out += self._decide(now)
        if self._state is _State.IDLE or self._state is _State.IMPACT:
            if self._is_impact(power, low, floor_low) and now > self._quiet_until:
                self._state = _State.IMPACT
                self._impact_s = start
                self._peak_level = FLOOR_DBFS
            elif self._state is _State.IMPACT and start - self._impact_s > s.shatter_window_s:
                self._state = _State.IDLE
            if self._state is _State.IMPACT:
                self._peak_level = max(self._peak_level, self._db(float(power.sum())))
                # The shatter rises over what sounded in each sub-band just before, in most
                # of them at once (it is broadband); it lasts while it stands over that.
                rising = rise >= self._rise_needed(s.min_rise_db, s.shatter_rise_db)
                if high >= s.shatter_min_dbfs and int(np.count_nonzero(rising)) >= s.onset_bands:
                    self._state = _State.SHATTER
                    self._shatter_s = start
                    self._last_active_s = now
                    self._shatter_ref = recent.copy()
                    self._sustain = self._rise_needed(s.min_sustain_db, s.sustain_db)
                    self._peak_high = high
                    self._flatness = []
                    self._loud = []
                    self._pattern = None
        if self._state is _State.SHATTER:
            self._peak_level = max(self._peak_level, self._db(float(power.sum())))
            self._peak_high = max(self._peak_high, high)
            standing = 10.0 * np.log10(bands / self._shatter_ref) >= self._sustain
            active = (
                int(np.count_nonzero(standing)) >= s.sustain_bands
                and high >= self._peak_high - s.decay_range_db
            )
            if active:
                self._last_active_s = now
                self._flatness.append(_flatness(high_power))
                d = np.diff(frame.astype(np.float64), 2)
                rms = math.sqrt(float(np.dot(d, d)) / len(d))
                crest = float(np.max(np.abs(d))) / rms if rms > 0 else 0.0
                ratio = _peak_ratio(high_power)
                pattern = np.log(ratio)
                pattern -= pattern.mean()
                repeat = _correlation(pattern, self._pattern) if self._pattern is not None else 0.0
                self._pattern = pattern
                self._loud.append((high, crest, _flatness(ratio), repeat))
                if now - self._shatter_s > s.max_shatter_s:
                    self._state = _State.WAIT_QUIET
            elif now - self._last_active_s >= s.gap_s:
                out += self._decide(now)
        elif self._state is _State.WAIT_QUIET and not np.any(
            rise >= self._rise_needed(s.min_sustain_db, s.sustain_db)
        ):
            self._state = _State.IDLE

        # Backgrounds: not during a candidate event. The impact band's floor follows quickly
        # down and slowly up; the shatter sub-bands keep their recent mean and spread.
        if self._state in (_State.IDLE, _State.WAIT_QUIET) or self._floor_low is None:
            self._floor_low = _follow(floor_low, low, self._up, self._down)
            if self._recent_energy is None:
                self._recent_energy = bands.copy()
            else:
                self._recent_energy += (bands - self._recent_energy) * self._recent
            excess = np.maximum(rise, 0.0)
            self._spread2 += (excess * excess - self._spread2) * self._spread_rate
        self._history = [self._history[1], low]
        return out

    def _is_impact(self, power: np.ndarray, low: float, floor_low: float) -> bool:
        s = self.settings
        if low < s.impact_min_dbfs or low - floor_low < s.impact_rise_db:
            return False
        # A fast attack: up from the last two frames (an onset may straddle a frame boundary);
        # once an impact is pending, a new one must rise from the frame just before.
        before = min(self._history) if self._state is _State.IDLE else self._history[1]
        if low - before < s.attack_db:
            return False
        mid = self._db(float(power[self._mid[0] : self._mid[1]].sum()))
        return low - mid >= s.impact_low_over_mid_db

    def _decide(self, now: float) -> list[Detection]:
        s = self.settings
        duration = self._last_active_s - self._shatter_s
        # A blip too short for a shatter (the impact's own click) while the shatter may
        # still come: keep waiting for it.
        short = duration < s.min_shatter_s and now - self._impact_s <= s.shatter_window_s
        self._state = _State.IMPACT if short else _State.IDLE
        flatness = float(np.median(self._flatness)) if self._flatness else 0.0
        # Its fine structure only where the shatter stands well over the background: in
        # its tail the background's own (Gaussian) samples dominate and hide the clicks.
        top = self._peak_high - s.crest_range_db
        loud = [(c, f) for level, c, f, _ in self._loud if level >= top]
        crest = float(np.median([c for c, _ in loud])) if loud else 0.0
        local = float(np.median([f for _, f in loud])) if loud else 1.0
        # Each frame's peaks against the frame before: the shatter's first has none.
        repeats = [r for level, _, _, r in self._loud[1:] if level >= top]
        repeat = float(np.median(repeats)) if repeats else 0.0
        impulsive = crest >= s.min_crest or (
            local <= s.spiky_local_flatness
            and crest >= s.min_spiky_crest
            and flatness >= s.min_spiky_flatness
            and repeat <= s.max_spiky_repeat
        )
        verdict = (
            s.min_shatter_s <= duration <= s.max_shatter_s
            and flatness >= s.min_flatness
            and local <= s.max_local_flatness
            and impulsive
            and repeat <= s.max_repeat
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "glass candidate at %.2f s: shatter %.2f s, flatness %.3f (local %.3f), "
                "crest %.2f, repeat %.2f: %s",
                self._impact_s,
                duration,
                flatness,
                local,
                crest,
                repeat,
                "yes" if verdict else "no",
            )
        if not verdict:
            return []
        self._quiet_until = self._last_active_s + s.cooldown_s
        crest_needed = s.min_crest if crest >= s.min_crest else s.min_spiky_crest
        margins = [
            min(1.0, flatness / s.min_flatness - 1.0) if s.min_flatness > 0 else 1.0,
            min(1.0, crest / crest_needed - 1.0) if crest_needed > 0 else 1.0,
        ]
        confidence = 0.5 + 0.25 * sum(margins)
        return [
            Detection(
                self.name,
                "glass_break",
                self._impact_s,
                self._last_active_s,
                round(confidence, 3),
                round(self._peak_level, 1),
                f"shatter {duration:.2f} s after {self._shatter_s - self._impact_s:.2f} s, "
                f"flatness {flatness:.2f}, crest {crest:.1f}; level: loudest 20 ms, dBFS",
            )
        ]


def _flatness(power: np.ndarray) -> float:
    """Spectral flatness (geometric over arithmetic mean): ~0.56 for noise, ~0 for tones."""
    p = power + 1e-3
    mean = float(np.mean(p))
    return math.exp(float(np.mean(np.log(p)))) / mean if mean > 0 else 0.0


def _peak_ratio(power: np.ndarray) -> np.ndarray:
    """``power`` over its own smoothed shape (11 bins): its peaks, whatever its colour. The
    flatness of this is ~0.56 for Gaussian noise, lower for a spectrum of separate peaks."""
    p = power + 1e-3
    return np.asarray(p / np.convolve(p, _SMOOTH, mode="same"))


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two zero-mean vectors (0 if either is all zeros)."""
    norm = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    return float(np.dot(a, b)) / norm if norm > 0 else 0.0


def _follow(floor: float, level: float, up: float, down: float) -> float:
    return floor + (level - floor) * (up if level > floor else down)
