"""Seeded sound events for the edge detectors' tests and benchmarks (48 kHz mono int16).

Glass breaks and their look-alikes (a thud, a metallic clank, a mail slot's thud-then-clank,
a door slam, hand claps, keys), steady loud tones and noise for the loud-noise detector, and
broken-microphone signals (digital silence, a stuck DC value, clipping). Every generator is a
pure function of its arguments and ``seed``, so a failing case can be rebuilt exactly.
Alarms and long backgrounds live in ``tools/lab/sounds.py``; speech comes from espeak-ng
through ``tools.lab.virtual_audio.speech_wav``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from agent.audio.format import SAMPLE_RATE
from tools.lab.virtual_audio import read_wav, speech_wav

RATE = SAMPLE_RATE
FULL_SCALE = 32767.0

Float = np.ndarray


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _t(seconds: float) -> Float:
    return np.arange(round(seconds * RATE)) / RATE


def _peak_to(x: Float, peak_dbfs: float) -> Float:
    peak = float(np.max(np.abs(x))) or 1.0
    return x * (FULL_SCALE * 10 ** (peak_dbfs / 20) / peak)


def _rms_to(x: Float, rms_dbfs: float) -> Float:
    rms = float(np.sqrt(np.mean(x * x))) or 1.0
    return x * (FULL_SCALE * 10 ** (rms_dbfs / 20) / rms)


def to_int16(x: Float) -> np.ndarray:
    """Round and saturate float samples (full scale 32767) to int16."""
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


def band_noise(rng: np.random.Generator, n: int, lo_hz: float, hi_hz: float) -> Float:
    """White noise kept only between ``lo_hz`` and ``hi_hz`` (an FFT brick wall), unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / RATE)
    spec[(f < lo_hz) | (f > hi_hz)] = 0
    x = np.fft.irfft(spec, n)
    return x / (float(np.sqrt(np.mean(x * x))) or 1.0)


def _damped(freq: float, decay_s: float, seconds: float, phase: float = 0.0) -> Float:
    t = _t(seconds)
    return np.sin(2 * np.pi * freq * t + phase) * np.exp(-t / decay_s)


def _attack(x: Float, attack_s: float) -> Float:
    n = min(len(x), max(1, round(attack_s * RATE)))
    x = x.copy()
    x[:n] *= np.linspace(0.0, 1.0, n)
    return x


def place(into: Float, event: Float, at_s: float, gain: float = 1.0) -> Float:
    """Add ``event`` into ``into`` (in place, float) starting at ``at_s``; clipped at the end."""
    start = round(at_s * RATE)
    end = min(len(into), start + len(event))
    if end > start:
        into[start:end] += gain * event[: end - start]
    return into


def pad(event: np.ndarray, before_s: float = 0.5, after_s: float = 1.5) -> np.ndarray:
    """``event`` with digital silence around it, so a detector sees its onset and its end."""
    z1 = np.zeros(round(before_s * RATE), np.int16)
    z2 = np.zeros(round(after_s * RATE), np.int16)
    return np.concatenate([z1, np.asarray(event, np.int16), z2])


def mix(background: np.ndarray, event: np.ndarray, at_s: float, snr_db: float) -> np.ndarray:
    """``event`` added to ``background`` at ``at_s``, scaled to ``snr_db`` over the background.

    The SNR compares the event's RMS over its own length (its samples above -60 dB of its
    peak) with the whole background's RMS.
    """
    bg = np.asarray(background, np.float64)
    ev = np.asarray(event, np.float64)
    active = ev[np.abs(ev) > np.max(np.abs(ev)) * 1e-3] if np.any(ev) else ev
    ev_rms = float(np.sqrt(np.mean(active * active))) or 1.0
    bg_rms = float(np.sqrt(np.mean(bg * bg))) or 1.0
    gain = bg_rms * 10 ** (snr_db / 20) / ev_rms
    return to_int16(place(bg.copy(), ev, at_s, gain))


# --- impacts and glass -------------------------------------------------------------------


def _thud(rng: np.random.Generator, lo_hz: float, hi_hz: float, decay_s: float) -> Float:
    seconds = decay_s * 6
    x = np.zeros(round(seconds * RATE))
    for _ in range(3):
        x += rng.uniform(0.4, 1.0) * _damped(
            rng.uniform(lo_hz, hi_hz), decay_s * rng.uniform(0.6, 1.2), seconds
        )
    body = band_noise(rng, len(x), 20, hi_hz * 1.5) * np.exp(-_t(seconds) / (decay_s / 2))
    return _attack(x + 0.5 * body, 0.001)


def impact(seed: int, peak_dbfs: float = -6.0) -> np.ndarray:
    """A thud: a few low modes (60-300 Hz) with a 1 ms attack decaying over ~60 ms."""
    rng = _rng(seed)
    return to_int16(_peak_to(_thud(rng, 60, 300, rng.uniform(0.04, 0.08)), peak_dbfs))


def shatter(seed: int, seconds: float = 0.45, peak_dbfs: float = -8.0) -> np.ndarray:
    """Broadband crackle of breaking glass: hundreds of shard clicks and tinkles, 2-20 kHz.

    Shards ring at random frequencies, so together they are broadband (flat spectrum) yet
    impulsive (a high crest factor), which is what separates them from a steady hiss.
    """
    rng = _rng(seed)
    n = round(seconds * RATE)
    x = np.zeros(n + RATE // 10)
    tau = seconds / 3
    count = int(rng.uniform(250, 400) * seconds)
    starts = np.sort(rng.exponential(tau, count))
    starts = starts[starts < seconds]
    for s in starts:
        envelope = np.exp(-s / tau)
        if rng.random() < 0.5:
            length = rng.uniform(0.0003, 0.003)
            click = band_noise(rng, max(8, round(length * RATE)), 2000, 20000)
            click *= np.exp(-np.arange(len(click)) / (len(click) / 3))
            place(x, click * envelope * rng.uniform(0.3, 1.0), s)
        else:
            ring = _damped(
                rng.uniform(3000, 16000), rng.uniform(0.003, 0.02), 0.1, rng.uniform(0, 6.3)
            )
            place(x, ring * envelope * rng.uniform(0.2, 0.7), s)
    bed = band_noise(rng, len(x), 2000, 20000) * np.exp(-_t(len(x) / RATE) / tau) * 0.15
    return to_int16(_peak_to(_attack(x + bed, 0.0005), peak_dbfs))


def glass_break(
    seed: int, delay_s: float = 0.04, peak_dbfs: float = -6.0, shatter_db: float = -2.0
) -> np.ndarray:
    """An impact and, ``delay_s`` later, the shatter (``shatter_db`` relative to the impact)."""
    rng = _rng(seed)
    thud = impact(int(rng.integers(1 << 30)), peak_dbfs).astype(np.float64)
    crackle = shatter(
        int(rng.integers(1 << 30)), rng.uniform(0.3, 0.6), peak_dbfs + shatter_db
    ).astype(np.float64)
    out = np.zeros(round(delay_s * RATE) + max(len(thud), len(crackle)) + len(crackle))
    place(out, thud, 0.0)
    place(out, crackle, delay_s)
    return to_int16(np.trim_zeros(out, "b"))


def thud_hiss(seed: int, peak_dbfs: float = -6.0) -> np.ndarray:
    """A thud then 0.2-0.5 s of smooth broadband hiss (a kick then a snare, a dropped spray).

    Broadband like shatter but Gaussian, not impulsive: the crest factor tells them apart.
    """
    rng = _rng(seed)
    thud = impact(int(rng.integers(1 << 30)), peak_dbfs).astype(np.float64)
    seconds = rng.uniform(0.2, 0.5)
    hiss = band_noise(rng, round(seconds * RATE), 2000, 20000) * np.exp(-_t(seconds) / seconds)
    out = np.zeros(len(thud) + len(hiss) + RATE // 10)
    place(out, thud, 0.0)
    place(out, _attack(hiss, 0.002) * FULL_SCALE * 10 ** ((peak_dbfs - 10) / 20), 0.03)
    return to_int16(out)


def clank(seed: int, peak_dbfs: float = -8.0) -> np.ndarray:
    """A short metallic ring: a click then a few inharmonic bar modes (1.5-12 kHz), tonal."""
    rng = _rng(seed)
    f0 = rng.uniform(1500, 3500)
    seconds = 0.6
    x = np.zeros(round(seconds * RATE))
    for ratio, amp in ((1.0, 1.0), (2.76, 0.7), (5.40, 0.5), (8.93, 0.3)):
        if f0 * ratio < 18000:
            x += amp * _damped(f0 * ratio, rng.uniform(0.08, 0.25) / ratio**0.5, seconds)
    click = band_noise(rng, round(0.001 * RATE), 2000, 20000) * 0.5
    place(x, click, 0.0)
    return to_int16(_peak_to(_attack(x, 0.0003), peak_dbfs))


def mail_slot(seed: int, peak_dbfs: float = -6.0) -> np.ndarray:
    """A mail slot: the flap's thud then, 50-150 ms later, its metallic clank."""
    rng = _rng(seed)
    thud = impact(int(rng.integers(1 << 30)), peak_dbfs).astype(np.float64)
    ring = clank(int(rng.integers(1 << 30)), peak_dbfs - rng.uniform(0, 4)).astype(np.float64)
    delay = rng.uniform(0.05, 0.15)
    out = np.zeros(round(delay * RATE) + len(ring) + len(thud))
    place(out, thud, 0.0)
    place(out, ring, delay)
    return to_int16(out)


def door_slam(seed: int, peak_dbfs: float = -3.0) -> np.ndarray:
    """A door slam: a big low thud with a short broadband crack, then the latch's click-ring."""
    rng = _rng(seed)
    x = _thud(rng, 40, 140, rng.uniform(0.08, 0.16))
    crack = band_noise(rng, round(rng.uniform(0.005, 0.02) * RATE), 500, 16000)
    crack *= np.exp(-np.arange(len(crack)) / (len(crack) / 4)) * 0.6
    place(x, crack, 0.0)
    latch = clank(int(rng.integers(1 << 30)), -12).astype(np.float64) / FULL_SCALE
    place(x, latch * 0.5, rng.uniform(0.03, 0.12))
    return to_int16(_peak_to(x, peak_dbfs))


def claps(seed: int, count: int = 6, rate_hz: float = 4.0, peak_dbfs: float = -6.0) -> np.ndarray:
    """Hand claps: ``count`` 10 ms noise bursts centred near 1-3 kHz, ``rate_hz`` apart."""
    rng = _rng(seed)
    x = np.zeros(round((count / rate_hz + 0.5) * RATE))
    for i in range(count):
        burst = band_noise(rng, round(0.03 * RATE), 600, 5000)
        burst += 0.3 * band_noise(rng, len(burst), 100, 400)
        burst *= np.exp(-np.arange(len(burst)) / (rng.uniform(0.004, 0.01) * RATE))
        place(x, _attack(burst, 0.0005), i / rate_hz + rng.uniform(-0.02, 0.02) + 0.02)
    return to_int16(_peak_to(x, peak_dbfs))


def keys(
    seed: int, seconds: float = 1.5, peak_dbfs: float = -10.0, drop: bool = False
) -> np.ndarray:
    """A bunch of keys jingling (or, with ``drop``, hitting a table first): metal tinkles.

    Each strike rings a few partials between 2 and 14 kHz; strikes overlap but stay tonal.
    """
    rng = _rng(seed)
    x = np.zeros(round((seconds + 0.3) * RATE))
    at = 0.0
    if drop:
        place(x, _thud(rng, 200, 800, 0.02) * 1.5, 0.0)
        at = 0.01
    while at < seconds:
        key_f = rng.uniform(2000, 7000)
        strike = np.zeros(round(0.3 * RATE))
        for ratio in (1.0, 2.76, 5.40):
            if key_f * ratio < 16000:
                strike += rng.uniform(0.3, 1.0) * _damped(
                    key_f * ratio, rng.uniform(0.02, 0.1), 0.3, rng.uniform(0, 6.3)
                )
        place(x, _attack(strike, 0.0002) * rng.uniform(0.2, 1.0), at)
        at += rng.exponential(1 / 25)
    return to_int16(_peak_to(x, peak_dbfs))


# --- steady sounds for the loud-noise detector ------------------------------------------


def tone(freq_hz: float, seconds: float, rms_dbfs: float) -> np.ndarray:
    """A sine of ``freq_hz`` at ``rms_dbfs`` (RMS re full scale: a full-scale sine is -3 dB)."""
    return to_int16(_rms_to(np.sin(2 * np.pi * freq_hz * _t(seconds)), rms_dbfs))


def noise(seconds: float, rms_dbfs: float, seed: int, color: str = "white") -> np.ndarray:
    """White, pink (-3 dB/octave) or brown (-6 dB/octave) noise at ``rms_dbfs``."""
    rng = _rng(seed)
    n = round(seconds * RATE)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / RATE)
    f[0] = f[1]
    slope = {"white": 0.0, "pink": 0.5, "brown": 1.0}
    if color not in slope:
        raise ValueError(f"noise color must be one of {sorted(slope)}, got {color!r}")
    spec /= f ** slope[color]
    spec[0] = 0
    return to_int16(_rms_to(np.fft.irfft(spec, n), rms_dbfs))


def bursts(seconds: float, rms_dbfs: float, on_s: float, off_s: float, seed: int) -> np.ndarray:
    """Pink noise switched on for ``on_s`` and off for ``off_s``, repeatedly."""
    x = noise(seconds, rms_dbfs, seed, "pink").astype(np.float64)
    t = _t(seconds)
    x[(t % (on_s + off_s)) >= on_s] = 0
    return to_int16(x)


# --- broken microphones ------------------------------------------------------------------


def silence(seconds: float) -> np.ndarray:
    """Digital silence: every sample zero, what a dead I2S/USB microphone delivers."""
    return np.zeros(round(seconds * RATE), np.int16)


def near_silence(seconds: float, seed: int, lsb: int = 1) -> np.ndarray:
    """Samples within +-``lsb``: a microphone whose analog side is dead but the ADC dithers."""
    return _rng(seed).integers(-lsb, lsb + 1, round(seconds * RATE)).astype(np.int16)


def stuck(seconds: float, value: int = 12000, seed: int = 0, jitter_lsb: int = 0) -> np.ndarray:
    """A constant ``value`` (+-``jitter_lsb``): a stuck ADC or a shorted bias line."""
    x = np.full(round(seconds * RATE), value, np.int64)
    if jitter_lsb:
        x += _rng(seed).integers(-jitter_lsb, jitter_lsb + 1, len(x))
    return np.clip(x, -32768, 32767).astype(np.int16)


def clipped(seconds: float, seed: int, overdrive_db: float = 12.0) -> np.ndarray:
    """Pink noise driven ``overdrive_db`` past full scale and saturated: persistent clipping."""
    x = noise(seconds, -12.0, seed, "pink").astype(np.float64) * 10 ** (overdrive_db / 20)
    return to_int16(x)


# --- backgrounds used as negatives ------------------------------------------------------


def music(seconds: float, seed: int, rms_dbfs: float = -26.0, drums: bool = True) -> np.ndarray:
    """Music-like: chords of harmonic tones over a drum kit (kick, snare, hi-hat, crash)."""
    rng = _rng(seed)
    n = round(seconds * RATE)
    x = np.zeros(n + RATE)
    beat = 60 / rng.uniform(90, 140)
    roots = 110 * 2 ** (rng.integers(0, 12, 64) / 12)
    bar = 4 * beat
    for i, root in enumerate(roots):
        at = i * bar
        if at >= seconds:
            break
        chord = np.zeros(round(bar * RATE))
        for ratio in (1.0, 1.26, 1.5):
            for h in range(1, 8):
                chord += np.sin(2 * np.pi * root * ratio * h * _t(bar)) / h
        place(x, chord * np.exp(-_t(bar) / bar) * 0.05, at)
    kick = np.sin(2 * np.pi * np.cumsum(150 * np.exp(-_t(0.3) / 0.04) + 50) / RATE)
    kick *= np.exp(-_t(0.3) / 0.08)
    steps = int(seconds / (beat / 2)) if drums else 0
    for k in range(steps):
        at = k * beat / 2
        if k % 4 == 0:
            place(x, kick, at, 0.8)
        if k % 4 == 2:
            snare = band_noise(rng, round(0.2 * RATE), 200, 12000) * np.exp(-_t(0.2) / 0.05)
            place(x, snare + _damped(190, 0.05, 0.2), at, 0.3)
        hat = band_noise(rng, round(0.05 * RATE), 6000, 18000) * np.exp(-_t(0.05) / 0.01)
        place(x, hat, at, 0.08)
        if k % 32 == 0:
            crash = band_noise(rng, round(1.5 * RATE), 3000, 18000) * np.exp(-_t(1.5) / 0.4)
            place(x, crash, at, 0.12)
    return to_int16(_rms_to(x[:n], rms_dbfs))


def household(seconds: float, seed: int, rms_dbfs: float = -40.0) -> np.ndarray:
    """Household background: pink noise, mains hum and, now and then, a cupboard knock."""
    rng = _rng(seed)
    x = noise(seconds, rms_dbfs, seed, "pink").astype(np.float64)
    x += _rms_to(np.sin(2 * np.pi * 50 * _t(seconds)), rms_dbfs - 6)
    for at in np.cumsum(rng.exponential(8.0, int(seconds / 4) + 1)):
        if at < seconds - 1:
            place(x, _thud(rng, 100, 400, 0.03), at, FULL_SCALE * 10 ** ((rms_dbfs + 20) / 20))
    return to_int16(x)


def speech(text: str, workdir: Path | None = None) -> np.ndarray:
    """``text`` spoken by espeak-ng at 48 kHz (needs espeak-ng and sox on PATH)."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        samples, rate = read_wav(speech_wav(Path(tmp) / "speech.wav", text, RATE))
    if rate != RATE:
        raise RuntimeError(f"speech_wav gave {rate} Hz, not {RATE}")
    return samples
