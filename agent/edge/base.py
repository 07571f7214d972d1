"""What every edge detector implements, so the capture loop and ``analyze`` drive them alike.

A detector is pure: it sees 20 ms frames of 48 kHz mono int16 (``agent.audio.format``) and
keeps its own clock from the number of samples fed, so the same code runs live, over a WAV
file and in tests, without I/O or wall-clock time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np

from agent.audio.format import FRAME_SAMPLES


@dataclass(frozen=True, slots=True)
class Detection:
    """One event a detector reports (one per episode, thanks to its hysteresis and cool-down).

    ``start_s``/``end_s`` are seconds of audio since the detector started or was reset:
    the span of the evidence when the detection was made. ``confidence`` is in [0, 1];
    ``level_dbfs`` is the level of what was detected (dBFS, the detector says how in
    ``detail``).
    """

    detector: str
    kind: str
    start_s: float
    end_s: float
    confidence: float
    level_dbfs: float
    detail: str = ""


class Detector(Protocol):
    """A stateful analyser of the capture stream."""

    name: str

    def feed(self, frame: np.ndarray) -> list[Detection]:
        """Analyse one 20 ms frame (960 int16 samples) and return what it completed, if any."""
        ...

    def reset(self) -> None:
        """Forget all state and restart the clock at 0 (a new stream)."""
        ...


def power_spectrum(
    samples: np.ndarray, window: np.ndarray, windowed: np.ndarray, spectrum: np.ndarray
) -> np.ndarray:
    """``|rfft(samples * window)|^2``, through the caller's buffers ``windowed`` (real, as
    long as ``samples``) and ``spectrum`` (complex, its rfft's length): on a 20 ms frame
    numpy's cost per call and allocation outweighs the FFT itself."""
    np.multiply(samples, window, out=windowed)
    parts = np.fft.rfft(windowed, out=spectrum).view(np.float64)
    parts *= parts  # re^2, im^2 interleaved
    return parts[0::2] + parts[1::2]


class FrameSpectrum:
    """The Hann-windowed power spectrum of the 20 ms frame being analysed, shared.

    The alarm and glass-break detectors both start from this FFT (50 Hz bins); holding one
    ``FrameSpectrum`` between them (``EdgeSettings.detectors``), the second to see a frame
    reuses the first's spectrum instead of paying for another FFT.
    """

    def __init__(self) -> None:
        self.window = np.hanning(FRAME_SAMPLES + 2)[1:-1]
        """The Hann window the spectrum is taken with (its scale sets band levels)."""
        self._frame: np.ndarray | None = None
        self._index = -1
        self._power = np.zeros(FRAME_SAMPLES // 2 + 1)
        self._windowed = np.zeros(FRAME_SAMPLES)
        self._spectrum = np.zeros(FRAME_SAMPLES // 2 + 1, dtype=np.complex128)

    def power(self, frame: np.ndarray, index: int) -> np.ndarray:
        """``|rfft(frame * hann)|^2`` (read-only) of ``frame``, the caller's frame number
        ``index`` since its last reset: a caller that refills one array in place for the
        next frame must not get the last frame's spectrum."""
        if frame is not self._frame or index != self._index:
            power = power_spectrum(frame, self.window, self._windowed, self._spectrum)
            power.flags.writeable = False
            self._frame, self._index, self._power = frame, index, power
        return self._power


def check_settings(settings: object, limits: dict[str, tuple[float, float]]) -> None:
    """Refuse settings of the wrong type or outside ``limits`` (inclusive) with a clear error.

    TOML gives an int for ``3`` where a float is meant: that is accepted and made a float,
    so a config file need not write ``3.0``. Shared by the edge detectors' settings.
    """
    owner = type(settings).__name__
    for f in fields(settings):  # type: ignore[arg-type]
        value = getattr(settings, f.name)
        want = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if want == "bool":
            ok = isinstance(value, bool)
        elif want == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif want == "float":
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if ok and not math.isfinite(value):
                raise ValueError(f"{owner}.{f.name} must be a finite number, got {value!r}")
            if ok and isinstance(value, int):
                object.__setattr__(settings, f.name, float(value))
        elif want == "str":
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            raise ValueError(f"{owner}.{f.name} must be {want}, got {value!r}")
        if f.name in limits:
            lo, hi = limits[f.name]
            if not lo <= value <= hi:
                raise ValueError(f"{owner}.{f.name} must be in [{lo}, {hi}], got {value!r}")
