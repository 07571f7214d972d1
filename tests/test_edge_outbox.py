"""The alert codecs and the SQLite outbox: strict parsing, drop order, persistence, kill -9.

No broker here: the outbox is exercised directly, and a crashing writer is a real
child process killed with SIGKILL in the middle of its work.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.edge.alerts import (
    MAX_ACK_IDS,
    MAX_ALERT_BYTES,
    OUTBOX_OVERFLOW,
    Alert,
    AlertError,
    Severity,
    decode_ack,
    decode_alert,
    encode_ack,
    new_alert_id,
)
from agent.edge.outbox import Outbox

REPO = Path(__file__).resolve().parent.parent
T0 = 1_760_000_000_000


def alert(severity: Severity = Severity.WARNING, kind: str = "smoke", at: int = T0) -> Alert:
    return Alert(
        id=new_alert_id(),
        detector="alarm",
        kind=kind,
        severity=severity,
        start=at,
        end=at + 4_000,
        confidence=0.97,
        level=-12.5,
        created=at + 4_100,
        detail={"pattern": "t3", "cycles": 2},
    )


# --- codecs -------------------------------------------------------------------------------------


ALERTS = st.builds(
    lambda severity, start, length, confidence, level, detail: Alert(
        new_alert_id(),
        "glass",
        "glass_break",
        severity,
        start,
        start + length,
        confidence,
        level,
        start,
        detail,
    ),
    st.sampled_from(list(Severity)),
    st.integers(0, 2**52),
    st.integers(0, 10**7),
    st.floats(0.0, 1.0),
    st.floats(-200.0, 200.0),
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True),
        st.integers(-(2**40), 2**40) | st.text(max_size=20) | st.booleans(),
        max_size=5,
    ),
)


@given(ALERTS)
def test_alert_round_trip(a: Alert) -> None:
    assert decode_alert(a.to_json()) == a


@pytest.mark.parametrize(
    ("change", "label"),
    [
        ({"id": "ABC"}, "id"),
        ({"id": "0" * 31}, "id"),
        ({"v": 2}, "v"),
        ({"v": True}, "v"),
        ({"severity": "panic"}, "severity"),
        ({"detector": "Alarm"}, "detector"),
        ({"kind": "a/b"}, "kind"),
        ({"start": 1.5}, "start"),
        ({"start": True}, "start"),
        ({"end": T0 - 1}, "end"),
        ({"created": -1}, "created"),
        ({"confidence": 1.5}, "confidence"),
        ({"confidence": "high"}, "confidence"),
        ({"level": 1e6}, "level"),
        ({"detail": []}, "detail"),
        ({"detail": {"x": [1]}}, "detail"),
        ({"detail": {"X": 1}}, "detail"),
        ({"detail": {"x": "y" * 201}}, "detail"),
        ({"extra": 1}, "fields"),
    ],
)
def test_alert_parsing_is_strict(change: dict[str, object], label: str) -> None:
    data = alert().to_dict() | change
    with pytest.raises(AlertError) as err:
        decode_alert(json.dumps(data).encode())
    assert err.value.label == label


@pytest.mark.parametrize(
    ("payload", "label"),
    [
        (b"", "json"),
        (b"\xff", "json"),
        (b"[1]", "json"),
        (b'{"confidence": NaN}', "json"),
        (b" " * (MAX_ALERT_BYTES + 1), "size"),
    ],
)
def test_alert_payloads_that_are_not_alerts(payload: bytes, label: str) -> None:
    with pytest.raises(AlertError) as err:
        decode_alert(payload)
    assert err.value.label == label
    data = alert().to_dict()
    del data["level"]
    with pytest.raises(AlertError, match="missing"):
        decode_alert(json.dumps(data).encode())


def test_ack_codec() -> None:
    ids = [new_alert_id() for _ in range(3)]
    assert decode_ack(encode_ack(ids)) == tuple(ids)
    for bad, label in [
        (b"{}", "fields"),
        (b'{"ids": [], "x": 1}', "fields"),
        (b'{"ids": "abc"}', "ids"),
        (b'{"ids": []}', "ids"),
        (b'{"ids": [1]}', "ids"),
        (json.dumps({"ids": ["0" * 32] * (MAX_ACK_IDS + 1)}).encode(), "ids"),
        (b"not json", "json"),
    ]:
        with pytest.raises(AlertError) as err:
            decode_ack(bad)
        assert err.value.label == label, bad
    with pytest.raises(AlertError):
        encode_ack(["nope"])


# --- the outbox -------------------------------------------------------------------------------


async def test_outbox_keeps_alerts_until_acked_and_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.sqlite3"
    box = await Outbox.open(path)
    alerts = [alert(at=T0 + i) for i in range(5)]
    for a in alerts:
        assert await box.add(a) == a.id
    assert await box.add(alerts[0]) == alerts[0].id  # the same id again: no second row
    assert await box.pending(3) == alerts[:3]
    assert await box.acked([alerts[1].id, new_alert_id()]) == 1
    await box.close()
    await box.close()
    with pytest.raises(RuntimeError):
        await box.pending(1)

    box = await Outbox.open(path)
    try:
        assert await box.pending(10) == [alerts[0], *alerts[2:]]
        assert await box.acked(a.id for a in alerts) == 4
        assert await box.count() == 0
        assert await box.acked([]) == 0
    finally:
        await box.close()


async def test_full_outbox_drops_oldest_lowest_severity_and_says_so(tmp_path: Path) -> None:
    box = await Outbox.open(tmp_path / "o.sqlite3", capacity=5, clock_ms=lambda: T0 + 99)
    try:
        info1, info2 = alert(Severity.INFO), alert(Severity.INFO)
        warn1, warn2 = alert(Severity.WARNING), alert(Severity.WARNING)
        crit1, crit2, crit3 = (alert(Severity.CRITICAL) for _ in range(3))
        for a in (info1, warn1, crit1, info2, warn2):
            await box.add(a)
        assert box.stats.dropped == 0
        # Full: the new alert and the overflow alert need two places; both infos go.
        await box.add(crit2)
        kept = await box.pending(10)
        assert [a.id for a in kept[:-1]] == [warn1.id, crit1.id, warn2.id, crit2.id]
        overflow = kept[-1]
        assert (overflow.kind, overflow.severity) == (OUTBOX_OVERFLOW, Severity.WARNING)
        assert overflow.detail["dropped"] == 2
        assert box.stats.dropped == 2
        # Next: the oldest warning goes, and one overflow alert (a new id) counts all three.
        await box.add(crit3)
        kept = await box.pending(10)
        assert [a.id for a in kept[:-1]] == [crit1.id, warn2.id, crit2.id, crit3.id]
        assert kept[-1].kind == OUTBOX_OVERFLOW
        assert kept[-1].id != overflow.id
        assert kept[-1].detail["dropped"] == 3
        assert kept[-1].start == overflow.start
        # A new low-severity alert is itself the one dropped when everything else is higher.
        await box.add(alert(Severity.WARNING))
        await box.add(late_info := alert(Severity.INFO))
        kept = await box.pending(10)
        assert late_info.id not in {a.id for a in kept}
        severities = [a.severity for a in kept if a.kind != OUTBOX_OVERFLOW]
        assert severities == [Severity.CRITICAL] * 3 + [Severity.WARNING]  # warn2 went
        assert sum(a.kind == OUTBOX_OVERFLOW for a in kept) == 1
        assert await box.count() == 5
        assert box.stats.dropped == 5
    finally:
        await box.close()


async def test_rows_that_no_longer_decode_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    box = await Outbox.open(path)
    good = alert()
    await box.add(good)
    await box.close()
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO outbox (id, rank, kind, body) VALUES (?, 0, 'smoke', '{\"v\": 9}')",
            (new_alert_id(),),
        )
    conn.close()
    box = await Outbox.open(path)
    try:
        assert await box.pending(10) == [good]
        assert box.stats.corrupt == 1
        assert await box.count() == 1
    finally:
        await box.close()


async def test_outbox_refuses_a_capacity_too_small(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="capacity"):
        await Outbox.open(tmp_path / "o.sqlite3", capacity=1)


CRASHER = """
import asyncio, sys
from pathlib import Path
from agent.edge.alerts import Alert, Severity, new_alert_id
from agent.edge.outbox import Outbox

async def main():
    box = await Outbox.open(Path(sys.argv[1]), capacity=100_000)
    added = []
    while True:
        a = Alert(new_alert_id(), "alarm", "smoke", Severity.CRITICAL, 1, 2, 1.0, -10.0, 3)
        print("adding", a.id, flush=True)
        await box.add(a)
        print("added", a.id, flush=True)
        added.append(a.id)
        if len(added) % 3 == 0:
            gone = added[-2]
            print("acking", gone, flush=True)
            await box.acked([gone])
            print("acked", gone, flush=True)

asyncio.run(main())
"""


def _crash_writers(path: Path, rounds: int) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Run ``CRASHER`` ``rounds`` times on ``path``, each SIGKILLed after 60 adds returned;
    the ids of the operations each started and finished."""
    started: dict[str, set[str]] = {"adding": set(), "acking": set()}
    done: dict[str, set[str]] = {"added": set(), "acked": set()}

    def take(line: str) -> str:
        word, alert_id = line.split()
        (started if word in started else done)[word].add(alert_id)
        return word

    for _ in range(rounds):
        child = subprocess.Popen(
            [sys.executable, "-c", CRASHER, str(path)], cwd=REPO, stdout=subprocess.PIPE
        )
        assert child.stdout is not None
        count = 0
        while count < 60:
            line = child.stdout.readline().decode()
            assert line, "the writer ended early"
            count += take(line) == "added"
        child.send_signal(signal.SIGKILL)
        for line in child.stdout.read().decode().splitlines():  # what it wrote meanwhile
            take(line)
        child.stdout.close()
        assert child.wait() == -signal.SIGKILL
    return started, done


async def test_outbox_survives_kill_9_at_any_point(tmp_path: Path) -> None:
    """Three writers in turn, each SIGKILLed in the middle of adding and acking: every add
    that returned is there unless its ack returned; nothing half-done is."""
    path = tmp_path / "outbox.sqlite3"
    started, done = await asyncio.to_thread(_crash_writers, path, 3)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
    box = await Outbox.open(path)
    try:
        stored = {a.id for a in await box.pending(10_000)}
    finally:
        await box.close()
    assert done["added"] - started["acking"] <= stored
    assert not done["acked"] & stored
    assert stored <= started["adding"] - done["acked"]
    assert len(done["added"]) >= 180
