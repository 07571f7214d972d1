"""One microphone, two consumers: the edge detectors always, a call when one is up.

``CaptureTee`` owns the one reader of the capture source. Every frame goes to
``on_frame`` (the detectors) and into a short queue that the tee's own ``read`` serves:
the tee is the call's ``AudioSource``. Between calls nobody reads that queue: it keeps
only the last ``call_frames`` frames (drop-oldest, counted), and a call's
``discard_pending`` starts it from now, as a device does. Muting wraps the tee, after
the detectors, so a muted board still hears a smoke alarm. Closing the tee stops its
reader; the source stays its opener's to close.

``tap`` records the microphone for the audio self-test (``agent.service.selftest``):
while it is open its frames go into the tap *instead of* to ``on_frame``, so the
detectors do not take the test signal for a sound in the room, and their state (levels,
cool-downs, rate limits) stays as it was before the test. A call's view is unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator

from agent.audio.base import AudioSource, EndOfStream

logger = logging.getLogger(__name__)

CALL_FRAMES = 10
"""Frames (200 ms) the call's view holds while nobody reads it."""
TAP_FRAMES = 50
"""Frames (1 s) a tap holds for a reader that falls behind."""


class FrameQueue:
    """Frames for one reader, the last ``capacity`` kept (drop-oldest, counted)."""

    def __init__(self, capacity: int) -> None:
        self._frames: deque[bytes] = deque(maxlen=capacity)
        self._ready = asyncio.Event()
        self._ended = False
        self.dropped = 0
        """Frames let go because nobody read them in time."""

    def put(self, frame: bytes) -> None:
        if len(self._frames) == self._frames.maxlen:
            self.dropped += 1
        self._frames.append(frame)
        self._ready.set()

    def end(self) -> None:
        """The capture ended: ``read`` raises ``EndOfStream`` once the frames are read."""
        self._ended = True
        self._ready.set()

    async def read(self) -> bytes:
        """The next frame."""
        while not self._frames:
            if self._ended:
                raise EndOfStream("capture ended")
            self._ready.clear()
            await self._ready.wait()
        return self._frames.popleft()

    def clear(self) -> int:
        """Drop what is queued; how many frames that was."""
        dropped = len(self._frames)
        self._frames.clear()
        return dropped


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
        self._call = FrameQueue(call_frames)
        self._tap: FrameQueue | None = None
        self._ended = False
        self._reader: asyncio.Task[None] | None = None
        self._last_frame = 0.0

    @property
    def dropped(self) -> int:
        """Frames the call's view let go because nobody read them."""
        return self._call.dropped

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

    @contextlib.contextmanager
    def tap(self, capacity: int = TAP_FRAMES) -> Iterator[FrameQueue]:
        """The microphone's frames from now on, for a self-test, instead of ``on_frame``
        (module docstring) until the block ends; one tap at a time."""
        if self._tap is not None:
            raise RuntimeError("the microphone is tapped already")
        tap = self._tap = FrameQueue(capacity)
        if self._ended:
            tap.end()
        try:
            yield tap
        finally:
            self._tap = None

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                frame = await self._source.read()
                self._last_frame = loop.time()
                if self._tap is not None:
                    self._tap.put(frame)
                else:
                    try:
                        self._on_frame(frame)
                    except Exception:  # a detector's bug must not take the microphone away
                        logger.exception("edge analysis failed on a frame")
                self._call.put(frame)
        except EndOfStream:
            self._ended = True
            self._call.end()
            if self._tap is not None:
                self._tap.end()

    async def read(self) -> bytes:
        """The call's next frame (``AudioSource``)."""
        return await self._call.read()

    def discard_pending(self) -> int:
        return self._call.clear()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    raise
