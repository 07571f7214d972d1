"""Opus round trips on real libopus: what is decoded must sound like what went in."""

import numpy as np
import pytest

from agent.audio.format import FRAME_BYTES, FRAME_SAMPLES, SAMPLE_RATE
from agent.codec.opus import CodecError, OpusConfig, OpusDecoder, OpusEncoder


def _tone(freq: float, frames: int, amp: float = 8000.0) -> list[bytes]:
    t = np.arange(frames * FRAME_SAMPLES) / SAMPLE_RATE
    pcm = (amp * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()
    return [pcm[i * FRAME_BYTES : (i + 1) * FRAME_BYTES] for i in range(frames)]


def _peak_hz(pcm: bytes) -> float:
    x = np.frombuffer(pcm, "<i2").astype(float)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)[int(np.argmax(spectrum))])


def test_round_trip_keeps_the_tone() -> None:
    enc, dec = OpusEncoder(OpusConfig(complexity=5)), OpusDecoder()
    out = b"".join(dec.decode(enc.encode(f)) for f in _tone(1000, 50))
    assert len(out) == 50 * FRAME_BYTES
    assert abs(_peak_hz(out[FRAME_BYTES * 10 :]) - 1000) < 10


def test_bitrate_is_respected() -> None:
    enc = OpusEncoder(OpusConfig(bitrate=16_000, fec=False))
    sizes = [len(enc.encode(f)) for f in _tone(440, 100)]
    kbps = sum(sizes[10:]) * 8 / (90 * 0.020) / 1000
    assert 10 < kbps < 24


def _voiced(frames: int) -> list[bytes]:
    """Speech-like: a gliding harmonic series, syllable-rate envelope, a little noise."""
    t = np.arange(frames * FRAME_SAMPLES) / SAMPLE_RATE
    phase = 2 * np.cumsum(np.pi * (140 + 20 * np.sin(2 * np.pi * 3 * t)) / SAMPLE_RATE)
    x = sum(np.sin(k * phase) / k for k in range(1, 20)) * (0.6 + 0.4 * np.sin(8 * np.pi * t))
    x = x + 0.05 * np.random.default_rng(1).standard_normal(len(t))
    pcm = (4000 * x).astype("<i2").tobytes()
    return [pcm[i * FRAME_BYTES : (i + 1) * FRAME_BYTES] for i in range(frames)]


def test_fec_recovers_lost_frames_better_than_concealment() -> None:
    frames = _voiced(200)
    enc = OpusEncoder(OpusConfig(packet_loss_perc=20))
    packets = [enc.encode(f) for f in frames]
    fec_error = plc_error = 0.0
    for lost in range(20, 199, 7):
        clean, with_fec, concealed = OpusDecoder(), OpusDecoder(), OpusDecoder()
        for p in packets[:lost]:
            for d in (clean, with_fec, concealed):
                d.decode(p)
        ref = np.frombuffer(clean.decode(packets[lost]), "<i2").astype(float)
        fec_error += float(
            np.mean((np.frombuffer(with_fec.decode_fec(packets[lost + 1]), "<i2") - ref) ** 2)
        )
        plc_error += float(np.mean((np.frombuffer(concealed.conceal(), "<i2") - ref) ** 2))
    assert fec_error < 0.6 * plc_error


def test_dtx_sends_tiny_packets_in_silence() -> None:
    enc = OpusEncoder(OpusConfig(dtx=True))
    sizes = [len(enc.encode(bytes(FRAME_BYTES))) for _ in range(100)]
    # After the hangover only a comfort-noise update every 400 ms is not tiny.
    assert sum(size <= 3 for size in sizes[20:]) >= 70


def test_garbage_is_a_codec_error() -> None:
    dec = OpusDecoder()
    with pytest.raises(CodecError):
        dec.decode(b"\xff\xff\xff\xff\xff")
    with pytest.raises(CodecError):
        dec.decode(b"")


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="complexity"):
        OpusConfig(complexity=11)
    with pytest.raises(ValueError, match="bitrate"):
        OpusConfig(bitrate=1000)


def test_loss_hint_is_clamped() -> None:
    enc = OpusEncoder(OpusConfig())
    enc.set_packet_loss(250)
    assert enc.packet_loss == 100
