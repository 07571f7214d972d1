"""A smoke alarm heard through a board's microphone (real ALSA on a virtual board, a paired
board, the relay and its mosquitto as in production) arrives as an alert with an
encrypted clip: the relay's clip key reaches the board on its retained ``config``, the
store keeps the clip sealed, and ``edge-intercom-relay alerts clip`` makes files of it
that hold the alarm's tone."""

from __future__ import annotations

import asyncio
import io
import json
import wave
from pathlib import Path

import av
import numpy as np

from agent.audio.format import SAMPLE_RATE
from agent.edge.clip import SealedClip
from agent.edge.recorder import CLIP_KEY_FILE
from cloud_relay.store import AlertRecord, Store
from tools.lab import sounds
from tools.lab.fleet import RELAY_CMD, WAIT, Fleet, fleet
from tools.lab.virtual_audio import VirtualAudio, write_wav

A = "door-a"


def peak_hz(samples: np.ndarray) -> float:
    """The strongest frequency of ``samples`` (48 kHz), between 300 Hz and 8 kHz."""
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64) * np.hanning(len(samples))))
    hz = np.fft.rfftfreq(len(samples), 1 / SAMPLE_RATE)
    band = (hz >= 300) & (hz <= 8000)
    return float(hz[band][np.argmax(spectrum[band])])


async def alert_with_clip(f: Fleet) -> AlertRecord:
    store = await Store.open(f"sqlite:///{f.db_path}")
    try:
        async with asyncio.timeout(WAIT + 20):
            while True:
                alerts = await store.run(store.alerts)
                found = [a for a in alerts if a.kind == "smoke_alarm"]
                if found:
                    [alert] = found
                    stored = await store.run(store.alert_clip, alert.id)
                    assert stored is not None and stored[0] == A
                    # Only ciphertext at rest: a sealed clip, whose audio is not in clear.
                    assert SealedClip.from_bytes(stored[1]).to_bytes() == stored[1]
                    assert b"OpusHead" not in stored[1]
                    return alert
                await asyncio.sleep(0.2)
    finally:
        await store.close()


async def relay_cli(f: Fleet, *args: str) -> str:
    argv = [*RELAY_CMD, *args, "--config", str(f.root / "relay.toml"), "--data-dir",
            str(f.data_dir)]  # fmt: skip
    code, out, err = await f._run(argv, " ".join(args[:2]))
    assert code == 0, err.decode(errors="replace")
    return out.decode()


async def test_a_smoke_alarm_arrives_with_a_clip_that_holds_its_tone(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    alarm = sounds.alarm(rng, "smoke_alarm", 12.0)
    mixed = sounds.to_int16(sounds.mix(alarm.samples, sounds.household(rng, 14.0), 10.0, 1.0))
    wav_in = write_wav(tmp_path / "smoke.wav", mixed)
    with VirtualAudio.start(("a",)) as audio:
        board = audio.boards[0]
        extra = (
            f'[audio.capture]\nname = "^{board.mic}$"\n'
            f'[audio.playback]\nname = "^{board.speaker}$"\n'
            "[alerts.clip]\nenabled = true\n"
        )
        async with fleet(tmp_path, devices=(A,), client_id="clip-e2e") as f:
            await f.agent(A, extra=extra, env=audio.env)
            await f.until_online(A)
            # The relay's clip key comes with the board's retained config.
            key_file = f.state_dir(A) / CLIP_KEY_FILE
            async with asyncio.timeout(WAIT):
                while not key_file.exists():
                    await asyncio.sleep(0.05)
            player = audio.play(wav_in, board.mic)
            try:
                alert = await alert_with_clip(f)
            finally:
                player.kill()
                player.wait(10)
            assert alert.has_clip
            summary = alert.body["clip"]
            assert summary["seconds"] == 5.0 and summary["before_s"] == 3.0
            assert 1000 < summary["bytes"] <= 24 * 1024

            listing = await relay_cli(f, "alerts", "--json")
            [line] = [json.loads(x) for x in listing.splitlines() if alert.id in x]
            assert line["clip"] is True and "clip" in line["alert"]

            ogg, wav_out = tmp_path / "clip.ogg", tmp_path / "clip.wav"
            await relay_cli(f, "alerts", "clip", alert.id, "--out", str(wav_out))
            await relay_cli(f, "alerts", "clip", alert.id, "--out", str(ogg))

    with wave.open(io.BytesIO(wav_out.read_bytes())) as w:
        assert (w.getframerate(), w.getnchannels()) == (SAMPLE_RATE, 1)
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    assert len(pcm) == 5 * SAMPLE_RATE
    with av.open(str(ogg)) as container:  # FFmpeg reads the Ogg Opus file
        decoded = np.concatenate([fr.to_ndarray().ravel() for fr in container.decode(audio=0)])
    assert len(decoded) == 5 * SAMPLE_RATE - 312
    # What was heard is the alarm: its tone is the strongest sound in the clip.
    for samples in (pcm, decoded):
        assert abs(peak_hz(samples) - alarm.freq_hz) < 0.02 * alarm.freq_hz, alarm
