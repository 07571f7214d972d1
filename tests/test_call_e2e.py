"""End to end: speech through two real agent processes, scored with PESQ.

Microphone (ALSA via PulseAudio, real time) -> Opus -> RED -> SRTP -> UDP ->
impairment proxy -> jitter buffer -> Opus/FEC/PLC -> speaker (ALSA). What a's
microphone heard and what b's speaker played are recorded sample-aligned
from the virtual boards' probe and compared with PESQ (ITU-T P.862 wideband). The
agents run their audio front end (echo cancellation, noise suppression) as a board
does; ``test_frontend_e2e`` checks that it removes a board's echo.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr
from pesq import pesq

from agent.audio.format import SAMPLE_RATE
from agent.net.impair import Impairment
from tools.lab.agents import AgentCall
from tools.lab.virtual_audio import VirtualAudio, read_wav, speech_wav, write_wav

SENTENCE = "Please open the gate. The delivery van is waiting outside with your parcel."


@pytest.fixture(scope="module")
def boards() -> Iterator[VirtualAudio]:
    with VirtualAudio.start(("a", "b")) as audio:
        yield audio


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return speech_wav(tmp_path_factory.mktemp("speech") / "speech.wav", SENTENCE)


def _to16k(x: np.ndarray) -> np.ndarray:
    return np.asarray(soxr.resample(x.astype(np.float32) / 32768.0, SAMPLE_RATE, 16_000))


async def _speak_through(
    boards: VirtualAudio, speech: Path, work: Path, impairment: Impairment
) -> tuple[float, float, list[dict[str, Any]]]:
    """PESQ a->b of the speech, the peak frequency b->a of a tone, and both ended records."""
    length = len(read_wav(speech)[0]) / SAMPLE_RATE
    # Both boards cancel echo as a board does. Noise suppression is off: these microphones
    # are clean, and it costs clean speech about 0.5 PESQ (README, frontend bench).
    call = AgentCall(boards, work, impairment, frontend={"aec": True, "noise_suppression": False})
    await call.start(length + 5.0)
    await asyncio.sleep(2.5)  # PulseAudio's first capture callback comes ~2 s after opening
    player = boards.play(speech, "a_mic")
    tone = boards.play(_tone_wav(work / "tone.wav", 1_300.0, length + 1.0), "b_mic")
    rec = await asyncio.to_thread(boards.record_probe, length + 1.0)
    player.wait(10)
    tone.kill()
    tone.wait(10)
    ended = await call.wait()
    heard_by_a = boards.channel(rec, "a_spk").astype(float)
    spectrum = np.abs(np.fft.rfft(heard_by_a))
    peak = float(np.fft.rfftfreq(len(heard_by_a), 1 / SAMPLE_RATE)[int(np.argmax(spectrum))])
    score = pesq(
        16_000, _to16k(boards.channel(rec, "a_mic")), _to16k(boards.channel(rec, "b_spk")), "wb"
    )
    return float(score), peak, ended


def _tone_wav(path: Path, freq: float, seconds: float) -> Path:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return write_wav(path, 6000 * np.sin(2 * np.pi * freq * t))


# Floors sit below the worst runs measured, not at the benchmark targets (3.8 / 3.5 / 3.0):
# about one run in three on the virtual boards scores 3.2-3.6 clean (with 20-30 ms more
# PulseAudio playback delay; see the README), typical runs score 4.0-4.1. A broken path
# scores lower still: concealment alone ~1.5, and the recovery counters below must move.
@pytest.mark.parametrize(
    ("impairment", "floor"),
    [
        (Impairment(), 3.0),
        (Impairment(loss=0.10, seed=3), 2.9),
        (Impairment(loss=0.10, mean_burst=3.0, seed=4), 2.2),
        (Impairment(jitter_ms=20.0, seed=5), 2.9),
    ],
    ids=["clean", "loss10", "burst", "jitter"],
)
async def test_speech_survives_the_network(
    boards: VirtualAudio, speech: Path, tmp_path: Path, impairment: Impairment, floor: float
) -> None:
    score, peak, ended = await _speak_through(boards, speech, tmp_path, impairment)
    assert score >= floor, f"PESQ {score:.2f} below {floor}"
    assert abs(peak - 1_300.0) < 5.0  # the other direction carried b's tone to a
    # Both hung up on their own timer; each saw its own hang-up or the peer's BYE.
    reasons = {r["reason"] for r in ended}
    assert reasons <= {"LOCAL_HANGUP", "REMOTE_BYE"}
    assert "LOCAL_HANGUP" in reasons
    if impairment.loss:
        recovered = sum(r["fec_recovered"] + r["red_recovered"] for r in ended)
        assert recovered > 0
