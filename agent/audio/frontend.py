"""The microphone's front end for calls: echo cancellation, noise suppression, automatic gain.

An intercom's speaker sits next to its microphone; without echo cancellation the caller
hears themselves. ``AudioFrontend`` cleans each 20 ms, 48 kHz microphone frame with
SpeexDSP (``agent.audio.speexdsp``): its echo canceller removes what the speaker played,
given the frames the speaker was fed as reference, and its preprocessor suppresses the
echo the filter left and evens out the level. The noise is suppressed by WebRTC's
suppressor (``agent.audio.webrtc_ns``: +0.2 PESQ over SpeexDSP's on fan and street
noise, for 0.001 CPU-s per audio-s more) or by SpeexDSP's. It works at ``rate`` (16 kHz:
a third of the CPU of 48 kHz, and all a voice call's wideband needs), resampling in and
out with SpeexDSP's resampler (frame in, frame out: soxr's block-wise output costs up to
four frames of delay once re-chunked into 20 ms frames). The speaker-to-microphone
delay is measured and followed as it drifts by ``agent.audio.delay.ReferenceAligner``,
which also tells whether the microphone hears the speaker at all. Until it does (a
headset, a speaker the microphone cannot hear) nothing removes an echo that is not there
(that cost clean speech 0.4 PESQ with a far-end tone playing): the canceller's filter
learns in the background (its output unused, so it is ready when the echo is found) and
the preprocessor, there only for the residual echo, is skipped (and so is its 20 ms of
delay: the output jumps by that much when the echo is found); a preprocessor that runs
anyway (SpeexDSP's denoiser, AGC) would suppress the filter's estimate as echo, so then
the filter is handed silence instead.

WebRTC's suppressor costs clean speech about 0.2-0.4 PESQ however gently it is set, so
its output is used only while there is noise to remove: ``QuietBypass`` follows the
noise floor (the quietest frames of the last seconds) and, in a quiet room, passes the
microphone through as it is, without the suppressor's 6 ms of delay (the output moves by
that much at each switch, inside a one-frame cross-fade). The suppressor keeps running
either way, so its noise estimate is current when noise comes.

Wiring: ``source(capture)`` is the call's microphone (``FrontendSource``) and
``tap(speaker)`` the speaker (``ReferenceTap``: it hands each frame it plays to the front
end). Both run on the event loop, in the call's own reader and writer: the PortAudio
callbacks only move buffers. The detectors keep hearing the untouched microphone.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np

from agent.audio.base import AudioSink, AudioSource
from agent.audio.delay import AlignerSettings, ReferenceAligner
from agent.audio.format import FRAME_SAMPLES, SAMPLE_RATE
from agent.audio.speexdsp import EchoCanceller, Preprocessor, Resampler
from agent.audio.webrtc_ns import RATE as NS_RATE
from agent.audio.webrtc_ns import Level, NoiseSuppressor

logger = logging.getLogger(__name__)

_QUALITY = 3
"""SpeexDSP's resampler quality (its VoIP setting): 1.5x cheaper than 5 and its passband
still reaches about 7 kHz, the top of wideband voice."""

Denoiser = Literal["webrtc", "speex"]
"""Which library suppresses the noise."""


@dataclass(frozen=True, slots=True)
class FrontendSettings:
    """``[audio.frontend]``: what cleans the microphone during a call (each part switchable)."""

    aec: bool = True
    """Acoustic echo cancellation, with what the speaker plays as reference."""
    noise_suppression: bool = True
    """Stationary noise suppression (fans, hum, street rumble)."""
    agc: bool = False
    """Automatic gain control of the microphone."""
    rate: Literal[8000, 16000, 32000, 48000] = 16_000
    """Processing rate in Hz (16 kHz: wideband voice at a third of 48 kHz's CPU)."""
    frame_ms: Literal[10, 20] = 20
    """Processing frame length."""
    tail_ms: int = 100
    """Echo tail the canceller's filter covers, after the measured delay (the room's
    reverberation as the microphone hears it)."""
    max_delay_ms: int = 250
    """Longest speaker-to-microphone delay searched (device buffers plus the air)."""
    initial_delay_ms: int = 40
    """Delay assumed until the first measurement (the first second of far-end speech)."""
    track_delay: bool = True
    """Measure the delay and follow its drift (off: ``initial_delay_ms`` throughout)."""
    residual_echo_suppression: bool = True
    """SpeexDSP's preprocessor suppresses the echo the canceller's filter leaves (off: the
    filter alone, which leaves the echo about 19 dB down while both ends talk)."""
    echo_suppress_db: int = -40
    """Residual echo suppression while only the far end talks (dB, negative)."""
    echo_suppress_active_db: int = -15
    """Residual echo suppression while both ends talk (dB, negative; gentler, so the near
    end's words survive)."""
    denoiser: Denoiser = "webrtc"
    """Which suppresses the noise: WebRTC's (clearly better on fan and street noise, and
    gentler on clean speech) or SpeexDSP's preprocessor (free with echo cancellation on:
    that runs anyway)."""
    webrtc_level: Level = 3
    """WebRTC's suppression strength: 1 low, 2 moderate, 3 high, 4 very high."""
    quiet_floor_dbfs: float = -65.0
    """WebRTC's suppressor is bypassed while the noise floor is below this (dBFS; it is
    used again from 5 dB above): a quiet room has no noise worth what the suppressor
    takes from clean speech. -120 keeps it on."""
    noise_suppress_db: int = -15
    """SpeexDSP's largest noise attenuation (dB, negative)."""
    agc_level: float = 8000.0
    """AGC target RMS in int16 units (8000: about -12 dBFS)."""
    agc_max_gain_db: int = 20
    """Most the AGC amplifies."""

    def __post_init__(self) -> None:
        if not 0 < self.tail_ms <= 500 or not 0 < self.max_delay_ms <= 1000:
            raise ValueError("tail_ms must be 1..500 and max_delay_ms 1..1000")
        if not 0 <= self.initial_delay_ms <= self.max_delay_ms:
            raise ValueError("initial_delay_ms must be 0..max_delay_ms")
        if max(self.echo_suppress_db, self.echo_suppress_active_db, self.noise_suppress_db) > 0:
            raise ValueError("suppression levels are attenuations: 0 dB or less")
        if self.denoiser == "webrtc" and self.noise_suppression and self.rate != 16_000:
            raise ValueError("WebRTC's noise suppression runs at 16 kHz only")
        if not 0 < self.agc_level <= 32767 or not 0 <= self.agc_max_gain_db <= 60:
            raise ValueError("agc_level must be 1..32767 and agc_max_gain_db 0..60")
        if not -120 <= self.quiet_floor_dbfs <= -20:
            raise ValueError("quiet_floor_dbfs must be -120..-20")

    @property
    def enabled(self) -> bool:
        """Whether any part is on (else the microphone goes to the call untouched)."""
        return self.aec or self.noise_suppression or self.agc


class AudioFrontend:
    """The processing itself, frame by frame, without I/O (module docstring)."""

    def __init__(self, settings: FrontendSettings) -> None:
        self.settings = s = settings
        ms = s.rate // 1000
        self._chunk = 2 * ms * s.frame_ms  # bytes the canceller takes at a time
        self._down = self._up = self._ref_down = None
        if s.rate != SAMPLE_RATE:
            self._down = Resampler(SAMPLE_RATE, s.rate, FRAME_SAMPLES, _QUALITY)
            self._up = Resampler(
                s.rate, SAMPLE_RATE, FRAME_SAMPLES * s.rate // SAMPLE_RATE, _QUALITY
            )
        self._echo: EchoCanceller | None = None
        self._aligner: ReferenceAligner | None = None
        if s.aec:
            self._echo = EchoCanceller(self._chunk // 2, ms * s.tail_ms, s.rate)
            if s.rate != SAMPLE_RATE:
                self._ref_down = Resampler(SAMPLE_RATE, s.rate, FRAME_SAMPLES, _QUALITY)
            self._aligner = ReferenceAligner(
                AlignerSettings(
                    max_lag=ms * s.max_delay_ms,
                    initial_lag=ms * s.initial_delay_ms,
                    window=s.rate,  # one second of speech gives a clear peak
                    interval=s.rate // 2,
                    lead=ms * 5,
                    tolerance=ms,
                    track=s.track_delay,
                )
            )
        speex_ns = s.noise_suppression and s.denoiser == "speex"
        self._ns = NoiseSuppressor(s.webrtc_level) if s.noise_suppression and not speex_ns else None
        self._bypass = QuietBypass(s.quiet_floor_dbfs, self._chunk // 2)
        self._pre: Preprocessor | None = None
        self._pre_echo = s.aec and s.residual_echo_suppression  # it reads the filter's state
        self._pre_echo_only = not (speex_ns or s.agc)  # it runs for the residual echo alone
        if speex_ns or self._pre_echo or s.agc:
            self._pre = Preprocessor(self._chunk // 2, s.rate)
            # SpeexDSP suppresses residual echo inside its denoiser: with residual echo
            # suppression on, the denoiser runs, suppressing no noise unless asked to.
            denoise_db = s.noise_suppress_db if speex_ns else 0
            self._pre.set_denoise(speex_ns or self._pre_echo, denoise_db)
            self._pre.set_agc(s.agc, s.agc_level, s.agc_max_gain_db)
            if self._echo is not None and self._pre_echo:
                self._pre.attach_echo(self._echo, s.echo_suppress_db, s.echo_suppress_active_db)

    @property
    def delay_ms(self) -> float | None:
        """The speaker-to-microphone delay in use (None without echo cancellation)."""
        return None if self._aligner is None else self._aligner.lag * 1000 / self.settings.rate

    def reference(self, frame: bytes) -> None:
        """A 48 kHz frame the speaker was given."""
        if self._aligner is not None:
            low = frame if self._ref_down is None else self._ref_down.process(frame)
            self._aligner.push_reference(np.frombuffer(low, np.int16))

    def process(self, frame: bytes) -> bytes:
        """The 48 kHz microphone frame, cleaned (and delayed: the resamplers' ~3 ms, the
        denoiser's 6 ms while its output is in use)."""
        low = frame if self._down is None else self._down.process(frame)
        out = bytearray()
        for i in range(0, len(low), self._chunk):
            chunk = low[i : i + self._chunk]
            echo = True
            if self._echo is not None and self._aligner is not None:
                reference = self._aligner.align(np.frombuffer(chunk, np.int16)).tobytes()
                echo = self._aligner.echo
                if not echo and self._pre_echo and not self._pre_echo_only:
                    reference = bytes(len(chunk))  # no echo estimate for the preprocessor
                cancelled = self._echo.cancel(chunk, reference)
                chunk = cancelled if echo else chunk
            if self._pre is not None and (echo or not self._pre_echo_only):
                chunk = self._pre.run(chunk)
            out += chunk if self._ns is None else self._bypass.choose(chunk, self._ns.run(chunk))
        return bytes(out) if self._up is None else self._up.process(bytes(out))

    @property
    def denoising(self) -> bool:
        """Whether the noise suppressor's output is in use (not bypassed in a quiet room)."""
        return self._ns is not None and self._bypass.denoising

    def restart(self) -> None:
        """Both streams resume after a pause (a call starts): measure the delay again; the
        learnt echo path stays (the room has not moved)."""
        if self._aligner is not None:
            self._aligner.restart()

    def source(self, capture: AudioSource) -> FrontendSource:
        return FrontendSource(capture, self)

    def tap(self, speaker: AudioSink) -> ReferenceTap:
        return ReferenceTap(speaker, self)

    def close(self) -> None:
        if self._pre is not None:
            self._pre.close()  # first: it points at the echo state
        for part in (self._echo, self._down, self._up, self._ref_down):
            if part is not None:
                part.close()


class QuietBypass:
    """Chooses, frame by frame, between the denoiser's output and its input, by the noise
    floor: the lowest frame level in each half second (speech has pauses,
    noise has none). Noise is there once a second and a half has had no frame under
    ``quiet_dbfs`` + 5 dB (a talker rarely goes that long without a pause: with half a
    second, clean speech lost 0.1 PESQ to the denoiser coming in mid-sentence); the room
    is quiet once each half of the last three seconds had a frame under ``quiet_dbfs``."""

    _BLOCK_S = 0.5
    _QUIET_BLOCKS = 6
    _NOISY_BLOCKS = 3
    _HYSTERESIS_DB = 5.0

    def __init__(self, quiet_dbfs: float, frame_samples: int) -> None:
        self._quiet = quiet_dbfs
        self._block_frames = round(self._BLOCK_S * NS_RATE / frame_samples)
        self._ramp = np.linspace(0.0, 1.0, frame_samples, endpoint=False)
        self._minima: deque[float] = deque(maxlen=self._QUIET_BLOCKS)
        self._block_min = np.inf
        self._frames = 0
        self.denoising = False  # until noise is found: the denoiser learns meanwhile

    @property
    def floor_dbfs(self) -> float | None:
        """The quietest frame level of the last half second (None before the first)."""
        return self._minima[-1] if self._minima else None

    def choose(self, raw: bytes, denoised: bytes) -> bytes:
        """``denoised``, or ``raw``, or a cross-fade from one to the other."""
        was = self.denoising
        self._track(raw)
        if self.denoising != was:  # fade into the new choice over this frame
            x = np.frombuffer(raw, np.int16).astype(np.float32)
            y = np.frombuffer(denoised, np.int16).astype(np.float32)
            fade = self._ramp if self.denoising else 1.0 - self._ramp
            return np.round(x + (y - x) * fade).astype(np.int16).tobytes()
        return denoised if self.denoising else raw

    def _track(self, frame: bytes) -> None:
        x = np.frombuffer(frame, np.int16).astype(np.float32)
        level = 10 * np.log10(float(np.dot(x, x)) / len(x) / 32768.0**2 + 1e-12)
        self._block_min = min(self._block_min, level)
        self._frames += 1
        if self._frames < self._block_frames:
            return
        self._minima.append(self._block_min)
        self._block_min, self._frames = np.inf, 0
        noisy = self._quiet + self._HYSTERESIS_DB
        if not self.denoising and min(list(self._minima)[-self._NOISY_BLOCKS :]) > noisy:
            self.denoising = True
        elif self.denoising and max(self._minima) < self._quiet:
            self.denoising = False


class FrontendSource:
    """An ``AudioSource``: the microphone's frames through the front end."""

    def __init__(self, source: AudioSource, frontend: AudioFrontend) -> None:
        self._source = source
        self._frontend = frontend

    async def read(self) -> bytes:
        return self._frontend.process(await self._source.read())

    def discard_pending(self) -> int:
        self._frontend.restart()  # a call starts: the streams resume from now
        return self._source.discard_pending()

    async def close(self) -> None:
        await self._source.close()


class ReferenceTap:
    """An ``AudioSink`` that hands each frame to the front end as the echo reference as it
    goes to the speaker: before ``write``, which returns only shortly before the speaker
    wants the next one (``DeviceConfig.lead_ms``), so that the reference never comes after
    the microphone could hear it."""

    def __init__(self, sink: AudioSink, frontend: AudioFrontend) -> None:
        self._sink = sink
        self._frontend = frontend

    async def write(self, frame: bytes) -> None:
        self._frontend.reference(frame)
        await self._sink.write(frame)

    async def close(self) -> None:
        await self._sink.close()


__all__ = [
    "AudioFrontend",
    "Denoiser",
    "FrontendSettings",
    "FrontendSource",
    "QuietBypass",
    "ReferenceTap",
]
