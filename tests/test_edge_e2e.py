"""A smoke alarm heard through a board's microphone (real ALSA on a virtual board) ends up
as one alert in the relay's store: detectors on the live capture stream, the outbox,
the uplink and the relay's acknowledgement."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from agent.edge.alerts import Severity
from agent.edge.outbox import OUTBOX_FILE, Outbox
from cloud_relay.store import AlertRecord, Store
from tools.lab import sounds
from tools.lab.fleet import WAIT, Fleet, fleet
from tools.lab.virtual_audio import VirtualAudio, write_wav

A = "door-a"


async def stored_alerts(f: Fleet, kind: str) -> list[AlertRecord]:
    store = await Store.open(f"sqlite:///{f.db_path}")
    try:
        async with asyncio.timeout(WAIT + 15):
            while True:
                found = [a for a in await store.run(store.alerts) if a.kind == kind]
                if found:
                    return found
                await asyncio.sleep(0.2)
    finally:
        await store.close()


async def test_a_smoke_alarm_at_the_microphone_becomes_one_stored_alert(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    alarm = sounds.alarm(rng, "smoke_alarm", 12.0)
    clip = sounds.to_int16(sounds.mix(alarm.samples, sounds.household(rng, 14.0), 10.0, 1.0))
    wav = write_wav(tmp_path / "smoke.wav", clip)
    with VirtualAudio.start(("a",)) as audio:
        board = audio.boards[0]
        extra = (
            f'[audio.capture]\nname = "^{board.mic}$"\n'
            f'[audio.playback]\nname = "^{board.speaker}$"\n'
        )
        async with fleet(tmp_path, devices=(A,), client_id="edge-e2e") as f:
            await f.agent(A, extra=extra, env=audio.env)
            await f.until_online(A)
            player = audio.play(wav, board.mic)
            try:
                [alert] = await stored_alerts(f, "smoke_alarm")
            finally:
                player.kill()
                player.wait(10)
            assert alert.device == A and alert.severity == Severity.CRITICAL.value
            assert alert.detector == "alarm"
            # The relay acknowledged it: the board's outbox is empty again.
            outbox = await Outbox.open(f.state_dir(A) / OUTBOX_FILE)
            try:
                async with asyncio.timeout(WAIT):
                    while await outbox.count():
                        await asyncio.sleep(0.1)
            finally:
                await outbox.close()
