"""The board of the outbox benchmark (``tools.bench.outbox``), one process of it.

``python -m tools.bench.outbox_board STATE_DIR`` reads ``STATE_DIR/board.json``
(``BoardSettings``) and raises alerts at a steady rate into the agent's own ``Outbox``,
sent by the agent's own ``AlertUplink`` over the agent's own ``MqttSession``; acks from
the session go to ``uplink.on_ack``, as the agent's call runtime hands them over. The
benchmark SIGKILLs this process at random moments and starts it again on the same
state directory.

Alert ``seq`` is a function of the run tag and ``seq`` alone (``alert_for``; its id a
hash of both), so an alert whose ``add`` a kill interrupted is added again after the
restart as the very same alert, not as a new one.

``progress`` holds the next sequence number to add and the outbox's dropped count so
far, written over in one ``pwrite`` after each add has returned (a kill comes before or
after it, never inside). It is not fsynced: the benchmark kills processes, not the
power; the outbox has its own fsync. ``status.json`` is rewritten every ``STATUS_S``
and at exit: this process's counters and how many alerts wait in the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from agent.edge.alerts import Alert, Severity
from agent.edge.outbox import OUTBOX_FILE, Outbox
from agent.edge.uplink import AlertUplink, UplinkConfig
from agent.service.files import write_atomic
from agent.signaling.mqtt import ConnectFailed, MqttConfig, MqttSession, SessionClosed
from agent.signaling.topics import Kind

logger = logging.getLogger(__name__)

SETTINGS_FILE: Final = "board.json"
PROGRESS_FILE: Final = "progress"
STATUS_FILE: Final = "status.json"
STATUS_S: Final = 0.25
"""Seconds between status files."""
CONNECT_RETRY_S: Final = 0.2
SEVERITIES: Final = (Severity.INFO, Severity.WARNING, Severity.CRITICAL)
UPLINK_COUNTERS: Final = ("sent", "resent", "acked", "publish_failed")
"""The ``UplinkStats`` counters in the status."""


@dataclass(frozen=True, slots=True)
class BoardSettings:
    """What the benchmark tells each board process (``board.json``)."""

    device: str
    """Device id: the MQTT client id and topics."""
    port: int
    """The broker's port on 127.0.0.1."""
    alerts: int
    """Sequence numbers 0 to ``alerts - 1`` are added."""
    rate: float
    """Alerts added per second."""
    run: str
    """Tag of this run, in every alert's id and ``detail``."""
    t0_ms: int
    """Start time of alert 0 (ms since the epoch); alert ``seq`` starts ``seq`` ms later."""
    capacity: int
    """The outbox's capacity."""
    ack_timeout: float
    """The uplink's ``ack_timeout``."""

    def __post_init__(self) -> None:
        if self.alerts < 1 or self.rate <= 0 or self.ack_timeout <= 0:
            raise ValueError(f"bad board settings: {self}")

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> BoardSettings:
        """Raises ``TypeError``/``ValueError`` for anything but what ``to_json`` writes."""
        fields: dict[str, Any] = json.loads(data)
        return cls(**fields)


@dataclass(frozen=True, slots=True)
class Progress:
    """The board's durable progress over all its processes."""

    next: int = 0
    """The next sequence number to add: every smaller one was durably added."""
    dropped: int = 0
    """Alerts the outbox dropped for room, over all processes."""

    def encode(self) -> bytes:
        return b"%12d %12d\n" % (self.next, self.dropped)  # fixed width: one write

    @classmethod
    def read(cls, path: Path) -> Progress:
        try:
            fields = path.read_bytes().split()
        except FileNotFoundError:
            return cls()
        if not fields:  # killed between creating the file and its first write
            return cls()
        next_, dropped = (int(n) for n in fields)
        return cls(next_, dropped)


def alert_for(run: str, seq: int, t0_ms: int) -> Alert:
    """Alert ``seq`` of run ``run``: the same every time it is made."""
    at = t0_ms + seq
    return Alert(
        id=hashlib.blake2b(f"{run}/{seq}".encode(), digest_size=16).hexdigest(),
        detector="bench",
        kind="chaos",
        severity=SEVERITIES[seq % len(SEVERITIES)],
        start=at,
        end=at + 500,
        confidence=1.0,
        level=-20.0,
        created=at + 600,
        detail={"run": run, "seq": seq},
    )


def mqtt_config(device: str, port: int) -> MqttConfig:
    """The agent's session with the timers the lab agents use (``tools.lab.fleet``)."""
    return MqttConfig(
        client_id=device, host="127.0.0.1", port=port, keepalive=5, backoff_min=0.05,
        backoff_max=0.5, connect_timeout=5.0, publish_timeout=5.0, misc_interval=0.2,
    )  # fmt: skip


def read_status(state_dir: Path) -> dict[str, Any] | None:
    """The last status a board process wrote, None before the first."""
    try:
        status: dict[str, Any] = json.loads((state_dir / STATUS_FILE).read_bytes())
    except FileNotFoundError:
        return None
    return status


class Board:
    """Adds the alerts, hands acks to the uplink, writes the status; ``start()``, then
    ``close()``, which leaves the session, uplink and outbox to their owner."""

    def __init__(
        self, settings: BoardSettings, state_dir: Path, outbox: Outbox, session: MqttSession,
        uplink: AlertUplink,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.state_dir = state_dir
        self._outbox = outbox
        self._session = session
        self._uplink = uplink
        self._progress = Progress.read(state_dir / PROGRESS_FILE)
        self._dropped_before = self._progress.dropped
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._add_all(), name="board-add"),
            loop.create_task(self._pump_acks(), name="board-acks"),
            loop.create_task(self._report(), name="board-status"),
        ]

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if (current := asyncio.current_task()) is not None and current.cancelling():
            raise asyncio.CancelledError

    async def _add_all(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        first, start = self._progress.next, loop.time()
        if first < s.alerts:
            logger.info("adding alerts %d to %d", first, s.alerts - 1)
        fd = os.open(self.state_dir / PROGRESS_FILE, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for seq in range(first, s.alerts):
                if (delay := start + (seq - first) / s.rate - loop.time()) > 0:
                    await asyncio.sleep(delay)
                await self._uplink.submit(alert_for(s.run, seq, s.t0_ms))
                dropped = self._dropped_before + self._outbox.stats.dropped
                self._progress = Progress(seq + 1, dropped)
                # A page-cache write of a few bytes: not worth a thread hop.
                os.pwrite(fd, self._progress.encode(), 0)
        finally:
            os.close(fd)
        logger.info("all %d alerts added", s.alerts)

    async def _pump_acks(self) -> None:
        """The call runtime's part: ``alert/ack`` payloads to the uplink."""
        while True:
            try:
                msg = await self._session.recv()
            except SessionClosed:
                return
            if msg.kind is Kind.ALERT_ACK:
                self._uplink.on_ack(msg.payload)

    async def _report(self) -> None:
        while True:
            await self.write_status()
            await asyncio.sleep(STATUS_S)

    async def write_status(self) -> None:
        uplink = self._uplink.stats
        status = {
            "pid": os.getpid(),
            "next": self._progress.next,
            "pending": await self._outbox.count(),
            "uplink": {name: getattr(uplink, name) for name in UPLINK_COUNTERS},
        }
        data = json.dumps(status).encode()
        await asyncio.to_thread(write_atomic, self.state_dir / STATUS_FILE, data, 0o644)


async def connect(session: MqttSession, stop: asyncio.Event) -> bool:
    """Start the session, retrying until connected (True) or asked to stop (False)."""
    while not stop.is_set():
        try:
            await session.start()
            return True
        except ConnectFailed as exc:
            logger.warning("%s; retrying", exc)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CONNECT_RETRY_S):
                await stop.wait()
    return False


async def run_board(state_dir: Path) -> None:
    """One board process, until SIGTERM/SIGINT."""
    settings = BoardSettings.from_json((state_dir / SETTINGS_FILE).read_bytes())
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Closed in reverse: the board's tasks, the uplink, the session; the last status is
    # written with the outbox still open.
    async with contextlib.AsyncExitStack() as stack:
        outbox = await Outbox.open(state_dir / OUTBOX_FILE, capacity=settings.capacity)
        stack.push_async_callback(outbox.close)
        session = MqttSession(mqtt_config(settings.device, settings.port), {"state": "online"})
        uplink = AlertUplink(session, outbox, UplinkConfig(ack_timeout=settings.ack_timeout))
        board = Board(settings, state_dir, outbox, session, uplink)
        stack.push_async_callback(board.write_status)
        stack.push_async_callback(session.close)
        if not await connect(session, stop):
            return
        uplink.start()
        stack.push_async_callback(uplink.close)
        board.start()
        stack.push_async_callback(board.close)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m tools.bench.outbox_board STATE_DIR")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(run_board(Path(args[0])))


if __name__ == "__main__":
    main()
