"""The relay store's batched writes, on SQLite and PostgreSQL, and the relay's records of
calls that another worker opened and has not stored yet.

Every wait is bounded (``mqtt_env.eventually``); nothing asserts on wall-clock time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from mqtt_env import eventually, now_ms, until
from sqlalchemy import create_engine, event, insert
from sqlalchemy.exc import IntegrityError

from agent.signaling.envelope import new_id
from cloud_relay.config import RelayConfig, StoreSettings
from cloud_relay.routing import CallAnswered, CallEnded
from cloud_relay.schema import calls
from cloud_relay.service import Relay
from cloud_relay.store import PEER_ENDED, Store, utc_from_ms
from tools.lab.postgres import Postgres


async def test_queued_writes_land_in_order_and_reads_see_them(store_url: str) -> None:
    store = await Store.open(store_url, linger=0.05)
    try:
        at = utc_from_ms(now_ms())
        call = new_id()
        devices = [f"door-{n}" for n in range(50)]
        firsts = [store.write(store.record_presence, d, "online", at, board="b") for d in devices]
        repeat = store.write(store.record_presence, "door-0", "online", at, version="2")
        offline = store.write(store.record_presence, "door-1", "offline", at)
        started = store.write(store.call_started, call, "door-0", "door-2", "normal", at)
        ends = [
            store.write(store.call_answered, call, at),
            store.write(store.call_ended, call, "hangup", at),
        ]
        # A read queued after the writes waits for none of the linger and sees them all.
        counts = await store.run(store.presence_counts)
        assert counts == {"online": 49, "offline": 1}
        assert await asyncio.gather(*firsts) == [True] * 50
        assert await repeat is False  # no change: no history row
        assert await offline is True
        await started
        assert await asyncio.gather(*ends) == [True, True]
        (record,) = await store.run(store.calls)
        assert (record.answered, record.ended, record.end_reason) == (at, at, "hangup")
        door0 = next(d for d in await store.run(store.devices) if d.id == "door-0")
        assert (door0.board, door0.version) == ("b", "2")  # a missing field keeps its value
        assert [e.state for e in await store.run(store.presence_history, "door-1")] == [
            "online",
            "offline",
        ]
    finally:
        await store.close()


async def test_a_failing_write_fails_alone(store_url: str) -> None:
    store = await Store.open(store_url, linger=0.05)
    try:
        at = utc_from_ms(now_ms())
        good = store.write(store.record_presence, "door-a", "online", at)
        bad = store.write(store.call_started, new_id(), None, "door-b", "normal", at)  # NOT NULL
        after = store.write(store.call_started, call := new_id(), "door-a", "door-b", "normal", at)
        assert await good is True
        with pytest.raises(IntegrityError):
            await bad
        await after
        assert [c.id for c in await store.run(store.calls)] == [call]
    finally:
        await store.close()


async def test_close_commits_lingering_writes(store_url: str) -> None:
    store = await Store.open(store_url, linger=60.0)
    write = store.write(store.record_presence, "door-a", "online", utc_from_ms(now_ms()))
    await store.close()
    assert await write is True
    store = await Store.open(store_url)
    try:
        assert await store.run(store.presence_counts) == {"online": 1}
    finally:
        await store.close()


async def test_answer_and_end_of_a_call_stored_late_by_another_worker(
    store_url: str, tmp_path: Path
) -> None:
    """Workers' writes are not ordered: the worker that routed the invite may commit the
    call after another worker routed its answer and end, which are then written again."""
    config = RelayConfig(data_dir=str(tmp_path), store=StoreSettings(url=store_url))
    store = await Store.open(store_url)
    other = await Store.open(store_url)  # the worker that routed the invite
    relay = Relay(config, store)  # never connected: only its store records are used
    try:
        call, at = new_id(), utc_from_ms(now_ms())
        relay._record_event(CallAnswered(call), at)
        relay._record_event(CallEnded(call, "hangup"), at)
        await until(lambda: relay.stats.store_retried >= 2, "the first retries")
        await other.run(other.call_started, call, "door-a", "door-b", "normal", at)

        async def recorded() -> bool:
            calls = await store.run(store.calls)
            return bool(calls) and calls[0].answered is not None and calls[0].ended is not None

        await eventually(recorded, "the answer and the end in the store")
        assert not relay.stats.dropped
    finally:
        await relay.close()
        await other.close()
        await store.close()


@pytest.mark.parametrize("change", ["answer", "end"])
async def test_a_call_another_worker_commits_while_an_update_runs_is_still_updated(
    postgres: Postgres, change: str
) -> None:
    """On PostgreSQL each statement sees what was committed when it began. Another worker
    commits the call right after our update ran (and missed it) and before we look for the
    row: the answer or end must still be stored, not taken as needing no change."""
    url = postgres.create_database()
    store = await Store.open(url)
    other = create_engine(url)
    try:
        call, at = new_id(), utc_from_ms(now_ms())
        with other.connect() as conn:
            pending = conn.begin()
            conn.execute(insert(calls).values(id=call, caller="door-a", callee="door-b",
                                              mode="normal", started=at))  # fmt: skip

            def commit_after_the_first_update(_conn: Any, _cursor: Any, statement: str,
                                              *_: Any) -> None:  # fmt: skip
                if statement.lstrip().upper().startswith("UPDATE") and pending.is_active:
                    pending.commit()

            event.listen(store._engine, "after_cursor_execute", commit_after_the_first_update)
            if change == "answer":
                assert await store.run(store.call_answered, call, at) is True
            else:
                assert await store.run(store.call_ended, call, "hangup", at) is True
            assert not pending.is_active  # the race did happen
        (record,) = await store.run(store.calls)
        assert (record.answered if change == "answer" else record.ended) == at
    finally:
        other.dispose()
        await store.close()


@pytest.mark.parametrize("peer_first", [True, False], ids=["peer-stored-first", "own-first"])
async def test_crossing_hang_ups_keep_the_reason_of_the_side_that_ended(
    store_url: str, peer_first: bool
) -> None:
    """Both sides' hang-ups reach the relay when one side ends the call and the other sees
    its media close first; two workers store them in either order. The record keeps the
    reason of the side that hung up and the earlier end time."""
    store = await Store.open(store_url)
    try:
        call = new_id()
        start = now_ms()
        await store.run(store.call_started, call, "door-a", "door-b", "normal", utc_from_ms(start))
        own = (call, "local-hangup", utc_from_ms(start + 1000))
        peer = (call, PEER_ENDED, utc_from_ms(start + 990))  # routed first, by another worker
        for args in (peer, own) if peer_first else (own, peer):
            assert await store.run(store.call_ended, *args) is True
        # Any later end changes nothing.
        assert await store.run(store.call_ended, call, "media-lost", utc_from_ms(start + 5000))
        (record,) = await store.run(store.calls)
        assert (record.end_reason, record.ended) == ("local-hangup", utc_from_ms(start + 990))
    finally:
        await store.close()
