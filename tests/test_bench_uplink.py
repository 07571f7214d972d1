"""The uplink benchmark, short: a paired board behind the counting proxy hears a household
and a smoke alarm, then streams its microphone in a call through the counting relay.

Checked: what must happen (the alarm went up in the window, the relay stored and
acknowledged it; the stream is plain 32 kbit/s Opus, about 50 packets a second), that
the byte counts add up, and that the reduction is computed from the figures printed.
Whether the reduction meets the target is the benchmark's business, not a test's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.bench import uplink as bench


def test_uplink_benchmark_counts_both_modes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bench.main(["--seconds", "36", "--call-seconds", "8", "--dir", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert any(line.startswith("alert-only: ") for line in lines[:-1])
    assert any(line.startswith("streaming: ") for line in lines[:-1])
    assert result["benchmark"] == "uplink" and "cores" in result["machine"]

    alert_only = result["alert_only"]
    # The smoke alarm went up in the window; the relay stored it and acknowledged it.
    assert alert_only["published"]["alert"]["count"] >= 1
    assert alert_only["alerts_stored"].get("smoke_alarm", 0) >= 1
    assert alert_only["received"]["alert/ack"]["count"] >= 1
    up = alert_only["upstream"]
    assert up["payload_bytes"] > 0 and up["packets"] > 0
    assert up["ip_bytes"] == up["payload_bytes"] + up["header_bytes"]
    assert sum(up["bytes"].values()) == up["ip_bytes"]
    assert up["publish_records"] >= alert_only["published"]["alert"]["count"]
    halves = alert_only["quiet"]["upstream_ip_bytes"] + alert_only["eventful"]["upstream_ip_bytes"]
    assert halves == up["ip_bytes"]
    assert alert_only["bytes_per_alert"] > 0
    # The TLS handshake with the board's certificate came before the window.
    assert alert_only["connect"]["upstream"]["payload_bytes"] > 1000

    streaming = result["streaming"]
    assert streaming["opus_bitrate"] == 32_000 and streaming["red"] is False
    sent = streaming["upstream"]
    assert sent["ip_bytes"] == sent["payload_bytes"] + 28 * sent["packets"]
    assert 20.0 <= streaming["kbit_s"] <= 80.0
    assert 45.0 <= sent["packets"] / streaming["window_s"] <= 60.0  # 20 ms frames, RTCP, STUN

    alert, stream = result["alert_only_bytes_per_hour"], result["streaming_bytes_per_hour"]
    assert 0 < alert < stream
    # The headline hour: staying online plus the stated alerts at the measured cost of one.
    hour = alert_only["idle_bytes_per_hour"]
    hour += result["alerts_per_hour"] * alert_only["bytes_per_alert"]
    assert alert == pytest.approx(hour, rel=0.01)
    assert result["window_bytes_per_hour"] > 0
    assert result["reduction_pct"] == pytest.approx(100 * (1 - alert / stream), abs=0.001)
    assert result["target_pct"] == bench.TARGET_PCT
    assert result["meets_target"] is (result["reduction_pct"] >= bench.TARGET_PCT)
    assert result["budget_bytes_per_hour"] == round(stream * (1 - bench.TARGET_PCT / 100))
    # Configs and logs are kept where --dir says.
    assert (tmp_path / "relay.log").exists() and (tmp_path / "door-a.log").exists()
    assert (tmp_path / "call-a.log").exists()


def test_options_are_checked() -> None:
    for bad in (["--seconds", "20"], ["--call-seconds", "0"], ["--seconds", "-5"]):
        with pytest.raises(SystemExit):
            bench.build_parser().parse_args(bad)
