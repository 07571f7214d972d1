"""The front end's benchmark, short: a few clips from a fixed seed, every figure there.

What matters is checked, not how fast: the echo is cancelled far below the fixed-delay
baseline's and the delay found, double talk leaves the near end better than the
unprocessed microphone and than the canceller's filter alone, noise suppression does not
make noisy speech worse and WebRTC's suppressor gains more than SpeexDSP's on the same
clips.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.bench import frontend as bench


def test_frontend_benchmark_prints_sane_figures(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bench.main(
        ["--seed", "5", "--echo-clips", "2", "--doubletalk-clips", "1", "--noise-clips", "1",
         "--snrs", "5", "--dir", str(tmp_path)]
    )  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("frontend: ")
    result = json.loads(lines[-1])
    assert result["clips"] == {"echo": 2, "doubletalk": 1, "noise": 2}
    assert result["erle_db_min"] >= 25 and result["erle_db"] > result["erle_db_fixed_delay"]
    assert 0 < result["convergence_s"] <= result["convergence_s_max"] < 6
    assert result["delay_error_ms_max"] < 2
    assert result["pesq_wb_near_doubletalk"] > result["pesq_wb_near_doubletalk_unprocessed"] + 0.5
    assert (
        result["pesq_wb_near_doubletalk_unprocessed"]
        < result["pesq_wb_near_doubletalk_filter_only"]
        < result["pesq_wb_near_doubletalk"]
    )
    assert (
        result["pesq_wb_near_doubletalk_unprocessed"]
        < result["pesq_wb_near_doubletalk_first_call"]
        <= result["pesq_wb_near_doubletalk"] + 0.2
    )
    assert result["denoiser"] == "webrtc"
    assert result["pesq_gain_ns"] > result["pesq_gain_ns_speex"] > 0
    # Clean speech: WebRTC's suppressor is bypassed (a quiet room), SpeexDSP's is not.
    assert result["pesq_wb_clean_ns_webrtc"] >= result["pesq_wb_clean"] - 0.1
    assert result["pesq_wb_clean_ns_speex"] > 3.5
    assert result["cpu_per_audio_s"] > 0 and result["opus_encode_cpu_per_audio_s"] > 0
    assert result["machine"] and result["rate"] == 16_000
