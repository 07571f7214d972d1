"""Loud-noise and microphone-fault detectors (``agent.edge.level``) on seeded signals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.edge.level import (
    AWeightedMeter,
    LoudNoiseDetector,
    LoudNoiseSettings,
    MicFaultDetector,
    MicFaultSettings,
    a_weighting,
    dbfs,
    frequency_response,
)
from tools.lab import events as ev
from tools.lab.sounds import concat, detect, frames

# IEC 61672-1 table 3: nominal A-weighting (dB) and class 1 limits (+, -) at 48 kHz rate.
IEC_A = [
    (10.0, -70.4, 3.5, 3.5),
    (31.5, -39.4, 1.5, 1.5),
    (100.0, -19.1, 1.0, 1.0),
    (250.0, -8.6, 1.0, 1.0),
    (1000.0, 0.0, 0.7, 0.7),
    (4000.0, 1.0, 1.0, 1.0),
    (8000.0, -1.1, 1.5, 2.5),
    (10000.0, -2.5, 2.0, 3.0),
    (12500.0, -4.3, 2.0, 5.0),
    (16000.0, -6.6, 2.5, 16.0),
]


@pytest.mark.parametrize(("hz", "nominal", "plus", "minus"), IEC_A)
def test_a_weighting_filter_meets_iec_class_1(
    hz: float, nominal: float, plus: float, minus: float
) -> None:
    b, a = a_weighting(48_000)
    gain = 20 * math.log10(abs(frequency_response(b, a, np.array([hz]), 48_000)[0]))
    assert nominal - minus <= gain <= nominal + plus


SEEDS = range(10)


def lfilter(b: np.ndarray, a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Direct-form IIR, sample by sample: slow, but the plain definition to check against."""
    y = np.zeros(len(x))
    for n in range(len(x)):
        acc = sum(b[k] * x[n - k] for k in range(len(b)) if n - k >= 0)
        acc -= sum(a[k] * y[n - k] for k in range(1, len(a)) if n - k >= 0)
        y[n] = acc / a[0]
    return y


@pytest.mark.parametrize("color", ["white", "pink", "brown"])
def test_meter_matches_time_domain_filter(color: str) -> None:
    x = ev.noise(0.5, -20.0, seed=3, color=color)
    b, a = a_weighting()
    y = lfilter(b, a, x.astype(np.float64))
    reference = dbfs(float(np.mean(y[9600:] ** 2)))  # after the filter settled (0.2 s)
    meter = AWeightedMeter(960)
    squares = [meter.mean_square(f) for f in frames(x)]
    measured = dbfs(float(np.mean(squares[11:])))
    assert measured == pytest.approx(reference, abs=0.5)


@pytest.mark.parametrize(("hz", "expected"), [(1000, -20.0), (100, -39.1), (4000, -19.0)])
def test_meter_weights_tones(hz: int, expected: float) -> None:
    meter = AWeightedMeter(960)
    squares = [meter.mean_square(f) for f in frames(ev.tone(hz, 1.0, -20.0))]
    assert dbfs(float(np.mean(squares[2:]))) == pytest.approx(expected, abs=0.3)


def test_loud_tone_gives_one_detection_with_its_level() -> None:
    detector = LoudNoiseDetector(LoudNoiseSettings(threshold_dbfs=-20, min_duration_s=1.0))
    signal = concat(ev.silence(2.0), ev.tone(1000, 5.0, -10.0), ev.silence(3.0))
    [hit] = detect(detector, signal)
    assert hit.detector == "loud_noise" and hit.kind == "loud_noise"
    assert 2.0 <= hit.start_s <= 2.1
    assert hit.end_s == pytest.approx(hit.start_s + 1.0, abs=0.03)
    assert hit.level_dbfs == pytest.approx(-10.0, abs=0.5)
    assert hit.confidence == pytest.approx(1.0)


def test_confidence_grows_with_the_margin() -> None:
    settings = LoudNoiseSettings(threshold_dbfs=-20, min_duration_s=0.5)
    [near] = detect(LoudNoiseDetector(settings), ev.tone(1000, 2.0, -18.0))
    assert near.confidence == pytest.approx(0.6, abs=0.03)


@pytest.mark.parametrize(
    "signal",
    [
        ev.tone(1000, 5.0, -25.0),  # under the threshold
        ev.tone(1000, 0.8, -10.0),  # loud but shorter than min_duration_s
        ev.tone(60, 5.0, -10.0),  # loud hum, but A-weighting takes 26 dB off
        ev.bursts(20.0, -10.0, on_s=0.5, off_s=1.0, seed=1),  # never 1 s long
        ev.household(60.0, seed=4),
    ],
    ids=["quiet", "short", "hum", "bursts", "household"],
)
def test_no_detection(signal: np.ndarray) -> None:
    settings = LoudNoiseSettings(threshold_dbfs=-20, min_duration_s=1.0)
    assert detect(LoudNoiseDetector(settings), signal) == []


def test_threshold_and_duration_are_settings() -> None:
    quiet = ev.tone(1000, 5.0, -25.0)
    assert detect(LoudNoiseDetector(LoudNoiseSettings(threshold_dbfs=-20)), quiet) == []
    assert len(detect(LoudNoiseDetector(LoudNoiseSettings(threshold_dbfs=-30)), quiet)) == 1
    short = ev.tone(1000, 0.8, -10.0)
    assert len(detect(LoudNoiseDetector(LoudNoiseSettings(min_duration_s=0.5)), short)) == 1


def test_hysteresis_keeps_one_episode_across_small_dips() -> None:
    settings = LoudNoiseSettings(
        threshold_dbfs=-20, hysteresis_db=6, min_duration_s=1.0, release_s=1.0, cooldown_s=0.0
    )
    # Dips to 4 dB under the threshold (within the hysteresis) and short gaps do not split it.
    signal = concat(
        ev.tone(1000, 3.0, -15.0),
        ev.tone(1000, 3.0, -24.0),
        ev.tone(1000, 3.0, -15.0),
        ev.silence(0.5),
        ev.tone(1000, 3.0, -15.0),
    )
    assert len(detect(LoudNoiseDetector(settings), signal)) == 1
    # A dip below threshold - hysteresis for longer than release_s ends the episode.
    signal = concat(ev.tone(1000, 3.0, -15.0), ev.tone(1000, 3.0, -28.0), ev.tone(1000, 3.0, -15.0))
    assert len(detect(LoudNoiseDetector(settings), signal)) == 2


def test_cooldown_suppresses_a_second_episode() -> None:
    signal = concat(ev.tone(1000, 3.0, -10.0), ev.silence(5.0), ev.tone(1000, 3.0, -10.0))
    long = LoudNoiseSettings(cooldown_s=30.0)
    none = LoudNoiseSettings(cooldown_s=0.0)
    assert len(detect(LoudNoiseDetector(long), signal)) == 1
    assert len(detect(LoudNoiseDetector(none), signal)) == 2
    later = concat(signal, ev.silence(30.0), ev.tone(1000, 3.0, -10.0))
    assert len(detect(LoudNoiseDetector(long), later)) == 2


def test_reset_restarts_the_clock() -> None:
    detector = LoudNoiseDetector()
    detect(detector, concat(ev.silence(5.0), ev.tone(1000, 0.5, -10.0)))
    detector.reset()
    [hit] = detect(detector, ev.tone(1000, 2.0, -10.0))
    assert hit.start_s < 0.1 and hit.end_s < 1.1


@pytest.mark.parametrize(
    "bad",
    [
        {"threshold_dbfs": 3.0},
        {"threshold_dbfs": "loud"},
        {"threshold_dbfs": float("nan")},
        {"min_duration_s": -1.0},
        {"hysteresis_db": True},
        {"cooldown_s": -0.1},
    ],
)
def test_loud_settings_refused(bad: dict[str, object]) -> None:
    name = next(iter(bad))
    with pytest.raises(ValueError, match=rf"LoudNoiseSettings\.{name} must be"):
        LoudNoiseSettings(**bad)  # type: ignore[arg-type]


def test_loud_settings_take_toml_ints() -> None:
    settings = LoudNoiseSettings(threshold_dbfs=-30, min_duration_s=2)
    assert isinstance(settings.threshold_dbfs, float) and settings.threshold_dbfs == -30.0


def test_frames_must_be_int16() -> None:
    with pytest.raises(ValueError, match="int16"):
        LoudNoiseDetector().feed(np.zeros(960, np.float32))


# --- microphone faults ---------------------------------------------------------------

FAST = MicFaultSettings(silent_s=5.0, stuck_s=5.0, clip_window_s=5.0, clear_s=1.0)


@pytest.mark.parametrize(
    ("signal", "kind", "confidence", "end_s"),
    [
        (ev.silence(8.0), "mic_silent", 1.0, 6.0),
        (ev.near_silence(8.0, seed=1, lsb=1), "mic_silent", 0.8, 6.0),
        (ev.stuck(8.0, value=12000), "mic_stuck", 1.0, 6.0),
        (ev.stuck(8.0, value=-300, seed=2, jitter_lsb=1), "mic_stuck", 0.8, 6.0),
        (concat(ev.stuck(8.0, value=20000) + ev.noise(8.0, -30, seed=3)), "mic_stuck", 0.8, 6.0),
        # A third of the samples clipped: over 1 % of the 5 s window as soon as it is full.
        (ev.clipped(8.0, seed=4), "mic_clipping", 1.0, 5.0),
    ],
    ids=["zeros", "near-zero", "dc", "dc-jitter", "big-offset", "clipping"],
)
def test_fault_reported_once(
    signal: np.ndarray, kind: str, confidence: float, end_s: float
) -> None:
    signal = concat(ev.noise(1.0, -40.0, seed=9, color="pink"), signal)
    [hit] = detect(MicFaultDetector(FAST), signal)
    assert hit.detector == "mic_fault" and hit.kind == kind
    assert hit.start_s == pytest.approx(1.0, abs=0.05)
    assert hit.end_s == pytest.approx(end_s, abs=0.05)
    assert hit.confidence == pytest.approx(confidence)


@pytest.mark.parametrize(
    "signal",
    [
        ev.noise(60.0, -70.0, seed=5, color="pink"),  # a quiet room: a few LSB, not silent
        ev.household(60.0, seed=6),
        ev.music(30.0, seed=7, rms_dbfs=-14.0),
        concat(ev.silence(4.0), ev.noise(1.0, -40.0, seed=8), ev.silence(4.0)),  # gaps < 5 s
        concat(ev.noise(30.0, -20.0, seed=8) + ev.stuck(30.0, value=2000)),  # a small DC offset
        # 20 ms with a third of its samples clipped every 5 s: 0.13 %, under 1 %.
        concat(*[concat(ev.clipped(0.02, seed=s), ev.noise(4.98, -30, seed=s)) for s in range(12)]),
    ],
    ids=["quiet-room", "household", "loud-music", "short-silences", "small-dc", "rare-clips"],
)
def test_no_fault(signal: np.ndarray) -> None:
    assert detect(MicFaultDetector(FAST), signal) == []


def test_fault_reported_again_only_after_it_clears() -> None:
    detector = MicFaultDetector(FAST)
    talk = ev.noise(3.0, -30.0, seed=1, color="pink")
    # Silence broken by 0.5 s of sound (shorter than clear_s): still the same fault.
    hits = detect(detector, concat(ev.silence(20.0), talk[:24_000], ev.silence(20.0)))
    assert [h.kind for h in hits] == ["mic_silent"]
    # Sound for longer than clear_s clears it; the next silence is a new fault.
    hits = detect(detector, concat(talk, ev.silence(6.0)))
    assert [h.kind for h in hits] == ["mic_silent"]


def test_repeat_option_reports_a_lasting_fault_periodically() -> None:
    settings = MicFaultSettings(silent_s=5.0, repeat_s=10.0)
    hits = detect(MicFaultDetector(settings), ev.silence(36.0))
    assert [round(h.end_s) for h in hits] == [5, 15, 25, 35]
    assert {h.start_s for h in hits} == {0.0}


def test_clipping_hysteresis() -> None:
    settings = MicFaultSettings(clip_window_s=2.0, clip_fraction=0.01, clip_clear_ratio=0.5)
    # 1.3 % clipped (40 ms, a third clipped, every 1 s), then 0.6-1.3 % (within the
    # hysteresis: a burst every 1.5 s) ...
    heavy = concat(
        *[concat(ev.clipped(0.04, seed=s), ev.noise(0.96, -30, seed=s)) for s in range(10)]
    )
    light = concat(
        *[concat(ev.clipped(0.04, seed=s), ev.noise(1.46, -30, seed=s)) for s in range(10)]
    )
    detector = MicFaultDetector(settings)
    assert [h.kind for h in detect(detector, concat(heavy, light, heavy))] == ["mic_clipping"]
    # ... but clean audio for a whole window clears it.
    assert [h.kind for h in detect(detector, concat(ev.noise(3, -30, seed=1), heavy))] == [
        "mic_clipping"
    ]


def test_fault_durations_are_settings() -> None:
    silence = ev.silence(8.0)
    assert detect(MicFaultDetector(MicFaultSettings(silent_s=10.0)), silence) == []
    assert len(detect(MicFaultDetector(MicFaultSettings(silent_s=7.0)), silence)) == 1
    exact = MicFaultSettings(silent_s=5.0, silent_peak=0)
    assert detect(MicFaultDetector(exact), ev.near_silence(8.0, seed=1)) == []


@pytest.mark.parametrize(
    "bad",
    [
        {"silent_peak": -1},
        {"silent_peak": 2.5},
        {"silent_s": 0.0},
        {"stuck_offset": 1.5},
        {"clip_level": 40000},
        {"clip_fraction": 0.0},
        {"repeat_s": "never"},
    ],
)
def test_fault_settings_refused(bad: dict[str, object]) -> None:
    name = next(iter(bad))
    with pytest.raises(ValueError, match=rf"MicFaultSettings\.{name} must be"):
        MicFaultSettings(**bad)  # type: ignore[arg-type]
