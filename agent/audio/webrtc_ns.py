"""The only module that touches ``webrtc-noise-gain``: WebRTC's noise suppressor.

``webrtc-noise-gain`` (the Home Assistant authors', used by wyoming-satellite on
Raspberry Pis) wraps the noise suppressor and high-pass filter of the WebRTC audio
processing module; its wheels (abi3: x86_64, aarch64, armv7) carry the C++ code, so a
board needs no compiler and no Debian package. It takes 16 kHz mono int16, 10 ms at a
time. Its gain control is left off: the front end's AGC is SpeexDSP's.
"""

from __future__ import annotations

from typing import Literal

from webrtc_noise_gain import AudioProcessor  # type: ignore[import-untyped]

RATE = 16_000
"""The only rate the library takes."""
CHUNK_BYTES = 2 * RATE // 100
"""What the library takes at a time: 10 ms."""

Level = Literal[1, 2, 3, 4]
"""Suppression strength: WebRTC's low, moderate, high, very high."""


class NoiseSuppressor:
    """High-pass filter and noise suppression on 16 kHz frames of whole 10 ms chunks."""

    def __init__(self, level: Level) -> None:
        if level not in (1, 2, 3, 4):
            raise ValueError(f"level must be 1..4, got {level}")
        self._processor = AudioProcessor(0, level)  # no gain control; suppression at level

    def run(self, frame: bytes) -> bytes:
        """``frame`` (a whole number of 10 ms chunks) with its noise suppressed."""
        if not frame or len(frame) % CHUNK_BYTES:
            raise ValueError(f"frames must be a positive multiple of {CHUNK_BYTES} bytes")
        return b"".join(
            self._processor.Process10ms(frame[i : i + CHUNK_BYTES]).audio
            for i in range(0, len(frame), CHUNK_BYTES)
        )


__all__ = ["CHUNK_BYTES", "RATE", "Level", "NoiseSuppressor"]
