"""The media benchmark's yardstick: an aiortc<->aiortc call between two processes.

A short call through the same code the benchmark runs: both sides must hear the
other (RTP packets in, decoded frames read) and the CPU measured over the window
must be positive. No timing thresholds: this checks the measurement works, not
how fast anything is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.audio.format import SAMPLE_RATE
from tools.bench.media import measure_aiortc_cpu
from tools.lab.virtual_audio import write_wav


def babble(seconds: float, seed: int = 7) -> np.ndarray:
    """Speech-like test signal: a gliding tone in syllable-length bursts, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 2 * np.pi * np.cumsum(180 + 60 * np.sin(2 * np.pi * 0.7 * t)) / SAMPLE_RATE
    envelope = np.clip(np.sin(2 * np.pi * 3.0 * t), 0, None)
    return 8000 * envelope * np.sin(pitch) + rng.normal(0, 200, len(t))


async def test_aiortc_call_carries_audio_both_ways_and_costs_cpu(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "babble.wav", babble(1.3))
    cpu, sides = await measure_aiortc_cpu(wav, window=1.5, warmup=0.5)
    assert cpu > 0
    assert len(sides) == 2
    for side in sides:
        assert side["event"] == "ended"
        assert side["packets_sent"] > 0
        assert side["packets_received"] > 0
        assert side["frames_received"] > 0
