"""The board's alert outbox: a SQLite file in the state directory holding every unacked alert.

An alert is written here (committed, fsynced) before it is ever sent, and deleted
only when the relay acknowledges that it stored it, so a broker or relay outage,
an agent restart, a ``kill -9`` or a power cut at any point loses nothing: the
worst case is that an alert the relay already stored is sent again, and the relay
drops the duplicate by its id.

Each operation is one SQLite transaction. The database is in WAL mode with
``synchronous=FULL``: NORMAL survives a killed process but may lose the last
commits on power loss, and alerts are rare enough that one fsync each costs
nothing. All SQLite work runs on the outbox's own thread, never on the event
loop (an fsync on an SD card can take tens of milliseconds).

The outbox is bounded. When an alert would make it hold more than ``capacity``,
the lowest-severity alerts go first, oldest first among equals (the new alert
itself may be the one dropped), and an ``outbox_overflow`` alert (severity
warning) says how many were dropped since when. There is at most one such alert
pending: a new drop replaces it with one carrying the running total, so the
relay may hold several with growing counts for one episode; the largest is
right. The overflow alert itself is never dropped for room.

An alert that waits for its audio clip (``agent.edge.clip``) is added *held*: stored
at once, so that a crash while the clip is being made loses the clip, not the alert,
but not sent until ``release`` gives it its final form (with or without the clip).
Each alert is thus sent in one form only, which keeps delivery exactly once. Held
alerts are released as they are when the outbox is opened (their clip died with the
process that was making it), and they may be dropped for room like any other.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, TypeVar

from agent.edge.alerts import OUTBOX_OVERFLOW, Alert, AlertError, Severity, new_alert_id

logger = logging.getLogger(__name__)

T = TypeVar("T")

OUTBOX_FILE: Final = "alerts-outbox.sqlite3"
"""The outbox's file name in the state directory."""

DEFAULT_CAPACITY: Final = 10_000
"""Alerts kept at most; a few MB of SQLite."""

OVERFLOW_DETECTOR: Final = "outbox"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    rank INTEGER NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    held INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_drop_order ON outbox (rank, seq);
"""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class OutboxStats:
    """Counters since the outbox was opened."""

    added: int = 0
    acked: int = 0
    """Alerts deleted because the relay acknowledged them."""
    dropped: int = 0
    """Alerts dropped because the outbox was full."""
    overflow_alerts: int = 0
    """``outbox_overflow`` alerts raised (each replacing the previous pending one)."""
    corrupt: int = 0
    """Rows that no longer decoded as alerts, deleted (a disk fault or a codec change)."""
    released_at_open: int = 0
    """Held alerts found when the outbox was opened, released without their clip."""


class Outbox:
    """The SQLite outbox; ``await Outbox.open(path)``, then ``close()``."""

    def __init__(self, db: _Db, executor: concurrent.futures.ThreadPoolExecutor) -> None:
        """Use ``open``."""
        self._db = db
        self._executor = executor
        self._closed = False
        # Loop times the calls in the (one-thread, first-in first-out) executor began.
        self._in_flight: collections.deque[float] = collections.deque()

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        capacity: int = DEFAULT_CAPACITY,
        clock_ms: Callable[[], int] = _now_ms,
    ) -> Outbox:
        """Open (or create) the outbox file ``path``; ``capacity`` >= 2 alerts (one of them
        may be the overflow alert)."""
        if capacity < 2:
            raise ValueError(f"outbox capacity must be at least 2, not {capacity}")
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="alert-outbox")
        loop = asyncio.get_running_loop()
        try:
            db = await loop.run_in_executor(executor, _Db, path, capacity, clock_ms)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(db, executor)

    @property
    def capacity(self) -> int:
        return self._db.capacity

    @property
    def stats(self) -> OutboxStats:
        """A snapshot of the counters."""
        return replace(self._db.stats)

    async def add(self, alert: Alert, *, held: bool = False) -> str:
        """Store ``alert`` durably and return its id; adding the same id again is a no-op.

        ``held``: not sent until ``release``. May drop other (or this) alerts for room:
        see the module docstring.
        """
        return await self._run(self._db.add, alert, held)

    async def release(self, alert: Alert) -> bool:
        """Replace the held alert of ``alert.id`` by ``alert`` and let it be sent; False if
        it is no longer held here (dropped for room, or released already)."""
        return await self._run(self._db.release, alert)

    async def pending(self, limit: int) -> list[Alert]:
        """Up to ``limit`` unacked alerts, oldest first."""
        return await self._run(self._db.pending, limit)

    async def acked(self, ids: Iterable[str]) -> int:
        """Delete the alerts the relay acknowledged; how many were here (unknown ids are fine:
        dropped meanwhile, or acked twice)."""
        return await self._run(self._db.acked, tuple(ids))

    async def count(self) -> int:
        """How many alerts wait for an ack."""
        return await self._run(self._db.count)

    async def close(self) -> None:
        """Close the database and stop the thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._db.close)
        finally:
            self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RuntimeError("outbox is closed")
        loop = asyncio.get_running_loop()
        self._in_flight.append(loop.time())
        try:
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args))
        finally:
            self._in_flight.popleft()

    def health(self, stall_s: float) -> str | None:
        """What is wrong (for the service watchdog): a database call that has not
        returned for ``stall_s`` (a dead SD card, a lock nobody releases)."""
        if not self._in_flight:
            return None
        waited = asyncio.get_running_loop().time() - self._in_flight[0]
        return f"a database call has not returned for {waited:.0f} s" if waited > stall_s else None


class _Db:
    """The synchronous outbox; every method runs on the outbox thread."""

    def __init__(self, path: Path, capacity: int, clock_ms: Callable[[], int]) -> None:
        self.capacity = capacity
        self.stats = OutboxStats()
        self._clock_ms = clock_ms
        path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are the explicit BEGIN IMMEDIATE ... COMMIT below.
        self._conn = sqlite3.connect(path, isolation_level=None)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA busy_timeout=5000")
            self._conn.executescript(_SCHEMA)
            columns = {row[1] for row in self._conn.execute("PRAGMA table_info(outbox)")}
            if "held" not in columns:  # an outbox from before clips
                self._conn.execute("ALTER TABLE outbox ADD COLUMN held INTEGER NOT NULL DEFAULT 0")
            # Whoever was making their clips is gone: send them as they are.
            self.stats.released_at_open = self._conn.execute(
                "UPDATE outbox SET held = 0 WHERE held != 0"
            ).rowcount
        except BaseException:
            self._conn.close()
            raise
        logger.info("alert outbox %s: %d pending (%d released without their clip)", path,
                    self.count(), self.stats.released_at_open)  # fmt: skip

    def close(self) -> None:
        self._conn.close()

    def _transaction(self, fn: Callable[[], T]) -> T:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn()
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        return result

    def count(self) -> int:
        row = self._conn.execute("SELECT count(*) FROM outbox").fetchone()
        return int(row[0])

    def add(self, alert: Alert, held: bool) -> str:
        body = alert.to_json().decode()
        dropped = self._transaction(functools.partial(self._add, alert, body, held))
        if dropped:
            logger.warning(
                "alert outbox full (%d): dropped %d alert(s) of the lowest severity",
                self.capacity,
                dropped,
            )
        return alert.id

    def release(self, alert: Alert) -> bool:
        body = alert.to_json().decode()

        def update() -> bool:
            cur = self._conn.execute(
                "UPDATE outbox SET body = ?, held = 0 WHERE id = ? AND held != 0",
                (body, alert.id),
            )
            return cur.rowcount > 0

        return self._transaction(update)

    def _add(self, alert: Alert, body: str, held: bool) -> int:
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO outbox (id, rank, kind, body, held) VALUES (?, ?, ?, ?, ?)",
            (alert.id, alert.severity.rank, alert.kind, body, int(held)),
        )
        if cur.rowcount:
            self.stats.added += 1
        excess = self.count() - self.capacity
        if excess <= 0:
            return 0
        previous = self._conn.execute(
            "SELECT seq, body FROM outbox WHERE kind = ? ORDER BY seq DESC LIMIT 1",
            (OUTBOX_OVERFLOW,),
        ).fetchone()
        if previous is None:
            excess += 1  # room for the overflow alert
        victims = [
            seq
            for (seq,) in self._conn.execute(
                "SELECT seq FROM outbox WHERE kind != ? ORDER BY rank, seq LIMIT ?",
                (OUTBOX_OVERFLOW, excess),
            )
        ]
        self._conn.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in victims])
        now = self._clock_ms()
        total, since = len(victims), now
        if previous is not None:
            self._conn.execute("DELETE FROM outbox WHERE seq = ?", (previous[0],))
            earlier = _overflow_counts(previous[1])
            if earlier is not None:
                total += earlier[0]
                since = min(since, earlier[1])
        overflow = Alert(
            id=new_alert_id(),
            detector=OVERFLOW_DETECTOR,
            kind=OUTBOX_OVERFLOW,
            severity=Severity.WARNING,
            start=since,
            end=max(since, now),
            confidence=1.0,
            level=0.0,
            created=now,
            detail={"dropped": total, "capacity": self.capacity},
        )
        self._conn.execute(
            "INSERT INTO outbox (id, rank, kind, body) VALUES (?, ?, ?, ?)",
            (overflow.id, overflow.severity.rank, overflow.kind, overflow.to_json().decode()),
        )
        self.stats.dropped += len(victims)
        self.stats.overflow_alerts += 1
        return len(victims)

    def pending(self, limit: int) -> list[Alert]:
        rows = self._conn.execute(
            "SELECT seq, body FROM outbox WHERE held = 0 ORDER BY seq LIMIT ?", (max(0, limit),)
        ).fetchall()
        alerts: list[Alert] = []
        bad: list[int] = []
        for seq, body in rows:
            try:
                alerts.append(Alert.from_dict(json.loads(body)))
            except (AlertError, ValueError) as exc:
                logger.error("alert outbox: row %d is no alert (deleted): %s", seq, exc)
                bad.append(seq)
        if bad:
            self._transaction(
                lambda: self._conn.executemany(
                    "DELETE FROM outbox WHERE seq = ?", [(s,) for s in bad]
                )
            )
            self.stats.corrupt += len(bad)
        return alerts

    def acked(self, ids: tuple[str, ...]) -> int:
        if not ids:
            return 0

        def delete() -> int:
            cur = self._conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
            return cur.rowcount

        removed = self._transaction(delete)
        self.stats.acked += removed
        return removed


def _overflow_counts(body: str) -> tuple[int, int] | None:
    """(dropped, since ms) of a stored overflow alert; None if it does not say."""
    try:
        alert = Alert.from_dict(json.loads(body))
    except (AlertError, ValueError):
        return None
    dropped = alert.detail.get("dropped")
    if isinstance(dropped, bool) or not isinstance(dropped, int):
        return None
    return dropped, alert.start


__all__ = ["DEFAULT_CAPACITY", "OUTBOX_FILE", "Outbox", "OutboxStats"]
