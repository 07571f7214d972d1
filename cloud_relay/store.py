"""The relay's store: SQLAlchemy Core over any URL (SQLite file by default), Alembic schema.

All database work runs on one worker thread owned by the ``Store``, never on the
event loop. The thread takes jobs in the order they were queued, so writes
issued in order (a call's start before its end) land in order even when the
caller does not wait for them. ``open()`` brings the schema to the newest
Alembic revision before anything else runs.

Writes queued with ``write()`` are committed together: a write waits up to
``linger`` (10 ms) for others, and the thread runs every write waiting next to
each other in one transaction (one commit, one fsync, one wake-up of the event
loop for all of them), which is what lets one relay keep up with thousands of
presence and call events per second. Reads and other ``submit()`` jobs never
wait; they take the writes queued before them along, in order.
A write's own transaction semantics are unchanged: if any write of a batch
raises, the batch is rolled back and each of its writes runs again in its own
transaction, so only the failing one fails.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import (
    Engine,
    and_,
    bindparam,
    case,
    create_engine,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.base import Executable

from agent.edge.alerts import Alert
from cloud_relay.clips import ClipInfo
from cloud_relay.schema import (
    alerts,
    api_tokens,
    calls,
    commands,
    devices,
    pairing_tokens,
    presence_events,
    sessions,
    telemetry,
    users,
    webhook_deliveries,
)

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


@dataclass(frozen=True, slots=True)
class PairingGrant:
    """What a redeemed pairing token was minted for."""

    device: str
    name: str | None
    site: str | None


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """An alert as the relay stored it (``body``: what the device sent, its clip replaced
    by a summary: ``stored_body``)."""

    id: str
    device: str
    detector: str
    kind: str
    severity: str
    start: datetime
    end: datetime
    confidence: float
    level: float
    received: datetime
    body: dict[str, Any]
    has_clip: bool = False
    """An encrypted audio clip is stored with it (``Store.alert_clip``)."""
    acked: datetime | None = None
    """When it was acknowledged (the first time)."""
    acked_by: str | None = None
    """Who acknowledged it: the API token's name."""


AlertCursor = tuple[datetime, str]
"""Where a page of ``Store.alerts`` ended: its last alert's ``received`` and ``id``."""


@dataclass(frozen=True, slots=True)
class ApiTokenRecord:
    """An API token as the store keeps it: never the token itself (``cloud_relay.tokens``)."""

    id: str
    name: str
    created: datetime
    expires: datetime | None
    last_used: datetime | None = None
    revoked: datetime | None = None

    def usable(self, now: datetime) -> bool:
        return self.revoked is None and (self.expires is None or now < self.expires)


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """An alert on its way to a webhook (``cloud_relay.webhooks``), or a dead letter."""

    id: str
    webhook: str
    """The webhook's URL."""
    worker: str
    device: str
    alert_id: str
    alert: dict[str, Any]
    """The alert's wire dict, as POSTed."""
    created: datetime
    tries: int
    """Attempts made so far."""
    reason: str | None = None
    """Dead letters: why the last attempt failed (``HTTP 500``, ``timed out``, ...)."""
    dead_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A dashboard administrator (its password hash stays in the store: ``user_password``)."""

    name: str
    created: datetime
    changed: datetime
    """When its password was last set."""


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A dashboard login (``cloud_relay.sessions``): never the cookie itself."""

    user: str
    csrf: str
    created: datetime
    last_seen: datetime
    expires: datetime
    """The absolute end, whatever the activity."""


@dataclass(frozen=True, slots=True)
class TelemetryRecord:
    """One record a device published on its ``telemetry`` topic."""

    device: str
    at: datetime
    """When the relay received it."""
    event: str
    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PendingToken:
    """A pairing token not yet used (its secret is not kept: ``id`` is its digest)."""

    id: str
    device: str
    name: str | None
    site: str | None
    created: datetime
    expires: datetime


DEVICE_FIELDS = ("name", "site", "group")
"""What an operator may change of a device (``Store.update_device``)."""


class TokenRefused(Exception):
    """A pairing token that cannot be redeemed: ``reason`` is unknown, used or expired."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# The writes that run per presence message and per call event, built once: building a
# statement costs several times more than executing it (SQLAlchemy coercion, cache key).
_dev, _call_row = devices.c, calls.c
_PRESENCE_VALUES = {
    "presence": bindparam("p_state", type_=_dev.presence.type),
    "last_seen": bindparam("p_at", type_=_dev.last_seen.type),
    # Fields the message did not carry (None) keep what the device had.
    "board": func.coalesce(bindparam("p_board", type_=_dev.board.type), _dev.board),
    "version": func.coalesce(bindparam("p_version", type_=_dev.version.type), _dev.version),
    "group": func.coalesce(bindparam("p_group", type_=_dev.group.type), _dev.group),
}
_PRESENCE_CHANGED = (
    update(devices)
    .where(
        _dev.id == bindparam("p_device"),
        or_(_dev.presence.is_(None), _dev.presence != bindparam("p_state")),
    )
    .values(_PRESENCE_VALUES)
)
_PRESENCE_SEEN = update(devices).where(_dev.id == bindparam("p_device")).values(_PRESENCE_VALUES)
_DEVICE_NEW = insert(devices).values(
    id=bindparam("p_device"),
    created=bindparam("p_at", type_=_dev.created.type),
    presence=bindparam("p_state"),
    last_seen=bindparam("p_at", type_=_dev.last_seen.type),
    board=bindparam("p_board"),
    version=bindparam("p_version"),
    group=bindparam("p_group"),
)
_PRESENCE_EVENT = insert(presence_events).values(
    device=bindparam("p_device"),
    state=bindparam("p_state"),
    at=bindparam("p_at", type_=presence_events.c.at.type),
)
_CALL_EXISTS = select(_call_row.id).where(_call_row.id == bindparam("c_id"))
_CALL_NEW = insert(calls).values(
    id=bindparam("c_id"),
    caller=bindparam("c_caller"),
    callee=bindparam("c_callee"),
    mode=bindparam("c_mode"),
    started=bindparam("c_at", type_=_call_row.started.type),
)
_CALL_ANSWERED = (
    update(calls)
    .where(_call_row.id == bindparam("c_id"), _call_row.answered.is_(None))
    .values(answered=bindparam("c_at", type_=_call_row.answered.type))
)
PEER_ENDED = "remote-hangup"
"""The end reason of a side that only saw its peer end the call. Both sides' hang-ups
then reach the relay, and with several workers they are stored in either order."""
_ENDED_AT = bindparam("c_at", type_=_call_row.ended.type)
_EARLIER = or_(_call_row.ended.is_(None), _call_row.ended > _ENDED_AT)
_STORED_PEER = _call_row.end_reason == PEER_ENDED
_NEW_PEER = bindparam("c_reason") == PEER_ENDED
_BETTER_REASON = or_(
    _call_row.ended.is_(None),
    and_(_STORED_PEER, ~_NEW_PEER),
    and_(_EARLIER, or_(_STORED_PEER, ~_NEW_PEER)),
)
_CALL_ENDED = (
    update(calls)
    .where(_call_row.id == bindparam("c_id"), or_(_EARLIER, _BETTER_REASON))
    .values(
        ended=case((_EARLIER, _ENDED_AT), else_=_call_row.ended),
        end_reason=case((_BETTER_REASON, bindparam("c_reason")), else_=_call_row.end_reason),
    )
)
"""Of several ends of a call the store keeps the earliest time, and the reason a side
gave for itself over ``PEER_ENDED``, else the earliest one's."""


@dataclass(slots=True)
class _Job:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    batched: bool
    """A write that may share a transaction with the writes queued next to it."""


_Outcome = tuple[bool, Any]
"""(True, result) or (False, the exception)."""


def _outcome(fn: Callable[[], Any]) -> _Outcome:
    try:
        return True, fn()
    except Exception as exc:
        return False, exc


def _settle(jobs: list[_Job], outcomes: list[_Outcome]) -> None:
    for job, (ok, value) in zip(jobs, outcomes, strict=True):
        if job.future.done():  # cancelled meanwhile
            continue
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(value)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers (dashboard, tests) do not block the writer
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


CONNECT_TIMEOUT_S = 10
STATEMENT_TIMEOUT_MS = 15_000
"""A PostgreSQL statement (a lock wait included) that takes longer fails, logged and
counted by the caller, instead of stalling the store's one thread and every write behind
it. SQLite waits at most its ``busy_timeout``."""


def _connect_args(url: str) -> dict[str, Any]:
    if not url.startswith("postgresql"):
        return {}
    return {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
    }


def migrate(connection: Connection) -> None:
    """Upgrade the schema behind ``connection`` to the newest revision."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


class Store:
    """Devices, presence history, calls and commands; every method runs on the store thread."""

    def __init__(self, url: str, *, linger: float = 0.01) -> None:
        self.url = url
        self.linger = linger
        """Seconds a write waits for others to share its transaction (reads never wait)."""
        self._engine: Engine = create_engine(url, connect_args=_connect_args(url))
        if self._engine.dialect.name == "sqlite":
            event.listen(self._engine, "connect", _sqlite_pragmas)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="relay-store"
        )
        self._closed = False
        self._lock = threading.Lock()
        self._queue: list[_Job] = []
        """Jobs not yet taken by the store thread (guarded by ``_lock``)."""
        self._batch: Connection | None = None
        """The shared transaction while the store thread runs a batch of writes."""
        self._linger: asyncio.TimerHandle | None = None
        """Starts the drain of the writes queued since the queue was last empty."""

    @classmethod
    async def open(cls, url: str, *, linger: float = 0.01) -> Store:
        """Connect and migrate; raises whatever the database raised."""
        store = cls(url, linger=linger)
        try:
            await store.run(store._migrate)
        except BaseException:
            await store.close()
            raise
        return store

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue ``fn(*args)`` on the store thread; the future is its result."""
        return self._enqueue(functools.partial(fn, *args), batched=False)

    def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """Queue the write ``fn(*args, **kwargs)`` (a method of this store); it may be
        committed together with the writes queued next to it (see the module docstring)."""
        return self._enqueue(functools.partial(fn, *args, **kwargs), batched=True)

    def _enqueue(self, fn: Callable[[], T], *, batched: bool) -> asyncio.Future[T]:
        if self._closed:
            raise RuntimeError("store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._queue.append(_Job(fn, future, batched))
            first = len(self._queue) == 1
        if not batched:
            self._start_drain(loop)  # someone waits for it: no lingering
        elif first and self._linger is None:
            # Otherwise a drain is due and takes this one too.
            self._linger = loop.call_later(self.linger, self._start_drain, loop)
        return future

    def _start_drain(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._executor.submit(self._drain, loop)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.submit(fn, *args)

    async def close(self) -> None:
        """Finish queued work, then release connections and the thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        self._start_drain(loop)  # writes still lingering
        await loop.run_in_executor(self._executor, self._engine.dispose)
        self._executor.shutdown(wait=True)

    # --- the store thread ---

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run every queued job in order, writes next to each other in one transaction."""
        with self._lock:
            jobs, self._queue = self._queue, []
        outcomes: list[_Outcome] = []
        start = 0
        while start < len(jobs):
            end = start + 1
            if jobs[start].batched:
                while end < len(jobs) and jobs[end].batched:
                    end += 1
                outcomes += self._run_batch([job.fn for job in jobs[start:end]])
            else:
                outcomes.append(_outcome(jobs[start].fn))
            start = end
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(_settle, jobs, outcomes)

    def _run_batch(self, writes: list[Callable[[], Any]]) -> list[_Outcome]:
        if len(writes) == 1:
            return [_outcome(writes[0])]
        try:
            with self._engine.begin() as conn:
                self._batch = conn
                try:
                    results = [fn() for fn in writes]
                finally:
                    self._batch = None
        except Exception:
            # Rolled back: each again in its own transaction, so only the culprit fails.
            return [_outcome(fn) for fn in writes]
        return [(True, r) for r in results]

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """The batch's transaction while a batch runs, else a new one."""
        if self._batch is not None:
            yield self._batch
        else:
            with self._engine.begin() as conn:
                yield conn

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
        params = {"p_device": device, "p_state": state, "p_at": at, "p_board": board,
                  "p_version": version, "p_group": group}  # fmt: skip
        try:
            return self._record_presence(params)
        except IntegrityError:
            # Another worker created the device between our update and insert.
            return self._record_presence(params)

    def _record_presence(self, params: dict[str, Any]) -> bool:
        with self._transaction() as conn:
            if not conn.execute(_PRESENCE_CHANGED, params).rowcount:
                if conn.execute(_PRESENCE_SEEN, params).rowcount:
                    return False
                conn.execute(_DEVICE_NEW, params)
            conn.execute(_PRESENCE_EVENT, params)
        return True

    def devices(self) -> list[DeviceRecord]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(devices).order_by(devices.c.id)).mappings().all()
        return [_device(r) for r in rows]

    def presence_counts(self) -> dict[str | None, int]:
        """How many devices are in each presence state (None: never reported)."""
        query = select(devices.c.presence, func.count()).group_by(devices.c.presence)
        with self._engine.connect() as conn:
            return {state: count for state, count in conn.execute(query).all()}

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
        params = {"c_id": call, "c_caller": caller, "c_callee": callee, "c_mode": mode, "c_at": at}
        with self._transaction() as conn:
            if conn.execute(_CALL_EXISTS, params).first() is None:
                conn.execute(_CALL_NEW, params)

    def call_answered(self, call: str, at: datetime) -> bool:
        """Record the answer (the first one); False if the store has no such call (yet)."""
        params = {"c_id": call, "c_at": at}
        with self._transaction() as conn:
            return _update_existing(conn, _CALL_ANSWERED, _CALL_EXISTS, params)

    def call_ended(self, call: str, reason: str, at: datetime) -> bool:
        """Record the end (see ``_CALL_ENDED`` for which of several); False if the store
        has no such call (yet)."""
        params = {"c_id": call, "c_at": at, "c_reason": reason}
        with self._transaction() as conn:
            return _update_existing(conn, _CALL_ENDED, _CALL_EXISTS, params)

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
        with self._transaction() as conn:
            conn.execute(
                insert(commands).values(
                    id=cmd_id, device=device, name=name, args=dict(args), sent=at, status="sent"
                )
            )

    def command_finished(
        self, cmd_id: str, status: str, result: Mapping[str, Any] | None = None
    ) -> bool:
        """Record the outcome of a command still ``sent``; False if there is no such command
        (yet: another relay worker may be recording it)."""
        finish = (
            update(commands)
            .where(commands.c.id == cmd_id, commands.c.status == "sent")
            .values(status=status, result=None if result is None else dict(result))
        )
        exists = select(commands.c.id).where(commands.c.id == cmd_id)
        with self._transaction() as conn:
            return _update_existing(conn, finish, exists, {})

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

    def add_pairing_token(
        self,
        digest: str,
        device: str,
        created: datetime,
        expires: datetime,
        *,
        name: str | None = None,
        site: str | None = None,
    ) -> None:
        with self._transaction() as conn:
            conn.execute(
                insert(pairing_tokens).values(
                    digest=digest, device=device, name=name, site=site,
                    created=created, expires=expires,
                )
            )  # fmt: skip

    def redeem_pairing_token(self, digest: str, now: datetime, source: str) -> PairingGrant:
        """Mark the token used (once: the conditional write lets exactly one of any
        concurrent redeemers through) and say what it was for; ``TokenRefused`` if it is
        unknown, used or expired."""
        tok = pairing_tokens.c
        with self._transaction() as conn:
            taken = conn.execute(
                update(pairing_tokens)
                .where(tok.digest == digest, tok.used.is_(None), tok.expires > now)
                .values(used=now, used_by=source[:64])
            ).rowcount
            query = select(pairing_tokens).where(tok.digest == digest)
            row = conn.execute(query).mappings().first()
        if row is None:
            raise TokenRefused("unknown")
        if not taken:
            raise TokenRefused("expired" if row["used"] is None else "used")
        return PairingGrant(row["device"], row["name"], row["site"])

    def device_paired(
        self,
        device: str,
        certificate: str,
        at: datetime,
        *,
        name: str | None = None,
        site: str | None = None,
    ) -> None:
        """Create the device, or give an existing one (a board paired again) its new
        certificate; a name or site not given keeps what the device had."""
        dev = devices.c
        values: dict[str, Any] = {"certificate": certificate}
        if name is not None:
            values["name"] = name
        if site is not None:
            values["site"] = site
        with self._transaction() as conn:
            if not conn.execute(update(devices).where(dev.id == device).values(values)).rowcount:
                conn.execute(insert(devices).values(id=device, created=at, **values))

    def device_certificates(self) -> dict[str, str]:
        """Every paired device's current certificate (PEM), by id."""
        query = select(devices.c.id, devices.c.certificate).where(
            devices.c.certificate.is_not(None)
        )
        with self._engine.connect() as conn:
            return {device: cert for device, cert in conn.execute(query).all()}

    def device_certificate(self, device: str) -> str | None:
        query = select(devices.c.certificate).where(devices.c.id == device)
        with self._engine.connect() as conn:
            value: str | None = conn.execute(query).scalar()
        return value

    def record_alert(
        self, device: str, alert: Alert, received: datetime, clip: ClipInfo | None = None
    ) -> bool:
        """Store the alert ``device`` sent, with its checked ``clip`` (ciphertext) if it had
        one; True if it is new, False if its id is stored already.

        One conditional insert (``ON CONFLICT DO NOTHING``), so resends of an alert and
        relay workers that take copies of it at the same time store it once between
        them. A duplicate is not compared with the stored row: the id is the alert.
        """
        values = {
            "id": alert.id,
            "device": device,
            "detector": alert.detector,
            "kind": alert.kind,
            "severity": alert.severity.value,
            "start": utc_from_ms(alert.start),
            "end": utc_from_ms(alert.end),
            "confidence": alert.confidence,
            "level": alert.level,
            "received": received,
            "body": stored_body(alert, clip),
            "clip": None if clip is None else clip.sealed,
        }
        with self._transaction() as conn:
            dialect = conn.dialect.name
            if dialect in ("sqlite", "postgresql"):
                module = sqlite if dialect == "sqlite" else postgresql
                stmt = module.insert(alerts).values(values).on_conflict_do_nothing()
                # RETURNING, not rowcount: psycopg reports -1 for this statement.
                return conn.execute(stmt.returning(alerts.c.id)).first() is not None
            # Any other database: a savepoint keeps a lost race from spoiling a batch.
            try:
                with conn.begin_nested():
                    conn.execute(insert(alerts).values(values))
            except IntegrityError:
                return False
            return True

    def alerts(
        self,
        *,
        device: str | None = None,
        kind: str | None = None,
        severity: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after: AlertCursor | None = None,
        limit: int = 100,
    ) -> list[AlertRecord]:
        """Stored alerts, newest (by ``received``, then ``id``) first: of one device, kind
        and severity, received at or after ``since`` and before ``until``, past the cursor
        ``after`` (the previous page's last alert), at most ``limit``."""
        a = alerts.c
        query = _ALERT_ROWS.order_by(a.received.desc(), a.id).limit(limit)
        for column, value in ((a.device, device), (a.kind, kind), (a.severity, severity)):
            if value is not None:
                query = query.where(column == value)
        # SQLite keeps times as text without their offset: compare in UTC.
        if since is not None:
            query = query.where(a.received >= since.astimezone(UTC))
        if until is not None:
            query = query.where(a.received < until.astimezone(UTC))
        if after is not None:
            at = after[0].astimezone(UTC)
            query = query.where(or_(a.received < at, and_(a.received == at, a.id > after[1])))
        with self._engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_alert(r) for r in rows]

    def alert_day_counts(
        self, since: datetime, *, device: str | None = None
    ) -> list[tuple[str, str, int]]:
        """(UTC day as YYYY-MM-DD, kind, alerts) received at or after ``since``, by day."""
        a = alerts.c
        day = func.date(a.received)
        query = (
            select(day, a.kind, func.count())
            .where(a.received >= since.astimezone(UTC))
            .group_by(day, a.kind)
            .order_by(day, a.kind)
        )
        if device is not None:
            query = query.where(a.device == device)
        with self._engine.connect() as conn:
            return [(str(d)[:10], k, n) for d, k, n in conn.execute(query).all()]

    def alert(self, alert_id: str) -> AlertRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(_ALERT_ROWS.where(alerts.c.id == alert_id)).mappings().first()
        return None if row is None else _alert(row)

    def ack_alert(self, alert_id: str, by: str, at: datetime) -> AlertRecord | None:
        """Acknowledge the alert (the first acknowledgement stands: acking again changes
        nothing); the alert as stored now, None if there is no such alert."""
        with self._transaction() as conn:
            conn.execute(
                update(alerts)
                .where(alerts.c.id == alert_id, alerts.c.acked.is_(None))
                .values(acked=at, acked_by=by[:200])
            )
            row = conn.execute(_ALERT_ROWS.where(alerts.c.id == alert_id)).mappings().first()
        return None if row is None else _alert(row)

    def alert_clip(self, alert_id: str) -> tuple[str, bytes] | None:
        """(device, sealed clip) of the alert ``alert_id``; None if no such alert has one."""
        query = select(alerts.c.device, alerts.c.clip).where(
            alerts.c.id == alert_id, alerts.c.clip.is_not(None)
        )
        with self._engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else (row[0], bytes(row[1]))

    def add_api_token(self, token: ApiTokenRecord, digest: str) -> None:
        with self._transaction() as conn:
            conn.execute(
                insert(api_tokens).values(
                    id=token.id, digest=digest, name=token.name, created=token.created,
                    expires=token.expires,
                )
            )  # fmt: skip

    def api_token(self, digest: str) -> ApiTokenRecord | None:
        """The token whose digest this is (revoked and expired ones too), or None."""
        query = select(api_tokens).where(api_tokens.c.digest == digest)
        with self._engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _api_token(row)

    def api_tokens(self) -> list[ApiTokenRecord]:
        """Every API token, oldest first."""
        query = select(api_tokens).order_by(api_tokens.c.created, api_tokens.c.id)
        with self._engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_api_token(r) for r in rows]

    def api_token_used(self, token_id: str, at: datetime) -> None:
        with self._transaction() as conn:
            conn.execute(update(api_tokens).where(api_tokens.c.id == token_id).values(last_used=at))

    def revoke_api_token(self, token_id: str, at: datetime) -> bool:
        """Revoke the token (a revoked one keeps its first revocation); False if unknown."""
        t = api_tokens.c
        with self._transaction() as conn:
            conn.execute(
                update(api_tokens).where(t.id == token_id, t.revoked.is_(None)).values(revoked=at)
            )
            return conn.execute(select(t.id).where(t.id == token_id)).first() is not None

    def device(self, device: str) -> DeviceRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(devices).where(devices.c.id == device)).mappings().first()
        return None if row is None else _device(row)

    def update_device(self, device: str, values: Mapping[str, str | None]) -> DeviceRecord | None:
        """Set some of ``DEVICE_FIELDS``; the device as stored now, None if unknown."""
        changes = {k: v for k, v in values.items() if k in DEVICE_FIELDS}
        with self._transaction() as conn:
            if changes:
                conn.execute(update(devices).where(devices.c.id == device).values(changes))
            row = conn.execute(select(devices).where(devices.c.id == device)).mappings().first()
        return None if row is None else _device(row)

    def record_telemetry(
        self, device: str, at: datetime, event: str, record: Mapping[str, Any]
    ) -> None:
        with self._transaction() as conn:
            conn.execute(
                insert(telemetry).values(device=device, at=at, event=event, record=dict(record))
            )

    def telemetry(
        self, device: str, *, since: datetime | None = None, limit: int = 500
    ) -> list[TelemetryRecord]:
        """``device``'s newest ``limit`` records received at or after ``since``, oldest first."""
        t = telemetry.c
        query = select(telemetry).where(t.device == device).order_by(t.id.desc()).limit(limit)
        if since is not None:
            query = query.where(t.at >= since.astimezone(UTC))
        with self._engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_telemetry(r) for r in reversed(rows)]

    def latest_telemetry(self, event: str) -> dict[str, TelemetryRecord]:
        """Each device's newest record of ``event``, by device."""
        t = telemetry.c
        newest = select(func.max(t.id)).where(t.event == event).group_by(t.device)
        query = select(telemetry).where(t.id.in_(newest.scalar_subquery()))
        with self._engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return {r["device"]: _telemetry(r) for r in rows}

    def call_quality(self, call: str, device: str, stats: Mapping[str, Any]) -> bool:
        """Keep ``device``'s media statistics of ``call`` (each side reports its own);
        False if the store has no such call (yet)."""
        with self._transaction() as conn:
            row = conn.execute(select(calls.c.quality).where(calls.c.id == call)).first()
            if row is None:
                return False
            quality = {**(row[0] or {}), device: dict(stats)}
            conn.execute(update(calls).where(calls.c.id == call).values(quality=quality))
        return True

    def recent_calls(
        self,
        *,
        open_only: bool = False,
        device: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[CallRecord]:
        """Calls newest first: only open ones, only ``device``'s (either side), started at
        or after ``since``; at most ``limit``."""
        c = calls.c
        query = select(calls).order_by(c.started.desc(), c.id).limit(limit)
        if open_only:
            query = query.where(c.ended.is_(None))
        if device is not None:
            query = query.where(or_(c.caller == device, c.callee == device))
        if since is not None:
            query = query.where(c.started >= since.astimezone(UTC))
        with self._engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_call(r) for r in rows]

    def pending_pairing_tokens(self, now: datetime) -> list[PendingToken]:
        """Tokens neither used nor expired, oldest first."""
        tok = pairing_tokens.c
        query = (
            select(pairing_tokens)
            .where(tok.used.is_(None), tok.expires > now)
            .order_by(tok.created, tok.digest)
        )
        with self._engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [
            PendingToken(r["digest"], r["device"], r["name"], r["site"],
                         _utc(r["created"]) or r["created"], _utc(r["expires"]) or r["expires"])
            for r in rows
        ]  # fmt: skip

    def cancel_pairing_token(self, digest: str) -> bool:
        """Delete a token not yet used; False if there is none such."""
        tok = pairing_tokens.c
        with self._transaction() as conn:
            query = pairing_tokens.delete().where(tok.digest == digest, tok.used.is_(None))
            return bool(conn.execute(query).rowcount)

    def add_user(self, name: str, password: str, at: datetime) -> bool:
        """Create the user with this password hash; False if the name is taken."""
        try:
            with self._transaction() as conn:
                conn.execute(insert(users).values(name=name, password=password, created=at,
                                                  changed=at))  # fmt: skip
        except IntegrityError:
            return False
        return True

    def users(self) -> list[UserRecord]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(users).order_by(users.c.name)).mappings().all()
        return [
            UserRecord(r["name"], _utc(r["created"]) or r["created"],
                       _utc(r["changed"]) or r["changed"])
            for r in rows
        ]  # fmt: skip

    def user_password(self, name: str) -> str | None:
        """The user's password hash, None if there is no such user."""
        with self._engine.connect() as conn:
            value: str | None = conn.execute(
                select(users.c.password).where(users.c.name == name)
            ).scalar()
        return value

    def set_password(self, name: str, password: str, at: datetime) -> bool:
        """Replace the user's password hash and end its sessions; False if no such user."""
        with self._transaction() as conn:
            conn.execute(sessions.delete().where(sessions.c.user == name))
            query = update(users).where(users.c.name == name)
            return bool(conn.execute(query.values(password=password, changed=at)).rowcount)

    def remove_user(self, name: str) -> bool:
        """Delete the user and its sessions; False if no such user."""
        with self._transaction() as conn:
            conn.execute(sessions.delete().where(sessions.c.user == name))
            return bool(conn.execute(users.delete().where(users.c.name == name)).rowcount)

    def add_session(self, digest: str, session: SessionRecord) -> None:
        with self._transaction() as conn:
            conn.execute(
                insert(sessions).values(
                    digest=digest, user=session.user, csrf=session.csrf,
                    created=session.created, last_seen=session.last_seen,
                    expires=session.expires,
                )
            )  # fmt: skip

    def session(self, digest: str) -> SessionRecord | None:
        with self._engine.connect() as conn:
            row = (
                conn.execute(select(sessions).where(sessions.c.digest == digest)).mappings().first()
            )
        if row is None:
            return None
        return SessionRecord(row["user"], row["csrf"], _utc(row["created"]) or row["created"],
                             _utc(row["last_seen"]) or row["last_seen"],
                             _utc(row["expires"]) or row["expires"])  # fmt: skip

    def session_seen(self, digest: str, at: datetime) -> None:
        with self._transaction() as conn:
            conn.execute(update(sessions).where(sessions.c.digest == digest).values(last_seen=at))

    def end_session(self, digest: str) -> bool:
        with self._transaction() as conn:
            query = sessions.delete().where(sessions.c.digest == digest)
            return bool(conn.execute(query).rowcount)

    def end_stale_sessions(self, now: datetime, idle_before: datetime) -> int:
        """Delete sessions past their end or idle since before ``idle_before``; how many."""
        s = sessions.c
        query = sessions.delete().where(or_(s.expires <= now, s.last_seen < idle_before))
        with self._transaction() as conn:
            return int(conn.execute(query).rowcount)

    def webhook_queued(self, d: DeliveryRecord) -> None:
        with self._transaction() as conn:
            conn.execute(
                insert(webhook_deliveries).values(
                    id=d.id, webhook=d.webhook, worker=d.worker, device=d.device,
                    alert_id=d.alert_id, alert=d.alert, created=d.created, tries=d.tries,
                    state="pending",
                )
            )  # fmt: skip

    def webhook_tried(self, delivery: str, tries: int) -> None:
        """Count the attempts, so that a restart does not give a delivery a fresh set."""
        wd = webhook_deliveries.c
        with self._transaction() as conn:
            conn.execute(
                update(webhook_deliveries)
                .where(wd.id == delivery, wd.state == "pending")
                .values(tries=tries)
            )

    def webhook_delivered(self, delivery: str) -> None:
        wd = webhook_deliveries.c
        with self._transaction() as conn:
            conn.execute(
                webhook_deliveries.delete().where(wd.id == delivery, wd.state == "pending")
            )

    def dead_letter(self, delivery: str, tries: int, reason: str, at: datetime) -> None:
        """Give the delivery up: it stays in the table as a dead letter."""
        wd = webhook_deliveries.c
        with self._transaction() as conn:
            conn.execute(
                update(webhook_deliveries)
                .where(wd.id == delivery)
                .values(state="dead", tries=tries, reason=reason[:300], dead_at=at)
            )

    def webhook_pending(self, worker: str) -> list[DeliveryRecord]:
        """``worker``'s deliveries not yet done, oldest first."""
        wd = webhook_deliveries.c
        query = (
            select(webhook_deliveries)
            .where(wd.state == "pending", wd.worker == worker)
            .order_by(wd.created, wd.id)
        )
        with self._engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_delivery(r) for r in rows]

    def retry_dead_letters(self, ids: Sequence[str] = ()) -> int:
        """Send dead letters (``ids``, or every one) again from their first try; their
        worker takes them up at its next start or SIGHUP (``take_retries``). How many."""
        wd = webhook_deliveries.c
        query = update(webhook_deliveries).where(wd.state == "dead")
        if ids:
            query = query.where(wd.id.in_(list(ids)))
        values = {"state": "retry", "tries": 0, "reason": None, "dead_at": None}
        with self._transaction() as conn:
            return int(conn.execute(query.values(values)).rowcount)

    def take_retries(self, worker: str) -> list[DeliveryRecord]:
        """``worker``'s deliveries sent again by an operator, now pending, oldest first."""
        wd = webhook_deliveries.c
        mine = (wd.state == "retry", wd.worker == worker)
        with self._transaction() as conn:
            query = select(webhook_deliveries).where(*mine).order_by(wd.created, wd.id)
            rows = conn.execute(query).mappings().all()
            ids = [r["id"] for r in rows]
            if ids:
                conn.execute(
                    update(webhook_deliveries).where(wd.id.in_(ids)).values(state="pending")
                )
        return [_delivery(r) for r in rows]

    def dead_letters(self, *, limit: int = 100) -> list[DeliveryRecord]:
        """Deliveries given up on, newest first."""
        wd = webhook_deliveries.c
        query = (
            select(webhook_deliveries)
            .where(wd.state == "dead")
            .order_by(wd.dead_at.desc(), wd.id)
            .limit(limit)
        )
        with self._engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_delivery(r) for r in rows]


def _delivery(r: RowMapping) -> DeliveryRecord:
    return DeliveryRecord(
        id=r["id"],
        webhook=r["webhook"],
        worker=r["worker"],
        device=r["device"],
        alert_id=r["alert_id"],
        alert=r["alert"],
        created=_utc(r["created"]) or r["created"],
        tries=r["tries"],
        reason=r["reason"],
        dead_at=_utc(r["dead_at"]),
    )


def stored_body(alert: Alert, clip: ClipInfo | None) -> dict[str, Any]:
    """The alert's wire dict as stored, listed and sent to webhooks: a clip is there as
    its summary (size, seconds), never as audio; a clip that was dropped is not there."""
    body = alert.to_dict()
    if clip is None:
        body.pop("clip", None)
    else:
        body["clip"] = clip.summary()
    return body


_ALERT_ROWS = select(
    *(c for c in alerts.c if c.name != "clip"), alerts.c.clip.is_not(None).label("has_clip")
)
"""Alerts without their clips (only whether they have one)."""


def _alert(r: RowMapping) -> AlertRecord:
    return AlertRecord(
        id=r["id"],
        device=r["device"],
        detector=r["detector"],
        kind=r["kind"],
        severity=r["severity"],
        start=_utc(r["start"]) or r["start"],
        end=_utc(r["end"]) or r["end"],
        confidence=r["confidence"],
        level=r["level"],
        received=_utc(r["received"]) or r["received"],
        body=r["body"],
        has_clip=bool(r["has_clip"]),
        acked=_utc(r["acked"]),
        acked_by=r["acked_by"],
    )


def _api_token(r: RowMapping) -> ApiTokenRecord:
    return ApiTokenRecord(
        id=r["id"],
        name=r["name"],
        created=_utc(r["created"]) or r["created"],
        expires=_utc(r["expires"]),
        last_used=_utc(r["last_used"]),
        revoked=_utc(r["revoked"]),
    )


def _update_existing(
    conn: Connection, change: Executable, exists: Executable, params: Mapping[str, Any]
) -> bool:
    """Run ``change`` on a row; False if ``exists`` finds no such row (yet).

    PostgreSQL's statements each see what was committed when they began: a row another
    worker commits after ``change`` ran and before ``exists`` looks is changed then, not
    taken for a row that needed no change (that lost a call's end under load)."""
    if conn.execute(change, params).rowcount:
        return True
    if conn.execute(exists, params).first() is None:
        return False
    conn.execute(change, params)
    return True


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


def _telemetry(r: RowMapping) -> TelemetryRecord:
    return TelemetryRecord(r["device"], _utc(r["at"]) or r["at"], r["event"], r["record"])


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
