"""Seeded synthetic sounds for the edge detectors' tests and benchmarks (48 kHz mono).

Everything is float64 in [-1, 1] until ``to_int16``; every generator takes a
``numpy.random.Generator`` so a corpus is reproduced exactly from its seed. Alarms
follow ISO 8201 / NFPA 72 (temporal-three for smoke, temporal-four for CO) and can be
drifted up to the +-30 % that real alarms show; the look-alikes are the short beeping
things that must *not* raise an alarm (low-battery chirps, oven timers, reversing
trucks, microwaves, alarm clocks that stop within seconds).

Speech comes from ``tools.lab.virtual_audio.speech_wav`` (espeak-ng + sox), so it needs
those tools and a work directory; everything else is pure numpy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.audio.format import FRAME_SAMPLES, SAMPLE_RATE
from agent.edge.base import Detection, Detector
from tools.lab.virtual_audio import read_wav, speech_wav

Segments = list[tuple[float, float]]
"""(start_s, end_s) of each tone of a beep pattern."""

SENTENCES = (
    "The kitchen light is still on, could you switch it off before you leave.",
    "I think the delivery arrives tomorrow morning between eight and ten.",
    "Please remember to water the plants on the balcony this weekend.",
    "The weather forecast says heavy rain and strong wind for the whole afternoon.",
    "Who left the front door open, the cat almost ran out into the street.",
    "We need milk, bread, eggs, coffee and something for dinner tonight.",
    "Turn the television down a little, the baby is finally asleep upstairs.",
    "Dinner is ready in five minutes, wash your hands and come to the table.",
)


@dataclass(frozen=True, slots=True)
class Alarm:
    """A generated alarm and the truth about it, for scoring a detector."""

    samples: np.ndarray
    kind: str  # "smoke_alarm" (T3), "co_alarm" (T4) or "alarm_sound" (other rhythm)
    freq_hz: float
    square: bool
    tones: tuple[tuple[float, float], ...]


# --- tones and patterns --------------------------------------------------------------


def carrier(freq_hz: float, n: int, *, square: bool = False, phase: float = 0.0) -> np.ndarray:
    """A unit-amplitude sine, or a band-limited square wave (odd harmonics below 20 kHz)."""
    t = np.arange(n) / SAMPLE_RATE
    if not square:
        sine: np.ndarray = np.sin(2 * np.pi * freq_hz * t + phase)
        return sine
    out = np.zeros(n)
    k = 1
    while k * freq_hz < 20_000:
        out += np.sin(2 * np.pi * k * freq_hz * t + k * phase) / k
        k += 2
    return out * (np.pi / 4)


def gate(segments: Segments, n: int, ramp_s: float = 0.004) -> np.ndarray:
    """An on/off envelope with raised-cosine edges (real buzzers do not click)."""
    env = np.zeros(n)
    ramp = max(1, round(ramp_s * SAMPLE_RATE))
    rise = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
    for start, end in segments:
        a, b = round(start * SAMPLE_RATE), min(n, round(end * SAMPLE_RATE))
        if b <= a:
            continue
        env[a:b] = 1.0
        r = min(ramp, (b - a) // 2)
        env[a : a + r] = rise[:r]
        env[b - r : b] = rise[:r][::-1]
    return env


def beeps(
    segments: Segments, seconds: float, freq_hz: float, *, square: bool = False
) -> np.ndarray:
    """A tone of ``freq_hz`` switched on during ``segments``, ``seconds`` long."""
    n = round(seconds * SAMPLE_RATE)
    out: np.ndarray = gate(segments, n) * carrier(freq_hz, n, square=square)
    return out


def rhythm(
    rng: np.random.Generator,
    seconds: float,
    groups: Sequence[Sequence[tuple[float, float]]],
    *,
    start_s: float = 0.0,
    jitter: float = 0.0,
) -> Segments:
    """Tone segments repeating a cycle of (on_s, off_s) pairs from ``start_s`` until ``seconds``.

    ``groups`` is one cycle (for T3: three tones, the last followed by the long pause).
    Each on/off time is multiplied by 1 +- ``jitter`` (uniform) independently.
    """
    out: Segments = []
    t = start_s
    while True:
        for group in groups:
            for on, off in group:
                on_j = on * (1 + rng.uniform(-jitter, jitter))
                off_j = off * (1 + rng.uniform(-jitter, jitter))
                if t + on_j > seconds:
                    return out
                out.append((t, t + on_j))
                t += on_j + off_j


def temporal(
    rng: np.random.Generator,
    kind: str,
    seconds: float,
    *,
    on_scale: float = 1.0,
    gap_scale: float = 1.0,
    pause_scale: float = 1.0,
    jitter: float = 0.02,
) -> Segments:
    """T3 (``smoke_alarm``) or T4 (``co_alarm``) tone segments, timings scaled off nominal."""
    if kind == "smoke_alarm":
        count, on, gap, pause = 3, 0.5, 0.5, 1.5
    elif kind == "co_alarm":
        count, on, gap, pause = 4, 0.1, 0.1, 5.0
    else:
        raise ValueError(f"no temporal pattern for {kind!r}")
    cycle = [(on * on_scale, gap * gap_scale)] * (count - 1) + [
        (on * on_scale, pause * pause_scale)
    ]
    return rhythm(rng, seconds, [cycle], jitter=jitter)


def alarm(
    rng: np.random.Generator,
    kind: str,
    seconds: float,
    *,
    freq_hz: float | None = None,
    square: bool | None = None,
    drift: float = 0.3,
    jitter: float = 0.02,
) -> Alarm:
    """A random alarm of ``kind``: a piezo tone in 2-4 kHz or (one in four) a 520 Hz square.

    Tone, gap and pause lengths are each scaled by a factor drawn so that, with every
    element then jittered by 1 +- ``jitter``, they stay within 1 +- ``drift`` of nominal.
    ``kind`` "alarm_sound" gives a continuous beeping in another rhythm (on 0.2-1 s,
    off 0.2-1 s, no long pause).
    """
    if square is None:
        square = bool(rng.random() < 0.25)
    if freq_hz is None:
        freq_hz = 520.0 * (1 + rng.uniform(-0.03, 0.03)) if square else rng.uniform(2000, 4000)
    if kind == "alarm_sound":
        on, off = rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.0)
        segments = rhythm(rng, seconds, [[(on, off)]], jitter=jitter)
    else:
        spread = max(0.0, drift - jitter)  # drift and jitter together stay within drift
        scales = 1 + rng.uniform(-spread, spread, size=3)
        segments = temporal(
            rng,
            kind,
            seconds,
            on_scale=float(scales[0]),
            gap_scale=float(scales[1]),
            pause_scale=float(scales[2]),
            jitter=jitter,
        )
    samples = beeps(segments, seconds, freq_hz, square=square)
    return Alarm(samples, kind, float(freq_hz), square, tuple(segments))


# --- look-alikes (negatives) ----------------------------------------------------------


def battery_chirp(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """A smoke alarm's low-battery chirp: one ~60 ms 3 kHz-ish chirp every 30-60 s."""
    freq = rng.uniform(2800, 3600)
    period = rng.uniform(30, 60)
    t = rng.uniform(0, 5)
    segments: Segments = []
    while t < seconds - 0.1:
        segments.append((t, t + rng.uniform(0.04, 0.12)))
        t += period
    return beeps(segments, seconds, freq)


def oven_timer(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """An oven/kitchen timer: groups of 3-4 quick beeps a second apart, stopping within ~10 s."""
    freq = rng.uniform(2000, 4000)
    count = int(rng.integers(3, 5))
    on, off = rng.uniform(0.08, 0.15), rng.uniform(0.06, 0.12)
    pause = rng.uniform(0.5, 1.2)
    stop = min(seconds, rng.uniform(3, 10))
    cycle = [(on, off)] * (count - 1) + [(on, pause)]
    return beeps(rhythm(rng, stop, [cycle], start_s=rng.uniform(0, 1)), seconds, freq)


def truck_reversing(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """A reversing truck: a few 0.4-0.6 s beeps of 1-1.3 kHz (square-ish: has harmonics)."""
    freq = rng.uniform(1000, 1300)
    on, off = rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6)
    stop = min(seconds, rng.uniform(2, 10))
    return beeps(rhythm(rng, stop, [[(on, off)]]), seconds, freq, square=True)


def microwave(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """A microwave or dishwasher finishing: 3-5 beeps of 0.3-1 s at ~2-2.5 kHz, then silence.

    Three half-second beeps a half second apart look exactly like one T3 group; only the
    missing repetition tells them apart.
    """
    freq = rng.uniform(2000, 2600)
    count = int(rng.integers(3, 6))
    on, off = rng.uniform(0.3, 1.0), rng.uniform(0.3, 0.7)
    segments = rhythm(rng, count * (on + off) - off + 0.01, [[(on, off)]], jitter=0.02)
    return beeps(segments, seconds, freq)


def alarm_clock(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """A bedside alarm clock switched off within seconds: bursts of fast beeps, 2-12 s."""
    freq = rng.uniform(2000, 4000)
    count = int(rng.integers(2, 5))
    on, off = rng.uniform(0.05, 0.12), rng.uniform(0.05, 0.1)
    pause = rng.uniform(0.3, 0.8)
    stop = min(seconds, rng.uniform(2, 12))
    cycle = [(on, off)] * (count - 1) + [(on, pause)]
    return beeps(rhythm(rng, stop, [cycle]), seconds, freq, square=bool(rng.random() < 0.5))


LOOKALIKES = {
    "battery_chirp": battery_chirp,
    "oven_timer": oven_timer,
    "truck_reversing": truck_reversing,
    "microwave": microwave,
    "alarm_clock": alarm_clock,
}


# --- backgrounds ----------------------------------------------------------------------


def noise(rng: np.random.Generator, seconds: float, color: str = "white") -> np.ndarray:
    """White, pink (1/f) or brown (1/f^2) noise at unit RMS."""
    n = round(seconds * SAMPLE_RATE)
    white = rng.standard_normal(n)
    if color == "white":
        return white
    exponent = {"pink": 0.5, "brown": 1.0}.get(color)
    if exponent is None:
        raise ValueError(f"unknown noise colour {color!r}")
    spectrum = np.fft.rfft(white)
    f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    f[0] = f[1]
    shaped = np.fft.irfft(spectrum / np.maximum(f, 20.0) ** exponent, n)
    return shaped / (np.sqrt(np.mean(shaped**2)) or 1.0)


def household(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Household sounds: low pink hum plus random bursts (doors, steps, water) and clinks.

    Clinks are short decaying tones at 2-6 kHz (cutlery, glasses): single tonal events in
    the alarm band that must not add up to a pattern.
    """
    n = round(seconds * SAMPLE_RATE)
    out = 0.05 * noise(rng, seconds, "pink")
    t = 0.0
    while True:
        t += rng.exponential(1.5)
        if t >= seconds - 0.5:
            break
        a = round(t * SAMPLE_RATE)
        length = round(rng.uniform(0.03, 0.6) * SAMPLE_RATE)
        m = min(length, n - a)
        decay = np.exp(-np.arange(m) / (m / rng.uniform(2, 6)))
        if rng.random() < 0.3:
            freq = rng.uniform(2000, 6000)
            burst = carrier(freq, m, phase=rng.uniform(0, 2 * np.pi)) * decay
        else:
            color = str(rng.choice(["white", "pink", "brown"]))
            burst = noise(rng, m / SAMPLE_RATE, color)[:m] * decay
        out[a : a + m] += burst * 10 ** rng.uniform(-1.5, 0)
    return out


def music(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Music-like audio: random chords in a random key, harmonic notes, 0.25-2 s each."""
    n = round(seconds * SAMPLE_RATE)
    out = np.zeros(n)
    root = int(rng.integers(45, 60))
    scale = np.array([0, 2, 4, 5, 7, 9, 11])
    t = 0.0
    while t < seconds:
        length = float(rng.choice([0.25, 0.5, 0.5, 1.0, 1.0, 2.0]))
        a, b = round(t * SAMPLE_RATE), min(n, round((t + length) * SAMPLE_RATE))
        m = b - a
        env = np.minimum(1.0, np.arange(m) / 480) * np.exp(-np.arange(m) / (m * 0.8))
        degrees = rng.choice(7, size=int(rng.integers(3, 5)), replace=False)
        for d in degrees:
            midi = root + scale[d % 7] + 12 * int(rng.integers(0, 3))
            f0 = 440.0 * 2 ** ((midi - 69) / 12)
            note = np.zeros(m)
            for h in range(1, 9):
                if h * f0 < 8000:
                    note += carrier(h * f0, m, phase=rng.uniform(0, 6.3)) / h**1.2
            out[a:b] += note * env
        if rng.random() < 0.5:  # percussion on the beat
            hit = min(m, 2400)
            out[a : a + hit] += noise(rng, hit / SAMPLE_RATE)[:hit] * np.exp(-np.arange(hit) / 300)
        t += length
    return out


VOICES = ("en", "en-us+f3", "en-gb-scotland", "en-us+m4", "en+f2", "en-029")
"""espeak-ng voices, men's and women's, for corpora with more than one speaker."""


def _speech_path(work: Path, text: str, voice: str) -> Path:
    key = hashlib.sha256(f"{voice}|{text}".encode()).hexdigest()[:12]
    return work / f"speech-{key}.wav"


def prepare_speech(work: Path, voices: Sequence[str] = VOICES) -> None:
    """Synthesise every sentence in every voice into ``work`` now, so that processes
    generating a corpus side by side only read the files."""
    work.mkdir(parents=True, exist_ok=True)
    for voice in voices:
        for text in SENTENCES:
            if not (path := _speech_path(work, text, voice)).exists():
                speech_wav(path, text, voice=voice)


def speech(
    work: Path, rng: np.random.Generator, seconds: float, voices: Sequence[str] = ("en",)
) -> np.ndarray:
    """Speech (espeak-ng) filling ``seconds``: random sentences in random ``voices`` with
    0.2-1.5 s pauses.

    The sentences are synthesised once into ``work`` and reused.
    """
    work.mkdir(parents=True, exist_ok=True)
    n = round(seconds * SAMPLE_RATE)
    out = np.zeros(n)
    pos = 0
    while pos < n:
        text = SENTENCES[int(rng.integers(len(SENTENCES)))]
        # One voice draws nothing: the clips of the tests stay what they were.
        voice = voices[int(rng.integers(len(voices)))] if len(voices) > 1 else voices[0]
        path = _speech_path(work, text, voice)
        if not path.exists():
            speech_wav(path, text, voice=voice)
        data, _ = read_wav(path)
        clip = data.astype(np.float64) / 32768
        m = min(len(clip), n - pos)
        out[pos : pos + m] = clip[:m]
        pos += m + round(rng.uniform(0.2, 1.5) * SAMPLE_RATE)
    return out


def reverb(rng: np.random.Generator, x: np.ndarray, rt60_s: float, wet: float = 0.5) -> np.ndarray:
    """A simple room: the direct sound plus exponentially decaying noise (``rt60_s``)."""
    length = round(rt60_s * SAMPLE_RATE)
    t = np.arange(length) / SAMPLE_RATE
    tail = rng.standard_normal(length) * 10 ** (-3 * t / rt60_s)
    tail[: round(0.005 * SAMPLE_RATE)] = 0.0  # first reflections arrive after ~5 ms
    tail *= wet / np.sqrt(np.sum(tail**2))
    size = 1 << int(np.ceil(np.log2(len(x) + length)))
    wet_part = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(tail, size), size)[: len(x)]
    return x + wet_part


# --- levels and mixing ----------------------------------------------------------------


def active_power(x: np.ndarray, within_db: float = 20.0) -> float:
    """Mean power over the 20 ms frames within ``within_db`` of the loudest one.

    An alarm is silent most of the time (T4: ~7 % duty), so its SNR is taken while it
    sounds, not averaged over its pauses.
    """
    m = len(x) // FRAME_SAMPLES * FRAME_SAMPLES
    frames = (x[:m] ** 2).reshape(-1, FRAME_SAMPLES).mean(axis=1)
    if not len(frames) or frames.max() <= 0:
        return 0.0
    loud = frames[frames >= frames.max() * 10 ** (-within_db / 10)]
    return float(loud.mean())


def mix(
    foreground: np.ndarray, background: np.ndarray, snr_db: float, at_s: float = 0.0
) -> np.ndarray:
    """``background`` with ``foreground`` added at ``at_s``, scaled to ``snr_db``.

    SNR is the foreground's ``active_power`` over the background's mean power.
    """
    out = background.copy()
    a = round(at_s * SAMPLE_RATE)
    m = min(len(foreground), len(out) - a)
    fg = foreground[:m]
    p_fg, p_bg = active_power(fg), float(np.mean(background**2))
    if p_fg > 0 and p_bg > 0:
        fg = fg * np.sqrt(p_bg / p_fg * 10 ** (snr_db / 10))
    out[a : a + m] += fg
    return out


def to_int16(x: np.ndarray, rms_dbfs: float = -30.0) -> np.ndarray:
    """Scale to ``rms_dbfs`` (RMS re full scale) and convert, lowered if it would clip."""
    rms = float(np.sqrt(np.mean(x**2))) if len(x) else 0.0
    gain = 32767 * 10 ** (rms_dbfs / 20) / rms if rms > 0 else 0.0
    peak = float(np.max(np.abs(x))) * gain if len(x) else 0.0
    if peak > 32000:
        gain *= 32000 / peak
    return np.round(x * gain).astype(np.int16)


def frames(samples: np.ndarray) -> Iterator[np.ndarray]:
    """The 20 ms frames of ``samples`` (a trailing partial frame is dropped)."""
    for i in range(len(samples) // FRAME_SAMPLES):
        yield samples[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES]


def detect(detector: Detector, samples: np.ndarray) -> list[Detection]:
    """Everything ``detector`` reports over ``samples``, fed frame by frame as a board does."""
    found: list[Detection] = []
    for frame in frames(np.asarray(samples, np.int16)):
        found += detector.feed(frame)
    return found


def concat(*parts: np.ndarray) -> np.ndarray:
    """Clips one after the other, as int16."""
    return np.concatenate(parts).astype(np.int16)
