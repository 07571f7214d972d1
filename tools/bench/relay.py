"""Relay benchmark: simulated devices against ``edge-intercom-relay serve`` on this machine.

Starts the relay as a real process (its embedded mosquitto, a fresh data dir), connects
``--devices`` simulated devices (``tools.lab.mqtt_swarm``: one lightweight MQTT v5
connection each, with retained presence and a will) in batches, waits until the relay's
store has all of them online, then drives call signaling between distinct pairs of them:

- calls start open-loop at ``--rate`` / 4 per second (each call is four messages: invite
  from the caller, ringing and accept from the callee, hangup from the caller), whatever
  the previous calls are doing, so a slow relay shows up as latency, not as a lower
  offered load; each device answers at once, the caller hangs up as soon as it has the
  accept. Envelopes are real (``agent.signaling.envelope``) with a realistic SDP offer
  and answer, validated again by the receiving device;
- first the broker-only baseline: the same calls with each device publishing straight
  on the peer's ``in`` (the relay is idle); then through the relay (devices publish on
  their ``out``), each phase ``--seconds`` long plus a bounded drain.

Figures (the last line printed is a JSON object):

- ``devices``: devices the relay's store has online;
- ``signaling_msgs_per_s``: routed messages delivered to the peer device per second of
  the relay phase (from its first publish until the last call ended);
- ``route_p50_ms``/``route_p99_ms``: per message, from the device's publish to its arrival
  at the peer device, in this one process on one clock (publish, broker, relay, broker,
  the peer's socket, and this process's own event loop);
- ``rss_mb``: the relay process's VmRSS at the end;
- ``cpu_per_1k_msgs_s``: CPU cores the relay process (all its threads, user + system)
  used during the relay phase, per 1,000 routed messages per second, i.e. relay CPU
  seconds / phase seconds / (``signaling_msgs_per_s`` / 1000);
- ``broker_cpu_cores`` (and per 1k msgs/s), ``swarm_cpu_cores``: the embedded mosquitto's
  and this process's CPU during the relay phase;
- ``baseline``: the same figures without the relay; ``relay_added_p50_ms``/``_p99_ms``
  and ``ratio_p50``/``ratio_p99`` compare the two phases.

Targets on a 2-core machine: 10,000 devices online, >= 2,000 routed messages/s, p99 <=
50 ms; ``--rate`` defaults to 2,200 so that a relay that keeps up clears the throughput
target with some margin. The relay, mosquitto and the swarm share this machine's cores
with whatever else runs (the load average at the start is printed and kept in the JSON).
NOFILE is raised to its hard limit first (the relay and mosquitto inherit it): the swarm
and mosquitto each hold one socket per device. ``--profile FILE`` runs the relay under
cProfile (its event loop's thread) to see where its time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import re
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from agent.media import sdp
from agent.net.candidate import Candidate, CandidateType
from agent.signaling.envelope import (
    AcceptBody,
    Body,
    DeclineBody,
    EnvelopeError,
    HangupBody,
    InviteBody,
    RingingBody,
    from_json,
    make,
    new_id,
    respond,
)
from agent.signaling.topics import RELAY_ID
from cloud_relay.store import Store
from tools.bench.args import machine, positive_float, positive_int
from tools.lab.broker import _free_port
from tools.lab.fleet import RELAY_CMD
from tools.lab.mqtt_swarm import Device, Swarm, SwarmError
from tools.lab.procs import terminate

MESSAGES_PER_CALL = 4
TICK_S = 0.005
"""How often the pacer starts the calls that are due."""
WAIT_S = 30.0
"""Upper bound of the relay's start, one batch of devices, a drain, the relay's stop."""
TARGETS = {"devices": 10_000, "signaling_msgs_per_s": 2000.0, "route_p99_ms": 50.0}


class BenchError(RuntimeError):
    """Something the benchmark waited for did not happen; the text says what."""


# --- call flows --------------------------------------------------------------------------------


def realistic_sdps() -> tuple[str, str]:
    """A WebRTC audio offer and its answer as agents make them (host + srflx candidates)."""

    def local(host: str, public: str, port: int) -> sdp.LocalParameters:
        candidates = (
            Candidate("1", 1, "udp", 2130706431, host, port, CandidateType.HOST),
            Candidate("2", 1, "udp", 1694498815, public, port + 7, CandidateType.SRFLX, host, port),
        )
        return sdp.LocalParameters(
            ice_ufrag=secrets.token_hex(4),
            ice_pwd=secrets.token_hex(16),
            fingerprint=sdp.fingerprint_of(secrets.token_bytes(420)),
            ssrc=secrets.randbits(32),
            cname=secrets.token_hex(8),
            session_id=secrets.randbits(62),
            candidates=candidates,
            end_of_candidates=True,
            msid=f"{secrets.token_hex(8)} {secrets.token_hex(8)}",
        )

    offer = sdp.serialize(sdp.create_offer(local("192.168.1.23", "203.0.113.7", 50123)))
    answer, _ = sdp.negotiate(sdp.parse(offer), local("10.0.4.17", "198.51.100.9", 40111))
    return offer, sdp.serialize(answer)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Pair:
    caller: Device
    callee: Device


@dataclass(slots=True)
class Phase:
    """One phase's counters, filled in by ``Calls``."""

    via_relay: bool
    started: int = 0
    """Calls started (invites sent)."""
    completed: int = 0
    """Calls whose hangup reached the callee."""
    declined: int = 0
    """Invites the relay answered with a decline."""
    skipped: int = 0
    """Calls due while every pair was still in a call (not started)."""
    unexpected: int = 0
    """Envelopes that arrived twice, at the wrong device, from the wrong sender, or for
    no call in progress."""
    malformed: int = 0
    latencies: list[float] = field(default_factory=list)
    """Seconds from publish to arrival, per delivered message."""


class Calls:
    """Drives call flows between pairs of devices and times every message."""

    def __init__(self, pairs: Sequence[Pair]) -> None:
        self.offer, self.answer = realistic_sdps()
        self.idle: deque[Pair] = deque(pairs)
        self.active: dict[str, Pair] = {}
        self.sent: dict[str, float] = {}
        """Envelope id -> ``time.perf_counter()`` just before its publish."""
        self.phase = Phase(via_relay=False)
        self._drained: asyncio.Future[None] | None = None
        """Set once the last active call has ended, while ``run`` waits for that."""

    def start_call(self) -> None:
        if not self.idle:
            self.phase.skipped += 1
            return
        pair = self.idle.popleft()
        call = new_id()
        self.active[call] = pair
        self.phase.started += 1
        invite = make(InviteBody(sdp=self.offer), call=call, from_=pair.caller.id,
                      to=pair.callee.id, ts=now_ms())  # fmt: skip
        self.sent[invite.id] = time.perf_counter()
        pair.caller.send(invite, via_relay=self.phase.via_relay)

    def on_message(self, device: Device, topic: str, payload: bytes) -> None:
        arrived = time.perf_counter()
        phase = self.phase
        try:
            env = from_json(payload)
        except EnvelopeError:
            phase.malformed += 1
            return
        sent = self.sent.pop(env.id, None)
        if sent is not None:
            phase.latencies.append(arrived - sent)
        pair = self.active.get(env.call)
        peer = None if pair is None else pair.callee if device is pair.caller else pair.caller
        if (
            (sent is None and env.from_ != RELAY_ID)
            or env.to != device.id
            or peer is None
            or env.from_ not in (peer.id, RELAY_ID)
        ):
            phase.unexpected += 1
        replies: list[Body] = []
        match env.body:
            case InviteBody():
                replies = [RingingBody(), AcceptBody(sdp=self.answer)]
            case AcceptBody():
                replies = [HangupBody()]
            case HangupBody():
                phase.completed += 1
                self._finish(env.call)
            case DeclineBody():
                phase.declined += 1
                self._finish(env.call)
        for body in replies:
            reply = respond(env, body, ts=now_ms())
            self.sent[reply.id] = time.perf_counter()
            device.send(reply, via_relay=phase.via_relay)

    def _finish(self, call: str) -> None:
        pair = self.active.pop(call, None)
        if pair is not None:
            self.idle.append(pair)
        if not self.active and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def run(self, via_relay: bool, seconds: float, rate: float) -> Phase:
        """Start calls at ``rate`` / 4 per second for ``seconds``, then wait for them to end."""
        self.phase = phase = Phase(via_relay=via_relay)
        self.sent.clear()
        call_rate = rate / MESSAGES_PER_CALL
        loop = asyncio.get_running_loop()
        start = loop.time()
        due_total = int(seconds * call_rate)
        started = 0
        while started < due_total:
            due = min(due_total, int((loop.time() - start) * call_rate) + 1)
            while started < due:
                self.start_call()
                started += 1
            await asyncio.sleep(TICK_S)
        if self.active:
            self._drained = loop.create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WAIT_S):
                    await self._drained
        return phase


# --- processes ---------------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` (all its threads) from ``/proc``."""
    return cpu_seconds_of(Path(f"/proc/{pid}/stat"))


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of process ``pid``'s main thread (``loop``) and of its other threads."""
    out = {"loop": 0.0, "other_threads": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            name = "loop" if task.name == str(pid) else "other_threads"
            out[name] += cpu_seconds_of(task / "stat")
    return out


def cpu_seconds_of(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def raise_nofile() -> int:
    """Soft NOFILE up to the hard limit; the relay and its mosquitto inherit it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class RelayProcess:
    """``edge-intercom-relay serve`` with its embedded mosquitto, data under ``root``."""

    def __init__(self, root: Path, profile: Path | None = None) -> None:
        self.root = root
        self.profile = profile
        self.port = _free_port("127.0.0.1")
        self.data_dir = root / "relay-data"
        self.log_path = root / "relay.log"
        self.proc: asyncio.subprocess.Process | None = None

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def broker_pid(self) -> int:
        return int((self.data_dir / "broker" / "mosquitto.pid").read_text())

    @property
    def broker_log(self) -> Path:
        return self.data_dir / "broker" / "mosquitto.log"

    async def start(self) -> None:
        config = self.root / "relay.toml"
        # A plain lab broker: the simulated devices are not paired, so no TLS and no
        # signatures (the README gives what those add per message).
        config.write_text(
            f'[broker]\nport = {self.port}\ntls = false\n[mqtt]\nclient_id = "relay-bench"\n'
        )
        argv = [*RELAY_CMD, "serve", "--config", str(config), "--data-dir", str(self.data_dir)]
        if self.profile is not None:  # the event loop's thread only
            argv = [sys.executable, "-m", "cProfile", "-o", str(self.profile), "-m",
                    "cloud_relay", *argv[len(RELAY_CMD):]]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
            )
        try:
            async with asyncio.timeout(WAIT_S):
                while "relay ready" not in self.log_path.read_text(errors="replace"):
                    if self.proc.returncode is not None:
                        raise BenchError(f"relay exited with {self.proc.returncode}")
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise BenchError(f"relay not ready within {WAIT_S:g} s\n{self.log_tail()}") from None

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        if await terminate(proc, WAIT_S) is None:
            raise BenchError(f"relay ignored SIGTERM for {WAIT_S:g} s")


async def wait_online(store: Store, want: int, limit_s: float) -> int:
    """Poll the relay's store until ``want`` devices are online; the last count seen."""
    online = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(limit_s):
            while True:  # another process's database: nothing to wait on but the next poll
                online = (await store.run(store.presence_counts)).get("online", 0)
                if online >= want:
                    break
                await asyncio.sleep(0.25)
    return online


# --- figures -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    """CPU seconds of the relay, its mosquitto and this process at one instant."""

    wall: float
    relay: float
    broker: float
    swarm: float
    relay_threads: dict[str, float]

    @classmethod
    def now(cls, relay: RelayProcess) -> Usage:
        return cls(time.monotonic(), cpu_seconds(relay.pid), cpu_seconds(relay.broker_pid),
                   time.process_time(), thread_cpu(relay.pid))  # fmt: skip


@dataclass(frozen=True, slots=True)
class Figures:
    """One phase's results (see the module docstring)."""

    seconds: float
    calls: int
    calls_completed: int
    calls_declined: int
    calls_skipped: int
    messages: int
    """Delivered to the peer device."""
    lost: int
    """Sent and never delivered (a declined invite's three replies are not counted)."""
    unexpected: int
    signaling_msgs_per_s: float
    route_p50_ms: float
    route_p99_ms: float
    route_max_ms: float
    relay_cpu_cores: float
    cpu_per_1k_msgs_s: float
    broker_cpu_cores: float
    broker_cpu_per_1k_msgs_s: float
    swarm_cpu_cores: float
    relay_thread_cpu_cores: dict[str, float]
    """Relay CPU of its event loop's thread and of the others (the store's, mostly)."""

    @classmethod
    def of(cls, phase: Phase, before: Usage, after: Usage) -> Figures:
        seconds = after.wall - before.wall
        delivered = len(phase.latencies)
        rate = delivered / seconds
        ms = np.array(phase.latencies) * 1000 if delivered else np.zeros(1)
        per_1k = rate / 1000 if rate else float("nan")

        def cores(used: float) -> float:
            return round(used / seconds, 3)

        threads = {
            name: used - before.relay_threads.get(name, 0.0)
            for name, used in sorted(after.relay_threads.items())
        }
        return cls(
            seconds=round(seconds, 2),
            calls=phase.started,
            calls_completed=phase.completed,
            calls_declined=phase.declined,
            calls_skipped=phase.skipped,
            messages=delivered,
            lost=phase.started * MESSAGES_PER_CALL - delivered - phase.declined * 3,
            unexpected=phase.unexpected + phase.malformed,
            signaling_msgs_per_s=round(rate, 1),
            route_p50_ms=round(float(np.percentile(ms, 50)), 2),
            route_p99_ms=round(float(np.percentile(ms, 99)), 2),
            route_max_ms=round(float(ms.max()), 2),
            relay_cpu_cores=cores(after.relay - before.relay),
            cpu_per_1k_msgs_s=round((after.relay - before.relay) / seconds / per_1k, 3),
            broker_cpu_cores=cores(after.broker - before.broker),
            broker_cpu_per_1k_msgs_s=round((after.broker - before.broker) / seconds / per_1k, 3),
            swarm_cpu_cores=cores(after.swarm - before.swarm),
            relay_thread_cpu_cores={k: cores(v) for k, v in threads.items() if v > 0},
        )

    def line(self, name: str) -> str:
        threads = ", ".join(f"{k} {v}" for k, v in self.relay_thread_cpu_cores.items())
        return (
            f"{name}: {self.signaling_msgs_per_s:.0f} msgs/s delivered ({self.messages} in "
            f"{self.seconds} s, {self.lost} lost), route p50 {self.route_p50_ms} ms, "
            f"p99 {self.route_p99_ms} ms, max {self.route_max_ms} ms; CPU cores: relay "
            f"{self.relay_cpu_cores} ({threads or 'idle'}), mosquitto {self.broker_cpu_cores}, "
            f"swarm {self.swarm_cpu_cores}"
        )


def mosquitto_version() -> str:
    binary = shutil.which("mosquitto") or "mosquitto"
    try:
        out = subprocess.run(
            [binary, "-h"], check=False, capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    found = re.search(r"mosquitto version (\S+)", out)
    return found.group(1) if found else "unknown"


# --- the run -----------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    nofile = raise_nofile()
    if args.devices + 200 > nofile:  # per process: the swarm and mosquitto hold one each
        raise BenchError(f"NOFILE hard limit {nofile} is too low for {args.devices} devices")
    load = os.getloadavg()[0]
    print(
        f"machine: {machine()}, mosquitto {mosquitto_version()}, NOFILE {nofile}, "
        f"load average {load:.2f} (other work on the machine skews every figure)",
        flush=True,
    )
    root = Path(tempfile.mkdtemp(prefix="edge-bench-relay-"))
    relay = RelayProcess(root, args.profile)
    ids = [f"sim-{n:05d}" for n in range(args.devices - args.devices % 2)]
    calls: Calls | None = None
    swarm: Swarm | None = None
    store: Store | None = None
    try:
        await relay.start()
        loop = asyncio.get_running_loop()
        started = loop.time()

        def handler(device: Device, topic: str, payload: bytes) -> None:
            assert calls is not None
            calls.on_message(device, topic, payload)

        swarm = Swarm("127.0.0.1", relay.port, handler, timeout=WAIT_S)

        def progress(n: int) -> None:
            if n % 2000 < args.batch or n == len(ids):
                print(f"  {n} devices connected ({loop.time() - started:.1f} s)", flush=True)

        await swarm.connect(ids, batch=args.batch, progress=progress)
        connect_s = loop.time() - started
        store = await Store.open(f"sqlite:///{relay.data_dir / 'relay.db'}")
        online = await wait_online(store, len(ids), args.online_timeout)
        online_s = loop.time() - started
        print(f"relay has {online} of {len(ids)} devices online after {online_s:.1f} s", flush=True)
        pairs = [
            Pair(swarm.devices[a], swarm.devices[b])
            for a, b in zip(ids[::2], ids[1::2], strict=True)
        ]
        calls = Calls(pairs)
        gc.freeze()  # the devices live to the end: no full collections walking them mid-phase

        results: dict[str, Figures] = {}
        for name, via_relay in (("baseline", False), ("relay", True)):
            before = Usage.now(relay)
            phase = await calls.run(via_relay, args.seconds, args.rate)
            results[name] = Figures.of(phase, before, Usage.now(relay))
            print(results[name].line(name), flush=True)
            await swarm.settle()
        relay_rss = rss_mb(relay.pid)
        broker_rss = rss_mb(relay.broker_pid)
        lost_devices = swarm.stats.lost
        online_end = (await store.run(store.presence_counts)).get("online", 0)
    finally:
        if store is not None:
            await store.close()
        if swarm is not None:
            await swarm.close()
        await relay.stop()
    broker_drops = relay.broker_log.read_text(errors="replace").count("being dropped")
    relay_warnings = sum(
        " WARNING " in line or " ERROR " in line
        for line in relay.log_path.read_text(errors="replace").splitlines()
    )
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)

    routed, base = results["relay"], results["baseline"]
    out: dict[str, object] = {
        "benchmark": "relay",
        "machine": machine(),
        "mosquitto": mosquitto_version(),
        "load_avg_1m_at_start": round(load, 2),
        "devices_requested": len(ids),
        "devices": online,
        "devices_online_at_end": online_end,
        "devices_lost": lost_devices,
        "connect_s": round(connect_s, 1),
        "online_s": round(online_s, 1),
        "offered_msgs_per_s": args.rate,
        "seconds": args.seconds,
        "signaling_msgs_per_s": routed.signaling_msgs_per_s,
        "route_p50_ms": routed.route_p50_ms,
        "route_p99_ms": routed.route_p99_ms,
        "rss_mb": round(relay_rss, 1),
        "cpu_per_1k_msgs_s": routed.cpu_per_1k_msgs_s,
        "broker_cpu_cores": routed.broker_cpu_cores,
        "broker_rss_mb": round(broker_rss, 1),
        "relay_added_p50_ms": round(routed.route_p50_ms - base.route_p50_ms, 2),
        "relay_added_p99_ms": round(routed.route_p99_ms - base.route_p99_ms, 2),
        "ratio_p50": _ratio(routed.route_p50_ms, base.route_p50_ms),
        "ratio_p99": _ratio(routed.route_p99_ms, base.route_p99_ms),
        "relay_phase": asdict(routed),
        "baseline": asdict(base),
        "relay_log_warnings": relay_warnings,
        "broker_drop_warnings": broker_drops,
    }
    checks = {
        "devices": online >= TARGETS["devices"] and online == len(ids),
        "signaling_msgs_per_s": routed.signaling_msgs_per_s >= TARGETS["signaling_msgs_per_s"],
        "route_p99_ms": routed.route_p99_ms <= TARGETS["route_p99_ms"],
    }
    out["targets"] = {
        name: {"target": TARGETS[name], "value": out[name], "pass": ok}
        for name, ok in checks.items()
    }
    for name, ok in checks.items():
        op = "<=" if name == "route_p99_ms" else ">="
        print(f"{'PASS' if ok else 'MISS'} {name} = {out[name]} (target {op} {TARGETS[name]:g})")
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(float(a) / float(b), 2) if b else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=positive_int, default=10_000,
                        help="simulated devices (an even number is used)")  # fmt: skip
    parser.add_argument("--seconds", type=positive_float, default=20.0,
                        help="length of each signaling phase")  # fmt: skip
    parser.add_argument("--rate", type=positive_float, default=2200.0,
                        help="signaling messages per second offered (open loop)")  # fmt: skip
    parser.add_argument("--batch", type=positive_int, default=500,
                        help="devices connected at a time")  # fmt: skip
    parser.add_argument("--online-timeout", type=positive_float, default=120.0,
                        help="seconds to wait until the relay has all devices online")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the data dir and logs")
    parser.add_argument("--profile", type=Path,
                        help="run the relay under cProfile, writing its stats here")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.devices < 2:
        sys.exit("relay bench: need at least 2 devices")
    try:
        result = asyncio.run(main_async(args))
    except (BenchError, SwarmError) as exc:
        sys.exit(f"relay bench: {exc}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
