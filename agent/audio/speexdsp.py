"""The only module that touches SpeexDSP: its echo canceller and preprocessor, through ctypes.

SpeexDSP (Debian ``libspeexdsp1``) is a C library from Xiph: an MDF echo canceller
(``speex_echo_*``) and a preprocessor (``speex_preprocess_*``) that denoises, controls
the gain and, given the canceller's state, suppresses the echo the filter left. The PyPI
bindings for it are unmaintained (2018), so this module binds the few calls used here by
hand: ctypes needs the shared library only, not its headers or a compiler. The request
numbers below are those of ``speex/speex_echo.h`` and ``speex/speex_preprocess.h``
(SpeexDSP 1.2), which is the library's stable ABI.

Frames are native-endian int16 ``bytes`` of exactly ``frame_size`` samples; each call
is synchronous and short (tens of microseconds at 16 kHz), so the event loop runs them.
A state is freed by ``close`` (or when it is garbage collected).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

_ECHO_SET_SAMPLING_RATE = 24
_PRE_SET_DENOISE = 0
_PRE_SET_AGC = 2
_PRE_SET_AGC_LEVEL = 6
_PRE_SET_NOISE_SUPPRESS = 18
_PRE_SET_ECHO_SUPPRESS = 20
_PRE_SET_ECHO_SUPPRESS_ACTIVE = 22
_PRE_SET_ECHO_STATE = 24
_PRE_SET_AGC_MAX_GAIN = 30

LIBRARY = "libspeexdsp.so.1"
"""The shared object Debian's ``libspeexdsp1`` installs."""


class SpeexError(OSError):
    """The library is missing, or refused a state or a setting."""


@functools.cache
def _lib() -> Any:
    name = ctypes.util.find_library("speexdsp") or LIBRARY
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        raise SpeexError(f"SpeexDSP not found ({exc}): install libspeexdsp1") from exc
    p, i, u = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32
    for fn, args, res in (
        ("speex_echo_state_init", (i, i), p),
        ("speex_echo_state_destroy", (p,), None),
        ("speex_echo_state_reset", (p,), None),
        ("speex_echo_cancellation", (p, ctypes.c_char_p, ctypes.c_char_p, p), None),
        ("speex_echo_ctl", (p, i, p), i),
        ("speex_preprocess_state_init", (i, i), p),
        ("speex_preprocess_state_destroy", (p,), None),
        ("speex_preprocess_run", (p, p), i),
        ("speex_preprocess_ctl", (p, i, p), i),
        ("speex_resampler_init", (u, u, u, i, ctypes.POINTER(i)), p),
        ("speex_resampler_destroy", (p,), None),
        (
            "speex_resampler_process_int",
            (p, u, ctypes.c_char_p, ctypes.POINTER(u), p, ctypes.POINTER(u)),
            i,
        ),
    ):
        func = getattr(lib, fn)
        func.argtypes, func.restype = args, res
    return lib


def available() -> bool:
    """Whether the library loads (tests and benchmarks skip without it)."""
    try:
        _lib()
    except SpeexError:
        return False
    return True


class EchoCanceller:
    """``speex_echo_state``: an adaptive filter of ``filter_length`` samples that removes
    from each microphone frame what the reference frame, played through the room, put there.
    The reference must lead its echo in the microphone by less than the filter length."""

    _state: int | None = None  # until created: ``__del__`` of a half-built one

    def __init__(self, frame_size: int, filter_length: int, rate: int) -> None:
        if frame_size <= 0 or filter_length < frame_size or rate <= 0:
            raise ValueError("frame_size and rate must be positive, filter_length >= frame_size")
        lib = _lib()
        self.frame_size = frame_size
        self._bytes = 2 * frame_size
        self._state = lib.speex_echo_state_init(frame_size, filter_length)
        if not self._state:
            raise SpeexError("speex_echo_state_init failed")
        value = ctypes.c_int(rate)
        lib.speex_echo_ctl(self._state, _ECHO_SET_SAMPLING_RATE, ctypes.byref(value))
        self._out = ctypes.create_string_buffer(self._bytes)

    @property
    def handle(self) -> int:
        """The C state, for ``Preprocessor.attach_echo`` only."""
        if not self._state:
            raise SpeexError("echo canceller closed")
        return int(self._state)

    def cancel(self, mic: bytes, reference: bytes) -> bytes:
        """``mic`` less the echo of ``reference`` (both ``frame_size`` samples, aligned)."""
        if len(mic) != self._bytes or len(reference) != self._bytes:
            raise ValueError(f"frames must be {self._bytes} bytes")
        _lib().speex_echo_cancellation(self.handle, mic, reference, self._out)
        return self._out.raw

    def reset(self) -> None:
        """Forget the learnt echo path (the filter starts from zero)."""
        _lib().speex_echo_state_reset(self.handle)

    def close(self) -> None:
        if self._state:
            _lib().speex_echo_state_destroy(self._state)
            self._state = None

    def __del__(self) -> None:
        self.close()


class Resampler:
    """``speex_resampler``: mono int16 from ``in_rate`` to ``out_rate``, frame in, frame out.

    Unlike a block resampler (soxr hands its output over in bursts of its own block size,
    which re-chunked into 20 ms frames costs up to four frames of delay), it returns
    every call's worth of output at once, ``in_samples * out_rate / in_rate`` samples, with
    the filter's own delay (about 1.5 ms at quality 5) inside them."""

    _state: int | None = None  # until created: ``__del__`` of a half-built one

    def __init__(self, in_rate: int, out_rate: int, in_samples: int, quality: int = 5) -> None:
        if in_samples * out_rate % in_rate:
            raise ValueError(
                f"{in_samples} samples at {in_rate} Hz are no whole number at {out_rate} Hz"
            )
        error = ctypes.c_int(0)
        self._state = _lib().speex_resampler_init(
            1, in_rate, out_rate, quality, ctypes.byref(error)
        )
        if not self._state or error.value:
            raise SpeexError(f"speex_resampler_init failed ({error.value})")
        self._in = in_samples
        self._out_samples = in_samples * out_rate // in_rate
        self._out = ctypes.create_string_buffer(2 * self._out_samples)

    def process(self, frame: bytes) -> bytes:
        """``in_samples`` samples resampled."""
        if len(frame) != 2 * self._in:
            raise ValueError(f"frames must be {2 * self._in} bytes")
        if not self._state:
            raise SpeexError("resampler closed")
        taken, made = ctypes.c_uint32(self._in), ctypes.c_uint32(self._out_samples)
        _lib().speex_resampler_process_int(
            self._state, 0, frame, ctypes.byref(taken), self._out, ctypes.byref(made)
        )
        if taken.value != self._in or made.value != self._out_samples:
            raise SpeexError(f"resampler took {taken.value} and made {made.value} samples")
        return self._out.raw

    def close(self) -> None:
        if self._state:
            _lib().speex_resampler_destroy(self._state)
            self._state = None

    def __del__(self) -> None:
        self.close()


class Preprocessor:
    """``speex_preprocess_state``: noise suppression, automatic gain and, once attached to an
    ``EchoCanceller``, suppression of the echo its filter left (all off until set)."""

    _state: int | None = None  # until created: ``__del__`` of a half-built one

    def __init__(self, frame_size: int, rate: int) -> None:
        if frame_size <= 0 or rate <= 0:
            raise ValueError("frame_size and rate must be positive")
        self.frame_size = frame_size
        self._bytes = 2 * frame_size
        self._state = _lib().speex_preprocess_state_init(frame_size, rate)
        if not self._state:
            raise SpeexError("speex_preprocess_state_init failed")
        self._buffer = ctypes.create_string_buffer(self._bytes)
        self._echo: EchoCanceller | None = None  # kept alive while the C side points at it
        self._set_int(_PRE_SET_DENOISE, 0)
        self._set_int(_PRE_SET_AGC, 0)

    def set_denoise(self, on: bool, suppress_db: int) -> None:
        """Noise suppression on or off, attenuating noise by up to ``suppress_db`` (< 0)."""
        self._set_int(_PRE_SET_DENOISE, int(on))
        self._set_int(_PRE_SET_NOISE_SUPPRESS, suppress_db)

    def set_agc(self, on: bool, level: float, max_gain_db: int) -> None:
        """Automatic gain towards ``level`` (RMS, in int16 units), by at most ``max_gain_db``."""
        self._set_int(_PRE_SET_AGC, int(on))
        if on:
            value = ctypes.c_float(level)
            self._ctl(_PRE_SET_AGC_LEVEL, ctypes.byref(value))
            self._set_int(_PRE_SET_AGC_MAX_GAIN, max_gain_db)

    def attach_echo(self, echo: EchoCanceller, suppress_db: int, active_db: int) -> None:
        """Suppress the residual echo of ``echo`` by up to ``suppress_db`` (< 0), and by up
        to ``active_db`` while the near end talks too."""
        self._echo = echo
        self._ctl(_PRE_SET_ECHO_STATE, ctypes.c_void_p(echo.handle))
        self._set_int(_PRE_SET_ECHO_SUPPRESS, suppress_db)
        self._set_int(_PRE_SET_ECHO_SUPPRESS_ACTIVE, active_db)

    def run(self, frame: bytes) -> bytes:
        """The processed frame (``frame_size`` samples)."""
        if len(frame) != self._bytes:
            raise ValueError(f"frames must be {self._bytes} bytes")
        ctypes.memmove(self._buffer, frame, self._bytes)
        _lib().speex_preprocess_run(self._handle(), self._buffer)
        return self._buffer.raw

    def close(self) -> None:
        if self._state:
            _lib().speex_preprocess_state_destroy(self._state)
            self._state = None
        self._echo = None

    def __del__(self) -> None:
        self.close()

    def _handle(self) -> int:
        if not self._state:
            raise SpeexError("preprocessor closed")
        return int(self._state)

    def _set_int(self, request: int, value: int) -> None:
        self._ctl(request, ctypes.byref(ctypes.c_int(value)))

    def _ctl(self, request: int, arg: Any) -> None:
        if _lib().speex_preprocess_ctl(self._handle(), request, arg) != 0:
            raise SpeexError(f"speex_preprocess_ctl({request}) refused")


__all__ = ["LIBRARY", "EchoCanceller", "Preprocessor", "Resampler", "SpeexError", "available"]
