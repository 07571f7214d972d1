"""The dashboard API's pure parts and its session rules: the MOS estimate, password hashes,
the event bus's bounded queues, telemetry records, and session expiry on a real store."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cloud_relay.events import RESYNC, EventBus, EventsClosed
from cloud_relay.quality import call_quality, mos, mos_estimate, r_factor
from cloud_relay.sessions import Session, Sessions, SessionSettings
from cloud_relay.store import SessionRecord, Store
from cloud_relay.telemetry import TelemetryError, parse_telemetry
from cloud_relay.users import (
    PasswordError,
    ScryptParams,
    check_password,
    hash_password,
    verify_password,
)


def test_mos_is_best_on_a_clean_lan_and_falls_with_loss_delay_and_jitter() -> None:
    clean = mos_estimate(0.0, 0.0, 1.0)
    assert 4.3 <= clean <= 4.45
    assert mos_estimate(0.01, 0.0, 1.0) < clean
    assert mos_estimate(0.05, 0.0, 1.0) < mos_estimate(0.01, 0.0, 1.0)
    assert mos_estimate(0.0, 0.0, 600.0) < mos_estimate(0.0, 0.0, 100.0) < clean
    assert mos_estimate(0.0, 60.0, 20.0) < mos_estimate(0.0, 5.0, 20.0)
    # 5 % random loss costs a PLC codec about 16 R points (G.113: Bpl 25).
    assert r_factor(0.0, 0.0, 0.0) - r_factor(0.05, 0.0, 0.0) == pytest.approx(95 * 5 / 30)
    assert 1.0 <= mos_estimate(1.0, 500.0, 2000.0) < 1.5


def test_mos_of_r_follows_g107_annex_b() -> None:
    assert mos(-5) == 1.0 and mos(120) == 4.5
    assert mos(93.2) == pytest.approx(4.41, abs=0.01)
    assert mos(50) == pytest.approx(2.58, abs=0.01)
    rs = [r / 2 for r in range(0, 201)]
    assert all(mos(a) <= mos(b) for a, b in itertools.pairwise(rs))


def test_call_quality_takes_the_worse_side() -> None:
    quality = call_quality({
        "a": {"loss_fraction": 0.01, "jitter_ms": 4.0, "rtt_ms": 30.0},
        "b": {"loss_fraction": 0.03, "jitter_ms": 2.0, "rtt_ms": None},
        "c": "not stats",
    })  # fmt: skip
    assert quality is not None
    assert (quality.loss, quality.jitter_ms, quality.rtt_ms) == (0.03, 4.0, 30.0)
    assert quality.mos == mos_estimate(0.03, 4.0, 30.0)
    assert call_quality(None) is None and call_quality({"a": {"jitter_ms": 1}}) is None


def test_passwords_hash_with_salt_and_verify() -> None:
    weak = ScryptParams(n=2**10)  # the stored parameters are the ones checked
    first, second = hash_password("hunter2hunter2", weak), hash_password("hunter2hunter2", weak)
    assert first != second and first.startswith("scrypt$1024$8$1$")
    assert verify_password("hunter2hunter2", first)
    assert not verify_password("hunter2hunter3", first)
    assert not verify_password("hunter2hunter2", None)
    assert not verify_password("hunter2hunter2", "md5$abc")
    assert not verify_password("x" * 5000, first)
    assert hash_password("a long enough one").startswith("scrypt$32768$8$1$")
    with pytest.raises(PasswordError):
        check_password("short")


async def test_a_lagging_subscriber_is_told_to_resync_and_close_ends_streams() -> None:
    bus = EventBus(queue=3)
    with bus.subscribe() as slow, bus.subscribe() as fast:
        for n in range(3):
            bus.publish("presence", {"n": n})
            assert (await fast.get()).data == {"n": n}
        bus.publish("presence", {"n": 3})  # the slow one's fourth: its queue is full
        assert (await slow.get()).kind == RESYNC
        bus.publish("alert", {"n": 4})
        assert (await slow.get()).data == {"n": 4}
        assert (await fast.get()).data == {"n": 3}
        assert bus.lagged == 1 and bus.subscribers == 2
        bus.close()
        with pytest.raises(EventsClosed):
            await slow.get()
    assert bus.subscribers == 0


def test_telemetry_records_are_checked() -> None:
    record = parse_telemetry(b'{"event":"call-ended","call_id":"c1","media":{"jitter_ms":3}}')
    assert record.call_stats() == ("c1", {"jitter_ms": 3})
    assert parse_telemetry(b'{"cpu": 0.2}').event == ""
    for bad in (b"[]", b"{", b'{"event": "DROP TABLE"}', b"x" * 9000):
        with pytest.raises(TelemetryError):
            parse_telemetry(bad)


async def test_sessions_end_when_idle_at_their_end_and_at_logout(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite:///{tmp_path / 'relay.db'}")
    try:
        hashed = await asyncio.to_thread(hash_password, "a password!", ScryptParams(n=2**10))
        assert await store.run(store.add_user, "ops", hashed, datetime.now(UTC))
        sessions = Sessions(store, SessionSettings(idle_s=60, absolute_s=3600))
        made = await sessions.login("10.0.0.1", "ops", "a password!")
        assert isinstance(made, tuple)
        session_id, record = made
        checked = await sessions.check(session_id)
        assert checked is not None and checked.csrf_ok(record.csrf)
        wrong = record.csrf[:-1] + ("y" if record.csrf.endswith("x") else "x")
        assert not checked.csrf_ok(None) and not checked.csrf_ok(wrong)
        forged = session_id[:-1] + ("B" if session_id.endswith("A") else "A")
        assert await sessions.check(forged) is None
        # Idle: last seen two minutes ago.
        old = datetime.now(UTC) - timedelta(seconds=120)
        await store.run(store.session_seen, checked.digest, old)
        assert await sessions.check(session_id) is None
        # Past its absolute end, however busy.
        session_id, record = await _login(sessions)
        past = dataclasses.replace(record, expires=datetime.now(UTC) - timedelta(seconds=1))
        digest = (await _checked(sessions, session_id)).digest
        await store.run(store.end_session, digest)
        await store.run(store.add_session, digest, past)
        assert await sessions.check(session_id) is None
        # Logout.
        session_id, _ = await _login(sessions)
        await sessions.logout(await _checked(sessions, session_id))
        assert await sessions.check(session_id) is None
        await sessions.close()
    finally:
        await store.close()


async def _login(sessions: Sessions) -> tuple[str, SessionRecord]:
    made = await sessions.login("10.0.0.1", "ops", "a password!")
    assert isinstance(made, tuple)
    return made


async def _checked(sessions: Sessions, session_id: str) -> Session:
    checked = await sessions.check(session_id)
    assert checked is not None
    return checked
