"""Dashboard benchmark: the devices page in headless Chromium with 10,000 devices.

Starts the relay as a real process (``tools.lab.fleet``: its TLS mosquitto, its HTTPS
API, an offline grace of 0 so that offline is reported at once) and gives it ``--devices``
simulated devices: each one's retained presence (``online``, board, version), published
QoS 1 on its own ``dev/{id}/presence`` topic, as an agent's MQTT session does, from one
connection on the relay's listener (``tools/bench/run relay`` measures 10,000 device
connections; here the page is what is measured). Once the relay's store has them all
online, an operator logs in in Chromium (``tools.lab.chromium``) and:

- ``first_render_ms``: ``--loads`` loads of ``/devices``, each from navigation start to
  the page's ``devices-rendered`` performance mark (the list arrived and its first
  screenful is painted); p50 and each load. Beside it, from the page's other marks:
  ``data_ms`` (the list arrived: session, the API's reply, JSON parsed) and
  ``full_list_ms`` (every row in the DOM and painted). Baseline: the raw
  ``fetch('/api/v1/devices')`` + JSON parse of the same list in the same page
  (``fetch_devices_ms``), i.e. what getting the data costs without the page;
- ``presence_delay_ms``: with the page open, ``--changes`` presence changes, one device
  at a time going offline or back online (a presence message published, as a will
  or an agent's reconnection does), each timed from just before its publish to the
  moment the page changed that device's row (a MutationObserver on the row's
  ``data-state`` records ``performance.timeOrigin + performance.now()``; same machine,
  same wall clock as this process); p50/p95. Baseline: the same changes as they
  arrive on this process's own ``/api/v1/events`` stream (``sse_delay_ms``): the
  relay's presence processing plus the event stream, without the page.

Targets: first render <= 1,000 ms (p50), presence delay <= 500 ms (p95). The last line
printed is a JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import shutil
import ssl
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from playwright.async_api import Page

from agent.signaling import topics
from agent.signaling.topics import Kind
from cloud_relay.sessions import COOKIE
from cloud_relay.store import Store
from tools.bench.args import machine, positive_int
from tools.bench.relay import raise_nofile, wait_online
from tools.lab.chromium import CHROMIUM, context, launch
from tools.lab.fleet import RELAY_CMD, Fleet, fleet
from tools.lab.mqtt_swarm import presence_payload
from tools.lab.sse import sse_events

MARKS = {
    "devices-data": "data_ms",
    "devices-rendered": "first_render_ms",
    "devices-complete": "full_list_ms",
}
"""The devices page's performance marks, and the figures they give."""
TARGETS = {"first_render_ms": 1000.0, "presence_delay_p95_ms": 500.0}
USER, PASSWORD = "bench", "dashboard bench password"
PUBLISH_BATCH = 200
STRIDE = 97
WAIT_S = 60.0
"""Upper bound of the store seeing every device online, one page load, one change."""
WATCH_ROWS = """() => {
  window.benchSeen = [];
  new MutationObserver((records) => {
    const at = performance.timeOrigin + performance.now();
    for (const r of records) {
      window.benchSeen.push([r.target.dataset.id, r.target.dataset.state, at]);
    }
  }).observe(document.querySelector("#devices"), { attributes: true, subtree: true,
    attributeFilter: ["data-state"] });
}"""
FETCH_DEVICES = """async () => {
  const t0 = performance.now();
  const reply = await (await fetch("/api/v1/devices")).json();
  return [performance.now() - t0, reply.devices.length];
}"""


class BenchError(RuntimeError):
    """Something the benchmark waited for did not happen; the text says what."""


def now_ms() -> float:
    return time.time() * 1000


def device_ids(n: int) -> list[str]:
    return [f"sim-{k:05d}" for k in range(n)]


async def publish_presence(f: Fleet, devices: Sequence[str], state: str) -> None:
    assert f.client is not None
    payload = presence_payload(state, board="sim", version="bench")
    for start in range(0, len(devices), PUBLISH_BATCH):
        await asyncio.gather(*(
            f.client.publish(topics.device_topic(d, Kind.PRESENCE), payload, retain=True)
            for d in devices[start : start + PUBLISH_BATCH]
        ))  # fmt: skip


async def add_user(f: Fleet) -> None:
    secret = f.root / "bench-password"
    secret.write_text(PASSWORD + "\n")
    proc = await asyncio.create_subprocess_exec(
        *RELAY_CMD, "user", "add", USER, "--password-file", str(secret),
        "--config", str(f.root / "relay.toml"), "--data-dir", str(f.data_dir),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise BenchError(f"user add failed: {err.decode()}")


class EventClock:
    """This process's own ``/api/v1/events`` stream: when each presence change arrived."""

    def __init__(self, origin: str, cookie: str, ca: Path) -> None:
        self._origin, self._cookie, self._ca = origin, cookie, ca
        self.seen: dict[tuple[str, str], float] = {}
        self.connected = asyncio.Event()
        self._task = asyncio.create_task(self._read(), name="bench-events")

    async def _read(self) -> None:
        ctx = ssl.create_default_context(cafile=str(self._ca))
        timeout = aiohttp.ClientTimeout(total=None, sock_read=WAIT_S)
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http,
            http.get(f"{self._origin}/api/v1/events", timeout=timeout,
                     headers={"Cookie": f"{COOKIE}={self._cookie}"}) as response,
        ):  # fmt: skip
            async for kind, data in sse_events(response, self.connected):
                if kind == "presence":
                    self.seen.setdefault((data["device"], data["state"]), now_ms())

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def events(origin: str, cookie: str, ca: Path) -> AsyncIterator[EventClock]:
    clock = EventClock(origin, cookie, ca)
    try:
        async with asyncio.timeout(WAIT_S):
            await clock.connected.wait()
        yield clock
    finally:
        await clock.close()


async def load_page(page: Page, origin: str, devices: int) -> dict[str, float]:
    """One load of the devices page: its ``MARKS`` in ms from navigation start."""
    await page.goto(f"{origin}/devices")
    await page.wait_for_function(
        "() => performance.getEntriesByName('devices-complete').length > 0", timeout=WAIT_S * 1000
    )
    marks, rows = await page.evaluate(
        "(names) => [names.map((n) => performance.getEntriesByName(n)[0].startTime),"
        " document.querySelectorAll('#devices [data-id]').length]",
        list(MARKS),
    )
    if rows < devices:
        raise BenchError(f"the page rendered {rows} rows of {devices}")
    return {figure: float(ms) for figure, ms in zip(MARKS.values(), marks, strict=True)}


async def presence_changes(
    page: Page, f: Fleet, clock: EventClock, ids: Sequence[str], changes: int
) -> tuple[list[float], list[float]]:
    """Delays (ms) of ``changes`` changes: to the page's row, to this process's stream."""
    await page.evaluate(WATCH_ROWS)
    stride = STRIDE if math.gcd(STRIDE, len(ids)) == 1 else 1
    page_ms: list[float] = []
    sse_ms: list[float] = []
    for n in range(changes):
        # Devices spread over the list (stride coprime with its length, so one pass visits
        # each once): the first pass takes them offline, the next brings them back.
        device = ids[(n * stride) % len(ids)]
        state = "offline" if (n // len(ids)) % 2 == 0 else "online"
        sent = now_ms()
        await publish_presence(f, [device], state)
        seen: Any = None
        try:
            async with asyncio.timeout(WAIT_S):
                while seen is None or (device, state) not in clock.seen:
                    await asyncio.sleep(0.01)
                    seen = await page.evaluate(
                        "([d, s]) => (window.benchSeen.find((e) => e[0] === d && e[1] === s)"
                        " || [])[2] ?? null",
                        [device, state],
                    )
        except TimeoutError:
            raise BenchError(f"{device} {state}: not seen within {WAIT_S:g} s") from None
        page_ms.append(float(seen) - sent)
        sse_ms.append(clock.seen[(device, state)] - sent)
        await page.evaluate("() => { window.benchSeen.length = 0; }")
    return page_ms, sse_ms


def pct(values: Sequence[float], q: float) -> float:
    return round(float(np.percentile(np.array(values), q)), 1)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile()
    root = Path(tempfile.mkdtemp(prefix="edge-bench-dashboard-"))
    ids = device_ids(args.devices)
    print(f"machine: {machine()}; {args.devices} devices, data in {root}", flush=True)
    async with fleet(root, devices=(), client_id="dash-bench", offline_grace_s=0.0) as f:
        await add_user(f)
        started = time.monotonic()
        await publish_presence(f, ids, "online")
        store = await Store.open(f"sqlite:///{f.db_path}")
        try:
            online = await wait_online(store, len(ids), WAIT_S)
        finally:
            await store.close()
        if online < len(ids):
            raise BenchError(f"the relay has {online} of {len(ids)} devices online")
        print(f"{online} devices online after {time.monotonic() - started:.1f} s", flush=True)
        origin = f"https://127.0.0.1:{f.pairing_port}"
        async with launch(f.pki_dir / "https.pem") as browser:
            version = browser.version
            ctx = await context(browser)
            page = await ctx.new_page()
            await page.goto(f"{origin}/login")
            await page.fill("input[name=name]", USER)
            await page.fill("input[name=password]", PASSWORD)
            await page.click("button")
            await page.wait_for_url(f"{origin}/devices")
            loads: dict[str, list[float]] = {figure: [] for figure in MARKS.values()}
            fetches = []
            for _ in range(args.loads):
                for figure, ms in (await load_page(page, origin, len(ids))).items():
                    loads[figure].append(ms)
                fetch_ms, rows = await page.evaluate(FETCH_DEVICES)
                fetches.append(float(fetch_ms))
            p50 = {figure: pct(values, 50) for figure, values in loads.items()}
            print(f"devices page p50: {p50}; fetch /api/v1/devices p50 {pct(fetches, 50)} ms",
                  flush=True)  # fmt: skip
            cookie = next(c["value"] for c in await ctx.cookies() if c["name"] == COOKIE)
            async with events(origin, cookie, f.pki_dir / "ca.pem") as clock:
                page_ms, sse_ms = await presence_changes(page, f, clock, ids, args.changes)
    shutil.rmtree(root, ignore_errors=True)
    out: dict[str, Any] = {
        "benchmark": "dashboard",
        "machine": machine(),
        "chromium": version,
        "devices": len(ids),
        "rows_rendered": rows,
        "loads": args.loads,
        **p50,
        "first_render_each_ms": [round(r, 1) for r in loads["first_render_ms"]],
        "fetch_devices_ms": pct(fetches, 50),
        "changes": len(page_ms),
        "presence_delay_p50_ms": pct(page_ms, 50),
        "presence_delay_p95_ms": pct(page_ms, 95),
        "presence_delay_max_ms": round(max(page_ms), 1),
        "sse_delay_p50_ms": pct(sse_ms, 50),
        "sse_delay_p95_ms": pct(sse_ms, 95),
    }
    out["targets"] = {
        name: {"target": target, "value": out[name], "pass": out[name] <= target}
        for name, target in TARGETS.items()
    }
    for name, t in out["targets"].items():
        print(
            f"{'PASS' if t['pass'] else 'MISS'} {name} = {t['value']} (target <= {t['target']:g})"
        )
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=positive_int, default=10_000,
                        help="simulated devices")  # fmt: skip
    parser.add_argument("--loads", type=positive_int, default=7,
                        help="loads of the devices page timed")  # fmt: skip
    parser.add_argument("--changes", type=positive_int, default=100,
                        help="presence changes timed")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not Path(CHROMIUM).exists():
        sys.exit(f"no Chromium at {CHROMIUM} (Debian package chromium; tools/setup-env)")
    print(json.dumps(asyncio.run(main_async(args))), flush=True)


if __name__ == "__main__":
    main()
