"""ALSA capture and playback through PortAudio callbacks, found by name, surviving unplugs.

PortAudio calls us on its own thread; the callbacks only move bytes, note the
time (``_note_callback``) and hand the event to the loop (``_Waker``, a
``call_soon_threadsafe`` that wakes the loop once for the callbacks it has not
run yet). Capture wakes the loop with every buffer; playback only when the loop
waits for one of its callbacks, since its writer runs on a timer of its own.
Everything else (queues, resampling, counters, recovery) happens on the loop.

When a stream dies (stopped by PortAudio, a run of error callbacks, no
callback for ``stall_timeout_s``), the device is "lost": one warning is
logged and an owned task looks for the device by name again every
``reopen_interval_s`` with a fresh PortAudio, so a card that comes back with
another index is found. Until then capture reads silence and playback
discards, both paced by the loop clock, so the call goes on.

PortAudio refreshes its device list only when no instance is left in the
process (see ``pyaudio_backend``). Each stream owns its own instance, so while
the other direction's stream is still open a re-scan sees the old list: a
device whose ALSA name is stable (an ``.asoundrc`` alias by card id, a pulse
PCM) is found again, one that comes back under a new ``hw:N`` name is not.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from agent.audio.format import CHANNELS, FRAME_BYTES, FRAME_SAMPLES, SAMPLE_RATE, SILENCE
from agent.audio.pacing import FramePacer
from agent.audio.pyaudio_backend import ERROR_FLAGS, DeviceInfo, PortAudio, Stream
from agent.audio.resample import FrameResampler

logger = logging.getLogger(__name__)

# Consecutive callbacks flagged with lost samples (1 s of 20 ms buffers) that mean a dead device.
_MAX_ERROR_CALLBACKS = 50
_LEAD_RELAX_S = 60.0  # playback: an underrun-free minute takes one lead step back
_WRITER_IDLE_S = 0.5  # playback: a writer away this long paused (between calls), not late


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """Which ALSA device to use and how to run it."""

    name: str
    """Regex (or, if not a valid regex, a substring), matched case-insensitively against the
    PortAudio device names; an exact name wins over other matches."""
    rate: int = SAMPLE_RATE
    """Rate to open the device at; if it refuses, its default rate is used. Frames are always
    resampled to and from 48 kHz."""
    channels: int = CHANNELS
    """Channels to open the device with: I2S codecs and HATs often take 2 only. Capture keeps
    ``channel``; playback sends the same mono signal to every channel."""
    channel: int = 0
    """Capture: which of ``channels`` is the microphone (0: left). A 2-mic HAT has one mic
    on each; a single I2S mic is on the slot its L/R pin selects (to ground: left)."""
    frames_per_buffer: int = FRAME_SAMPLES
    """Samples per PortAudio callback at 48 kHz (scaled when the device runs at another rate)."""
    queue_frames: int = 10
    """Capture: frames kept for a slow reader; when full the oldest is dropped."""
    prefill_frames: int = 1
    """Playback: frames queued ahead of the device; ``write`` waits while this many are.
    PortAudio keeps its own periods queued too, so one frame here is margin enough: a
    second cost 30 ms of mouth-to-ear delay on the virtual boards and no PESQ."""
    lead_ms: float = 8.0
    """Playback: ``write`` returns this long before the device's next callback is due, not
    as soon as it took the last frame, so that the next frame is made just in time and waits
    ``lead_ms`` in the queue instead of a whole period (12 ms less mouth-to-ear delay at 8).
    Each callback that finds nothing queued (the loop was late) adds ``lead_step_ms``, up to
    a whole period (the frame is then made right after each callback); a minute without
    one takes a step back."""
    lead_step_ms: float = 4.0
    reopen_interval_s: float = 1.0
    """Pause between attempts to find and re-open a lost device."""
    stall_timeout_s: float = 5.0
    """A stream that makes no callback for this long is dead. PulseAudio-backed PCMs make
    their first callback up to ~2 s after opening."""
    watch_interval_s: float = 0.5
    """How often an open stream is checked (stopped, losing samples, stalled): a dead device
    is noticed within this. Each check wakes the event loop, which on a board costs more than
    the check itself; 10 a second per device was a tenth of the loop's wake-ups in a call."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("device name must not be empty")
        if self.rate <= 0 or self.frames_per_buffer <= 0:
            raise ValueError("rate and frames_per_buffer must be positive")
        if self.channels < 1:
            raise ValueError(f"channels must be at least 1, got {self.channels}")
        if not 0 <= self.channel < self.channels:
            raise ValueError(f"channel must be 0..{self.channels - 1}, got {self.channel}")
        if self.queue_frames < 1 or self.prefill_frames < 1:
            raise ValueError("queue_frames and prefill_frames must be at least 1")
        if self.lead_ms < 0 or self.lead_step_ms <= 0:
            raise ValueError("lead_ms must be >= 0 and lead_step_ms > 0")
        if min(self.reopen_interval_s, self.stall_timeout_s, self.watch_interval_s) <= 0:
            raise ValueError(
                "reopen_interval_s, stall_timeout_s and watch_interval_s must be positive"
            )


class DeviceNotFound(Exception):
    """No PortAudio device matches the configured name; the message lists those there are."""

    def __init__(self, pattern: str, kind: str, available: list[str]) -> None:
        self.pattern = pattern
        self.available = available
        names = ", ".join(repr(n) for n in available) or "none"
        super().__init__(f"no {kind} device matches {pattern!r}; available: {names}")


@dataclass(frozen=True, slots=True)
class CaptureStats:
    """Counters of an ``AlsaCapture`` since ``start()``."""

    frames_captured: int
    """48 kHz frames that came from the device."""
    frames_dropped: int
    """Frames dropped (oldest first) because the reader fell behind."""
    silence_frames: int
    """Frames of silence ``read()`` returned while the device was lost."""
    device_lost: int
    """Times the stream died."""
    reopen_attempts: int
    """Attempts to find and re-open the device after it was lost."""
    device_rate: int | None
    """Rate the device is open at; None while it is lost."""


@dataclass(frozen=True, slots=True)
class PlaybackStats:
    """Counters of an ``AlsaPlayback`` since ``start()``."""

    frames_played: int
    """Frames handed to the device."""
    frames_discarded: int
    """Frames thrown away while the device was lost."""
    underruns: int
    """Device callbacks that found nothing queued (after the first write) and played silence."""
    device_lost: int
    """Times the stream died."""
    reopen_attempts: int
    """Attempts to find and re-open the device after it was lost."""
    device_rate: int | None
    """Rate the device is open at; None while it is lost."""
    lead_ms: float
    """How long before the device's next callback ``write`` now returns (``lead_ms`` of the
    config, raised after underruns)."""


def find_device(devices: list[DeviceInfo], pattern: str, *, capture: bool) -> DeviceInfo:
    """The device for ``pattern`` with channels in the wanted direction, or DeviceNotFound."""
    usable = [
        d for d in devices if (d.max_input_channels if capture else d.max_output_channels) > 0
    ]
    try:
        regex = re.compile(pattern, re.IGNORECASE)
    except re.error:
        regex = re.compile(re.escape(pattern), re.IGNORECASE)
    matches = [d for d in usable if regex.search(d.name)]
    exact = [d for d in matches if d.name.casefold() == pattern.casefold()]
    if exact or matches:
        return (exact or matches)[0]
    raise DeviceNotFound(pattern, "capture" if capture else "playback", [d.name for d in usable])


def _pick_channel(data: bytes, channel: int, channels: int) -> bytes:
    """One channel of interleaved int16 samples."""
    return memoryview(data).cast("h")[channel::channels].tobytes()


def _spread(mono: bytes, channels: int) -> bytes:
    """Mono int16 samples copied into each of ``channels``, interleaved."""
    out = bytearray(len(mono) * channels)
    view, samples = memoryview(out).cast("h"), memoryview(mono).cast("h")
    for channel in range(channels):
        view[channel::channels] = samples
    return bytes(out)


PROBE_RATES = (48_000, 44_100, 16_000)
"""Rates ``survey`` tries: the agent's own, then the two other common ones."""


@dataclass(frozen=True, slots=True)
class DeviceReport:
    """One PortAudio device: what it can do, and whether the configuration picks it."""

    device: DeviceInfo
    capture_rates: tuple[int, ...]
    """Of ``PROBE_RATES``, those capture opens at (empty for a playback-only device)."""
    playback_rates: tuple[int, ...]
    """Of ``PROBE_RATES``, those playback opens at (empty for a capture-only device)."""
    selected_for: tuple[str, ...]
    """``capture`` and/or ``playback``: the configured name pattern picks this device."""


def survey(
    capture: DeviceConfig, playback: DeviceConfig, rates: tuple[int, ...] = PROBE_RATES
) -> list[DeviceReport]:
    """Blocking: every device PortAudio sees now, probed at ``rates`` with the configured
    channel count of each direction."""
    pa = PortAudio()
    try:
        devices = pa.devices()
        chosen: dict[int, list[str]] = {}
        for kind, config in (("capture", capture), ("playback", playback)):
            with contextlib.suppress(DeviceNotFound):
                index = find_device(devices, config.name, capture=kind == "capture").index
                chosen.setdefault(index, []).append(kind)

        def accepted(device: DeviceInfo, config: DeviceConfig, *, capture: bool) -> tuple[int, ...]:
            if (device.max_input_channels if capture else device.max_output_channels) == 0:
                return ()
            return tuple(
                r for r in rates if pa.supports(device.index, r, config.channels, capture=capture)
            )

        return [
            DeviceReport(
                device=d,
                capture_rates=accepted(d, capture, capture=True),
                playback_rates=accepted(d, playback, capture=False),
                selected_for=tuple(chosen.get(d.index, ())),
            )
            for d in devices
        ]
    finally:
        pa.terminate()


@dataclass(slots=True)
class _Opened:
    """A stream and the PortAudio instance that owns it."""

    pa: PortAudio
    stream: Stream
    device: DeviceInfo
    rate: int


class _Waker:
    """Hands calls from PortAudio threads to the event loop: ``call_soon_threadsafe`` for the
    device callbacks, shared by every stream on one loop.

    ``call_soon_threadsafe`` makes a handle and writes a byte to the loop's self-pipe for
    every call, and the loop then reads that pipe until it is empty. Here a call that finds
    the loop already woken and not yet run adds itself to that wake-up (callbacks that come
    close together cost one), and the loop reads the pipe once per wake-up.
    """

    _by_loop: ClassVar[dict[asyncio.AbstractEventLoop, _Waker]] = {}
    """Each loop's waker, while a stream uses it (``release`` removes it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._calls: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._woken = False
        self._users = 0
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        loop.add_reader(self._read_fd, self._run)

    @classmethod
    def acquire(cls, loop: asyncio.AbstractEventLoop) -> _Waker:
        """The loop's waker (made on first use); ``release()`` it when done."""
        waker = cls._by_loop.get(loop)
        if waker is None:
            waker = cls._by_loop[loop] = cls(loop)
        waker._users += 1
        return waker

    def release(self) -> None:
        """A stream is done with the waker: the last user closes its pipe, so none of them may
        call back any more."""
        self._users -= 1
        if self._users == 0:
            del self._by_loop[self._loop]
            if not self._loop.is_closed():
                self._loop.remove_reader(self._read_fd)
            os.close(self._read_fd)
            os.close(self._write_fd)

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        """Any thread: run ``fn(*args)`` on the loop soon; RuntimeError once it is closed."""
        if self._users == 0 or self._loop.is_closed():
            raise RuntimeError("event loop is closed")
        self._calls.append((fn, args))
        # The loop clears the flag before it runs what is queued: a call that still finds it
        # set is run by that pass.
        if not self._woken:
            self._woken = True
            with contextlib.suppress(BlockingIOError):  # a full pipe wakes the loop anyway
                os.write(self._write_fd, b"\0")

    def _run(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._read_fd, 4096)
        self._woken = False
        calls = self._calls
        # Only those queued now: later ones woke the loop again, and a device that calls back
        # without pause (a file PCM) must not keep the loop here.
        for _ in range(len(calls)):
            fn, args = calls.popleft()
            try:
                fn(*args)
            except Exception:
                logger.exception("device callback handler failed")


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    # asyncio.wait does not raise the task's CancelledError, yet still propagates our own.
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        logger.error("%s failed", task.get_name(), exc_info=task.exception())


class _DeviceStream(abc.ABC):
    """What capture and playback share: open by name, watch, lose, re-open, close."""

    _kind = ""

    def __init__(self, config: DeviceConfig) -> None:
        self.config = config
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opened: _Opened | None = None
        self._healthy = False
        self._closed = False
        self._generation = 0
        # Written by the PortAudio thread while a stream runs (``_note_callback``).
        self._last_callback = 0.0  # time.monotonic()
        self._error_callbacks = 0
        self._supervisor: asyncio.Task[None] | None = None
        self._waker: _Waker | None = None
        # A PortAudio call running in a worker thread; close() waits for it and cleans up.
        self._in_flight: asyncio.Future[_Opened | None] | None = None
        self._in_flight_since = 0.0
        self._pacer = FramePacer()
        self._device_lost = 0
        self._reopen_attempts = 0

    @property
    def healthy(self) -> bool:
        """True while the device delivers (capture) or takes (playback) real audio."""
        return self._healthy

    def health(self, stall_s: float) -> str | None:
        """What is wrong beyond repair in this process (for the service watchdog): a
        PortAudio call that has not returned for ``stall_s`` (ALSA drivers can hang on
        a yanked card), or a supervisor that died. A lost device is not: it is looked
        for again here, and a restart would not find it sooner."""
        if self._supervisor is not None and self._supervisor.done() and not self._closed:
            return f"{self._kind} supervisor stopped"
        if self._in_flight is not None and not self._in_flight.done() and self._loop is not None:
            waited = self._loop.time() - self._in_flight_since
            if waited > stall_s:
                return f"a PortAudio call on the {self._kind} device hangs ({waited:.0f} s)"
        return None

    async def start(self) -> None:
        """Open the device; raises DeviceNotFound or OSError if that fails now."""
        if self._loop is not None:
            raise RuntimeError(f"{self._kind} already started")
        self._loop = asyncio.get_running_loop()
        self._waker = _Waker.acquire(self._loop)
        try:
            opened = await self._open_in_thread()
        except asyncio.CancelledError:
            await self.close()  # waits for the open to finish and closes what it opened
            raise
        except BaseException:
            self._loop = None
            self._release_waker()
            raise
        assert opened is not None
        self._install(opened, healthy=True)
        logger.info("%s device %r open at %d Hz", self._kind, opened.device.name, opened.rate)
        self._supervisor = self._loop.create_task(
            self._supervise(), name=f"{self._kind}-supervisor:{self.config.name}"
        )

    async def close(self) -> None:
        """Stop the supervisor and close the stream; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._healthy = False
        self._wake()
        if self._supervisor is not None:
            await _cancel_and_wait(self._supervisor)
        if self._in_flight is not None:
            # A worker call outlived the supervisor: let it finish, close what it opened.
            await asyncio.wait({self._in_flight})
            if self._in_flight.exception() is None and (late := self._in_flight.result()):
                await self._run_blocking(functools.partial(self._release, late))
        opened, self._opened = self._opened, None
        if opened is not None:
            await self._run_blocking(functools.partial(self._release, opened))
        # Only now that no stream of ours can call back: the waker's pipe is closed with its
        # last user. A close() cancelled before this leaves it open (two descriptors) rather
        # than close a pipe a PortAudio thread may still write to.
        self._release_waker()

    def _release_waker(self) -> None:
        waker, self._waker = self._waker, None
        if waker is not None:
            waker.release()

    # -- subclass hooks ------------------------------------------------------------------

    @abc.abstractmethod
    def _open_stream(self, pa: PortAudio, device: DeviceInfo, rate: int, gen: int) -> Stream:
        """Blocking: open and start the stream; its callbacks carry ``gen``."""

    @abc.abstractmethod
    def _wake(self) -> None:
        """Wake a reader or writer waiting on the device, to re-check ``healthy``."""

    # -- opening ---------------------------------------------------------------------------

    def _device_frames(self, rate: int) -> int:
        return max(1, round(self.config.frames_per_buffer * rate / SAMPLE_RATE))

    async def _open_in_thread(self) -> _Opened | None:
        # A new generation: callbacks of earlier streams are ignored from now on, and this
        # stream's first callbacks count even before _open returns.
        self._generation += 1
        return await self._run_blocking(functools.partial(self._open, self._generation))

    def _open(self, gen: int) -> _Opened:
        """Blocking: a fresh PortAudio (so the device list is current), find, open."""
        pa = PortAudio()
        try:
            device = find_device(pa.devices(), self.config.name, capture=self._kind == "capture")
            rate = self.config.rate
            try:
                stream = self._open_stream(pa, device, rate, gen)
            except OSError as exc:
                if device.default_rate == rate:
                    raise
                logger.info(
                    "%s device %r refused %d Hz (%s); using its default %d Hz",
                    self._kind, device.name, rate, exc, device.default_rate,
                )  # fmt: skip
                rate = device.default_rate
                stream = self._open_stream(pa, device, rate, gen)
        except BaseException:
            pa.terminate()
            raise
        return _Opened(pa, stream, device, rate)

    def _release(self, opened: _Opened) -> None:
        """Blocking: close a stream, live or dead, and its PortAudio."""
        try:
            opened.stream.close()
        except OSError as exc:
            logger.debug("closing %s stream: %s", self._kind, exc)
        finally:
            opened.pa.terminate()

    async def _run_blocking(self, fn: Callable[[], _Opened | None]) -> _Opened | None:
        """Run a PortAudio call in a worker thread without blocking the loop."""
        loop = asyncio.get_running_loop()
        self._in_flight_since = loop.time()
        self._in_flight = loop.run_in_executor(None, fn)
        # Shielded: if we are cancelled the call still finishes and close() cleans up after it.
        result = await asyncio.shield(self._in_flight)
        self._in_flight = None
        return result

    def _install(self, opened: _Opened, *, healthy: bool) -> None:
        self._opened = opened
        self._error_callbacks = 0
        self._last_callback = time.monotonic()
        self._healthy = healthy

    # -- the PortAudio callbacks' side ---------------------------------------------------------

    def _note_callback(self, gen: int, status: int) -> bool:
        """PortAudio thread: book-keeping for one callback (attributes the loop only reads);
        False if it belongs to a stream we dropped."""
        if gen != self._generation or self._closed:
            return False
        self._last_callback = time.monotonic()
        self._error_callbacks = self._error_callbacks + 1 if status & ERROR_FLAGS else 0
        return True

    def _callback_arrived(self, gen: int) -> bool:
        """Loop: a callback of stream ``gen`` came; False if it belongs to a stream we
        dropped."""
        if gen != self._generation or self._closed:
            return False
        if not self._healthy and self._opened is not None:
            # A re-opened stream counts as back once it actually calls us.
            self._healthy = True
            self._pacer.reset()
            logger.info(
                "%s device %r is back (index %d, %d Hz)",
                self._kind, self._opened.device.name, self._opened.device.index,
                self._opened.rate,
            )  # fmt: skip
        return True

    # -- supervision -------------------------------------------------------------------------

    async def _supervise(self) -> None:
        while True:
            if self._opened is None:
                await asyncio.sleep(self.config.reopen_interval_s)
                await self._reopen()
                continue
            await asyncio.sleep(self.config.watch_interval_s)
            reason = self._failure()
            if reason is not None:
                await self._lose(reason)

    def _failure(self) -> str | None:
        assert self._opened is not None and self._loop is not None
        if not self._opened.stream.is_active():
            return "stream stopped"
        if self._error_callbacks >= _MAX_ERROR_CALLBACKS:
            return f"{self._error_callbacks} callbacks in a row lost samples"
        silent_for = time.monotonic() - self._last_callback
        if silent_for > self.config.stall_timeout_s:
            return f"no callback for {silent_for:.1f} s"
        return None

    async def _lose(self, reason: str) -> None:
        self._generation += 1
        opened, self._opened = self._opened, None
        assert opened is not None
        if self._healthy:
            self._device_lost += 1
            logger.warning(
                "%s device %r lost (%s); trying to re-open it every %.1f s",
                self._kind, opened.device.name, reason, self.config.reopen_interval_s,
            )  # fmt: skip
        elif logger.isEnabledFor(logging.DEBUG):
            logger.debug("re-opened %s device failed again: %s", self._kind, reason)
        self._healthy = False
        self._pacer.reset()
        self._wake()
        await self._run_blocking(functools.partial(self._release, opened))

    async def _reopen(self) -> None:
        self._reopen_attempts += 1
        try:
            opened = await self._open_in_thread()
        except (DeviceNotFound, OSError) as exc:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("re-open of %s device failed: %s", self._kind, exc)
            return
        assert opened is not None
        # Healthy again only at its first callback (PulseAudio takes up to ~2 s).
        self._install(opened, healthy=False)


class AlsaCapture(_DeviceStream):
    """Microphone: ``read()`` returns the next 20 ms 48 kHz frame (silence while lost)."""

    _kind = "capture"

    def __init__(self, config: DeviceConfig) -> None:
        super().__init__(config)
        self._queue: deque[bytes] = deque(maxlen=config.queue_frames)
        self._ready = asyncio.Event()
        self._resampler: FrameResampler | None = None
        self._resampler_key = (0, 0)
        self._captured = 0
        self._dropped = 0
        self._silence = 0

    @property
    def stats(self) -> CaptureStats:
        return CaptureStats(
            frames_captured=self._captured,
            frames_dropped=self._dropped,
            silence_frames=self._silence,
            device_lost=self._device_lost,
            reopen_attempts=self._reopen_attempts,
            device_rate=self._opened.rate if self._opened is not None and self._healthy else None,
        )

    def discard_pending(self) -> int:
        dropped = len(self._queue)
        self._queue.clear()
        return dropped

    async def read(self) -> bytes:
        if self._loop is None or self._closed:
            raise RuntimeError("capture is not running")
        while True:
            if self._queue:
                return self._queue.popleft()
            if not self._healthy:
                await self._pacer.wait()
                self._silence += 1
                return SILENCE
            self._ready.clear()
            await self._ready.wait()

    def _open_stream(self, pa: PortAudio, device: DeviceInfo, rate: int, gen: int) -> Stream:
        waker = self._waker
        assert waker is not None
        deliver = self._deliver

        def on_input(data: bytes, status: int) -> bool:
            # PortAudio thread: hand over and return.
            if not self._note_callback(gen, status):
                return True  # a stream we dropped: it is being closed
            try:
                waker.call(deliver, gen, rate, data, status)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                return False
            return True

        frames = self._device_frames(rate)
        return pa.open_input(device.index, rate, self.config.channels, frames, on_input)

    def _wake(self) -> None:
        self._ready.set()

    def _deliver(self, gen: int, rate: int, data: bytes, status: int) -> None:
        if not self._callback_arrived(gen):
            return
        if self.config.channels > 1:
            data = _pick_channel(data, self.config.channel, self.config.channels)
        if self._resampler is None or self._resampler_key != (gen, rate):
            # Fresh per stream: resampler state must not carry across a re-open.
            self._resampler = FrameResampler(rate, SAMPLE_RATE, FRAME_SAMPLES)
            self._resampler_key = (gen, rate)
        for frame in self._resampler.push(data):
            if len(self._queue) == self._queue.maxlen:
                self._dropped += 1  # the deque drops the oldest on append
            self._queue.append(frame)
            self._captured += 1
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("capture: %d bytes, status %#x, %d queued", len(data), status,
                         len(self._queue))  # fmt: skip
        self._ready.set()


class AlsaPlayback(_DeviceStream):
    """Speaker: ``write()`` queues a 48 kHz frame and waits while ``prefill_frames`` are queued."""

    _kind = "playback"

    def __init__(self, config: DeviceConfig) -> None:
        super().__init__(config)
        # Shared with the PortAudio thread: deque append/popleft are atomic.
        self._buffer: deque[bytes] = deque()
        self._space = asyncio.Event()
        self._resampler: FrameResampler | None = None
        self._silence_chunk = SILENCE
        self._primed = False
        self._played = 0
        self._discarded = 0
        self._underruns = 0  # written only by the PortAudio thread
        self._underruns_seen = 0
        self._period = config.frames_per_buffer / SAMPLE_RATE
        self._lead_floor = min(config.lead_ms / 1000, self._period)
        self._lead_step = config.lead_step_ms / 1000
        self._lead = self._lead_floor
        self._lead_since = 0.0  # time.monotonic() the lead last changed
        self._returned = 0.0  # time.monotonic() write() last returned
        self._callback_gap = 0.0  # seconds between the device's last two callbacks
        self._waiting = False  # the loop waits for a callback to take a frame

    @property
    def stats(self) -> PlaybackStats:
        return PlaybackStats(
            frames_played=self._played,
            frames_discarded=self._discarded,
            underruns=self._underruns,
            device_lost=self._device_lost,
            reopen_attempts=self._reopen_attempts,
            device_rate=self._opened.rate if self._opened is not None and self._healthy else None,
            lead_ms=1000 * self._lead,
        )

    async def write(self, frame: bytes) -> None:
        if len(frame) != FRAME_BYTES:
            raise ValueError(f"expected a {FRAME_BYTES}-byte frame, got {len(frame)} bytes")
        if self._loop is None or self._closed:
            raise RuntimeError("playback is not running")
        if not self._healthy:
            await self._pacer.wait()
            self._discarded += 1
            return
        assert self._resampler is not None
        chunks = self._resampler.push(frame)
        if self.config.channels > 1:
            chunks = [_spread(chunk, self.config.channels) for chunk in chunks]
        self._buffer.extend(chunks)
        self._primed = True
        self._played += 1
        await self._until_due()

    async def _until_room(self, queued: int) -> None:
        """Wait until at most ``queued`` chunks are left (or the device is gone)."""
        # Set before looking: a callback that takes a chunk after we looked then wakes us.
        self._waiting = True
        try:
            while self._healthy and len(self._buffer) > queued:
                self._space.clear()
                await self._space.wait()
        finally:
            self._waiting = False

    async def _until_due(self) -> None:
        """Wait until the device has room and its next callback is ``lead`` away."""
        now = time.monotonic()
        lead, cap = self._lead, self._period
        if self._underruns != self._underruns_seen:
            self._underruns_seen = self._underruns
            if self._returned > now - _WRITER_IDLE_S:
                lead = min(cap, lead + self._lead_step)
        elif lead > self._lead_floor and now - self._lead_since > _LEAD_RELAX_S:
            lead = max(self._lead_floor, lead - self._lead_step)
        if lead != self._lead:
            logger.info("playback lead %.0f -> %.0f ms", 1000 * self._lead, 1000 * lead)
            self._lead, self._lead_since = lead, now
        # Each chunk queued beyond what prefill_frames allows goes at one callback: sleep
        # through them to ``lead`` before the next, a timer and not a wake-up per callback.
        gap = min(cap, self._callback_gap)  # 0 on an unpaced device (a file PCM)
        over = max(0, len(self._buffer) - self.config.prefill_frames + 1)
        due = self._last_callback + (1 + over) * gap - lead
        if self._healthy and due > now:
            await asyncio.sleep(due - now)
        if self._healthy and len(self._buffer) >= self.config.prefill_frames:
            # The device is late (or unpaced): its next callback makes room.
            await self._until_room(self.config.prefill_frames - 1)
            due = self._last_callback + gap - lead
            if self._healthy and due > (now := time.monotonic()):
                await asyncio.sleep(due - now)
        self._returned = time.monotonic()

    async def close(self) -> None:
        """Play what is queued (if the device is taking audio), then close."""
        if self._healthy and not self._closed:
            # Bounded: a device that stalls now must not hold up shutdown.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5 + 0.04 * len(self._buffer)):
                    await self._until_room(0)
        await super().close()

    def _open_stream(self, pa: PortAudio, device: DeviceInfo, rate: int, gen: int) -> Stream:
        waker = self._waker
        assert waker is not None
        freed = self._freed
        frames = self._device_frames(rate)
        channels = self.config.channels
        frame_bytes = 2 * channels  # int16 per channel
        silence = bytes(frames * frame_bytes)

        def on_output(frame_count: int, status: int) -> bytes:
            # PortAudio thread: one queued chunk per call, silence if there is none.
            previous = self._last_callback
            data = silence
            if self._note_callback(gen, status):
                self._callback_gap = self._last_callback - previous
                try:
                    data = self._buffer.popleft()
                except IndexError:
                    if self._primed:
                        self._underruns += 1
                # The writer sleeps on its own timer (_until_due): only a loop waiting for
                # room, or for a re-opened device to call, needs waking.
                if self._waiting or not self._healthy:
                    with contextlib.suppress(RuntimeError):  # loop closed: stream closing
                        waker.call(freed, gen)
            if len(data) != frame_count * frame_bytes:
                data = data[: frame_count * frame_bytes].ljust(frame_count * frame_bytes, b"\0")
            return data

        return pa.open_output(device.index, rate, channels, frames, on_output)

    def _install(self, opened: _Opened, *, healthy: bool) -> None:
        self._buffer.clear()
        self._primed = False
        self._callback_gap = 0.0
        self._resampler = FrameResampler(SAMPLE_RATE, opened.rate, self._device_frames(opened.rate))
        super()._install(opened, healthy=healthy)

    def _wake(self) -> None:
        self._space.set()

    def _freed(self, gen: int) -> None:
        if self._callback_arrived(gen):
            self._space.set()
