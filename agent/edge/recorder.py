"""The board's side of alert clips: the last seconds of the microphone, and clips made of them.

``PcmRing`` keeps the last ``before_s`` of capture as PCM (about 96 KB a second): no
audio is encoded until an alert needs a clip, since Opus on every frame would cost
more CPU than all the detectors together. ``ClipRecorder.clip_for`` then takes the
ring's content, waits for ``after_s`` more (at most ``after_s + post_timeout_s`` of
wall time: a stalled or ended microphone cuts the clip short, it does not hold the
alert), encodes it to Opus and seals it (``agent.edge.clip``) in a worker thread, off
the event loop.

``RelayClipKey`` is the relay's public clip key, which the relay puts on the device's
retained ``config`` (``clip_key``); the board keeps the last one it got in its state
directory, so it can seal clips after a restart while the relay is unreachable. Without
a key there is no clip: alerts go without one (counted), never with audio in clear.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from agent.audio.format import FRAME_MS
from agent.codec.opus import OpusConfig, OpusEncoder
from agent.edge.clip import (
    MAX_CLIP_BYTES,
    ClipAudio,
    ClipError,
    ClipSettings,
    SealedClip,
    audio_size,
    public_key_from_text,
    public_key_text,
    seal,
)
from agent.service.files import write_atomic

logger = logging.getLogger(__name__)

CLIP_KEY_FILE: Final = "relay-clip-key"
"""In the state directory: the relay's public clip key (base64), as last received."""


class PcmRing:
    """The last ``frames`` 20 ms frames of capture (bounded: older ones fall out)."""

    def __init__(self, frames: int) -> None:
        self._frames: deque[bytes] = deque(maxlen=frames)

    def append(self, frame: bytes) -> None:
        self._frames.append(frame)

    def snapshot(self) -> list[bytes]:
        """The frames held now, oldest first."""
        return list(self._frames)

    def __len__(self) -> int:
        return len(self._frames)


class RelayClipKey:
    """The relay's public clip key as this board knows it (None: not yet)."""

    def __init__(self, device_id: str, state_dir: Path) -> None:
        self._device_id = device_id
        self._path = state_dir / CLIP_KEY_FILE
        self.current: bytes | None = None
        try:
            self.current = public_key_from_text(self._path.read_text().strip())
        except FileNotFoundError:
            pass
        except (OSError, UnicodeDecodeError, ClipError) as exc:
            logger.error("device %s: %s unusable (a new key comes from the relay): %s",
                         device_id, self._path, exc)  # fmt: skip

    def on_config(self, desired: Mapping[str, object]) -> None:
        """The relay's desired config (retained ``config``); ``clip_key`` if it has one."""
        if "clip_key" not in desired:
            return
        try:
            key = public_key_from_text(desired["clip_key"])
        except ClipError as exc:
            logger.warning("device %s: bad clip key from the relay: %s", self._device_id, exc)
            return
        if key == self.current:
            return
        self.current = key
        # A small file written when the key changes (pairing, a new relay): rare enough to
        # do here rather than in a thread.
        write_atomic(self._path, (public_key_text(key) + "\n").encode(), 0o644)
        logger.info("device %s: relay clip key %s", self._device_id, public_key_text(key)[:8])


@dataclass(slots=True)
class RecorderStats:
    """Counters since start."""

    made: int = 0
    no_key: int = 0
    """Alerts that went without a clip because the relay's clip key was not known."""
    busy: int = 0
    """Alerts that went without a clip because ``max_pending`` clips were being made."""
    cut_short: int = 0
    """Clips with less than ``after_s`` after the event (the microphone stalled or ended)."""
    truncated: int = 0
    """Clips whose last frames were left out to stay within ``MAX_CLIP_BYTES``."""
    failed: int = 0


class _Collecting:
    """The frames after one event, until there are ``wanted`` of them."""

    def __init__(self, wanted: int) -> None:
        self.frames: list[bytes] = []
        self.wanted = wanted
        self.done = asyncio.Event()
        if wanted == 0:
            self.done.set()

    def add(self, frame: bytes) -> None:
        if len(self.frames) < self.wanted:
            self.frames.append(frame)
            if len(self.frames) == self.wanted:
                self.done.set()


def make_clip(
    frames: list[bytes], before: int, settings: ClipSettings, public_key: bytes, alert_id: str
) -> tuple[SealedClip, bool]:
    """Encode ``frames`` (the first ``before`` of them before the event) and seal them for
    ``alert_id``; also whether frames at the end were left out for size. CPU-bound."""
    encoder = OpusEncoder(
        OpusConfig(bitrate=settings.bitrate, complexity=settings.complexity, fec=False)
    )
    packets = [encoder.encode(frame) for frame in frames]
    kept = len(packets)
    while kept and audio_size(packets[:kept]) > MAX_CLIP_BYTES:
        kept -= 1
    audio = ClipAudio(min(before, kept), tuple(packets[:kept]))
    return seal(audio, public_key, alert_id), kept < len(packets)


class ClipRecorder:
    """``on_frame`` for every capture frame; ``clip_for`` when an alert wants a clip."""

    def __init__(self, device_id: str, settings: ClipSettings, key: RelayClipKey) -> None:
        self._device_id = device_id
        self.settings = settings
        self._key = key
        self._ring = PcmRing(settings.before_frames)
        self._collecting: set[_Collecting] = set()
        self._stats = RecorderStats()

    @property
    def stats(self) -> RecorderStats:
        return replace(self._stats)

    def wants(self, kind: str) -> bool:
        """Whether alerts of ``kind`` get a clip."""
        return self.settings.enabled and kind in self.settings.kinds

    def on_frame(self, frame: bytes) -> None:
        self._ring.append(frame)
        for collecting in self._collecting:
            collecting.add(frame)

    def cut_short(self) -> None:
        """Finish every clip being collected with what it has (the capture is ending)."""
        for collecting in self._collecting:
            collecting.done.set()

    async def clip_for(self, alert_id: str) -> str | None:
        """The sealed clip (``Alert.clip``) of the sound around now, for ``alert_id``; None
        if there can be none (logged and counted)."""
        key = self._key.current
        if key is None:
            self._stats.no_key += 1
            logger.warning("device %s: alert %s without a clip: no clip key from the relay yet",
                           self._device_id, alert_id)  # fmt: skip
            return None
        if len(self._collecting) >= self.settings.max_pending:
            self._stats.busy += 1
            logger.warning("device %s: alert %s without a clip: %d clips being made",
                           self._device_id, alert_id, len(self._collecting))  # fmt: skip
            return None
        before = self._ring.snapshot()
        collecting = _Collecting(self.settings.after_frames)
        self._collecting.add(collecting)
        try:
            async with asyncio.timeout(self.settings.after_s + self.settings.post_timeout_s):
                await collecting.done.wait()
        except TimeoutError:
            pass
        finally:
            self._collecting.discard(collecting)
        if len(collecting.frames) < collecting.wanted:
            self._stats.cut_short += 1
            after_s = len(collecting.frames) * FRAME_MS / 1000
            logger.info("device %s: clip of alert %s cut short at %.2f s after the event",
                        self._device_id, alert_id, after_s)  # fmt: skip
        frames = before + collecting.frames
        if not frames:
            return None
        try:
            sealed, truncated = await asyncio.to_thread(
                make_clip, frames, len(before), self.settings, key, alert_id
            )
        except Exception:
            self._stats.failed += 1
            logger.exception("device %s: clip of alert %s failed", self._device_id, alert_id)
            return None
        self._stats.made += 1
        self._stats.truncated += truncated
        return sealed.to_text()


__all__ = ["CLIP_KEY_FILE", "ClipRecorder", "PcmRing", "RecorderStats", "RelayClipKey", "make_clip"]
