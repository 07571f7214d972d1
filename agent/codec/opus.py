"""Opus through opuslib's ctypes bindings: the only module that imports opuslib.

We call libopus through ``opuslib.api`` with preallocated buffers rather than
opuslib's ``Encoder``/``Decoder`` classes: those build a Python list of every
sample per decode, and their ``inband_fec`` setter is broken in 3.0.1.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import cast

import opuslib
import opuslib.api.ctl as _ctl
import opuslib.api.decoder as _dec
import opuslib.api.encoder as _enc

from agent.audio.format import CHANNELS, FRAME_BYTES, FRAME_SAMPLES, SAMPLE_RATE

_MAX_PACKET = 1275  # largest Opus frame (RFC 6716 3.2.1)
_INT16_P = ctypes.POINTER(ctypes.c_int16)

# opus_encode with the PCM as a plain buffer: bytes pass straight through, where opuslib's
# prototype (an int16 pointer) needs a ctypes.cast per frame. ``libopus[name]`` makes a new
# function object, so opuslib's own prototype is left as it is.
_opus_encode = opuslib.api.libopus["opus_encode"]
_opus_encode.argtypes = (_enc.EncoderPointer, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_int32)  # fmt: skip
_opus_encode.restype = ctypes.c_int32


class CodecError(Exception):
    """libopus refused a call (bad packet, bad setting)."""


@dataclass(frozen=True, slots=True)
class OpusConfig:
    """Encoder settings; the decoder needs none."""

    bitrate: int = 32_000
    """Target bit rate in bit/s (VBR)."""
    complexity: int = 9
    """0 (cheapest) to 10 (best); the board profile lowers it on slow CPUs."""
    fec: bool = True
    """In-band FEC (LBRR): each packet carries a coarse copy of the previous frame."""
    dtx: bool = False
    """Discontinuous transmission: near-empty packets during silence."""
    packet_loss_perc: int = 0
    """Initial expected loss in percent; RTCP reports update it during a call."""

    def __post_init__(self) -> None:
        if not 6_000 <= self.bitrate <= 510_000:
            raise ValueError(f"opus bitrate {self.bitrate} outside 6000..510000")
        if not 0 <= self.complexity <= 10:
            raise ValueError(f"opus complexity {self.complexity} outside 0..10")
        if not 0 <= self.packet_loss_perc <= 100:
            raise ValueError(f"opus packet_loss_perc {self.packet_loss_perc} outside 0..100")


def _check(result: int) -> int:
    if result < 0:
        raise CodecError(f"libopus error {result}: {opuslib.exceptions.OpusError(result)}")
    return result


class OpusEncoder:
    """Encodes 20 ms frames of 48 kHz mono int16 into Opus packets (VOIP mode)."""

    def __init__(self, config: OpusConfig) -> None:
        try:
            self._state = _enc.create_state(SAMPLE_RATE, CHANNELS, opuslib.APPLICATION_VOIP)
        except opuslib.OpusError as exc:
            raise CodecError(str(exc)) from exc
        self._out = ctypes.create_string_buffer(_MAX_PACKET)
        self._loss = -1
        for request, value in (
            (_ctl.set_bitrate, config.bitrate),
            (_ctl.set_complexity, config.complexity),
            (_ctl.set_inband_fec, int(config.fec)),
            (_ctl.set_dtx, int(config.dtx)),
            (_ctl.set_signal, opuslib.SIGNAL_VOICE),
        ):
            _enc.encoder_ctl(self._state, request, value)
        self.set_packet_loss(config.packet_loss_perc)

    def set_packet_loss(self, percent: int) -> None:
        """Tell the encoder how much loss to expect; it sizes the FEC to match."""
        percent = max(0, min(100, percent))
        if percent != self._loss:
            _enc.encoder_ctl(self._state, _ctl.set_packet_loss_perc, percent)
            self._loss = percent

    @property
    def packet_loss(self) -> int:
        return self._loss

    def encode(self, pcm: bytes) -> bytes:
        """One frame (``FRAME_BYTES`` bytes) in, one packet out (1-2 bytes in DTX silence)."""
        if len(pcm) != FRAME_BYTES:
            raise CodecError(f"expected a {FRAME_BYTES}-byte frame, got {len(pcm)} bytes")
        n = _opus_encode(self._state, pcm, FRAME_SAMPLES, self._out, _MAX_PACKET)
        # A slice of a c_char array is bytes (typeshed says list): one copy of n bytes.
        return cast(bytes, self._out[: _check(n)])

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state is not None:
            _enc.destroy(state)


class OpusDecoder:
    """Decodes packets to 20 ms frames, recovers a lost frame from FEC, or conceals it."""

    def __init__(self) -> None:
        try:
            self._state = _dec.create_state(SAMPLE_RATE, CHANNELS)
        except opuslib.OpusError as exc:
            raise CodecError(str(exc)) from exc
        self._pcm = (ctypes.c_int16 * FRAME_SAMPLES)()
        self._pcm_p = ctypes.cast(self._pcm, _INT16_P)

    def _run(self, data: bytes | None, fec: int) -> bytes:
        n = _dec.libopus_decode(
            self._state, data, len(data) if data else 0, self._pcm_p, FRAME_SAMPLES, fec
        )
        if _check(n) != FRAME_SAMPLES:
            raise CodecError(f"packet holds {n} samples, expected one 20 ms frame")
        return bytes(self._pcm)

    def decode(self, packet: bytes) -> bytes:
        """Decode a packet carrying one 20 ms frame; CodecError if it is not valid Opus."""
        if not packet:
            raise CodecError("empty packet")
        return self._run(packet, 0)

    def decode_fec(self, next_packet: bytes) -> bytes:
        """Rebuild the frame *before* ``next_packet`` from its in-band FEC (PLC if none)."""
        return self._run(next_packet, 1)

    def conceal(self) -> bytes:
        """Packet-loss concealment: a frame extrapolated from what was decoded last."""
        return self._run(None, 0)

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state is not None:
            _dec.destroy(state)
