"""Speaker gain, mute and test tone (``agent.audio.gain``), and ``config/set``'s checking."""

from __future__ import annotations

import math
from array import array

import pytest

from agent.audio.format import FRAME_BYTES, FRAME_SAMPLES, SILENCE
from agent.audio.gain import (
    AudioControls,
    GainSink,
    MutableSource,
    check_volume,
    scale_frame,
    tone_frames,
)
from agent.audio.sources import MemorySink, ToneSource
from agent.calls.runtime import parse_value, redact
from agent.service.config import AgentConfig
from agent.service.tomlconf import ConfigError, replace_key, to_plain


def frame_of(*values: int) -> bytes:
    return array("h", (values * FRAME_SAMPLES)[:FRAME_SAMPLES]).tobytes()


def rms(frame: bytes) -> float:
    samples = array("h", frame)
    return math.sqrt(sum(s * s for s in samples) / len(samples))


def test_scale_frame_levels() -> None:
    frame = frame_of(32767, -32768, 1000, -1000, 0)
    assert scale_frame(frame, 100) is frame
    assert scale_frame(frame, 0) == SILENCE
    half = array("h", scale_frame(frame, 50))
    assert list(half[:5]) == [16383, -16384, 500, -500, 0]
    for level in (1, 33, 99):
        out = array("h", scale_frame(frame, level))
        assert all(abs(o) <= abs(i) for o, i in zip(out, array("h", frame), strict=True))
        assert abs(out[0] - 32767 * level / 100) <= 2


def test_scale_frame_keeps_length_of_odd_sizes() -> None:
    assert scale_frame(bytes(10), 0) == bytes(10)
    assert len(scale_frame(array("h", [5, 6, 7]).tobytes(), 40)) == 6


@pytest.mark.parametrize("level", [0, 1, 50, 100, 50.0])
def test_check_volume_accepts(level: float) -> None:
    assert check_volume(level) == int(level)


@pytest.mark.parametrize("level", [-1, 101, 0.5, True, "50", None, float("nan")])
def test_check_volume_refuses(level: object) -> None:
    with pytest.raises(ValueError, match=r"0\.\.100"):
        check_volume(level)


def test_tone_frames() -> None:
    frames = tone_frames(1000.0, 1.0)
    assert len(frames) == 50 and all(len(f) == FRAME_BYTES for f in frames)
    assert abs(rms(frames[25]) - 0.5 * 32767 / math.sqrt(2)) < 200
    assert abs(array("h", frames[0])[0]) < 100  # faded in: no click
    for bad in ((5.0, 1.0), (1000.0, 0.0), (1000.0, 60.0), (30_000.0, 1.0)):
        with pytest.raises(ValueError):
            tone_frames(*bad)


async def test_mutable_source_sends_silence_while_muted() -> None:
    controls = AudioControls()
    source = MutableSource(ToneSource(440.0), controls)
    assert rms(await source.read()) > 1000
    controls.muted = True
    assert await source.read() == SILENCE
    controls.muted = False
    assert rms(await source.read()) > 1000
    assert source.discard_pending() == 0
    await source.close()


async def test_gain_sink_follows_volume() -> None:
    controls = AudioControls()
    memory = MemorySink()
    sink = GainSink(memory, controls)
    frame = frame_of(10_000, -10_000)
    await sink.write(frame)
    controls.set_volume(0)
    await sink.write(frame)
    controls.set_volume(25)
    await sink.write(frame)
    samples = memory.samples()
    assert list(samples[:2]) == [10_000, -10_000]
    assert not samples[FRAME_SAMPLES : 2 * FRAME_SAMPLES].any()
    assert list(samples[2 * FRAME_SAMPLES : 2 * FRAME_SAMPLES + 2]) == [2500, -2500]
    await sink.close()


def test_replace_key_checks_like_the_loader() -> None:
    config = AgentConfig()
    changed = replace_key(config, "calls.do_not_disturb", True)
    assert changed.calls.do_not_disturb and not config.calls.do_not_disturb
    assert replace_key(config, "calls.auto_answer", ["door-a"]).calls.auto_answer == ("door-a",)
    assert replace_key(config, "audio.volume", 30).audio.volume == 30
    for key, value, words in (
        ("calls.do_not_disturbb", True, "unknown key"),
        ("calls", True, "is a table"),
        ("calls.do_not_disturb.x", True, "unknown key"),
        ("calls.do_not_disturb", "yes", "expected bool"),
        ("audio.volume", 300, "0..100"),
        ("audio.volume", True, "expected int"),
        ("", 1, "dotted key"),
    ):
        with pytest.raises(ConfigError, match=words):
            replace_key(config, key, value)


def test_parse_value_and_redact() -> None:
    assert parse_value("true") is True
    assert parse_value("30") == 30
    assert parse_value('["a", "b"]') == ["a", "b"]
    assert parse_value("door-a") == "door-a"
    assert parse_value(7) == 7
    data = to_plain(AgentConfig())
    data["ice"]["turn_servers"] = [{"url": "turn:x", "password": "hunter2", "secret": ""}]
    shown = redact(data)
    assert shown["ice"]["turn_servers"][0] == {"url": "turn:x", "password": "***", "secret": ""}
    assert shown["calls"] == data["calls"]
