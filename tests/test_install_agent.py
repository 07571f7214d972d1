"""``tools/install-agent``: a board's installation, run for real in a mount namespace.

The script writes where an installation lives (``/opt/edge-intercom``, ``/etc``: the
service user, the config, the unit; ``/boot/firmware/config.txt``). The test gives it a
private ``/opt`` and ``/boot`` (tmpfs) and a private copy of ``/etc``, so this machine
is left as it was, then checks what a board would have: the user, the program in its
virtualenv (it runs), the config naming the board, the unit, the boot overlay lines;
and that a second run changes none of what the operator owns. systemd is not running
here, so the script stops after installing the unit (as it does in an image build).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOARD = "raspberry-pi-4-respeaker-2mic"

SCRIPT = """
set -eu
mount -t tmpfs tmpfs /opt
mkdir -p /boot && mount -t tmpfs tmpfs /boot
cp -a /etc "$T/etc" && mount --bind "$T/etc" /etc
mkdir -p /boot/firmware && printf 'dtparam=audio=on\\n' >/boot/firmware/config.txt
"$REPO/tools/install-agent" --board "$BOARD" --boot-config >"$T/first.log" 2>&1
echo '# edited by the operator' >>/etc/edge-intercom/agent.toml
"$REPO/tools/install-agent" --board "$BOARD" --boot-config >"$T/second.log" 2>&1
cp /etc/edge-intercom/agent.toml /boot/firmware/config.txt "$T/"
cp /etc/systemd/system/edge-intercom-agent.service "$T/"
getent passwd edge-intercom >"$T/passwd"
id -nG edge-intercom >"$T/groups"
/opt/edge-intercom/venv/bin/edge-intercom-agent --config /etc/edge-intercom/agent.toml \\
    devices --json >"$T/devices.json"
"""


def test_install_agent_sets_up_a_board_and_keeps_the_operators_files(tmp_path: Path) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "T": str(tmp_path), "REPO": str(REPO),
           "BOARD": BOARD, "HOME": "/root", "LANG": "C.UTF-8"}  # fmt: skip
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", SCRIPT],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    logs = "".join(
        f"--- {name}\n{(tmp_path / name).read_text()}"
        for name in ("first.log", "second.log")
        if (tmp_path / name).exists()
    )
    assert done.returncode == 0, done.stdout + done.stderr + logs
    assert "systemd is not running here" in (tmp_path / "second.log").read_text()

    passwd = (tmp_path / "passwd").read_text().strip().split(":")
    assert passwd[0] == "edge-intercom" and passwd[-1] == "/usr/sbin/nologin"
    assert "audio" in (tmp_path / "groups").read_text().split()
    unit = (tmp_path / "edge-intercom-agent.service").read_text()
    assert unit == (REPO / "systemd" / "edge-intercom-agent.service").read_text()
    # The operator's edit survives the second run; the board is the one asked for.
    config = (tmp_path / "agent.toml").read_text()
    assert f'board = "{BOARD}"' in config and config.endswith("# edited by the operator\n")
    # The HAT's overlay lines are added once, after what was there.
    boot = (tmp_path / "config.txt").read_text().splitlines()
    assert boot[0] == "dtparam=audio=on"
    assert boot.count("dtoverlay=wm8960-soundcard") == 1, boot
    # The installed program runs with that configuration (its board profile found).
    assert (tmp_path / "devices.json").read_text().lstrip().startswith(("[", "{"))
