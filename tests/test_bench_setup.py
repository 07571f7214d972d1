"""The call setup benchmark runs end to end (two calls per series) and prints its figures.

Only the shape of the result is checked: every series is there with positive
percentiles in order, and each call's steps come one after the other. How fast the
calls are is the benchmark's business, not a test's.
"""

from __future__ import annotations

import json
import sys

import pytest

from tools.bench import setup as bench

SERIES = ("call_setup_ms", "call_setup_ms_no_trickle", "aiortc_call_setup_ms", "call_setup_ms_turn")
STEPS = ("signaled", "ice_connected", "keyed", "first_audio")


def test_setup_benchmark_prints_every_series(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["setup", "--calls", "2", "--turn-calls", "2"])
    bench.main()
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert any(line.startswith("agent<->agent, trickle: p50") for line in lines[:-1])
    assert result["benchmark"] == "setup"
    assert result["calls"] == 2 and result["turn_calls"] == 2
    for name in SERIES:
        figures = result[name]
        assert 0 < figures["p50"] <= figures["p95"], name
    assert result["ratio"] == pytest.approx(
        result["call_setup_ms"]["p50"] / result["aiortc_call_setup_ms"]["p50"], abs=0.01
    )
    for name in ("breakdown_ms", "breakdown_ms_no_trickle", "breakdown_ms_turn"):
        steps = [result[name][step] for step in STEPS]
        assert steps[0] >= 0 and steps == sorted(steps), name
        assert steps[-1] == result[name.replace("breakdown_ms", "call_setup_ms")]["p50"]


def test_calls_must_be_positive() -> None:
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--calls", "0"])
