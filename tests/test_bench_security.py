"""The security benchmark, short: every attack class runs for real, and none gets through.

The bench itself judges each attempt where it matters (a subscriber that must receive
nothing, the relay's drop log, HTTP statuses, coturn's error codes, libsrtp); this checks
the verdicts and the shape of the result. How fast pairing or revocation is, is the
benchmark's business, not a test's: only that the figures are there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tools.bench import security as bench

CLASSES = {
    "unpaired_connect", "cross_device_topics", "relay_topics",
    "forged_from", "tampered_sdp", "bad_signature", "unsigned", "replayed", "stale",
    "token_reuse", "token_expired", "token_guessed", "pairing_oversize", "csr_claims_relay",
    "relay_device_id", "wrong_fingerprint", "revoked_device",
    "turn_expired", "turn_forged", "srtp_replay", "srtp_tamper",
}  # fmt: skip


def test_security_benchmark_rejects_every_attack(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bench.main(
        [
            "--topic-attempts", "60", "--batch", "30", "--guesses", "40",
            "--signaling-attempts", "5", "--pairing-attempts", "3", "--pair-runs", "2",
            "--srtp-packets", "10", "--seed", "7", "--dir", str(tmp_path),
        ]
    )  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert any(line.startswith("security: ") for line in lines[:-1])
    assert result["benchmark"] == "security" and "cores" in result["machine"]
    assert result["errors"] == []
    classes = result["classes"]
    assert set(classes) == CLASSES
    for name, tally in classes.items():
        assert tally["attempts"] > 0, name
        assert tally["rejected"] == tally["attempts"], (name, tally)
        assert tally["control_ok"] is True, (name, tally)
    assert classes["cross_device_topics"]["attempts"] == 60
    assert 0 < classes["cross_device_topics"]["subscribes"] < 60
    assert classes["token_guessed"]["attempts"] == 40
    assert classes["token_guessed"]["logged"] == 40
    assert set(classes["token_guessed"]["statuses"]) <= {"403", "429"}
    assert classes["token_guessed"]["locked_after"] is True
    for name in ("forged_from", "tampered_sdp", "bad_signature", "unsigned", "replayed"):
        assert sum(classes[name]["reasons"].values()) == classes[name]["attempts"], name
    assert set(classes["stale"]["reasons"]) <= {"stale", "future"}
    assert result["attempts"] == sum(t["attempts"] for t in classes.values())
    assert result["rejected"] == result["attempts"] and result["all_rejected"] is True
    assert result["all_controls_ok"] is True
    assert result["crashes"] == 0 and result["crashed"] == []
    # The relay's own counters saw the signaling attacks too.
    drops = result["relay_dropped"]
    for reason in ("forged-from", "bad-signature", "unsigned", "stale", "duplicate"):
        assert drops.get(reason, 0) > 0, (reason, drops)
    # Figures are there; their size is the benchmark's business.
    pair = result["pair_ms"]
    assert pair["runs"] == 2 and 0 < pair["p50"] <= pair["p95"] and math.isfinite(pair["p95"])
    assert result["pair_meets_target"] is (pair["p50"] <= bench.PAIR_TARGET_P50_MS)
    assert result["revoke_cutoff_ms"] is not None and result["revoke_cutoff_ms"] > 0
    assert (tmp_path / "relay.log").exists() and (tmp_path / "bench.log").exists()


def test_options_are_checked() -> None:
    for bad in (["--guesses", "0"], ["--topic-attempts", "-1"], ["--pairing-attempts", "9"]):
        with pytest.raises(SystemExit):
            bench.build_parser().parse_args(bad)
