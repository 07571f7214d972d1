"""The board's detectors together: their settings (``[edge]`` in the agent's config), one
``EdgeAnalyzer`` that feeds every enabled detector each 20 ms frame, and what a detection
becomes when it leaves the board (an ``Alert`` with a severity).

The same analyzer runs on the live capture stream and in ``edge-intercom-agent analyze``,
so a recording people send in exercises exactly the code on their board.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from agent.audio.format import FRAME_BYTES
from agent.edge.alarm import AlarmDetector, AlarmSettings
from agent.edge.alerts import MAX_TEXT, Alert, Severity, new_alert_id
from agent.edge.base import Detection, Detector, FrameSpectrum
from agent.edge.glass import GlassBreakDetector, GlassBreakSettings
from agent.edge.level import (
    LevelMeter,
    LoudNoiseDetector,
    LoudNoiseSettings,
    MicFaultDetector,
    MicFaultSettings,
)
from agent.edge.voice import VoiceActivityDetector, VoiceSettings

DETECTORS = ("alarm", "loud_noise", "mic_fault", "glass_break", "voice")

SEVERITY = {
    "smoke_alarm": Severity.CRITICAL,
    "co_alarm": Severity.CRITICAL,
    "glass_break": Severity.CRITICAL,
    "alarm_sound": Severity.WARNING,
    "loud_noise": Severity.WARNING,
    "mic_silent": Severity.WARNING,
    "mic_stuck": Severity.WARNING,
    "mic_clipping": Severity.WARNING,
    "voice": Severity.INFO,
}
"""What each kind of detection is worth to the person told about it; a full outbox drops
the lowest first."""


@dataclass(frozen=True, slots=True)
class EdgeSettings:
    """``[edge]``: which detectors run on the capture stream, and each one's settings."""

    enabled: tuple[str, ...] = DETECTORS
    """Detectors to run, by name."""
    alarm: AlarmSettings = field(default_factory=AlarmSettings)
    loud_noise: LoudNoiseSettings = field(default_factory=LoudNoiseSettings)
    mic_fault: MicFaultSettings = field(default_factory=MicFaultSettings)
    glass_break: GlassBreakSettings = field(default_factory=GlassBreakSettings)
    voice: VoiceSettings = field(default_factory=VoiceSettings)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.enabled) - set(DETECTORS))
        if unknown:
            raise ValueError(f"unknown detector(s) {unknown}: choose from {', '.join(DETECTORS)}")

    def detectors(self) -> list[Detector]:
        """The enabled detectors of one stream: fed the same frames, they share its FFT."""
        spectrum = FrameSpectrum()
        made: dict[str, Detector] = {
            "alarm": AlarmDetector(self.alarm, spectrum),
            "loud_noise": LoudNoiseDetector(self.loud_noise),
            "mic_fault": MicFaultDetector(self.mic_fault),
            "glass_break": GlassBreakDetector(self.glass_break, spectrum),
            "voice": VoiceActivityDetector(self.voice),
        }
        return [made[name] for name in DETECTORS if name in self.enabled]


class EdgeAnalyzer:
    """Every enabled detector on one stream of 20 ms frames, and its sound level."""

    def __init__(self, settings: EdgeSettings) -> None:
        self.detectors = settings.detectors()
        loud = next((d for d in self.detectors if isinstance(d, LoudNoiseDetector)), None)
        # The loud-noise detector A-weights every frame anyway: its meter is the level.
        self._own_meter = loud is None
        self.levels = LevelMeter() if loud is None else loud.meter
        """The stream's A-weighted level; ``levels.take()`` is its Leq (telemetry)."""

    def feed(self, frame: bytes) -> list[Detection]:
        if len(frame) != FRAME_BYTES:
            raise ValueError(f"expected a {FRAME_BYTES}-byte frame, got {len(frame)} bytes")
        samples = np.frombuffer(frame, "<i2")
        if self._own_meter:
            self.levels.feed(samples)
        found: list[Detection] = []
        for detector in self.detectors:
            found += detector.feed(samples)
        return found


def to_alert(detection: Detection, stream_start_ms: int, now_ms: int) -> Alert:
    """The alert for ``detection`` on a stream that began at ``stream_start_ms`` (epoch)."""
    detail = {"detail": detection.detail[:MAX_TEXT]} if detection.detail else {}
    return Alert(
        id=new_alert_id(),
        detector=detection.detector,
        kind=detection.kind,
        severity=SEVERITY.get(detection.kind, Severity.WARNING),
        start=stream_start_ms + round(detection.start_s * 1000),
        end=stream_start_ms + round(max(detection.end_s, detection.start_s) * 1000),
        confidence=min(1.0, max(0.0, detection.confidence)),
        level=detection.level_dbfs,
        created=now_ms,
        detail=detail,
    )
