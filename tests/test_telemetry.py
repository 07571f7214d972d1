"""The agent's periodic telemetry (``agent.service.telemetry``) without I/O: the running Leq
of the microphone against tones of known level, the records built from given readings and
read back by the relay's own parser, and the reporter's schedule on a fake clock."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import numpy as np
import pytest

from agent.edge.level import LevelMeter, LoudNoiseDetector, SoundLevel
from agent.edge.pipeline import DETECTORS, EdgeAnalyzer, EdgeSettings
from agent.media.session import MediaStats
from agent.service.config import AgentConfig
from agent.service.telemetry import (
    MAX_RECORD_BYTES,
    Levels,
    TelemetryReporter,
    TelemetrySettings,
    call_stats,
    cpu_percent,
    encode,
    rss_bytes,
)
from agent.signaling.mqtt import PublishFailed
from agent.signaling.topics import Kind
from cloud_relay.quality import call_quality
from cloud_relay.telemetry import parse_telemetry
from tools.lab import events as ev
from tools.lab.sounds import concat, frames


def leq(meter: LevelMeter, samples: np.ndarray) -> SoundLevel:
    for frame in frames(samples):
        meter.feed(frame)
    level = meter.take()
    assert level is not None
    return level


@pytest.mark.parametrize(("hz", "rms_dbfs", "expected"), [(1000, -20.0, -20.0), (100, -20.0, -39.1),
                                                          (1000, -60.0, -60.0)])  # fmt: skip
def test_leq_of_a_steady_tone_is_its_a_weighted_level(
    hz: int, rms_dbfs: float, expected: float
) -> None:
    level = leq(LevelMeter(), ev.tone(hz, 2.0, rms_dbfs))
    assert level.leq_dbfs == pytest.approx(expected, abs=0.2)
    assert level.max_dbfs == pytest.approx(expected, abs=0.3)
    assert level.seconds == pytest.approx(2.0)


def test_leq_is_the_energy_mean_and_max_the_loudest_fast_level() -> None:
    meter = LevelMeter()
    level = leq(meter, concat(ev.tone(1000, 1.0, -20.0), ev.tone(1000, 3.0, -40.0)))
    # A quarter of the time at -20, the rest at -40: 10 log10((1e-2 + 3e-4) / 4).
    assert level.leq_dbfs == pytest.approx(10 * math.log10((1e-2 + 3e-4) / 4), abs=0.2)
    assert level.max_dbfs == pytest.approx(-20.0, abs=0.3)
    assert meter.take() is None  # taken: the next interval starts empty
    quiet = leq(meter, ev.tone(1000, 1.0, -40.0))
    assert quiet.max_dbfs == pytest.approx(-40.0, abs=0.5)  # the -20 left with the last take


def test_the_analyzer_reports_the_loud_noise_detectors_level_or_its_own() -> None:
    tone = ev.tone(1000, 1.0, -30.0)
    shared = EdgeAnalyzer(EdgeSettings())
    alone = EdgeAnalyzer(EdgeSettings(enabled=tuple(d for d in DETECTORS if d != "loud_noise")))
    [loud] = [d for d in shared.detectors if isinstance(d, LoudNoiseDetector)]
    assert shared.levels is loud.meter  # one A-weighting per frame, not two
    assert not any(isinstance(d, LoudNoiseDetector) for d in alone.detectors)
    for analyzer in (shared, alone):
        for frame in frames(tone):
            analyzer.feed(frame.tobytes())
    a, b = shared.levels.take(), alone.levels.take()
    assert a is not None and a == b
    assert a.leq_dbfs == pytest.approx(-30.0, abs=0.2)


def media_stats(**values: Any) -> MediaStats:
    fields: dict[str, Any] = dict.fromkeys(MediaStats.__dataclass_fields__, 0)
    fields.update(loss_fraction=0.0, jitter_ms=0.0, rtt_ms=None, jitter_target_ms=40.0,
                  jitter_buffered_ms=0.0)  # fmt: skip
    return MediaStats(**(fields | values))


def test_levels_record() -> None:
    levels = Levels(
        interval_s=60.02, sound=SoundLevel(-52.34, -31.06, 59.98), cpu_s=3.0,
        rss_bytes=40 * 1024 * 1024 + 100, loop_lag_s=0.0123, outbox_pending=2,
        uptime_s=3600.4, skipped=1, failed=0,
    )  # fmt: skip
    record = levels.to_json()
    assert record == {
        "event": "levels", "interval_s": 60.0, "sound_leq_dbfs": -52.3,
        "sound_max_dbfs": -31.1, "sound_s": 60.0, "cpu_percent": 5.0, "rss_kb": 40960,
        "loop_lag_ms": 12.3, "outbox_pending": 2, "uptime_s": 3600,
        "telemetry_skipped": 1, "telemetry_failed": 0,
    }  # fmt: skip
    parsed = parse_telemetry(encode(record))  # what the relay stores
    assert (parsed.event, parsed.record) == ("levels", record)
    unknown = Levels(1.0, None, 0.0, None, 0.0, None, 1.0, 0, 0).to_json()
    assert unknown["sound_leq_dbfs"] is None and unknown["rss_kb"] is None


def test_call_stats_record_gives_the_relay_its_quality() -> None:
    stats = media_stats(
        packets_sent=250, packets_received=240, packets_lost=10, loss_fraction=0.04,
        jitter_ms=12.345678, rtt_ms=80.0, concealed=7,
    )  # fmt: skip
    record = call_stats("c4ll", stats)
    parsed = parse_telemetry(encode(record))
    assert (parsed.event, parsed.record["call_id"]) == ("call-stats", "c4ll")
    media = parsed.record["media"]
    assert media["jitter_ms"] == 12.3457 and media["concealed"] == 7
    assert set(media) == set(MediaStats.__dataclass_fields__)
    quality = call_quality({"door-a": media})
    assert quality is not None and quality.loss == 0.04 and quality.rtt_ms == 80.0
    assert 3.0 < quality.mos < 4.3


def test_readings() -> None:
    assert cpu_percent(0.5, 10.0) == 5.0
    assert cpu_percent(-0.1, 10.0) == 0.0 and cpu_percent(1.0, 0.0) == 0.0
    assert rss_bytes("11052 2893 1930 1 0 1034 0\n", 4096) == 2893 * 4096
    with pytest.raises(ValueError, match="bytes"):
        encode({"event": "levels", "x": "y" * MAX_RECORD_BYTES})
    with pytest.raises(ValueError, match="interval_s"):
        TelemetrySettings(interval_s=0)
    assert AgentConfig().telemetry == TelemetrySettings()


class FakeSession:
    """The device session at its boundary: up or down, refusing on request."""

    def __init__(self) -> None:
        self.connected = True
        self.refuse = False
        self.sent: list[tuple[float, dict[str, Any]]] = []
        self.now = 0.0

    async def publish(self, kind: Kind, payload: bytes) -> None:
        assert kind is Kind.TELEMETRY
        if self.refuse:
            raise PublishFailed("timeout")
        self.sent.append((self.now, json.loads(payload)))

    def records(self, event: str) -> list[tuple[float, dict[str, Any]]]:
        return [(at, r) for at, r in self.sent if r["event"] == event]


async def test_reporter_schedule_on_a_fake_clock() -> None:
    """Levels every 10 s, call statistics every 2 s during a call from 3.5 s to 8.5 s; the
    loop runs the reporter 0.25 s late once; the session is down from 15 s to 25 s and
    refuses from 25 s to 35 s."""
    session = FakeSession()
    clock = {"t": 100.0, "cpu": 1.0}
    call = ("c4ll", media_stats(packets_received=50))
    live: list[tuple[str, MediaStats] | None] = [None]
    sounds = iter([None, SoundLevel(-50.0, -40.0, 10.0), None, None, None])

    async def sleep(seconds: float) -> None:
        # Time passes only here; the process works 10 % of it.
        late = 0.25 if clock["t"] == 105.0 else 0.0
        clock["t"] += seconds + late
        clock["cpu"] += 0.1 * (seconds + late)
        t = session.now = clock["t"] - 100.0
        live[0] = call if 3.5 <= t < 8.5 else None
        session.connected = not 15 <= t < 25
        session.refuse = 25 <= t < 35
        await asyncio.sleep(0)

    async def pending() -> int:
        return 3

    reporter = TelemetryReporter(
        "door-a", TelemetrySettings(interval_s=10.0, call_interval_s=2.0), session,
        sound=lambda: next(sounds), media=lambda: live[0], pending=pending,
        monotonic=lambda: clock["t"], cpu=lambda: clock["cpu"], rss=lambda: 8192,
        sleep=sleep, started=40.0,
    )  # fmt: skip
    reporter.start()
    async with asyncio.timeout(5):
        while len(session.records("levels")) < 2:
            await asyncio.sleep(0)
    await reporter.close()
    await reporter.close()  # idempotent

    calls = session.records("call-stats")
    assert [at for at, _ in calls] == [4.0, 6.25, 8.0]
    assert all(r["call_id"] == "c4ll" and r["media"]["packets_received"] == 50 for _, r in calls)
    levels = session.records("levels")
    assert [at for at, _ in levels] == [10.0, 40.0]
    first, last = levels[0][1], levels[1][1]
    assert (first["interval_s"], first["cpu_percent"], first["sound_leq_dbfs"]) == (10, 10, -50)
    assert (first["loop_lag_ms"], first["outbox_pending"], first["rss_kb"]) == (250.0, 3, 8)
    assert first["uptime_s"] == 70
    assert (last["telemetry_skipped"], last["telemetry_failed"]) == (1, 1)
    # Since the last record built (the skipped and failed ones' figures are lost).
    assert (last["interval_s"], last["sound_leq_dbfs"], last["loop_lag_ms"]) == (10, None, 0)
    assert reporter.stats.sent == len(session.sent) == 5
