"""The detectors' benchmark, short: a small corpus from a fixed seed, every detector scored.

What matters is checked, not how fast: alarms at 0 dB SNR and above are found and never
taken for each other, nothing in the look-alikes or the background raises an alert, the
other detectors find their labelled events, and the figures are all there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.bench import detect as bench

KINDS = {"smoke_alarm", "co_alarm", "alarm_sound", "glass_break", "loud_noise", "voice",
         "mic_silent", "mic_stuck", "mic_clipping"}  # fmt: skip


def test_detect_benchmark_scores_every_detector(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bench.main(
        [
            "--seed", "11", "--episodes", "3", "--snrs", "0", "20", "--glass-snrs", "10", "20",
            "--lookalikes", "10", "--negative-hours", "0.1", "--dir", str(tmp_path),
        ]
    )  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert lines[0].startswith("detect: ")
    detectors = result["detectors"]
    assert set(detectors) == KINDS, detectors
    for kind in ("smoke_alarm", "co_alarm"):
        figures = detectors[kind]
        assert figures["recall_snr_ge_0"] == 1.0 and figures["confused"] == 0, (kind, figures)
        assert figures["precision"] == 1.0, (kind, figures)
        assert 0 < figures["latency_s"]["p50"] <= figures["latency_s"]["p95"], figures
    assert detectors["glass_break"]["recall"] >= 0.5, detectors["glass_break"]
    for kind in ("loud_noise", "voice", "mic_silent", "mic_stuck", "mic_clipping"):
        assert detectors[kind]["recall"] == 1.0, (kind, detectors[kind])
    # Nothing played as a negative raised an alert.
    assert result["false_alarm_sources"] == {}
    for kind, figures in detectors.items():
        assert figures.get("false_alarms_per_hour", 0) == 0, (kind, figures)
    assert result["negative_hours"] >= 0.1
    assert result["cpu_per_audio_s"] > 0 and result["opus_encode_cpu_per_audio_s"] > 0
    assert set(result["cpu_per_audio_s_by_detector"]) == {
        "AlarmDetector", "LoudNoiseDetector", "MicFaultDetector", "GlassBreakDetector",
        "VoiceActivityDetector",
    }  # fmt: skip
