"""The dashboard benchmark end to end with a few devices: only the shape of its result
(every device rendered, every change seen, figures present and ordered); how fast the
page is, is the benchmark's business."""

from __future__ import annotations

import json

import pytest

from tools.bench import dashboard as bench


def test_dashboard_benchmark_sees_every_change(capsys: pytest.CaptureFixture[str]) -> None:
    bench.main(["--devices", "60", "--loads", "2", "--changes", "8"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["benchmark"] == "dashboard"
    assert result["devices"] == result["rows_rendered"] == 60
    assert result["changes"] == 8 and len(result["first_render_each_ms"]) == 2
    assert result["fetch_devices_ms"] > 0
    assert 0 < result["data_ms"] <= result["first_render_ms"] <= result["full_list_ms"]
    for name in ("presence_delay", "sse_delay"):
        assert 0 < result[f"{name}_p50_ms"] <= result[f"{name}_p95_ms"], name
    assert result["presence_delay_p95_ms"] <= result["presence_delay_max_ms"]
    assert set(result["targets"]) == {"first_render_ms", "presence_delay_p95_ms"}
    assert all(isinstance(t["pass"], bool) for t in result["targets"].values())


def test_options_must_be_positive() -> None:
    for bad in (["--devices", "0"], ["--loads", "0"], ["--changes", "-1"]):
        with pytest.raises(SystemExit):
            bench.build_parser().parse_args(bad)
