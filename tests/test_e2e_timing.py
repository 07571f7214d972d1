"""The ``audio-flowing`` telemetry record: when each end of a call decoded its first audio.

Two real ``edge-intercom-agent run`` processes through the relay (``tools.lab.fleet``),
each with a paced tone source and a null sink; door-b answers door-a automatically. A
plain MQTT client reads both devices' ``telemetry`` topics. In a normal call both ends
report ``audio-flowing`` once, naming the call and the peer, with an ``at_ms`` between the
``call`` command and the record's arrival (one machine, one wall clock); in a listen call
only the listener hears anything, so only it reports. Telemetry of one device arrives in
the order it was published, so "no record before ``call-ended``" means none was sent.
Every wait is bounded and waits for a record, never for wall-clock time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mqtt_env import next_matching

from agent.calls.runtime import now_ms
from agent.signaling.mqtt import MqttClient
from agent.signaling.topics import Kind, device_topic, parse_topic
from tools.lab.fleet import WAIT, Fleet, fleet

A, B = "door-a", "door-b"
TONES = {A: 700.0, B: 1100.0}

Records = dict[str, list[dict[str, Any]]]
"""Device -> its telemetry records of one call, in arrival order."""


async def collect(client: MqttClient, call_id: str, done: Callable[[Records], bool]) -> Records:
    """Telemetry records of ``call_id`` by device, read until ``done`` accepts them."""
    seen: Records = {A: [], B: []}

    async def recv() -> Records:
        msg = await client.recv()
        device, kind = parse_topic(msg.topic)
        assert kind is Kind.TELEMETRY
        record = json.loads(msg.payload)
        if record.get("call_id") == call_id:
            seen[device].append(record)
        return seen

    return await next_matching(recv, done, f"telemetry of call {call_id}", wait=WAIT)


def events(records: Records, device: str) -> list[str]:
    return [r["event"] for r in records[device]]


def has(event: str, *devices: str) -> Callable[[Records], bool]:
    return lambda records: all(event in events(records, d) for d in devices)


async def start(f: Fleet) -> None:
    for device, auto in ((A, ()), (B, (A,))):
        await f.agent(device, source=f"tone:{TONES[device]:g}", sink="null", auto_answer=auto)
    for device in (A, B):
        await f.until_status(device, lambda s: s["phase"] == "idle", f"{device} up")
    await f.until_online(A, B)


async def test_audio_flowing_reported_by_each_end_that_hears(tmp_path: Path) -> None:
    async with fleet(tmp_path, devices=(A, B), client_id="e2e-timing-test") as f:
        await start(f)
        reply = await f.command(B, "config/set", key="calls.listen_allowed", value=[A])
        assert reply["ok"] and reply["applied"], reply
        client = MqttClient(
            f.mqtt_config("e2e-timing-watch", session_expiry=0),
            subscriptions=[device_topic(d, Kind.TELEMETRY) for d in (A, B)],
        )
        await client.start()
        try:
            # A normal call: both ends hear the other and say when.
            before = now_ms()
            reply = await f.command(A, "call", peer=B)
            assert reply["ok"], reply
            call = reply["call_id"]
            heard = await collect(client, call, has("audio-flowing", A, B))
            after = now_ms()
            for device, peer in ((A, B), (B, A)):
                (record,) = heard[device]
                assert record == {
                    "event": "audio-flowing",
                    "call_id": call,
                    "peer": peer,
                    "at_ms": record["at_ms"],
                }
                assert isinstance(record["at_ms"], int)
                assert before <= record["at_ms"] <= after
            assert (await f.command(A, "hangup"))["ok"]
            ended = await collect(client, call, has("call-ended", A, B))
            assert events(ended, A) == events(ended, B) == ["call-ended"]

            # A listen call: door-a hears door-b; door-b only sends and reports nothing.
            reply = await f.command(A, "call", peer=B, mode="listen")
            assert reply["ok"], reply
            call = reply["call_id"]
            listened = await collect(client, call, has("audio-flowing", A))
            assert listened[A][0]["peer"] == B
            assert (await f.command(A, "hangup"))["ok"]
            more = await collect(client, call, has("call-ended", A, B))
            assert events(listened, A) + events(more, A) == ["audio-flowing", "call-ended"]
            assert events(listened, B) + events(more, B) == ["call-ended"]
        finally:
            await client.close()
        for device in (A, B):
            await f.stop_agent(device)
