"""Outbox benchmark: alerts from a board to the relay's store through repeated SIGKILLs of
the board, the broker and the relay; every alert must be stored exactly once.

Three kinds of real processes on loopback, each killed and started again on its own:

- the broker: mosquitto (``tools.lab.broker``, the plain lab one). Its persistence is
  saved only on a clean exit, so a SIGKILL forgets every session, subscription and
  queued message;
- the relay: ``edge-intercom-relay serve`` with that mosquitto as its external broker
  (``[broker] url = "mqtt://..."``, ``tools.lab.fleet.Fleet`` in its plain-broker mode)
  and its store in a SQLite file in its data dir. Not the relay's embedded broker: a
  SIGKILLed relay takes that one down with it, and the broker must die on its own;
- the board: ``tools.bench.outbox_board``, the agent's own ``Outbox``, ``AlertUplink``
  and ``MqttSession`` (not copies), adding alerts ``0 .. --alerts - 1`` at ``--rate``
  per second. Each alert, id included, is a function of the run and its sequence
  number, so one whose add a kill interrupted is added again after the restart as the
  same alert. Its outbox's capacity is max(``DEFAULT_CAPACITY``, ``--alerts``): it could
  hold every alert of the run unacknowledged, so a drop would be a bug, not the bound
  doing its job.

Chaos: after a pause drawn from [``--kill-min``, ``--kill-max``] seconds, one process
gets SIGKILL, stays down for [0, ``--max-outage``] seconds and is started again (the
broker on the same port; the relay until it logs "relay ready"; the board resumes at
its durable progress). The kinds come in rounds, each a shuffle of board, broker, relay
(all drawn from ``--seed``), so each kind is killed once per round. Kills go on until
every alert was added and at least ``--min-rounds`` rounds are done; then the board's
outbox must empty within ``--drain-timeout`` (it empties only as the relay acknowledges
stored alerts). The uplink's ack timeout is ``--ack-timeout`` (the agent's default is
30 s): alerts a killed broker or relay swallowed are sent again after it, so it sets
how long each kill stalls the run, not whether an alert arrives.

Figures (the last line printed is a JSON object); target: ``lost`` == 0 and
``duplicates`` == 0:

- ``sent``: alerts the board durably added (its progress file: ``--alerts`` at the end);
- ``stored_at_relay``: distinct alerts (sequence numbers) in the relay's store;
- ``duplicates``: stored rows that repeat an already stored sequence number (the store
  keeps one row per id: this catches an id made anew for a resend);
- ``lost``: sent sequence numbers the store does not have;
- ``altered``: stored alerts that, their id aside, are not what was sent;
  ``unexpected``: other rows of the board; ``overflow_alerts``: ``outbox_overflow``
  alerts in the store;
- ``outbox_dropped``: alerts the outbox dropped for room, over all board processes;
- ``kills``: SIGKILLs by kind; ``rounds``: complete rounds of them;
- ``uplink``: the board processes' counters (publishes, resends, acks), as of each
  one's last status file: a killed process's last quarter second is missing;
- ``seconds``: from the board's first start until its outbox was empty, of which
  ``add_seconds`` until every alert was added and ``drain_seconds`` the rest;
  ``alerts_per_s``: ``sent`` / ``seconds``;
- ``log_errors``: ERROR lines in the relay's and the boards' logs (paho's about a
  killed broker's connection reset aside).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from agent.edge.alerts import OUTBOX_OVERFLOW
from agent.edge.outbox import DEFAULT_CAPACITY
from agent.service.files import write_atomic
from cloud_relay.broker import BrokerError
from cloud_relay.store import AlertRecord, Store
from tools.bench.args import machine, positive_float, positive_int
from tools.bench.outbox_board import (
    PROGRESS_FILE,
    SETTINGS_FILE,
    BoardSettings,
    Progress,
    alert_for,
    read_status,
)
from tools.bench.relay import mosquitto_version
from tools.lab.broker import Mosquitto
from tools.lab.fleet import WAIT, Fleet, FleetError
from tools.lab.procs import terminate

DEVICE: Final = "bench-board"
KINDS: Final = ("board", "broker", "relay")
TICK_S: Final = 0.1
"""How often the processes and the board's progress are looked at."""
PROGRESS_S: Final = 10.0
"""Seconds between progress lines."""
STALL_S: Final = 30.0
"""The board adding nothing for this long (outages included) ends the run."""
ALL_ROWS: Final = 2**62
"""``Store.alerts`` limit that means all of them."""


class BenchError(RuntimeError):
    """Something the benchmark waited for did not happen; the text says what."""


@dataclass(frozen=True, slots=True)
class Tally:
    """What the relay's store holds of the board's alerts."""

    stored: int
    duplicates: int
    lost: int
    altered: int
    unexpected: int
    overflow_alerts: int

    @classmethod
    def of(cls, records: Sequence[AlertRecord], settings: BoardSettings, sent: int) -> Tally:
        seqs: Counter[int] = Counter()
        altered = unexpected = overflow = 0
        for record in records:
            detail = record.body.get("detail", {})
            seq = detail.get("seq") if detail.get("run") == settings.run else None
            if record.kind == OUTBOX_OVERFLOW:
                overflow += 1
            elif isinstance(seq, int) and 0 <= seq < sent:
                seqs[seq] += 1
                sent_body = alert_for(settings.run, seq, settings.t0_ms).to_dict()
                # A new id is a duplicate, counted above; the rest must be as sent.
                altered += {**record.body, "id": sent_body["id"]} != sent_body
            else:
                unexpected += 1
        return cls(
            stored=len(seqs),
            duplicates=sum(n - 1 for n in seqs.values()),
            lost=sent - len(seqs),
            altered=altered,
            unexpected=unexpected,
            overflow_alerts=overflow,
        )


class Lab:
    """The broker, the relay and the board: started, killed, started again, watched."""

    def __init__(
        self, root: Path, broker: Mosquitto, settings: BoardSettings, args: argparse.Namespace
    ) -> None:
        self.broker = broker
        self.fleet = Fleet(root, broker.port, root / "relay-data")  # plain-broker mode
        self.board_dir = root / "board"
        self.settings = settings
        self.args = args
        self.rng = random.Random(args.seed)
        self.kills: Counter[str] = Counter()
        self.statuses: dict[int, dict[str, Any]] = {}
        """The last status of each board process, by pid."""
        self.down: str | None = None
        """The kind killed and not started again yet."""
        self.started = time.monotonic()
        self._printed = self.started

    @property
    def board(self) -> asyncio.subprocess.Process | None:
        return self.fleet.procs.get(DEVICE)

    def progress(self) -> Progress:
        return Progress.read(self.board_dir / PROGRESS_FILE)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def fail(self, what: str) -> BenchError:
        return BenchError(f"{what}\n{self.fleet.logs()}\n--- broker ---\n{self.broker.log_tail()}")

    async def start(self) -> None:
        """The relay (the broker runs already), then the board."""
        await self.fleet.start_relay()
        self.started = self._printed = time.monotonic()
        await self.start_board()

    async def start_board(self) -> None:
        argv = [sys.executable, "-m", "tools.bench.outbox_board", str(self.board_dir)]
        self.fleet.procs[DEVICE] = await self.fleet.spawn(DEVICE, argv)

    def poll(self) -> dict[str, Any] | None:
        """Check that nothing died on its own; the board's latest status."""
        for kind, proc in (("board", self.board), ("relay", self.fleet.relay)):
            if kind != self.down and proc is not None and proc.returncode is not None:
                raise self.fail(f"the {kind} exited with {proc.returncode} on its own")
        if self.down != "broker" and not self.broker.running_now:
            raise self.fail("mosquitto exited on its own")
        return self.board_status()

    def board_status(self) -> dict[str, Any] | None:
        status = read_status(self.board_dir)
        if status is not None:
            self.statuses[status["pid"]] = status
        return status

    def report(self, status: dict[str, Any] | None) -> None:
        if time.monotonic() - self._printed < PROGRESS_S:
            return
        self._printed = time.monotonic()
        pending = "?" if status is None else status["pending"]
        kills = ", ".join(f"{self.kills[k]} {k}" for k in KINDS)
        print(f"  {self.elapsed():6.1f} s: {self.progress().next}/{self.settings.alerts} "
              f"added, {pending} in the outbox; kills: {kills}", flush=True)  # fmt: skip

    async def watch(self, seconds: float) -> None:
        """Wait ``seconds``, watching the processes and the board's progress."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(TICK_S, left))
            self.report(self.poll())

    async def kill(self, kind: str) -> None:
        self.kills[kind] += 1
        self.down = kind
        if kind == "broker":
            await asyncio.to_thread(self.broker.stop, kill=True)
            return
        proc = self.board if kind == "board" else self.fleet.relay
        assert proc is not None
        proc.kill()
        async with asyncio.timeout(WAIT):
            await proc.wait()

    async def restart(self, kind: str) -> None:
        if kind == "board":
            await self.start_board()
        elif kind == "broker":
            await asyncio.to_thread(self.broker.start)
        else:
            await self.fleet.start_relay()
        self.down = None

    async def chaos(self) -> int:
        """Kill and restart until every alert is added and enough rounds are done; the
        number of complete rounds."""
        args, total = self.args, self.settings.alerts
        rounds = 0
        order: list[str] = []
        added, added_at = self.progress().next, time.monotonic()
        while True:
            if not order:
                order = self.rng.sample(KINDS, len(KINDS))
            kind = order.pop()
            pause = self.rng.uniform(args.kill_min, args.kill_max)
            outage = self.rng.uniform(0.0, args.max_outage)
            await self.watch(pause)
            await self.kill(kind)
            await self.watch(outage)
            await self.restart(kind)
            print(f"  {self.elapsed():6.1f} s: SIGKILL {kind}, down {outage:.2f} s, back",
                  flush=True)  # fmt: skip
            rounds += not order
            now_added = self.progress().next
            if now_added >= total and rounds >= args.min_rounds:
                return rounds
            if now_added != added:
                added, added_at = now_added, time.monotonic()
            elif now_added < total and time.monotonic() - added_at > STALL_S:
                raise self.fail(f"the board added nothing for {STALL_S:g} s (at {added})")

    async def drain(self, limit_s: float) -> None:
        """Until the running board has added everything and its outbox is empty."""
        status: dict[str, Any] | None = None
        board = self.board
        assert board is not None
        try:
            async with asyncio.timeout(limit_s):
                while not (
                    status is not None and status["pid"] == board.pid
                    and status["next"] == self.settings.alerts and status["pending"] == 0
                ):  # fmt: skip
                    await asyncio.sleep(TICK_S)
                    status = self.poll()
                    self.report(status)
        except TimeoutError:
            left = "?" if status is None else status["pending"]
            raise self.fail(
                f"the board's outbox did not empty within {limit_s:g} s of the last kill: "
                f"{left} alert(s) still unacknowledged"
            ) from None

    async def stop(self) -> None:
        """SIGTERM the board, then the relay; each must exit 0."""
        board = self.board
        assert board is not None
        code = await terminate(board, WAIT)
        if code != 0:
            raise self.fail(f"the board exited with {code} on SIGTERM")
        self.board_status()  # its final one
        await self.fleet.stop_relay()

    async def close(self) -> None:
        """Whatever still runs: the board killed, the relay stopped (killed if it must)."""
        board, relay = self.board, self.fleet.relay
        if board is not None and board.returncode is None:
            board.kill()
            await board.wait()
        if relay is not None and relay.returncode is None:
            await terminate(relay, WAIT)

    def uplink_totals(self) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for status in self.statuses.values():
            totals.update(status["uplink"])
        return dict(totals)


def relay_config(port: int) -> str:
    """``relay.toml``: the lab broker as an external one, and the lab's fast timers."""
    return f"""
[broker]
url = "mqtt://127.0.0.1:{port}"
[mqtt]
client_id = "relay-outbox-bench"
keepalive = 5
backoff_min = 0.05
backoff_max = 0.5
connect_timeout = 3.0
publish_timeout = 5.0
misc_interval = 0.2
"""


def error_lines(path: Path) -> int:
    """ERROR lines in a log, but paho's: it logs the reset of a killed broker's connection
    as one (the session reports that as a lost connection and reconnects)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return sum(
        " ERROR " in line and " ERROR agent.signaling.mqtt.paho: " not in line
        for line in text.splitlines()
    )


async def read_store(db: Path) -> list[AlertRecord]:
    store = await Store.open(f"sqlite:///{db}")
    try:
        return await store.run(lambda: store.alerts(device=DEVICE, limit=ALL_ROWS))
    finally:
        await store.close()


async def run(root: Path, args: argparse.Namespace, load: float) -> dict[str, Any]:
    with Mosquitto.running(root=root / "broker") as broker:
        settings = BoardSettings(
            device=DEVICE,
            port=broker.port,
            alerts=args.alerts,
            rate=args.rate,
            run=f"s{args.seed}-{secrets.token_hex(4)}",
            t0_ms=time.time_ns() // 1_000_000,
            capacity=max(DEFAULT_CAPACITY, args.alerts),
            ack_timeout=args.ack_timeout,
        )
        lab = Lab(root, broker, settings, args)
        lab.board_dir.mkdir()
        write_atomic(lab.board_dir / SETTINGS_FILE, settings.to_json(), 0o644)
        (root / "relay.toml").write_text(relay_config(broker.port))
        try:
            await lab.start()
            rounds = await lab.chaos()
            added_s = lab.elapsed()
            print(f"  {added_s:6.1f} s: every alert added; no more kills, draining", flush=True)
            await lab.drain(args.drain_timeout)
            drained_s = lab.elapsed()
            await lab.stop()
        finally:
            await lab.close()
    sent = lab.progress().next
    tally = Tally.of(await read_store(lab.fleet.db_path), settings, sent)
    dropped = lab.progress().dropped
    print(
        f"outbox: {sent} sent, {tally.stored} stored at the relay, {tally.duplicates} "
        f"duplicates, {tally.lost} lost; outbox dropped {dropped}; kills: "
        + ", ".join(f"{lab.kills[k]} {k}" for k in KINDS)
        + f"; {drained_s:.1f} s",
        flush=True,
    )
    targets = {"lost": tally.lost == 0, "duplicates": tally.duplicates == 0}
    for name, ok in targets.items():
        print(f"{'PASS' if ok else 'MISS'} {name} = {getattr(tally, name)} (target 0)")
    return {
        "benchmark": "outbox",
        "machine": machine(),
        "mosquitto": mosquitto_version(),
        "load_avg_1m_at_start": round(load, 2),
        "alerts_requested": args.alerts,
        "rate": args.rate,
        "seed": args.seed,
        "sent": sent,
        "stored_at_relay": tally.stored,
        "duplicates": tally.duplicates,
        "lost": tally.lost,
        "altered": tally.altered,
        "unexpected": tally.unexpected,
        "overflow_alerts": tally.overflow_alerts,
        "outbox_dropped": dropped,
        "outbox_capacity": settings.capacity,
        "kills": {k: lab.kills[k] for k in KINDS},
        "rounds": rounds,
        "ack_timeout_s": args.ack_timeout,
        "uplink": lab.uplink_totals(),
        "seconds": round(drained_s, 1),
        "add_seconds": round(added_s, 1),
        "drain_seconds": round(drained_s - added_s, 1),
        "alerts_per_s": round(sent / drained_s, 1),
        "log_errors": {
            "relay": error_lines(root / "relay.log"),
            "board": error_lines(root / f"{DEVICE}.log"),
        },
        "targets": {
            name: {"target": 0, "value": getattr(tally, name), "pass": ok}
            for name, ok in targets.items()
        },
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    load = os.getloadavg()[0]
    print(f"machine: {machine()}, mosquitto {mosquitto_version()}, load average {load:.2f} "
          "(other work on the machine slows the run down)", flush=True)  # fmt: skip
    if args.dir is None:
        with tempfile.TemporaryDirectory(prefix="edge-bench-outbox-") as tmp:
            return await run(Path(tmp), args, load)
    if args.dir.exists() and any(args.dir.iterdir()):
        raise BenchError(f"--dir {args.dir} is not empty (a board there would resume)")
    args.dir.mkdir(parents=True, exist_ok=True)
    return await run(args.dir, args, load)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--alerts", type=positive_int, default=10_000, help="alerts the board raises")
    add("--rate", type=positive_float, default=50.0, help="alerts added per second")
    add("--seed", type=int, default=1, help="seed of the kill schedule")
    add("--kill-min", type=positive_float, default=1.0,
        help="shortest pause in seconds before the next kill")  # fmt: skip
    add("--kill-max", type=positive_float, default=4.0,
        help="longest pause in seconds before the next kill")  # fmt: skip
    add("--max-outage", type=positive_float, default=2.0,
        help="longest time in seconds a killed process stays down")  # fmt: skip
    add("--min-rounds", type=positive_int, default=1,
        help="rounds of kills (each kind once) at least, alerts added or not")  # fmt: skip
    add("--ack-timeout", type=positive_float, default=3.0,
        help="the uplink's ack timeout in seconds (the agent's default: 30)")  # fmt: skip
    add("--drain-timeout", type=positive_float, default=120.0,
        help="seconds after the last kill for the board's outbox to empty")  # fmt: skip
    add("--dir", type=Path, default=None,
        help="work dir (new or empty), kept (default: a temporary directory)")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.kill_min > args.kill_max:
        parser.error("--kill-min is above --kill-max")
    try:
        result = asyncio.run(main_async(args))
    except (BenchError, BrokerError, FleetError) as exc:
        sys.exit(f"outbox bench: {exc}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
