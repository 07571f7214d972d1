"""End-to-end call setup benchmark: from the ``call`` command to audio decoded at both ends.

Everything a deployed call goes through, on loopback: the relay (``edge-intercom-relay
serve`` with its embedded mosquitto) and two ``edge-intercom-agent run`` processes
(``tools.lab.fleet``), door-a and door-b, each with a paced tone source and a paced null
sink (one 20 ms frame per 20 ms, like a device, without audio hardware). door-b answers
door-a's calls automatically. Each call is ``call peer=door-b`` published on door-a's
``cmd`` topic through the broker; the agents signal through the relay (invite with the
offer, accept with the answer, trickled candidates), connect ICE and DTLS-SRTP directly
and report ``audio-flowing`` telemetry when they decode the first frame from the other.
The bench then hangs up by command and waits for both ``call-ended`` records (the call
is over at both ends, media closed) before the next call; ENDED accepts a new call, so
it does not wait for IDLE (the fleet holds ENDED for a minute). One unmeasured warm-up
call comes first. Figures, in milliseconds, as p50 and p95 over ``--calls`` calls:

- command_to_audio_ms: from just before the command is published to the later of the
  two agents' ``at_ms`` (the wall clock, in whole milliseconds, at which each decoded its
  first frame from the other). t0 is read from the same wall clock (``time.time_ns``) on
  the same machine, so no telemetry delivery time is counted. Target: p50 <= 300.
- direct_call_setup_ms: the baseline, measured in this run before the fleet starts: the
  same media set-up between two ``MediaPeer`` in this one process, offer, answer and
  trickled candidates handed over by function calls (``tools.bench.setup.agent_call``,
  host candidates on 127.0.0.1), from creating the offer to first audio at both ends.
  ratio = command_to_audio_ms p50 / direct_call_setup_ms p50: what the control plane
  (command, broker, relay, agent processes) adds to the media set-up.
- breakdown_ms: medians, in ms from t0, of when this bench's own MQTT client (subscribed
  to both devices' ``out``, ``in`` and ``telemetry``) saw: the command's reply
  (``reply``), the invite on door-a's ``out`` and on door-b's ``in`` after the relay
  (``invite_out``, ``invite_in``), the accept on door-b's ``out`` and on door-a's ``in``
  (``accept_out``, ``accept_in``); then each side's ``at_ms`` (``audio_caller``,
  ``audio_callee``). The envelope times include one broker hop to the bench.
- telemetry_lag_ms: median, over both sides of every call, of the arrival of the
  ``audio-flowing`` record at the bench minus its ``at_ms``.

The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.signaling.envelope import EnvelopeError, from_json
from agent.signaling.mqtt import MqttClient, SessionClosed
from agent.signaling.topics import Kind, TopicError, device_topic, parse_topic
from tools.bench.args import machine, positive_int
from tools.bench.setup import LOOPBACK, Certificates, agent_call, percentiles, series
from tools.lab.fleet import Fleet, FleetError, fleet

A, B = "door-a", "door-b"
TONES = {A: 700.0, B: 1100.0}
CALL_TIMEOUT_S = 20.0
"""A call whose audio (or end) is not seen at both ends by then fails the benchmark."""
TARGET_P50_MS = 300.0
STEPS = ("reply", "invite_out", "invite_in", "accept_out", "accept_in")
"""Control-plane steps of the breakdown, in the order they happen."""
SIGNALS = {
    (A, Kind.OUT, "invite"): "invite_out",
    (B, Kind.IN, "invite"): "invite_in",
    (B, Kind.OUT, "accept"): "accept_out",
    (A, Kind.IN, "accept"): "accept_in",
}
"""Envelopes the bench watches: (device, topic kind, envelope type) -> step."""


def wall_ms() -> float:
    """The wall clock in milliseconds, the clock of the agents' ``at_ms``."""
    return time.time_ns() / 1e6


@dataclass(slots=True)
class Seen:
    """What the bench's MQTT client saw of one call: wall-clock ms of first arrival."""

    steps: dict[str, float] = field(default_factory=dict)
    """Step name (``SIGNALS`` values, ``audio:DEVICE``, ``ended:DEVICE``) -> arrival."""
    audio_at: dict[str, int] = field(default_factory=dict)
    """Device -> ``at_ms`` of its ``audio-flowing`` record."""
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Step -> the telemetry record itself."""


class Watch:
    """Reads the bench's own MQTT client and keeps what it saw per call id."""

    def __init__(self, client: MqttClient) -> None:
        self._client = client
        self.calls: defaultdict[str, Seen] = defaultdict(Seen)
        self._changed = asyncio.Condition()

    async def run(self) -> None:
        while True:
            try:
                msg = await self._client.recv()
            except SessionClosed:
                return
            arrived = wall_ms()
            try:
                device, kind = parse_topic(msg.topic)
            except TopicError:
                continue
            if kind is Kind.TELEMETRY:
                self._telemetry(device, msg.payload, arrived)
            else:
                self._envelope(device, kind, msg.payload, arrived)
            async with self._changed:
                self._changed.notify_all()

    def _telemetry(self, device: str, payload: bytes, arrived: float) -> None:
        record = json.loads(payload)
        event, call_id = record.get("event"), record.get("call_id")
        if not isinstance(call_id, str) or event not in ("audio-flowing", "call-ended"):
            return
        seen = self.calls[call_id]
        step = f"{'audio' if event == 'audio-flowing' else 'ended'}:{device}"
        seen.steps.setdefault(step, arrived)
        seen.records.setdefault(step, record)
        if event == "audio-flowing":
            seen.audio_at.setdefault(device, int(record["at_ms"]))

    def _envelope(self, device: str, kind: Kind, payload: bytes, arrived: float) -> None:
        try:
            env = from_json(payload)
        except EnvelopeError:
            return
        step = SIGNALS.get((device, kind, env.type))
        if step is not None:
            self.calls[env.call].steps.setdefault(step, arrived)

    async def until(self, call_id: str, steps: set[str], what: str) -> Seen:
        """Wait until every one of ``steps`` was seen for ``call_id``."""
        seen = self.calls[call_id]
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S), self._changed:
                await self._changed.wait_for(lambda: steps <= seen.steps.keys())
        except TimeoutError:
            missing = sorted(steps - seen.steps.keys())
            raise FleetError(
                f"call {call_id}: no {', '.join(missing)} within {CALL_TIMEOUT_S:g} s ({what})"
            ) from None
        return seen


@dataclass(frozen=True, slots=True)
class Timing:
    """One call, in ms from just before the ``call`` command was published."""

    steps: dict[str, float]
    """``STEPS`` -> when the bench saw it."""
    audio_caller: float
    audio_callee: float
    telemetry_lag: tuple[float, float]

    @property
    def command_to_audio(self) -> float:
        return max(self.audio_caller, self.audio_callee)


@contextlib.asynccontextmanager
async def watching(f: Fleet) -> AsyncIterator[Watch]:
    topics = [device_topic(d, k) for d in (A, B) for k in (Kind.OUT, Kind.IN, Kind.TELEMETRY)]
    client = MqttClient(
        f.mqtt_config("bench-e2e-watch", session_expiry=0),
        subscriptions=topics,
    )
    await client.start()
    watch = Watch(client)
    reader = asyncio.get_running_loop().create_task(watch.run(), name="bench-e2e-watch")
    try:
        yield watch
    finally:
        await client.close()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def one_call(f: Fleet, watch: Watch) -> Timing:
    """Call door-b from door-a by command, wait for audio at both ends, hang up."""
    t0 = wall_ms()
    reply = await f.command(A, "call", peer=B)
    replied = wall_ms()
    if not reply.get("ok"):
        raise f.fail(f"call refused: {reply}")
    call_id = reply["call_id"]
    audio = {f"audio:{A}", f"audio:{B}"}
    seen = await watch.until(call_id, audio, "audio-flowing from both")
    for device, peer in ((A, B), (B, A)):
        record = seen.records[f"audio:{device}"]
        if record["peer"] != peer:
            raise f.fail(f"{device} reported audio from {record['peer']}, not {peer}")
    reply = await f.command(A, "hangup", call_id=call_id)
    if not reply.get("ok"):
        raise f.fail(f"hangup refused: {reply}")
    await watch.until(call_id, {f"ended:{A}", f"ended:{B}"}, "call-ended from both")
    missing = [s for s in STEPS[1:] if s not in seen.steps]
    if missing:
        raise f.fail(f"call {call_id}: the bench saw no {', '.join(missing)}")
    steps = {"reply": replied - t0, **{s: seen.steps[s] - t0 for s in STEPS[1:]}}
    lag = {d: seen.steps[f"audio:{d}"] - seen.audio_at[d] for d in (A, B)}
    return Timing(steps, seen.audio_at[A] - t0, seen.audio_at[B] - t0, (lag[A], lag[B]))


async def measure_e2e(root: Path, calls: int) -> list[Timing]:
    """``calls`` measured calls (after one warm-up) through a fresh fleet under ``root``."""
    async with fleet(root, devices=(A, B), client_id="bench-e2e") as f:
        for device, auto in ((A, ()), (B, (A,))):
            await f.agent(device, source=f"tone:{TONES[device]:g}", sink="null", auto_answer=auto)
        for device in (A, B):
            await f.until_status(device, lambda s: s["phase"] == "idle", f"{device} up")
        await f.until_online(A, B)
        async with watching(f) as watch:
            await one_call(f, watch)
            timings = [await one_call(f, watch) for _ in range(calls)]
        for device in (A, B):
            await f.stop_agent(device)
        await f.stop_relay()
    return timings


async def measure_direct(calls: int) -> list[float]:
    """The baseline: first audio at both ends of in-process agent<->agent calls (ms)."""
    certificates = Certificates.generate()

    async def call(n: int) -> Any:
        return await agent_call(LOOPBACK, certificates, trickle=True, call_id=f"direct{n}")

    return [t.first_audio for t in await series(call, calls)]


def breakdown(timings: list[Timing]) -> dict[str, float]:
    medians = {s: statistics.median(t.steps[s] for t in timings) for s in STEPS}
    medians["audio_caller"] = statistics.median(t.audio_caller for t in timings)
    medians["audio_callee"] = statistics.median(t.audio_callee for t in timings)
    return {name: round(value, 1) for name, value in medians.items()}


def _report(name: str, values: list[float]) -> None:
    s = percentiles(values)
    print(
        f"{name}: p50 {s['p50']:.1f} ms, p95 {s['p95']:.1f} ms "
        f"(min {min(values):.1f}, max {max(values):.1f}) over {len(values)} calls",
        flush=True,
    )


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    direct = await measure_direct(args.calls)
    _report("direct agent<->agent media set-up (in process)", direct)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        timings = await measure_e2e(args.dir, args.calls)
    else:
        with tempfile.TemporaryDirectory(prefix="edge-bench-e2e-") as tmp:
            timings = await measure_e2e(Path(tmp), args.calls)
    e2e = [t.command_to_audio for t in timings]
    _report("command to audio at both ends (relay, broker, agents)", e2e)
    steps = breakdown(timings)
    print("breakdown (medians, ms from the command): " + ", ".join(
        f"{k} {v:.1f}" for k, v in steps.items()
    ), flush=True)  # fmt: skip
    e2e_p50 = percentiles(e2e)["p50"]
    direct_p50 = percentiles(direct)["p50"]
    ratio = e2e_p50 / direct_p50
    print(f"ratio e2e/direct p50: {ratio:.2f}; target p50 <= {TARGET_P50_MS:g} ms", flush=True)
    return {
        "benchmark": "e2e",
        "machine": machine(),
        "calls": args.calls,
        "command_to_audio_ms": percentiles(e2e),
        "direct_call_setup_ms": percentiles(direct),
        "ratio": round(ratio, 2),
        "target_p50_ms": TARGET_P50_MS,
        "meets_target": e2e_p50 <= TARGET_P50_MS,
        "breakdown_ms": steps,
        "telemetry_lag_ms": round(
            statistics.median(lag for t in timings for lag in t.telemetry_lag), 1
        ),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=positive_int, default=20, help="measured calls per series")
    parser.add_argument(
        "--dir", type=Path, default=None,
        help="keep the fleet's configs and logs here (default: a temporary directory)",
    )  # fmt: skip
    return parser


def main() -> None:
    args = build_parser().parse_args()
    print(json.dumps(asyncio.run(main_async(args))))


if __name__ == "__main__":
    main()
