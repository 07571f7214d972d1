"""The scheduled audio self-test: the board plays a test signal and listens for it.

At the configured time (``[selftest]``: a local time of day, or an interval) and while no
call is up, ``SelfTestScheduler`` plays two identical sweeps ``spacing_s`` apart on the
speaker and records the microphone (``agent.audio.looptest`` measures loop level, echo
path delay and playback/capture clock drift). Each attempt is published on telemetry as
``{"event": "selftest", "pass": ..., "level_db": ..., "delay_ms": ..., "drift_ppm": ...}``.
A failed test is tried once more after ``retry_after_s``; a second failure raises a
``selftest_failed`` alert (severity warning) through the alert outbox.

The speaker is the call runtime's (``play``: the test tone's path, which a call stops);
the microphone is a tap on the capture tee, which keeps the test signal from the edge
detectors (``agent.audio.tee``). A call has priority: at test time the test waits for
the call to end (looking every ``postpone_s``, for at most ``max_postpone_s``), and a
call that comes during the test aborts it; it is then run again once the call is over
(within the same bound). An aborted test is no failure.

Time is read from ``clock`` (Unix seconds) and waited for with ``sleep``, both
parameters, so tests run a schedule without waiting for it; long waits are taken in
naps of at most ``max_nap_s`` with the clock read again after each (a board without a
real-time clock jumps when NTP sets it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from agent.audio.base import EndOfStream
from agent.audio.format import FRAME_SAMPLES, SAMPLE_RATE
from agent.audio.looptest import (
    FLOOR_DB,
    LoopResult,
    LoopSignal,
    LoopThresholds,
    analyse_loop,
    from_pcm,
    loop_signal,
    to_frames,
)
from agent.audio.tee import FrameQueue
from agent.edge.alerts import SELFTEST_FAILED, Alert, Severity, new_alert_id
from agent.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

STALL_S = 5.0
"""A microphone that delivers nothing for this long beyond the test's length fails it."""


@dataclass(frozen=True, slots=True)
class SelfTestSettings(LoopThresholds):
    """``[selftest]``: when the audio self-test runs, its signal, and what passes."""

    enabled: bool = False
    """Run the test on schedule (the ``selftest`` command works either way)."""
    at: str = "03:30"
    """Local time of day (``HH:MM``, 24 h) of the daily test."""
    interval_s: float | None = None
    """Instead of daily at ``at``: every this many seconds, the first one after this long."""
    amplitude: float = 0.3
    """Peak level of the test sweeps, fraction of full scale (0.3: -10.5 dBFS), before the
    speaker volume."""
    marker_s: float = 0.5
    """Length of each sweep."""
    spacing_s: float = 6.0
    """From the start of the first sweep to the start of the second: the longer, the finer
    the drift (one sample in 6 s is 3.5 ppm; peaks are found to a small part of one)."""
    listen_s: float = 1.0
    """The microphone is recorded this long after the signal: the longest delay found."""
    retry_after_s: float = 300.0
    """A failed test is run once more after this long; failing again raises the alert."""
    postpone_s: float = 10.0
    """While a call is up at test time, look again this often ..."""
    max_postpone_s: float = 3600.0
    """... for at most this long; after it, this test is skipped (logged)."""
    max_nap_s: float = 60.0
    """Longest wait before the clock is read again."""

    def __post_init__(self) -> None:
        LoopThresholds.__post_init__(self)
        self.time_of_day()
        if self.interval_s is not None and self.interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {self.interval_s}")
        if not 0 < self.amplitude <= 1:
            raise ValueError(f"amplitude must be more than 0 and at most 1, got {self.amplitude}")
        for name in ("marker_s", "listen_s", "postpone_s", "max_nap_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.retry_after_s < 0 or self.max_postpone_s < 0:
            raise ValueError("retry_after_s and max_postpone_s must not be negative")
        self.signal()  # markers that overlap are refused here, not at 03:30

    def time_of_day(self) -> tuple[int, int]:
        """``at`` as (hour, minute)."""
        hour, _, minute = self.at.partition(":")
        if not (hour.isdigit() and minute.isdigit() and len(minute) == 2):
            raise ValueError(f"at must be HH:MM, got {self.at!r}")
        if not (0 <= int(hour) < 24 and 0 <= int(minute) < 60):
            raise ValueError(f"at must be a time of day 00:00..23:59, got {self.at!r}")
        return int(hour), int(minute)

    def signal(self) -> LoopSignal:
        """The test signal these settings describe."""
        return loop_signal(self.marker_s, self.amplitude, self.spacing_s)


def next_run(after: float, settings: SelfTestSettings) -> float:
    """When the next scheduled test is due (Unix seconds), strictly after ``after``: the
    next ``at`` in local time (daylight saving time included), or ``after`` plus the
    interval."""
    if settings.interval_s is not None:
        return after + settings.interval_s
    hour, minute = settings.time_of_day()
    local = datetime.fromtimestamp(after)
    due = local.replace(hour=hour, minute=minute, second=0, microsecond=0)
    while due.timestamp() <= after:
        due += timedelta(days=1)  # naive local: 03:30 stays 03:30 across a DST change
    return due.timestamp()


@dataclass(frozen=True, slots=True)
class Attempt:
    """One self-test that ran to its end."""

    result: LoopResult
    """What it measured."""
    start_ms: int
    """When it began, Unix ms."""
    end_ms: int
    """When its analysis was done, Unix ms."""


class Aborted(Exception):
    """The test did not run to its end for a reason that is no fault of the audio (a call);
    the text says which."""


Play = Callable[[list[bytes]], asyncio.Task[None]]
"""Plays frames on the speaker in a task (``CallRuntime.play``); ``ValueError`` when the
speaker is not free (a call, a test tone)."""


class SelfTestScheduler:
    """Runs the self-test on schedule (``start()``, then ``close()``) and on request
    (``run_now``)."""

    def __init__(
        self,
        device_id: str,
        settings: SelfTestSettings,
        *,
        play: Play,
        tap: Callable[[], contextlib.AbstractContextManager[FrameQueue]],
        busy: Callable[[], bool],
        publish: Callable[[Mapping[str, Any]], Awaitable[None]],
        submit: Callable[[Alert], Awaitable[object]],
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """``tap``: the microphone's frames while open (``CaptureTee.tap``); ``busy``: a
        call is up; ``publish``: a telemetry record; ``submit``: an alert into the outbox
        (``AlertUplink.submit``); ``clock`` and ``sleep``: Unix time, and waiting."""
        self.device_id = device_id
        self.settings = settings
        self._signal = settings.signal()
        self._play = play
        self._tap = tap
        self._busy = busy
        self._publish = publish
        self._submit = submit
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the schedule (nothing runs if the settings do not enable it)."""
        if self.settings.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._schedule(), name=f"selftest-{self.device_id}"
            )

    async def close(self) -> None:
        """Stop the schedule and any test it is running."""
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def run_now(self) -> dict[str, Any]:
        """One test now (the ``selftest`` command), published on telemetry like the
        scheduled ones; its record. ``Aborted`` if a call is up or comes."""
        attempt = await self._attempt()
        record = self._record(attempt, "command", 1)
        await self._publish(record)
        return record

    # --- the schedule ---

    async def _schedule(self) -> None:
        due = next_run(self._clock(), self.settings)
        while True:
            await self._sleep_until(due)
            try:
                await self._scheduled()
            except Exception:  # one broken test must not end the schedule
                logger.exception("device %s: self-test failed to run", self.device_id)
            due = next_run(max(due, self._clock()), self.settings)

    async def _sleep_until(self, due: float) -> None:
        while (left := due - self._clock()) > 0:
            await self._sleep(min(left, self.settings.max_nap_s))

    async def _scheduled(self) -> None:
        """The test at its time, once more after a failure, and the alert after two."""
        first = await self._when_free(1)
        if first is None or first.result.passed:
            return
        logger.warning(
            "device %s: self-test failed (%s): trying again in %g s",
            self.device_id, first.result.summary(), self.settings.retry_after_s,
        )  # fmt: skip
        await self._sleep_until(self._clock() + self.settings.retry_after_s)
        second = await self._when_free(2)
        if second is None or second.result.passed:
            return
        await self._raise_alert(first, second)

    async def _when_free(self, number: int) -> Attempt | None:
        """Attempt ``number`` as soon as no call is up, bounded by ``max_postpone_s``;
        published on telemetry. None: skipped, calls took the whole time."""
        give_up = self._clock() + self.settings.max_postpone_s
        while True:
            if not self._busy():
                try:
                    attempt = await self._attempt()
                except Aborted as exc:
                    logger.info("device %s: self-test aborted: %s", self.device_id, exc)
                else:
                    await self._publish(self._record(attempt, "schedule", number))
                    return attempt
            if self._clock() >= give_up:
                logger.warning("device %s: self-test skipped: calls for %g s",
                               self.device_id, self.settings.max_postpone_s)  # fmt: skip
                return None
            await self._sleep(self.settings.postpone_s)

    async def _raise_alert(self, first: Attempt, second: Attempt) -> None:
        result = second.result
        detail: dict[str, str | int | float | bool] = {
            "failures": "; ".join(result.failures)[:200],
            "first": "; ".join(first.result.failures)[:200],
        }
        figures = result.to_record()
        for key in ("level_db", "level_dbfs", "snr_db", "correlation", "delay_ms", "drift_ppm"):
            value = figures[key]
            if isinstance(value, float):
                detail[key] = value
        alert = Alert(
            id=new_alert_id(),
            detector="selftest",
            kind=SELFTEST_FAILED,
            severity=Severity.WARNING,
            start=first.start_ms,
            end=second.end_ms,
            confidence=1.0,
            level=result.level_dbfs,
            created=round(self._clock() * 1000),
            detail=detail,
        )
        await self._submit(alert)
        logger.error("device %s: self-test failed twice (%s): alert %s",
                     self.device_id, result.summary(), alert.id)  # fmt: skip

    def _record(self, attempt: Attempt, trigger: str, number: int) -> dict[str, Any]:
        return {
            "event": "selftest",
            "trigger": trigger,
            "attempt": number,
            "at_ms": attempt.start_ms,
            **attempt.result.to_record(),
        }

    # --- one test ---

    async def _attempt(self) -> Attempt:
        """Play and record (one test at a time), then analyse off the event loop."""
        async with self._lock:
            start_ms = round(self._clock() * 1000)
            heard = await self._play_and_record()
        if heard is None:
            result = _no_audio()
        else:
            result = await asyncio.to_thread(
                analyse_loop, from_pcm(heard), self._signal, self.settings
            )
        logger.info("device %s: self-test %s: %s", self.device_id,
                    "passed" if result.passed else "failed", result.summary())  # fmt: skip
        return Attempt(result, start_ms, round(self._clock() * 1000))

    async def _play_and_record(self) -> bytes | None:
        """The recording (None: the microphone delivered nothing); ``Aborted`` by a call."""
        if self._busy():
            raise Aborted("a call is up")
        frames = to_frames(self._signal.samples)
        wanted = len(frames) + math.ceil(self.settings.listen_s * SAMPLE_RATE / FRAME_SAMPLES)
        chunks: list[bytes] = []
        with self._tap() as tap:
            try:
                playing = self._play(frames)
            except ValueError as exc:  # the speaker is not free
                raise Aborted(str(exc)) from None
            try:
                async with asyncio.timeout(wanted * FRAME_SAMPLES / SAMPLE_RATE + STALL_S):
                    while len(chunks) < wanted:
                        chunks.append(await tap.read())
                        if self._busy():
                            raise Aborted("a call came")
            except (TimeoutError, EndOfStream):
                return None
            finally:
                playing.cancel()  # done by now, unless the test ends early
            if tap.dropped:
                raise Aborted(f"{tap.dropped} microphone frames lost (the agent is overloaded)")
        return b"".join(chunks)


def _no_audio() -> LoopResult:
    return LoopResult(
        failures=("no audio from the microphone",),
        level_db=FLOOR_DB,
        level_dbfs=FLOOR_DB,
        noise_dbfs=FLOOR_DB,
        correlation=0.0,
        clipped=0.0,
        delay_ms=None,
        drift_ppm=None,
    )


__all__ = ["Aborted", "Attempt", "SelfTestScheduler", "SelfTestSettings", "next_run"]
