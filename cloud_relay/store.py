"""The relay's store: SQLAlchemy Core over any URL (SQLite file by default), Alembic schema.

All database work runs on one worker thread owned by the ``Store``, never on the
event loop. The thread takes jobs in the order they were submitted, so writes
issued in order (a call's start before its end) land in order even when the
caller does not wait for them. ``open()`` brings the schema to the newest
Alembic revision before anything else runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event, insert, inspect, or_, select, update
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.exc import IntegrityError

from cloud_relay.schema import calls, commands, devices, presence_events

logger = logging.getLogger(__name__)

T = TypeVar("T")
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def utc_from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    id: str
    name: str | None
    site: str | None
    group: str | None
    created: datetime
    last_seen: datetime | None
    presence: str | None
    board: str | None
    version: str | None


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    device: str
    state: str
    at: datetime


@dataclass(frozen=True, slots=True)
class CallRecord:
    id: str
    caller: str
    callee: str
    mode: str
    started: datetime
    answered: datetime | None
    ended: datetime | None
    end_reason: str | None
    quality: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class CommandRecord:
    id: str
    device: str
    name: str
    args: dict[str, Any]
    sent: datetime
    result: dict[str, Any] | None
    status: str


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers (dashboard, tests) do not block the writer
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def migrate(connection: Connection) -> None:
    """Upgrade the schema behind ``connection`` to the newest revision."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


class Store:
    """Devices, presence history, calls and commands; every method runs on the store thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: Engine = create_engine(url)
        if self._engine.dialect.name == "sqlite":
            event.listen(self._engine, "connect", _sqlite_pragmas)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="relay-store"
        )
        self._closed = False

    @classmethod
    async def open(cls, url: str) -> Store:
        """Connect and migrate; raises whatever the database raised."""
        store = cls(url)
        try:
            await store.run(store._migrate)
        except BaseException:
            await store.close()
            raise
        return store

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue ``fn(*args)`` on the store thread; the future is its result."""
        if self._closed:
            raise RuntimeError("store is closed")
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.submit(fn, *args)

    async def close(self) -> None:
        """Finish queued work, then release connections and the thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._engine.dispose)
        self._executor.shutdown(wait=True)

    # --- sync operations (store thread) ---

    def _migrate(self) -> None:
        with self._engine.begin() as conn:
            migrate(conn)
        logger.info("store ready: %s", self._engine.url.render_as_string(hide_password=True))

    def table_names(self) -> list[str]:
        return sorted(inspect(self._engine).get_table_names())

    def record_presence(
        self,
        device: str,
        state: str,
        at: datetime,
        *,
        board: str | None = None,
        version: str | None = None,
        group: str | None = None,
    ) -> bool:
        """Create or update the device with its presence; True (and a history row) if the
        state changed.

        The store decides what changed, in one transaction whose first statement is a
        conditional write, so relay workers that all see the same presence message add
        one history row between them, and a restarted relay re-reading retained
        presence adds none.
        """
        values: dict[str, Any] = {"presence": state, "last_seen": at}
        if board is not None:
            values["board"] = board
        if version is not None:
            values["version"] = version
        if group is not None:
            values["group"] = group
        try:
            return self._record_presence(device, state, at, values)
        except IntegrityError:
            # Another worker created the device between our update and insert.
            return self._record_presence(device, state, at, values)

    def _record_presence(
        self, device: str, state: str, at: datetime, values: dict[str, Any]
    ) -> bool:
        row = devices.c
        with self._engine.begin() as conn:
            changed = conn.execute(
                update(devices)
                .where(row.id == device, or_(row.presence.is_(None), row.presence != state))
                .values(**values)
            ).rowcount
            if not changed:
                if conn.execute(update(devices).where(row.id == device).values(**values)).rowcount:
                    return False
                conn.execute(insert(devices).values(id=device, created=at, **values))
            conn.execute(insert(presence_events).values(device=device, state=state, at=at))
        return True

    def devices(self) -> list[DeviceRecord]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(devices).order_by(devices.c.id)).mappings().all()
        return [_device(r) for r in rows]

    def presence_history(self, device: str) -> list[PresenceEvent]:
        query = (
            select(presence_events)
            .where(presence_events.c.device == device)
            .order_by(presence_events.c.id)
        )
        with self._engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [PresenceEvent(r["device"], r["state"], _utc(r["at"]) or r["at"]) for r in rows]

    def call_started(self, call: str, caller: str, callee: str, mode: str, at: datetime) -> None:
        with self._engine.begin() as conn:
            if conn.execute(select(calls.c.id).where(calls.c.id == call)).first() is None:
                conn.execute(
                    insert(calls).values(
                        id=call, caller=caller, callee=callee, mode=mode, started=at
                    )
                )

    def call_answered(self, call: str, at: datetime) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                update(calls)
                .where(calls.c.id == call, calls.c.answered.is_(None))
                .values(answered=at)
            )

    def call_ended(
        self, call: str, reason: str, at: datetime, quality: Mapping[str, Any] | None = None
    ) -> None:
        values: dict[str, Any] = {"ended": at, "end_reason": reason}
        if quality is not None:
            values["quality"] = dict(quality)
        with self._engine.begin() as conn:
            conn.execute(
                update(calls).where(calls.c.id == call, calls.c.ended.is_(None)).values(**values)
            )

    def calls(self, *, open_only: bool = False) -> list[CallRecord]:
        query = select(calls).order_by(calls.c.started, calls.c.id)
        if open_only:
            query = query.where(calls.c.ended.is_(None))
        with self._engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_call(r) for r in rows]

    def command_sent(
        self, cmd_id: str, device: str, name: str, args: Mapping[str, Any], at: datetime
    ) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                insert(commands).values(
                    id=cmd_id, device=device, name=name, args=dict(args), sent=at, status="sent"
                )
            )

    def command_finished(
        self, cmd_id: str, status: str, result: Mapping[str, Any] | None = None
    ) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                update(commands)
                .where(commands.c.id == cmd_id)
                .values(status=status, result=None if result is None else dict(result))
            )

    def commands(self) -> list[CommandRecord]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(commands).order_by(commands.c.sent)).mappings().all()
        return [
            CommandRecord(
                id=r["id"],
                device=r["device"],
                name=r["name"],
                args=r["args"],
                sent=_utc(r["sent"]) or r["sent"],
                result=r["result"],
                status=r["status"],
            )
            for r in rows
        ]


def _device(r: RowMapping) -> DeviceRecord:
    return DeviceRecord(
        id=r["id"],
        name=r["name"],
        site=r["site"],
        group=r["group"],
        created=_utc(r["created"]) or r["created"],
        last_seen=_utc(r["last_seen"]),
        presence=r["presence"],
        board=r["board"],
        version=r["version"],
    )


def _call(r: RowMapping) -> CallRecord:
    return CallRecord(
        id=r["id"],
        caller=r["caller"],
        callee=r["callee"],
        mode=r["mode"],
        started=_utc(r["started"]) or r["started"],
        answered=_utc(r["answered"]),
        ended=_utc(r["ended"]),
        end_reason=r["end_reason"],
        quality=r["quality"],
    )
