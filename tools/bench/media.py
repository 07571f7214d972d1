"""Media benchmark: CPU, memory, latency and speech quality of a full-duplex call.

Two agent processes on loopback, each on a virtual board (real ALSA through
PulseAudio, real-time pacing), with SRTP on. Figures:

- pipeline_cpu_per_audio_s: CPU seconds of both agent processes per second of call;
- floor_cpu_per_audio_s: the bare codec + crypto work of the same call (per 20 ms:
  two Opus encodes, two decodes, SRTP protect/unprotect both ways) as a plain
  Python loop of opuslib + pylibsrtp calls, measured in this run; ratio = pipeline/floor;
- floor_paced_cpu_per_audio_s: the same loop run once every 20 ms, as a call runs it: what
  that work costs with the caches (and, on a VM, the CPU) gone cold between frames;
- frontend_cpu_per_audio_s: the agents' audio front end (echo cancellation, noise
  suppression, their resampling and delay tracking: ``agent.audio.frontend`` at its
  defaults, on in the call) run over the same speech for both sides, measured in this run;
  ratio_frontend_in_floor = pipeline / (floor + frontend): the same ratio with that
  library work counted as floor too;
- rss_mb: resident memory of one agent process in the call (rss_anon_mb: its heap and other
  private memory; rss_file_mb: mapped library pages); rss_floor_mb: a bare Python process
  that imports every module the agent imports (standard library and dependencies) but
  the agent's own;
- added_latency_ms: microphone-to-speaker delay (clicks and cross-correlation) of the call,
  minus that of a bare full-duplex copy between the same two devices measured in this run;
- pesq_wb_clean / _loss10 / _burst: PESQ wideband of espeak-ng speech through the
  impairment proxy with no loss, 10 % random loss, and Gilbert-Elliott bursts;
- aiortc_cpu_per_audio_s: CPU seconds of both processes of an aiortc<->aiortc call per
  second of call, measured in this run; cpu_vs_aiortc = pipeline_cpu_per_audio_s /
  aiortc_cpu_per_audio_s (the figure with the target, <= 0.5), and cpu_vs_aiortc_loop =
  pipeline_loop_thread_cpu_per_audio_s / aiortc_cpu_per_audio_s.

How the aiortc call (``tools/lab/aiortc_call.py``) matches ours: two processes, one per
side, as our two agents; each sends the same espeak-ng speech, looped and paced in real
time, and reads, so decodes, every frame of the other side's audio; DTLS-SRTP on; host
candidates on 127.0.0.1; both processes' utime + stime from /proc over a window as long
as ours (``--cpu-seconds``) after the same 4 s warm-up, the two calls one after the other.
What differs, and which way it leans:

- Audio I/O: our agents capture and play through ALSA and PulseAudio in real time, and
  pipeline_cpu_per_audio_s counts the PortAudio and pulse-plugin threads that takes;
  aiortc's sides take speech from memory and drop what they decode. cpu_vs_aiortc thus
  charges us for work aiortc does not do. cpu_vs_aiortc_loop counts only our event-loop
  threads (codec, crypto, RTP, jitter buffer) against aiortc's whole process (whose
  encoder and decoder run on threads of their own): it charges us for none of our I/O.
- Opus: each stack at its own defaults. aiortc encodes stereo (the mono speech upmixed)
  at a 96 kbit/s target in VOIP mode; we encode mono at opus_bitrate and opus_complexity
  with in-band FEC. What a codec setting costs is part of what each stack costs as shipped.
- Our call crosses the impairment proxy (set to no impairment) in this benchmark's own
  process, which is not measured; aiortc's sides send to each other directly. Each
  process sends and receives the same packets either way.

The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import opuslib
import opuslib.api.ctl
import opuslib.api.encoder
import pylibsrtp
import soxr
from pesq import pesq

from agent.audio.format import FRAME_BYTES, FRAME_SAMPLES, SAMPLE_RATE
from agent.audio.frontend import AudioFrontend, FrontendSettings
from agent.codec.opus import OpusConfig
from agent.net.impair import Impairment
from tools.bench.args import machine, positive_float, positive_int
from tools.lab.agents import AgentCall
from tools.lab.aiortc_call import AiortcCall
from tools.lab.virtual_audio import VirtualAudio, read_wav, speech_wav, write_wav

TEXT = (
    "The delivery driver is at the front gate. Please open the door and sign for the parcel. "
    "Thank you, I will be down in a minute."
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def floor_cpu(
    speech: np.ndarray, opus: OpusConfig, seconds: float, *, paced: bool = False
) -> float:
    """CPU seconds per audio second of the bare codec and crypto work of one call; ``paced``
    does each 20 ms of it at its own time, as a call does, instead of back to back."""
    encoders = [opuslib.Encoder(SAMPLE_RATE, 1, opuslib.APPLICATION_VOIP) for _ in range(2)]
    for enc in encoders:
        enc.bitrate = opus.bitrate
        enc.complexity = opus.complexity
        enc.packet_loss_perc = opus.packet_loss_perc
        # opuslib 3.0.1's inband_fec setter is broken; use the ctl API.
        opuslib.api.encoder.encoder_ctl(enc.encoder_state, opuslib.api.ctl.set_inband_fec, 1)
    decoders = [opuslib.Decoder(SAMPLE_RATE, 1) for _ in range(2)]
    key = os.urandom(28)
    tx = [pylibsrtp.Session(pylibsrtp.Policy(key, pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
                                             srtp_profile=pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM))
          for _ in range(2)]  # fmt: skip
    rx = [pylibsrtp.Session(pylibsrtp.Policy(key, pylibsrtp.Policy.SSRC_ANY_INBOUND,
                                             srtp_profile=pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM))
          for _ in range(2)]  # fmt: skip
    pcm = speech.astype("<i2").tobytes()
    frames = [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm) - FRAME_BYTES, FRAME_BYTES)]
    count = int(seconds * 50)
    start = time.process_time()
    due = time.monotonic()
    for n in range(count):
        if paced:
            due += FRAME_SAMPLES / SAMPLE_RATE
            time.sleep(max(0.0, due - time.monotonic()))
        frame = frames[n % len(frames)]
        header = bytes([0x80, 111]) + (n & 0xFFFF).to_bytes(2, "big") + (n * 960).to_bytes(4, "big")
        for side in range(2):
            packet = encoders[side].encode(frame, FRAME_SAMPLES)
            wire = tx[side].protect(header + (side + 1).to_bytes(4, "big") + packet)
            plain = rx[side].unprotect(wire)
            decoders[side].decode(plain[12:], FRAME_SAMPLES)
    return (time.process_time() - start) / (count * 0.020)


def frontend_cpu(speech: np.ndarray, seconds: float) -> float:
    """CPU seconds per audio second of both sides' front ends at their defaults, each
    cleaning its microphone (the speech) with the other side's speech as the reference."""
    pcm = speech.astype("<i2").tobytes()
    frames = [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm) - FRAME_BYTES, FRAME_BYTES)]
    sides = [AudioFrontend(FrontendSettings()) for _ in range(2)]
    count = int(seconds * 50)
    start = time.process_time()
    for n in range(count):
        for side in sides:
            side.reference(frames[(n + len(frames) // 2) % len(frames)])
            side.process(frames[n % len(frames)])
    spent = time.process_time() - start
    for side in sides:
        side.close()
    return spent / (count * 0.020)


# Extension modules register submodules that cannot be imported by name (cffi's ``lib``).
_IMPORTS = (
    "import contextlib, importlib, sys\n"
    "for name in sys.argv[1:]:\n"
    "    with contextlib.suppress(ModuleNotFoundError): importlib.import_module(name)\n"
    "print(*[m for m in sys.modules if m != 'agent' and not m.startswith('agent.')])\n"
    "print(open('/proc/self/status').read())"
)


def floor_rss_mb() -> float:
    """VmRSS of a Python process that imports every module the agent imports but its own:
    the standard library and third-party part of ``rss_mb``."""
    run = functools.partial(subprocess.run, capture_output=True, text=True, check=True, timeout=60)
    modules = run([sys.executable, "-c", _IMPORTS, "agent.app"]).stdout.splitlines()[0]
    names = [m for m in modules.split() if not m.startswith("__")]
    return _rss_mb(run([sys.executable, "-c", _IMPORTS, *names]).stdout)["VmRSS"]


def _cpu(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _proc_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of the whole process and of its main (event loop) thread."""
    return _cpu(Path(f"/proc/{pid}/stat")), _cpu(Path(f"/proc/{pid}/task/{pid}/stat"))


def _rss_mb(status: str) -> dict[str, float]:
    """VmRSS, RssAnon and RssFile from the text of a ``/proc/PID/status``, in MB."""
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "RssAnon", "RssFile")}


def _proc_rss_mb(pid: int) -> dict[str, float]:
    return _rss_mb(Path(f"/proc/{pid}/status").read_text())


def _to16k(x: np.ndarray) -> np.ndarray:
    return np.asarray(soxr.resample(x.astype(np.float32) / 32768.0, SAMPLE_RATE, 16_000))


async def measure_pesq(audio: VirtualAudio, work: Path, speech: Path, imp: Impairment,
                       opus: OpusConfig) -> float:  # fmt: skip
    """Speech into a's microphone, PESQ of what b's speaker plays against what a's mic heard."""
    samples, _ = read_wav(speech)
    length = len(samples) / SAMPLE_RATE
    call = AgentCall(audio, work, imp, opus)
    await call.start(length + 6.0)
    await asyncio.sleep(3.0)  # PulseAudio's first capture callback comes ~2 s after opening
    player = audio.play(speech, "a_mic")
    rec = await asyncio.to_thread(audio.record_probe, length + 1.5)
    player.wait(10)
    await call.wait()
    ref, deg = audio.channel(rec, "a_mic"), audio.channel(rec, "b_spk")
    return float(pesq(16_000, _to16k(ref), _to16k(deg), "wb"))


CLICK_PERIOD = SAMPLE_RATE // 2


def estimate_delay_ms(ref: np.ndarray, out: np.ndarray, max_lag: int) -> float:
    """Lag (under ``max_lag`` samples) of ``out`` behind ``ref`` by cross-correlation (FFT),
    in milliseconds."""
    n = 1 << (len(ref) + len(out)).bit_length()
    corr = np.fft.irfft(
        np.fft.rfft(out.astype(float), n) * np.conj(np.fft.rfft(ref.astype(float), n)), n
    )
    lag = int(np.argmax(corr[: min(max_lag, len(out))]))
    return lag * 1000.0 / SAMPLE_RATE


def clicks(seconds: float) -> np.ndarray:
    """A short decaying chirp every ``CLICK_PERIOD``: sharp in time, broadband, survives Opus."""
    x = np.zeros(int(seconds * SAMPLE_RATE))
    t = np.arange(int(0.010 * SAMPLE_RATE)) / SAMPLE_RATE
    burst = np.sin(2 * np.pi * (500 + 150_000 * t) * t) * np.exp(-t / 0.003) * 20_000
    for start in range(CLICK_PERIOD, len(x) - len(burst), CLICK_PERIOD):
        x[start : start + len(burst)] = burst
    return x


async def _click_delay(audio: VirtualAudio, work: Path) -> float:
    """Clicks into a's microphone; how late they come out of b's speaker, in milliseconds."""
    wav = write_wav(work / "clicks.wav", clicks(6.0))
    player = audio.play(wav, "a_mic")
    rec = await asyncio.to_thread(audio.record_probe, 6.5)
    player.wait(10)
    # Periodic clicks correlate at every period past the delay too: when the first ones are
    # lost (the call's front end still adapting), a later peak could win.
    return estimate_delay_ms(
        audio.channel(rec, "a_mic"), audio.channel(rec, "b_spk"), max_lag=CLICK_PERIOD
    )


async def measure_latency(audio: VirtualAudio, work: Path, opus: OpusConfig) -> float:
    """Microphone-to-speaker delay of a call between the two boards."""
    call = AgentCall(audio, work, Impairment(), opus)
    await call.start(12.0)
    await asyncio.sleep(3.0)  # first capture callbacks, jitter buffer settled
    delay = await _click_delay(audio, work)
    await call.wait()
    return delay


async def measure_device_latency(audio: VirtualAudio, work: Path) -> float:
    """The same path through the bare devices: a's microphone copied to b's speaker."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tools.lab.passthrough", "a_mic", "b_spk", "11",
        env=audio.env, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await asyncio.sleep(3.0)
        delay = await _click_delay(audio, work)
        async with asyncio.timeout(30):
            if await proc.wait():
                raise RuntimeError(f"passthrough exited with {proc.returncode}")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return delay


async def measure_cpu(
    audio: VirtualAudio, work: Path, speech: Path, opus: OpusConfig, window: float
) -> tuple[float, float, dict[str, float], list[dict[str, Any]]]:
    """Both agents' CPU per audio second (all threads, and the event-loop threads alone) while
    speech flows both ways, and one agent's RSS."""
    samples, _ = read_wav(speech)
    reps = int(np.ceil((window + 8) * SAMPLE_RATE / len(samples)))
    long = write_wav(work / "long.wav", np.tile(samples, reps))
    call = AgentCall(audio, work, Impairment(), opus)
    await call.start(window + 6.0)
    players = [audio.play(long, "a_mic"), audio.play(long, "b_mic")]
    await asyncio.sleep(4.0)
    pids = call.pids
    before = [_proc_cpu(pid) for pid in pids]
    t0 = time.monotonic()
    await asyncio.sleep(window)
    after = [_proc_cpu(pid) for pid in pids]
    elapsed = time.monotonic() - t0
    cpu = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    loop_cpu = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    rss = _proc_rss_mb(pids[0])
    results = await call.wait()
    for p in players:
        p.kill()
        p.wait()
    return cpu / elapsed, loop_cpu / elapsed, rss, results


async def measure_aiortc_cpu(
    speech: Path, window: float, warmup: float = 4.0
) -> tuple[float, list[dict[str, Any]]]:
    """Both sides' CPU per audio second of an aiortc<->aiortc call that sends ``speech``
    (looped) both ways, over ``window`` seconds after ``warmup``; each side's last record."""
    call = AiortcCall(speech)
    try:
        await call.start(warmup + window + 2.0)
        await asyncio.sleep(warmup)
        pids = call.pids
        before = [_proc_cpu(pid)[0] for pid in pids]
        t0 = time.monotonic()
        await asyncio.sleep(window)
        after = [_proc_cpu(pid)[0] for pid in pids]
        elapsed = time.monotonic() - t0
        results = await call.wait()
    finally:
        await call.close()
    return (sum(after) - sum(before)) / elapsed, results


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    opus = OpusConfig(complexity=args.complexity)
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        work = Path(tmp)
        speech = speech_wav(work / "speech.wav", TEXT)
        samples, _ = read_wav(speech)
        floor = floor_cpu(samples, opus, args.floor_seconds)
        floor_paced = floor_cpu(samples, opus, args.floor_paced_seconds, paced=True)
        frontend = frontend_cpu(samples, args.floor_seconds)
        rss_floor = floor_rss_mb()
        with VirtualAudio.start(("a", "b")) as audio:
            pipeline, loop_cpu, rss, call_stats = await measure_cpu(
                audio, work, speech, opus, args.cpu_seconds
            )
            # Right after ours, so that both calls meet the machine in the same state.
            aiortc, aiortc_stats = await measure_aiortc_cpu(speech, args.cpu_seconds)
            # The delay depends on where capture and playback periods fall relative to each
            # other, which each call draws anew: take medians.
            device_latency = float(
                np.median([await measure_device_latency(audio, work) for _ in range(args.runs)])
            )
            latency = float(
                np.median([await measure_latency(audio, work, opus) for _ in range(args.runs)])
            )
            # One sentence meets only a few loss bursts: take the median over loss patterns.
            scores = {
                name: float(
                    np.median(
                        [
                            await measure_pesq(audio, work, speech, replace(imp, seed=run), opus)
                            for run in range(args.runs)
                        ]
                    )
                )
                for name, imp in (
                    ("pesq_wb_clean", Impairment()),
                    ("pesq_wb_loss10", Impairment(loss=0.10)),
                    ("pesq_wb_burst", Impairment(loss=0.10, mean_burst=3.0)),
                )
            }
    return {
        "benchmark": "media",
        "machine": machine(),
        "opus_complexity": opus.complexity,
        "opus_bitrate": opus.bitrate,
        "pipeline_cpu_per_audio_s": round(pipeline, 4),
        # Of which the agents' event-loop threads (codec, crypto, RTP, jitter buffer); the
        # rest is PortAudio's callback threads and the ALSA pulse plugin's client threads.
        "pipeline_loop_thread_cpu_per_audio_s": round(loop_cpu, 4),
        "floor_cpu_per_audio_s": round(floor, 4),
        # The same work done once per 20 ms, as in a call: not the target's floor, but how much
        # of a call's CPU the codec and crypto take when they run in real time.
        "floor_paced_cpu_per_audio_s": round(floor_paced, 4),
        "ratio": round(pipeline / floor, 2),
        "frontend_cpu_per_audio_s": round(frontend, 4),
        "ratio_frontend_in_floor": round(pipeline / (floor + frontend), 2),
        "rss_mb": round(rss["VmRSS"], 1),
        "rss_anon_mb": round(rss["RssAnon"], 1),
        "rss_file_mb": round(rss["RssFile"], 1),
        "rss_floor_mb": round(rss_floor, 1),
        # Mic-to-speaker delay of a call, minus that of a bare full-duplex copy between the same
        # two virtual devices (PulseAudio's own buffering, which a board's ALSA driver lacks).
        "added_latency_ms": round(latency - device_latency, 1),
        "loopback_latency_ms": round(latency, 1),
        "device_latency_ms": round(device_latency, 1),
        **{k: round(v, 2) for k, v in scores.items()},
        "call_packets_received": [r.get("packets_received") for r in call_stats],
        "aiortc_cpu_per_audio_s": round(aiortc, 4),
        # The target (<= 0.5) applies to this one: our CPU per audio second, all threads of
        # both agents, over that of the aiortc call.
        "cpu_vs_aiortc": round(pipeline / aiortc, 3),
        # Our event-loop threads alone (no audio I/O threads) over aiortc's whole processes.
        "cpu_vs_aiortc_loop": round(loop_cpu / aiortc, 3),
        "aiortc_call_packets_received": [r.get("packets_received") for r in aiortc_stats],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--complexity", type=int, default=OpusConfig().complexity)
    parser.add_argument("--cpu-seconds", type=positive_float, default=20.0)
    parser.add_argument("--floor-seconds", type=positive_float, default=30.0)
    parser.add_argument("--floor-paced-seconds", type=positive_float, default=10.0)
    parser.add_argument(
        "--runs",
        type=positive_int,
        default=5,
        help="latency and PESQ figures are medians of this many",
    )
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args))))


if __name__ == "__main__":
    main()
