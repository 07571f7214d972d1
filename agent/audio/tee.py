"""One microphone, two consumers: the edge detectors always, a call when one is up.

``CaptureTee`` owns the one reader of the capture source. Every frame goes to
``on_frame`` (the detectors) and into a short queue that the tee's own ``read`` serves:
the tee is the call's ``AudioSource``. Between calls nobody reads that queue: it keeps
only the last ``call_frames`` frames (drop-oldest, counted), and a call's
``discard_pending`` starts it from now, as a device does. Muting wraps the tee, after
the detectors, so a muted board still hears a smoke alarm. Closing the tee stops its
reader; the source stays its opener's to close.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from agent.audio.base import AudioSource, EndOfStream

logger = logging.getLogger(__name__)

CALL_FRAMES = 10
"""Frames (200 ms) the call's view holds while nobody reads it."""


class CaptureTee:
    def __init__(
        self,
        source: AudioSource,
        on_frame: Callable[[bytes], None],
        *,
        call_frames: int = CALL_FRAMES,
    ) -> None:
        self._source = source
        self._on_frame = on_frame
        self._frames: deque[bytes] = deque(maxlen=call_frames)
        self._ready = asyncio.Event()
        self._ended = False
        self._reader: asyncio.Task[None] | None = None
        self._last_frame = 0.0
        self.dropped = 0
        """Frames the call's view let go because nobody read them."""

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_frame = loop.time()
        self._reader = loop.create_task(self._read(), name="capture-tee")

    def health(self, stall_s: float) -> str | None:
        """What is wrong with the microphone's stream (for the service watchdog): it
        ended, its reader died, or no frame came for ``stall_s`` (a lost device still
        gives paced silence, so this is a stuck stream, not an unplugged card)."""
        if self._ended:
            return "capture ended"
        if self._reader is not None and self._reader.done():
            return "capture reader stopped"
        idle = asyncio.get_running_loop().time() - self._last_frame
        return f"no microphone frame for {idle:.0f} s" if idle > stall_s else None

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                frame = await self._source.read()
                self._last_frame = loop.time()
                try:
                    self._on_frame(frame)
                except Exception:  # a detector's bug must not take the microphone away
                    logger.exception("edge analysis failed on a frame")
                if len(self._frames) == self._frames.maxlen:
                    self.dropped += 1
                self._frames.append(frame)
                self._ready.set()
        except EndOfStream:
            self._ended = True
            self._ready.set()

    async def read(self) -> bytes:
        """The call's next frame (``AudioSource``)."""
        while not self._frames:
            if self._ended:
                raise EndOfStream("capture ended")
            self._ready.clear()
            await self._ready.wait()
        return self._frames.popleft()

    def discard_pending(self) -> int:
        dropped = len(self._frames)
        self._frames.clear()
        return dropped

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    raise
