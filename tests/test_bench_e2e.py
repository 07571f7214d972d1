"""The end-to-end call setup benchmark runs (two calls) and prints its figures.

Only the shape of the result is checked: every figure is there, finite and positive,
percentiles in order, the ratio and the target verdict consistent with the figures, and
each call's control-plane steps in the order they happen. How fast the calls are is the
benchmark's business, not a test's.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tools.bench import e2e as bench


def test_e2e_benchmark_prints_its_figures(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(sys, "argv", ["e2e", "--calls", "2", "--dir", str(tmp_path)])
    bench.main()
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert any(line.startswith("command to audio at both ends") for line in lines[:-1])
    assert result["benchmark"] == "e2e"
    assert result["calls"] == 2
    assert "cores" in result["machine"]
    for name in ("command_to_audio_ms", "direct_call_setup_ms"):
        figures = result[name]
        assert math.isfinite(figures["p95"]), name
        assert 0 < figures["p50"] <= figures["p95"], name
    assert result["ratio"] == pytest.approx(
        result["command_to_audio_ms"]["p50"] / result["direct_call_setup_ms"]["p50"], abs=0.01
    )
    assert result["target_p50_ms"] == bench.TARGET_P50_MS
    assert result["meets_target"] is (result["command_to_audio_ms"]["p50"] <= bench.TARGET_P50_MS)
    steps = result["breakdown_ms"]
    assert set(steps) == {*bench.STEPS, "audio_caller", "audio_callee"}
    assert all(math.isfinite(v) and v > 0 for v in steps.values()), steps
    order = [steps[s] for s in ("invite_out", "invite_in", "accept_out", "accept_in")]
    assert order == sorted(order), steps
    assert math.isfinite(result["telemetry_lag_ms"])
    # The fleet's logs are kept where --dir says.
    assert (tmp_path / "door-a.log").exists() and (tmp_path / "relay.log").exists()


def test_calls_must_be_positive() -> None:
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--calls", "0"])
