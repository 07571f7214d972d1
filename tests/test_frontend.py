"""The audio front end: the SpeexDSP binding for real, the delay estimator, the wiring.

Signals are seeded noise and tones, and a simulated echo path (``tools.lab.echo``); the
checks are on what comes out (echo power, recovered delays, frequencies), not on bytes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soxr
from pesq import pesq

from agent.audio.base import EndOfStream
from agent.audio.delay import AlignerSettings, ReferenceAligner, gcc_phat
from agent.audio.format import FRAME_BYTES, FRAME_SAMPLES, SAMPLE_RATE
from agent.audio.frontend import AudioFrontend, Denoiser, FrontendSettings, QuietBypass
from agent.audio.gain import AudioControls, GainSink, scale_frame
from agent.audio.speexdsp import EchoCanceller, Preprocessor, Resampler
from agent.audio.webrtc_ns import DELAY_SAMPLES, NoiseSuppressor
from agent.service.config import AudioConfig, ConfigError, from_dict
from tools.lab.echo import EchoPath
from tools.lab.virtual_audio import read_wav, speech_wav

RATE = 16_000
N = 320  # 20 ms at 16 kHz


def _db(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(a.astype(float) ** 2) / np.mean(b.astype(float) ** 2)))


def _noise(rng: np.random.Generator, n: int, level: float = 3000.0) -> np.ndarray:
    return np.clip(rng.standard_normal(n) * level, -32768, 32767).astype(np.int16)


def _room(rng: np.random.Generator, delay: int) -> np.ndarray:
    """A 16 kHz impulse response: direct sound after ``delay`` samples, then a 60 ms tail."""
    h = np.zeros(delay + 1000)
    h[delay] = 0.7
    h[delay + 1 :] = rng.standard_normal(999) * 0.05 * np.exp(-np.arange(999) / 150)
    return h


# -- the binding -----------------------------------------------------------------------


def _cancel(canceller: EchoCanceller, mic: np.ndarray, far: np.ndarray) -> np.ndarray:
    return np.concatenate([
        np.frombuffer(canceller.cancel(mic[i : i + N].tobytes(), far[i : i + N].tobytes()),
                      np.int16)
        for i in range(0, len(far), N)
    ])  # fmt: skip


def test_the_echo_canceller_removes_an_echo_it_has_learnt() -> None:
    rng = np.random.default_rng(1)
    far = _noise(rng, RATE * 5)
    echo = np.convolve(far.astype(float), _room(rng, 40))[: len(far)].astype(np.int16)
    canceller = EchoCanceller(N, RATE // 10, RATE)
    out = _cancel(canceller, echo, far)
    canceller.close()
    assert _db(echo[: RATE // 4], out[: RATE // 4]) < 15  # not learnt yet
    assert _db(echo[-2 * RATE :], out[-2 * RATE :]) >= 25  # learnt: 25 dB and more


def test_the_canceller_cannot_remove_what_its_reference_does_not_explain() -> None:
    rng = np.random.default_rng(2)
    far, near = _noise(rng, RATE * 3), _noise(rng, RATE * 3)
    canceller = EchoCanceller(N, RATE // 10, RATE)
    out = _cancel(canceller, near, far)
    assert abs(_db(near[RATE:], out[RATE:])) < 1.5  # the near end passes untouched


def _through(run: Callable[[bytes], bytes], x: np.ndarray, n: int = N) -> np.ndarray:
    return np.concatenate(
        [np.frombuffer(run(x[i : i + n].tobytes()), np.int16) for i in range(0, len(x), n)]
    )


def _suppresses_noise_and_keeps_a_tone(run: Callable[[bytes], bytes], noise_db: float) -> None:
    """Four seconds of stationary noise come out ``noise_db`` down and more; a 1 kHz tone
    then passes within 2 dB."""
    noise = _noise(np.random.default_rng(3), RATE * 4, 300.0)
    out = _through(run, noise)
    assert _db(noise[-RATE:], out[-RATE:]) >= noise_db
    t = np.arange(RATE) / RATE
    tone = (8000 * np.sin(2 * np.pi * 1000 * t)).astype(np.int16)
    kept = _through(run, tone)
    assert abs(_db(tone[RATE // 2 :], kept[RATE // 2 :])) < 2


def test_the_preprocessor_suppresses_stationary_noise_and_keeps_a_tone() -> None:
    pre = Preprocessor(N, RATE)
    pre.set_denoise(True, -20)
    _suppresses_noise_and_keeps_a_tone(pre.run, 10)
    pre.close()
    with pytest.raises(OSError, match="closed"):
        pre.run(bytes(2 * N))


def test_webrtc_noise_suppression_suppresses_stationary_noise_and_keeps_a_tone() -> None:
    _suppresses_noise_and_keeps_a_tone(NoiseSuppressor(3).run, 15)
    weak, strong = NoiseSuppressor(1), NoiseSuppressor(4)
    noise = _noise(np.random.default_rng(4), RATE * 3, 300.0)
    assert _db(_through(weak.run, noise)[-RATE:], _through(strong.run, noise)[-RATE:]) >= 3
    with pytest.raises(ValueError, match="multiple of 320"):
        strong.run(bytes(100))  # 10 ms at 16 kHz at a time, or nothing
    with pytest.raises(ValueError, match="a second at most"):
        strong.run(bytes(2 * RATE + 320))
    with pytest.raises(ValueError, match="level"):
        NoiseSuppressor(5)  # type: ignore[arg-type]


def test_the_resampler_is_frame_in_frame_out_and_keeps_a_tone() -> None:
    down, up = Resampler(SAMPLE_RATE, RATE, FRAME_SAMPLES), Resampler(RATE, SAMPLE_RATE, N)
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    tone = (8000 * np.sin(2 * np.pi * 700 * t)).astype(np.int16)
    out = []
    for i in range(0, SAMPLE_RATE, FRAME_SAMPLES):
        low = down.process(tone[i : i + FRAME_SAMPLES].tobytes())
        assert len(low) == 2 * N
        out.append(up.process(low))
    back = np.frombuffer(b"".join(out), np.int16).astype(float)
    assert all(len(f) == FRAME_BYTES for f in out)
    spectrum = np.abs(np.fft.rfft(back[SAMPLE_RATE // 2 :]))
    assert np.fft.rfftfreq(SAMPLE_RATE // 2, 1 / SAMPLE_RATE)[int(np.argmax(spectrum))] == 700
    with pytest.raises(ValueError, match="no whole number"):
        Resampler(SAMPLE_RATE, 44_100, 100)


# -- the delay estimator ---------------------------------------------------------------


@pytest.mark.parametrize("lag", [0, 17, 160, 1280, 3999])
def test_gcc_phat_finds_a_known_delay_through_a_room(lag: int) -> None:
    rng = np.random.default_rng(lag)
    max_lag, n = 4000, RATE
    ref = rng.standard_normal(n + max_lag + 2000)
    heard = np.convolve(ref, _room(rng, 0))[: len(ref)]
    # mic[i] = heard[max_lag + i - lag]: the reference leads by ``lag``.
    mic = heard[max_lag - lag : max_lag - lag + n] + 0.3 * rng.standard_normal(n)
    found = gcc_phat(mic, ref[: n + max_lag], max_lag)
    assert found.lag == lag and found.prominence > 10


def test_gcc_phat_sees_no_peak_in_unrelated_signals() -> None:
    rng = np.random.default_rng(9)
    found = gcc_phat(rng.standard_normal(RATE), rng.standard_normal(RATE + 800), 800)
    assert found.prominence < 6


def _aligner(initial: int = 0) -> ReferenceAligner:
    return ReferenceAligner(AlignerSettings(
        max_lag=4000, initial_lag=initial, window=RATE, interval=RATE // 2, lead=0, tolerance=16,
    ))  # fmt: skip


def _stream(aligner: ReferenceAligner, far: np.ndarray, delay: int, start: int, stop: int) -> float:
    """Feed frames start..stop of ``far`` (the microphone hears it ``delay`` late); the
    mean correlation of the aligned reference with the microphone over the last second."""
    scores = []
    for i in range(start, stop, N):
        aligner.push_reference(far[i : i + N])
        mic = far[i - delay : i - delay + N] if i >= delay else np.zeros(N, np.int16)
        ref = aligner.align(mic)
        if i >= stop - RATE and mic.any():
            scores.append(np.corrcoef(ref.astype(float), mic.astype(float))[0, 1])
    return float(np.mean(scores)) if scores else 0.0


def test_the_aligner_measures_the_delay_and_follows_a_change() -> None:
    rng = np.random.default_rng(4)
    far = _noise(rng, RATE * 8)
    aligner = _aligner()
    assert _stream(aligner, far, 1000, 0, RATE * 3) > 0.99
    assert aligner.lag == 1000 and aligner.changes == 1
    # The playback buffer grew by 30 ms: two measurements agree, then it is followed.
    assert _stream(aligner, far, 1480, RATE * 3, RATE * 8) > 0.99
    assert aligner.lag == 1480 and aligner.changes == 2


def test_the_aligner_keeps_its_delay_while_the_far_end_is_silent() -> None:
    aligner = _aligner(initial=640)
    silent = np.zeros(RATE * 3, np.int16)
    _stream(aligner, silent, 200, 0, RATE * 3)
    assert aligner.estimates == 0 and aligner.lag == 640


def test_the_aligner_tells_whether_the_microphone_hears_the_reference() -> None:
    """Found from the first half second it hears; gone after ``echo_timeout`` measurements
    (10 s of far-end sound) without it, not at the first quiet ones."""
    rng = np.random.default_rng(5)
    far = _noise(rng, RATE * 15)
    assert not _aligner().echo  # nothing heard yet
    aligner = _aligner()
    found = RATE // 2 + N
    _stream(aligner, far, 1000, 0, found)
    assert aligner.echo and aligner.lag == 1000

    def unheard(start: int, stop: int) -> None:  # a headset: the microphone hears its floor
        for i in range(start, stop, N):
            aligner.push_reference(far[i : i + N])
            aligner.align(_noise(rng, N, 10.0))

    unheard(found, found + RATE * 9)
    assert aligner.echo
    unheard(found + RATE * 9, found + RATE * 11)
    assert not aligner.echo


def test_the_aligner_gives_zeros_for_reference_it_does_not_have() -> None:
    assert not _aligner().align(np.ones(N, np.int16)).any()  # nothing played yet
    aligner = _aligner()
    aligner.push_reference(np.full(N, 5, np.int16))
    assert (aligner.align(np.ones(N, np.int16)) == 5).all()
    assert not aligner.align(np.ones(N, np.int16)).any()  # not played yet


# -- the front end and its wiring ------------------------------------------------------


class _Room:
    """A speaker and a microphone in one room: what the speaker is given comes back to
    the microphone through ``EchoPath`` (48 kHz), frame by frame."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.path = EchoPath(delay_ms=35.0, rt60_s=0.15, drive=1.5, gain_db=-3.0)
        self._rng = rng

    def echo_of(self, frames: list[bytes]) -> list[bytes]:
        far = np.frombuffer(b"".join(frames), np.int16).astype(float) / 32768
        echo = np.round(self.path.apply(self._rng, far) * 32768).astype(np.int16)
        return [echo[i : i + FRAME_SAMPLES].tobytes() for i in range(0, len(echo), FRAME_SAMPLES)]


class _Speaker:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    async def write(self, frame: bytes) -> None:
        self.frames.append(frame)

    async def close(self) -> None:
        pass


class _Microphone:
    def __init__(self, frames: list[bytes]) -> None:
        self.frames = deque(frames)
        self.discarded = 0

    async def read(self) -> bytes:
        if not self.frames:
            raise EndOfStream("done")
        return self.frames.popleft()

    def discard_pending(self) -> int:
        self.discarded += 1
        return 0

    async def close(self) -> None:
        pass


def _far_speech(seconds: float, seed: int) -> list[bytes]:
    """Noise bursts shaped like speech (syllables at 4 Hz) at -20 dBFS."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * np.arange(n) / SAMPLE_RATE) ** 2
    x = np.convolve(rng.standard_normal(n), np.ones(6) / 6, "same") * envelope * 0.15
    samples = np.round(x * 32768).astype(np.int16)
    return [samples[i : i + FRAME_SAMPLES].tobytes() for i in range(0, n, FRAME_SAMPLES)]


async def test_the_front_end_removes_what_the_speaker_put_into_the_microphone() -> None:
    """The wiring as ``agent.app`` builds it: the call writes to a ``GainSink`` over the
    front end's tap; the microphone, which hears the speaker (after the volume), is read
    through the front end's source. After convergence the echo is 25 dB down and more."""
    room = _Room(5)
    far = _far_speech(6.0, 6)
    played = [scale_frame(f, 80) for f in far]
    heard = room.echo_of(played)
    frontend = AudioFrontend(FrontendSettings())
    speaker = _Speaker()
    sink = GainSink(frontend.tap(speaker), AudioControls(volume=80))
    source = frontend.source(_Microphone(heard))
    assert source.discard_pending() == 0
    out = []
    for frame in far:
        await sink.write(frame)
        out.append(await source.read())
    with pytest.raises(EndOfStream):
        await source.read()
    assert speaker.frames == played
    mic = np.frombuffer(b"".join(heard), np.int16)
    cleaned = np.frombuffer(b"".join(out), np.int16)
    last = 2 * SAMPLE_RATE
    assert _db(mic[-last:], cleaned[-last:]) >= 25
    assert frontend.delay_ms == pytest.approx(35.0, abs=1.0)
    frontend.close()


async def test_the_tap_feeds_the_reference_in_step_with_the_microphone() -> None:
    """Tap and source on one front end, a call's writer and reader side by side."""
    room = _Room(7)
    far = _far_speech(5.0, 8)
    heard = room.echo_of(far)
    frontend = AudioFrontend(FrontendSettings())
    mic = _Microphone(heard)
    source, sink = frontend.source(mic), frontend.tap(_Speaker())
    source.discard_pending()
    assert mic.discarded == 1
    out = []

    async def writer() -> None:
        for frame in far:
            await sink.write(frame)
            await asyncio.sleep(0)

    async def reader() -> None:
        for _ in far:
            out.append(await source.read())
            await asyncio.sleep(0)

    await asyncio.gather(writer(), reader())
    mic_samples = np.frombuffer(b"".join(heard), np.int16)
    cleaned = np.frombuffer(b"".join(out), np.int16)
    assert _db(mic_samples[-SAMPLE_RATE:], cleaned[-SAMPLE_RATE:]) >= 20
    frontend.close()


def _process(frontend: AudioFrontend, mic: np.ndarray, far: np.ndarray) -> np.ndarray:
    """``mic`` through the front end, 48 kHz frame by frame, with ``far`` played."""
    out = []
    for i in range(0, len(mic) // FRAME_SAMPLES * FRAME_SAMPLES, FRAME_SAMPLES):
        frontend.reference(far[i : i + FRAME_SAMPLES].tobytes())
        out.append(np.frombuffer(frontend.process(mic[i : i + FRAME_SAMPLES].tobytes()), np.int16))
    frontend.close()
    return np.concatenate(out)


def _pesq(clean: np.ndarray, degraded: np.ndarray) -> float:
    to16k = [
        soxr.resample(x.astype(np.float32) / 32768, SAMPLE_RATE, RATE) for x in (clean, degraded)
    ]
    return float(pesq(RATE, to16k[0], to16k[1][: len(to16k[0])], "wb"))


@pytest.mark.parametrize("far_kind", ["tone", "speech"])
@pytest.mark.parametrize("denoiser", ["none", "speex"])
def test_a_far_end_the_microphone_does_not_hear_leaves_the_near_end_alone(
    tmp_path: Path, far_kind: str, denoiser: str
) -> None:
    """A headset, or a speaker the microphone cannot hear: the far end plays (the 1.3 kHz
    tone of ``test_call_e2e``, or speech-like noise) and none of it reaches the microphone.
    The near end's speech comes out as it does with the far end silent (the residual echo
    suppression used to take 0.4 PESQ off it against the tone). With SpeexDSP's denoiser
    the preprocessor runs on every frame, attached to the canceller, and must see no echo
    estimate either."""
    speech = speech_wav(tmp_path / "near.wav", "Please open the front door, I am waiting outside.")
    near = read_wav(speech)[0]
    near = near[: len(near) // FRAME_SAMPLES * FRAME_SAMPLES]
    if far_kind == "tone":
        t = np.arange(len(near)) / SAMPLE_RATE
        far = np.round(6000 * np.sin(2 * np.pi * 1300 * t)).astype(np.int16)
    else:
        far = np.frombuffer(b"".join(_far_speech(len(near) / SAMPLE_RATE, 10)), np.int16)
    settings = (
        FrontendSettings(noise_suppression=False)
        if denoiser == "none"
        else FrontendSettings(denoiser="speex")
    )
    alone = _pesq(near, _process(AudioFrontend(settings), near, np.zeros_like(near)))
    played = _pesq(near, _process(AudioFrontend(settings), near, far))
    assert played >= alone - 0.05, (
        f"PESQ {played:.2f} with the far end playing, {alone:.2f} without"
    )


def test_an_echo_that_appears_mid_stream_is_found_and_cancelled() -> None:
    """The far end talks for 12 s; the microphone hears none of it for the first 4 (a
    headset), then hears the speaker (the headset is unplugged). The echo is found and,
    from 4 s after it appeared, is 25 dB down and more (about 2.5 s: the filter, having
    learnt that there was no echo, adapts more slowly than from the start)."""
    far = _far_speech(12.0, 12)
    echo = np.frombuffer(b"".join(_Room(11).echo_of(far)), np.int16).copy()
    appears = 4 * SAMPLE_RATE
    echo[:appears] = 0
    floor = _noise(np.random.default_rng(13), len(echo), 3.0)
    mic = echo + floor
    out = _process(AudioFrontend(FrontendSettings()), mic, np.frombuffer(b"".join(far), np.int16))
    for second in range(8, 12):
        part = slice(second * SAMPLE_RATE, (second + 1) * SAMPLE_RATE)
        assert _db(mic[part], out[part]) >= 25, f"echo {second} s in"


def test_without_residual_echo_suppression_the_filter_alone_cancels() -> None:
    """``residual_echo_suppression = false``: no preprocessor runs; the canceller's filter
    alone takes the echo down, less deeply than with the suppressor after it (the bench's
    ``pesq_wb_near_doubletalk_filter_only``)."""
    far = _far_speech(8.0, 21)
    echo = np.frombuffer(b"".join(_Room(22).echo_of(far)), np.int16)
    mic = echo + _noise(np.random.default_rng(23), len(echo), 3.0)
    ref = np.frombuffer(b"".join(far), np.int16)
    bare = AudioFrontend(FrontendSettings(noise_suppression=False, residual_echo_suppression=False))
    assert bare._pre is None
    alone = _process(bare, mic, ref)
    full = _process(AudioFrontend(FrontendSettings(noise_suppression=False)), mic, ref)
    last = slice(-3 * SAMPLE_RATE, None)
    assert _db(mic[last], alone[last]) >= 10
    assert _db(mic[last], full[last]) >= _db(mic[last], alone[last]) + 10


@pytest.mark.parametrize("denoiser", ["webrtc", "speex"])
def test_the_front_end_suppresses_noise_with_either_denoiser(denoiser: Denoiser) -> None:
    """Noise suppression alone (no echo cancellation), 48 kHz in and out."""
    frontend = AudioFrontend(FrontendSettings(aec=False, denoiser=denoiser))
    noise = _noise(np.random.default_rng(9), SAMPLE_RATE * 4, 300.0)
    out = _through(frontend.process, noise, FRAME_SAMPLES)
    assert _db(noise[-SAMPLE_RATE:], out[-SAMPLE_RATE:]) >= 10
    frontend.close()


def test_frontend_settings_come_from_audio_frontend_and_are_checked() -> None:
    config = from_dict(AudioConfig, {"frontend": {"aec": False, "agc": True, "tail_ms": 100}})
    assert not config.frontend.aec and config.frontend.agc and config.frontend.enabled
    off = from_dict(AudioConfig, {"frontend": {"aec": False, "noise_suppression": False}})
    assert not off.frontend.enabled
    with pytest.raises(ConfigError, match="rate"):
        from_dict(AudioConfig, {"frontend": {"rate": 44100}})
    with pytest.raises(ConfigError, match="attenuations"):
        from_dict(AudioConfig, {"frontend": {"noise_suppress_db": 10}})
    with pytest.raises(ConfigError, match="16 kHz"):
        from_dict(AudioConfig, {"frontend": {"rate": 48000}})  # WebRTC's denoiser
    wide = from_dict(AudioConfig, {"frontend": {"rate": 48000, "denoiser": "speex"}})
    assert wide.frontend.denoiser == "speex"
    with pytest.raises(ConfigError, match="unknown"):
        from_dict(AudioConfig, {"frontend": {"echo": True}})


def test_noise_suppression_keeps_clean_speech_between_digital_silence(tmp_path: Path) -> None:
    """Speech with exact zeros around and between its words (a virtual microphone, a
    sound card's noise gate) through the front end with WebRTC's suppressor always in use:
    left with a noise floor of zero, it used to mangle the speech (PESQ 3.6 against 4.6
    unprocessed)."""
    speech = speech_wav(tmp_path / "near.wav", "Please open the front door, I am waiting outside.")
    near = np.concatenate([np.zeros(SAMPLE_RATE, np.int16), read_wav(speech)[0]])
    near = near[: len(near) // FRAME_SAMPLES * FRAME_SAMPLES]
    assert np.count_nonzero(near == 0) > SAMPLE_RATE
    frontend = AudioFrontend(FrontendSettings(quiet_floor_dbfs=-120))
    cleaned = _process(frontend, near, np.zeros_like(near))
    assert frontend.denoising
    assert _pesq(near, cleaned) >= 4.2


def _frames(x: np.ndarray, n: int = N) -> list[bytes]:
    return [x[i : i + n].tobytes() for i in range(0, len(x) // n * n, n)]


def test_the_quiet_bypass_passes_a_quiet_microphone_through_as_it_is() -> None:
    """A floor of -80 dBFS: the denoiser's output is never used; the input comes out
    sample for sample, without the denoiser's delay."""
    quiet = _noise(np.random.default_rng(21), RATE * 2, 3.3)  # about -80 dBFS
    bypass = QuietBypass(-65.0, N)
    other = bytes(2 * N)  # stands in for the denoiser's output: silence
    out = np.frombuffer(b"".join(bypass.choose(f, other) for f in _frames(quiet)), np.int16)
    assert not bypass.denoising
    assert bypass.floor_dbfs is not None and bypass.floor_dbfs < -75
    assert np.array_equal(out, quiet[: len(out)])


def test_the_quiet_bypass_denoises_noise_and_fades_between_the_two() -> None:
    """Fan-like noise at -40 dBFS brings the denoiser's output in after 1.5 s; when the
    room goes quiet the bypass takes over once the last three seconds were quiet, and when
    the noise comes back the denoiser's output returns 1.5 s later. Each switch is a fade
    over one frame from one signal to the other."""
    rng = np.random.default_rng(22)
    loud, quiet = _noise(rng, RATE * 2, 330.0), _noise(rng, RATE * 4, 3.3)
    x = np.concatenate([loud, quiet, loud])
    bypass = QuietBypass(-65.0, N)
    states, out = [], []
    for frame in _frames(x):
        out.append(np.frombuffer(bypass.choose(frame, bytes(2 * N)), np.int16))
        states.append(bypass.denoising)
    switches = [i for i in range(1, len(states)) if states[i] != states[i - 1]]
    ends = [(i + 1) * N for i in switches]  # where the switching frames end
    assert len(switches) == 3 and not states[0], ends
    assert ends[0] <= 3 * RATE // 2  # noise from the start
    assert 5 * RATE <= ends[1] <= 5 * RATE + RATE // 2  # quiet from 2 s, for 3 s
    assert 6 * RATE < ends[2] <= 15 * RATE // 2  # noise again from 6 s
    for i in switches:  # the denoiser's output here is silence: a fade in or out of it
        fade = np.abs(out[i].astype(float))
        head, tail = fade[: N // 4].mean(), fade[-N // 4 :].mean()
        assert (tail < head / 4) if states[i] else (head < tail / 4)


def test_in_a_quiet_room_speech_comes_out_as_clean_as_it_went_in(tmp_path: Path) -> None:
    """Speech over a -80 dBFS microphone floor through the default front end: the denoiser
    is bypassed and the speech scores as it does without one (4.43 with the denoiser's
    output in use, 4.63 without)."""
    speech = speech_wav(tmp_path / "near.wav", "Please open the front door, I am waiting outside.")
    words = read_wav(speech)[0].astype(float)
    rng = np.random.default_rng(23)
    near = (
        np.concatenate([np.zeros(SAMPLE_RATE), words])
        + rng.standard_normal(SAMPLE_RATE + len(words)) * 3.3
    )
    near = np.round(near[: len(near) // FRAME_SAMPLES * FRAME_SAMPLES]).astype(np.int16)
    frontend = AudioFrontend(FrontendSettings())
    cleaned = _process(frontend, near, np.zeros_like(near))
    assert not frontend.denoising
    assert _pesq(near, cleaned) >= 4.55


def _clicks_delay(floor: float) -> float:
    """Samples at 48 kHz by which the default front end delays clicks over a noise floor
    (``floor``: the noise's standard deviation in int16 units), once the bypass decided."""
    rng = np.random.default_rng(25)
    x = rng.standard_normal(6 * SAMPLE_RATE) * floor
    t = np.arange(480) / SAMPLE_RATE
    click = np.sin(2 * np.pi * (300 + 300_000 * t) * t) * np.exp(-t / 0.002) * 12_000
    for start in range(4 * SAMPLE_RATE, 6 * SAMPLE_RATE - 480, SAMPLE_RATE // 4):
        x[start : start + 480] += click
    mic = np.round(x).astype(np.int16)
    out = _process(AudioFrontend(FrontendSettings()), mic, np.zeros_like(mic))
    ref, got = mic[4 * SAMPLE_RATE :].astype(float), out[4 * SAMPLE_RATE :].astype(float)
    corr = np.fft.irfft(np.fft.rfft(got, 2 * len(got)) * np.conj(np.fft.rfft(ref, 2 * len(got))))
    return float(np.argmax(corr[: SAMPLE_RATE // 8]))


def test_the_denoiser_delays_the_microphone_only_while_its_output_is_in_use() -> None:
    """In a quiet room the front end adds its resamplers' delay alone (~3 ms); with noise
    to remove, the denoiser's 6 ms too."""
    quiet, noisy = _clicks_delay(3.3), _clicks_delay(330.0)
    assert quiet < 0.004 * SAMPLE_RATE
    assert noisy - quiet == pytest.approx(3 * DELAY_SAMPLES, abs=24)  # 48 kHz samples


def test_in_a_noisy_room_the_denoiser_output_is_used(tmp_path: Path) -> None:
    """The same speech over fan-like noise at -40 dBFS: the denoiser's output is in use and
    the noise between the words comes out 10 dB down and more."""
    rng = np.random.default_rng(24)
    noise = _noise(rng, 3 * SAMPLE_RATE, 330.0)
    frontend = AudioFrontend(FrontendSettings())
    out = _process(frontend, noise, np.zeros_like(noise))
    assert frontend.denoising
    assert _db(noise[-SAMPLE_RATE:], out[-SAMPLE_RATE:]) >= 10


def test_what_the_canceller_learnt_carries_over_to_the_next_call(tmp_path: Path) -> None:
    """A board's front end lives as long as its agent: a call starts (``restart``) with the
    echo path the last one learnt, so its first second of far-end speech already has the
    echo 25 dB down, where a canceller that has not heard the room yet (told the delay,
    so that only the filter differs) is far from it."""
    text = "The delivery driver is at the front gate. Please open the door and sign for it."
    speech = read_wav(speech_wav(tmp_path / "far.wav", text))[0]
    ref = np.tile(speech, 4)[: 16 * SAMPLE_RATE]
    far = [ref[i : i + FRAME_SAMPLES].tobytes() for i in range(0, len(ref), FRAME_SAMPLES)]
    mic = np.frombuffer(b"".join(_Room(31).echo_of(far)), np.int16)
    split = 12 * SAMPLE_RATE  # twelve seconds of a first call, then the next call
    trained = AudioFrontend(FrontendSettings())
    for i in range(0, split, FRAME_SAMPLES):
        trained.reference(ref[i : i + FRAME_SAMPLES].tobytes())
        trained.process(mic[i : i + FRAME_SAMPLES].tobytes())
    trained.restart()
    fresh = AudioFrontend(FrontendSettings(track_delay=False, initial_delay_ms=35))
    second = slice(split, split + SAMPLE_RATE)
    kept = _process(trained, mic[split:], ref[split:])[:SAMPLE_RATE]
    new = _process(fresh, mic[split:], ref[split:])[:SAMPLE_RATE]
    assert _db(mic[second], kept) >= 25
    assert _db(mic[second], new) < 15
