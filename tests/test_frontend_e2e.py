"""End to end: a board hears its own speaker, and the far end does not hear itself back.

Two real agent processes in a call on virtual boards (``tools.lab.agents``). Board a's
speaker plays into its own microphone through a PulseAudio loopback (40 ms, unit gain,
with the daemon's own buffering and clock adjustment on top): a speaker next to a
microphone. Board b's talker speaks; a plays it, hears it, and sends it back unless its
front end removes it. Measured at b's speaker, against what b's talker said: the echo
return loss with echo cancellation on and off, from the same speech.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from agent.audio.format import SAMPLE_RATE
from tools.lab.agents import AgentCall
from tools.lab.virtual_audio import VirtualAudio, read_wav, speech_wav

SENTENCES = (
    "The parcel is at the front door. Could you come down and sign for it please. "
    "I will wait here for a few minutes, then I have to move on to the next street."
)
SETTLE_S = 4.0
"""From the far end's first words: the canceller learns the path (the bench's convergence
is about 2 s), the rest is scored."""


async def _echo_return_db(boards: VirtualAudio, speech: Path, work: Path, aec: bool) -> float:
    """b's talker's power over the power of what comes back to b's speaker (dB)."""
    length = len(read_wav(speech)[0]) / SAMPLE_RATE
    await asyncio.to_thread(work.mkdir)
    call = AgentCall(boards, work, frontend={"aec": aec, "noise_suppression": aec})
    with boards.echo("a"):
        await call.start(length + 4.0)
        await asyncio.sleep(2.5)  # PulseAudio's first capture callback comes ~2 s after opening
        player = boards.play(speech, "b_mic")
        rec = await asyncio.to_thread(boards.record_probe, length + 1.0)
        player.wait(10)
        await call.wait()
    said = boards.channel(rec, "b_mic").astype(float)
    back = boards.channel(rec, "b_spk").astype(float)
    start = int(np.flatnonzero(np.abs(said) > 300)[0]) + int(SETTLE_S * SAMPLE_RATE)
    heard_by_a = boards.channel(rec, "a_mic").astype(float)[start:]
    assert np.mean(heard_by_a**2) > 0.1 * np.mean(said[start:] ** 2), "a's loop is not there"
    return float(10 * np.log10(np.mean(said[start:] ** 2) / (np.mean(back[start:] ** 2) + 1e-9)))


async def test_a_board_that_hears_its_speaker_sends_no_echo_back(tmp_path: Path) -> None:
    speech = speech_wav(tmp_path / "speech.wav", SENTENCES)
    with VirtualAudio.start(("a", "b")) as boards:
        off = await _echo_return_db(boards, speech, tmp_path / "off", aec=False)
        on = await _echo_return_db(boards, speech, tmp_path / "on", aec=True)
    # Without cancellation b hears itself about as loud as it spoke (the loop is unit
    # gain); with it, the echo is at least 20 dB further down.
    assert off < 10, f"echo return {off:.1f} dB without cancellation: no echo to remove?"
    assert on - off >= 20, f"echo return {on:.1f} dB with cancellation, {off:.1f} dB without"
