"""Call setup benchmark: from creating the offer to the first decoded audio at both ends.

Every call runs in this one process on loopback, with DTLS-SRTP, paced tone sources and
paced sinks (one 20 ms frame per 20 ms of loop time, like a device). Figures, in
milliseconds, as p50 and p95 over ``--calls`` calls:

- call_setup_ms: agent<->agent with trickle ICE (how agents signal), host candidates on
  127.0.0.1; the offer and answer carry no candidates, which trickle both ways meanwhile;
- call_setup_ms_no_trickle: the same with every candidate in the offer and the answer;
- aiortc_call_setup_ms: aiortc<->aiortc with its defaults (host candidates on every
  interface but loopback, all of them in the SDP, no trickle), first audio as each
  peer's receive track hands out its first frame; ratio = agent p50 / aiortc p50;
- call_setup_ms_turn: agent<->agent, relay-only, through a real coturn with a TURN REST
  shared secret, over ``--turn-calls`` calls;
- breakdown_ms (and _no_trickle, _turn): medians of when signaling was done, when both
  ends had ICE connected, when both had SRTP keys and media running, and first audio;
- loop_clock_offset_ms: the event loop's clock minus ``time.monotonic()`` (aiortc's
  clock), checked to be the same clock; each series subtracts times of one clock only.

Each series starts with one unmeasured call (imports, first allocations, OpenSSL and
codec set-up). Certificates are made once, as an agent makes its own at first start.
The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from agent.audio.sources import NullSink, ToneSource
from agent.media.dtls import DtlsCertificate
from agent.media.peer import MediaPeer, PeerConfig
from agent.net.ice import IceConfig
from tools.bench.args import machine, positive_int
from tools.lab.aiortc_peer import AiortcPeer
from tools.lab.turn import Coturn

SETUP_TIMEOUT_S = 20.0
"""A call that has not heard audio at both ends by then fails the benchmark."""

LOOPBACK = PeerConfig(ice=IceConfig(host_addresses=("127.0.0.1",)))


@dataclass(frozen=True, slots=True)
class Timing:
    """One call's set-up: milliseconds from the start (creating the offer) until..."""

    signaled: float
    """...the offer and the answer were exchanged."""
    ice: float | None
    """...both ends had a selected ICE pair (agents only)."""
    keyed: float | None
    """...both ends had their SRTP keys and media running (agents only)."""
    first_audio: float
    """...both ends had decoded a first frame from the other."""


@dataclass(frozen=True, slots=True)
class Certificates:
    offerer: DtlsCertificate
    answerer: DtlsCertificate

    @classmethod
    def generate(cls) -> Certificates:
        return cls(DtlsCertificate.generate("bench-a"), DtlsCertificate.generate("bench-b"))


def check_clocks() -> float:
    """How far the event loop's clock is from ``time.monotonic()``, in milliseconds.

    Agent times come from the loop clock, aiortc's from ``time.monotonic()``; each
    series subtracts times of one clock only, and this checks that both are the same
    clock anyway (asyncio's default loop reads ``time.monotonic()``).
    """
    loop = asyncio.get_running_loop()
    before = time.monotonic()
    now = loop.time()
    after = time.monotonic()
    offset = 1000 * (now - (before + after) / 2)
    if abs(offset) > 1.0:
        raise RuntimeError(f"loop clock is {offset:.3f} ms off time.monotonic()")
    return offset


def _ms(t: float, start: float) -> float:
    return 1000 * (t - start)


async def _trickle(src: MediaPeer, dst: MediaPeer) -> None:
    async for candidate in src.local_candidates():
        await dst.add_remote_candidate(candidate)
    await dst.add_remote_candidate(None)


async def _bring_up(peer: MediaPeer) -> tuple[float, float, float]:
    """``peer.connect()`` in its two steps, timed: ICE connected, keyed, first audio heard.

    ``MediaPeer.connect`` starts with ``ice.connect()``, which returns at once when the
    pair is already selected, so this is the same path with a time stamp in between.
    """
    loop = asyncio.get_running_loop()
    ice = peer.ice
    assert ice is not None
    await ice.connect()
    ice_at = loop.time()
    session = await peer.connect()
    keyed_at = loop.time()
    return ice_at, keyed_at, await session.first_audio()


async def agent_call(
    config: PeerConfig, certificates: Certificates, *, trickle: bool, call_id: str = "bench"
) -> Timing:
    """One agent<->agent call, closed before returning."""
    loop = asyncio.get_running_loop()
    a = MediaPeer(config, certificates.offerer, ToneSource(440.0, paced=True),
                  NullSink(paced=True), call_id=f"{call_id}-a")  # fmt: skip
    b = MediaPeer(config, certificates.answerer, ToneSource(1000.0, paced=True),
                  NullSink(paced=True), call_id=f"{call_id}-b")  # fmt: skip
    try:
        start = loop.time()
        offer = await a.create_offer(trickle=trickle)
        answer = await b.accept_offer(offer, trickle=trickle)
        await a.accept_answer(answer)
        signaled = loop.time()
        async with asyncio.timeout(SETUP_TIMEOUT_S), asyncio.TaskGroup() as tg:
            if trickle:
                tg.create_task(_trickle(a, b), name=f"{call_id}-trickle-a")
                tg.create_task(_trickle(b, a), name=f"{call_id}-trickle-b")
            ends = [tg.create_task(_bring_up(p), name=f"{call_id}-up") for p in (a, b)]
        ice, keyed, heard = zip(*(end.result() for end in ends), strict=True)
        return Timing(
            _ms(signaled, start), _ms(max(ice), start), _ms(max(keyed), start),
            _ms(max(heard), start),
        )  # fmt: skip
    finally:
        await a.close()
        await b.close()


async def aiortc_call() -> Timing:
    """One aiortc<->aiortc call, closed before returning; times on ``time.monotonic()``."""
    # Made before the start, as the agents' certificates are: aiortc makes its
    # certificate when the peer connection is created.
    a, b = AiortcPeer(440.0), AiortcPeer(1000.0)
    try:
        start = time.monotonic()
        answer = await b.answer(await a.offer())
        await a.accept(answer)
        signaled = time.monotonic()
        async with asyncio.timeout(SETUP_TIMEOUT_S):
            heard = await asyncio.gather(a.first_audio, b.first_audio)
        return Timing(_ms(signaled, start), None, None, _ms(max(heard), start))
    finally:
        await a.close()
        await b.close()


async def series(call: Callable[[int], Awaitable[Timing]], calls: int) -> list[Timing]:
    """One warm-up call, then ``calls`` measured ones, one after the other."""
    await call(-1)
    return [await call(n) for n in range(calls)]


def percentiles(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(float(np.percentile(values, 50)), 1),
        "p95": round(float(np.percentile(values, 95)), 1),
    }


def summary(timings: list[Timing]) -> dict[str, float]:
    return percentiles([t.first_audio for t in timings])


def breakdown(timings: list[Timing]) -> dict[str, float]:
    """Medians of each step's end (ms from the start); ``first_audio`` closes the call set-up."""
    steps = {
        "signaled": [t.signaled for t in timings],
        "ice_connected": [t.ice for t in timings if t.ice is not None],
        "keyed": [t.keyed for t in timings if t.keyed is not None],
        "first_audio": [t.first_audio for t in timings],
    }
    return {name: round(statistics.median(v), 1) for name, v in steps.items() if v}


def _report(name: str, timings: list[Timing]) -> None:
    s = summary(timings)
    values = [t.first_audio for t in timings]
    print(
        f"{name}: p50 {s['p50']:.1f} ms, p95 {s['p95']:.1f} ms "
        f"(min {min(values):.1f}, max {max(values):.1f}) over {len(values)} calls",
        flush=True,
    )


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    offset = check_clocks()
    certificates = Certificates.generate()

    async def trickled(n: int) -> Timing:
        return await agent_call(LOOPBACK, certificates, trickle=True, call_id=f"trickle{n}")

    async def untrickled(n: int) -> Timing:
        return await agent_call(LOOPBACK, certificates, trickle=False, call_id=f"sdp{n}")

    async def aiortc(_: int) -> Timing:
        return await aiortc_call()

    trickle = await series(trickled, args.calls)
    _report("agent<->agent, trickle", trickle)
    no_trickle = await series(untrickled, args.calls)
    _report("agent<->agent, candidates in the SDP", no_trickle)
    reference = await series(aiortc, args.calls)
    _report("aiortc<->aiortc", reference)

    # turnserver starts and stops in a blocking call; no call is running then.
    with Coturn.running() as turn:
        relay_only = PeerConfig(
            ice=IceConfig(turn_servers=(turn.turn_server(shared_secret=True),), policy="relay")
        )

        async def relayed(n: int) -> Timing:
            return await agent_call(relay_only, certificates, trickle=True, call_id=f"turn{n}")

        turned = await series(relayed, args.turn_calls)
    _report("agent<->agent via coturn, relay only, trickle", turned)

    agent_p50 = summary(trickle)["p50"]
    aiortc_p50 = summary(reference)["p50"]
    ratio = agent_p50 / aiortc_p50
    print(f"ratio agent/aiortc p50: {ratio:.2f} (target <= 0.5)", flush=True)
    return {
        "benchmark": "setup",
        "machine": machine(),
        "aioice": importlib.metadata.version("aioice"),
        "aiortc": importlib.metadata.version("aiortc"),
        "calls": args.calls,
        "turn_calls": args.turn_calls,
        "loop_clock_offset_ms": round(offset, 3),
        "call_setup_ms": summary(trickle),
        "call_setup_ms_no_trickle": summary(no_trickle),
        "aiortc_call_setup_ms": summary(reference),
        "ratio": round(ratio, 2),
        "call_setup_ms_turn": summary(turned),
        "breakdown_ms": breakdown(trickle),
        "breakdown_ms_no_trickle": breakdown(no_trickle),
        "breakdown_ms_turn": breakdown(turned),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--calls", type=positive_int, default=20, help="measured calls per loopback series"
    )
    parser.add_argument(
        "--turn-calls", type=positive_int, default=10, help="measured calls through TURN"
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()
    print(json.dumps(asyncio.run(main_async(args))))


if __name__ == "__main__":
    main()
