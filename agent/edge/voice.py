"""Voice-activity detector: "someone is talking near the board", rate-limited.

Frame decisions come from WebRTC's VAD (``agent.edge._webrtcvad``), made for phones and
cheap on a Pi Zero. Single frames flicker (a door creak, a TV), so a voice segment begins only
when most frames of a short window are voiced and ends after a hangover of mostly unvoiced
frames; and since a household talks for hours, at most one detection per
``min_interval_s`` goes out, the segments held back in between counted in the next one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from agent.audio.format import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE
from agent.edge._webrtcvad import WebRtcVad
from agent.edge.base import Detection, check_settings
from agent.edge.level import dbfs


@dataclass(frozen=True, slots=True)
class VoiceSettings:
    """When frames of speech add up to a "voice present" event."""

    mode: int = 3
    """WebRTC VAD aggressiveness, 0 (keeps most speech) to 3 (fewest false positives)."""
    window_s: float = 0.4
    """Sliding window over which voiced frames are counted."""
    trigger_ratio: float = 0.7
    """A segment begins when this fraction of the window's frames is voiced ..."""
    release_ratio: float = 0.2
    """... and ends once the fraction stays at or below this (hysteresis) ..."""
    hangover_s: float = 1.0
    """... for this long (pauses between words do not split a conversation)."""
    min_level_dbfs: float = -60.0
    """Frames quieter than this (RMS dBFS) count as unvoiced, whatever the VAD says."""
    min_modulation_db: float = 6.0
    """Speech rises and falls with its syllables: a window whose frame levels span less than
    this (a steady tone or hum the VAD takes for a vowel) does not begin a segment."""
    min_interval_s: float = 300.0
    """At most one detection per this interval; segments in between are counted, not sent."""

    def __post_init__(self) -> None:
        check_settings(
            self,
            {
                "mode": (0, 3),
                "window_s": (0.02, 10.0),
                "trigger_ratio": (0.0, 1.0),
                "release_ratio": (0.0, 1.0),
                "hangover_s": (0.0, 600.0),
                "min_level_dbfs": (-140.0, 0.0),
                "min_modulation_db": (0.0, 100.0),
                "min_interval_s": (0.0, 86400.0),
            },
        )
        if self.release_ratio >= self.trigger_ratio:
            raise ValueError(
                "VoiceSettings.release_ratio must be below trigger_ratio, got "
                f"{self.release_ratio!r} >= {self.trigger_ratio!r}"
            )


class VoiceActivityDetector:
    """One ``voice`` detection when a voice segment begins, at most one per interval.

    ``start_s`` is the window's start when the segment was recognised, ``end_s`` that moment;
    confidence is the voiced fraction of the window; ``level_dbfs`` the RMS (unweighted) of
    its voiced frames. ``detail`` counts the segments held back by the rate limit.
    """

    name = "voice"

    def __init__(self, settings: VoiceSettings | None = None) -> None:
        self.settings = s = settings or VoiceSettings()
        self._vad = WebRtcVad(s.mode, SAMPLE_RATE)
        self._size = max(1, round(s.window_s * 1000 / FRAME_MS))
        self.reset()

    def reset(self) -> None:
        self._vad.reset()
        self._samples = 0
        self._window: deque[tuple[float, bool]] = deque(maxlen=self._size)
        self._voiced = 0
        self._active = False
        self._quiet_since: float | None = None
        self._last_sent: float | None = None
        self._held_back = 0

    def feed(self, frame: np.ndarray) -> list[Detection]:
        if frame.shape != (FRAME_SAMPLES,) or frame.dtype != np.int16:
            raise ValueError(
                f"expected {FRAME_SAMPLES} int16 samples, got {frame.dtype} {frame.shape}"
            )
        s = self.settings
        start = self._samples / SAMPLE_RATE
        self._samples += FRAME_SAMPLES
        now = self._samples / SAMPLE_RATE
        x = frame.astype(np.float64)
        mean_square = float(np.dot(x, x)) / FRAME_SAMPLES
        level = dbfs(mean_square)
        voiced = level >= s.min_level_dbfs and self._vad.is_speech(frame)
        if len(self._window) == self._size and self._window[0][1]:
            self._voiced -= 1
        self._window.append((mean_square, voiced))
        self._voiced += voiced
        ratio = self._voiced / self._size

        if self._active:
            if ratio > s.release_ratio:
                self._quiet_since = None
            elif self._quiet_since is None:
                self._quiet_since = start
            elif now - self._quiet_since >= s.hangover_s:
                self._active = False
                self._quiet_since = None
            return []
        if ratio < s.trigger_ratio or self._voiced == 0:
            return []
        levels = [dbfs(e) for e, _ in self._window]
        if max(levels) - min(levels) < s.min_modulation_db:
            return []
        self._active = True
        if self._last_sent is not None and now - self._last_sent < s.min_interval_s:
            self._held_back += 1
            return []
        self._last_sent = now
        held, self._held_back = self._held_back, 0
        energies = [e for e, v in self._window if v]
        level = dbfs(math.fsum(energies) / len(energies))
        return [
            Detection(
                self.name,
                "voice",
                max(0.0, now - self._size * FRAME_MS / 1000),
                now,
                round(ratio, 3),
                round(level, 1),
                f"{held} voice segments held back by the rate limit" if held else "",
            )
        ]
