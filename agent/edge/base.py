"""What every edge detector implements, so the capture loop and ``analyze`` drive them alike.

A detector is pure: it sees 20 ms frames of 48 kHz mono int16 (``agent.audio.format``) and
keeps its own clock from the number of samples fed, so the same code runs live, over a WAV
file and in tests, without I/O or wall-clock time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


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
