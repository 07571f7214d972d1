"""Edge detectors benchmark: every detector a board runs, scored on a labelled corpus.

The corpus is generated from ``--seed`` (``tools.lab.sounds`` and ``tools.lab.events``),
so a run is reproduced exactly. Each clip goes through the detectors of one
``EdgeAnalyzer`` (all of them, default settings), 20 ms frame by frame as on a board,
at -30 dBFS RMS with a room's noise 40 dB below. Clips:

- alarm episodes: smoke (T3), CO (T4) and other-rhythm alarms (``alarm_sound``); piezo
  tones across 2-4 kHz and 520 Hz square waves, timings drifted up to +-30 % off
  nominal, half of them in a reverberant room (RT60 0.2-0.8 s), mixed at ``--snrs``
  into speech (espeak-ng, ``sounds.VOICES``), TV (speech over music), music (chords,
  half the time over a drum kit), household sounds and noise. The alarm starts at 3 s
  and sounds until 2 s before the end, as a real one goes on sounding. SNR is the
  event's power while it sounds (its 20 ms frames within 20 dB of its loudest) over
  the background's mean power.
- glass breaks (impact then shatter) at ``--glass-snrs`` in the same backgrounds.
- look-alikes as negatives: low-battery chirps, oven timers, reversing trucks,
  microwaves, alarm clocks that stop within seconds; impacts, thud-then-hiss,
  clanks, mail slots (thud then clank), door slams, claps, keys.
- ``--negative-hours`` of background alone, in one-minute clips of each background.
- labelled sets for the other detectors: an appliance's noise 6 dB over the loudness
  threshold (A-weighted) in a quiet room (``loud_noise``), speech in a quiet room
  (``voice``), a microphone going silent, stuck or clipping (``mic_fault``).

Per detection kind it prints ``recall`` (episodes of that kind with a detection of that
kind after the event began), recall per SNR, ``precision`` over every detection of the
kind in the whole corpus, ``false_alarms_per_hour`` (detections of the kind in the
negatives: look-alikes and background alone; for ``glass_break`` also on TV audio
alone), ``latency_s`` p50/p95 (from the event's start to the frame whose analysis
reported it), and for smoke/CO how often one was reported as the other (``confused``).
Voice and loud noise are expected on some negatives (a TV talks and can be loud): their
rates there are printed as ``per_hour_in_negatives``, not counted as false alarms.
``cpu_per_audio_s`` is the CPU time of all detectors together per second of audio
(generation excluded), next to the baseline measured in the same run: encoding the
same audio with Opus at the agent's settings, what streaming it would cost instead.

Clips run in ``--jobs`` processes. The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.audio.format import FRAME_SAMPLES, SAMPLE_RATE
from agent.codec.opus import OpusConfig, OpusEncoder
from agent.edge.level import a_weighting, dbfs, frequency_response
from agent.edge.pipeline import EdgeAnalyzer, EdgeSettings
from tools.bench.args import machine, positive_float, positive_int
from tools.lab import events as ev
from tools.lab import sounds

LEAD_S = 3.0
"""Background before each event."""
ALARM_SECONDS = {"smoke_alarm": 20.0, "co_alarm": 25.0, "alarm_sound": 30.0}
"""Episode length per alarm kind: three or more cycles at the slowest timing."""
BACKGROUNDS = ("speech", "tv", "music", "household", "noise")
ALARM_LOOKALIKES = tuple(sounds.LOOKALIKES)
GLASS_LOOKALIKES = ("impact", "thud_hiss", "clank", "mail_slot", "door_slam", "claps", "keys")
GLASS_EVENTS: dict[str, Callable[[int], np.ndarray]] = {
    "impact": ev.impact,
    "thud_hiss": ev.thud_hiss,
    "clank": ev.clank,
    "mail_slot": ev.mail_slot,
    "door_slam": ev.door_slam,
    "claps": ev.claps,
    "keys": ev.keys,
}
ALERTING = ("smoke_alarm", "co_alarm", "alarm_sound", "glass_break", "mic_silent",
            "mic_stuck", "mic_clipping")  # fmt: skip
"""Detection kinds that are false alarms when they come in a negative clip."""
EXPECTED_IN_NEGATIVES = ("voice", "loud_noise")
BACKGROUND_DBFS = -30.0
"""RMS of a clip as it reaches the detectors: a room heard by a board's microphone."""
ROOM_NOISE = 10 ** (-40 / 20)
"""Room noise 40 dB under the background (about -70 dBFS as the detectors hear it)."""
LOUD_S = 4.0
LOUD_DBFS_A = -14.0
"""A loud event: 6 dB over the default ``loud_noise`` threshold, A-weighted (noise with a
crest factor of ~12 dB then peaks just below full scale)."""


@dataclass(frozen=True, slots=True)
class Job:
    """One clip to generate and analyse."""

    group: str
    """``alarm``, ``glass``, ``lookalike``, ``negative``, ``loud``, ``voice``, ``fault``."""
    kind: str
    """The truth (a detection kind), or for negatives what was played."""
    background: str
    snr_db: float | None
    seed: int
    seconds: float


@dataclass(frozen=True, slots=True)
class Found:
    kind: str
    at_s: float
    """When the analysis reported it: the end of the frame that made the detection."""


@dataclass(frozen=True, slots=True)
class Outcome:
    job: Job
    found: tuple[Found, ...]
    cpu_s: dict[str, float]
    """CPU seconds by detector class."""
    audio_s: float


def background(name: str, rng: np.random.Generator, seconds: float, work: Path) -> np.ndarray:
    """A background of ``seconds`` at unit RMS (roughly: the mix sets the levels)."""
    match name:
        case "speech":
            x = sounds.speech(work, rng, seconds, sounds.VOICES)
        case "tv":
            talk = sounds.speech(work, rng, seconds, sounds.VOICES)
            tune = background("music", rng, seconds, work)
            x = talk / _rms_or_one(talk) + 0.5 * tune / _rms_or_one(tune)
        case "music":  # chords, half the time over a drum kit
            if rng.random() < 0.5:
                x = sounds.music(rng, seconds)
            else:
                x = ev.music(seconds, int(rng.integers(1 << 30))).astype(np.float64)
        case "household":
            x = sounds.household(rng, seconds)
        case "noise":
            x = sounds.noise(rng, seconds, str(rng.choice(["white", "pink", "brown"])))
        case "quiet":
            x = 1e-3 * sounds.noise(rng, seconds, "pink")
        case _:
            raise ValueError(f"unknown background {name!r}")
    # Under everything, a room's and a microphone's own noise: no board hears digital
    # silence in the pauses between words.
    return x / _rms_or_one(x) + ROOM_NOISE * sounds.noise(rng, seconds, "pink")


def a_weighted_dbfs(x: np.ndarray) -> float:
    """The A-weighted level of ``x`` (int16 units) over its whole length (IEC 61672-1)."""
    b, a = a_weighting()
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    weight = np.abs(frequency_response(b, a, np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE), SAMPLE_RATE))
    spectrum[1:-1] *= 2  # one-sided
    return dbfs(float(np.sum(spectrum * weight**2)) / len(x) ** 2)


def _rms_or_one(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2))) if len(x) and np.any(x) else 1.0


def clip(job: Job, work: Path) -> tuple[np.ndarray, float]:
    """The int16 samples of ``job`` and when its event starts (0 for negatives)."""
    rng = np.random.default_rng(job.seed)
    bg = background(job.background, rng, job.seconds, work)
    match job.group:
        case "alarm":
            alarm = sounds.alarm(rng, job.kind, job.seconds - LEAD_S - 2).samples
            if rng.random() < 0.5:
                alarm = sounds.reverb(rng, alarm, rng.uniform(0.2, 0.8))
            assert job.snr_db is not None
            return sounds.to_int16(
                sounds.mix(alarm, bg, job.snr_db, LEAD_S), BACKGROUND_DBFS
            ), LEAD_S
        case "glass" | "lookalike" if job.kind in GLASS_EVENTS or job.kind == "glass_break":
            event = GLASS_EVENTS.get(job.kind, ev.glass_break)(int(rng.integers(1 << 30)))
            assert job.snr_db is not None
            mixed = sounds.mix(event.astype(np.float64) / 32768, bg, job.snr_db, LEAD_S)
            return sounds.to_int16(mixed, BACKGROUND_DBFS), LEAD_S
        case "lookalike":
            sound = sounds.LOOKALIKES[job.kind](rng, job.seconds - LEAD_S)
            assert job.snr_db is not None
            return sounds.to_int16(sounds.mix(sound, bg, job.snr_db, LEAD_S), BACKGROUND_DBFS), 0.0
        case "negative":
            return sounds.to_int16(bg, BACKGROUND_DBFS), 0.0
        case "loud":  # an appliance (a blender, a vacuum cleaner) in a quiet room
            out = sounds.to_int16(bg, -55.0)
            burst = sounds.noise(rng, LOUD_S, str(rng.choice(["white", "pink"])))
            gain = 10 ** ((LOUD_DBFS_A - a_weighted_dbfs(burst)) / 20)
            a = round(LEAD_S * SAMPLE_RATE)
            out[a : a + len(burst)] = np.clip(np.round(burst * gain), -32768, 32767)
            return out, LEAD_S
        case "voice":
            quiet = sounds.to_int16(bg, -55.0)
            talk = sounds.to_int16(
                sounds.speech(work, rng, job.seconds - LEAD_S, sounds.VOICES), -26.0
            )
            out = quiet.copy()
            a = round(LEAD_S * SAMPLE_RATE)
            out[a : a + len(talk)] = np.clip(
                out[a : a + len(talk)].astype(np.int32) + talk, -32768, 32767
            )
            return out, LEAD_S
        case "fault":
            before = sounds.to_int16(bg, BACKGROUND_DBFS)[: round(LEAD_S * SAMPLE_RATE)]
            rest = job.seconds - LEAD_S
            seed = int(rng.integers(1 << 30))
            fault = {
                "mic_silent": lambda: ev.silence(rest),
                "mic_stuck": lambda: ev.stuck(rest, seed=seed, jitter_lsb=1),
                "mic_clipping": lambda: ev.clipped(rest, seed),
            }[job.kind]()
            return np.concatenate([before, fault]).astype(np.int16), LEAD_S
    raise ValueError(f"unknown job {job}")


def analyse(job: Job, work: Path) -> Outcome:
    """``job``'s detections, and each detector's CPU time (as ``EdgeAnalyzer.feed`` runs
    them, one after the other on each frame)."""
    samples, _ = clip(job, work)
    detectors = EdgeAnalyzer(EdgeSettings()).detectors
    cpu = dict.fromkeys((type(d).__name__ for d in detectors), 0.0)
    found: list[Found] = []
    for i, frame in enumerate(sounds.frames(samples)):
        for detector in detectors:
            began = time.thread_time()
            detections = detector.feed(frame)
            cpu[type(detector).__name__] += time.thread_time() - began
            found += [Found(d.kind, (i + 1) * FRAME_SAMPLES / SAMPLE_RATE) for d in detections]
    return Outcome(job, tuple(found), cpu, len(samples) / SAMPLE_RATE)


def opus_cpu_per_audio_s(job: Job, work: Path) -> float:
    """Baseline: the CPU time per audio second of encoding ``job``'s clip with Opus."""
    samples, _ = clip(job, work)
    encoder = OpusEncoder(OpusConfig())
    data = samples.astype("<i2").tobytes()
    step = FRAME_SAMPLES * 2
    cpu = time.process_time()
    for i in range(len(samples) // FRAME_SAMPLES):
        encoder.encode(data[i * step : (i + 1) * step])
    return (time.process_time() - cpu) / (len(samples) / SAMPLE_RATE)


def corpus(args: argparse.Namespace) -> list[Job]:
    """Every clip of the run, each with its own seed drawn from ``--seed``."""
    specs: list[tuple[str, str, str, float | None, float]] = []

    def add(group: str, kind: str, bg: str, snr: float | None, seconds: float) -> None:
        specs.append((group, kind, bg, snr, seconds))

    for kind, seconds in ALARM_SECONDS.items():
        snrs = args.snrs if kind != "alarm_sound" else [s for s in args.snrs if s >= 0]
        for snr in snrs:
            for n in range(args.episodes):
                add("alarm", kind, BACKGROUNDS[n % len(BACKGROUNDS)], snr, seconds)
    for snr in args.glass_snrs:
        for n in range(args.episodes):
            add("glass", "glass_break", BACKGROUNDS[n % len(BACKGROUNDS)], snr, 10.0)
    for n in range(args.lookalikes):
        bg = BACKGROUNDS[n % len(BACKGROUNDS)]
        snr = (0.0, 10.0, 20.0)[n % 3]
        add("lookalike", ALARM_LOOKALIKES[n % len(ALARM_LOOKALIKES)], bg, snr, 40.0)
        add("lookalike", GLASS_LOOKALIKES[n % len(GLASS_LOOKALIKES)], bg, snr + 5, 10.0)
    minutes = round(args.negative_hours * 60)
    for n in range(minutes):
        add("negative", "background", BACKGROUNDS[n % len(BACKGROUNDS)], None, 60.0)
    for n in range(args.episodes):
        add("loud", "loud_noise", "quiet", None, 12.0)
        add("voice", "voice", "quiet", None, 15.0)
        for kind in ("mic_silent", "mic_stuck", "mic_clipping"):
            add("fault", kind, BACKGROUNDS[n % len(BACKGROUNDS)], None, 20.0)
    seeds = np.random.default_rng(args.seed).integers(1 << 31, size=len(specs))
    return [
        Job(group, kind, bg, snr, int(seed), seconds)
        for (group, kind, bg, snr, seconds), seed in zip(specs, seeds, strict=True)
    ]


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    return round(float(np.percentile(values, q)), 2)


def score(outcomes: Iterable[Outcome]) -> dict[str, dict[str, object]]:
    """The per-kind figures (see the module docstring)."""
    outcomes = list(outcomes)
    negative_s = sum(o.audio_s for o in outcomes if o.job.group in ("lookalike", "negative"))
    tv_s = sum(
        o.audio_s for o in outcomes if o.job.group == "negative" and o.job.background == "tv"
    )
    kinds = sorted({o.job.kind for o in outcomes if o.job.group not in ("lookalike", "negative")})
    result: dict[str, dict[str, object]] = {}
    for kind in kinds:
        episodes = [
            o
            for o in outcomes
            if o.job.kind == kind and o.job.group not in ("lookalike", "negative")
        ]
        hits_by_snr: dict[str, list[bool]] = defaultdict(list)
        latencies: list[float] = []
        for o in episodes:
            first = next((f for f in o.found if f.kind == kind and f.at_s >= LEAD_S), None)
            hits_by_snr[_snr_label(o.job.snr_db)].append(first is not None)
            if first is not None:
                latencies.append(first.at_s - LEAD_S)
        true_positive = sum(
            1 for o in episodes for f in o.found if f.kind == kind and f.at_s >= LEAD_S
        )
        reported = sum(1 for o in outcomes for f in o.found if f.kind == kind)
        in_negatives = sum(
            1
            for o in outcomes
            if o.job.group in ("lookalike", "negative")
            for f in o.found
            if f.kind == kind
        )
        hits = [h for hs in hits_by_snr.values() for h in hs]
        figures: dict[str, object] = {
            "episodes": len(episodes),
            "recall": round(sum(hits) / len(hits), 4) if hits else None,
            "recall_by_snr_db": {
                k: round(sum(v) / len(v), 4) for k, v in sorted(hits_by_snr.items(), key=_snr_key)
            },
            "latency_s": {"p50": _percentile(latencies, 50), "p95": _percentile(latencies, 95)},
        }
        per_hour = round(in_negatives / (negative_s / 3600), 3) if negative_s else None
        if kind in EXPECTED_IN_NEGATIVES:
            # A loud alarm is a loud noise too: no precision, only the rate in negatives.
            figures["per_hour_in_negatives"] = per_hour
        else:
            figures["precision"] = round(true_positive / reported, 4) if reported else None
            figures["false_alarms_per_hour"] = per_hour
        if kind in ("smoke_alarm", "co_alarm"):
            other = "co_alarm" if kind == "smoke_alarm" else "smoke_alarm"
            confused = sum(1 for o in episodes if any(f.kind == other for f in o.found))
            figures["confused"] = round(confused / len(episodes), 4) if episodes else None
            ge0 = [h for k, v in hits_by_snr.items() if _snr_key((k, v)) >= 0 for h in v]
            figures["recall_snr_ge_0"] = round(sum(ge0) / len(ge0), 4) if ge0 else None
        if kind == "glass_break":
            tv = sum(
                1
                for o in outcomes
                if o.job.group == "negative" and o.job.background == "tv"
                for f in o.found
                if f.kind == kind
            )
            figures["false_alarms_per_hour_tv"] = round(tv / (tv_s / 3600), 3) if tv_s else None
        result[kind] = figures
    return result


def _snr_label(snr: float | None) -> str:
    return "n/a" if snr is None else f"{snr:g}"


def _snr_key(item: tuple[str, object]) -> float:
    return -1e9 if item[0] == "n/a" else float(item[0])


def false_alarm_sources(outcomes: Iterable[Outcome]) -> dict[str, int]:
    """What raised each false alarm: ``kind <- what was played (background)``."""
    counts: Counter[str] = Counter()
    for o in outcomes:
        if o.job.group in ("lookalike", "negative"):
            for f in o.found:
                if f.kind in ALERTING:
                    counts[f"{f.kind} <- {o.job.kind} ({o.job.background})"] += 1
    return dict(counts.most_common())


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--episodes", type=positive_int, default=40,
                        help="clips per event kind and SNR")  # fmt: skip
    parser.add_argument("--snrs", type=float, nargs="+", default=[-10.0, -5.0, 0.0, 10.0, 20.0])
    parser.add_argument("--glass-snrs", type=float, nargs="+", default=[5.0, 10.0, 20.0])
    parser.add_argument("--lookalikes", type=positive_int, default=150,
                        help="look-alike clips of each family (alarm, glass)")  # fmt: skip
    parser.add_argument("--negative-hours", type=positive_float, default=2.0)
    parser.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1)
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-detect-") as tmp:
        work = args.dir or Path(tmp)
        sounds.prepare_speech(work)
        jobs = corpus(args)
        audio_s = sum(j.seconds for j in jobs)
        print(f"detect: {len(jobs)} clips, {audio_s / 3600:.2f} h of audio, {args.jobs} processes",
              flush=True)  # fmt: skip
        started = time.monotonic()
        outcomes: list[Outcome] = []
        with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(analyse, job, work) for job in jobs]
            for n, fut in enumerate(concurrent.futures.as_completed(futures), 1):
                outcomes.append(fut.result())
                if n % 200 == 0 or n == len(jobs):
                    print(f"detect: {n}/{len(jobs)} clips", flush=True)
            baseline = [
                fut.result()
                for fut in [
                    pool.submit(opus_cpu_per_audio_s, j, work)
                    for j in jobs[:: max(1, len(jobs) // 20)]
                ]
            ]
    audio = sum(o.audio_s for o in outcomes)
    by_detector: Counter[str] = Counter()
    for o in outcomes:
        by_detector.update(o.cpu_s)
    result: dict[str, object] = {
        "machine": machine(),
        "seed": args.seed,
        "clips": len(outcomes),
        "audio_hours": round(audio_s / 3600, 3),
        "negative_hours": round(
            sum(o.audio_s for o in outcomes if o.job.group in ("lookalike", "negative")) / 3600, 3
        ),
        "detectors": score(outcomes),
        "false_alarm_sources": false_alarm_sources(outcomes),
        "cpu_per_audio_s": round(by_detector.total() / audio, 5),
        "cpu_per_audio_s_by_detector": {k: round(v / audio, 5) for k, v in by_detector.items()},
        "opus_encode_cpu_per_audio_s": round(statistics.fmean(baseline), 5),
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
