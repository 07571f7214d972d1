"""Shared pieces of the tests that run a real mosquitto: bounded waits and fast MQTT timers.

Every wait is bounded by ``asyncio.timeout`` and fails as an ``AssertionError`` naming what
it waited for; nothing here measures wall-clock time.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import TypedDict, TypeVar

from agent.signaling.mqtt import MqttConfig
from cloud_relay.config import RelayConfig
from cloud_relay.service import Relay
from cloud_relay.store import Store
from tools.lab.broker import Mosquitto

M = TypeVar("M")
REPO = Path(__file__).resolve().parent.parent
WAIT = 10.0
"""Default upper bound of any single wait; the tests normally finish each in well under a second."""
SDP = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
ONLINE = {"state": "online", "board": "lab", "version": "test"}


class Timers(TypedDict):
    keepalive: int
    session_expiry: int
    backoff_min: float
    backoff_max: float
    connect_timeout: float
    publish_timeout: float
    misc_interval: float


FAST_TIMERS: Timers = {
    "keepalive": 2,
    "session_expiry": 60,
    "backoff_min": 0.05,
    "backoff_max": 0.4,
    "connect_timeout": 3.0,
    "publish_timeout": 5.0,
    "misc_interval": 0.1,
}
"""MQTT timers shrunk so that reconnects and keepalives happen within a test."""


def fast_config(
    client_id: str, port: int, host: str = "127.0.0.1", **changes: object
) -> MqttConfig:
    """An agent-side MQTT configuration with ``FAST_TIMERS``."""
    base = MqttConfig(client_id=client_id, host=host, port=port, **FAST_TIMERS)
    return replace(base, **changes)  # type: ignore[arg-type]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def eventually(
    check: Callable[[], Awaitable[object]], what: str, *, wait: float = WAIT, interval: float = 0.02
) -> None:
    """Await ``check()`` every ``interval`` seconds until it is truthy, for at most ``wait``."""
    try:
        async with asyncio.timeout(wait):
            while not await check():
                await asyncio.sleep(interval)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def until(
    predicate: Callable[[], object], what: str, *, wait: float = WAIT, interval: float = 0.01
) -> None:
    """Like ``eventually`` for a plain (not awaitable) predicate."""

    async def check() -> object:
        return predicate()

    await eventually(check, what, wait=wait, interval=interval)


async def next_matching(
    recv: Callable[[], Awaitable[M]], match: Callable[[M], bool], what: str, *, wait: float = WAIT
) -> M:
    """The next item ``recv()`` returns that ``match`` accepts; the others are dropped."""
    try:
        async with asyncio.timeout(wait):
            while True:
                item = await recv()
                if match(item):
                    return item
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def store_until(
    url: str, check: Callable[[Store], bool], what: str, *, wait: float = WAIT
) -> None:
    """Poll a relay's database from outside (a second reader of its SQLite file)."""
    store = await Store.open(url)
    try:
        await eventually(lambda: store.run(check, store), what, wait=wait, interval=0.05)
    finally:
        await store.close()


def all_online(*ids: str) -> Callable[[Store], bool]:
    """A store check: every one of ``ids`` is online."""

    def check(store: Store) -> bool:
        states = {d.id: d.presence for d in store.devices()}
        return all(states.get(i) == "online" for i in ids)

    return check


async def spawn_client(
    script: str, client_id: str, broker: Mosquitto
) -> asyncio.subprocess.Process:
    """Run ``script`` with argv client id, broker host, broker port; its stdout is piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        client_id,
        broker.host,
        str(broker.port),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )


@contextlib.asynccontextmanager
async def relay_running(config: RelayConfig) -> AsyncIterator[Relay]:
    """An in-process relay on its store, started and closed around the block."""
    store = await Store.open(config.store_url())
    relay = Relay(config, store)
    try:
        await relay.start()
        yield relay
    finally:
        await relay.close()
        await store.close()
