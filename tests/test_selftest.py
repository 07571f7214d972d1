"""The scheduled audio self-test (``agent.service.selftest``).

The schedule runs on an injected clock and sleep (no waiting for 03:30) against an
in-memory board whose speaker is heard by its microphone ``delay`` samples later; the
microphone side is the real ``FrameQueue`` a ``CaptureTee`` tap gives. Every wait for an
outcome is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pytest

from agent.audio.format import SAMPLE_RATE
from agent.audio.looptest import from_pcm, to_frames
from agent.audio.tee import FrameQueue
from agent.edge.alerts import SELFTEST_FAILED, Alert, Severity
from agent.service.config import AgentConfig
from agent.service.selftest import Aborted, SelfTestScheduler, SelfTestSettings, next_run
from agent.service.tomlconf import ConfigError, from_dict

WAIT = 20.0
SETTINGS = SelfTestSettings(enabled=True, spacing_s=2.0, listen_s=0.5)
START = datetime(2026, 11, 27, 22, 0).timestamp()
"""22:00 local time: the first test is due at 03:30 the next morning."""


def local(day: int, hour: int, minute: int, second: int = 0) -> float:
    return datetime(2026, 11, day, hour, minute, second).timestamp()


@dataclass
class Clock:
    """Unix time that moves only when slept on; each sleep is recorded."""

    now: float = START
    slept: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@dataclass
class Board:
    """A speaker heard by a microphone ``delay`` samples later at ``gains[i]`` on the i-th
    play (the last one repeats; 0: a dead microphone). ``call_s``: a call comes with the
    first play and lasts this long."""

    clock: Clock
    delay: int = 2400
    gains: list[float] = field(default_factory=lambda: [0.1])
    call_s: float = 0.0
    busy_until: float = 0.0
    plays: list[float] = field(default_factory=list)
    """Clock times of the plays."""
    mic: FrameQueue | None = None

    def busy(self) -> bool:
        return self.clock.now < self.busy_until

    @contextlib.contextmanager
    def tap(self) -> Iterator[FrameQueue]:
        self.mic = FrameQueue(10_000)
        try:
            yield self.mic
        finally:
            self.mic = None

    def play(self, frames: list[bytes]) -> asyncio.Task[None]:
        if self.busy():
            raise ValueError("refused: a call is in progress and has the speaker")
        gain = self.gains[min(len(self.plays), len(self.gains) - 1)]
        self.plays.append(self.clock.now)
        if self.call_s and len(self.plays) == 1:
            self.busy_until = self.clock.now + self.call_s
        assert self.mic is not None
        played = from_pcm(b"".join(frames))
        heard = np.concatenate([np.zeros(self.delay), gain * played, np.zeros(SAMPLE_RATE)])
        for frame in to_frames(heard):
            self.mic.put(frame)
        return asyncio.get_running_loop().create_task(asyncio.sleep(0))


@dataclass
class Uplink:
    """Where telemetry and alerts go."""

    records: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    alerts: list[Alert] = field(default_factory=list)

    async def publish(self, record: Any) -> None:
        json.dumps(record, allow_nan=False)  # what goes on the wire
        await self.records.put(dict(record))

    async def submit(self, alert: Alert) -> str:
        self.alerts.append(alert)
        return alert.id

    async def next(self) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            return await self.records.get()


@contextlib.asynccontextmanager
async def scheduler(
    board: Board, uplink: Uplink, settings: SelfTestSettings = SETTINGS
) -> AsyncIterator[SelfTestScheduler]:
    tests = SelfTestScheduler(
        "door-1",
        settings,
        play=board.play,
        tap=board.tap,
        busy=board.busy,
        publish=uplink.publish,
        submit=uplink.submit,
        clock=board.clock,
        sleep=board.clock.sleep,
    )
    tests.start()
    try:
        yield tests
    finally:
        await tests.close()


def test_next_run_is_the_next_time_of_day_or_an_interval() -> None:
    assert next_run(local(27, 22, 0), SETTINGS) == local(28, 3, 30)
    assert next_run(local(28, 3, 0), SETTINGS) == local(28, 3, 30)
    assert next_run(local(28, 3, 30), SETTINGS) == local(29, 3, 30)  # strictly after
    every = SelfTestSettings(interval_s=600.0)
    assert next_run(1000.0, every) == 1600.0


def test_settings_are_checked_where_they_are_read() -> None:
    config = from_dict(AgentConfig, {"selftest": {"enabled": True, "at": "04:15"}})
    assert config.selftest.time_of_day() == (4, 15)
    for bad, words in (
        ({"at": "25:00"}, "time of day"),
        ({"at": "4pm"}, "HH:MM"),
        ({"spacing_s": 0.6}, "overlap"),
        ({"max_delay_ms": 0}, "positive"),
        ({"colour": "red"}, "unknown key"),
    ):
        with pytest.raises(ConfigError, match=words):
            from_dict(AgentConfig, {"selftest": bad})


async def test_daily_at_the_configured_time_pass_published_on_telemetry() -> None:
    clock, uplink = Clock(), Uplink()
    board = Board(clock)
    async with scheduler(board, uplink):
        first, second = await uplink.next(), await uplink.next()
    assert board.plays[:2] == [local(28, 3, 30), local(29, 3, 30)]
    assert max(clock.slept) <= SETTINGS.max_nap_s  # the clock is read again each minute
    assert first["event"] == "selftest" and first["pass"] is True
    assert (first["trigger"], first["attempt"], first["at_ms"]) == (
        "schedule", 1, round(local(28, 3, 30) * 1000),
    )  # fmt: skip
    assert first["delay_ms"] == pytest.approx(50.0, abs=0.01)  # 2400 samples
    assert first["drift_ppm"] == pytest.approx(0.0, abs=0.1)
    assert first["level_db"] == pytest.approx(-20.0, abs=0.2)
    assert second["at_ms"] == round(local(29, 3, 30) * 1000) and not uplink.alerts


async def test_a_failure_is_tried_again_then_raises_the_alert() -> None:
    clock, uplink = Clock(), Uplink()
    board = Board(clock, gains=[0.0])  # a dead microphone
    async with scheduler(board, uplink):
        first, second = await uplink.next(), await uplink.next()
    assert board.plays[:2] == [local(28, 3, 30), local(28, 3, 35)]  # retry_after_s 300
    assert [r["attempt"] for r in (first, second)] == [1, 2]
    assert first["pass"] is False and first["failures"] == ["test signal not heard"]
    [alert] = [a for a in uplink.alerts if a.start == first["at_ms"]]
    assert (alert.kind, alert.severity, alert.detector) == (
        SELFTEST_FAILED, Severity.WARNING, "selftest",
    )  # fmt: skip
    assert alert.detail["failures"] == "test signal not heard"
    assert alert.end >= second["at_ms"]
    Alert.from_dict(json.loads(alert.to_json()))  # valid on the wire


async def test_a_pass_on_the_retry_raises_nothing() -> None:
    clock, uplink = Clock(), Uplink()
    board = Board(clock, gains=[0.0, 0.1])
    async with scheduler(board, uplink):
        first, second, third = await uplink.next(), await uplink.next(), await uplink.next()
    assert [r["pass"] for r in (first, second, third)] == [False, True, True]
    assert third["at_ms"] == round(local(29, 3, 30) * 1000)
    assert not uplink.alerts


async def test_a_call_at_test_time_postpones_it_and_one_during_the_test_aborts_it() -> None:
    clock, uplink = Clock(), Uplink()
    board = Board(clock, call_s=60.0)
    async with scheduler(board, uplink):
        record = await uplink.next()
    # The first play met a call (aborted, not a failure); looked again every 10 s.
    assert board.plays[:2] == [local(28, 3, 30), local(28, 3, 31)]
    assert (record["attempt"], record["pass"]) == (1, True)
    assert record["at_ms"] == round(local(28, 3, 31) * 1000) and not uplink.alerts


async def test_calls_all_along_skip_the_test() -> None:
    clock, uplink = Clock(), Uplink()
    board = Board(clock, busy_until=local(28, 5, 0))
    async with scheduler(board, uplink):
        record = await uplink.next()
    assert board.plays[0] == local(29, 3, 30)  # 03:30 to 04:30 all in a call: skipped
    assert record["at_ms"] == round(local(29, 3, 30) * 1000)


async def test_run_now_measures_or_says_why_not() -> None:
    clock, uplink = Clock(), Uplink()
    board = Board(clock, delay=4800)
    on_request = SelfTestSettings(spacing_s=2.0, listen_s=0.5)  # not enabled: no schedule
    async with scheduler(board, uplink, on_request) as tests:
        record = await tests.run_now()
        assert (record["trigger"], record["pass"]) == ("command", True)
        assert record["delay_ms"] == pytest.approx(100.0, abs=0.01)
        assert await uplink.next() == record
        board.busy_until = clock.now + 1
        with pytest.raises(Aborted, match="a call is up"):
            await tests.run_now()
    assert board.plays == [START]
