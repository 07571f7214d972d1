"""Streaming int16 mono rate conversion (soxr) that re-chunks into fixed-size frames."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Samples = npt.NDArray[np.int16]


class FrameResampler:
    """Converts a continuous int16 mono stream from ``in_rate`` to ``out_rate``.

    Output comes as frames of exactly ``frame_samples`` samples; the remainder
    waits for the next ``push``. With equal rates it only re-chunks.
    """

    def __init__(self, in_rate: int, out_rate: int, frame_samples: int) -> None:
        if in_rate <= 0 or out_rate <= 0 or frame_samples <= 0:
            raise ValueError("rates and frame size must be positive")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._frame_bytes = frame_samples * 2
        self._stream = None
        if in_rate != out_rate:
            # Loaded only here: a board whose devices open 48 kHz never pays numpy's and
            # soxr's ~15 MB of memory (a Pi Zero has 512 MB).
            import soxr  # noqa: PLC0415

            self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16")
        self._pending = bytearray()

    def push(self, samples: bytes | Samples) -> list[bytes]:
        """Feed input samples (int16 bytes or array); return the frames now complete."""
        if self._stream is None:
            if (
                not self._pending
                and len(samples) == self._frame_bytes
                and isinstance(samples, bytes)
            ):
                return [samples]  # the common case: the device hands over whole 20 ms frames
            self._pending += samples if isinstance(samples, bytes) else samples.tobytes()
        else:
            import numpy as np  # noqa: PLC0415 (loaded with soxr already)

            x = np.frombuffer(samples, "<i2") if isinstance(samples, bytes) else samples
            self._pending += self._stream.resample_chunk(x).astype("<i2").tobytes()
        return self._take()

    def flush(self) -> list[bytes]:
        """End of the stream: drain the resampler and zero-pad the last partial frame."""
        if self._stream is not None:
            import numpy as np  # noqa: PLC0415 (loaded with soxr already)

            tail = self._stream.resample_chunk(np.zeros(0, np.int16), last=True)
            self._pending += tail.astype("<i2").tobytes()
        if self._pending:
            self._pending += bytes(-len(self._pending) % self._frame_bytes)
        return self._take()

    def _take(self) -> list[bytes]:
        n = len(self._pending) // self._frame_bytes * self._frame_bytes
        chunk = bytes(self._pending[:n])
        del self._pending[:n]
        size = self._frame_bytes
        return [chunk[i : i + size] for i in range(0, n, size)]
