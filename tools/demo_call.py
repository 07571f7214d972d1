"""Demo: two agents on virtual boards in an encrypted call, with live statistics.

Board a says one sentence, board b another; both run the real agent (ALSA
through PulseAudio, Opus, RED, SRTP, UDP through the impairment proxy, jitter
buffer). Live call statistics print every second; at the end the demo scores
what each speaker played with PESQ.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any

import soxr
from pesq import pesq

from agent.audio.format import SAMPLE_RATE
from agent.net.impair import Impairment
from tools.lab.agents import AgentCall
from tools.lab.virtual_audio import VirtualAudio, read_wav, speech_wav

LINES = {
    "a": "Hello, this is the front door. There is a parcel for apartment twelve.",
    "b": "Thanks, I am coming down now. Please leave it by the mailbox.",
}


def _line(board: str, rec: dict[str, Any]) -> None:
    if rec.get("event") != "stats":
        return
    rtt = "-" if rec["rtt_ms"] is None else f"{rec['rtt_ms']:.1f}"
    print(
        f"[{board}] sent {rec['packets_sent']:>5} recv {rec['packets_received']:>5} "
        f"lost {rec['packets_lost']:>3} peer-loss {100 * rec['loss_fraction']:4.1f}% "
        f"jitter {rec['jitter_ms']:5.1f} ms rtt {rtt} ms "
        f"buffer {rec['jitter_buffered_ms']:3.0f}/{rec['jitter_target_ms']:3.0f} ms "
        f"fec {rec['fec_recovered']} red {rec['red_recovered']} plc {rec['concealed']}",
        flush=True,
    )


async def run(args: argparse.Namespace) -> None:
    impairment = Impairment(loss=args.loss, mean_burst=args.burst, jitter_ms=args.jitter, seed=7)
    with tempfile.TemporaryDirectory(prefix="edge-demo-") as tmp, VirtualAudio.start() as audio:
        work = Path(tmp)
        speech = {b: speech_wav(work / f"{b}.wav", text) for b, text in LINES.items()}
        seconds = max(len(read_wav(p)[0]) for p in speech.values()) / SAMPLE_RATE
        print(f"call a <-> b, {impairment}", flush=True)
        call = AgentCall(audio, work, impairment, on_line=_line)
        await call.start(seconds + 6.0, stats_interval=1.0)
        await asyncio.sleep(3.0)  # PulseAudio delivers the first capture ~2 s after opening
        players = [audio.play(speech[b], f"{b}_mic") for b in ("a", "b")]
        rec = await asyncio.to_thread(audio.record_probe, seconds + 1.5)
        for p in players:
            p.wait(10)
        for board, result in zip(("a", "b"), await call.wait(), strict=True):
            print(f"[{board}] call ended: {result['reason']}")
        for talker, listener in (("a", "b"), ("b", "a")):
            ref = soxr.resample(audio.channel(rec, f"{talker}_mic") / 32768.0, SAMPLE_RATE, 16_000)
            deg = soxr.resample(
                audio.channel(rec, f"{listener}_spk") / 32768.0, SAMPLE_RATE, 16_000
            )
            print(f"{talker} -> {listener}: PESQ wideband {pesq(16_000, ref, deg, 'wb'):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loss", type=float, default=0.05, help="average packet loss, 0..1")
    parser.add_argument("--burst", type=float, default=2.0, help="mean loss burst length")
    parser.add_argument("--jitter", type=float, default=20.0, help="jitter in ms")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
