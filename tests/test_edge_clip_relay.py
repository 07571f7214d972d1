"""Alert clips at the relay: a real mosquitto, the relay in-process with its clip key, a
board's outbox and uplink on a real session. The key goes out on the retained
``config``; good clips are stored sealed; a clip that does not open is counted and
dropped while its alert is stored."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

from mqtt_env import fast_config, until
from test_alerts_relay import alert, board, outbox_empty, relay_config

from agent.edge.alerts import Alert
from agent.edge.clip import ClipAudio, new_private_key, public_key_of, seal
from agent.signaling import topics
from agent.signaling.mqtt import MqttClient
from agent.signaling.topics import Kind
from cloud_relay.clips import ClipKey, open_clip
from cloud_relay.service import Relay
from cloud_relay.store import Store
from tools.lab.broker import Mosquitto

DEVICE = "door-1"
AUDIO = ClipAudio(1, (b"\xf8\xff\xfe",) * 10)  # ten 20 ms Opus packets of silence


def with_clip(a: Alert, public_key: bytes, alert_id: str | None = None) -> Alert:
    return dataclasses.replace(a, clip=seal(AUDIO, public_key, alert_id or a.id).to_text())


async def test_clips_are_stored_sealed_and_bad_ones_cost_only_the_clip(
    broker: Mosquitto, tmp_path: Path
) -> None:
    config = relay_config(broker, tmp_path / "relay")
    key = ClipKey.load(tmp_path / "relay" / "pki", create=True)
    store = await Store.open(config.store_url())
    relay = Relay(config, store, clip_key=key)
    await relay.start()
    watcher = MqttClient(
        fast_config("lab-watcher", broker.port, broker.host),
        subscriptions=[topics.device_topic(DEVICE, Kind.CONFIG)],
    )
    try:
        async with board(broker, tmp_path / "board") as b:
            # The board came online: the relay put its clip key on the retained config.
            await watcher.start()
            msg = await watcher.recv()
            assert json.loads(msg.payload)["clip_key"] == base64.b64encode(key.public).decode()

            good = with_clip(alert(0), key.public)
            stranger = with_clip(alert(1), public_key_of(new_private_key()))
            moved = with_clip(alert(2), key.public, alert_id=alert(3).id)
            garbage = dataclasses.replace(alert(4), clip="not base64 at all!")
            for a in (good, stranger, moved, garbage):
                await b.uplink.submit(a)
            await outbox_empty(b, "every alert acked, bad clips or not")
            await until(lambda: relay.stats.alerts_stored == 4, "all four alerts stored")
            assert relay.stats.alerts_with_clip == 1
            assert relay.stats.dropped == {"clip-key": 1, "clip-auth": 1, "clip-base64": 1}

        records = {r.id: r for r in await store.run(store.alerts)}
        assert {i for i, r in records.items() if r.has_clip} == {good.id}
        size = len(seal(AUDIO, key.public, good.id).to_bytes())
        assert records[good.id].body["clip"] == {"bytes": size, "seconds": 0.2, "before_s": 0.02}
        assert all("clip" not in records[a.id].body for a in (stranger, moved, garbage))
        stored = await store.run(store.alert_clip, good.id)
        assert stored is not None and stored[0] == DEVICE
        assert open_clip(stored[1], key, good.id) == AUDIO
        assert await store.run(store.alert_clip, stranger.id) is None
    finally:
        await watcher.close()
        await relay.close()
        await store.close()
