"""Home Assistant MQTT discovery: every device as a Home Assistant device, kept by the relay.

For each device whose presence it takes, the relay publishes retained discovery configs
(``<discovery_prefix>/<component>/edge-intercom-<device>/<entity>/config``) for:

- ``binary_sensor`` *presence* (device class ``connectivity``): the relay's view of the
  device's presence, after the offline grace;
- ``sensor`` *sound level* (``sound_pressure``, dB): the level of the device's latest
  alert (boards send no other level upstream: no raw audio, no level stream);
- ``event`` *alert*: one event per stored alert, its ``event_type`` the alert's kind
  (``metrics.ALERT_KINDS``), with severity, level, confidence and id as attributes;
- ``button`` *door*: ``door/open`` to the device as an operator (no ``by``: it opens);
- ``button`` *call*: ``call`` to the peer ``call_targets`` names for the device (no
  target: no button).

The states live under the relay's own root, ``edge-intercom/<device>/``:
``availability`` (retained ``online``/``offline``: every entity but presence, which
shows it, is unavailable while the device is offline), ``sound_level`` (retained),
``alert`` (not retained: an event happens once) and the buttons' command topics
``door/press`` and ``call/press``. A press reaches one relay worker (shared
subscription; a retained press is never taken) and becomes the device command, through
``Relay.send_command``: recorded like any operator's, answered by the device, logged.
One press per device and button is in flight at a time; more meanwhile are dropped.

A revoked device's configs and retained states are removed (empty retained payloads),
and it is not announced again unless it is paired anew.

Home Assistant connects to the broker as an operator client, like ``edge-intercom-relay
cmd``: the relay's client certificate (``pki/relay-client.pem``, its key and
``pki/ca.pem``) on the relay's loopback listener (``broker.relay_port``). The broker ACL
lets that identity read and write the discovery prefix and ``edge-intercom/#``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from dataclasses import replace
from typing import Any, Final

from agent.edge.alerts import Alert
from agent.signaling import topics
from agent.signaling.mqtt import Message, MqttClient, MqttTls, PublishFailed
from agent.signaling.topics import TopicError, check_device_id
from cloud_relay.commands import CommandError
from cloud_relay.config import HA_STATE_ROOT as STATE_ROOT
from cloud_relay.config import HomeAssistantSettings, RelayConfig
from cloud_relay.metrics import ALERT_KINDS
from cloud_relay.presence import Presence
from cloud_relay.service import Relay, RelayObserver, mqtt_config

logger = logging.getLogger(__name__)

PRESS: Final = b"PRESS"
"""What a Home Assistant button publishes (its default ``payload_press``)."""
PRESS_FILTER: Final = f"{STATE_ROOT}/+/+/press"
PRESS_TIMEOUT_S: Final = 10.0
"""How long a press waits for the device's reply (also the command's MQTT expiry)."""
MANUFACTURER: Final = "edge-intercom"
ONLINE: Final = "online"
OFFLINE: Final = "offline"


def state_topic(device: str, what: str) -> str:
    """``edge-intercom/<device>/<what>``."""
    return f"{STATE_ROOT}/{check_device_id(device)}/{what}"


def config_topic(prefix: str, component: str, device: str, entity: str) -> str:
    """Where Home Assistant reads an entity's discovery config."""
    return f"{prefix}/{component}/{MANUFACTURER}-{check_device_id(device)}/{entity}/config"


ENTITIES: Final = (
    ("binary_sensor", "presence"),
    ("sensor", "sound_level"),
    ("event", "alert"),
    ("button", "door"),
    ("button", "call"),
)
"""(component, entity) of every entity a device may have."""

RETAINED_STATES: Final = ("availability", "sound_level")


def parse_press(topic: str) -> tuple[str, str] | None:
    """(device, button) of a press topic, None if it is not one."""
    levels = topic.split("/")
    if len(levels) != 4 or levels[0] != STATE_ROOT or levels[3] != "press":
        return None
    device, button = levels[1:3]
    if button not in ("door", "call") or not topics.is_device_id(device):
        return None
    return device, button


def discovery(
    settings: HomeAssistantSettings, device: str, presence: Presence
) -> list[tuple[str, bytes]]:
    """(config topic, retained payload) of each of ``device``'s entities; an empty payload
    removes an entity it must not have (a Call button without a target)."""
    slug = f"{MANUFACTURER}_{device}".replace("-", "_")
    block: dict[str, Any] = {
        "identifiers": [f"{MANUFACTURER}-{device}"],
        "name": device,
        "manufacturer": MANUFACTURER,
    }
    if presence.board is not None:
        block["model"] = presence.board
    if presence.version is not None:
        block["sw_version"] = presence.version
    availability = {
        "availability": [{"topic": state_topic(device, "availability")}],
        "payload_available": ONLINE,
        "payload_not_available": OFFLINE,
    }
    specific: dict[str, dict[str, Any]] = {
        "presence": {
            "name": "Presence",
            "device_class": "connectivity",
            "entity_category": "diagnostic",
            "state_topic": state_topic(device, "availability"),
            "payload_on": ONLINE,
            "payload_off": OFFLINE,
        },
        "sound_level": {
            "name": "Sound level",
            "device_class": "sound_pressure",
            "unit_of_measurement": "dB",
            "state_class": "measurement",
            "state_topic": state_topic(device, "sound_level"),
            **availability,
        },
        "alert": {
            "name": "Alert",
            "event_types": list(ALERT_KINDS),
            "state_topic": state_topic(device, "alert"),
            **availability,
        },
        "door": {
            "name": "Open door",
            "icon": "mdi:door-open",
            "command_topic": state_topic(device, "door/press"),
            "payload_press": PRESS.decode(),
            **availability,
        },
    }
    target = settings.call_targets.get(device)
    if target is not None:
        specific["call"] = {
            "name": f"Call {target}",
            "icon": "mdi:phone",
            "command_topic": state_topic(device, "call/press"),
            "payload_press": PRESS.decode(),
            **availability,
        }
    out = []
    for component, entity in ENTITIES:
        topic = config_topic(settings.discovery_prefix, component, device, entity)
        if entity not in specific:
            out.append((topic, b""))
            continue
        config = {
            **specific[entity],
            "unique_id": f"{slug}_{entity}",
            "default_entity_id": f"{component}.{slug}_{entity}",
            "device": block,
            "qos": 1,
        }
        out.append((topic, json.dumps(config, separators=(",", ":")).encode()))
    return out


def alert_event(alert: Alert) -> bytes:
    """The ``event`` entity's state message for a stored alert."""
    kind = alert.kind if alert.kind in ALERT_KINDS else "other"
    event = {
        "event_type": kind,
        "severity": alert.severity.value,
        "level": alert.level,
        "confidence": alert.confidence,
        "detector": alert.detector,
        "alert_id": alert.id,
    }
    return json.dumps(event, separators=(",", ":")).encode()


class HomeAssistant(RelayObserver):
    """Discovery, states and button presses: an observer of the relay, ``start(relay)``
    before the relay starts, ``close()`` before it closes."""

    def __init__(self, config: RelayConfig, tls: MqttTls | None = None) -> None:
        """Presses are read on a connection of its own as the relay (``tls``: its client
        certificate), not by the relay's reader; what it publishes goes out on the relay's."""
        self.settings = config.home_assistant
        # No session kept: a press made while no relay reads them is not taken later.
        mqtt = replace(mqtt_config(config, tls), client_id=f"{config.mqtt.client_id}-ha",
                       session_expiry=0)  # fmt: skip
        self.client = MqttClient(mqtt, subscriptions=[topics.shared(PRESS_FILTER)])
        self.dropped: Counter[str] = Counter()
        """Presses not taken, by reason."""
        self._relay: Relay | None = None
        self._reader: asyncio.Task[None] | None = None
        self._presses: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._announced: dict[str, tuple[str | None, str | None]] = {}
        """Devices announced since start, with the board and version in their configs."""
        self._available: dict[str, str] = {}
        self._revoked: frozenset[str] = frozenset()

    async def start(self, relay: Relay) -> None:
        """Connect (``ConnectFailed`` after the connect timeout) and take presses, which
        become ``relay``'s commands; again after it started: nothing."""
        if self._reader is not None:
            return
        await self.client.start()
        self._relay = relay
        self._reader = asyncio.create_task(self._read(), name="home-assistant-presses")
        logger.info("Home Assistant discovery under %s/", self.settings.discovery_prefix)

    async def close(self) -> None:
        """Stop taking presses and cancel those in flight, disconnect."""
        tasks = [t for t in (self._reader, *self._presses.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._reader = None
        await self.client.close()
        if (current := asyncio.current_task()) is not None and current.cancelling():
            raise asyncio.CancelledError

    def revoked(self, devices: frozenset[str]) -> None:
        """The devices revoked now (``RelayPki.revoked_devices``): the newly revoked lose
        their entities; one no longer in the set (paired again) may be announced again."""
        for device in sorted(devices - self._revoked):
            for topic, _ in discovery(self.settings, device, Presence(OFFLINE)):
                self._publish(topic, b"")
            for what in RETAINED_STATES:
                self._publish(state_topic(device, what), b"")
            self._announced.pop(device, None)
            self._available.pop(device, None)
            logger.info("%s: revoked: removed from Home Assistant", device)
        self._revoked = devices

    # --- RelayObserver ---

    def presence(self, device: str, presence: Presence) -> None:
        if device in self._revoked:
            return
        announced = self._announced.get(device)
        described = (presence.board, presence.version)
        # Again when the board says more (its will says nothing) or was upgraded.
        if announced is None or described not in ((None, None), announced):
            for topic, payload in discovery(self.settings, device, presence):
                self._publish(topic, payload)
            self._announced[device] = described
        state = ONLINE if presence.reachable else OFFLINE
        if self._available.get(device) != state:
            self._publish(state_topic(device, "availability"), state.encode())
            self._available[device] = state

    def alert(self, device: str, alert: Alert) -> None:
        if device in self._revoked:
            return
        self._publish(state_topic(device, "sound_level"), f"{alert.level:.1f}".encode())
        self._publish(state_topic(device, "alert"), alert_event(alert), retain=False)

    # --- presses ---

    async def _read(self) -> None:
        while True:
            msg = await self.client.recv()
            try:
                self._on_press(msg)
            except Exception:
                logger.exception("Home Assistant: failed to handle %s", msg.topic[:120])

    def _on_press(self, msg: Message) -> None:
        parsed = parse_press(msg.topic)
        if parsed is None or msg.retained or msg.payload != PRESS:
            self.dropped["malformed"] += 1
            logger.warning("Home Assistant: ignored a message on %s", msg.topic[:120])
            return
        device, button = parsed
        target = self.settings.call_targets.get(device)
        if device in self._revoked or (button == "call" and target is None):
            self.dropped["no-such-button"] += 1
            logger.warning("Home Assistant: %s has no %s button", device, button)
            return
        key = (device, button)
        if key in self._presses:
            self.dropped["busy"] += 1
            logger.info("Home Assistant: %s %s pressed again while in flight", device, button)
            return
        command, args = ("call", {"peer": target}) if button == "call" else ("door/open", {})
        task = asyncio.create_task(self._press(device, command, args), name=f"ha-{button}")
        self._presses[key] = task
        task.add_done_callback(lambda _: self._presses.pop(key, None))

    async def _press(self, device: str, command: str, args: dict[str, Any]) -> None:
        assert self._relay is not None
        logger.info("Home Assistant: %s %s %s", device, command, args or "")
        try:
            reply = await self._relay.send_command(device, command, args, PRESS_TIMEOUT_S)
        except (CommandError, PublishFailed, TopicError) as exc:
            logger.warning("Home Assistant: %s %s failed: %s", device, command, exc)
            return
        ok = reply.get("ok", True) is not False
        log = logger.info if ok else logger.warning
        log("Home Assistant: %s %s: %s", device, command, reply.get("message", reply))

    def _publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        assert self._relay is not None  # observers are called once the relay runs
        self._relay.publish(topic, payload, retain=retain)
