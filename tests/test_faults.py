"""Faults with real processes: the relay's mosquitto killed, agents killed or frozen, the
relay restarted, and signaling messages repeated or out of order (issue 4, "Faults").

Every test runs ``edge-intercom-relay serve`` (with its supervised mosquitto) and two
``edge-intercom-agent run`` processes on loopback (``tools.lab.fleet``): door-a plays a tone
and calls door-b, which answers door-a automatically. Media goes peer to peer, never
through the broker. Every wait is bounded and waits for a condition. Times are compared
only where the spec gives a bound (a device is seen offline within 1.5x its keep-alive),
on the timestamps the relay writes into its store, and to check that a broker outage the
test arranges (from the relay's log) outlasted the media timeout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from mqtt_env import FAST_TIMERS, SDP, next_matching, now_ms, store_until, until

from agent.signaling.envelope import (
    AcceptBody,
    Body,
    CandidateBody,
    Envelope,
    InviteBody,
    RingingBody,
    from_json,
    make,
    new_id,
    to_json,
)
from agent.signaling.mqtt import Message, MqttClient
from agent.signaling.topics import Kind, all_devices, device_topic
from cloud_relay.commands import reply_topic
from cloud_relay.config import BrokerSettings, MqttSettings, RelayConfig
from cloud_relay.service import Relay
from cloud_relay.store import CallRecord, PresenceEvent, Store
from tools.lab.broker import Mosquitto
from tools.lab.fleet import RELAY_CMD, RELAY_READY, WAIT, Fleet, fleet
from tools.lab.procs import alive, terminate

T = TypeVar("T")
A, B, X = "door-a", "door-b", "door-x"
"""door-a calls door-b; door-x is a device that exists only as a raw MQTT client."""
KEEPALIVE = 5
"""The agents' MQTT keep-alive in seconds (``Fleet.agent``'s default)."""
MEDIA_TIMEOUT_S = 2.0
"""The agents end a call when nothing arrives from the peer for this long."""
MEDIA = f"[media]\nmedia_timeout_s = {MEDIA_TIMEOUT_S}\n"
MOSQUITTO_KEEPALIVE_SLACK_S = 9.0
"""How much later than 1.5x keep-alive mosquitto 2.0 may notice a silent client: it runs its
keep-alive check only when more than 5 s (whole seconds) have passed since the last one
(``keepalive__check`` in src/keepalive.c), so up to about 7 s after the expiry, plus 1 s of
whole-second rounding, plus the relay's own time."""
AUDIO = 50
"""Packets the callee and caller must have received before a call counts as flowing (1 s)."""
Status = dict[str, Any]


# --- helpers ----------------------------------------------------------------------------------


async def start_pair(f: Fleet, *, b_keepalive: int = KEEPALIVE) -> None:
    """door-a and door-b running, idle, and online in the relay's store."""
    await f.agent(A, source="tone:700", sink="null", extra=MEDIA)
    await start_b(f, keepalive=b_keepalive)
    await f.until_status(A, lambda s: s["phase"] == "idle", f"{A} up")
    await f.until_online(A, B)


async def start_b(f: Fleet, *, keepalive: int = KEEPALIVE) -> None:
    await f.agent(
        B, source="tone:1100", sink="null", auto_answer=[A], extra=MEDIA, keepalive=keepalive
    )
    await f.until_status(B, lambda s: s["phase"] in ("idle", "ended"), f"{B} up")


def received(status: Status) -> int:
    packets: int = (status["media"] or {}).get("packets_received", 0)
    return packets


def in_call(call: str, more_than: int = AUDIO - 1) -> Callable[[Status], bool]:
    """A status check: active in ``call`` with more than ``more_than`` packets received."""
    return lambda s: s["phase"] == "active" and s["call_id"] == call and received(s) > more_than


async def active_call(f: Fleet) -> tuple[str, dict[str, Status]]:
    """door-a calls door-b by command; returns the call id once audio flows both ways."""
    reply = await f.command(A, "call", peer=B)
    assert reply["ok"], reply
    call: str = reply["call_id"]
    flowing = {d: await f.until_status(d, in_call(call), f"{d} in call {call}") for d in (A, B)}
    assert flowing[B]["role"] == "callee" and flowing[B]["peer"] == A
    return call, flowing


async def hang_up(f: Fleet, call: str) -> None:
    """door-a hangs up by command; both ends and the relay's store record why."""
    reply = await f.command(A, "hangup")
    assert reply["ok"] and reply["call_id"] == call, reply
    for device, reason in ((A, "local-hangup"), (B, "remote-hangup")):
        status = await f.until_status(
            device,
            lambda s: (s["last_call"] or {}).get("call_id") == call,
            f"{device} to end call {call}",
        )
        assert status["last_call"]["reason"] == reason, status
        assert status["last_call"]["media"]["packets_received"] >= AUDIO
    await stored(f, call_ended(call, "local-hangup"), "the hang-up")


def call_record(store: Store, call: str) -> CallRecord | None:
    return next((c for c in store.calls() if c.id == call), None)


def call_ended(call: str, reason: str) -> Callable[[Store], bool]:
    """A store check: ``call`` is recorded as ended with ``reason``."""

    def check(store: Store) -> bool:
        record = call_record(store, call)
        return record is not None and record.end_reason == reason

    return check


def call_answered(call: str) -> Callable[[Store], bool]:
    def check(store: Store) -> bool:
        record = call_record(store, call)
        return record is not None and record.answered is not None

    return check


async def stored(f: Fleet, check: Callable[[Store], object], what: str) -> None:
    """Wait until the relay's store (read from outside, as a second reader) passes ``check``."""
    try:
        await store_until(f"sqlite:///{f.db_path}", lambda s: bool(check(s)), what, wait=WAIT)
    except AssertionError as exc:
        raise f.fail(str(exc)) from None


async def read_store(f: Fleet, fn: Callable[[Store], T]) -> T:
    store = await Store.open(f"sqlite:///{f.db_path}")
    try:
        return await store.run(fn, store)
    finally:
        await store.close()


async def back_once(f: Fleet) -> None:
    """door-b is online again after one outage in its history, and a call works."""
    await f.until_online(B)
    history = await presence_history(f, B)
    assert [e.state for e in history] == ["online", "offline", "online"], history
    call, _ = await active_call(f)
    await hang_up(f, call)


async def never_offline(f: Fleet) -> None:
    for device in (A, B):
        history = await presence_history(f, device)
        assert [e.state for e in history] == ["online"], history


async def presence_history(f: Fleet, device: str) -> list[PresenceEvent]:
    return await read_store(f, lambda s: s.presence_history(device))


def relay_log(f: Fleet) -> str:
    return (f.root / "relay.log").read_text(errors="replace")


async def relay_dropped(f: Fleet, device: str, kind: str, call: str, reason: str) -> None:
    """The relay logged that it dropped (and counted) ``kind`` of ``call`` from ``device``."""
    line = f"{device}: dropped {kind} (call {call}): {reason}"
    try:
        await until(lambda: line in relay_log(f), f"relay log: {line!r}", wait=WAIT)
    except AssertionError as exc:
        raise f.fail(str(exc)) from None


async def until_new_broker(f: Fleet, *old: int) -> int:
    """The relay's supervisor has a mosquitto running that is none of ``old``."""

    def new() -> int | None:
        pid = f.broker_pid()
        return pid if pid is not None and pid not in old and alive(pid) else None

    try:
        await until(new, "the relay to restart its mosquitto", wait=WAIT)
    except AssertionError as exc:
        raise f.fail(str(exc)) from None
    pid = new()
    assert pid is not None
    return pid


def kill_broker(f: Fleet) -> int:
    pid = f.broker_pid()
    assert pid is not None and alive(pid), "no embedded mosquitto running"
    os.kill(pid, signal.SIGKILL)
    return pid


@contextlib.asynccontextmanager
async def client(f: Fleet, *subscriptions: str) -> AsyncIterator[MqttClient]:
    """A raw MQTT client on the fleet's broker as the relay (it may publish as any device)."""
    c = MqttClient(
        f.mqtt_config(
            f"faults-{new_id()[:12]}",
            session_expiry=0,
            backoff_min=0.05,
            backoff_max=0.5,
            connect_timeout=5.0,
            publish_timeout=5.0,
        ),
        subscriptions=subscriptions,
    )
    await c.start()
    try:
        yield c
    finally:
        await c.close()


def envelope(body: Body, call: str, sender: str, to: str) -> Envelope:
    return make(body, call=call, from_=sender, to=to, ts=now_ms())


async def inject(f: Fleet, c: MqttClient, sender: str, payload: Envelope | bytes) -> None:
    """Publish ``payload`` on ``sender``'s ``out``, as that device would (an envelope
    signed with its key)."""
    if isinstance(payload, Envelope):
        payload = to_json(f.signing(sender).sign(payload)).encode()
    data = payload
    await c.publish(device_topic(sender, Kind.OUT), data, qos=1)


def sent(messages: list[Message], sender: str, kind: str, call: str) -> bytes:
    """The payload of the ``kind`` envelope of ``call`` that ``sender`` published on its out."""
    for msg in messages:
        if msg.topic == device_topic(sender, Kind.OUT):
            env = from_json(msg.payload)
            if env.type == kind and env.call == call:
                return msg.payload
    raise AssertionError(f"{sender} sent no {kind} of call {call}")


async def until_sent(f: Fleet, seen: list[Message], sender: str, call: str) -> Envelope:
    """The first envelope of ``call`` that ``sender`` published (``snooping``'s record)."""

    def first() -> Envelope | None:
        topic = device_topic(sender, Kind.OUT)
        envs = (from_json(m.payload) for m in list(seen) if m.topic == topic)
        return next((e for e in envs if e.call == call), None)

    try:
        await until(first, f"{sender} to send something about call {call}", wait=WAIT)
    except AssertionError as exc:
        raise f.fail(str(exc)) from None
    env = first()
    assert env is not None
    return env


async def collect(c: MqttClient, into: list[Message]) -> None:
    while True:
        into.append(await c.recv())


@contextlib.asynccontextmanager
async def snooping(f: Fleet) -> AsyncIterator[tuple[MqttClient, list[Message]]]:
    """A raw client that records every device's ``out`` as it goes by."""
    seen: list[Message] = []
    async with client(f, all_devices(Kind.OUT)) as c:
        task = asyncio.create_task(collect(c, seen), name="snoop")
        try:
            yield c, seen
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


@contextlib.asynccontextmanager
async def broker_down(f: Fleet) -> AsyncIterator[None]:
    """Kill the relay's mosquitto and hold its port for the block, so that the supervisor's
    restarts fail (it backs off); mosquitto comes back at its next attempt after the block."""
    killed = [kill_broker(f)]
    server: asyncio.Server | None = None
    try:
        async with asyncio.timeout(WAIT):
            while server is None:
                try:
                    server = await asyncio.start_server(
                        _close_at_once, "127.0.0.1", f.port, reuse_address=True
                    )
                except OSError:  # the dying mosquitto still listens, or a new one won the race
                    pid = f.broker_pid()
                    if pid is not None and pid not in killed and alive(pid):
                        killed.append(kill_broker(f))
                    await asyncio.sleep(0.01)
    except TimeoutError:
        raise f.fail(f"could not take port {f.port} from the killed mosquitto") from None
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


def logged_at(f: Fleet, text: str) -> datetime:
    """When the relay logged the first line containing ``text`` (its local time)."""
    for line in relay_log(f).splitlines():
        if text in line:
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    raise f.fail(f"the relay never logged {text!r}")


def restarts_logged(f: Fleet) -> int:
    return relay_log(f).count("restarting mosquitto in")


RELAY_CONNECTED = re.compile(r"agent\.signaling\.mqtt: relay-\S+: connected to ")


def relay_connects(f: Fleet) -> int:
    """How often the relay's MQTT client has connected (and subscribed)."""
    return len(RELAY_CONNECTED.findall(relay_log(f)))


async def until_relay_reconnected(f: Fleet, before: int) -> None:
    """The relay is connected and subscribed again after a broker restart.

    Until then nothing takes the devices' ``out``: mosquitto acknowledges and drops what
    they publish (a new mosquitto has no sessions, and mosquitto 2.0 does not restore the
    relay's shared subscription even from persistence)."""
    try:
        await until(lambda: relay_connects(f) > before, "the relay to reconnect", wait=WAIT)
    except AssertionError as exc:
        raise f.fail(str(exc)) from None


# --- the tests --------------------------------------------------------------------------------


async def test_broker_killed_while_idle(tmp_path: Path) -> None:
    async with fleet(tmp_path, devices=(A, B), client_id="faults-idle") as f:
        await start_pair(f)
        connects = relay_connects(f)
        first = kill_broker(f)
        await until_new_broker(f, first)
        await until_relay_reconnected(f, connects)

        # Both agents are back (they answer commands through the new broker), and the new
        # mosquitto, which started empty (the old one never saved), holds their retained
        # presence again: they published it when they reconnected, before any reply.
        for device in (A, B):
            await f.until_status(device, lambda s: s["phase"] == "idle", f"{device} back")
        async with client(f, all_devices(Kind.PRESENCE)) as watch:
            presence: dict[str, str] = {}
            while set(presence) != {A, B}:
                msg = await next_matching(
                    watch.recv, lambda m: m.retained, "retained presence", wait=WAIT
                )
                presence[msg.topic.split("/")[-2]] = json.loads(msg.payload)["state"]
        assert presence == {A: "online", B: "online"}, presence
        await f.until_online(A, B)

        # The relay subscribed again: a call placed now is routed and works.
        call, _ = await active_call(f)
        await hang_up(f, call)

        # A dead broker is not a device going away: no offline in the presence history.
        await never_offline(f)


async def test_broker_killed_during_call_media_keeps_flowing(tmp_path: Path) -> None:
    async with fleet(tmp_path, devices=(A, B), client_id="faults-call") as f:
        await start_pair(f)
        call, before = await active_call(f)
        first = f.broker_pid()
        assert first is not None
        logged, connects = restarts_logged(f), relay_connects(f)
        async with broker_down(f):
            # Keep mosquitto away until two restarts have failed (the supervisor logs a
            # restart after the kill and after each failure): the next one waits 4x
            # restart_min, so the outage outlasts the agents' media timeout.
            await until(lambda: restarts_logged(f) >= logged + 3, "two failed restarts", wait=WAIT)
        second = await until_new_broker(f, first)
        await until_relay_reconnected(f, connects)
        for device in (A, B):
            status = await f.until_status(
                device, in_call(call, received(before[device])), f"{device} still in {call}"
            )
            assert status["media"]["packets_lost"] < AUDIO, status
        # The call outlived a broker outage longer than the media timeout: its audio never
        # went through the broker. (The outage as the relay logged it.)
        down = logged_at(f, f"embedded mosquitto (pid {first}) exited with -9")
        up = logged_at(f, f"embedded mosquitto (pid {second}) listening")
        assert up - down > timedelta(seconds=MEDIA_TIMEOUT_S), (down, up)

        # The relay still knows the call: the hang-up by command is routed and recorded.
        await hang_up(f, call)


async def test_agent_killed_during_call(tmp_path: Path) -> None:
    async with fleet(tmp_path, devices=(A, B), client_id="faults-kill") as f:
        await start_pair(f)
        async with client(f, device_topic(A, Kind.TELEMETRY)) as telemetry:
            call, _ = await active_call(f)
            proc = f.procs[B]
            killed_at = datetime.now(UTC)
            proc.kill()
            await proc.wait()

            # The broker sends door-b's will; the relay records it offline, in time.
            await stored(f, lambda s: s.presence_history(B)[-1].state == "offline", "B offline")
            history = await presence_history(f, B)
            offline_at = history[-1].at
            assert [e.state for e in history] == ["online", "offline"], history
            assert offline_at - killed_at <= timedelta(seconds=1.5 * KEEPALIVE), (
                f"offline {offline_at - killed_at} after the kill"
            )

            # door-a notices the silence, ends the call and says why.
            def ended(m: Message) -> bool:
                record = json.loads(m.payload)
                return bool(record.get("event") == "call-ended" and record.get("call_id") == call)

            msg = await next_matching(telemetry.recv, ended, "door-a's call-ended", wait=WAIT)
        record = json.loads(msg.payload)
        assert (record["peer"], record["reason"]) == (B, "media-lost"), record
        assert record["media"]["packets_received"] >= AUDIO
        status = await f.until_status(A, lambda s: s["last_call"] is not None, "A's last call")
        assert status["last_call"]["reason"] == "media-lost"
        # Its hang-up went through the relay, which closed the call with that reason.
        await stored(f, call_ended(call, "media-lost"), "the call's end")

        # door-b comes back (its queued messages are for a dead call) and takes calls again.
        await start_b(f)
        await back_once(f)


async def test_frozen_agent_goes_offline_within_keepalive(tmp_path: Path) -> None:
    """A board that loses power or its network sends no FIN: only the keep-alive finds out."""
    keepalive = 2
    async with fleet(tmp_path, devices=(A, B), client_id="faults-frozen") as f:
        await start_pair(f, b_keepalive=keepalive)
        proc = f.procs[B]
        frozen_at = datetime.now(UTC)
        proc.send_signal(signal.SIGSTOP)
        try:
            await stored(f, lambda s: s.presence_history(B)[-1].state == "offline", "B offline")
        finally:
            proc.send_signal(signal.SIGCONT)
        history = await presence_history(f, B)
        late = history[-1].at - frozen_at
        # 1.5x keep-alive after the last packet the broker got from door-b (at or before the
        # freeze), give or take how often the broker looks.
        bound = timedelta(seconds=1.5 * keepalive + MOSQUITTO_KEEPALIVE_SLACK_S)
        assert late <= bound, f"offline {late} after the freeze"
        broker_log = (f.data_dir / "broker" / "mosquitto.log").read_text()
        assert re.search(rf"Client {B} .*(exceeded timeout|keepalive)", broker_log, re.I), (
            broker_log[-2000:]
        )

        # Thawed, it finds its connection gone, reconnects and is online again.
        await back_once(f)


async def test_relay_restarted_keeps_state(tmp_path: Path) -> None:
    async with fleet(tmp_path, devices=(A, B), client_id="faults-relay") as f:
        await start_pair(f)
        done, _ = await active_call(f)
        await hang_up(f, done)
        async with snooping(f) as (_, seen):
            call, flowing = await active_call(f)
        invite, accept = sent(seen, A, "invite", call), sent(seen, B, "accept", call)
        await stored(f, call_answered(call), "the call answered")

        def snapshot(store: Store) -> tuple[list[Any], dict[str, list[Any]], list[Any]]:
            devices = store.devices()
            return devices, {d.id: store.presence_history(d.id) for d in devices}, store.calls()

        devices, histories, calls = await read_store(f, snapshot)
        assert {d.id for d in devices} == {A, B}

        for kill in (False, True):
            await f.restart_relay(kill=kill)
            await f.until_online(A, B)
            for device in (A, B):  # the relay is not in the media path
                flowing[device] = await f.until_status(
                    device, in_call(call, received(flowing[device])), f"{device} still in {call}"
                )

        # Everything from before is still there.
        devices_now, histories_now, calls_now = await read_store(f, snapshot)
        assert [(d.id, d.created, d.board) for d in devices_now] == [
            (d.id, d.created, d.board) for d in devices
        ]
        for device, history in histories.items():
            assert histories_now[device][: len(history)] == history
        assert [c for c in calls_now if c.id == done] == [c for c in calls if c.id == done]

        # The restarted relay restored its call table from the store: repeats of the open
        # call's invite and accept are dropped, and its hang-up is routed and recorded.
        async with client(f) as raw:
            await inject(f, raw, A, invite)
            await inject(f, raw, B, accept)
        await relay_dropped(f, A, "invite", call, "duplicate-call")
        await relay_dropped(f, B, "accept", call, "duplicate-accept")
        for device in (A, B):
            await f.until_status(device, in_call(call, received(flowing[device])), "still in call")
        await hang_up(f, call)

        # A new call after the restarts works.
        call, _ = await active_call(f)
        await hang_up(f, call)


async def test_relay_restart_is_not_an_outage_of_the_devices(tmp_path: Path) -> None:
    async with fleet(tmp_path, devices=(A, B), client_id="faults-will") as f:
        await start_pair(f)
        await f.pair(X)  # paired, never online: its invite is answered "unreachable"
        await f.restart_relay()
        # A probe the relay records, published after whatever its session held: once it
        # is in the store, so is everything the relay took before it.
        probe = new_id()
        async with client(f) as raw:
            await inject(f, raw, X, envelope(InviteBody(sdp=SDP), probe, X, "door-nobody"))
        await stored(f, call_ended(probe, "unreachable"), "the probe")
        await never_offline(f)


async def test_duplicate_and_out_of_order_signaling(tmp_path: Path) -> None:
    async with fleet(tmp_path, devices=(A, B), client_id="faults-dup") as f:
        await start_pair(f)
        async with snooping(f) as (raw, seen):
            # Messages for calls nobody opened, and a candidate before its invite: dropped.
            stray = new_id()
            await inject(f, raw, B, envelope(RingingBody(), stray, B, A))
            await inject(f, raw, B, envelope(AcceptBody(sdp=SDP), stray, B, A))
            early = new_id()
            candidate = "candidate:1 1 udp 2130706431 127.0.0.1 9 typ host"
            await inject(f, raw, A, envelope(CandidateBody(candidate=candidate), early, A, B))
            await relay_dropped(f, B, "ringing", stray, "unknown-call")
            await relay_dropped(f, B, "accept", stray, "unknown-call")
            await relay_dropped(f, A, "candidate", early, "unknown-call")

            call, flowing = await active_call(f)
            invite, accept = sent(seen, A, "invite", call), sent(seen, B, "accept", call)

            # Exact repeats (QoS 1 redelivery): the relay's replay guard drops them.
            await inject(f, raw, A, invite)
            await inject(f, raw, B, accept)
            await relay_dropped(f, A, "invite", call, "duplicate")
            await relay_dropped(f, B, "accept", call, "duplicate")
            # The same messages made again: the call table drops them.
            await inject(f, raw, B, envelope(AcceptBody(sdp=SDP), call, B, A))
            await inject(f, raw, A, envelope(InviteBody(sdp=SDP), call, A, B))
            await relay_dropped(f, B, "accept", call, "duplicate-accept")
            await relay_dropped(f, A, "invite", call, "duplicate-call")
            # A ringing after the accept is the callee's to send: routed, and ignored.
            await inject(f, raw, B, envelope(RingingBody(), call, B, A))
            # A new call's candidate before its invite (dropped), then the invite: busy.
            second = new_id()
            await inject(f, raw, A, envelope(CandidateBody(candidate=candidate), second, A, B))
            await inject(f, raw, A, envelope(InviteBody(sdp=SDP), second, A, B))
            await relay_dropped(f, A, "candidate", second, "unknown-call")
            busy = await until_sent(f, seen, B, second)
            assert busy.type == "busy", busy

            # Nothing disturbed the call, and no repeat reached an agent.
            for device in (A, B):
                status = await f.until_status(
                    device, in_call(call, received(flowing[device])), f"{device} still in call"
                )
                assert "duplicate" not in status["rejected"], status
            await hang_up(f, call)

            # After the call: a repeat of its invite is dropped by the relay, and one made
            # again (the relay has forgotten the call) is ignored by door-b, which remembers it.
            await inject(f, raw, A, invite)
            await relay_dropped(f, A, "invite", call, "duplicate")
            mark = len(seen)
            await inject(f, raw, A, envelope(InviteBody(sdp=SDP), call, A, B))

            # A normal call still works. Its invite went through the relay after that one, so
            # door-b had handled it when it answered.
            old, (call, _) = call, await active_call(f)
            await until_sent(f, seen, B, call)  # its accept: what came before it is in too
            from_b = [
                from_json(m.payload) for m in seen[mark:] if m.topic == device_topic(B, Kind.OUT)
            ]
            assert [e.type for e in from_b if e.call == old] == [], "door-b took up a finished call"
            await hang_up(f, call)
        for device in (A, B):
            assert f.procs[device].returncode is None, f.log(device)


async def test_invite_sent_while_no_relay_listens_is_sent_again(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """A broker acknowledges an invite that no relay takes (no relay has subscribed yet, as
    after a broker restart): the caller sends the same invite again until it is answered,
    so the call goes through once a relay is there. The relay here starts in-process,
    after the first invite went nowhere."""
    f = Fleet(tmp_path, broker.port, tmp_path / "relay-data")  # a plain lab broker
    f.client = MqttClient(
        f.mqtt_config("resend-test", session_expiry=0),
        subscriptions=[reply_topic(A), reply_topic(B)],
    )
    await f.client.start()
    try:
        await start_pair_without_relay(f)
        async with client(f, device_topic(A, Kind.OUT)) as watch:
            reply = await f.command(A, "call", peer=B)
            assert reply["ok"], reply
            call = reply["call_id"]
            first = await next_matching(watch.recv, is_invite, "the first invite", wait=WAIT)
            config = RelayConfig(
                data_dir=str(tmp_path),
                broker=BrokerSettings(url=f"mqtt://{broker.host}:{broker.port}"),
                mqtt=MqttSettings(client_id="relay-late", **FAST_TIMERS),
            )
            store = await Store.open(config.store_url())
            relay = Relay(config, store)
            try:
                await relay.start()
                again = await next_matching(watch.recv, is_invite, "the invite again", wait=WAIT)
                assert again.payload == first.payload  # the same message: a duplicate if seen
                for device in (A, B):
                    await f.until_status(device, in_call(call), f"{device} in the call")
                assert relay.stats.forwarded >= 2 and not relay.stats.dropped.get("duplicate")
            finally:
                await relay.close()
                await store.close()
        await f.command(A, "hangup")
    finally:
        await f.client.close()
        for proc in f.procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def is_invite(msg: Message) -> bool:
    return from_json(msg.payload).type == "invite"


async def start_pair_without_relay(f: Fleet) -> None:
    await f.agent(A, source="tone:700", sink="null", extra=MEDIA)
    await f.agent(B, source="tone:1100", sink="null", auto_answer=[A], extra=MEDIA)
    for device in (A, B):
        await f.until_status(device, lambda s: s["phase"] == "idle", f"{device} up")


async def test_two_relay_processes_share_the_load(tmp_path: Path) -> None:
    """A second ``edge-intercom-relay serve`` on the first one's broker and store: the
    broker deals the devices' ``out`` messages to both, and every call still goes through
    whole and is recorded once."""
    async with fleet(tmp_path, devices=(A, B), client_id="faults-workers") as f:
        second = tmp_path / "relay-2.toml"
        first = (tmp_path / "relay.toml").read_text()
        second.write_text(
            f'pki_dir = "{f.pki_dir}"\n'  # the CA and the relay's client certificate
            + first.replace("relay-faults-workers", "relay-w2").replace(
                f"port = {f.pairing_port}", "port = 0"
            )  # its own HTTPS port
            + f'[store]\nurl = "sqlite:///{f.db_path}"\n'
        )
        argv = [*RELAY_CMD, "serve", "--config", str(second), "--broker-url", f.url,
                "--data-dir", str(tmp_path / "relay-2-data")]  # fmt: skip
        worker = await f.spawn("relay-2", argv, env=os.environ)
        try:
            async with asyncio.timeout(WAIT):
                while RELAY_READY not in f.log("relay-2"):
                    assert worker.returncode is None, f.log("relay-2")
                    await asyncio.sleep(0.05)
            await start_pair(f)
            calls = []
            for _ in range(4):
                call, _ = await active_call(f)
                await hang_up(f, call)
                calls.append(call)
        finally:
            assert await terminate(worker, WAIT) == 0, f.log("relay-2")
        await f.stop_relay()
        records = await read_store(f, lambda store: store.calls())
        assert [c.id for c in records] == calls
        assert all(c.answered and c.end_reason == "local-hangup" for c in records), records
        for name in ("relay", "relay-2"):
            (summary,) = re.findall(r"relay stopped: (.*)", f.log(name))
            counts = dict(re.findall(r"(\S+)=(\d+)", summary))
            assert int(counts.get("forwarded", 0)) > 0 and int(counts.get("synced", 0)) > 0, (
                name,
                summary,
            )
            # Only a hang-up that crossed the other side's: both ends may hang up at once.
            dropped = {k for k in counts if k.startswith("dropped[")}
            assert dropped <= {"dropped[finished-call]"}, (name, summary)
