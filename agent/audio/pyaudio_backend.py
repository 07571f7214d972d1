"""The only module that touches PyAudio: device listing and callback-mode int16 streams.

PortAudio reads the device list once, when it is initialised, and its
initialisation is reference counted per process: a hot-plugged device only
shows up in a ``PortAudio`` created after every earlier instance was
terminated. Callbacks run on PortAudio's own thread.
"""

from __future__ import annotations

import logging
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


class Stream:
    """An open, started callback-mode stream."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def is_active(self) -> bool:
        """False once the stream stopped by itself (device error, callback abort)."""
        return bool(self._stream.is_active())

    def close(self) -> None:
        """Stop (draining output) and close; raises OSError if PortAudio reports an error."""
        try:
            if not self._stream.is_stopped():
                self._stream.stop_stream()
        finally:
            self._stream.close()


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

    def open_input(
        self,
        index: int,
        rate: int,
        channels: int,
        frames_per_buffer: int,
        callback: InputCallback,
    ) -> Stream:
        """Open and start an int16 capture stream; OSError if the device refuses."""

        def on_buffer(in_data: bytes | None, frame_count: int, _time: Any, status: int) -> Any:
            try:
                keep = callback(in_data or b"", status)
            except Exception:
                logger.exception("capture callback failed; aborting the stream")
                return (None, pyaudio.paAbort)
            return (None, pyaudio.paContinue if keep else pyaudio.paAbort)

        return self._open(
            on_buffer, rate, channels, frames_per_buffer, input=True, input_device_index=index
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

        def on_buffer(_in: bytes | None, frame_count: int, _time: Any, status: int) -> Any:
            try:
                data = callback(frame_count, status)
            except Exception:
                logger.exception("playback callback failed; aborting the stream")
                return (bytes(frame_count * channels * 2), pyaudio.paAbort)
            return (data, pyaudio.paContinue)

        return self._open(
            on_buffer, rate, channels, frames_per_buffer, output=True, output_device_index=index
        )

    def _open(
        self, on_buffer: Any, rate: int, channels: int, frames_per_buffer: int, **direction: Any
    ) -> Stream:
        return Stream(
            self._pa.open(
                format=pyaudio.paInt16,
                channels=channels,
                rate=rate,
                frames_per_buffer=frames_per_buffer,
                stream_callback=on_buffer,
                **direction,
            )
        )

    def terminate(self) -> None:
        """Close this instance's streams and release PortAudio (see the module docstring)."""
        self._pa.terminate()


def list_devices() -> list[DeviceInfo]:
    """The devices PortAudio sees now (a fresh instance, terminated before returning)."""
    pa = PortAudio()
    try:
        return pa.devices()
    finally:
        pa.terminate()
