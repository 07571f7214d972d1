"""Sources and sinks without a device: WAV files, tones, memory and nowhere.

All of them implement ``AudioSource``/``AudioSink``. With ``paced=True`` they
move one frame per 20 ms of event-loop time, standing in for a device clock;
otherwise they go as fast as they are called.
"""

from __future__ import annotations

import logging
import math
import wave
from collections import deque
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent.audio.base import EndOfStream
from agent.audio.format import CHANNELS, FRAME_BYTES, FRAME_SAMPLES, SAMPLE_BYTES, SAMPLE_RATE
from agent.audio.pacing import FramePacer
from agent.audio.resample import FrameResampler

logger = logging.getLogger(__name__)

# WAV frames read per step: 100 ms at 48 kHz keeps soxr's per-call overhead small.
_READ_FRAMES = 4800


def _check_frame(frame: bytes) -> None:
    if len(frame) != FRAME_BYTES:
        raise ValueError(f"expected a {FRAME_BYTES}-byte frame, got {len(frame)} bytes")


class WavSource:
    """Frames from a 16-bit WAV file of any rate and channel count (mixed down, resampled)."""

    def __init__(self, path: Path, *, paced: bool = False, loop: bool = False) -> None:
        self.path = path
        self._wav = wave.open(str(path), "rb")  # noqa: SIM115 -- closed by close()
        if self._wav.getsampwidth() != SAMPLE_BYTES:
            self._wav.close()
            raise ValueError(f"{path}: {8 * self._wav.getsampwidth()}-bit WAV, expected 16-bit")
        if self._wav.getnframes() == 0:
            self._wav.close()
            raise ValueError(f"{path}: no audio")
        self._channels = self._wav.getnchannels()
        self._resampler = FrameResampler(self._wav.getframerate(), SAMPLE_RATE, FRAME_SAMPLES)
        self._loop = loop
        self._pacer = FramePacer() if paced else None
        self._frames: deque[bytes] = deque()
        self._ended = False

    async def read(self) -> bytes:
        while not self._frames:
            if self._ended:
                raise EndOfStream(str(self.path))
            self._fill()
        if self._pacer is not None:
            await self._pacer.wait()
        return self._frames.popleft()

    def _fill(self) -> None:
        raw = self._wav.readframes(_READ_FRAMES)
        if not raw:
            if self._loop:
                # Keep feeding the same resampler so the seam has no gap or click.
                self._wav.rewind()
                return
            self._frames.extend(self._resampler.flush())
            self._ended = True
            return
        x = np.frombuffer(raw, "<i2").reshape(-1, self._channels)
        mono = x[:, 0] if self._channels == 1 else x.mean(axis=1).round().astype(np.int16)
        self._frames.extend(self._resampler.push(np.ascontiguousarray(mono, dtype=np.int16)))

    def discard_pending(self) -> int:
        return 0  # frames are made on demand: nothing waits

    async def close(self) -> None:
        self._wav.close()


class ToneSource:
    """A sine wave; ``amplitude`` is a fraction of full scale. Never ends."""

    def __init__(self, frequency: float, *, amplitude: float = 0.5, paced: bool = False) -> None:
        if not 0 <= amplitude <= 1:
            raise ValueError("amplitude must be within 0..1")
        self.frequency = frequency
        self._amplitude = amplitude * 32767
        self._step = 2 * math.pi * frequency / SAMPLE_RATE
        self._phase = 0.0
        self._pacer = FramePacer() if paced else None

    async def read(self) -> bytes:
        if self._pacer is not None:
            await self._pacer.wait()
        phases = self._phase + self._step * np.arange(FRAME_SAMPLES)
        # Phase carried (mod 2 pi) between frames keeps the wave continuous and precise.
        self._phase = (self._phase + self._step * FRAME_SAMPLES) % (2 * math.pi)
        wave_: npt.NDArray[np.float64] = self._amplitude * np.sin(phases)
        return wave_.round().astype("<i2").tobytes()

    def discard_pending(self) -> int:
        return 0  # frames are made on demand: nothing waits

    async def close(self) -> None:
        return None


class WavSink:
    """Writes frames to a 48 kHz mono 16-bit WAV file, finalised by ``close()``."""

    def __init__(self, path: Path, *, paced: bool = False) -> None:
        self.path = path
        self._wav = wave.open(str(path), "wb")  # noqa: SIM115 -- closed by close()
        self._wav.setnchannels(CHANNELS)
        self._wav.setsampwidth(SAMPLE_BYTES)
        self._wav.setframerate(SAMPLE_RATE)
        self._pacer = FramePacer() if paced else None
        self._closed = False

    async def write(self, frame: bytes) -> None:
        _check_frame(frame)
        if self._pacer is not None:
            await self._pacer.wait()
        self._wav.writeframes(frame)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._wav.close()


class NullSink:
    """Discards frames, counting them."""

    def __init__(self, *, paced: bool = False) -> None:
        self.frames = 0
        """Frames written so far."""
        self._pacer = FramePacer() if paced else None

    async def write(self, frame: bytes) -> None:
        _check_frame(frame)
        if self._pacer is not None:
            await self._pacer.wait()
        self.frames += 1

    async def close(self) -> None:
        return None


class MemorySink:
    """Keeps every frame in memory (for tests and tools)."""

    def __init__(self, *, paced: bool = False) -> None:
        self.frames: list[bytes] = []
        """Frames written so far, in order."""
        self._pacer = FramePacer() if paced else None

    async def write(self, frame: bytes) -> None:
        _check_frame(frame)
        if self._pacer is not None:
            await self._pacer.wait()
        self.frames.append(frame)

    def samples(self) -> npt.NDArray[np.int16]:
        """Everything written, as one int16 array."""
        return np.frombuffer(b"".join(self.frames), "<i2").copy()

    async def close(self) -> None:
        return None
