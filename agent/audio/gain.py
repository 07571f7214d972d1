"""Speaker volume, microphone mute and a test tone: small pure pieces for the ``run`` agent.

Volume is an integer level 0..100 (the speaker gain, 100 = unchanged); it only attenuates,
so scaled samples never clip. Scaling uses ``array('h')`` and integer Q15 arithmetic: no
numpy on a board's hot path (``audioop`` is gone in Python 3.13), and at 960 samples per
20 ms frame a list comprehension costs well under a millisecond. Levels 100 and 0 are
short cuts (the frame itself, or silence).

Mute replaces each microphone frame by digital silence *before* the encoder: RTP keeps
flowing (so the peer's media timeout does not end the call) and Opus codes digital silence
in a few bytes per frame, close to what DTX saves without its gaps in the stream. The real
source is still read, so its pacing and the "drop stale frames" logic are unchanged.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass

from agent.audio.base import AudioSink, AudioSource
from agent.audio.format import FRAME_BYTES, FRAME_SAMPLES, SAMPLE_RATE, SILENCE

MAX_VOLUME = 100
MAX_TONE_S = 10.0
"""Longest test tone."""
TONE_HZ_RANGE = (20.0, 20_000.0)
_Q15 = 1 << 15


def check_volume(level: object) -> int:
    """``level`` as an int 0..100, else ValueError saying what is allowed."""
    if isinstance(level, bool) or not isinstance(level, int | float):
        raise ValueError(f"volume level must be a number 0..{MAX_VOLUME}, got {level!r}")
    if not 0 <= level <= MAX_VOLUME or (isinstance(level, float) and not level.is_integer()):
        raise ValueError(f"volume level must be a whole number 0..{MAX_VOLUME}, got {level!r}")
    return int(level)


def scale_frame(frame: bytes, level: int) -> bytes:
    """``frame`` (native-endian int16 samples) attenuated to ``level`` percent."""
    if level >= MAX_VOLUME:
        return frame
    if level <= 0:
        return SILENCE if len(frame) == FRAME_BYTES else bytes(len(frame))
    samples = array("h", frame)
    gain = level * _Q15 // MAX_VOLUME  # < 2**15: |s * gain >> 15| <= |s|, no clipping
    # >> floors towards -inf; that keeps the result within int16 for every input.
    return array("h", [s * gain >> 15 for s in samples]).tobytes()


def tone_frames(frequency: float, seconds: float, level: float = 0.5) -> list[bytes]:
    """Whole 20 ms frames of a sine at ``frequency`` Hz, ``level`` of full scale, with
    5 ms fades at both ends so it does not click."""
    lo, hi = TONE_HZ_RANGE
    if not lo <= frequency <= hi:
        raise ValueError(f"frequency must be {lo:g}..{hi:g} Hz, got {frequency:g}")
    if not 0 < seconds <= MAX_TONE_S:
        raise ValueError(f"seconds must be more than 0 and at most {MAX_TONE_S:g}")
    count = max(1, round(seconds * SAMPLE_RATE / FRAME_SAMPLES)) * FRAME_SAMPLES
    fade = SAMPLE_RATE // 200
    amp = level * 32767
    step = 2 * math.pi * frequency / SAMPLE_RATE
    samples = array(
        "h",
        [
            round(amp * math.sin(step * i) * min(1.0, (i + 1) / fade, (count - i) / fade))
            for i in range(count)
        ],
    )
    raw = samples.tobytes()
    return [raw[i : i + FRAME_BYTES] for i in range(0, len(raw), FRAME_BYTES)]


@dataclass(slots=True)
class AudioControls:
    """What the operator set: shared by the mic and speaker wrappers, kept across calls."""

    muted: bool = False
    volume: int = MAX_VOLUME

    def set_volume(self, level: object) -> int:
        self.volume = check_volume(level)
        return self.volume


class MutableSource:
    """An ``AudioSource`` that yields silence instead of the microphone while muted."""

    def __init__(self, source: AudioSource, controls: AudioControls) -> None:
        self._source = source
        self._controls = controls

    async def read(self) -> bytes:
        frame = await self._source.read()  # always read: keeps the source's pacing
        return SILENCE if self._controls.muted else frame

    def discard_pending(self) -> int:
        return self._source.discard_pending()

    async def close(self) -> None:
        await self._source.close()


class GainSink:
    """An ``AudioSink`` that applies the speaker volume to each frame."""

    def __init__(self, sink: AudioSink, controls: AudioControls) -> None:
        self._sink = sink
        self._controls = controls

    async def write(self, frame: bytes) -> None:
        await self._sink.write(scale_frame(frame, self._controls.volume))

    async def close(self) -> None:
        await self._sink.close()


__all__ = [
    "MAX_TONE_S",
    "MAX_VOLUME",
    "TONE_HZ_RANGE",
    "AudioControls",
    "GainSink",
    "MutableSource",
    "check_volume",
    "scale_frame",
    "tone_frames",
]
