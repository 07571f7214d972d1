"""The outbox benchmark, short: a few hundred alerts through SIGKILLs of every kind, and
every alert stored once; and the bench's count of what the store holds.

The run is real (mosquitto, ``edge-intercom-relay serve``, the board process on the
agent's outbox and uplink); only its verdicts and the shape of the result are checked,
never how long it took.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.edge.alerts import OUTBOX_OVERFLOW, Alert, Severity, new_alert_id
from cloud_relay.store import Store
from tools.bench import outbox as bench
from tools.bench.outbox_board import BoardSettings, Progress, alert_for

ALERTS = 300


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # ended meanwhile
        if text in argv:
            found.append(argv)
    return found


def test_outbox_benchmark_loses_and_duplicates_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bench.main(
        [
            "--alerts", str(ALERTS), "--rate", "60", "--kill-min", "0.2", "--kill-max", "0.6",
            "--max-outage", "0.5", "--min-rounds", "2", "--ack-timeout", "1", "--seed", "3",
            "--drain-timeout", "60", "--dir", str(tmp_path),
        ]
    )  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert any(line.startswith("outbox: ") for line in lines[:-1])
    assert result["benchmark"] == "outbox" and "cores" in result["machine"]
    assert result["sent"] == result["alerts_requested"] == ALERTS
    assert result["stored_at_relay"] == ALERTS
    assert result["lost"] == result["duplicates"] == 0
    assert result["altered"] == result["unexpected"] == result["overflow_alerts"] == 0
    assert result["outbox_dropped"] == 0
    assert result["rounds"] >= 2
    assert all(result["kills"][kind] >= 2 for kind in bench.KINDS), result["kills"]
    assert result["uplink"]["sent"] >= ALERTS - result["uplink"]["resent"]
    assert result["targets"]["lost"]["pass"] and result["targets"]["duplicates"]["pass"]
    assert result["log_errors"] == {"relay": 0, "board": 0}
    # Nothing it started is left: every process of the run names the work dir.
    assert processes_mentioning(str(tmp_path)) == []


async def test_tally_counts_what_the_store_holds(tmp_path: Path) -> None:
    """Alerts 0-5 sent: 2 again under a new id, 3 never stored, 4 altered; and others."""
    settings = BoardSettings(
        device=bench.DEVICE, port=1883, alerts=6, rate=1.0, run="t", t0_ms=1_760_000_000_000,
        capacity=10, ack_timeout=1.0,
    )  # fmt: skip
    sent = [alert_for(settings.run, seq, settings.t0_ms) for seq in range(6)]
    overflow = dataclasses.replace(sent[0], id=new_alert_id(), kind=OUTBOX_OVERFLOW)
    foreign = Alert(new_alert_id(), "alarm", "smoke", Severity.CRITICAL, 1, 2, 1.0, 0.0, 3)
    stored = [
        *(sent[seq] for seq in (0, 1, 2, 5)),
        dataclasses.replace(sent[2], id=new_alert_id()),
        dataclasses.replace(sent[4], level=-3.0),
        overflow,
        foreign,
    ]
    db = tmp_path / "relay.db"
    store = await Store.open(f"sqlite:///{db}")
    try:
        for alert in stored:
            await store.write(store.record_alert, bench.DEVICE, alert, datetime.now(UTC))
    finally:
        await store.close()
    tally = bench.Tally.of(await bench.read_store(db), settings, sent=6)
    assert tally == bench.Tally(
        stored=5, duplicates=1, lost=1, altered=1, unexpected=1, overflow_alerts=1
    )


def test_progress_survives_a_kill_before_its_first_write(tmp_path: Path) -> None:
    path = tmp_path / "progress"
    assert Progress.read(path) == Progress()
    path.touch()
    assert Progress.read(path) == Progress()
    path.write_bytes(Progress(42, 3).encode())
    assert Progress.read(path) == Progress(42, 3)


def test_options_are_checked() -> None:
    for bad in (["--alerts", "0"], ["--rate", "-1"], ["--min-rounds", "0"]):
        with pytest.raises(SystemExit):
            bench.build_parser().parse_args(bad)
    with pytest.raises(SystemExit):
        bench.main(["--kill-min", "5", "--kill-max", "1"])
