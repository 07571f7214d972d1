"""The interfaces every audio source and sink implements (devices, files, tones)."""

from typing import Protocol


class EndOfStream(Exception):
    """The source has no more frames (end of a file); devices never raise it."""


class AudioSource(Protocol):
    """Yields 20 ms frames of 48 kHz mono int16 (``format.FRAME_BYTES`` bytes)."""

    async def read(self) -> bytes:
        """Wait for and return the next frame; raise EndOfStream when exhausted."""
        ...

    def discard_pending(self) -> int:
        """Drop audio captured but not read yet, so that a call starts from now (a device
        keeps capturing between calls); returns how many frames were dropped."""
        ...

    async def close(self) -> None: ...


class AudioSink(Protocol):
    """Consumes 20 ms frames; ``write`` waits while the sink is full, which paces the caller."""

    async def write(self, frame: bytes) -> None: ...

    async def close(self) -> None: ...
