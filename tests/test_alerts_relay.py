"""Alert delivery end to end: outbox + uplink on a real MQTT session, a real mosquitto, the
relay in-process, its store on disk; and the store's dedup on SQLite and PostgreSQL.

Every wait is bounded (``mqtt_env``); nothing asserts on wall-clock time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from mqtt_env import FAST_TIMERS, ONLINE, eventually, fast_config, relay_running, until

from agent.edge.alerts import Alert, Severity, decode_alert, encode_ack, new_alert_id
from agent.edge.outbox import Outbox
from agent.edge.uplink import AlertUplink, UplinkConfig
from agent.signaling import topics
from agent.signaling.mqtt import MqttClient, MqttSession, SessionClosed
from agent.signaling.topics import Kind
from cloud_relay.config import (
    BrokerSettings,
    MqttSettings,
    PresenceSettings,
    RelayConfig,
    StoreSettings,
)
from cloud_relay.store import Store, utc_from_ms
from tools.lab.broker import Mosquitto

T0 = 1_760_000_000_000
DEVICE = "door-1"
FAST_UPLINK = UplinkConfig(ack_timeout=0.3, poll_interval=0.05, retry_delay=0.1)


def alert(n: int = 0, severity: Severity = Severity.CRITICAL) -> Alert:
    at = T0 + n * 1000
    return Alert(new_alert_id(), "alarm", "smoke", severity, at, at + 4000, 0.99, -9.0, at + 4100)


def relay_config(broker: Mosquitto, data_dir: Path) -> RelayConfig:
    data_dir.mkdir(parents=True, exist_ok=True)
    return RelayConfig(
        data_dir=str(data_dir),
        store=StoreSettings(url=f"sqlite:///{data_dir / 'relay.db'}"),
        presence=PresenceSettings(offline_grace_s=0.5),
        broker=BrokerSettings(url=f"mqtt://{broker.host}:{broker.port}"),
        mqtt=MqttSettings(client_id="relay-test", **FAST_TIMERS),
    )


@dataclass
class Board:
    """A device's session, outbox and uplink, with the runtime's part (acks to the uplink)
    played by ``pump``; ``drop_acks`` loses them on the way."""

    session: MqttSession
    outbox: Outbox
    uplink: AlertUplink
    drop_acks: bool = False
    lost_acks: int = 0
    pump: asyncio.Task[None] | None = field(default=None, repr=False)

    async def read(self) -> None:
        while True:
            try:
                msg = await self.session.recv()
            except SessionClosed:
                return
            if msg.kind is not Kind.ALERT_ACK:
                continue
            if self.drop_acks:
                self.lost_acks += 1
            else:
                self.uplink.on_ack(msg.payload)


@contextlib.asynccontextmanager
async def board(broker: Mosquitto, state: Path) -> AsyncIterator[Board]:
    outbox = await Outbox.open(state / "outbox.sqlite3")
    session = MqttSession(fast_config(DEVICE, broker.port, broker.host), ONLINE)
    uplink = AlertUplink(session, outbox, FAST_UPLINK)
    b = Board(session, outbox, uplink)
    try:
        await session.start()
        uplink.start()
        b.pump = asyncio.create_task(b.read(), name="ack-pump")
        yield b
    finally:
        await uplink.close()
        await session.close()
        if b.pump is not None:
            await b.pump
        await outbox.close()
        await outbox.close()


async def outbox_empty(b: Board, what: str) -> None:
    async def check() -> bool:
        return await b.outbox.count() == 0

    await eventually(check, what)


async def test_alerts_arrive_once_through_lost_acks_and_broker_and_relay_restarts(
    broker: Mosquitto, tmp_path: Path
) -> None:
    config = relay_config(broker, tmp_path / "relay")
    sent: list[Alert] = []
    stored = 0
    async with board(broker, tmp_path / "board") as b:
        async with relay_running(config) as relay:
            # Plain delivery.
            for n in range(5):
                sent.append(alert(n))
                await b.uplink.submit(sent[-1])
            await outbox_empty(b, "the first alerts acked")

            # Acks lost: the board sends again, the relay stores nothing twice and acks
            # again; the outbox keeps the alerts until an ack gets through.
            b.drop_acks = True
            for n in range(5, 8):
                sent.append(alert(n))
                await b.uplink.submit(sent[-1])
            await until(lambda: relay.stats.alerts_duplicate >= 3, "duplicates at the relay")
            assert await b.outbox.count() == 3
            assert b.uplink.stats.resent >= 3
            b.drop_acks = False
            await outbox_empty(b, "the alerts acked once acks got through")

            # The broker dies (SIGKILL: it forgets everything) while alerts are raised.
            await asyncio.to_thread(broker.stop, kill=True)
            for n in range(8, 13):
                sent.append(alert(n))
                await b.uplink.submit(sent[-1])
            assert await b.outbox.count() == 5
            await asyncio.to_thread(broker.start)
            await outbox_empty(b, "the alerts acked after the broker restart")
        stored += relay.stats.alerts_stored

        # The relay is down: the broker takes the alerts, nobody acks, they stay.
        resent = b.uplink.stats.resent
        for n in range(13, 18):
            sent.append(alert(n))
            await b.uplink.submit(sent[-1])
        await until(lambda: b.uplink.stats.resent >= resent + 5, "resends while the relay is down")
        assert await b.outbox.count() == 5
        async with relay_running(config) as relay:
            await outbox_empty(b, "the alerts acked by the restarted relay")
        stored += relay.stats.alerts_stored
        assert b.lost_acks >= 3
        assert b.uplink.stats.bad_acks == {}

    store = await Store.open(config.store_url())
    try:
        records = await store.run(lambda: store.alerts(limit=1000))
    finally:
        await store.close()
    assert sorted(r.id for r in records) == sorted(a.id for a in sent)
    assert stored == len(sent)  # every new one stored once, every other copy a duplicate
    by_id = {a.id: a for a in sent}
    for r in records:
        assert r.device == DEVICE
        assert decode_alert(by_id[r.id].to_json()) == by_id[r.id]
        assert r.body == by_id[r.id].to_dict()
        assert (r.start, r.severity) == (utc_from_ms(by_id[r.id].start), "critical")


async def test_malformed_alerts_and_acks_are_counted_not_fatal(
    broker: Mosquitto, tmp_path: Path
) -> None:
    config = relay_config(broker, tmp_path / "relay")
    operator = MqttClient(fast_config("lab-operator", broker.port, broker.host))
    async with relay_running(config) as relay, board(broker, tmp_path / "board") as b:
        await operator.start()
        try:
            alert_topic = topics.device_topic(DEVICE, Kind.ALERT)
            ack_topic = topics.device_topic(DEVICE, Kind.ALERT_ACK)
            for payload in (b"not json", b'{"v": 1}', b"[]"):
                await operator.publish(alert_topic, payload)
            for payload in (b"{}", b'{"ids": ["xyz"]}', encode_ack([new_alert_id()])):
                await operator.publish(ack_topic, payload)
            await until(lambda: sum(relay.stats.dropped.values()) >= 3, "drops at the relay")
            assert relay.stats.dropped["alert-json"] == 2
            assert relay.stats.dropped["alert-fields"] == 1
            await until(lambda: sum(b.uplink.stats.bad_acks.values()) >= 2, "bad acks counted")
            assert b.uplink.stats.bad_acks == {"fields": 1, "ids": 1}
            # Both ends still work.
            await b.uplink.submit(good := alert())
            await outbox_empty(b, "a good alert acked")
            assert relay.stats.alerts_stored == 1
            records = await relay.store.run(lambda: relay.store.alerts(device=DEVICE))
            assert [r.id for r in records] == [good.id]
        finally:
            await operator.close()


async def test_store_records_each_alert_id_once(store_url: str) -> None:
    """Resends and concurrent relay workers (two stores on one database) store one row."""
    first, second = await Store.open(store_url), await Store.open(store_url)
    try:
        a, b = alert(0), alert(1, Severity.INFO)
        at = utc_from_ms(T0 + 10_000)
        assert await first.write(first.record_alert, "door-1", a, at) is True
        assert await first.write(first.record_alert, "door-1", a, at) is False
        results = await asyncio.gather(
            first.write(first.record_alert, "door-2", b, at + timedelta(seconds=1)),
            second.write(second.record_alert, "door-2", b, at + timedelta(seconds=1)),
        )
        assert sorted(results) == [False, True]
        # A batch with a duplicate in it commits the rest.
        c = alert(2)
        batch = await asyncio.gather(
            first.write(first.record_alert, "door-1", a, at),
            first.write(first.record_alert, "door-1", c, at + timedelta(seconds=2)),
        )
        assert list(batch) == [False, True]

        newest = await first.run(first.alerts)
        assert [r.id for r in newest] == [c.id, b.id, a.id]
        only = await first.run(lambda: first.alerts(device="door-2"))
        assert [(r.id, r.severity, r.device) for r in only] == [(b.id, "info", "door-2")]
        recent = await first.run(lambda: first.alerts(since=at + timedelta(seconds=1), limit=1))
        assert [r.id for r in recent] == [c.id]
        assert newest[-1].body == a.to_dict()
        assert newest[-1].received == at
    finally:
        await first.close()
        await second.close()
