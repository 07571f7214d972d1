"""The unit files in ``systemd/``: valid, hardened to the issue's targets, and in step with
the programs they run (their command lines, state and config directories, stop time).

``systemd-analyze verify`` and ``security --offline=true`` run on them although systemd
is not PID 1 here. ``verify`` checks that ``ExecStart`` is executable, so it sees a copy
whose install prefix is this checkout's virtualenv.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from agent.app import _parser as agent_parser
from agent.service.config import DEFAULT_CONFIG, AgentConfig, ServiceSettings
from cloud_relay.__main__ import build_parser as relay_parser
from cloud_relay.config import RelayConfig

REPO = Path(__file__).resolve().parents[1]
AGENT = REPO / "systemd" / "edge-intercom-agent.service"
RELAY = REPO / "systemd" / "edge-intercom-relay.service"
INSTALL_BIN = "/opt/edge-intercom/venv/bin/"
"""Where ``tools/install-agent`` puts the programs (the units' ExecStart)."""

EXPOSURE_TARGETS = {AGENT: 2.0, RELAY: 2.5}


def directives(unit: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of all sections; a key given twice keeps both values."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def one(unit: Path, key: str) -> str:
    [value] = directives(unit)[key]
    return value


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, "": 1.0}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|min|s|h|)", value):
        total += float(number) * units[unit]
    return total


@pytest.mark.parametrize("unit", [AGENT, RELAY], ids=lambda u: u.stem)
def test_unit_verifies_clean(tmp_path: Path, unit: Path) -> None:
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace(INSTALL_BIN, f"{Path(sys.executable).parent}/"))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(copy)],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.parametrize("unit", [AGENT, RELAY], ids=lambda u: u.stem)
def test_unit_exposure_is_within_target(unit: Path) -> None:
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit)],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match is not None, done.stdout + done.stderr
    assert float(match.group(1)) <= EXPOSURE_TARGETS[unit], done.stdout


def test_units_run_the_programs_as_a_notify_service_with_a_watchdog() -> None:
    for unit in (AGENT, RELAY):
        assert one(unit, "Type") == "notify"
        assert one(unit, "NotifyAccess") == "main"
        assert seconds(one(unit, "WatchdogSec")) > 0
        assert one(unit, "Restart") == "on-failure"
        assert one(unit, "ExecStart").startswith(INSTALL_BIN)
    agent_args = shlex.split(one(AGENT, "ExecStart"))[1:]
    ns = agent_parser().parse_args(agent_args)
    assert (ns.command, ns.config) == ("run", DEFAULT_CONFIG)
    relay_args = shlex.split(one(RELAY, "ExecStart"))[1:]
    assert relay_parser().parse_args(relay_args).command == "serve"


def test_units_give_the_programs_their_default_directories() -> None:
    """StateDirectory= is where the code keeps state by default, so an install needs no
    path in its config; ProtectSystem=strict would make anything else read-only."""
    assert f"/var/lib/{one(AGENT, 'StateDirectory')}" == AgentConfig().state_dir
    assert f"/var/lib/{one(RELAY, 'StateDirectory')}" == RelayConfig().data_dir
    assert DEFAULT_CONFIG.parent == Path("/etc") / one(AGENT, "ConfigurationDirectory")
    assert one(AGENT, "ProtectSystem") == one(RELAY, "ProtectSystem") == "strict"


def test_agent_stop_timeout_leaves_room_to_hang_up_and_flush_alerts() -> None:
    """SIGTERM: hang up, wait up to ``stop_flush_s`` for alert acks, go offline; systemd
    must not SIGKILL the agent in the middle of that."""
    margin_s = 10.0  # hang-up, media and session close
    assert seconds(one(AGENT, "TimeoutStopSec")) >= ServiceSettings().stop_flush_s + margin_s


def test_agent_may_use_sound_cards_and_gpio_but_no_other_device() -> None:
    found = directives(AGENT)
    assert found["DevicePolicy"] == ["closed"]
    assert sorted(found["DeviceAllow"]) == ["char-alsa rw", "char-gpiochip rw"]
    assert found["SupplementaryGroups"] == ["audio"]
    assert "PrivateDevices" not in found  # it would hide /dev/snd
