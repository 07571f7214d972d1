"""A simulated echo path, speaker to microphone, for the front end's tests and benchmark.

What a board's microphone hears of its own speaker: the speaker's soft clipping (a small
driver pushed hard), the room (``sounds.reverb``: the direct sound and an exponentially
decaying tail), the delay of the device buffers and the air, and the loss on the way.
Seeded: the same ``rng`` gives the same room.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.audio.format import SAMPLE_RATE
from tools.lab.sounds import reverb


@dataclass(frozen=True, slots=True)
class EchoPath:
    """One speaker-to-microphone path."""

    delay_ms: float
    """From the frame the speaker is given to its direct sound in the microphone."""
    rt60_s: float
    """The room's reverberation time."""
    drive: float
    """Soft clipping: ``tanh(drive * x) / drive``; 1 barely bends a full-scale peak."""
    gain_db: float
    """Level of the echo relative to what the speaker was given (negative: a loss)."""

    @classmethod
    def draw(cls, rng: np.random.Generator) -> EchoPath:
        """A path like a small intercom box's: 5-80 ms, RT60 0.15-0.3 s, some clipping."""
        return cls(
            delay_ms=float(rng.uniform(5.0, 80.0)),
            rt60_s=float(rng.uniform(0.15, 0.3)),
            drive=float(rng.uniform(1.0, 2.0)),
            gain_db=float(rng.uniform(-6.0, 0.0)),
        )

    def apply(self, rng: np.random.Generator, played: np.ndarray) -> np.ndarray:
        """The echo of ``played`` (float in [-1, 1], 48 kHz) at the microphone."""
        bent = np.tanh(self.drive * played) / self.drive
        room = reverb(rng, bent, self.rt60_s, wet=0.6)
        shift = round(self.delay_ms * SAMPLE_RATE / 1000)
        out = np.zeros(len(played))
        out[shift:] = room[: len(played) - shift]
        return out * 10 ** (self.gain_db / 20)
