"""The loop test's analysis (``agent.audio.looptest``) on synthetic recordings: known delays,
levels, clock drift (a recording resampled by a known ratio), noise, a dead microphone, a
disconnected speaker, clipping. Measured accuracy: drift within 0.1 ppm, delay within 0.01
ms without drift."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.audio.format import SAMPLE_RATE
from agent.audio.looptest import (
    FLOOR_DB,
    LoopSignal,
    LoopThresholds,
    analyse_loop,
    dbfs,
    from_pcm,
    loop_signal,
    to_frames,
)

SIGNAL = loop_signal(0.5, 0.3, 6.0)
THRESHOLDS = LoopThresholds()
MARKER_DBFS = dbfs(float(np.sqrt(np.mean(SIGNAL.marker**2))))


def heard(
    signal: LoopSignal = SIGNAL,
    *,
    delay: float = 1234.37,
    gain: float = 0.1,
    ppm: float = 0.0,
    noise: float = 1e-3,
    seed: int = 0,
) -> np.ndarray:
    """What a microphone records from when the first sample is played, 1 s past the end:
    ``signal`` ``delay`` samples later (a fraction too) at ``gain``, through a capture
    clock ``ppm`` fast (the played time of capture sample k is k / (1 + ppm)), plus white
    noise of RMS ``noise``."""
    k = np.arange(len(signal.samples) + SAMPLE_RATE)
    played_at = k / (1 + ppm * 1e-6) - delay
    samples = gain * np.interp(played_at, np.arange(len(signal.samples)), signal.samples, 0, 0)
    rng = np.random.default_rng(seed)
    return np.clip(samples + rng.normal(0.0, noise, len(k)), -1.0, 1.0)


@pytest.mark.parametrize("ppm", [50.0, -120.0, 0.0, 3.3])
@pytest.mark.parametrize("delay", [100.0, 1234.37, 20000.5])
def test_clock_drift_and_delay_are_recovered(ppm: float, delay: float) -> None:
    result = analyse_loop(heard(delay=delay, ppm=ppm), SIGNAL, THRESHOLDS)
    assert result.passed, result.summary()
    assert result.drift_ppm == pytest.approx(ppm, abs=0.1)
    # With drift the sweeps are heard stretched: each lines up best somewhere inside
    # itself, so the first one's delay is off by up to (delay + a sweep) * drift, under 6
    # samples here.
    slack = (delay + len(SIGNAL.marker)) * abs(ppm) * 1e-6 + 0.5
    assert result.delay_ms is not None
    assert result.delay_ms * SAMPLE_RATE / 1000 == pytest.approx(delay, abs=slack)
    if ppm == 0:
        assert result.delay_ms == pytest.approx(1000 * delay / SAMPLE_RATE, abs=0.01)


@pytest.mark.parametrize("gain_db", [0.0, -20.0, -40.0])
def test_loop_level_is_the_gain_of_the_signal_not_of_the_noise(gain_db: float) -> None:
    result = analyse_loop(heard(gain=10 ** (gain_db / 20), noise=3e-3), SIGNAL, THRESHOLDS)
    assert result.passed, result.summary()
    assert result.level_db == pytest.approx(gain_db, abs=0.2)
    assert result.level_dbfs == pytest.approx(MARKER_DBFS + gain_db, abs=0.2)
    assert result.noise_dbfs == pytest.approx(dbfs(3e-3), abs=0.3)
    assert result.snr_db == pytest.approx(result.level_dbfs - dbfs(3e-3), abs=0.3)


def test_a_speaker_wired_the_other_way_round_measures_the_same() -> None:
    result = analyse_loop(heard(gain=-0.1, ppm=-120.0), SIGNAL, THRESHOLDS)
    assert result.passed and result.level_db == pytest.approx(-20.0, abs=0.2)
    assert result.drift_ppm == pytest.approx(-120.0, abs=0.1)


def test_noise_as_loud_as_the_signal_still_finds_it() -> None:
    """0 dB SNR: the sweep's 24,000 samples of correlation gain pull it out of the noise."""
    signal_rms = 0.1 * 10 ** (MARKER_DBFS / 20)
    result = analyse_loop(heard(noise=signal_rms, ppm=50.0), SIGNAL, THRESHOLDS)
    assert result.passed, result.summary()
    assert result.snr_db == pytest.approx(0.0, abs=1.0)
    assert result.drift_ppm == pytest.approx(50.0, abs=1.0)


def test_a_dead_microphone_fails_and_measures_nothing() -> None:
    result = analyse_loop(np.zeros(len(SIGNAL.samples) + SAMPLE_RATE), SIGNAL, THRESHOLDS)
    assert result.failures == ("test signal not heard",)
    assert (result.level_db, result.level_dbfs, result.correlation) == (FLOOR_DB, FLOOR_DB, 0.0)
    assert result.delay_ms is None and result.drift_ppm is None
    record = result.to_record()
    assert record["pass"] is False and record["delay_ms"] is None
    json.dumps(record, allow_nan=False)  # finite figures only


def test_a_disconnected_speaker_leaves_only_room_noise() -> None:
    result = analyse_loop(heard(gain=0.0, noise=0.01), SIGNAL, THRESHOLDS)
    assert not result.passed and result.delay_ms is None
    assert result.failures[0] in ("test signal not heard", "heard something else")
    assert result.noise_dbfs == pytest.approx(-40.0, abs=0.3)


def test_another_loud_sound_is_not_the_signal() -> None:
    """A hum at -20 dBFS: loud enough, but nothing like the sweep."""
    t = np.arange(len(SIGNAL.samples) + SAMPLE_RATE) / SAMPLE_RATE
    result = analyse_loop(0.14 * np.sin(2 * np.pi * 1000 * t), SIGNAL, THRESHOLDS)
    assert result.failures == ("heard something else",), result.summary()


def test_clipping_fails_but_still_measures_the_loop() -> None:
    result = analyse_loop(heard(gain=10.0), SIGNAL, THRESHOLDS)
    assert result.failures == ("clipping",)
    assert result.clipped > 0.1 and result.delay_ms is not None
    assert result.drift_ppm == pytest.approx(0.0, abs=0.5)


def test_delay_and_drift_past_their_thresholds_fail() -> None:
    late = analyse_loop(heard(delay=0.6 * SAMPLE_RATE), SIGNAL, THRESHOLDS)
    assert late.failures == ("delay over 500 ms",)
    assert late.delay_ms == pytest.approx(600.0, abs=0.01)
    fast = analyse_loop(heard(ppm=1500.0), SIGNAL, THRESHOLDS)
    assert fast.failures == ("clock drift over 1000 ppm",)
    assert fast.drift_ppm == pytest.approx(1500.0, abs=0.5)


def test_one_marker_has_no_drift_and_markers_must_not_overlap() -> None:
    single = loop_signal(0.5, 0.3)
    result = analyse_loop(heard(single, delay=480.0), single, THRESHOLDS)
    assert result.passed and result.drift_ppm is None
    assert result.delay_ms == pytest.approx(10.0, abs=0.01)
    with pytest.raises(ValueError, match="overlap"):
        loop_signal(0.5, 0.3, 0.6)
    with pytest.raises(ValueError, match="shorter"):
        analyse_loop(np.zeros(100), SIGNAL, THRESHOLDS)


def test_frames_round_trip() -> None:
    frames = to_frames(SIGNAL.marker)
    assert {len(f) for f in frames} == {1920}
    back = from_pcm(b"".join(frames))[: len(SIGNAL.marker)]
    assert np.max(np.abs(back - SIGNAL.marker)) < 1e-4
