"""``tools/demo``'s Python part end to end: relay, two virtual boards, a call by command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tools.demo_call", "--duration", "3", "--dir", str(tmp_path)],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr}"
    assert "edge-intercom-relay cmd" in out and "door-a call peer=door-b" in out
    # Each board joined the way an operator pairs one: a token, then pair-device.
    assert out.count("pair new") == 2 and out.count("pair-device '<token>'") == 2, out
    assert "paired as door-a" in out and "paired as door-b" in out, out
    assert "[door-a] call ended: local-hangup" in out, out
    assert "[door-b] call ended: remote-hangup" in out, out
    assert "PESQ a -> b: wideband" in out and "PESQ b -> a: wideband" in out, out
    assert "recv" in out and "rtt" in out, out  # live statistics
    assert "door-a -> door-b ended local-hangup" in out, out  # the store's summary
    assert (tmp_path / "relay-data" / "relay.db").exists()
