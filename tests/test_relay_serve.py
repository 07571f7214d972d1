"""``edge-intercom-relay serve`` and ``cmd`` as real processes.

The relay runs its embedded mosquitto; the test kills that mosquitto and checks
that the supervisor brings it back, that devices reconnect and calls are routed
again, and that a restarted relay finds everything in its SQLite file. Every
wait is bounded; nothing asserts on wall-clock time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import mqtt_env
from mqtt_env import ONLINE, REPO, SDP, all_online, fast_config, next_matching, now_ms, store_until

from agent.signaling.envelope import (
    AcceptBody,
    Envelope,
    HangupBody,
    InviteBody,
    from_json,
    make,
    new_id,
    to_json,
)
from agent.signaling.mqtt import Incoming, MqttSession
from agent.signaling.topics import Kind
from cloud_relay.store import Store
from tools.lab.broker import Mosquitto, _free_port
from tools.lab.procs import alive

WAIT = 15.0


async def until(predicate: Callable[[], bool], what: str) -> None:
    await mqtt_env.until(predicate, what, wait=WAIT, interval=0.02)


def broker_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "broker" / "mosquitto.pid").read_text())
    except (OSError, ValueError):
        return None


@contextlib.asynccontextmanager
async def relay_process(config: Path, data_dir: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    log = (data_dir.parent / "relay.log").open("ab")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cloud_relay",
        "serve",
        "--config",
        str(config),
        "--data-dir",
        str(data_dir),
        cwd=REPO,
        stdout=log,
        stderr=log,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()


def device(port: int, device_id: str) -> MqttSession:
    config = fast_config(
        device_id, port, backoff_max=0.3, connect_timeout=WAIT, publish_timeout=WAIT
    )
    return MqttSession(config, ONLINE)


async def next_in(session: MqttSession, match: Callable[[Envelope], bool], what: str) -> Envelope:
    def wanted(msg: Incoming) -> bool:
        return msg.kind is Kind.IN and match(from_json(msg.payload))

    return from_json((await next_matching(session.recv, wanted, what, wait=WAIT)).payload)


def call_is(call: str) -> Callable[[Envelope], bool]:
    return lambda env: env.call == call


async def place_call(a: MqttSession, b: MqttSession) -> str:
    """Invite b from a until one invite gets through (the relay may still be reconnecting)."""
    try:
        async with asyncio.timeout(WAIT):
            while True:
                inv = make(
                    InviteBody(sdp=SDP), call=new_id(), from_="door-a", to="door-b", ts=now_ms()
                )
                await a.publish(Kind.OUT, to_json(inv).encode())
                try:
                    async with asyncio.timeout(0.5):
                        await next_in(b, call_is(inv.call), "invite")
                except TimeoutError:
                    continue
                return inv.call
    except TimeoutError:
        raise AssertionError("no invite got through the relay") from None


async def stored(db: str, check: Callable[[Store], bool], what: str) -> None:
    """Poll the relay's database from outside (a second reader of the SQLite file)."""
    await store_until(db, check, f"{what} in the store", wait=WAIT)


async def test_serve_supervises_embedded_broker_and_keeps_state(tmp_path: Path) -> None:
    port = _free_port("127.0.0.1")
    data_dir = tmp_path / "relay-data"
    config = tmp_path / "relay.toml"
    config.write_text(
        f"""
[broker]
port = {port}
tls = false
restart_min = 0.05
restart_max = 0.5
stop_timeout = 5.0
[mqtt]
client_id = "relay-serve-test"
keepalive = 2
backoff_min = 0.05
backoff_max = 0.3
connect_timeout = 3.0
publish_timeout = 5.0
misc_interval = 0.1
"""
    )
    db = f"sqlite:///{data_dir / 'relay.db'}"
    a, b = device(port, "door-a"), device(port, "door-b")
    async with relay_process(config, data_dir) as relay:
        await until(lambda: broker_pid(data_dir) is not None, "embedded broker pid")
        first = broker_pid(data_dir)
        assert first is not None
        await a.start()
        await b.start()
        try:
            await stored(db, all_online("door-a", "door-b"), "both devices online")
            call = await place_call(a, b)
            accept = make(AcceptBody(sdp=SDP), call=call, from_="door-b", to="door-a", ts=now_ms())
            await b.publish(Kind.OUT, to_json(accept).encode())
            await next_in(a, lambda e: e.type == "accept", "accept")

            # The broker dies; the relay's supervisor starts a new one on the same port.
            os.kill(first, signal.SIGKILL)
            await until(
                lambda: (
                    broker_pid(data_dir) not in (None, first) and alive(broker_pid(data_dir) or 0)
                ),
                "restarted broker",
            )
            await until(lambda: a.stats.connects >= 2 and b.stats.connects >= 2, "reconnects")
            await place_call(a, b)
            second = broker_pid(data_dir)
            assert second is not None

            relay.send_signal(signal.SIGTERM)
            async with asyncio.timeout(WAIT):
                assert await relay.wait() == 0
            assert not alive(second), "mosquitto outlived the relay"
        finally:
            await a.close()
            await b.close()

    # Everything the first run saw is in the database file.
    def first_run_kept(store: Store) -> bool:
        calls = {c.id: c for c in store.calls()}
        return (
            {d.id for d in store.devices()} == {"door-a", "door-b"}
            and len(calls) == 2
            and calls[call].answered is not None
        )

    await stored(db, first_run_kept, "first run's devices and calls")

    # A restarted relay carries on: the answered call can be hung up through it.
    a, b = device(port, "door-a"), device(port, "door-b")
    async with relay_process(config, data_dir) as relay:
        await until(lambda: broker_pid(data_dir) is not None, "embedded broker pid")
        await a.start()
        await b.start()
        try:
            await stored(db, all_online("door-a", "door-b"), "devices online again")
            bye = make(
                HangupBody(reason="hangup"), call=call, from_="door-a", to="door-b", ts=now_ms()
            )
            try:
                async with asyncio.timeout(WAIT):
                    while True:
                        await a.publish(Kind.OUT, to_json(bye).encode())
                        try:
                            async with asyncio.timeout(0.5):
                                await next_in(b, lambda e: e.type == "hangup", "hangup")
                            break
                        except TimeoutError:
                            bye = make(
                                HangupBody(reason="hangup"),
                                call=call,
                                from_="door-a",
                                to="door-b",
                                ts=now_ms(),
                            )
            except TimeoutError:
                raise AssertionError("hangup not routed by the restarted relay") from None
            relay.send_signal(signal.SIGTERM)
            async with asyncio.timeout(WAIT):
                assert await relay.wait() == 0
        finally:
            await a.close()
            await b.close()

    def call_ended(store: Store) -> bool:
        return any(c.id == call and c.end_reason == "hangup" for c in store.calls())

    await stored(db, call_ended, "the call's end")


async def test_cmd_cli_round_trip_and_timeout(tmp_path: Path) -> None:
    with Mosquitto.running(root=tmp_path / "broker") as broker:
        session = device(broker.port, "door-a")
        await session.start()

        async def answer() -> None:
            while True:
                msg = await session.recv()
                if msg.kind is Kind.CMD:
                    request = json.loads(msg.payload)
                    reply = {"ok": True, "message": "ok", "args": request["args"]}
                    await session.publish(
                        Kind.REPLY,
                        json.dumps(reply).encode(),
                        correlation_data=msg.correlation_data,
                    )

        answerer = asyncio.create_task(answer())
        url = f"mqtt://{broker.host}:{broker.port}"
        try:
            ok = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cloud_relay", "cmd", "--broker-url", url,
                "door-a", "volume", "level=7", "label=hall", "--timeout", str(WAIT),
                cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            async with asyncio.timeout(WAIT + 5):
                out, _ = await ok.communicate()
            assert ok.returncode == 0
            assert json.loads(out) == {
                "ok": True,
                "message": "ok",
                "args": {"level": 7, "label": "hall"},
            }

            silent = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cloud_relay", "cmd", "--broker-url", url,
                "door-nobody", "status", "--timeout", "0.3",
                cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            async with asyncio.timeout(WAIT):
                out, err = await silent.communicate()
            assert silent.returncode == 1
            assert out == b""
            assert b"no reply from door-nobody" in err
        finally:
            answerer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answerer
            await session.close()
