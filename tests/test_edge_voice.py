"""Voice-activity detector (``agent.edge.voice``) over espeak-ng speech and non-speech."""

from __future__ import annotations

import numpy as np
import pytest

from agent.edge._webrtcvad import WebRtcVad
from agent.edge.base import Detection
from agent.edge.voice import VoiceActivityDetector, VoiceSettings
from tools.lab import events as ev
from tools.lab.sounds import concat, detect


def run(samples: np.ndarray, settings: VoiceSettings | None = None) -> list[Detection]:
    return detect(VoiceActivityDetector(settings), samples)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return concat(
        ev.speech("Hello? Is anybody home? I have a parcel for you."),
        ev.speech("Yes, come in, the door is open."),
    )


NO_LIMIT = VoiceSettings(min_interval_s=0.0)


def test_speech_gives_one_detection(speech: np.ndarray) -> None:
    [hit] = run(ev.pad(speech, before_s=2.0, after_s=2.0), NO_LIMIT)
    assert hit.detector == "voice" and hit.kind == "voice"
    assert 1.8 <= hit.start_s <= 2.6
    assert hit.end_s == pytest.approx(hit.start_s + 0.4, abs=0.03)
    assert 0.7 <= hit.confidence <= 1.0
    assert -40.0 < hit.level_dbfs < -3.0


@pytest.mark.parametrize("snr_db", [20, 10, 5, 0])
@pytest.mark.parametrize("background", ["household", "pink"])
def test_speech_in_background(speech: np.ndarray, snr_db: int, background: str) -> None:
    bg = (
        ev.household(20.0, seed=3)
        if background == "household"
        else ev.noise(20.0, -40.0, seed=3, color="pink")
    )
    hits = run(ev.mix(bg, speech, at_s=5.0, snr_db=snr_db), VoiceSettings(min_interval_s=30.0))
    assert len(hits) == 1
    assert 4.8 <= hits[0].start_s <= 5.0 + len(speech) / ev.RATE


def test_rate_limit_counts_what_it_held_back(speech: np.ndarray) -> None:
    pause = ev.silence(5.0)
    talk = concat(pause, speech, pause, speech, pause, speech)  # three segments in ~50 s
    assert len(run(talk, NO_LIMIT)) == 3
    assert len(run(talk, VoiceSettings(min_interval_s=300.0))) == 1
    later = concat(talk, ev.silence(60.0), speech)
    hits = run(later, VoiceSettings(min_interval_s=60.0))
    assert len(hits) == 2
    assert hits[1].detail == "2 voice segments held back by the rate limit"


def test_hangover_keeps_a_conversation_in_one_segment(speech: np.ndarray) -> None:
    talk = concat(speech, ev.silence(0.6), speech)
    assert len(run(talk, NO_LIMIT)) == 1
    short = VoiceSettings(min_interval_s=0.0, hangover_s=0.1)
    assert len(run(talk, short)) >= 2  # split between words, too


def test_quiet_speech_under_the_level_gate(speech: np.ndarray) -> None:
    far = (speech.astype(np.float64) * 10 ** (-30 / 20)).astype(np.int16)  # ~-50 dBFS
    assert len(run(far, NO_LIMIT)) == 1
    assert run(far, VoiceSettings(min_level_dbfs=-40.0, min_interval_s=0.0)) == []


@pytest.mark.parametrize(
    "make",
    [
        lambda: ev.silence(30.0),
        lambda: ev.noise(60.0, -30.0, seed=6, color="brown"),
        lambda: ev.noise(60.0, -30.0, seed=7, color="white"),
        lambda: ev.tone(520.0, 20.0, -20.0),
        lambda: ev.tone(3100.0, 20.0, -20.0),
        lambda: ev.pad(ev.claps(1, count=20)),
        lambda: ev.pad(ev.glass_break(2)),
        lambda: ev.pad(ev.door_slam(3)),
    ],
    ids=["silence", "brown", "white", "tone520", "tone3k", "claps", "glass", "door"],
)
def test_non_speech_does_not_fire(make: object) -> None:
    assert callable(make)
    assert run(make(), NO_LIMIT) == []


def test_household_background_rarely_fires() -> None:
    # WebRTC's VAD takes an occasional knock (a damped 100-400 Hz ring) for a syllable.
    assert len(run(ev.household(600.0, seed=5), NO_LIMIT)) <= 1


def test_steady_tone_needs_the_modulation_check() -> None:
    tone = ev.tone(520.0, 20.0, -20.0)
    assert run(tone, NO_LIMIT) == []
    assert len(run(tone, VoiceSettings(min_interval_s=0.0, min_modulation_db=0.0))) == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"mode": 4},
        {"mode": 2.0},
        {"window_s": 0.0},
        {"trigger_ratio": 1.5},
        {"release_ratio": 0.9},  # not below trigger_ratio
        {"min_interval_s": -1.0},
        {"hangover_s": "1s"},
    ],
)
def test_settings_refused(bad: dict[str, object]) -> None:
    name = next(iter(bad))
    with pytest.raises(ValueError, match=rf"VoiceSettings\.{name} must"):
        VoiceSettings(**bad)  # type: ignore[arg-type]


def test_wrapper_refuses_what_webrtcvad_cannot_take() -> None:
    with pytest.raises(ValueError, match="mode"):
        WebRtcVad(5, 48_000)
    with pytest.raises(ValueError, match="Hz"):
        WebRtcVad(3, 44_100)
    vad = WebRtcVad(3, 48_000)
    assert vad.is_speech(np.zeros(480, np.int16)) is False
    with pytest.raises(ValueError, match="10/20/30 ms"):
        vad.is_speech(np.zeros(1000, np.int16))
    with pytest.raises(ValueError, match="960 int16"):
        VoiceActivityDetector().feed(np.zeros(960, np.float64))
