"""Periodic telemetry end to end: two real agents (``edge-intercom-agent run`` playing tones)
and the real relay (``tools.lab.fleet``). Their ``levels`` records, with the microphone's
A-weighted level, and the ``call-stats`` records of a call while it is up reach the relay's
store and show in ``GET /api/v1/devices/{id}``."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from test_dashboard_api import browser
from test_edge_clip_e2e import relay_cli

from agent.edge.level import a_weighting, frequency_response
from cloud_relay.store import Store, TelemetryRecord
from tools.lab.fleet import WAIT, Fleet, fleet

A, B = "door-a", "door-b"
TONE_HZ = {A: 700.0, B: 1100.0}
FAST = "[telemetry]\ninterval_s = 0.5\ncall_interval_s = 0.3\n"


def tone_dbfs_a(hz: float, amplitude: float = 0.5) -> float:
    """The A-weighted level of ``ToneSource(hz)``: a sine's RMS, weighted at ``hz``."""
    b, a = a_weighting()
    weight = abs(frequency_response(b, a, np.array([hz]), 48_000)[0])
    return 20 * math.log10(amplitude / math.sqrt(2) * weight)


async def until_stored(
    f: Fleet, device: str, check: Callable[[list[TelemetryRecord]], bool], what: str
) -> list[TelemetryRecord]:
    store = await Store.open(f"sqlite:///{f.db_path}")
    records: list[TelemetryRecord] = []
    try:
        async with asyncio.timeout(WAIT):
            while not check(records := await store.run(lambda: store.telemetry(device))):
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise f.fail(f"timed out waiting for {what}; stored {records[-5:]}") from None
    finally:
        await store.close()
    return records


def call_stats(records: list[TelemetryRecord], call: str) -> list[TelemetryRecord]:
    return [r for r in records if r.event == "call-stats" and r.record.get("call_id") == call]


async def test_levels_and_call_stats_reach_the_relay_and_its_api(tmp_path: Path) -> None:
    async with fleet(tmp_path, devices=(A, B), client_id="telemetry-test") as f:
        await f.agent(A, source=f"tone:{TONE_HZ[A]:g}", sink="null", extra=FAST)
        await f.agent(B, source=f"tone:{TONE_HZ[B]:g}", sink="null", auto_answer=[A], extra=FAST)
        await f.until_online(A, B)
        levels = await until_stored(
            f, A, lambda rs: sum(r.event == "levels" for r in rs) >= 2, "two levels records"
        )
        assert not [r for r in levels if r.event == "call-stats"]  # no call, no call stats

        code, reply = await f.cli(A, "call", f"peer={B}")
        assert (code, reply["ok"]) == (0, True), reply
        call = reply["call_id"]
        for device in (A, B):
            records = await until_stored(
                f, device,
                lambda rs: any(r.record["media"]["packets_received"] >= 25
                               for r in call_stats(rs, call)),
                f"{device}'s call stats with half a second of audio",
            )  # fmt: skip
            stats = call_stats(records, call)[-1].record["media"]
            assert stats["loss_fraction"] < 0.05 and stats["jitter_ms"] >= 0
            assert {"rtt_ms", "concealed", "packets_sent", "packets_lost"} <= set(stats)
        # The relay keeps each side's latest stats on the open call: live calls show quality.
        store = await Store.open(f"sqlite:///{f.db_path}")
        try:
            async with asyncio.timeout(WAIT):
                while True:
                    open_calls = await store.run(lambda: store.recent_calls(open_only=True))
                    quality = next((c.quality for c in open_calls if c.id == call), None) or {}
                    if set(quality) == {A, B}:
                        break
                    await asyncio.sleep(0.1)
        finally:
            await store.close()
        code, reply = await f.cli(A, "hangup")
        assert (code, reply["ok"]) == (0, True), reply
        ended = await until_stored(
            f, A, lambda rs: any(r.event == "call-ended" for r in rs), "the call's end"
        )
        after = ended[[r.event for r in ended].index("call-ended") + 1 :]
        # Stats stop with the call (one may have been on its way as it ended).
        assert len(call_stats(after, call)) <= 1

        made = json.loads(await relay_cli(f, "token", "new", "--name", "charts", "--json"))
        async with browser(f) as script:
            script.bearer = made["token"]
            status, detail, _ = await script.call("GET", f"/api/v1/devices/{A}")
        assert status == 200, detail
        last = detail["levels"]
        assert last["event"] == "levels" and last["interval_s"] > 0
        assert abs(last["sound_leq_dbfs"] - tone_dbfs_a(TONE_HZ[A])) < 1.0, last
        assert last["sound_max_dbfs"] >= last["sound_leq_dbfs"] - 0.5
        assert 0 < last["cpu_percent"] < 400 and last["rss_kb"] > 10_000
        assert last["outbox_pending"] == 0 and last["uptime_s"] >= 0
        assert last["telemetry_failed"] == 0
        charted = [t for t in detail["telemetry"] if t["event"] == "call-stats"]
        assert charted and {t["record"]["call_id"] for t in charted} == {call}

        for device in (A, B):
            await f.stop_agent(device)
