"""``edge-intercom-agent run``: two real agents call each other through the real relay.

The relay runs with its embedded mosquitto (``tools.lab.fleet``); the agents are
``edge-intercom-agent run`` processes on loopback, one playing a 700 Hz tone and the other
1100 Hz into WAV sinks.
Calls are placed and ended with ``edge-intercom-relay cmd``; the test then checks that
each side recorded the other's tone. Every wait is bounded and waits for a condition,
never for wall-clock time; the agents' stderr goes into failure messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import wave
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.signaling.mqtt import MqttClient
from agent.signaling.topics import Kind, device_topic
from cloud_relay.commands import reply_topic
from cloud_relay.store import Store
from tools.lab.fleet import WAIT, Fleet, fleet

A, B = "door-a", "door-b"
TONES = {A: 700.0, B: 1100.0}


@contextlib.asynccontextmanager
async def lab(root: Path) -> AsyncIterator[Fleet]:
    async with fleet(root, devices=(A, B), client_id="agent-run-test") as f:
        yield f


async def tone_agent(f: Fleet, device: str, **calls: Any) -> None:
    """An agent that plays its tone and records what it hears into ``root / DEVICE.wav``."""
    await f.agent(
        device, source=f"tone:{TONES[device]:g}", sink=f"wav:{f.root / device}.wav", **calls
    )


def peak_hz(path: Path) -> float:
    with wave.open(str(path), "rb") as wav:
        rate = wav.getframerate()
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(float)
    assert len(samples) > rate, f"{path} holds only {len(samples)} samples"
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


async def test_call_through_relay_by_command(tmp_path: Path) -> None:
    async with lab(tmp_path) as lab_:
        await tone_agent(lab_, A)
        await tone_agent(lab_, B, auto_answer=[A])
        for device in (A, B):
            await lab_.until_status(device, lambda s: s["phase"] == "idle", f"{device} up")
        await lab_.until_online(A, B)

        # Bad commands get an error reply, never a crash.
        code, reply = await lab_.cli(A, "frobnicate")
        assert (code, reply["ok"]) == (1, False)
        assert "unknown command" in reply["message"]
        code, reply = await lab_.cli(A, "call")
        assert (code, reply["ok"]) == (1, False)
        code, reply = await lab_.cli(A, "call", "peer=door-b", "speed=9")
        assert reply["ok"] is False and "speed" in reply["message"]
        assert lab_.client is not None
        fut_reply = await _raw_command(lab_.client, A, b"{not json")
        assert fut_reply["ok"] is False and "malformed" in fut_reply["message"]

        # A call to a device the relay does not know ends at once as unreachable.
        code, reply = await lab_.cli(A, "call", "peer=door-nobody")
        assert (code, reply["ok"]) == (0, True), reply
        lost = reply["call_id"]
        status = await lab_.until_status(
            A,
            lambda s: (s["last_call"] or {}).get("call_id") == lost,
            "the unknown callee's decline",
        )
        assert status["last_call"]["reason"] == "unreachable"

        # The real call: b answers automatically, audio flows both ways.
        code, reply = await lab_.cli(A, "call", "peer=door-b")
        assert (code, reply["ok"]) == (0, True), reply
        call = reply["call_id"]
        for device in (A, B):
            status = await lab_.until_status(
                device,
                lambda s: (
                    s["phase"] == "active" and (s["media"] or {}).get("packets_received", 0) >= 100
                ),
                f"{device} active with 2 s of audio received",
            )
            assert status["call_id"] == call
        assert status["peer"] == A and status["role"] == "callee"

        code, reply = await lab_.cli(A, "hangup")
        assert (code, reply["ok"]) == (0, True), reply
        ended = {
            device: await lab_.until_status(
                device,
                lambda s: (s["last_call"] or {}).get("call_id") == call,
                f"{device} call ended",
            )
            for device in (A, B)
        }
        assert ended[A]["last_call"]["reason"] == "local-hangup"
        assert ended[B]["last_call"]["reason"] == "remote-hangup"
        for status in ended.values():
            assert status["phase"] in ("ended", "idle")
            assert status["last_call"]["media"]["packets_received"] >= 100
        code, reply = await lab_.cli(A, "hangup")
        assert (code, reply["ok"]) == (1, False)  # nothing to hang up any more

        # The relay recorded every operator command and its outcome.
        async def recorded() -> list[tuple[str, str]]:
            store = await Store.open(f"sqlite:///{lab_.db_path}")
            try:
                return [(c.name, c.status) for c in await store.run(store.commands)]
            finally:
                await store.close()

        async with asyncio.timeout(WAIT):
            while ("hangup", "error") not in (commands := await recorded()):
                await asyncio.sleep(0.1)
        assert ("call", "ok") in commands and ("frobnicate", "error") in commands
        assert ("(malformed)", "error") in commands, commands

        for device in (A, B):
            await lab_.stop_agent(device)
        logs = lab_.logs()

    # Each side heard the other's tone.
    for device, other in ((A, B), (B, A)):
        peak = peak_hz(tmp_path / f"{device}.wav")
        assert abs(peak - TONES[other]) < 5.0, f"{device} heard {peak:.1f} Hz\n{logs}"


async def _raw_command(client: MqttClient, device: str, payload: bytes) -> dict[str, Any]:
    """A hand-made (malformed) request with response topic and correlation data."""
    correlation = b"raw-request-0001"
    await client.publish(
        device_topic(device, Kind.CMD),
        payload,
        qos=1,
        response_topic=reply_topic(device),
        correlation_data=correlation,
        message_expiry=10,
    )
    async with asyncio.timeout(WAIT):
        while True:
            msg = await client.recv()
            if msg.correlation_data == correlation:
                reply: dict[str, Any] = json.loads(msg.payload)
                return reply


async def test_listen_in_shows_on_the_listened_boards_led_and_presence(tmp_path: Path) -> None:
    """A listen call (receive-only for the caller) shows on the callee: its status LED
    blinks the being-listened pattern and its retained presence names the listener."""
    led = tmp_path / "led-b"  # stands in for /sys/class/leds/NAME: the same attribute files
    led.mkdir()
    async with lab(tmp_path) as lab_:
        await tone_agent(lab_, A)
        await lab_.agent(
            B,
            source=f"tone:{TONES[B]:g}",
            sink="null",
            settings=f'status_led = "{led}"',
            extra=f'listen_allowed = ["{A}"]',
        )
        watcher = MqttClient(
            lab_.mqtt_config("presence-watch", session_expiry=0),
            subscriptions=[device_topic(B, Kind.PRESENCE)],
        )
        await watcher.start()
        try:
            for device in (A, B):
                await lab_.until_status(device, lambda s: s["phase"] == "idle", f"{device} up")
            await lab_.until_online(A, B)
            code, reply = await lab_.cli(A, "call", f"peer={B}", "mode=listen")
            assert (code, reply["ok"]) == (0, True), reply
            presence = await _presence_until(watcher, lambda p: p.get("call") == "being-listened")
            assert presence["listener"] == A and presence["state"] == "online"
            assert (led / "trigger").read_text() == "timer"
            assert ((led / "delay_on").read_text(), (led / "delay_off").read_text()) == (
                "150",
                "850",
            )
            status = await lab_.until_status(
                A,
                lambda s: (
                    s["phase"] == "active" and bool((s["media"] or {}).get("packets_received"))
                ),
                "the listener hears the board",
            )
            assert status["media"]["packets_sent"] == 0  # receive-only: nothing goes back

            code, reply = await lab_.cli(A, "hangup")
            assert (code, reply["ok"]) == (0, True), reply
            presence = await _presence_until(watcher, lambda p: p.get("call") != "being-listened")
            assert "listener" not in presence
            assert (led / "trigger").read_text() == "none"
            assert (led / "brightness").read_text() == "0"
        finally:
            await watcher.close()


async def _presence_until(
    client: MqttClient, check: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        while True:
            presence: dict[str, Any] = json.loads((await client.recv()).payload)
            if check(presence):
                return presence
