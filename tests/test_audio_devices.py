"""ALSA capture and playback through real PortAudio/ALSA: file PCMs (unpaced) and PulseAudio.

See ``tests/audio_env.py`` for the PCMs. Unpaced file PCMs call back as fast as
the CPU allows, so capture tests there use a queue large enough to hold the
whole infile.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soxr
from audio_env import (
    PulseServer,
    dominant_frequency,
    file_capture_pcm,
    file_playback_pcm,
    noise,
    read_raw,
    rms,
    tone,
    write_asoundrc,
    write_raw,
    write_wav,
)

from agent.audio.device import (
    AlsaCapture,
    AlsaPlayback,
    DeviceConfig,
    DeviceNotFound,
    _Waker,
    find_device,
)
from agent.audio.format import FRAME_SAMPLES, SAMPLE_RATE
from agent.audio.pyaudio_backend import DeviceInfo
from agent.audio.sources import ToneSource

LOUD = 1000.0  # rms of the test tones is ~11600; silence is 0


async def _until(condition: Callable[[], bool], limit_s: float, what: str) -> None:
    async with asyncio.timeout(limit_s):
        while not condition():
            await asyncio.sleep(0.02)
    assert condition(), what


def _align(captured: np.ndarray, reference: np.ndarray, search: int) -> int:
    """Offset of ``reference``'s start in ``captured``, by FFT cross-correlation."""
    head = reference[:4096].astype(np.float64)
    x = captured[: search + len(head)].astype(np.float64)
    n = 1 << int(np.ceil(np.log2(len(x) + len(head))))
    corr = np.fft.irfft(np.fft.rfft(x, n) * np.conj(np.fft.rfft(head, n)), n)
    return int(np.argmax(corr[: search + 1]))


def _healthy(device: AlsaCapture | AlsaPlayback) -> bool:
    # A call, not the property: mypy would keep a narrowed value across awaits.
    return device.healthy


def _active(recorded: np.ndarray) -> np.ndarray:
    """From the first to the last non-zero sample."""
    nonzero = np.flatnonzero(recorded)
    return recorded[nonzero[0] : nonzero[-1] + 1] if len(nonzero) else recorded[:0]


async def _read_samples(capture: AlsaCapture, frames: int) -> np.ndarray:
    return np.frombuffer(b"".join([await capture.read() for _ in range(frames)]), "<i2")


async def _read_loud(capture: AlsaCapture, frames: int, limit_s: float) -> np.ndarray:
    """Skip frames until a loud one, then return it and the ``frames - 1`` after it."""
    async with asyncio.timeout(limit_s):
        while rms(np.frombuffer(first := await capture.read(), "<i2")) < LOUD:
            pass
    rest = await _read_samples(capture, frames - 1)
    return np.concatenate([np.frombuffer(first, "<i2"), rest])


# -- name matching ------------------------------------------------------------------------------


def test_find_device_prefers_exact_names_and_respects_direction() -> None:
    def dev(index: int, name: str, inputs: int, outputs: int) -> DeviceInfo:
        return DeviceInfo(index, name, inputs, outputs, 48_000)

    devices = [
        dev(0, "USB PnP Sound Device: Audio (hw:1,0)", 1, 0),
        dev(1, "mic2", 1, 0),
        dev(2, "mic", 1, 0),
        dev(3, "speaker (hw:2,0)", 0, 2),
    ]
    assert find_device(devices, "MIC", capture=True).index == 2  # exact beats first match
    assert find_device(devices, "mic2", capture=True).index == 1
    assert find_device(devices, "usb (audio|pnp sound)", capture=True).index == 0
    assert find_device(devices, "speaker (hw", capture=False).index == 3  # not a regex: substring
    with pytest.raises(DeviceNotFound) as caught:
        find_device(devices, "speaker", capture=True)
    assert caught.value.available == [d.name for d in devices[:3]]


async def test_device_not_found_lists_the_available_names(alsa_home: Path) -> None:
    silence = write_raw(alsa_home / "in.raw", np.zeros(FRAME_SAMPLES, np.int16))
    write_asoundrc(
        alsa_home,
        {"alpha_mic": file_capture_pcm(silence), "beta_spk": file_playback_pcm(alsa_home / "o")},
    )
    capture = AlsaCapture(DeviceConfig(name="^gamma$"))
    with pytest.raises(DeviceNotFound) as caught:
        await capture.start()
    assert "'^gamma$'" in str(caught.value)
    assert "'alpha_mic'" in str(caught.value) and "'beta_spk'" in str(caught.value)
    await capture.close()


async def test_name_matching_opens_the_right_pcm(alsa_home: Path) -> None:
    infiles = {name: noise(50 * FRAME_SAMPLES, seed=i) for i, name in enumerate(("a", "b", "c"))}
    write_asoundrc(
        alsa_home,
        {
            "board_mic": file_capture_pcm(write_raw(alsa_home / "a.raw", infiles["a"])),
            "board_mic2": file_capture_pcm(write_raw(alsa_home / "b.raw", infiles["b"])),
            "usb_mic": file_capture_pcm(write_raw(alsa_home / "c.raw", infiles["c"])),
        },
    )
    for pattern, expected in (("board_mic", "a"), ("BOARD_MIC2", "b"), ("^usb", "c")):
        capture = AlsaCapture(DeviceConfig(name=pattern, queue_frames=100_000))
        await capture.start()
        x = await _read_samples(capture, 10)
        await capture.close()
        found = {k for k, v in infiles.items() if v[: FRAME_SAMPLES * 5].tobytes() in x.tobytes()}
        assert found == {expected}, pattern


# -- handing callbacks to the loop -------------------------------------------------------------


async def test_callbacks_from_other_threads_run_on_the_loop_in_order_woken_once() -> None:
    loop = asyncio.get_running_loop()
    waker = _Waker.acquire(loop)
    assert _Waker.acquire(loop) is waker  # one per loop, shared by capture and playback
    waker.release()
    ran: list[tuple[int, bool]] = []

    def record(n: int) -> None:
        ran.append((n, threading.current_thread() is threading.main_thread()))

    def device_thread() -> None:
        for n in range(100):
            waker.call(record, n)

    try:
        thread = threading.Thread(target=device_thread)
        thread.start()
        thread.join()
        # The loop has not run yet: all 100 calls share the one wake-up the first made.
        assert os.read(waker._read_fd, 4096) == b"\0"
        os.write(waker._write_fd, b"\0")
        await _until(lambda: len(ran) == 100, 5.0, "calls did not run")
        assert ran == [(n, True) for n in range(100)]
    finally:
        waker.release()
    with pytest.raises(RuntimeError):
        waker.call(record, 100)  # released: like call_soon_threadsafe on a closed loop


# -- unpaced file PCMs ---------------------------------------------------------------------------


async def test_file_capture_delivers_the_exact_samples_of_the_infile(alsa_home: Path) -> None:
    reference = noise(100 * FRAME_SAMPLES, seed=7)
    write_asoundrc(alsa_home, {"filemic": file_capture_pcm(write_raw(alsa_home / "in", reference))})
    # The null slave has no clock: hold everything so nothing is dropped.
    capture = AlsaCapture(DeviceConfig(name="^filemic$", queue_frames=100_000))
    await capture.start()
    assert capture.healthy
    x = await _read_samples(capture, 110)
    stats = capture.stats
    await capture.close()

    assert stats.frames_dropped == 0 and stats.device_rate == SAMPLE_RATE
    offset = _align(x, reference, search=10 * FRAME_SAMPLES)
    assert np.array_equal(x[offset : offset + len(reference)], reference)


async def test_capture_drops_the_oldest_frames_when_the_reader_lags(alsa_home: Path) -> None:
    reference = noise(2000 * FRAME_SAMPLES, seed=8)
    write_asoundrc(alsa_home, {"filemic": file_capture_pcm(write_raw(alsa_home / "in", reference))})
    capture = AlsaCapture(DeviceConfig(name="filemic", queue_frames=3))
    await capture.start()
    await _until(lambda: capture.stats.frames_captured >= 20, 5.0, "no frames")
    frame = await capture.read()
    stats = capture.stats  # same loop step as the read: nothing arrived in between
    await capture.close()
    assert stats.frames_dropped > 0
    assert 0 <= stats.frames_captured - stats.frames_dropped - 1 <= 3
    assert frame != reference[:FRAME_SAMPLES].tobytes()  # the first frames went first


async def test_file_playback_writes_what_was_played(alsa_home: Path) -> None:
    outfile = alsa_home / "out.raw"
    write_asoundrc(alsa_home, {"filespk": file_playback_pcm(outfile)})
    frames = [noise(FRAME_SAMPLES, seed=100 + i).tobytes() for i in range(50)]
    playback = AlsaPlayback(DeviceConfig(name="filespk"))
    await playback.start()
    for frame in frames:
        await playback.write(frame)
    await playback.close()
    assert playback.stats.frames_played == 50

    written = read_raw(outfile)
    chunks = [written[i : i + FRAME_SAMPLES] for i in range(0, len(written), FRAME_SAMPLES)]
    # Between our frames the device, faster than us, played silence (underruns).
    played = [c.tobytes() for c in chunks if c.any()]
    assert played == frames


async def test_capture_resamples_a_device_running_at_44100(alsa_home: Path) -> None:
    reference = noise(44_100 * 2, seed=9)
    write_asoundrc(alsa_home, {"mic44": file_capture_pcm(write_raw(alsa_home / "in", reference))})
    capture = AlsaCapture(DeviceConfig(name="mic44", rate=44_100, queue_frames=100_000))
    await capture.start()
    x = await _read_samples(capture, 100)
    assert capture.stats.device_rate == 44_100
    await capture.close()

    expected = soxr.resample(reference.astype(np.float32) / 32768, 44_100, SAMPLE_RATE)
    expected = (expected * 32768).astype(np.int16)
    offset = _align(x, expected, search=10 * FRAME_SAMPLES)
    got = x[offset : offset + SAMPLE_RATE].astype(np.float64)
    want = expected[: len(got)].astype(np.float64)
    assert np.corrcoef(got, want)[0, 1] > 0.99


async def test_playback_resamples_to_a_device_running_at_16000(alsa_home: Path) -> None:
    outfile = alsa_home / "out.raw"
    write_asoundrc(alsa_home, {"spk16": file_playback_pcm(outfile)})
    playback = AlsaPlayback(DeviceConfig(name="spk16", rate=16_000))
    await playback.start()
    assert playback.stats.device_rate == 16_000
    source = ToneSource(1000.0)
    for _ in range(50):
        await playback.write(await source.read())
    await playback.close()

    written = read_raw(outfile)
    chunks = [written[i : i + FRAME_SAMPLES // 3] for i in range(0, len(written), 320)]
    played = np.concatenate([c for c in chunks if c.any()])
    assert len(played) == pytest.approx(16_000, abs=640)  # 1 s, give or take soxr's delay
    assert dominant_frequency(played, 16_000) == pytest.approx(1000.0, abs=2.0)


# -- PulseAudio: paced by a real-time clock ----------------------------------------------------


@pytest.fixture
def tone_wav(tmp_path: Path) -> Path:
    return write_wav(tmp_path / "tone.wav", tone(1000.0, 20.0))


async def test_pulse_capture_hears_a_tone_at_device_pace(
    alsa_home: Path, pulse_server: PulseServer, tone_wav: Path
) -> None:
    write_asoundrc(alsa_home, {"vmic": pulse_server.capture_pcm("mic")})
    player = pulse_server.play(tone_wav, "mic")
    capture = AlsaCapture(DeviceConfig(name="^vmic$"))
    try:
        await capture.start()
        x = await _read_loud(capture, 10, limit_s=10.0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        x = np.concatenate([x, await _read_samples(capture, 50)])
        elapsed = loop.time() - start
    finally:
        await capture.close()
        player.kill()
        player.wait()
    assert dominant_frequency(x) == pytest.approx(1000.0, abs=2.0)
    # The device clock paces reads: at most the queue (10 frames) comes early.
    assert elapsed > (50 - 10) * 0.02 * 0.8
    assert capture.stats.frames_dropped == 0


async def test_pulse_playback_plays_a_tone_at_device_pace(
    alsa_home: Path, pulse_server: PulseServer
) -> None:
    write_asoundrc(alsa_home, {"vspk": pulse_server.playback_pcm("spk")})
    recorder = pulse_server.record("spk")
    playback = AlsaPlayback(DeviceConfig(name="vspk"))
    source = ToneSource(1000.0)
    loop = asyncio.get_running_loop()
    try:
        await playback.start()
        for _ in range(10):  # past PulseAudio's start-up
            await playback.write(await source.read())
        start = loop.time()
        for _ in range(75):
            await playback.write(await source.read())
        elapsed = loop.time() - start
    finally:
        await playback.close()
        recorded = recorder.stop()
    assert elapsed > 75 * 0.02 * 0.8  # write() waits for the device
    played = _active(recorded)
    assert len(played) == pytest.approx(85 * FRAME_SAMPLES, rel=0.1)
    assert dominant_frequency(played) == pytest.approx(1000.0, abs=2.0)


async def _write_tone(playback: AlsaPlayback, source: ToneSource, frames: int) -> None:
    for _ in range(frames):
        await playback.write(await source.read())


async def test_pulse_playback_takes_each_frame_lead_ms_after_write_returns_without_waking_the_loop(
    alsa_home: Path, pulse_server: PulseServer
) -> None:
    # The next frame is made just before the device asks for it: it waits in the queue
    # about lead_ms, not the whole period it waited when write() returned at once.
    write_asoundrc(alsa_home, {"vspk": pulse_server.playback_pcm("spk")})
    playback = AlsaPlayback(DeviceConfig(name="vspk", lead_ms=5.0))
    returned: list[float] = []
    taken: list[float] = []  # by the PortAudio thread
    note = playback._note_callback

    def on_callback(gen: int, status: int) -> bool:
        taken.append(time.monotonic())
        return note(gen, status)

    playback._note_callback = on_callback  # type: ignore[method-assign]
    heard: list[int] = []  # callbacks the loop was woken for
    freed = playback._freed

    def on_freed(gen: int) -> None:
        heard.append(gen)
        freed(gen)

    playback._freed = on_freed  # type: ignore[method-assign]
    source = ToneSource(1000.0)
    try:
        await playback.start()
        await _write_tone(playback, source, 10)  # past PulseAudio's start-up
        start = len(heard), len(taken)
        for _ in range(100):
            await playback.write(await source.read())
            returned.append(time.monotonic())
        woken, called = len(heard) - start[0], len(taken) - start[1]
    finally:
        await playback.close()
    waits = [min(t for t in taken if t > r) - r for r in returned[:-1]]
    lead = playback.stats.lead_ms  # 5, or a step more per underrun on a busy machine
    assert 5.0 <= lead <= 13.0
    assert float(np.median(waits)) * 1000 < 15.0  # a period (20 ms) before
    # The writer sleeps on a timer: the device's callbacks rarely wake the loop.
    assert called >= 95
    assert woken < called / 4


async def test_pulse_playback_lead_grows_when_the_writer_is_late_but_not_when_idle(
    alsa_home: Path, pulse_server: PulseServer
) -> None:
    write_asoundrc(alsa_home, {"vspk": pulse_server.playback_pcm("spk")})
    playback = AlsaPlayback(DeviceConfig(name="vspk", lead_ms=8.0, lead_step_ms=4.0))
    source = ToneSource(1000.0)
    try:
        await playback.start()
        await _write_tone(playback, source, 25)
        before = playback.stats
        await asyncio.sleep(1.0)  # a pause between calls: the device plays silence meanwhile
        await _write_tone(playback, source, 5)
        idle = playback.stats
        await playback.write(await source.read())
        time.sleep(0.06)  # noqa: ASYNC251 (the loop is late on purpose: the device runs dry)
        await _write_tone(playback, source, 5)
        late = playback.stats
    finally:
        await playback.close()
    assert idle.underruns > before.underruns
    assert idle.lead_ms == before.lead_ms
    assert late.underruns > idle.underruns
    assert late.lead_ms == pytest.approx(idle.lead_ms + 4.0)


async def test_capture_falls_back_to_the_default_rate_when_refused(
    alsa_home: Path, pulse_server: PulseServer, tone_wav: Path
) -> None:
    write_asoundrc(alsa_home, {"vmic": pulse_server.capture_pcm("mic")})
    player = pulse_server.play(tone_wav, "mic")
    # The pulse PCM takes 1..384000 Hz, so ask for more: PortAudio refuses it.
    capture = AlsaCapture(DeviceConfig(name="vmic", rate=400_000))
    try:
        await capture.start()
        assert capture.stats.device_rate == 44_100  # PortAudio's default for this PCM
        x = await _read_loud(capture, 50, limit_s=10.0)
    finally:
        await capture.close()
        player.kill()
        player.wait()
    assert dominant_frequency(x[FRAME_SAMPLES:]) == pytest.approx(1000.0, abs=2.0)


def _foreign_thread_states() -> int:
    """Python thread states held for threads Python did not start (C API through ctypes)."""
    api = ctypes.pythonapi
    interp = api["PyInterpreterState_Get"]
    interp.restype = ctypes.c_void_p
    head = api["PyInterpreterState_ThreadHead"]
    head.argtypes = (ctypes.c_void_p,)
    head.restype = ctypes.c_void_p
    after = api["PyThreadState_Next"]
    after.argtypes = (ctypes.c_void_p,)
    after.restype = ctypes.c_void_p
    count, state = 0, head(interp())
    while state:
        count, state = count + 1, after(state)
    return count - threading.active_count()


async def test_callback_threads_keep_their_python_state_until_the_stream_closes(
    alsa_home: Path, pulse_server: PulseServer, tone_wav: Path
) -> None:
    write_asoundrc(
        alsa_home,
        {"vmic": pulse_server.capture_pcm("mic"), "vspk": pulse_server.playback_pcm("spk")},
    )
    player = pulse_server.play(tone_wav, "mic")
    source = ToneSource(1000.0)
    capture = AlsaCapture(DeviceConfig(name="^vmic$"))
    playback = AlsaPlayback(DeviceConfig(name="^vspk$"))
    try:
        await capture.start()
        await playback.start()
        await _read_loud(capture, 5, limit_s=10.0)
        for _ in range(5):
            await playback.write(await source.read())
        # Between callbacks (both threads wait for their device now) each stream's callback
        # thread keeps its state: it is not made and freed again for every callback.
        during = _foreign_thread_states()
    finally:
        await capture.close()
        await playback.close()
        player.kill()
        player.wait()
    assert during == 2
    assert _foreign_thread_states() == 0  # given back on their own threads before they ended


# -- hot-plug -------------------------------------------------------------------------------------


async def test_capture_survives_the_device_vanishing_and_resumes(
    alsa_home: Path,
    pulse_server: PulseServer,
    tone_wav: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pcms = {"hotmic": pulse_server.capture_pcm("hotmic")}
    write_asoundrc(alsa_home, pcms)
    players = [pulse_server.play(tone_wav, "hotmic")]
    capture = AlsaCapture(DeviceConfig(name="hotmic", reopen_interval_s=0.2))
    loop = asyncio.get_running_loop()
    caplog.set_level(logging.INFO, logger="agent.audio.device")
    try:
        await capture.start()
        before = await _read_loud(capture, 10, limit_s=10.0)
        assert dominant_frequency(before) == pytest.approx(1000.0, abs=5.0)

        # Unplug: the sink (and its streams) go, and so does the PCM from the device list.
        write_asoundrc(alsa_home, {})
        pulse_server.unload_sink("hotmic")
        async with asyncio.timeout(5.0):
            while _healthy(capture):
                await capture.read()
        start = loop.time()
        gone = await _read_samples(capture, 25 + 10)  # 10: what was still queued
        elapsed = loop.time() - start
        assert not gone[-25 * FRAME_SAMPLES :].any()
        assert elapsed > 25 * 0.02 * 0.8  # silence comes at the frame rate, not at once
        await _until(lambda: capture.stats.reopen_attempts >= 3, 5.0, "no re-open attempts")
        assert not _healthy(capture) and capture.stats.device_rate is None

        # Plug back in.
        pulse_server.load_sink("hotmic")
        write_asoundrc(alsa_home, pcms)
        players.append(pulse_server.play(tone_wav, "hotmic"))
        after = await _read_loud(capture, 25, limit_s=15.0)
        assert _healthy(capture)
    finally:
        await capture.close()
        for player in players:
            player.kill()
            player.wait()
    assert dominant_frequency(after) == pytest.approx(1000.0, abs=5.0)
    stats = capture.stats
    assert stats.device_lost == 1 and stats.silence_frames >= 25
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'hotmic'" in warnings[0].getMessage()


async def test_playback_discards_at_frame_rate_while_lost_and_resumes(
    alsa_home: Path, pulse_server: PulseServer
) -> None:
    write_asoundrc(alsa_home, {"hotspk": pulse_server.playback_pcm("hotspk")})
    playback = AlsaPlayback(DeviceConfig(name="hotspk", reopen_interval_s=0.2))
    source = ToneSource(1000.0)
    loop = asyncio.get_running_loop()
    try:
        await playback.start()
        for _ in range(20):
            await playback.write(await source.read())

        pulse_server.unload_sink("hotspk")
        async with asyncio.timeout(5.0):
            while _healthy(playback):
                await playback.write(await source.read())
        start = loop.time()
        for _ in range(25):
            await playback.write(await source.read())
        assert loop.time() - start > 25 * 0.02 * 0.8
        assert playback.stats.frames_discarded >= 25

        pulse_server.load_sink("hotspk")
        recorder = pulse_server.record("hotspk")
        try:
            async with asyncio.timeout(15.0):
                while not _healthy(playback):
                    await playback.write(await source.read())
            for _ in range(50):
                await playback.write(await source.read())
        finally:
            recorded = recorder.stop()
    finally:
        await playback.close()
    assert playback.stats.device_lost == 1
    played = _active(recorded)
    assert len(played) > SAMPLE_RATE // 2
    assert dominant_frequency(played[-SAMPLE_RATE // 2 :]) == pytest.approx(1000.0, abs=4.0)
