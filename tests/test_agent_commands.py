"""The audio and config topic commands on real ``edge-intercom-agent run`` processes.

Uses the relay + agents lab of ``tools.lab.fleet`` (as ``test_agent_run`` does): mute,
volume, test-tone, config/get and config/set, with their refusals. Audio is judged from the
WAV files the agents' speakers write; every wait is bounded and waits for a condition
(packets counted in ``status``), never for wall-clock time.
"""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tools.lab.fleet import Fleet, fleet

A, B = "door-a", "door-b"
TONES = {A: 700.0, B: 1100.0}

FRAME = 960
LOUD, QUIET = 2000.0, 50.0
"""Frame RMS above which a frame carries the peer's tone / below which it is silent."""


def frame_rms(path: Path) -> npt.NDArray[np.float64]:
    with wave.open(str(path), "rb") as wav:
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(float)
    frames = samples[: len(samples) // FRAME * FRAME].reshape(-1, FRAME)
    rms: npt.NDArray[np.float64] = np.sqrt((frames**2).mean(axis=1))
    return rms


def silent_runs(rms: npt.NDArray[np.float64], at_least: int = 40) -> list[int]:
    """Lengths of silent stretches of >= ``at_least`` frames with loud audio on both sides."""
    loud = np.flatnonzero(rms > LOUD)
    assert len(loud) > 100, f"only {len(loud)} loud frames"
    runs, run = [], 0
    for value in rms[loud[0] : loud[-1] + 1]:
        if value < QUIET:
            run += 1
        else:
            if run >= at_least:
                runs.append(run)
            run = 0
    return runs


async def received(lab_: Fleet, device: str) -> int:
    status = await lab_.command(device, "status")
    return int((status["media"] or {}).get("packets_received", 0))


async def more_audio(lab_: Fleet, device: str, frames: int = 75) -> None:
    """Wait until ``device`` has received ``frames`` more packets of the call."""
    start = await received(lab_, device)
    await lab_.until_status(
        device,
        lambda s: (s["media"] or {}).get("packets_received", 0) >= start + frames,
        f"{device} to receive {frames} more packets",
    )


async def refused(lab_: Fleet, device: str, name: str, words: str, **args: Any) -> None:
    reply = await lab_.command(device, name, **args)
    assert reply["ok"] is False, reply
    assert words in reply["message"], reply


async def test_audio_and_config_commands(tmp_path: Path) -> None:
    async with fleet(tmp_path, devices=(A, B), client_id="agent-commands-test") as lab_:
        for device, auto in ((A, ()), (B, (A,))):
            await lab_.agent(
                device,
                source=f"tone:{TONES[device]:g}",
                sink=f"wav:{tmp_path / device}.wav",
                auto_answer=auto,
            )
        for device in (A, B):
            await lab_.until_status(device, lambda s: s["phase"] == "idle", f"{device} up")
        await lab_.until_online(A, B)

        # Bad arguments: an error reply each, and the agent keeps answering.
        await refused(lab_, A, "volume", "0..100", level=101)
        await refused(lab_, A, "volume", "0..100", level="loud")
        await refused(lab_, A, "volume", "required")
        await refused(lab_, A, "mute", "unknown argument", now=True)
        await refused(lab_, A, "test-tone", "frequency", frequency=5)
        await refused(lab_, A, "test-tone", "seconds", seconds=600)
        await refused(lab_, A, "config/set", "unknown key", key="calls.nope", value=True)
        await refused(lab_, A, "config/set", "expected bool", key="calls.privacy", value=3)
        await refused(lab_, A, "config/set", "is a table", key="calls", value=1)
        await refused(lab_, A, "config/set", "key must be", value=1)
        await refused(lab_, A, "config/set", "agent file only", key="device_id", value="door-z")

        # Mute and volume hold outside calls too; status shows them.
        assert (await lab_.command(A, "mute"))["muted"] is True
        status = await lab_.command(A, "status")
        assert (status["muted"], status["volume"]) == (True, 100)
        await lab_.command(A, "unmute")
        config = (await lab_.command(A, "config/get"))["config"]
        assert config["device_id"] == A and config["audio"]["volume"] == 100
        assert config["calls"]["do_not_disturb"] is False

        # A call; b answers automatically.
        reply = await lab_.command(A, "call", peer=B)
        assert reply["ok"], reply
        call = reply["call_id"]
        for device in (A, B):
            await lab_.until_status(
                device,
                lambda s: (
                    s["phase"] == "active" and (s["media"] or {}).get("packets_received", 0) >= 50
                ),
                f"{device} active with 1 s of audio",
            )
        await refused(lab_, A, "test-tone", "call is in progress")

        # a mutes: b hears silence, the call stays up (RTP keeps flowing), then a unmutes.
        assert (await lab_.command(A, "mute"))["ok"]
        assert (await lab_.command(A, "status"))["muted"] is True
        await more_audio(lab_, B)
        assert (await lab_.command(A, "unmute"))["ok"]
        await more_audio(lab_, B)

        # a's speaker at volume 0: silence in a's own sink, then back to 100.
        reply = await lab_.command(A, "volume", level=0)
        assert (reply["ok"], reply["volume"]) == (True, 0), reply
        assert (await lab_.command(A, "status"))["volume"] == 0
        await more_audio(lab_, A)
        assert (await lab_.command(A, "volume", level=100))["ok"]
        await more_audio(lab_, A)

        assert (await lab_.command(A, "hangup"))["ok"]
        for device in (A, B):
            status = await lab_.until_status(
                device,
                lambda s: (s["last_call"] or {}).get("call_id") == call,
                f"{device} call ended",
            )
            assert status["last_call"]["reason"] in ("local-hangup", "remote-hangup")

        # No call any more: a test tone plays on a's speaker.
        reply = await lab_.command(A, "test-tone", frequency=1000, seconds=0.6)
        assert reply["ok"], reply
        await lab_.until_status(A, lambda s: not s["test_tone"], "the test tone to finish")

        # Do-not-disturb switched on at run time: b's policy refuses a's next call.
        reply = await lab_.command(B, "config/set", key="calls.do_not_disturb", value="true")
        assert (reply["ok"], reply["applied"], reply["restart_required"]) == (True, True, False)
        reply = await lab_.command(B, "config/set", key="calls.ring_timeout_s", value=12)
        assert (reply["ok"], reply["applied"], reply["restart_required"]) == (True, False, True)
        config = (await lab_.command(B, "config/get"))["config"]
        assert config["calls"]["do_not_disturb"] is True
        assert config["calls"]["ring_timeout_s"] == 12.0
        reply = await lab_.command(A, "call", peer=B)
        assert reply["ok"], reply
        refused_call = reply["call_id"]
        status = await lab_.until_status(
            A,
            lambda s: (s["last_call"] or {}).get("call_id") == refused_call,
            "b's policy to decline",
        )
        assert status["last_call"]["reason"] == "policy-refused", status["last_call"]

        # Saved: b restarted keeps both values (its speaker's WAV is kept: null sink now).
        await lab_.stop_agent(B)
        await lab_.agent(B, source=f"tone:{TONES[B]:g}", sink="null", auto_answer=(A,))
        await lab_.until_status(B, lambda s: s["phase"] == "idle", "b up again")
        config = (await lab_.command(B, "config/get"))["config"]
        assert (config["calls"]["do_not_disturb"], config["calls"]["ring_timeout_s"]) == (True, 12)

        for device in (A, B):
            await lab_.stop_agent(device)
        logs = lab_.logs()

    # b heard a's tone, one long silence while a was muted, then the tone again.
    rms_b = frame_rms(tmp_path / f"{B}.wav")
    assert len(silent_runs(rms_b)) == 1, f"{silent_runs(rms_b)}\n{logs}"
    # a heard b's tone, one long silence at volume 0, then b's tone; then the test tone.
    rms_a = frame_rms(tmp_path / f"{A}.wav")
    assert len(silent_runs(rms_a)) == 1, f"{silent_runs(rms_a)}\n{logs}"
    with wave.open(str(tmp_path / f"{A}.wav"), "rb") as wav:
        rate = wav.getframerate()
        tail = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")[-rate // 2 :]
    spectrum = np.abs(np.fft.rfft(tail.astype(float) * np.hanning(len(tail))))
    peak = float(np.fft.rfftfreq(len(tail), 1 / rate)[int(np.argmax(spectrum))])
    assert abs(peak - 1000.0) < 10.0 and abs(peak - TONES[B]) > 50, f"tail at {peak:.0f} Hz"
