"""A smoke alarm heard through a board's microphone (real ALSA on a virtual board) ends up
as one alert in the relay's store and at a webhook receiver: detectors on the live capture
stream, the outbox, the uplink, the relay's acknowledgement and its signed webhook."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from pathlib import Path

import numpy as np

from agent.edge.alerts import Severity
from agent.edge.outbox import OUTBOX_FILE, Outbox
from cloud_relay.store import AlertRecord, Store
from cloud_relay.webhooks import SIGNATURE_HEADER
from tools.lab import sounds
from tools.lab.fleet import WAIT, Fleet, fleet
from tools.lab.virtual_audio import VirtualAudio, write_wav
from tools.lab.webhooks import Receiver, receiver

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


async def test_a_smoke_alarm_at_the_microphone_is_stored_once_and_sent_to_the_webhook(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(3)
    alarm = sounds.alarm(rng, "smoke_alarm", 12.0)
    clip = sounds.to_int16(sounds.mix(alarm.samples, sounds.household(rng, 14.0), 10.0, 1.0))
    wav = write_wav(tmp_path / "smoke.wav", clip)
    secret = tmp_path / "webhook.secret"
    secret.write_bytes(b"edge-intercom-webhook-test-key")
    secret.chmod(0o600)
    async with receiver() as hook:
        webhook = f'[[webhooks]]\nurl = "{hook.url}/alerts"\nsecret_file = "{secret}"\n'
        await _hear_the_alarm(tmp_path, wav, webhook, hook)
        # The webhook got it once, signed with the shared key over the exact body.
        [got] = [g for g in hook.got if json.loads(g.body)["alert"]["kind"] == "smoke_alarm"]
        assert json.loads(got.body)["device"] == A
        mac = hmac.new(secret.read_bytes(), got.body, hashlib.sha256).hexdigest()
        assert got.headers[SIGNATURE_HEADER] == f"sha256={mac}"


async def _hear_the_alarm(tmp_path: Path, wav: Path, webhook: str, hook: Receiver) -> None:
    with VirtualAudio.start(("a",)) as audio:
        board = audio.boards[0]
        extra = (
            f'[audio.capture]\nname = "^{board.mic}$"\n'
            f'[audio.playback]\nname = "^{board.speaker}$"\n'
        )
        async with fleet(tmp_path, devices=(A,), client_id="edge-e2e", relay_extra=webhook) as f:
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
            async with asyncio.timeout(WAIT):
                while not hook.got:
                    await asyncio.sleep(0.05)
