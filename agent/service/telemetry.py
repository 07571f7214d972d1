"""The agent's periodic telemetry: what the relay's dashboard charts over time.

On the device's telemetry topic (QoS 0, lost while offline), beside the records of events
(``call-ended``, ``audio-flowing``, ``selftest``):

- every ``interval_s`` a ``levels`` record: the microphone's A-weighted Leq and maximum
  over the interval (``LevelMeter``: figures, never audio), the process's CPU share and
  resident memory, the event loop's worst lag, the alerts waiting in the outbox, uptime,
  and this reporter's own counts of records skipped and failed;
- every ``call_interval_s`` while a call's media is up a ``call-stats`` record: the call
  id and its ``MediaStats`` under ``media``, as in ``call-ended`` (loss, jitter, RTT,
  packets, concealment); the relay's MOS estimate (``cloud_relay.quality``) reads the
  same ``loss_fraction``, ``jitter_ms`` and ``rtt_ms``, so the agent sends no MOS.

The records are built from readings by pure functions; the reporter's one task takes
the readings. Its clocks and ``sleep`` are parameters. Records due while
the session is down are skipped (and counted): QoS 0 would fail anyway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from agent.edge.base import check_settings
from agent.edge.level import SoundLevel
from agent.media.session import MediaStats
from agent.signaling.mqtt import PublishFailed
from agent.signaling.topics import Kind
from agent.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

LEVELS: Final = "levels"
CALL_STATS: Final = "call-stats"
MAX_RECORD_BYTES: Final = 8192
"""The relay refuses larger telemetry records (``cloud_relay.telemetry``)."""
PROBE_S: Final = 1.0
"""The task wakes at least this often, to see how late the event loop runs it."""
STATM: Final = Path("/proc/self/statm")
PROCESS_START: Final = time.monotonic()
"""Uptime counts from when the agent loaded this module (its start, to within imports)."""


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """``[telemetry]``: the periodic records the relay's dashboard charts."""

    enabled: bool = True
    """Publish them at all (the event records go either way)."""
    interval_s: float = 60.0
    """A ``levels`` record this often: sound level, CPU, memory, loop lag, outbox, uptime."""
    call_interval_s: float = 5.0
    """While a call is up, its media statistics this often."""

    def __post_init__(self) -> None:
        check_settings(self, {"interval_s": (0.05, 86400.0), "call_interval_s": (0.05, 86400.0)})


@dataclass(frozen=True, slots=True)
class Levels:
    """A ``levels`` record: the board over one interval."""

    interval_s: float
    """Wall time the record covers (monotonic)."""
    sound: SoundLevel | None
    """The microphone's level (None: it delivered nothing to the detectors)."""
    cpu_s: float
    """Process CPU time (every thread) spent in the interval."""
    rss_bytes: int | None
    """Resident memory at its end (None: unknown)."""
    loop_lag_s: float
    """The longest the event loop ran this reporter late in the interval."""
    outbox_pending: int | None
    """Alerts waiting for the relay's ack (None: the outbox did not say)."""
    uptime_s: float
    skipped: int
    """Records not published since start because the session was down."""
    failed: int
    """Records whose publishing failed since start."""

    def to_json(self) -> dict[str, Any]:
        sound = self.sound
        return {
            "event": LEVELS,
            "interval_s": round(self.interval_s, 1),
            "sound_leq_dbfs": None if sound is None else round(sound.leq_dbfs, 1),
            "sound_max_dbfs": None if sound is None else round(sound.max_dbfs, 1),
            "sound_s": None if sound is None else round(sound.seconds, 1),
            "cpu_percent": cpu_percent(self.cpu_s, self.interval_s),
            "rss_kb": None if self.rss_bytes is None else self.rss_bytes // 1024,
            "loop_lag_ms": round(1000 * self.loop_lag_s, 1),
            "outbox_pending": self.outbox_pending,
            "uptime_s": round(self.uptime_s),
            "telemetry_skipped": self.skipped,
            "telemetry_failed": self.failed,
        }


def cpu_percent(cpu_s: float, wall_s: float) -> float:
    """CPU time over wall time in percent of one core (above 100 on several)."""
    return round(100 * max(0.0, cpu_s) / wall_s, 1) if wall_s > 0 else 0.0


def call_stats(call_id: str, stats: MediaStats) -> dict[str, Any]:
    """A ``call-stats`` record: the same ``media`` as the ``call-ended`` one."""
    media = {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(stats).items()}
    return {"event": CALL_STATS, "call_id": call_id, "media": media}


def rss_bytes(statm: str, page_size: int) -> int:
    """Resident memory from the text of ``/proc/PID/statm`` (its second field, pages)."""
    return int(statm.split()[1]) * page_size


def read_rss(path: Path = STATM) -> int | None:
    try:
        return rss_bytes(path.read_text(), os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return None  # not Linux, or a /proc that does not look like one


def encode(record: Mapping[str, Any]) -> bytes:
    """Compact JSON of a record; ValueError if the relay would refuse it for its size."""
    payload = json.dumps(record, separators=(",", ":"), allow_nan=False).encode()
    if len(payload) > MAX_RECORD_BYTES:
        raise ValueError(f"{record.get('event')} record of {len(payload)} bytes")
    return payload


class TelemetrySession(Protocol):
    """What the reporter needs of the device's ``MqttSession``."""

    @property
    def connected(self) -> bool: ...

    async def publish(self, kind: Kind, payload: bytes) -> None: ...


@dataclass(slots=True)
class TelemetryStats:
    """Counters since start."""

    sent: int = 0
    skipped: int = 0
    """Records due while the session was down."""
    failed: int = 0
    """Records refused by the session, or too large."""


class TelemetryReporter:
    """Publishes ``levels`` and ``call-stats`` records; ``start()``, then ``close()``."""

    def __init__(
        self,
        device_id: str,
        settings: TelemetrySettings,
        session: TelemetrySession,
        *,
        sound: Callable[[], SoundLevel | None],
        media: Callable[[], tuple[str, MediaStats] | None],
        pending: Callable[[], Awaitable[int]],
        monotonic: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.process_time,
        rss: Callable[[], int | None] = read_rss,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        started: float = PROCESS_START,
    ) -> None:
        """``sound``: the microphone's level since last asked (``EdgeListener.take_levels``);
        ``media``: the call up and its statistics (``CallRuntime.live_media``);
        ``pending``: alerts in the outbox (``Outbox.count``); ``monotonic``, ``cpu``,
        ``rss``, ``sleep``: clocks, memory and waiting; ``started``: the ``monotonic``
        time uptime counts from."""
        self.device_id = device_id
        self.settings = settings
        self._session = session
        self._sound = sound
        self._media = media
        self._pending = pending
        self._monotonic = monotonic
        self._cpu = cpu
        self._rss = rss
        self._sleep = sleep
        self._started = started
        self.stats = TelemetryStats()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the schedule (nothing runs if the settings do not enable it)."""
        if self.settings.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"telemetry-{self.device_id}"
            )
            self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("device %s: telemetry stopped: %r", self.device_id, exc)

    async def close(self) -> None:
        """Stop the schedule; idempotent."""
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        s = self.settings
        step = min(PROBE_S, s.interval_s, s.call_interval_s)
        begin = self._monotonic()
        cpu_begin = self._cpu()
        self._sound()  # the first interval's level starts now
        next_levels, next_call = begin + s.interval_s, begin + s.call_interval_s
        lag, now = 0.0, begin
        while True:
            due = min(now + step, next_levels, next_call)
            await self._sleep(max(0.0, due - self._monotonic()))
            now = self._monotonic()
            lag = max(lag, now - due)
            if now >= next_call:
                next_call = _after(next_call, s.call_interval_s, now)
                if (live := self._media()) is not None:
                    await self._publish(call_stats(*live))
            if now >= next_levels:
                next_levels = _after(next_levels, s.interval_s, now)
                cpu_now = self._cpu()
                levels = Levels(
                    interval_s=now - begin,
                    sound=self._sound(),
                    cpu_s=cpu_now - cpu_begin,
                    rss_bytes=self._rss(),
                    loop_lag_s=lag,
                    outbox_pending=await self._outbox(),
                    uptime_s=now - self._started,
                    skipped=self.stats.skipped,
                    failed=self.stats.failed,
                )
                begin, cpu_begin, lag = now, cpu_now, 0.0
                await self._publish(levels.to_json())

    async def _outbox(self) -> int | None:
        try:
            return await self._pending()
        except (RuntimeError, OSError) as exc:  # closed, or its disk failing
            logger.info("device %s: outbox count unknown: %s", self.device_id, exc)
            return None

    async def _publish(self, record: Mapping[str, Any]) -> None:
        if not self._session.connected:
            self.stats.skipped += 1
            return
        try:
            await self._session.publish(Kind.TELEMETRY, encode(record))
        except (PublishFailed, ValueError) as exc:
            self.stats.failed += 1
            logger.info("device %s: %s telemetry not sent: %s", self.device_id,
                        record.get("event"), exc)  # fmt: skip
            return
        self.stats.sent += 1


def _after(deadline: float, period: float, now: float) -> float:
    """The next deadline on the grid of ``period`` after ``now`` (a stalled loop skips
    the ones it missed instead of publishing them in a burst)."""
    return deadline + period * max(1, math.floor((now - deadline) / period) + 1)
