"""Device-less sources and sinks, the frame pacer and the streaming resampler."""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path

import numpy as np
import pytest
from audio_env import dominant_frequency, noise, read_wav, rms, tone, write_wav

from agent.audio.base import EndOfStream
from agent.audio.format import FRAME_BYTES, FRAME_SAMPLES, SAMPLE_RATE
from agent.audio.resample import FrameResampler
from agent.audio.sources import MemorySink, NullSink, ToneSource, WavSink, WavSource


def _samples(frames: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(frames), "<i2")


async def _read_all(source: WavSource) -> list[bytes]:
    frames = []
    while True:
        try:
            frames.append(await source.read())
        except EndOfStream:
            return frames


async def test_tone_has_its_frequency_and_is_continuous_across_frames() -> None:
    source = ToneSource(440.0, amplitude=0.5)
    frames = [await source.read() for _ in range(50)]  # 1 s
    assert all(len(f) == FRAME_BYTES for f in frames)
    x = _samples(frames)
    assert dominant_frequency(x) == pytest.approx(440.0, abs=0.5)
    crossings = np.count_nonzero(np.diff(np.signbit(x.astype(np.int32))))
    assert crossings == pytest.approx(880, abs=2)
    assert np.abs(x).max() == pytest.approx(0.5 * 32767, rel=0.01)
    # A phase jump at a frame seam would show as a step larger than the wave's steepest slope.
    steps = np.abs(np.diff(x.astype(np.int32)))
    seams = steps[FRAME_SAMPLES - 1 :: FRAME_SAMPLES]
    assert seams.max() <= steps.max()
    assert seams.max() <= 0.5 * 32767 * 2 * np.pi * 440 / SAMPLE_RATE + 2


async def test_paced_sources_and_sinks_follow_the_loop_clock() -> None:
    loop = asyncio.get_running_loop()
    paced, sink = ToneSource(1000.0, paced=True), NullSink(paced=True)
    start = loop.time()
    for _ in range(11):
        await sink.write(await paced.read())
    elapsed = loop.time() - start
    # Both wait 10 periods after their first (immediate) frame, in step with each other.
    assert 0.19 <= elapsed < 0.6
    assert sink.frames == 11

    fast = ToneSource(1000.0)
    start = loop.time()
    for _ in range(200):
        await fast.read()
    assert loop.time() - start < 1.0  # paced, 200 frames would take 4 s


async def test_wav_source_converts_16k_stereo_to_48k_mono(tmp_path: Path) -> None:
    seconds = 1.5
    left = tone(1000.0, seconds, rate=16_000, amplitude=0.5)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)  # right channel silent
    path = write_wav(tmp_path / "in.wav", stereo, rate=16_000, channels=2)

    frames = await _read_all(WavSource(path))
    assert all(len(f) == FRAME_BYTES for f in frames)
    assert len(frames) == -(-round(seconds * SAMPLE_RATE) // FRAME_SAMPLES)
    x = _samples(frames)
    middle = x[SAMPLE_RATE // 10 : SAMPLE_RATE]
    assert dominant_frequency(middle) == pytest.approx(1000.0, abs=1.0)
    # Mixed down: half the left channel's amplitude.
    assert rms(middle) == pytest.approx(0.25 * 32767 / np.sqrt(2), rel=0.05)


async def test_wav_source_at_48k_is_exact_and_pads_the_last_frame(tmp_path: Path) -> None:
    data = noise(FRAME_SAMPLES + 40, seed=3)
    source = WavSource(write_wav(tmp_path / "n.wav", data))
    first, last = await source.read(), await source.read()
    assert first == data[:FRAME_SAMPLES].tobytes()
    assert last == data[FRAME_SAMPLES:].tobytes() + bytes(2 * (FRAME_SAMPLES - 40))
    for _ in range(2):
        with pytest.raises(EndOfStream):
            await source.read()
    await source.close()


async def test_wav_source_loops_without_a_gap(tmp_path: Path) -> None:
    data = noise(1500, seed=4)
    source = WavSource(write_wav(tmp_path / "n.wav", data), loop=True)
    frames = [await source.read() for _ in range(4)]
    assert _samples(frames).tolist() == np.tile(data, 3)[: 4 * FRAME_SAMPLES].tolist()
    await source.close()


async def test_wav_source_rejects_8_bit(tmp_path: Path) -> None:
    path = tmp_path / "8bit.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(bytes(100))
    with pytest.raises(ValueError, match="16-bit"):
        WavSource(path)


async def test_wav_sink_and_memory_sink_keep_what_was_written(tmp_path: Path) -> None:
    frames = [noise(FRAME_SAMPLES, seed=i).tobytes() for i in range(5)]
    wav, memory = WavSink(tmp_path / "out.wav"), MemorySink()
    for frame in frames:
        await wav.write(frame)
        await memory.write(frame)
    await wav.close()
    data, rate = read_wav(tmp_path / "out.wav")
    assert rate == SAMPLE_RATE
    assert data.tobytes() == b"".join(frames)
    assert memory.samples().tobytes() == b"".join(frames)
    with pytest.raises(ValueError, match="1920-byte"):
        await memory.write(b"\0\0")


def test_resampler_rechunks_a_stream_into_exact_frames() -> None:
    x = tone(1000.0, 2.0, rate=44_100)
    resampler = FrameResampler(44_100, SAMPLE_RATE, FRAME_SAMPLES)
    frames: list[bytes] = []
    for start in range(0, len(x), 441):  # 10 ms pushes: not a multiple of a frame
        frames += resampler.push(x[start : start + 441].tobytes())
    frames += resampler.flush()
    assert all(len(f) == FRAME_BYTES for f in frames)
    assert len(frames) == 100
    y = _samples(frames)
    assert dominant_frequency(y[4800:-4800]) == pytest.approx(1000.0, abs=0.5)
    assert rms(y[4800:-4800]) == pytest.approx(rms(x[4410:-4410]), rel=0.02)


def test_resampler_at_equal_rates_keeps_every_byte_in_order() -> None:
    data = np.random.default_rng(7).integers(-(2**15), 2**15, 20 * FRAME_SAMPLES, np.int16)
    raw = data.tobytes()
    resampler = FrameResampler(SAMPLE_RATE, SAMPLE_RATE, FRAME_SAMPLES)
    # Whole frames (handed through), then odd sizes that straddle frame edges, then whole again.
    sizes = [FRAME_BYTES, FRAME_BYTES, 1000, 3000, FRAME_BYTES, 2 * FRAME_BYTES]
    out: list[bytes] = []
    pos = 0
    for size in sizes:
        out += resampler.push(raw[pos : pos + size])
        pos += size
    out += resampler.push(raw[pos:])
    assert all(len(f) == FRAME_BYTES for f in out)
    assert b"".join(out) == raw
