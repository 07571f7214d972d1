"""The self-test in real ``edge-intercom-agent run`` processes on the paced ALSA path.

Board ``loop``'s speaker plays into the PulseAudio null sink its microphone records
(speaker looped into microphone, with the real device buffers in between): asked with
``edge-intercom-relay cmd DEVICE selftest``, it passes with a measured delay and the
record arrives on telemetry. Board ``deaf``'s microphone hears a sink nobody plays into:
its scheduled test fails, is tried again, fails again, and the ``selftest_failed`` alert
reaches the relay's store through the outbox. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from audio_env import PulseServer, write_asoundrc
from test_edge_e2e import stored_alerts

from agent.edge.alerts import SELFTEST_FAILED
from agent.signaling.mqtt import MqttClient
from agent.signaling.topics import Kind, device_topic
from cloud_relay.store import Store
from tools.lab.fleet import WAIT, fleet

LOOP, DEAF = "door-loop", "door-deaf"
SELFTEST = "[selftest]\nspacing_s = 2.0\nretry_after_s = 0.5\n"
QUIET_KINDS = {"mic_silent"}
"""Alerts a board whose microphone is a silent null sink raises anyway."""


def board(mic: str, speaker: str, selftest: str) -> str:
    return (
        f'[audio.capture]\nname = "^{mic}$"\n[audio.playback]\nname = "^{speaker}$"\n'
        f"{SELFTEST}{selftest}"
    )


async def selftest_records(client: MqttClient, device: str, count: int) -> list[dict[str, Any]]:
    topic = device_topic(device, Kind.TELEMETRY)
    found: list[dict[str, Any]] = []
    async with asyncio.timeout(WAIT + 15):
        while len(found) < count:
            message = await client.recv()
            record = json.loads(message.payload)
            if message.topic == topic and record.get("event") == "selftest":
                found.append(record)
    return found


async def test_a_looped_board_passes_and_a_deaf_one_raises_the_alert(
    tmp_path: Path, alsa_home: Path, pulse_server: PulseServer
) -> None:
    write_asoundrc(
        alsa_home,
        {
            "loopmic": pulse_server.capture_pcm("mic"),
            "loopspk": pulse_server.playback_pcm("mic"),
            "deafmic": pulse_server.capture_pcm("hotmic"),
            "deafspk": pulse_server.playback_pcm("spk"),
        },
    )
    async with fleet(tmp_path, devices=(LOOP, DEAF), client_id="selftest-e2e") as f:
        telemetry = MqttClient(
            f.mqtt_config("selftest-telemetry"),
            subscriptions=[device_topic(d, Kind.TELEMETRY) for d in (LOOP, DEAF)],
        )
        await telemetry.start()
        try:
            await f.agent(LOOP, extra=board("loopmic", "loopspk", "enabled = false\n"))
            await f.agent(DEAF, extra=board("deafmic", "deafspk", "enabled = true\n"
                                            "interval_s = 1.0\n"))  # fmt: skip
            await f.until_status(LOOP, lambda s: s["phase"] == "idle", "the looped board up")

            code, reply = await f.cli(LOOP, "selftest")
            assert (code, reply["ok"], reply["pass"]) == (0, True, True), reply
            assert 0 < reply["delay_ms"] < 500 and abs(reply["drift_ppm"]) < 20, reply
            assert abs(reply["level_db"]) < 1.0, reply  # a null sink: what is played is heard
            [record] = await selftest_records(telemetry, LOOP, 1)
            assert record["trigger"] == "command"
            assert record["delay_ms"] == reply["delay_ms"]

            # Telemetry is not queued while the board connects: a first test that ran before
            # its session was up has no record. Take the first attempt 1 and what follows it.
            records = await selftest_records(telemetry, DEAF, 2)
            while records[0]["attempt"] != 1:
                records = records[1:] + await selftest_records(telemetry, DEAF, 1)
            first, second = records
            assert [r["attempt"] for r in (first, second)] == [1, 2]
            assert not first["pass"] and not second["pass"]
            assert second["failures"] == ["test signal not heard"]
            [alert, *_] = await stored_alerts(f, SELFTEST_FAILED)
            assert (alert.device, alert.severity, alert.detector) == (DEAF, "warning", "selftest")
        finally:
            await telemetry.close()
        # The detectors did not take the test signal for a sound in the room.
        store = await Store.open(f"sqlite:///{f.db_path}")
        try:
            kinds = {a.kind for a in await store.run(store.alerts) if a.device == LOOP}
        finally:
            await store.close()
        assert kinds <= QUIET_KINDS, kinds
