"""The agent's MQTT v5 session against a real mosquitto (tools/lab/broker.py).

Every timer is shrunk through ``MqttConfig``; every wait is bounded by
``asyncio.timeout``; nothing asserts on wall-clock time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

import pytest
from mqtt_env import WAIT, fast_config, next_matching, spawn_client, until

from agent.signaling import topics
from agent.signaling.mqtt import (
    ConnectFailed,
    Incoming,
    Message,
    MqttClient,
    MqttConfig,
    MqttSession,
    PublishFailed,
    SessionClosed,
    backoff_delay,
)
from agent.signaling.topics import Kind
from tools.lab.broker import Mosquitto, _free_port

T = TypeVar("T")
DEVICE = "door-1"
ONLINE = {"state": "online", "version": "test", "board": "lab", "capabilities": ["audio"]}


def config(broker: Mosquitto, client_id: str = DEVICE, **changes: object) -> MqttConfig:
    return fast_config(client_id, broker.port, broker.host, **changes)


@contextlib.asynccontextmanager
async def running(client: MqttClient | MqttSession) -> AsyncIterator[None]:
    await client.start()
    try:
        yield
    finally:
        await client.close()


def observer(broker: Mosquitto, *filters: str, name: str = "observer") -> MqttClient:
    """Another client (relay-like) watching the broker."""
    return MqttClient(config(broker, name), subscriptions=filters or ("intercom/v1/#",))


async def next_message(client: MqttClient, match: Callable[[Message], bool], what: str) -> Message:
    return await next_matching(client.recv, match, what)


async def bounded(aw: Awaitable[T]) -> T:
    async with asyncio.timeout(WAIT):
        return await aw


def presence_is(state: str, device: str = DEVICE) -> Callable[[Message], bool]:
    topic = topics.device_topic(device, Kind.PRESENCE)

    def match(msg: Message) -> bool:
        return msg.topic == topic and json.loads(msg.payload).get("state") == state

    return match


def other_tasks(before: set[asyncio.Task[object]]) -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t not in before and not t.done()}


# --- pure parts ------------------------------------------------------------------------------


def test_backoff_grows_caps_and_jitters() -> None:
    cfg = MqttConfig(client_id=DEVICE, backoff_min=1.0, backoff_max=8.0, backoff_jitter=0.5)
    rng = random.Random(7)
    for attempt, base in enumerate([1.0, 2.0, 4.0, 8.0, 8.0, 8.0]):
        for _ in range(50):
            delay = backoff_delay(attempt, cfg, rng)
            assert base * 0.5 <= delay <= base
    no_jitter = replace(cfg, backoff_jitter=0.0)
    assert backoff_delay(1000, no_jitter) == 8.0


def test_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="backoff"):
        MqttConfig(client_id=DEVICE, backoff_min=2.0, backoff_max=1.0)
    with pytest.raises(ValueError, match="keepalive"):
        MqttConfig(client_id=DEVICE, keepalive=0)
    with pytest.raises(ValueError, match="client_id"):
        MqttConfig(client_id="")


# --- against mosquitto -----------------------------------------------------------------------


async def test_connect_presence_publish_and_commands(broker: Mosquitto) -> None:
    session = MqttSession(config(broker), ONLINE)
    watcher = observer(broker)
    async with running(session):
        assert session.connected
        async with running(watcher):
            # Subscribed after the device: the online presence reaches it as retained.
            msg = await next_message(watcher, presence_is("online"), "retained presence")
            assert msg.retained
            assert json.loads(msg.payload) == ONLINE

            await bounded(session.publish(Kind.OUT, b'{"hello":1}'))
            out = await next_message(
                watcher, lambda m: m.topic.endswith("/out"), "the device's out message"
            )
            assert out.payload == b'{"hello":1}'

            # A command with MQTT v5 response topic + correlation data, and the reply.
            reply_topic = topics.device_topic(DEVICE, Kind.REPLY)
            await bounded(
                watcher.publish(
                    topics.device_topic(DEVICE, Kind.CMD),
                    b'{"name":"status"}',
                    response_topic=reply_topic,
                    correlation_data=b"\x01\x02corr",
                )
            )
            cmd = await bounded(session.recv())
            assert cmd == Incoming(
                Kind.CMD, b'{"name":"status"}', reply_topic, b"\x01\x02corr", False
            )
            await bounded(
                session.publish(Kind.REPLY, b'{"ok":true}', correlation_data=cmd.correlation_data)
            )
            reply = await next_message(watcher, lambda m: m.topic == reply_topic, "reply")
            assert reply.correlation_data == b"\x01\x02corr"

            await bounded(session.set_presence({**ONLINE, "state": "busy"}))
            await next_message(watcher, presence_is("busy"), "updated presence")

            with pytest.raises(ValueError, match="does not publish"):
                await session.publish(Kind.IN, b"x")
            # QoS 0 telemetry: handed to the socket, counted.
            await session.publish(Kind.TELEMETRY, b"{}")
    stats = session.stats
    assert stats.connects == 1
    assert stats.disconnects == 1  # the close
    assert stats.received == 1
    assert stats.publish_failed == 0
    assert stats.published >= 4  # presence, out, reply, presence update, telemetry, offline


async def test_config_is_retained_for_the_device(broker: Mosquitto) -> None:
    relay = observer(broker, "intercom/v1/dev/+/presence", name="relay")
    async with running(relay):
        await bounded(
            relay.publish(topics.device_topic(DEVICE, Kind.CONFIG), b'{"v":1}', retain=True)
        )
        session = MqttSession(config(broker), ONLINE)
        async with running(session):
            got = await bounded(session.recv())
            assert (got.kind, got.payload, got.retained) == (Kind.CONFIG, b'{"v":1}', True)


SESSION_SCRIPT = """
import asyncio, sys
from agent.signaling.mqtt import MqttConfig, MqttSession

async def main() -> None:
    cfg = MqttConfig(client_id=sys.argv[1], host=sys.argv[2], port=int(sys.argv[3]),
                     keepalive=2, connect_timeout=5.0)
    session = MqttSession(cfg, {"state": "online"})
    await session.start()
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_lwt_offline_when_agent_is_killed(broker: Mosquitto) -> None:
    watcher = observer(broker, topics.all_devices(Kind.PRESENCE))
    async with running(watcher):
        proc = await spawn_client(SESSION_SCRIPT, "door-killed", broker)
        try:
            assert proc.stdout is not None
            line = await bounded(proc.stdout.readline())
            assert line.strip() == b"ready", line
            await next_message(watcher, presence_is("online", "door-killed"), "online")
            proc.send_signal(signal.SIGKILL)
            await bounded(proc.wait())
            msg = await next_message(watcher, presence_is("offline", "door-killed"), "LWT")
            assert json.loads(msg.payload) == {"state": "offline"}
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    # The will is retained: a late subscriber still sees the device offline.
    late = observer(broker, topics.all_devices(Kind.PRESENCE), name="late")
    async with running(late):
        msg = await next_message(late, presence_is("offline", "door-killed"), "retained LWT")
        assert msg.retained


async def test_qos1_sent_while_away_arrives_after_reconnect(broker: Mosquitto) -> None:
    first = MqttSession(config(broker), ONLINE)
    async with running(first):
        pass  # connected and subscribed once; closed cleanly, the broker keeps the session
    relay = observer(broker, topics.all_devices(Kind.PRESENCE), name="relay")
    async with running(relay):
        for i in range(3):
            await bounded(
                relay.publish(
                    topics.device_topic(DEVICE, Kind.IN),
                    f'{{"n":{i}}}'.encode(),
                    correlation_data=bytes([i]),
                )
            )
    second = MqttSession(config(broker), ONLINE)
    async with running(second):
        got = [await bounded(second.recv()) for _ in range(3)]
    assert [(m.kind, m.payload, m.correlation_data) for m in got] == [
        (Kind.IN, f'{{"n":{i}}}'.encode(), bytes([i])) for i in range(3)
    ]


async def test_broker_restart_reconnects_and_restores_presence(broker: Mosquitto) -> None:
    session = MqttSession(config(broker), ONLINE)
    watcher = observer(broker, topics.all_devices(Kind.PRESENCE))
    async with running(session), running(watcher):
        await next_message(watcher, presence_is("online"), "first presence")
        for round_ in (1, 2):
            # SIGKILL: no persistence saved, so the retained presence is gone with it.
            await asyncio.to_thread(broker.restart, kill=True)
            await until(lambda r=round_: session.stats.connects == r + 1, "reconnect")  # type: ignore[misc]
            assert session.connected
            await next_message(watcher, presence_is("online"), "presence after restart")
        # Still working both ways after the restarts.
        await bounded(session.publish(Kind.OUT, b"after"))
        await bounded(watcher.publish(topics.device_topic(DEVICE, Kind.IN), b"to-device"))
        got = await bounded(session.recv())
        assert (got.kind, got.payload) == (Kind.IN, b"to-device")
    stats = session.stats
    assert stats.connects == 3
    assert stats.disconnects == 3  # two restarts and the close


async def test_silent_broker_is_detected_by_keepalive(broker: Mosquitto) -> None:
    session = MqttSession(config(broker, keepalive=1, publish_timeout=WAIT), ONLINE)
    watcher = observer(broker, topics.all_devices(Kind.PRESENCE))
    async with running(session):
        broker.pause()
        try:
            # Sent on the dead connection, never acknowledged there: resent on the next one.
            in_flight = asyncio.create_task(session.publish(Kind.ALERT, b"in flight"))
            await until(lambda: not session.connected, "keep-alive timeout")
            assert session.stats.disconnects == 1
            assert not in_flight.done()
        finally:
            broker.resume()
        await until(lambda: session.stats.connects == 2, "reconnect after resume")
        await bounded(in_flight)
        async with running(watcher):
            # Whatever the broker did with the old connection (its will), online wins.
            msg = await next_message(watcher, presence_is("online"), "presence")
            assert msg.retained


async def test_publish_while_broker_down_is_delivered_after_reconnect(broker: Mosquitto) -> None:
    session = MqttSession(config(broker), ONLINE)
    relay = observer(broker, topics.all_devices(Kind.OUT), name="relay")
    async with running(session), running(relay):
        # Graceful stop: mosquitto saves the relay's persistent session and subscription.
        await asyncio.to_thread(broker.stop)
        await until(lambda: not session.connected, "the session noticing the broker is gone")
        sends = [
            asyncio.create_task(session.publish(Kind.OUT, f"queued-{i}".encode())) for i in range(3)
        ]
        await asyncio.sleep(0.1)
        assert not any(t.done() for t in sends)
        await asyncio.to_thread(broker.start)
        await bounded(asyncio.gather(*sends))
        seen: list[bytes] = []
        while len(seen) < 3:
            msg = await next_message(relay, lambda m: m.topic.endswith("/out"), "queued out")
            seen.append(msg.payload)
        assert seen == [b"queued-0", b"queued-1", b"queued-2"]
    assert session.stats.publish_failed == 0


async def test_publish_while_broker_down_fails_after_timeout(broker: Mosquitto) -> None:
    session = MqttSession(config(broker, publish_timeout=0.3, max_queued=2), ONLINE)
    async with running(session):
        await asyncio.to_thread(broker.stop, kill=True)
        await until(lambda: not session.connected, "the session noticing the broker is gone")
        first = asyncio.create_task(session.publish(Kind.OUT, b"a"))
        second = asyncio.create_task(session.publish(Kind.ALERT, b"b"))
        await asyncio.sleep(0)
        with pytest.raises(PublishFailed) as full:
            await session.publish(Kind.OUT, b"c")
        assert full.value.reason == "queue-full"
        with pytest.raises(PublishFailed) as qos0:
            await session.publish(Kind.TELEMETRY, b"{}")
        assert qos0.value.reason == "not-connected"
        for task in (first, second):
            with pytest.raises(PublishFailed) as timed_out:
                await bounded(task)
            assert timed_out.value.reason == "timeout"
            assert "not connected" in str(timed_out.value)
        assert session.stats.publish_failed == 4
        # The failed messages are never sent later: the broker comes back, nothing arrives.
        await asyncio.to_thread(broker.start)
        await until(lambda: session.stats.connects == 2, "reconnect")
        relay = observer(broker, topics.all_devices(Kind.OUT), name="relay")
        async with running(relay):
            await bounded(session.publish(Kind.OUT, b"fresh"))
            msg = await next_message(relay, lambda m: m.topic.endswith("/out"), "fresh")
            assert msg.payload == b"fresh"


async def test_malformed_oversized_and_overflowing_input(broker: Mosquitto) -> None:
    session = MqttSession(config(broker, max_packet_bytes=4096, max_incoming=3), ONLINE)
    relay = observer(broker, name="relay")
    in_topic = topics.device_topic(DEVICE, Kind.IN)
    async with running(session), running(relay):
        for payload in (b"\xff\x00not json", b"", b"x" * 10_000, b"after"):
            await bounded(relay.publish(in_topic, payload))
        # Delivered as bytes, in order; the oversized one is dropped by the broker.
        got = [(await bounded(session.recv())).payload for _ in range(3)]
        assert got == [b"\xff\x00not json", b"", b"after"]

        for i in range(5):
            await bounded(relay.publish(in_topic, b"%d" % i))
        await until(lambda: session.stats.received + session.stats.dropped >= 8, "flood")
        assert session.stats.dropped == 2
        got = [(await bounded(session.recv())).payload for _ in range(3)]
        assert got == [b"0", b"1", b"2"]
        # Still healthy afterwards.
        await bounded(relay.publish(in_topic, b"ok"))
        assert (await bounded(session.recv())).payload == b"ok"
        assert session.connected and session.stats.connects == 1


async def test_close_is_clean(broker: Mosquitto) -> None:
    before = set(asyncio.all_tasks())
    watcher = observer(broker, topics.all_devices(Kind.PRESENCE))
    async with running(watcher):
        session = MqttSession(config(broker), ONLINE)
        await session.start()
        await next_message(watcher, presence_is("online"), "online")
        await session.close()
        msg = await next_message(watcher, presence_is("offline"), "offline on close")
        assert json.loads(msg.payload) == {"state": "offline"}
        await session.close()  # idempotent
        with pytest.raises(SessionClosed):
            await bounded(session.recv())
        with pytest.raises(PublishFailed) as closed:
            await session.publish(Kind.OUT, b"late")
        assert closed.value.reason == "closed"
        with pytest.raises(SessionClosed):
            await session.wait_connected()
        assert not session.connected
    assert other_tasks(before) == set()


async def test_close_fails_waiting_publishes(broker: Mosquitto) -> None:
    before = set(asyncio.all_tasks())
    session = MqttSession(config(broker), ONLINE)
    await session.start()
    await asyncio.to_thread(broker.stop, kill=True)
    await until(lambda: not session.connected, "disconnect")
    waiting = asyncio.create_task(session.publish(Kind.OUT, b"never"))
    await asyncio.sleep(0)
    await bounded(session.close())
    with pytest.raises(PublishFailed) as failed:
        await bounded(waiting)
    assert failed.value.reason == "closed"
    assert other_tasks(before) == set()


async def test_start_without_broker_fails_with_reason() -> None:
    before = set(asyncio.all_tasks())
    cfg = MqttConfig(
        client_id=DEVICE,
        port=_free_port("127.0.0.1"),
        connect_timeout=0.5,
        backoff_min=0.05,
        backoff_max=0.1,
    )
    session = MqttSession(cfg, ONLINE)
    with pytest.raises(ConnectFailed, match="connection refused"):
        await bounded(session.start())
    assert not session.connected
    assert other_tasks(before) == set()
