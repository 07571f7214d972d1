"""The detectors together: ``[edge]`` settings from the agent's TOML, ``analyze`` over a
recording (any rate, stereo), and what a detection becomes when it leaves the board."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soxr

from agent.audio.format import SAMPLE_RATE
from agent.edge.alarm import AlarmDetector
from agent.edge.alerts import Severity
from agent.edge.base import Detection
from agent.edge.glass import GlassBreakDetector
from agent.edge.pipeline import DETECTORS, EdgeAnalyzer, EdgeSettings, to_alert
from agent.service.config import load_config
from agent.service.tomlconf import ConfigError
from tools.lab import events as ev
from tools.lab import sounds
from tools.lab.fleet import AGENT_CMD, REPO
from tools.lab.virtual_audio import write_wav

AT = 4.0


def test_edge_settings_come_from_the_agent_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        '[edge]\nenabled = ["alarm", "mic_fault"]\n[edge.loud_noise]\nthreshold_dbfs = -12\n'
    )
    edge = load_config(path).edge
    assert edge.enabled == ("alarm", "mic_fault")
    assert edge.loud_noise.threshold_dbfs == -12.0
    assert [d.name for d in edge.detectors()] == ["alarm", "mic_fault"]
    assert [d.name for d in EdgeSettings().detectors()] == list(DETECTORS)
    path.write_text('[edge]\nenabled = ["alarm", "smoke"]\n')
    with pytest.raises((ConfigError, ValueError), match="smoke"):
        load_config(path)
    path.write_text("[edge.alarm]\nno_such_key = 1\n")
    with pytest.raises(ConfigError, match="no_such_key"):
        load_config(path)


def test_analyze_reports_a_smoke_alarm_in_a_stereo_44k1_recording(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    alarm = sounds.alarm(rng, "smoke_alarm", 16.0)
    clip = sounds.to_int16(sounds.mix(alarm.samples, sounds.household(rng, 24.0), 10.0, AT))
    at_44k1 = soxr.resample(clip.astype(np.float32) / 32768, SAMPLE_RATE, 44_100)
    stereo = np.round(np.stack([at_44k1, at_44k1 * 0.5], axis=1) * 32767).astype(np.int16)
    wav = write_wav(tmp_path / "hall.wav", stereo, rate=44_100, channels=2)
    done = subprocess.run(
        [*AGENT_CMD, "analyze", str(wav)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = [json.loads(line) for line in done.stdout.splitlines()]
    smoke = [f for f in found if f["kind"] == "smoke_alarm"]
    assert len(smoke) == 1, found
    assert AT - 0.5 <= smoke[0]["start_s"] <= AT + 8.0, smoke
    assert smoke[0]["detector"] == "alarm" and 0 < smoke[0]["confidence"] <= 1


def test_a_detection_becomes_an_alert_with_its_severity_and_wall_clock_times() -> None:
    start = 1_800_000_000_000
    smoke = Detection("alarm", "smoke_alarm", 12.5, 17.25, 0.9, -21.0, "T3, 3.1 kHz")
    alert = to_alert(smoke, start, start + 20_000)
    assert (alert.kind, alert.severity) == ("smoke_alarm", Severity.CRITICAL)
    assert (alert.start, alert.end, alert.created) == (
        start + 12_500,
        start + 17_250,
        start + 20_000,
    )
    assert alert.detail == {"detail": "T3, 3.1 kHz"}
    voice = to_alert(Detection("voice", "voice", 1.0, 2.0, 0.6, -40.0), start, start)
    assert voice.severity is Severity.INFO and voice.id != alert.id


def test_detectors_sharing_the_frame_fft_find_what_each_finds_alone() -> None:
    """The alarm and glass-break detectors of one stream share each frame's FFT: together
    they report exactly what each reports on its own, also when a capture loop refills one
    array in place for every frame (no frame may be taken for the one before)."""
    rng = np.random.default_rng(3)
    smoke = sounds.to_int16(sounds.alarm(rng, "smoke_alarm", 14.0).samples)
    glass = ev.pad(ev.glass_break(2), before_s=1.0, after_s=2.0)
    clip = sounds.concat(glass, smoke, glass)
    alone = sounds.detect(AlarmDetector(), clip) + sounds.detect(GlassBreakDetector(), clip)
    assert sorted(d.kind for d in alone) == ["glass_break", "glass_break", "smoke_alarm"]
    for refill in (False, True):
        detectors = EdgeSettings(enabled=("alarm", "glass_break")).detectors()
        buffer = np.zeros(960, np.int16)
        together: list[Detection] = []
        for frame in sounds.frames(clip):
            buffer[:] = frame
            fed = buffer if refill else frame
            for detector in detectors:
                together += detector.feed(fed)
        assert sorted(together, key=lambda d: (d.start_s, d.kind)) == sorted(
            alone, key=lambda d: (d.start_s, d.kind)
        )
    analyzer = EdgeAnalyzer(EdgeSettings(enabled=("alarm", "glass_break")))
    found = [d for frame in sounds.frames(clip) for d in analyzer.feed(frame.tobytes())]
    assert sorted(found, key=lambda d: (d.start_s, d.kind)) == sorted(
        alone, key=lambda d: (d.start_s, d.kind)
    )
