"""The one module that touches ``webrtcvad`` (package webrtcvad-wheels): a typed wrapper.

WebRTC's VAD is a small fixed-point GMM classifier written for phones: it costs well under
a millisecond of CPU per second of audio on a Pi Zero, takes our 20 ms frames at 48 kHz as
they are (it resamples to 8 kHz inside) and needs no model file. The rest of the agent sees
only ``WebRtcVad.is_speech(frame)``.
"""

from __future__ import annotations

import numpy as np
import webrtcvad  # type: ignore[import-untyped]

RATES = (8000, 16000, 32000, 48000)
FRAME_MS = (10, 20, 30)


class WebRtcVad:
    """One VAD instance (it keeps state between frames); ``mode`` 0-3, 3 the strictest."""

    def __init__(self, mode: int, rate: int) -> None:
        if mode not in (0, 1, 2, 3):
            raise ValueError(f"webrtcvad mode must be 0, 1, 2 or 3, got {mode!r}")
        if rate not in RATES:
            raise ValueError(f"webrtcvad takes {RATES} Hz, got {rate!r}")
        self.mode = mode
        self.rate = rate
        self._lengths = {rate * ms // 1000 for ms in FRAME_MS}
        self._vad = webrtcvad.Vad(mode)

    def is_speech(self, frame: np.ndarray) -> bool:
        """Whether this 10, 20 or 30 ms frame of int16 samples holds speech."""
        if frame.dtype != np.int16 or frame.ndim != 1 or len(frame) not in self._lengths:
            raise ValueError(
                f"webrtcvad takes 10/20/30 ms of int16 at {self.rate} Hz, "
                f"got {frame.dtype} {frame.shape}"
            )
        return bool(self._vad.is_speech(frame.astype("<i2", copy=False).tobytes(), self.rate))

    def reset(self) -> None:
        """A fresh instance: the library has no reset of its own."""
        self._vad = webrtcvad.Vad(self.mode)
