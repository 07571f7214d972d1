"""The only module that touches PyAudio: device listing and callback-mode int16 streams.

PortAudio reads the device list once, when it is initialised, and its
initialisation is reference counted per process: a hot-plugged device only
shows up in a ``PortAudio`` created after every earlier instance was
terminated. Callbacks run on PortAudio's own thread.

PyAudio enters Python from that thread with ``PyGILState_Ensure``/``Release``
around every callback. For a thread Python did not start, that pair creates
and destroys a Python thread state each time (on 3.11: an mmap and munmap of
its frame stack, a gettid, and the GIL held through the teardown, so the
event loop waits for it): 50 times a second per stream. Each stream keeps
one outer ``Ensure`` outstanding on its callback thread instead, the pattern
CPython's C-API documentation gives for repeated calls from a foreign thread,
and gives it back on that same thread before the stream stops
(``_PinnedThreadState``). Only that thread may give it back: a stream whose
callback thread ended by itself (a device error stops PortAudio's thread
without a last callback) leaves its state allocated, a few KB, until the
process exits; ``Stream.close`` logs each one. Streams still open at
interpreter shutdown behave as before: their threads exit when they next
need the GIL.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyaudio

logger = logging.getLogger(__name__)

InputCallback = Callable[[bytes, int], bool]
"""``(data, status_flags) -> keep_running``; ``data`` is a private copy of the buffer."""

OutputCallback = Callable[[int, int], bytes]
"""``(frame_count, status_flags) -> data`` of exactly ``frame_count`` int16 samples per channel."""

ERROR_FLAGS: int = (
    pyaudio.paInputUnderflow
    | pyaudio.paInputOverflow
    | pyaudio.paOutputUnderflow
    | pyaudio.paOutputOverflow
)
"""Callback status flags that mean the device lost samples (``paPrimingOutput`` is not one)."""


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One PortAudio device; ``index`` is only valid for the ``PortAudio`` that listed it."""

    index: int
    """PortAudio device index (changes across hot-plug and re-initialisation)."""
    name: str
    """PortAudio device name (for ALSA, the PCM name or card description)."""
    max_input_channels: int
    """0 for playback-only devices."""
    max_output_channels: int
    """0 for capture-only devices."""
    default_rate: int
    """The device's default sample rate in Hz."""


# Private function objects: ``pythonapi[name]`` makes a new one, whose argtypes are ours alone.
_gil_ensure = ctypes.pythonapi["PyGILState_Ensure"]
_gil_ensure.argtypes = ()
_gil_ensure.restype = ctypes.c_int
_gil_release = ctypes.pythonapi["PyGILState_Release"]
_gil_release.argtypes = (ctypes.c_int,)
_gil_release.restype = None
_GIL_LOCKED = 0  # PyGILState_LOCKED: what Ensure returns on a thread that holds the GIL
# How long closing waits for the callback thread to give its state back: a few periods of a
# running stream (a stalled one gives nothing back; closing goes on without it).
_UNPIN_TIMEOUT_S = 0.5


class _PinnedThreadState:
    """Keeps the Python thread state of one stream's callback thread alive between callbacks.

    ``enter()`` runs first in every callback (GIL held, so ``PyGILState_Ensure`` only counts
    one more user of the thread's state): the first call takes the outer reference. After
    ``unpin()`` the next callback gives it back, still on its own thread, so PyAudio's
    ``Release`` at the end of that callback deletes the state as it always did.
    """

    __slots__ = ("_lock", "_pinned", "_released", "_unpinning")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pinned = False
        self._unpinning = False
        self._released = threading.Event()

    def enter(self) -> None:
        """Callback thread, GIL held: pin on the first call, give back once asked to."""
        if self._pinned != self._unpinning:
            return  # pinned and not asked to give it back (the common case), or given back
        with self._lock:
            if self._pinned and self._unpinning:
                _gil_release(_GIL_LOCKED)
                self._pinned = False
                self._released.set()
            elif not self._pinned and not self._unpinning:
                _gil_ensure()
                self._pinned = True

    def leave(self) -> None:
        """Callback thread, GIL held: the stream ends with this callback; give the state back."""
        self._unpinning = True
        self.enter()

    def unpin(self, timeout: float) -> None:
        """Any other thread: have the callback thread give its state back at its next callback,
        waiting up to ``timeout`` for it."""
        with self._lock:
            self._unpinning = True
            if not self._pinned:
                return
        self._released.wait(timeout)

    @property
    def left_behind(self) -> bool:
        """Still pinned: once no more callbacks can come, the state will never be given back."""
        with self._lock:
            return self._pinned


class Stream:
    """An open, started callback-mode stream."""

    def __init__(self, stream: Any, pin: _PinnedThreadState) -> None:
        self._stream = stream
        self._pin = pin

    def is_active(self) -> bool:
        """False once the stream stopped by itself (device error, callback abort)."""
        return bool(self._stream.is_active())

    def close(self) -> None:
        """Stop (draining output) and close; raises OSError if PortAudio reports an error."""
        try:
            if not self._stream.is_stopped():
                if self._stream.is_active():
                    self._pin.unpin(_UNPIN_TIMEOUT_S)
                self._stream.stop_stream()
        finally:
            self._stream.close()
            # Closed: no callback can come any more to give the state back.
            if self._pin.left_behind:
                logger.info(
                    "stream ended without a last callback; its callback thread's Python "
                    "thread state stays allocated (a few KB)"
                )


class PortAudio:
    """One PortAudio initialisation; ``terminate()`` closes every stream it opened."""

    def __init__(self) -> None:
        self._pa: Any = pyaudio.PyAudio()

    def devices(self) -> list[DeviceInfo]:
        """Every device PortAudio saw when this instance was created."""
        found = []
        for index in range(self._pa.get_device_count()):
            info = self._pa.get_device_info_by_index(index)
            found.append(
                DeviceInfo(
                    index=index,
                    name=str(info["name"]),
                    max_input_channels=int(info["maxInputChannels"]),
                    max_output_channels=int(info["maxOutputChannels"]),
                    default_rate=round(float(info["defaultSampleRate"])),
                )
            )
        return found

    def supports(self, index: int, rate: int, channels: int, *, capture: bool) -> bool:
        """Whether the device opens int16 at ``rate`` with ``channels`` (ALSA opens it to see)."""
        direction = "input" if capture else "output"
        try:
            return bool(
                self._pa.is_format_supported(
                    rate,
                    **{
                        f"{direction}_device": index,
                        f"{direction}_channels": channels,
                        f"{direction}_format": pyaudio.paInt16,
                    },
                )
            )
        except ValueError:  # PyAudio's way of saying no (with PortAudio's reason)
            return False

    def open_input(
        self,
        index: int,
        rate: int,
        channels: int,
        frames_per_buffer: int,
        callback: InputCallback,
    ) -> Stream:
        """Open and start an int16 capture stream; OSError if the device refuses."""
        pin = _PinnedThreadState()

        def on_buffer(in_data: bytes | None, frame_count: int, _time: Any, status: int) -> Any:
            pin.enter()
            try:
                if callback(in_data or b"", status):
                    return (None, pyaudio.paContinue)
            except Exception:
                logger.exception("capture callback failed; aborting the stream")
            pin.leave()
            return (None, pyaudio.paAbort)

        return self._open(
            on_buffer, pin, rate, channels, frames_per_buffer, input=True, input_device_index=index
        )

    def open_output(
        self,
        index: int,
        rate: int,
        channels: int,
        frames_per_buffer: int,
        callback: OutputCallback,
    ) -> Stream:
        """Open and start an int16 playback stream; OSError if the device refuses."""
        pin = _PinnedThreadState()

        def on_buffer(_in: bytes | None, frame_count: int, _time: Any, status: int) -> Any:
            pin.enter()
            try:
                return (callback(frame_count, status), pyaudio.paContinue)
            except Exception:
                logger.exception("playback callback failed; aborting the stream")
            pin.leave()
            return (bytes(frame_count * channels * 2), pyaudio.paAbort)

        return self._open(
            on_buffer,
            pin,
            rate,
            channels,
            frames_per_buffer,
            output=True,
            output_device_index=index,
        )

    def _open(
        self,
        on_buffer: Any,
        pin: _PinnedThreadState,
        rate: int,
        channels: int,
        frames_per_buffer: int,
        **direction: Any,
    ) -> Stream:
        return Stream(
            self._pa.open(
                format=pyaudio.paInt16,
                channels=channels,
                rate=rate,
                frames_per_buffer=frames_per_buffer,
                stream_callback=on_buffer,
                **direction,
            ),
            pin,
        )

    def terminate(self) -> None:
        """Close this instance's streams and release PortAudio (see the module docstring)."""
        self._pa.terminate()
