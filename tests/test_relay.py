"""The relay in-process against a real mosquitto; devices are real MQTT sessions.

Every wait is bounded by ``asyncio.timeout``; nothing asserts on wall-clock time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from mqtt_env import (
    FAST_TIMERS,
    ONLINE,
    SDP,
    WAIT,
    eventually,
    fast_config,
    next_matching,
    now_ms,
    relay_running,
    spawn_client,
    until,
)

from agent.signaling.envelope import (
    AcceptBody,
    CandidateBody,
    DeclineBody,
    Envelope,
    HangupBody,
    InviteBody,
    RingingBody,
    from_json,
    make,
    new_id,
    to_json,
)
from agent.signaling.mqtt import MqttClient, MqttConfig, MqttSession
from agent.signaling.topics import RELAY_ID, Kind
from cloud_relay import sync
from cloud_relay.commands import CommandTimeout, reply_topic, send_command
from cloud_relay.config import (
    BrokerSettings,
    ConfigError,
    GroupSettings,
    MqttSettings,
    PolicySettings,
    PresenceSettings,
    RelayConfig,
    RuleSettings,
    StoreSettings,
    load_config,
)
from cloud_relay.presence import PresenceTable
from cloud_relay.routing import Action, CallAnswered, CallEnded, CallStarted, Router
from tools.lab.broker import Mosquitto

DEVICE_SCRIPT = """
import asyncio, sys
from agent.signaling.mqtt import MqttConfig, MqttSession

async def main():
    cfg = MqttConfig(client_id=sys.argv[1], host=sys.argv[2], port=int(sys.argv[3]), keepalive=5)
    session = MqttSession(cfg, {"state": "online", "board": "lab", "version": "test"})
    await session.start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def next_in(session: MqttSession, what: str) -> Envelope:
    """The next signaling envelope on the device's ``in``."""
    msg = await next_matching(session.recv, lambda m: m.kind is Kind.IN, what)
    return from_json(msg.payload)


def device_config(broker: Mosquitto, device: str) -> MqttConfig:
    return fast_config(device, broker.port, broker.host)


def relay_config(
    broker: Mosquitto, data_dir: Path, store_url: str | None = None, **changes: object
) -> RelayConfig:
    base = RelayConfig(
        data_dir=str(data_dir),
        store=StoreSettings(url=store_url),
        presence=PresenceSettings(offline_grace_s=0.5),
        broker=BrokerSettings(url=f"mqtt://{broker.host}:{broker.port}"),
        mqtt=MqttSettings(client_id="relay-test", **FAST_TIMERS),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def devices(broker: Mosquitto, *ids: str) -> AsyncIterator[list[MqttSession]]:
    sessions = [MqttSession(device_config(broker, d), ONLINE) for d in ids]
    try:
        for s in sessions:
            await s.start()
        yield sessions
    finally:
        for s in sessions:
            await s.close()


def invite(caller: str, callee: str, *, claimed: str | None = None) -> Envelope:
    return make(InviteBody(sdp=SDP), call=new_id(), from_=claimed or caller, to=callee, ts=now_ms())


async def send_out(session: MqttSession, env: Envelope | bytes) -> None:
    payload = env if isinstance(env, bytes) else to_json(env).encode()
    await session.publish(Kind.OUT, payload)


# --- pure parts --------------------------------------------------------------------------------


def test_router_checks_call_membership_and_sides() -> None:
    table = PresenceTable({"a": "online", "b": "online", "c": "online"})
    router = Router(table)
    inv = invite("a", "b")
    assert router.route("a", to_json(inv).encode(), now_ms()).action is Action.FORWARD
    # A third device cannot inject into the call; the caller cannot accept its own call.
    cand = make(CandidateBody(candidate=None), call=inv.call, from_="c", to="b", ts=now_ms())
    assert router.route("c", to_json(cand).encode(), now_ms()).reason == "not-in-call"
    acc = make(AcceptBody(sdp=SDP), call=inv.call, from_="a", to="b", ts=now_ms())
    assert router.route("a", to_json(acc).encode(), now_ms()).reason == "wrong-side"
    # Replays are dropped.
    assert router.route("a", to_json(inv).encode(), now_ms()).reason == "duplicate"
    stray = make(RingingBody(), call=new_id(), from_="b", to="a", ts=now_ms())
    assert router.route("b", to_json(stray).encode(), now_ms()).reason == "unknown-call"
    to_self = invite("a", "a")
    assert router.route("a", to_json(to_self).encode(), now_ms()).reason == "bad-recipient"
    # Both sides hang up at once: the second one is for a call that just ended.
    for side, other in (("a", "b"), ("b", "a")):
        bye = make(HangupBody(reason="hangup"), call=inv.call, from_=side, to=other, ts=now_ms())
        route = router.route(side, to_json(bye).encode(), now_ms())
        assert (route.action, route.reason) == (
            (Action.FORWARD, "") if side == "a" else (Action.DROP, "finished-call")
        )
    again = make(InviteBody(sdp=SDP), call=inv.call, from_="a", to="b", ts=now_ms())
    assert router.route("a", to_json(again).encode(), now_ms()).reason == "duplicate-call"


def test_policy_groups_and_config_file(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        """
data_dir = "/srv/relay"
[broker]
port = 1884
[[policy.groups]]
name = "doors"
members = ["door-1", "door-2"]
[[policy.groups]]
name = "desk"
members = ["desk-1"]
[[policy.rules]]
caller = "desk"
callee = "*"
[[policy.rules]]
caller = "doors"
callee = "desk"
"""
    )
    config = load_config(path, broker_url="mqtt://broker.example:1999")
    assert config.broker.endpoint() == ("broker.example", 1999)
    assert config.store_url() == "sqlite:////srv/relay/relay.db"
    policy = config.policy
    assert policy.allows("desk-1", "door-1")
    assert policy.allows("door-1", "desk-1")
    assert not policy.allows("door-1", "door-2")
    assert not policy.allows("stranger", "desk-1")
    assert PolicySettings().allows("anyone", "else")
    path.write_text("[broker]\nprot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load_config(path)
    with pytest.raises(ConfigError, match="broker-url"):
        load_config(None, broker_url="http://x")


# --- with a real broker ------------------------------------------------------------------------


async def test_presence_online_and_lwt_offline_are_stored(
    broker: Mosquitto, tmp_path: Path, store_url: str
) -> None:
    """A will followed by the device's return within the grace is a reconnect, not an
    outage; a will that stands is recorded with the time it came."""
    grace = PresenceSettings(offline_grace_s=3.0)
    config = relay_config(broker, tmp_path, store_url, presence=grace)
    async with relay_running(config) as relay:
        for round_ in ("reconnects", "stays away"):
            proc = await spawn_client(DEVICE_SCRIPT, "door-killed", broker)
            try:
                assert proc.stdout is not None
                async with asyncio.timeout(WAIT):
                    assert (await proc.stdout.readline()).strip() == b"ready"
                await until(lambda: relay.stats.presence_updates > 0, "online")
                assert relay.presence.state("door-killed") == "online"
                proc.kill()  # no DISCONNECT: the broker publishes the will
                async with asyncio.timeout(WAIT):
                    await proc.wait()
                killed_ms = now_ms()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            if round_ == "reconnects":
                continue  # the next round's client is the device coming back
            await until(lambda: relay.presence.state("door-killed") == "offline", "LWT")
        assert relay.stats.offline_absorbed == 1
        store = relay.store

        async def stored_offline() -> bool:
            rows = await store.run(store.devices)
            return any(d.id == "door-killed" and d.presence == "offline" for d in rows)

        await eventually(stored_offline, "the stored offline presence")
        (device,) = await store.run(store.devices)
        assert (device.board, device.version) == ("lab", "test")
        history = await store.run(store.presence_history, "door-killed")
        assert [e.state for e in history] == ["online", "offline"]
        # When the will came, not when the grace ran out.
        assert history[1].at.timestamp() * 1000 < killed_ms + 1000 * grace.offline_grace_s


async def test_call_is_routed_with_authoritative_sender_and_recorded(
    broker: Mosquitto, tmp_path: Path, store_url: str
) -> None:
    async with (
        relay_running(relay_config(broker, tmp_path, store_url)) as relay,
        devices(broker, "door-a", "door-b") as (a, b),
    ):
        await until(
            lambda: relay.presence.reachable("door-a") and relay.presence.reachable("door-b"),
            "both online",
        )
        # door-a lies about who it is: the relay overwrites it from the topic.
        inv = invite("door-a", "door-b", claimed="door-c")
        await send_out(a, inv)
        got = await next_in(b, "invite at callee")
        assert (got.type, got.from_, got.to, got.call) == ("invite", "door-a", "door-b", inv.call)
        assert got.body == inv.body
        assert relay.stats.forged == 1

        acc = make(AcceptBody(sdp=SDP), call=inv.call, from_="door-b", to="door-a", ts=now_ms())
        await send_out(b, acc)
        got = await next_in(a, "accept at caller")
        assert (got.type, got.from_) == ("accept", "door-b")

        bye = make(
            HangupBody(reason="hangup"), call=inv.call, from_="door-a", to="door-b", ts=now_ms()
        )
        await send_out(a, bye)
        got = await next_in(b, "hangup at callee")
        assert got.type == "hangup"

        store = relay.store

        async def call_ended() -> bool:
            return any(c.ended is not None for c in await store.run(store.calls))

        await eventually(call_ended, "the call to end in the store")
        (call,) = await store.run(store.calls)
        assert (call.id, call.caller, call.callee, call.mode) == (
            inv.call,
            "door-a",
            "door-b",
            "normal",
        )
        assert call.answered is not None and call.ended is not None
        assert call.end_reason == "hangup"
        assert call.started <= call.answered <= call.ended
        assert relay.router.open_calls() == 0


async def test_invite_to_unknown_offline_or_refused_device_is_declined_at_once(
    broker: Mosquitto, tmp_path: Path
) -> None:
    policy = PolicySettings(
        groups=(
            GroupSettings("lobby", ("door-a", "door-gone", "ghost")),
            GroupSettings("vault", ("door-v",)),
        ),
        rules=(RuleSettings("lobby", "lobby"),),
    )
    config = relay_config(broker, tmp_path, policy=policy)
    async with relay_running(config) as relay, devices(broker, "door-a") as (a,):
        async with devices(broker, "door-gone"):
            await until(lambda: relay.presence.reachable("door-gone"), "door-gone online")
        await until(lambda: relay.presence.state("door-gone") == "offline", "door-gone offline")
        await until(lambda: relay.presence.reachable("door-a"), "door-a online")

        for callee, detail in (("ghost", "unknown"), ("door-gone", "offline")):
            inv = invite("door-a", callee)
            await send_out(a, inv)
            got = await next_in(a, f"decline for {callee}")
            assert (got.type, got.from_, got.to, got.call) == (
                "decline",
                RELAY_ID,
                "door-a",
                inv.call,
            )
            assert got.body == DeclineBody(reason="unreachable", detail=detail)

        async with devices(broker, "door-v"):
            await until(lambda: relay.presence.reachable("door-v"), "door-v online")
            inv = invite("door-a", "door-v")
            await send_out(a, inv)
            got = await next_in(a, "policy decline")
            assert got.type == "decline" and got.from_ == RELAY_ID
            assert got.body == DeclineBody(reason="policy-refused", detail="relay")
        assert relay.stats.rejected == 3
        assert relay.stats.forwarded == 0


async def test_malformed_envelopes_are_counted_and_dropped(
    broker: Mosquitto, tmp_path: Path
) -> None:
    async with (
        relay_running(relay_config(broker, tmp_path)) as relay,
        devices(broker, "door-a", "door-b") as (a, b),
    ):
        await until(lambda: relay.presence.reachable("door-b"), "door-b online")
        good = json.loads(to_json(invite("door-a", "door-b")))
        bad_payloads = [
            b"\xff\xfe not utf-8",
            b"not json",
            b"[1, 2]",
            json.dumps({**good, "type": "teleport"}).encode(),
            json.dumps({**good, "to": "NOT/A/DEVICE"}).encode(),
            json.dumps({**good, "body": {"sdp": "hello", "mode": "normal"}}).encode(),
            json.dumps({**good, "ts": 5}).encode(),
            b"{" * 100_000,
        ]
        for payload in bad_payloads:
            await send_out(a, payload)
        await a.publish(Kind.PRESENCE, b"{not presence", retain=False)
        # Still routing afterwards.
        inv = invite("door-a", "door-b")
        await send_out(a, inv)
        got = await next_in(b, "invite after garbage")
        assert got.call == inv.call
        stats = relay.stats
        assert stats.received == len(bad_payloads) + 1
        malformed = sum(n for r, n in stats.dropped.items() if r.startswith("malformed"))
        assert malformed == len(bad_payloads)
        assert stats.dropped["malformed-type"] == 1
        assert stats.dropped["malformed-to"] == 1
        assert stats.dropped["malformed-body.sdp"] == 1
        await until(lambda: relay.stats.presence_malformed == 1, "bad presence counted")
        assert stats.forwarded == 1


async def answer_commands(session: MqttSession, seen: list[dict[str, object]]) -> None:
    """A fake device: answers every command on its reply topic with the correlation data."""
    while True:
        msg = await session.recv()
        if msg.kind is not Kind.CMD:
            continue
        request = json.loads(msg.payload)
        seen.append(request)
        assert msg.response_topic == reply_topic(session.device_id)
        reply = {"ok": request["name"] != "explode", "message": "done", "echo": request["args"]}
        await session.publish(
            Kind.REPLY, json.dumps(reply).encode(), correlation_data=msg.correlation_data
        )


async def test_command_round_trip_and_timeout(
    broker: Mosquitto, tmp_path: Path, store_url: str
) -> None:
    async with (
        relay_running(relay_config(broker, tmp_path, store_url)) as relay,
        devices(broker, "door-a", "door-mute") as (a, _mute),
    ):
        seen: list[dict[str, object]] = []
        answerer = asyncio.create_task(answer_commands(a, seen))
        try:
            # The relay's API.
            reply = await relay.send_command("door-a", "volume", {"level": 5}, timeout=WAIT)
            assert reply == {"ok": True, "message": "done", "echo": {"level": 5}}
            with pytest.raises(CommandTimeout, match="door-mute"):
                await relay.send_command("door-mute", "status", timeout=0.3)

            # The standalone API on a dedicated client (what the CLI uses): the relay
            # records this operator's command too.
            client = MqttClient(
                device_config(broker, "operator-1"), subscriptions=[reply_topic("door-a")]
            )
            await client.start()
            try:
                reply = await send_command(client, "door-a", "explode", {"x": "y"}, timeout=WAIT)
                assert reply["ok"] is False
            finally:
                await client.close()
        finally:
            answerer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answerer
        assert seen[0] == {"name": "volume", "args": {"level": 5}}
        store = relay.store

        async def statuses_settled() -> bool:
            statuses = [c.status for c in await store.run(store.commands)]
            return statuses == ["ok", "timeout", "error"]

        await eventually(statuses_settled, "command statuses ok, timeout (expired), error")
        ok, silent, refused = await store.run(store.commands)
        assert (ok.device, ok.name, ok.args, ok.result) == (
            "door-a",
            "volume",
            {"level": 5},
            {"ok": True, "message": "done", "echo": {"level": 5}},
        )
        assert (silent.device, silent.name, silent.result) == ("door-mute", "status", None)
        assert (refused.name, refused.args, refused.result) == ("explode", {"x": "y"}, reply)
        assert relay.stats.commands_seen == 3


async def test_relay_restart_keeps_devices_and_open_calls(
    broker: Mosquitto, tmp_path: Path, store_url: str
) -> None:
    config = relay_config(broker, tmp_path, store_url)
    async with devices(broker, "door-a", "door-b") as (a, b):
        async with relay_running(config) as relay:
            await until(lambda: relay.presence.reachable("door-b"), "door-b online")
            inv = invite("door-a", "door-b")
            await send_out(a, inv)
            assert (await next_in(b, "invite")).call == inv.call
            acc = make(AcceptBody(sdp=SDP), call=inv.call, from_="door-b", to="door-a", ts=now_ms())
            await send_out(b, acc)
            assert (await next_in(a, "accept")).type == "accept"
        # A new relay process (same store, same MQTT session) carries on with the open call.
        async with relay_running(config) as relay:
            assert relay.presence.reachable("door-a") and relay.presence.reachable("door-b")
            assert relay.router.open_calls() == 1
            bye = make(
                HangupBody(reason="hangup"), call=inv.call, from_="door-b", to="door-a", ts=now_ms()
            )
            await send_out(b, bye)
            assert (await next_in(a, "hangup via new relay")).type == "hangup"
            store = relay.store

            async def ended() -> bool:
                return all(c.ended is not None for c in await store.run(store.calls))

            await eventually(ended, "the call to end in the store")
            assert {d.id for d in await store.run(store.devices)} == {"door-a", "door-b"}


def test_sync_messages_round_trip_and_refuse_garbage() -> None:
    call = new_id()
    events = (
        CallStarted(call, "door-a", "door-b", "normal"),
        CallAnswered(call),
        CallEnded(call, "hangup"),
    )
    assert sync.decode(sync.encode("relay-1", events)) == ("relay-1", events)
    for bad in (
        b"",
        b"[]",
        b'{"worker": "r", "events": {}}',
        b'{"worker": "r", "events": [{"op": "exploded", "call": "c"}]}',
        b'{"worker": "r", "events": [{"op": "started", "call": "c", "caller": "A/#"}]}',
        b'{"events": []}',
        b"x" * (sync.MAX_SYNC_BYTES + 1),
    ):
        with pytest.raises(sync.SyncError):
            sync.decode(bad)
    # A worker's call table follows another worker's events; a message of the call that
    # came before the sync is parked, then routed when it comes.
    router = Router(PresenceTable({"door-a": "online", "door-b": "online"}))
    ring = make(RingingBody(), call=call, from_="door-b", to="door-a", ts=now_ms())
    assert router.route("door-b", to_json(ring).encode(), now_ms()).action is Action.PARK
    (routed,) = router.apply(events[0])
    assert (routed.action, routed.envelope) == (Action.FORWARD, ring)
    assert router.open_calls() == 1
    stray = make(RingingBody(), call=new_id(), from_="door-b", to="door-a", ts=now_ms())
    assert router.route("door-b", to_json(stray).encode(), now_ms()).action is Action.PARK
    (dropped,) = router.expire(stray.call)
    assert (dropped.action, dropped.reason) == (Action.DROP, "unknown-call")
    acc = make(AcceptBody(sdp=SDP), call=call, from_="door-b", to="door-a", ts=now_ms())
    router.apply(events[1])
    assert router.route("door-b", to_json(acc).encode(), now_ms()).reason == "duplicate-accept"
    router.apply(events[2])
    assert router.open_calls() == 0


async def test_two_relay_workers_share_the_signaling_load(
    broker: Mosquitto, tmp_path: Path, store_url: str
) -> None:
    """The broker deals the shared ``out`` subscription round-robin, so the messages of one
    call go to both workers; every call must still be routed whole and recorded once."""
    first = relay_config(
        broker, tmp_path, store_url, mqtt=MqttSettings(client_id="relay-w1", **FAST_TIMERS)
    )
    second = replace(first, mqtt=MqttSettings(client_id="relay-w2", **FAST_TIMERS))
    async with (
        relay_running(first) as w1,
        relay_running(second) as w2,
        devices(broker, "door-a", "door-b") as (a, b),
    ):
        workers = (w1, w2)
        await until(
            lambda: (
                all(w.presence.reachable("door-a") for w in workers)
                and all(w.presence.reachable("door-b") for w in workers)
            ),
            "both workers see both devices",
        )
        calls = []
        for _ in range(6):
            inv = invite("door-a", "door-b")
            calls.append(inv.call)
            await send_out(a, inv)
            assert (await next_in(b, "invite")).call == inv.call
            for body in (RingingBody(), AcceptBody(sdp=SDP)):
                await send_out(
                    b, make(body, call=inv.call, from_="door-b", to="door-a", ts=now_ms())
                )
                assert (await next_in(a, body.TYPE)).call == inv.call
            bye = make(HangupBody(reason="hangup"), call=inv.call, from_="door-a", to="door-b",
                       ts=now_ms())  # fmt: skip
            await send_out(a, bye)
            assert (await next_in(b, "hangup")).call == inv.call
        for w in workers:
            assert not w.stats.dropped, w.stats.dropped
            assert w.stats.received > 0 and w.stats.synced > 0
        assert sum(w.stats.forwarded for w in workers) == 6 * 4
        await until(lambda: all(w.router.open_calls() == 0 for w in workers), "tables empty")
        store = w1.store

        async def all_ended() -> bool:
            return all(c.ended is not None for c in await store.run(store.calls))

        # An end routed by one worker may wait (retried) for the other's start to commit.
        try:
            await eventually(all_ended, "every call ended in the store", wait=2 * WAIT)
        except AssertionError as exc:  # rare under load: say what was left (diagnosis)
            rows = [(c.id[:8], c.answered, c.ended) for c in await store.run(store.calls)]
            stats = [(w.worker, w.stats.summary(), len(w._retries)) for w in workers]
            raise AssertionError(f"{exc}: calls {rows}; workers {stats}") from None
        records = await store.run(store.calls)
        assert [c.id for c in records] == calls
        assert all(c.answered is not None and c.end_reason == "hangup" for c in records)
        # Both workers recorded door-a's presence message; the store kept one history row.
        history = await store.run(store.presence_history, "door-a")
        assert [e.state for e in history] == ["online"]
