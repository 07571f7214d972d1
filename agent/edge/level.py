"""Loud-noise and microphone-fault detectors: level statistics of the capture stream.

``LoudNoiseDetector`` reports an A-weighted level above a threshold for a while (a party,
a smashed shelf, a dog barking for minutes); ``MicFaultDetector`` reports a microphone that
delivers nothing useful (digital silence, a stuck value, persistent clipping), since a dead
microphone silently disables every other detector. ``LevelMeter``, the loud-noise detector's
level, also keeps the Leq and maximum that telemetry reports.

Levels are RMS re full scale (dBFS): a full-scale square wave reads 0 dBFS and a
full-scale sine -3.01 dBFS.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from agent.audio.format import SAMPLE_RATE
from agent.edge.base import Detection, check_settings, power_spectrum

FULL_SCALE = 32768.0
FLOOR_DBFS = -140.0
"""Level reported for exact digital silence (instead of minus infinity)."""

# IEC 61672-1 A-weighting: the analog filter's pole frequencies (Hz).
_A_POLES_HZ = ((20.598997, 2), (107.65265, 1), (737.86223, 1), (12194.217, 2))


def dbfs(mean_square: float) -> float:
    """Mean square of int16 samples as dBFS (``FLOOR_DBFS`` for silence)."""
    if mean_square <= 0.0:
        return FLOOR_DBFS
    return max(FLOOR_DBFS, 10.0 * math.log10(mean_square / (FULL_SCALE * FULL_SCALE)))


def a_weighting(rate: int = SAMPLE_RATE) -> tuple[np.ndarray, np.ndarray]:
    """IIR A-weighting filter ``(b, a)`` for ``rate``, 0 dB at 1 kHz (IEC 61672-1).

    Designed by the bilinear transform of the standard's analog poles and zeros, each pole
    frequency pre-warped so that it lands where the standard puts it; at 48 kHz the result
    is within the standard's class 1 tolerances up to 16 kHz.
    """
    poles: list[float] = []
    for hz, count in _A_POLES_HZ:
        w = 2.0 * rate * math.tan(math.pi * hz / rate)
        poles += [(2.0 * rate - w) / (2.0 * rate + w)] * count
    # Four zeros at s = 0 map to z = 1; the two left at infinity map to z = -1.
    b = np.poly([1.0] * 4 + [-1.0] * 2)
    a = np.poly(poles)
    b = b / abs(frequency_response(b, a, np.array([1000.0]), rate)[0])
    return b, a


def frequency_response(b: np.ndarray, a: np.ndarray, hz: np.ndarray, rate: int) -> np.ndarray:
    """Complex response of the digital filter ``(b, a)`` at frequencies ``hz``."""
    z = np.exp(2j * np.pi * np.asarray(hz, np.float64) / rate)
    return np.asarray(np.polyval(b, z) / np.polyval(a, z))


class AWeightedMeter:
    """A-weighted mean square of successive frames, from one FFT per frame.

    Running the 6th-order IIR sample by sample in Python would cost far more than the
    detector's CPU budget (and scipy is not a dependency), so the filter's power response
    is evaluated once per FFT bin and each frame's spectrum is weighted with it (Parseval).
    The window spans the previous and the current frame (Hann, 50 % overlap), which keeps
    a loud hum's spectral leakage out of the weighted bands.
    """

    def __init__(self, frame_samples: int, rate: int = SAMPLE_RATE) -> None:
        self.frame_samples = frame_samples
        n = 2 * frame_samples
        b, a = a_weighting(rate)
        power = np.abs(frequency_response(b, a, np.fft.rfftfreq(n, 1.0 / rate), rate)) ** 2
        power[1:-1] *= 2.0  # one-sided spectrum: every bin but DC and Nyquist counts twice
        window = np.hanning(n + 2)[1:-1]
        self._window = window
        self._weights = power / (n * float(np.sum(window * window)))
        self._block = np.zeros(n)
        """The previous frame then the current one, as float64, refilled in place."""
        self._windowed = np.zeros(n)
        self._spectrum = np.zeros(frame_samples + 1, dtype=np.complex128)

    def mean_square(self, frame: np.ndarray) -> float:
        """A-weighted mean square (int16 units squared) of the last two frames."""
        block, n = self._block, self.frame_samples
        block[:n] = block[n:]
        block[n:] = frame
        power = power_spectrum(block, self._window, self._windowed, self._spectrum)
        return float(np.dot(power, self._weights))

    def reset(self) -> None:
        self._block[:] = 0.0


@dataclass(frozen=True, slots=True)
class SoundLevel:
    """The A-weighted sound level over an interval (``LevelMeter.take``), for telemetry."""

    leq_dbfs: float
    """Equivalent continuous level (the mean A-weighted power), dBFS(A)."""
    max_dbfs: float
    """The loudest time-weighted level ("fast" by default), dBFS(A)."""
    seconds: float
    """Audio the figures cover."""


class LevelMeter:
    """The time-weighted A-weighted level of successive frames (``feed``), and their Leq
    and maximum since the last ``take``. Beyond ``AWeightedMeter``'s FFT a frame costs a
    few float operations, so the level the loud-noise detector measures anyway is also
    what telemetry reports."""

    def __init__(self, time_constant_s: float = 0.125) -> None:
        """``time_constant_s``: exponential averaging; 0.125 s is a sound level meter's
        "fast", 0 none."""
        self.time_constant_s = time_constant_s
        self._meters: dict[int, AWeightedMeter] = {}
        self._alphas: dict[int, float] = {}
        self.smoothed = 0.0
        """The time-weighted A-weighted mean square (int16 units squared)."""
        self._energy = 0.0
        self._samples = 0
        self._max = 0.0

    def reset(self) -> None:
        """Restart the time weighting (a new stream); what ``take`` returns is kept."""
        self.smoothed = 0.0
        for meter in self._meters.values():
            meter.reset()

    def feed(self, frame: np.ndarray) -> float:
        """The time-weighted mean square after ``frame`` (1-D int16)."""
        n = len(frame)
        meter = self._meters.get(n)
        if meter is None:
            meter = self._meters[n] = AWeightedMeter(n)
            tau = self.time_constant_s
            self._alphas[n] = 1.0 if tau <= 0 else 1.0 - math.exp(-n / SAMPLE_RATE / tau)
        mean_square = meter.mean_square(frame)
        self.smoothed += self._alphas[n] * (mean_square - self.smoothed)
        self._energy += mean_square * n
        self._samples += n
        self._max = max(self._max, self.smoothed)
        return self.smoothed

    def take(self) -> SoundLevel | None:
        """Leq and maximum since the last ``take`` (None: no audio since), and start anew."""
        if self._samples == 0:
            return None
        level = SoundLevel(
            dbfs(self._energy / self._samples), dbfs(self._max), self._samples / SAMPLE_RATE
        )
        self._energy, self._samples, self._max = 0.0, 0, 0.0
        return level


def _as_frame(frame: np.ndarray) -> np.ndarray:
    if frame.ndim != 1 or frame.dtype != np.int16 or len(frame) == 0:
        raise ValueError(f"expected a 1-D int16 frame, got {frame.dtype} {frame.shape}")
    return frame


@dataclass(frozen=True, slots=True)
class LoudNoiseSettings:
    """When a sustained loud sound is worth an alert."""

    threshold_dbfs: float = -20.0
    """A-weighted level (dBFS(A), fast time weighting) at or above which a sound is loud."""
    min_duration_s: float = 1.0
    """How long the level must stay at or above the threshold before it is reported."""
    hysteresis_db: float = 6.0
    """The episode ends only when the level falls below ``threshold_dbfs - hysteresis_db``."""
    release_s: float = 1.0
    """... and stays there this long (so short pauses in a loud episode do not split it)."""
    cooldown_s: float = 30.0
    """After a reported episode ends, no new one is reported for this long."""
    time_constant_s: float = 0.125
    """Exponential averaging of the level: 0.125 s is a sound level meter's "fast"."""

    def __post_init__(self) -> None:
        check_settings(
            self,
            {
                "threshold_dbfs": (-100.0, 0.0),
                "min_duration_s": (0.0, 3600.0),
                "hysteresis_db": (0.0, 60.0),
                "release_s": (0.0, 3600.0),
                "cooldown_s": (0.0, 86400.0),
                "time_constant_s": (0.0, 10.0),
            },
        )


class LoudNoiseDetector:
    """A-weighted level above a threshold for a minimum time; one detection per episode.

    The detection is made as soon as the level has held for ``min_duration_s``: ``start_s``
    is when it first crossed the threshold, ``end_s`` the moment of the decision. Its
    confidence grows from 0.5 at the threshold to 1.0 at 10 dB above it (the loudest
    smoothed level so far); ``level_dbfs`` is that loudest level, dBFS(A).
    """

    name = "loud_noise"

    def __init__(self, settings: LoudNoiseSettings | None = None) -> None:
        self.settings = settings or LoudNoiseSettings()
        self.meter = LevelMeter(self.settings.time_constant_s)
        self.reset()

    def reset(self) -> None:
        self._samples = 0
        self._above_since: float | None = None
        self._peak_db = FLOOR_DBFS
        self._active = False
        self._reported = False
        self._below_since: float | None = None
        self._quiet_until = 0.0
        self.meter.reset()

    @property
    def level_dbfs(self) -> float:
        """The current smoothed A-weighted level, dBFS(A)."""
        return dbfs(self.meter.smoothed)

    def feed(self, frame: np.ndarray) -> list[Detection]:
        frame = _as_frame(frame)
        s = self.settings
        start = self._samples / SAMPLE_RATE
        self._samples += len(frame)
        now = self._samples / SAMPLE_RATE
        level = dbfs(self.meter.feed(frame))

        if self._active:
            if level < s.threshold_dbfs - s.hysteresis_db:
                if self._below_since is None:
                    self._below_since = start
                if now - self._below_since >= s.release_s:
                    self._active = False
                    self._above_since = None
                    if self._reported:  # cool down from the last episode that was reported
                        self._quiet_until = now + s.cooldown_s
            else:
                self._below_since = None
            return []
        if level < s.threshold_dbfs:
            self._above_since = None
            return []
        if self._above_since is None:
            self._above_since = start
            self._peak_db = level
        self._peak_db = max(self._peak_db, level)
        if now - self._above_since < s.min_duration_s - 1e-9:
            return []
        # Held long enough: an episode, reported unless still cooling down from the last.
        self._active = True
        self._below_since = None
        self._reported = now >= self._quiet_until
        if not self._reported:
            return []
        confidence = min(1.0, 0.5 + (self._peak_db - s.threshold_dbfs) / 20.0)
        return [
            Detection(
                self.name,
                "loud_noise",
                self._above_since,
                now,
                round(confidence, 3),
                round(self._peak_db, 1),
                f"A-weighted, threshold {s.threshold_dbfs:g} dBFS(A)",
            )
        ]


@dataclass(frozen=True, slots=True)
class MicFaultSettings:
    """What counts as a broken microphone, and for how long before it is reported."""

    silent_peak: int = 2
    """A frame whose every sample is within +-this many LSB is silent (0: exact zeros only)."""
    silent_s: float = 10.0
    """Silence this long (every frame silent) is a ``mic_silent`` fault."""
    stuck_std: float = 2.0
    """A frame whose standard deviation (LSB) is at most this, away from zero, is stuck."""
    stuck_offset: float = 0.25
    """... as is a frame whose mean is this fraction of full scale or more (a huge DC offset)."""
    stuck_s: float = 10.0
    """A stuck signal this long is a ``mic_stuck`` fault."""
    clip_level: int = 32700
    """Samples whose magnitude reaches this are clipped."""
    clip_fraction: float = 0.01
    """Clipping over ``clip_window_s`` is a fault at this fraction of clipped samples ..."""
    clip_window_s: float = 10.0
    """... measured over this sliding window (also the fault's minimum duration)."""
    clip_clear_ratio: float = 0.5
    """... and clears below ``clip_fraction * clip_clear_ratio`` (hysteresis)."""
    clear_s: float = 2.0
    """A silent or stuck fault clears after this long of normal signal."""
    repeat_s: float = 0.0
    """0: one detection when a fault begins and none until it clears; > 0: repeat this often
    while it lasts."""

    def __post_init__(self) -> None:
        check_settings(
            self,
            {
                "silent_peak": (0, 32767),
                "silent_s": (0.02, 86400.0),
                "stuck_std": (0.0, 1000.0),
                "stuck_offset": (0.0, 1.0),
                "stuck_s": (0.02, 86400.0),
                "clip_level": (1, 32767),
                "clip_fraction": (1e-6, 1.0),
                "clip_window_s": (0.02, 3600.0),
                "clip_clear_ratio": (0.0, 1.0),
                "clear_s": (0.0, 3600.0),
                "repeat_s": (0.0, 86400.0),
            },
        )


@dataclass
class _Fault:
    kind: str
    since: float | None = None
    active: bool = False
    reported_at: float = 0.0
    normal_since: float | None = None


class MicFaultDetector:
    """Digital silence, a stuck/DC signal or persistent clipping; one detection per fault.

    Silence is checked before stuck (all zeros is silence, not a stuck zero). ``start_s`` is
    when the fault's condition began, ``end_s`` when it had lasted long enough to report;
    ``level_dbfs`` is the signal's RMS (unweighted) over the last frame. Confidence is 1.0 for
    exact zeros or an exactly constant value, 0.8 for their near versions; for clipping it
    grows with the clipped fraction (1.0 at twice ``clip_fraction``).
    """

    name = "mic_fault"

    def __init__(self, settings: MicFaultSettings | None = None) -> None:
        self.settings = settings or MicFaultSettings()
        self._clip_window = round(self.settings.clip_window_s * SAMPLE_RATE)
        self.reset()

    def reset(self) -> None:
        self._samples = 0
        self._faults = {k: _Fault(k) for k in ("mic_silent", "mic_stuck", "mic_clipping")}
        self._clips: deque[tuple[int, int, float]] = deque()
        self._clip_count = 0
        self._clip_total = 0

    def feed(self, frame: np.ndarray) -> list[Detection]:
        frame = _as_frame(frame)
        s = self.settings
        start = self._samples / SAMPLE_RATE
        self._samples += len(frame)
        now = self._samples / SAMPLE_RATE
        # Plain ufunc reductions: ndarray.min/max/sum add a Python layer, a frame's main cost.
        low, high = int(np.minimum.reduce(frame)), int(np.maximum.reduce(frame))
        peak = max(-low, high)
        x = frame.astype(np.float64)
        mean_square = float(np.dot(x, x)) / len(x)
        mean = float(np.add.reduce(x)) / len(x)
        std = math.sqrt(max(0.0, mean_square - mean * mean))

        silent = peak <= s.silent_peak
        stuck = not silent and (std <= s.stuck_std or abs(mean) >= s.stuck_offset * FULL_SCALE)
        clipped = 0
        if peak >= s.clip_level:  # most frames: no need to count
            clipped = int(np.count_nonzero(frame >= s.clip_level)) + int(
                np.count_nonzero(frame <= -s.clip_level)
            )
        self._clips.append((clipped, len(frame), start))
        self._clip_count += clipped
        self._clip_total += len(frame)
        window = self._clip_window
        while self._clip_total - self._clips[0][1] >= window:
            old, n, _ = self._clips.popleft()
            self._clip_count -= old
            self._clip_total -= n
        fraction = self._clip_count / self._clip_total
        full_window = self._clip_total >= window - len(frame) // 2

        # Details are written only for a detection: most frames report nothing.
        out: list[Detection] = []
        fault = self._faults["mic_silent"]
        if self._track(
            fault,
            on=silent,
            stays=silent,
            hold_s=s.silent_s,
            clear_s=s.clear_s,
            start=start,
            now=now,
        ):
            confidence = 1.0 if peak == 0 else 0.8
            out.append(self._detection(fault, now, confidence, mean_square, f"peak {peak} LSB"))
        fault = self._faults["mic_stuck"]
        if self._track(
            fault, on=stuck, stays=stuck, hold_s=s.stuck_s, clear_s=s.clear_s, start=start, now=now
        ):
            exact = peak == 0 if silent else low == high
            detail = f"mean {mean:.0f} LSB, std {std:.1f} LSB"
            out.append(self._detection(fault, now, 1.0 if exact else 0.8, mean_square, detail))
        fault = self._faults["mic_clipping"]
        on = full_window and fraction >= s.clip_fraction
        stays = fraction >= s.clip_fraction * s.clip_clear_ratio
        if fault.since is None and on:
            # Met over the window: it began with the window's first clipped frame.
            fault.since = next(t for count, _, t in self._clips if count)
        if self._track(fault, on=on, stays=stays, hold_s=0.0, clear_s=0.0, start=start, now=now):
            confidence = min(1.0, fraction / (2 * s.clip_fraction))
            detail = f"{100 * fraction:.2f} % of samples clipped over {s.clip_window_s:g} s"
            out.append(self._detection(fault, now, confidence, mean_square, detail))
        return out

    def _track(
        self,
        fault: _Fault,
        *,
        on: bool,
        stays: bool,
        hold_s: float,
        clear_s: float,
        start: float,
        now: float,
    ) -> bool:
        """Advance one fault's state; True when it is to be reported: it has held for
        ``hold_s`` (or, with ``repeat_s``, goes on)."""
        if fault.active:
            if stays:
                fault.normal_since = None
                if self.settings.repeat_s > 0 and now - fault.reported_at >= self.settings.repeat_s:
                    fault.reported_at = now
                    return True
                return False
            if fault.normal_since is None:
                fault.normal_since = start
            if now - fault.normal_since >= clear_s:
                fault.active = False
                fault.since = None
                fault.normal_since = None
            return False
        if not on:
            fault.since = None
            return False
        if fault.since is None:
            fault.since = start
        if now - fault.since < hold_s - 1e-9:
            return False
        fault.active = True
        fault.reported_at = now
        fault.normal_since = None
        return True

    def _detection(
        self, fault: _Fault, now: float, confidence: float, mean_square: float, detail: str
    ) -> Detection:
        since = fault.since if fault.since is not None else now
        level = round(dbfs(mean_square), 1)
        return Detection(self.name, fault.kind, since, now, round(confidence, 3), level, detail)
