"""Home Assistant MQTT discovery through the real relay and broker, with real boards.

The relay (``tools.lab.fleet``, ``[home_assistant] enabled``) announces each board that
comes online; an operator client standing in for Home Assistant (the relay's client
certificate, as ``edge-intercom-relay cmd`` uses) reads the retained configs and states,
presses the buttons, and sees a revoked board's entities removed. door-a's door relay
and tamper switch are on the lab chip (``agent.gpio.fake``).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from test_gpio_e2e import fake_chip, until_pulses

from agent.signaling.mqtt import MqttClient
from tools.lab.fleet import RELAY_CMD, REPO, WAIT, Fleet, fleet

A, B = "door-a", "door-b"
TAMPER = 23
PREFIX = "homeassistant"
CONFIG = re.compile(rf"{PREFIX}/(\w+)/edge-intercom-([a-z0-9-]+)/(\w+)/config")
COMPONENTS = {"presence": "binary_sensor", "sound_level": "sensor", "alert": "event",
              "door": "button", "call": "button"}  # fmt: skip
REQUIRED = {
    "binary_sensor": {"state_topic", "device_class", "payload_on", "payload_off"},
    "sensor": {
        "state_topic",
        "device_class",
        "unit_of_measurement",
        "state_class",
        "availability",
    },
    "event": {"state_topic", "event_types", "availability"},
    "button": {"command_topic", "payload_press", "availability"},
}
"""What Home Assistant needs of each component here, besides the keys every entity has."""


class Watcher:
    """Home Assistant's view: the last payload on every topic it subscribed to."""

    def __init__(self, f: Fleet, name: str) -> None:
        self.f = f
        self.client = MqttClient(
            f.mqtt_config(name, session_expiry=0), subscriptions=[f"{PREFIX}/#", "edge-intercom/#"]
        )
        self.seen: dict[str, bytes] = {}
        self.log: list[tuple[str, bytes]] = []

    async def until(self, check: Callable[[], bool], what: str) -> None:
        try:
            async with asyncio.timeout(WAIT):
                while not check():
                    msg = await self.client.recv()
                    self.seen[msg.topic] = msg.payload
                    self.log.append((msg.topic, msg.payload))
        except TimeoutError:
            raise self.f.fail(f"Home Assistant never saw {what}: {sorted(self.seen)}") from None

    def configs(self, device: str) -> dict[str, dict[str, Any]]:
        """The device's entities by name, with their configs (removed ones left out)."""
        out = {}
        for topic, payload in self.seen.items():
            m = CONFIG.fullmatch(topic)
            if m is not None and m[2] == device and payload:
                assert COMPONENTS[m[3]] == m[1], topic
                out[m[3]] = json.loads(payload)
        return out


def check_config(device: str, entity: str, config: dict[str, Any]) -> None:
    component = COMPONENTS[entity]
    assert REQUIRED[component] <= set(config), (entity, config)
    slug = f"edge_intercom_{device.replace('-', '_')}_{entity}"
    assert config["unique_id"] == slug
    assert config["default_entity_id"] == f"{component}.{slug}"
    assert config["device"]["identifiers"] == [f"edge-intercom-{device}"]
    assert {"name", "manufacturer", "model", "sw_version"} <= set(config["device"])
    for availability in config.get("availability", []):
        assert availability["topic"] == f"edge-intercom/{device}/availability"


async def revoke(f: Fleet, device: str) -> None:
    argv = [*RELAY_CMD, "device", "revoke", "--config", str(f.root / "relay.toml"),
            "--data-dir", str(f.data_dir), device]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*argv, cwd=REPO, stdout=sys.stderr)
    async with asyncio.timeout(WAIT):
        assert await proc.wait() == 0


async def test_boards_appear_in_home_assistant_and_its_buttons_work(tmp_path: Path) -> None:
    sock = tmp_path / "gpio.sock"
    extra = f'[home_assistant]\nenabled = true\ncall_targets = {{ {A} = "{B}" }}\n'
    async with fleet(tmp_path, devices=(A, B), client_id="ha-test", relay_extra=extra) as f:
        gpio = f'[gpio]\nchip = "fake:{sock}"\ndoor_pulse_s = 0.2\n'
        # The 700 Hz tone (-9 dBFS) is no loud noise here: a loud_noise alert raised after
        # Home Assistant subscribed (a slow machine) would come before the tamper event.
        gpio += "[edge.loud_noise]\nthreshold_dbfs = -3\n"
        await f.agent(A, source="tone:700", sink="null", settings='board = "raspberry-pi-4-usb"',
                      extra=gpio)  # fmt: skip
        await f.agent(B, source="tone:1100", sink="null", auto_answer=[A])
        await f.until_online(A, B)
        ha = Watcher(f, "home-assistant")
        await ha.client.start()
        try:
            # Each board online: its retained configs and availability.
            await ha.until(
                lambda: len(ha.configs(A)) == 5 and len(ha.configs(B)) == 4,
                "both boards' entities",
            )
            await ha.until(
                lambda: all(
                    ha.seen.get(f"edge-intercom/{d}/availability") == b"online" for d in (A, B)
                ),
                "both boards available",
            )
            for device in (A, B):
                for entity, config in ha.configs(device).items():
                    check_config(device, entity, config)
            a = ha.configs(A)
            assert a["presence"]["device_class"] == "connectivity"
            assert a["presence"]["state_topic"] == f"edge-intercom/{A}/availability"
            sound = a["sound_level"]
            described = (sound["device_class"], sound["unit_of_measurement"], sound["state_class"])
            assert described == ("sound_pressure", "dB", "measurement")
            assert {"tamper", "smoke_alarm", "glass_break"} <= set(a["alert"]["event_types"])
            assert "call" not in ha.configs(B)  # no call target: no Call button

            async with fake_chip(f, sock) as chip:
                # An alert: an event of its kind, and the sound level it was raised at.
                await chip.set(TAMPER, True)
                alert_topic = f"edge-intercom/{A}/alert"
                await ha.until(lambda: alert_topic in ha.seen, "the tamper event")
                event = json.loads(ha.seen[alert_topic])
                assert (event["event_type"], event["severity"]) == ("tamper", "critical")
                assert len(event["alert_id"]) == 32
                await ha.until(
                    lambda: f"edge-intercom/{A}/sound_level" in ha.seen, "the sound level"
                )
                assert float(ha.seen[f"edge-intercom/{A}/sound_level"]) == 0.0

                # The door button: door/open on the board, whose relay pulses.
                await ha.client.publish(a["door"]["command_topic"], b"PRESS")
                await until_pulses(f, chip, 1)

            # The call button: door-a calls its configured peer, who answers.
            await ha.client.publish(a["call"]["command_topic"], b"PRESS")
            await f.until_status(
                B, lambda s: s["phase"] == "active" and s["peer"] == A, f"{B} called by {A}"
            )
            # Anything else on a press topic is ignored.
            await ha.client.publish(f"edge-intercom/{B}/call/press", b"PRESS")
            await ha.client.publish(f"edge-intercom/{A}/door/press", b"open sesame")

            # A revoked board leaves Home Assistant: its configs and states are removed.
            await revoke(f, B)
            await ha.until(
                lambda: not ha.configs(B) and ha.seen.get(f"edge-intercom/{B}/availability") == b"",
                f"{B}'s entities removed",
            )
        finally:
            await ha.client.close()

        # Nothing of it is retained any more; door-a's entities stay.
        fresh = Watcher(f, "home-assistant-2")
        await fresh.client.start()
        try:
            await fresh.until(lambda: len(fresh.configs(A)) == 5, f"{A}'s entities")
            assert not fresh.configs(B)
            assert f"edge-intercom/{B}/availability" not in fresh.seen
        finally:
            await fresh.client.close()
        log = (f.root / "relay.log").read_text()
        assert f"{B} has no call button" in log
        assert f"ignored a message on edge-intercom/{A}/door/press" in log
