"""Audio front end benchmark: echo cancellation, double talk, noise suppression, CPU.

Everything is generated from ``--seed``, so a run is reproduced exactly. Clips go through
the agent's own ``AudioFrontend`` (SpeexDSP, ``[audio.frontend]`` defaults) 20 ms frame by
frame at 48 kHz, as on a board: each far-end frame is handed over as the speaker's
reference, then the microphone frame is cleaned.

- Echo (``--echo-clips``, far end only): far-end speech (espeak-ng, ``sounds.VOICES``)
  played through a simulated echo path (``tools.lab.echo``: 5-80 ms delay, a room of
  RT60 0.15-0.3 s, a speaker's soft clipping, 0 to -6 dB), over a -80 dBFS microphone
  noise floor. ``erle_db``: echo return loss enhancement (microphone power over output
  power) in 250 ms windows where the far end talks, the median after convergence, the
  median over clips. ``convergence_s``: from the far end's first words to the end of the
  first window at ``CONVERGED_DB`` or more. ``delay_error_ms``: the measured delay against
  the path's. Baseline: the same clips with the delay fixed at ``initial_delay_ms`` (no
  measurement), ``erle_db_fixed_delay``; no processing is 0 dB by definition.
- Double talk (``--doubletalk-clips``): the far end alone for ``TRAINING_S``, then a
  near-end talker too. ``pesq_wb_near_doubletalk``: PESQ (P.862 wideband) of the front
  end's output over the double-talk part against the clean near-end speech; baseline
  ``pesq_wb_near_doubletalk_unprocessed``, the microphone itself (speech plus echo), and
  ``pesq_wb_near_doubletalk_filter_only``, the canceller's linear filter alone (no residual
  echo suppression, no denoiser): what the suppressor has to work with. The far end
  talks first, as in terminal double-talk tests (a far-end training sequence, then the
  test), long enough for SpeexDSP's filter to reach its steady state, where a board's
  canceller is once it has been in calls (its filter persists from call to call);
  ``pesq_wb_near_doubletalk_first_call``: the same with a canceller that has heard only
  ``CONVERGE_S`` of far end (a board's first call after it starts).
- Noise (``--noise-clips`` per SNR in ``--snrs``): speech after 2 s of fan noise (pink
  noise and blade tones) or street noise (brown rumble and passing bursts), SNR of the
  speech's active power over the noise's mean. ``pesq_gain_ns``: PESQ of the output minus
  PESQ of the noisy input (the baseline, ``pesq_wb_noisy``), noise suppression alone
  (``--denoiser``); ``pesq_gain_ns_<other>``: the same clips through the other denoiser.
  ``pesq_wb_clean_ns_<name>``: what each suppressor does to clean speech (a fan ``CLEAN_SNR_DB``
  below it); baseline ``pesq_wb_clean``, the input itself.
- ``cpu_per_audio_s``: CPU time of the whole front end (defaults: echo cancellation,
  residual echo suppression, ``--denoiser``, resampling both ways, delay tracking) per second
  of audio; baseline ``opus_encode_cpu_per_audio_s``, encoding the same audio.

The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr
from pesq import pesq

from agent.audio.format import FRAME_SAMPLES, SAMPLE_RATE
from agent.audio.frontend import AudioFrontend, Denoiser, FrontendSettings
from agent.codec.opus import OpusConfig, OpusEncoder
from tools.bench.args import machine, positive_int
from tools.lab import sounds
from tools.lab.echo import EchoPath

CONVERGED_DB = 20.0
"""ERLE at which the canceller counts as converged."""
CONVERGE_S = 6.0
"""Far end alone before the double talk starts in a board's first call."""
TRAINING_S = 20.0
"""Far end alone before the double talk starts: SpeexDSP's filter reaches about 20 dB in
6 s and its steady state (25-30 dB) after 12-15 s."""
WINDOW = SAMPLE_RATE // 4
"""ERLE window: 250 ms."""
FLOOR_DBFS = -80.0
"""The microphone's own noise."""
ECHO_S = 12.0
DOUBLETALK_S = 8.0
LATENCY_MAX_S = 0.06
"""Longest delay through the front end looked for: double-talk and noise clips are scored on
the output shifted by the delay found, so they run on this much after what is scored."""
NOISE_LEAD_S = 2.0
CLEAN_SNR_DB = 60.0
"""Clean speech, with just enough noise before it for a suppressor to learn a floor."""
DENOISERS: tuple[Denoiser, ...] = ("webrtc", "speex")


@dataclass(frozen=True, slots=True)
class EchoOutcome:
    erle_db: float
    convergence_s: float
    delay_error_ms: float
    erle_fixed_db: float
    cpu_s: float
    audio_s: float


def _int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32768), -32768, 32767).astype(np.int16)


def run(
    settings: FrontendSettings, mic: np.ndarray, ref: np.ndarray | None
) -> tuple[np.ndarray, float, AudioFrontend]:
    """The front end's output for int16 ``mic`` (with ``ref`` played), and its CPU time."""
    frontend = AudioFrontend(settings)
    out = np.zeros(len(mic) // FRAME_SAMPLES * FRAME_SAMPLES, np.int16)
    began = time.process_time()
    for i in range(0, len(out), FRAME_SAMPLES):
        if ref is not None:
            frontend.reference(ref[i : i + FRAME_SAMPLES].tobytes())
        frame = frontend.process(mic[i : i + FRAME_SAMPLES].tobytes())
        out[i : i + FRAME_SAMPLES] = np.frombuffer(frame, np.int16)
    cpu = time.process_time() - began
    frontend.close()
    return out, cpu, frontend


def _power(x: np.ndarray) -> np.ndarray:
    m = len(x) // WINDOW * WINDOW
    power: np.ndarray = np.mean(x[:m].astype(np.float64).reshape(-1, WINDOW) ** 2, axis=1)
    return power + 1e-3


def erle(mic: np.ndarray, out: np.ndarray, echo: np.ndarray) -> tuple[float, float]:
    """(median ERLE after convergence, convergence time) over the far-active windows."""
    active = _power(echo)
    active = active >= active.max() / 100  # within 20 dB of the loudest window
    per_window = 10 * np.log10(_power(mic) / _power(out))
    windows = np.flatnonzero(active[: len(per_window)])
    converged = [w for w in windows if per_window[w] >= CONVERGED_DB]
    if not converged:
        return float(np.median(per_window[windows])), float("inf")
    after = [w for w in windows if w >= converged[0]]
    return (
        float(np.median(per_window[after])),
        (converged[0] + 1 - windows[0]) * WINDOW / SAMPLE_RATE,
    )


def echo_clip(seed: int, work: Path, settings: FrontendSettings) -> EchoOutcome:
    rng = np.random.default_rng(seed)
    path = EchoPath.draw(rng)
    far = sounds.speech(work, rng, ECHO_S, sounds.VOICES)
    far *= 0.5 / (np.max(np.abs(far)) or 1.0)
    echo = path.apply(rng, far)
    floor = rng.standard_normal(len(far)) * 10 ** (FLOOR_DBFS / 20)
    mic, ref = _int16(echo + floor), _int16(far)
    out, cpu, frontend = run(settings, mic, ref)
    measured = frontend.delay_ms
    assert measured is not None
    db, converged = erle(mic, out, _int16(echo))
    fixed, _, _ = run(dataclasses.replace(settings, track_delay=False), mic, ref)
    db_fixed, _ = erle(mic, fixed, _int16(echo))
    return EchoOutcome(
        db, converged, abs(measured - path.delay_ms), db_fixed, cpu, len(mic) / SAMPLE_RATE
    )


def _to16k(x: np.ndarray) -> np.ndarray:
    return np.asarray(soxr.resample(x.astype(np.float32) / 32768, SAMPLE_RATE, 16_000))


def _pesq(clean: np.ndarray, degraded: np.ndarray) -> float:
    return float(pesq(16_000, _to16k(clean), _to16k(degraded), "wb"))


def doubletalk_clip(
    seed: int, work: Path, variants: Sequence[FrontendSettings | None], far_first_s: float
) -> tuple[float, ...]:
    """PESQ of the near end during double talk after ``far_first_s`` of the far end alone,
    through the front end with each of ``variants`` (None: the microphone unprocessed)."""
    rng = np.random.default_rng(seed)
    path = EchoPath.draw(rng)
    far = sounds.speech(work, rng, far_first_s + DOUBLETALK_S, sounds.VOICES)
    far *= 0.5 / (np.max(np.abs(far)) or 1.0)
    near = sounds.speech(work, rng, DOUBLETALK_S, sounds.VOICES)
    echo = path.apply(rng, far)
    start = round(far_first_s * SAMPLE_RATE)
    near_level = np.sqrt(sounds.active_power(echo[start:]) / (sounds.active_power(near) or 1.0))
    near = _int16(near * near_level)  # as loud as the echo: hard double talk
    # Scored up to LATENCY_MAX_S before the clip ends: the front end's output of all of
    # that (which lags by its frames and resamplers) is there to score.
    tail = round(LATENCY_MAX_S * SAMPLE_RATE)
    mic = echo + rng.standard_normal(len(far)) * 10 ** (FLOOR_DBFS / 20)
    mic[start : start + len(near)] += near / 32768
    mic16 = _int16(mic)
    ref16 = _int16(far)
    part = slice(start, len(mic16) - tail)
    clean = near[: part.stop - start]
    return tuple(
        _pesq(clean, mic16[part] if v is None else _aligned(near, run(v, mic16, ref16)[0], part))
        for v in variants
    )


def _aligned(near: np.ndarray, out: np.ndarray, part: slice) -> np.ndarray:
    """The span of ``out`` that carries ``part`` of the input, found by cross-correlating
    it with ``near`` over lags up to ``LATENCY_MAX_S``: the front end passes audio on some
    20 ms late (its frames and resamplers), and cut at the input's samples the near end's
    first and last words would be scored as clipped."""
    n = part.stop - part.start
    span = round(LATENCY_MAX_S * SAMPLE_RATE)
    size = 1 << (n + span).bit_length()
    heard = out[part.start : part.stop + span].astype(np.float64)
    corr = np.fft.irfft(np.fft.rfft(heard, size) * np.conj(np.fft.rfft(near[:n], size)), size)
    lag = int(np.argmax(corr[:span]))
    return out[part.start + lag : part.stop + lag]


def _noise(rng: np.random.Generator, kind: str, seconds: float) -> np.ndarray:
    n = round(seconds * SAMPLE_RATE)
    if kind == "fan":
        t = np.arange(n) / SAMPLE_RATE
        blade = float(rng.uniform(80, 160))
        hum = sum(np.sin(2 * np.pi * h * blade * t + rng.uniform(0, 6.3)) / h for h in (1, 2, 3))
        return sounds.noise(rng, seconds, "pink")[:n] + 0.3 * hum
    rumble = sounds.noise(rng, seconds, "brown")[:n]
    return rumble + 0.5 * sounds.household(rng, seconds)[:n]


def noise_clip(
    seed: int, work: Path, settings: FrontendSettings, kind: str, snr_db: float
) -> tuple[float, float]:
    """PESQ of speech in noise after noise suppression, and of the noisy speech."""
    rng = np.random.default_rng(seed)
    clean = sounds.speech(work, rng, 6.0, sounds.VOICES)
    lead = round(NOISE_LEAD_S * SAMPLE_RATE)
    noise = _noise(rng, kind, NOISE_LEAD_S + len(clean) / SAMPLE_RATE + LATENCY_MAX_S)
    speech_power = sounds.active_power(clean)
    noise *= np.sqrt(speech_power / np.mean(noise**2) / 10 ** (snr_db / 10))
    noisy = noise.copy()
    part = slice(lead, lead + len(clean))
    noisy[part] += clean
    scale = 10 ** (-26 / 20) / np.sqrt(speech_power or 1.0)  # speech at -26 dBFS
    clean16 = _int16(clean * scale)
    noisy16 = _int16(noisy * scale)
    ns = dataclasses.replace(settings, aec=False, noise_suppression=True, agc=False)
    out, _, _ = run(ns, noisy16, None)
    return _pesq(clean16, _aligned(clean16, out, part)), _pesq(clean16, noisy16[part])


def opus_cpu_per_audio_s(samples: np.ndarray) -> float:
    encoder = OpusEncoder(OpusConfig())
    usable = len(samples) // FRAME_SAMPLES * FRAME_SAMPLES
    began = time.process_time()
    for i in range(0, usable, FRAME_SAMPLES):
        encoder.encode(samples[i : i + FRAME_SAMPLES].tobytes())
    return (time.process_time() - began) / (usable / SAMPLE_RATE)


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--echo-clips", type=positive_int, default=12)
    parser.add_argument("--doubletalk-clips", type=positive_int, default=8)
    parser.add_argument("--noise-clips", type=positive_int, default=4, help="per kind and SNR")
    parser.add_argument("--snrs", type=float, nargs="+", default=[0.0, 5.0, 10.0])
    parser.add_argument("--rate", type=int, choices=(16_000, 48_000), default=16_000,
                        help="processing rate")  # fmt: skip
    parser.add_argument("--denoiser", choices=DENOISERS, default="webrtc",
                        help="noise suppressor (webrtc: 16 kHz only)")  # fmt: skip
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.rate != 16_000 and args.denoiser == "webrtc":
        parser.error("WebRTC's denoiser runs at 16 kHz only: add --denoiser speex")
    settings = FrontendSettings(rate=args.rate, denoiser=args.denoiser)
    other = next(d for d in DENOISERS if d != args.denoiser)
    denoisers = {args.denoiser: settings, other: dataclasses.replace(settings, denoiser=other)}
    if args.rate != 16_000:
        del denoisers["webrtc"]
    seeds = np.random.SeedSequence(args.seed).generate_state(3)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-frontend-") as tmp:
        work = args.dir or Path(tmp)
        sounds.prepare_speech(work)
        noise_clips = args.noise_clips * 2 * len(args.snrs)
        print(f"frontend: {args.echo_clips} echo, {args.doubletalk_clips} double-talk, "
              f"{noise_clips} noise clips at {args.rate} Hz", flush=True)  # fmt: skip
        echoes = [echo_clip(int(seeds[0]) + i, work, settings) for i in range(args.echo_clips)]
        # The canceller's filter alone: residual echo and noise suppression off.
        bare = dataclasses.replace(
            settings, residual_echo_suppression=False, noise_suppression=False
        )
        talks, first_calls = (
            [
                doubletalk_clip(int(seeds[1]) + i, work, variants, far_first_s)
                for i in range(args.doubletalk_clips)
            ]
            for variants, far_first_s in (
                ((settings, None, bare), TRAINING_S),
                ((settings,), CONVERGE_S),
            )
        )
        noisy, clean = {}, {}
        for name, ns in denoisers.items():
            noisy[name] = [
                noise_clip(int(seeds[2]) + i, work, ns, kind, snr)
                for kind in ("fan", "street")
                for snr in args.snrs
                for i in range(args.noise_clips)
            ]
            clean[name] = [
                noise_clip(int(seeds[2]) + i, work, ns, "fan", CLEAN_SNR_DB)
                for i in range(args.noise_clips)
            ]
        opus = opus_cpu_per_audio_s(
            _int16(sounds.speech(work, np.random.default_rng(args.seed), 10.0))
        )
    audio_s = sum(e.audio_s for e in echoes)
    result: dict[str, object] = {
        "machine": machine(),
        "seed": args.seed,
        "rate": args.rate,
        "denoiser": args.denoiser,
        "clips": {"echo": len(echoes), "doubletalk": len(talks), "noise": noise_clips},
        "erle_db": round(statistics.median(e.erle_db for e in echoes), 1),
        "erle_db_min": round(min(e.erle_db for e in echoes), 1),
        "erle_db_fixed_delay": round(statistics.median(e.erle_fixed_db for e in echoes), 1),
        "convergence_s": round(statistics.median(e.convergence_s for e in echoes), 2),
        "convergence_s_max": round(max(e.convergence_s for e in echoes), 2),
        "delay_error_ms_max": round(max(e.delay_error_ms for e in echoes), 2),
        "pesq_wb_near_doubletalk": round(statistics.fmean(p for p, _, _ in talks), 2),
        "pesq_wb_near_doubletalk_unprocessed": round(statistics.fmean(b for _, b, _ in talks), 2),
        "pesq_wb_near_doubletalk_filter_only": round(statistics.fmean(f for _, _, f in talks), 2),
        "pesq_wb_near_doubletalk_first_call": round(statistics.fmean(p for (p,) in first_calls), 2),
        "pesq_wb_ns": round(statistics.fmean(p for p, _ in noisy[args.denoiser]), 2),
        "pesq_wb_noisy": round(statistics.fmean(b for _, b in noisy[args.denoiser]), 2),
        "pesq_gain_ns": round(statistics.fmean(p - b for p, b in noisy[args.denoiser]), 2),
        **{
            f"pesq_gain_ns_{name}": round(statistics.fmean(p - b for p, b in clips), 2)
            for name, clips in noisy.items()
            if name != args.denoiser
        },
        "pesq_wb_clean": round(statistics.fmean(b for _, b in clean[args.denoiser]), 2),
        **{
            f"pesq_wb_clean_ns_{name}": round(statistics.fmean(p for p, _ in clips), 2)
            for name, clips in clean.items()
        },
        "cpu_per_audio_s": round(sum(e.cpu_s for e in echoes) / audio_s, 5),
        "opus_encode_cpu_per_audio_s": round(opus, 5),
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
