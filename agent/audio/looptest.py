"""The speaker-to-microphone loop test, as pure functions: the test signal and what was heard.

The signal is one or more identical markers (a logarithmic sweep, 300 Hz to 3 kHz, where
any speaker and microphone meet) at known sample offsets, silence in between. The
analysis cross-correlates the recording with the marker (by FFT) and refines each
correlation peak to a fraction of a sample with a parabola through its three top
points. The first peak gives the echo path delay (device buffers included); the spacing
of the first and last peaks, against how far apart they were played, gives the drift
between the playback and capture clocks: over markers 6 s apart at 48 kHz one sample is
3.5 ppm, and the interpolated peaks resolve a small fraction of that. The level is the
least-squares gain of the marker in the recording (what noise adds does not count), and
the noise is what the microphone heard away from the markers.

Used by ``edge-intercom-agent check`` (one marker: no drift) and by the scheduled self-test
(``agent.service.selftest``, two markers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent.audio.format import FRAME_BYTES, SAMPLE_RATE

Samples = npt.NDArray[np.float64]
"""Audio as floats, full scale 1.0."""

FLOOR_DB = -120.0
"""Levels below this (digital silence) are reported as this: figures stay finite for JSON."""
CLIP_LEVEL = 32700 / 32768
"""Samples whose magnitude reaches this are clipped (as ``agent.edge.level`` counts them)."""
MAX_DRIFT_SEARCH_PPM = 2000.0
"""Later markers are looked for this far (plus a few samples) from where the first one's
delay puts them; real clocks are within a few hundred ppm of each other."""
TAIL_S = 0.25
"""After each marker, this much of the recording is its echo, not noise."""
FADE_S = 0.005
"""Ramps at both ends of a marker, so the speaker does not click."""


@dataclass(frozen=True, slots=True)
class LoopThresholds:
    """What a loop test must measure to pass."""

    min_level_dbfs: float = -55.0
    """Quieter than this at the microphone is a fail (dead mic, muted or unplugged speaker)."""
    min_correlation: float = 0.3
    """Normalised correlation with the marker below this is a fail (what was heard is
    something else: noise, another sound)."""
    max_delay_ms: float = 500.0
    """A longer speaker-to-microphone delay is a fail (echo cancellation cannot follow it)."""
    max_drift_ppm: float = 1000.0
    """A larger clock drift between playback and capture is a fail (a wrong sample rate, a
    failing crystal); separate USB devices are within a few hundred ppm."""
    max_clipped: float = 0.01
    """A larger fraction of clipped samples in the markers as heard is a fail (gain too high)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_correlation <= 1.0 or not 0.0 <= self.max_clipped <= 1.0:
            raise ValueError("min_correlation and max_clipped must be within 0..1")
        if self.max_delay_ms <= 0 or self.max_drift_ppm <= 0:
            raise ValueError("max_delay_ms and max_drift_ppm must be positive")


@dataclass(frozen=True, slots=True)
class LoopSignal:
    """What is played: ``marker`` at each of ``starts`` in ``samples``."""

    samples: Samples
    """The whole test signal, full scale 1.0."""
    marker: Samples
    """The marker (one sweep)."""
    starts: tuple[int, ...]
    """Sample offsets of the markers in ``samples``, ascending."""


@dataclass(frozen=True, slots=True)
class LoopResult:
    """What the microphone heard of a ``LoopSignal``."""

    failures: tuple[str, ...]
    """Why the test failed, one phrase per threshold broken; empty: it passed."""
    level_db: float
    """Loop gain: the markers as heard relative to as played, dB (``FLOOR_DB`` if none)."""
    level_dbfs: float
    """The markers as heard, RMS dBFS (noise excluded)."""
    noise_dbfs: float
    """What the microphone heard away from the markers and their echo, RMS dBFS."""
    correlation: float
    """Normalised correlation of the recording with the marker, the worst marker's (0..1)."""
    clipped: float
    """Fraction of clipped samples where the markers were heard."""
    delay_ms: float | None
    """Echo path delay: from the first sample played to where it was heard (sub-sample
    resolution); None when the markers were not found."""
    drift_ppm: float | None
    """Capture clock against playback clock: (heard spacing - played spacing) / played
    spacing * 1e6 over the first and last markers; None with one marker or none found."""

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def snr_db(self) -> float:
        """Marker level over noise level."""
        return self.level_dbfs - self.noise_dbfs

    def summary(self) -> str:
        """One line for people."""
        gain = round(self.level_db, 1) + 0.0  # no "-0.0 dB"
        figures = [
            f"heard at {self.level_dbfs:.1f} dBFS (loop gain {gain:+.1f} dB)",
            f"SNR {self.snr_db:.0f} dB",
        ]
        if self.delay_ms is not None:
            figures.append(f"delay {self.delay_ms:.1f} ms")
        if self.drift_ppm is not None:
            figures.append(f"drift {self.drift_ppm:+.1f} ppm")
        figures.append(f"correlation {self.correlation:.2f}")
        text = ", ".join(figures)
        return f"{'; '.join(self.failures)}: {text}" if self.failures else text

    def to_record(self) -> dict[str, object]:
        """The figures as JSON values (None where not measured), rounded to what they mean."""
        return {
            "pass": self.passed,
            "failures": list(self.failures),
            "level_db": round(self.level_db, 1),
            "level_dbfs": round(self.level_dbfs, 1),
            "noise_dbfs": round(self.noise_dbfs, 1),
            "snr_db": round(self.snr_db, 1),
            "correlation": round(self.correlation, 3),
            "clipped": round(self.clipped, 4),
            "delay_ms": None if self.delay_ms is None else round(self.delay_ms, 2),
            "drift_ppm": None if self.drift_ppm is None else round(self.drift_ppm, 1),
        }


def sweep(seconds: float, amplitude: float) -> Samples:
    """A logarithmic sweep from 300 Hz to 3 kHz with ``FADE_S`` ramps at both ends."""
    n = round(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0, f1 = 300.0, 3000.0
    k = seconds / math.log(f1 / f0)
    samples: Samples = amplitude * np.sin(2 * np.pi * f0 * k * (np.exp(t / k) - 1))
    fade = min(n // 2, round(FADE_S * SAMPLE_RATE))
    ramp = np.linspace(0.0, 1.0, fade)
    samples[:fade] *= ramp
    samples[n - fade :] *= ramp[::-1]
    return samples


def loop_signal(marker_s: float, amplitude: float, spacing_s: float | None = None) -> LoopSignal:
    """One marker, or (``spacing_s``: start to start) two, the second after silence."""
    if not 0.0 < amplitude <= 1.0:
        raise ValueError(f"amplitude must be more than 0 and at most 1, got {amplitude}")
    marker = sweep(marker_s, amplitude)
    if spacing_s is None:
        return LoopSignal(marker, marker, (0,))
    gap = round(spacing_s * SAMPLE_RATE)
    if gap < len(marker) + round(TAIL_S * SAMPLE_RATE):
        raise ValueError(f"markers {spacing_s} s apart overlap their echo: space them wider")
    samples = np.zeros(gap + len(marker))
    samples[: len(marker)] = marker
    samples[gap:] = marker
    return LoopSignal(samples, marker, (0, gap))


def to_frames(samples: Samples) -> list[bytes]:
    """``samples`` as 16-bit PCM frames to play, the last one padded with silence."""
    pcm = (samples * 32767).round().astype("<i2").tobytes()
    frames = [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]
    frames[-1] = frames[-1].ljust(FRAME_BYTES, b"\0")
    return frames


def from_pcm(pcm: bytes) -> Samples:
    """Recorded 16-bit PCM as floats, full scale 1.0."""
    samples: Samples = np.frombuffer(pcm, "<i2") / 32768.0
    return samples


def dbfs(rms: float) -> float:
    """An RMS level (full scale 1.0) in dB, ``FLOOR_DB`` at least."""
    return max(FLOOR_DB, 20 * math.log10(rms)) if rms > 0 else FLOOR_DB


def _peak(corr: Samples, lo: int, hi: int) -> tuple[int, float]:
    """The largest |corr| in ``[lo, hi)``: its index and its sub-sample position."""
    at = lo + int(np.argmax(np.abs(corr[lo:hi])))
    if not 0 < at < len(corr) - 1:
        return at, float(at)
    sign = 1.0 if corr[at] >= 0 else -1.0  # a speaker wired the other way round inverts it
    left, mid, right = (sign * corr[at - 1], sign * corr[at], sign * corr[at + 1])
    bend = left - 2 * mid + right
    return at, at + (0.5 * (left - right) / bend if bend < 0 else 0.0)


def analyse_loop(heard: Samples, played: LoopSignal, thresholds: LoopThresholds) -> LoopResult:
    """Where the markers of ``played`` are in ``heard`` (recorded from when the first sample
    was played, and at least as long as ``played.samples``): level, delay, drift, noise,
    clipping, against ``thresholds``. Any delay up to the recording's extra length is found."""
    marker, starts = played.marker, played.starts
    n = len(marker)
    listen = len(heard) - len(played.samples)
    if listen < 0:
        raise ValueError("the recording is shorter than the test signal")
    size = 1 << (len(heard) + n).bit_length()
    spectrum = np.fft.rfft(heard, size) * np.conj(np.fft.rfft(marker, size))
    corr: Samples = np.fft.irfft(spectrum, size)[: len(heard) - n + 1]
    first, first_at = _peak(corr, starts[0], starts[0] + listen + 1)
    peaks = [(first, first_at)]
    for start in starts[1:]:
        expected = start + first - starts[0]
        reach = math.ceil((start - starts[0]) * MAX_DRIFT_SEARCH_PPM * 1e-6) + 4
        peaks.append(_peak(corr, max(0, expected - reach), min(len(corr), expected + reach + 1)))
    energy = float(marker @ marker)
    gains, correlations, clipped = [], [], 0
    away = np.ones(len(heard), bool)
    for at, _ in peaks:
        segment = heard[at : at + n]
        gains.append(abs(float(corr[at])) / energy)
        norm = float(np.linalg.norm(segment)) * math.sqrt(energy)
        correlations.append(abs(float(corr[at])) / norm if norm > 0 else 0.0)
        clipped += int(np.count_nonzero(np.abs(segment) >= CLIP_LEVEL))
        away[at : at + n + round(TAIL_S * SAMPLE_RATE)] = False
    gain = float(np.mean(gains))
    level_dbfs = dbfs(gain * math.sqrt(energy / n))
    noise = heard[away]
    noise_dbfs = dbfs(float(np.sqrt(np.mean(noise**2)))) if len(noise) else FLOOR_DB
    correlation = min(correlations)
    failures: list[str] = []
    if level_dbfs < thresholds.min_level_dbfs:
        failures.append("test signal not heard")
    elif correlation < thresholds.min_correlation:
        failures.append("heard something else")
    found = not failures
    delay_ms = 1000 * (first_at - starts[0]) / SAMPLE_RATE if found else None
    drift_ppm = None
    if found and len(peaks) > 1:
        played_spacing = starts[-1] - starts[0]
        drift_ppm = (peaks[-1][1] - first_at - played_spacing) / played_spacing * 1e6
    if delay_ms is not None and delay_ms > thresholds.max_delay_ms:
        failures.append(f"delay over {thresholds.max_delay_ms:g} ms")
    if drift_ppm is not None and abs(drift_ppm) > thresholds.max_drift_ppm:
        failures.append(f"clock drift over {thresholds.max_drift_ppm:g} ppm")
    clip_fraction = clipped / (n * len(peaks))
    if clip_fraction > thresholds.max_clipped:
        failures.append("clipping")
    return LoopResult(
        failures=tuple(failures),
        level_db=dbfs(gain),
        level_dbfs=level_dbfs,
        noise_dbfs=noise_dbfs,
        correlation=correlation,
        clipped=clip_fraction,
        delay_ms=delay_ms,
        drift_ppm=drift_ppm,
    )


__all__ = [
    "FLOOR_DB",
    "LoopResult",
    "LoopSignal",
    "LoopThresholds",
    "analyse_loop",
    "dbfs",
    "from_pcm",
    "loop_signal",
    "sweep",
    "to_frames",
]
