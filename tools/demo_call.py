"""Demo: the relay, two virtual boards and a call placed by an MQTT command.

Starts ``edge-intercom-relay serve`` (with its embedded mosquitto) and two
``edge-intercom-agent run`` processes on virtual boards a and b (real ALSA devices through
a private PulseAudio; b answers a automatically). Each board's microphone plays a spoken
sentence. The call is placed with ``edge-intercom-relay cmd door-a call peer=door-b``;
live statistics come from the ``status`` command every second; ``cmd door-a hangup``
ends it. At the end the demo scores what each board heard with PESQ, stops everything and
shows where the relay keeps its data and what it recorded.

Media goes directly between the agents over loopback (ICE host candidates), so there is no
network impairment here; ``tools/lab`` and the tests cover loss and jitter.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import shutil
import sqlite3
import sys
from pathlib import Path
from typing import Any

import soxr
from pesq import pesq

from agent.audio.format import SAMPLE_RATE
from tools.lab.fleet import RELAY_CMD, Fleet, FleetError, fleet
from tools.lab.virtual_audio import VirtualAudio, read_wav, speech_wav

A, B = "door-a", "door-b"
BOARDS = {A: "a", B: "b"}
LINES = {
    A: "Hello, this is the front door. There is a parcel for apartment twelve.",
    B: "Thanks, I am coming down now. Please leave it by the mailbox.",
}
DEFAULT_DIR = Path("/tmp/edge-intercom-demo")


def _shown(argv: list[str]) -> str:
    """A command line as a reader would type it (console script by its name)."""
    if argv[: len(RELAY_CMD)] == RELAY_CMD:
        argv = ["edge-intercom-relay", *argv[len(RELAY_CMD) :]]
    return shlex.join(argv)


def _stats_line(device: str, status: dict[str, Any]) -> str:
    m = status.get("media")
    if not m:
        return f"[{device}] {status.get('phase')}: no media yet"
    rtt = "-" if m["rtt_ms"] is None else f"{m['rtt_ms']:.1f}"
    return (
        f"[{device}] {status['phase']} sent {m['packets_sent']:>5} "
        f"recv {m['packets_received']:>5} lost {m['packets_lost']:>3} "
        f"peer-loss {100 * m['loss_fraction']:4.1f}% jitter {m['jitter_ms']:5.1f} ms "
        f"rtt {rtt} ms buffer {m['jitter_buffered_ms']:3.0f}/{m['jitter_target_ms']:3.0f} ms "
        f"plc {m['concealed']}"
    )


async def _print_stats(f: Fleet, stop: asyncio.Event) -> None:
    while not stop.is_set():
        for device in (A, B):
            try:
                print(_stats_line(device, await f.command(device, "status")), flush=True)
            except Exception as exc:  # a missed status line is no reason to stop the demo
                print(f"[{device}] status failed: {exc}", flush=True)
        try:
            async with asyncio.timeout(1.0):
                await stop.wait()
        except TimeoutError:
            pass


async def _cli(f: Fleet, device: str, name: str, *args: str) -> dict[str, Any]:
    print(f"$ {_shown(f.cmd_argv(device, name, *args))}", flush=True)
    code, reply = await f.cli(device, name, *args)
    print(f"  -> {reply}", flush=True)
    if code != 0 or not reply.get("ok"):
        raise f.fail(f"cmd {device} {name} failed: {reply}")
    return reply


def _pesq_lines(audio: VirtualAudio, rec: Any) -> list[str]:
    out = []
    for talker, listener in (("a", "b"), ("b", "a")):
        ref = soxr.resample(audio.channel(rec, f"{talker}_mic") / 32768.0, SAMPLE_RATE, 16_000)
        deg = soxr.resample(audio.channel(rec, f"{listener}_spk") / 32768.0, SAMPLE_RATE, 16_000)
        try:
            score = f"{pesq(16_000, ref, deg, 'wb'):.2f}"
        except Exception as exc:  # too short or silent: say so instead of a traceback
            score = f"not measurable ({type(exc).__name__})"
        out.append(f"PESQ {talker} -> {listener}: wideband {score}")
    return out


def _store_summary(db: Path) -> str:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        devices = conn.execute("SELECT id, presence FROM devices ORDER BY id").fetchall()
        calls = conn.execute(
            "SELECT caller, callee, end_reason FROM calls ORDER BY started"
        ).fetchall()
    devs = ", ".join(f"{d} ({p})" for d, p in devices) or "none"
    cs = ", ".join(f"{a} -> {b} ended {r or 'open'}" for a, b, r in calls) or "none"
    return f"store: {len(devices)} devices: {devs}; {len(calls)} calls: {cs}"


def _fresh(root: Path) -> None:
    """A fresh store, agent state and logs each run (only what this demo writes)."""
    for old in ("relay-data", A, B):
        shutil.rmtree(root / old, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("relay", A, B):
        (root / f"{name}.log").unlink(missing_ok=True)


async def run(args: argparse.Namespace) -> None:
    root: Path = args.dir
    await asyncio.to_thread(_fresh, root)
    speech = {d: speech_wav(root / f"{BOARDS[d]}-speech.wav", t) for d, t in LINES.items()}
    speech_s = max(len(read_wav(p)[0]) for p in speech.values()) / SAMPLE_RATE
    seconds = args.duration if args.duration is not None else speech_s + 1.5

    with VirtualAudio.start() as audio:
        serve = [*RELAY_CMD, "serve", "--config", str(root / "relay.toml")]
        print(f"$ {_shown([*serve, '--data-dir', str(root / 'relay-data')])}", flush=True)
        async with fleet(root, devices=(A, B), client_id="demo") as f:
            print(f"relay up, broker at {f.url}", flush=True)
            for device in BOARDS:
                # What an operator does: mint a token on the relay, run pair-device on the board.
                print(f"$ {_shown(f.pair_new_argv(device))}", flush=True)
                token = await f.token_cli(device)
                print(f"  -> token {token[:24]}... (one-time, 10 min)", flush=True)
                print(f"$ {_shown(f.pair_device_argv(device, '<token>'))}", flush=True)
                await f.pair(device, token)
                print(f"  -> {f.log(f'pair-{device}').strip().splitlines()[-1]}", flush=True)
            for device, board in BOARDS.items():
                b = next(x for x in audio.boards if x.name == board)
                extra = (
                    f'[audio.capture]\nname = "^{b.mic}$"\n'
                    f'[audio.playback]\nname = "^{b.speaker}$"\n'
                )
                auto = [A] if device == B else []
                await f.agent(device, auto_answer=auto, extra=extra, env=audio.env)
                print(f"agent {device} on board {board} ({b.mic}/{b.speaker})", flush=True)
            for device in (A, B):
                await f.until_status(device, lambda s: s["phase"] == "idle", f"{device} up")
            await f.until_online(A, B)
            print("both boards online in the relay's store", flush=True)

            reply = await _cli(f, A, "call", f"peer={B}")
            call_id = reply["call_id"]
            for device in (A, B):
                await f.until_status(
                    device,
                    lambda s: (
                        s["phase"] == "active"
                        and (s["media"] or {}).get("packets_received", 0) >= 50
                    ),
                    f"{device} active with audio",
                )
            stop = asyncio.Event()
            printer = asyncio.create_task(_print_stats(f, stop))
            await asyncio.sleep(1.0)  # capture through PulseAudio settles after the call opens
            players = [audio.play(speech[d], f"{BOARDS[d]}_mic") for d in (A, B)]
            try:
                rec = await asyncio.to_thread(audio.record_probe, seconds)
            finally:
                for p in players:
                    if p.poll() is None:
                        p.kill()
                    p.wait(10)
                stop.set()
                await printer

            await _cli(f, A, "hangup")
            for device in (A, B):
                status = await f.until_status(
                    device,
                    lambda s: (s["last_call"] or {}).get("call_id") == call_id,
                    f"{device} call ended",
                )
                print(f"[{device}] call ended: {status['last_call']['reason']}", flush=True)
            for line in _pesq_lines(audio, rec):
                print(line, flush=True)
            for device in (A, B):
                await f.stop_agent(device)
            await f.stop_relay()
            print("agents and relay stopped (SIGTERM, exit 0)", flush=True)

    data = root / "relay-data"
    print(f"relay data dir:  {data}")
    print(f"  SQLite store:  {data / 'relay.db'}")
    print(f"  broker config: {data / 'broker' / 'mosquitto.conf'}")
    print(f"  broker log:    {data / 'broker' / 'mosquitto.log'}")
    print(f"process logs:    {root}/{{relay,{A},{B}}}.log")
    print(_store_summary(data / "relay.db"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--duration", type=float, help="seconds of call to record (default: the speech + 1.5)"
    )
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help=f"work and data directory ({DEFAULT_DIR})"
    )
    try:
        asyncio.run(run(parser.parse_args()))
    except FleetError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
