"""``edge-intercom-agent run``: two real agents call each other through the real relay.

The relay runs with its embedded mosquitto; the agents are ``python -m agent.app run``
processes on loopback, one playing a 700 Hz tone and the other 1100 Hz into WAV sinks.
Calls are placed and ended with ``edge-intercom-relay cmd``; the test then checks that
each side recorded the other's tone. Every wait is bounded and waits for a condition,
never for wall-clock time; the agents' stderr goes into failure messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
import wave
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
from mqtt_env import REPO, all_online, store_until

from agent.signaling.mqtt import MqttClient, MqttConfig
from agent.signaling.topics import Kind, device_topic
from cloud_relay.commands import CommandError, reply_topic, send_command
from tools.lab.broker import _free_port

WAIT = 20.0
A, B = "door-a", "door-b"
TONES = {A: 700.0, B: 1100.0}


class Lab:
    """The relay (with its broker), the agents and a command client on one port."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.url = f"mqtt://127.0.0.1:{port}"
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.client: MqttClient | None = None

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{self.log(name)}" for name in ("relay", *self.procs))

    async def spawn(self, name: str, *args: str) -> asyncio.subprocess.Process:
        with (self.root / f"{name}.log").open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, *args, cwd=REPO,
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        self.procs[name] = proc
        return proc

    async def agent(self, device: str, **calls: Any) -> None:
        config = self.root / f"{device}.toml"
        auto = ", ".join(json.dumps(d) for d in calls.get("auto_answer", ()))
        config.write_text(
            f"""
device_id = "{device}"
state_dir = "{self.root / device}"
[ice]
host_addresses = ["127.0.0.1"]
[mqtt]
port = {self.port}
keepalive = 5
backoff_min = 0.05
backoff_max = 0.5
connect_timeout = 5.0
publish_timeout = 5.0
misc_interval = 0.2
[calls]
auto_answer = [{auto}]
invite_timeout_s = 5.0
ended_hold_s = 60.0
"""
        )
        await self.spawn(
            device, "-m", "agent.app", "--config", str(config), "run",
            "--source", f"tone:{TONES[device]:g}", "--sink", f"wav:{self.root / device}.wav",
        )  # fmt: skip

    async def command(self, device: str, name: str, **args: Any) -> dict[str, Any]:
        assert self.client is not None
        return await send_command(self.client, device, name, args, timeout=5.0)

    async def cli(self, device: str, name: str, *args: str) -> tuple[int, dict[str, Any]]:
        """``edge-intercom-relay cmd`` as a process: its exit code and the printed reply."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cloud_relay", "cmd", "--broker-url", self.url,
            device, name, *args, "--timeout", "10",
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(WAIT):
            out, err = await proc.communicate()
        assert out, f"cmd {device} {name}: no reply: {err.decode()}\n{self.logs()}"
        reply: dict[str, Any] = json.loads(out)
        assert proc.returncode is not None
        return proc.returncode, reply

    async def until_status(
        self, device: str, check: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        last: dict[str, Any] = {}
        try:
            async with asyncio.timeout(WAIT):
                while True:
                    with contextlib.suppress(CommandError):
                        last = await self.command(device, "status")
                        if check(last):
                            return last
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(
                f"timed out waiting for {what}; last status {last}\n{self.logs()}"
            ) from None

    async def stop_agent(self, device: str) -> None:
        proc = self.procs[device]
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            code = await proc.wait()
        assert code == 0, f"{device} exited with {code}\n{self.log(device)}"


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@contextlib.asynccontextmanager
async def lab(root: Path) -> AsyncIterator[Lab]:
    port = _free_port("127.0.0.1")
    lab = Lab(root, port)
    config = root / "relay.toml"
    config.write_text(
        f"""
[broker]
port = {port}
[mqtt]
client_id = "relay-agent-run-test"
keepalive = 5
backoff_min = 0.05
backoff_max = 0.3
connect_timeout = 3.0
misc_interval = 0.2
"""
    )
    relay = await lab.spawn(
        "relay", "-m", "cloud_relay", "serve", "--config", str(config),
        "--data-dir", str(root / "relay-data"),
    )  # fmt: skip
    del lab.procs["relay"]
    try:
        async with asyncio.timeout(WAIT):
            while not _tcp_open(port):
                assert relay.returncode is None, lab.log("relay")
                await asyncio.sleep(0.05)
        lab.client = MqttClient(
            MqttConfig(client_id="agent-run-test", port=port, session_expiry=0),
            subscriptions=[reply_topic(A), reply_topic(B)],
        )
        await lab.client.start()
        yield lab
    finally:
        if lab.client is not None:
            await lab.client.close()
        for proc in [*lab.procs.values(), relay]:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def until_online(root: Path, *devices: str) -> None:
    """The relay's store says every device is online (so it routes invites to them)."""
    db = f"sqlite:///{root / 'relay-data' / 'relay.db'}"
    await store_until(db, all_online(*devices), f"relay to see {devices} online", wait=WAIT)


def peak_hz(path: Path) -> float:
    with wave.open(str(path), "rb") as wav:
        rate = wav.getframerate()
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(float)
    assert len(samples) > rate, f"{path} holds only {len(samples)} samples"
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


async def test_call_through_relay_by_command(tmp_path: Path) -> None:
    async with lab(tmp_path) as lab_:
        await lab_.agent(A)
        await lab_.agent(B, auto_answer=[A])
        for device in (A, B):
            await lab_.until_status(device, lambda s: s["phase"] == "idle", f"{device} up")
        await until_online(tmp_path, A, B)

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
