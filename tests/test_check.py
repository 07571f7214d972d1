"""``edge-intercom-agent check``: each check against the real thing (PulseAudio loop,
mosquitto with the relay's TLS, coturn) and against something that fails, with the reason."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from audio_env import PulseServer, file_capture_pcm, file_playback_pcm, write_asoundrc, write_raw
from test_broker_security import broker_tls

from agent.app import main
from agent.audio.device import DeviceConfig
from agent.service.check import (
    LoopSettings,
    check_audio_loop,
    check_broker,
    check_clock,
    check_disk,
    check_stun,
    ntp_synchronised,
    run_checks,
)
from agent.service.config import load_config
from agent.service.identity import save_identity
from agent.signaling.mqtt import MqttTls
from cloud_relay.pki import RelayPki
from tools.lab.attacks import device_files
from tools.lab.broker import Mosquitto
from tools.lab.turn import Coturn


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound for TCP and UDP that neither accepts nor answers: refused
    connections, unanswered datagrams."""
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        port = tcp.getsockname()[1]
        udp.bind(("127.0.0.1", port))
        yield port


@pytest.fixture(scope="module")
def coturn() -> Iterator[Coturn]:
    with Coturn.running() as server:
        yield server


# -- audio loop ---------------------------------------------------------------------------


async def test_audio_loop_hears_the_sweep_through_a_virtual_board(
    alsa_home: Path, pulse_server: PulseServer
) -> None:
    """Speaker and microphone on one PulseAudio null sink: a loop with a real clock."""
    write_asoundrc(
        alsa_home,
        {"loopmic": pulse_server.capture_pcm("mic"), "loopspk": pulse_server.playback_pcm("mic")},
    )
    result = await check_audio_loop(DeviceConfig(name="loopmic"), DeviceConfig(name="loopspk"))
    assert result.status == "ok", result.detail
    assert "delay" in result.detail and "correlation 1.00" in result.detail


async def test_audio_loop_fails_when_the_microphone_hears_nothing(alsa_home: Path) -> None:
    silence = write_raw(alsa_home / "in.raw", np.zeros(4 * 48_000, np.int16))
    write_asoundrc(
        alsa_home,
        {"deadmic": file_capture_pcm(silence), "spk": file_playback_pcm(alsa_home / "o.raw")},
    )
    result = await check_audio_loop(
        DeviceConfig(name="deadmic", queue_frames=200), DeviceConfig(name="spk"), LoopSettings()
    )
    assert (result.status, result.detail.split(":")[0]) == ("fail", "test signal not heard")


async def test_audio_loop_names_a_missing_device(alsa_home: Path) -> None:
    write_asoundrc(alsa_home, {"spk": file_playback_pcm(alsa_home / "o.raw")})
    result = await check_audio_loop(DeviceConfig(name="^mic$"), DeviceConfig(name="spk"))
    assert result.status == "fail" and "no capture device matches '^mic$'" in result.detail


# -- broker ---------------------------------------------------------------------------------


async def test_broker_tls_with_the_board_identity_and_with_a_foreign_ca(tmp_path: Path) -> None:
    pki = RelayPki.open(tmp_path / "pki")
    other = RelayPki.open(tmp_path / "other-pki")
    tls = broker_tls(pki, tmp_path, relay_listener=False)
    with Mosquitto.running(root=tmp_path / "broker", tls=tls) as broker:
        device = device_files(pki, tmp_path, "door-1")
        ok = await check_broker("127.0.0.1", broker.port, device.context(), 5.0)
        assert ok.status == "ok" and "TLS handshake (TLSv1.3)" in ok.detail
        foreign = MqttTls(ca_file=other.ca_path).context()
        bad = await check_broker("127.0.0.1", broker.port, foreign, 5.0)
        assert (bad.status, bad.detail.split(":")[0]) == ("fail", "TLS certificate not trusted")


async def test_broker_refused_and_plain(closed_port: int, broker: Mosquitto) -> None:
    refused = await check_broker("127.0.0.1", closed_port, None, 5.0)
    assert (refused.status, refused.detail) == (
        "fail",
        "connection refused (nothing listens there)",
    )
    plain = await check_broker("127.0.0.1", broker.port, None, 5.0)
    assert plain.status == "ok" and "not paired" in plain.detail


# -- STUN / TURN ----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_stun_binding_to_coturn(coturn: Coturn, transport: str) -> None:
    result = await check_stun("turn", coturn.host, coturn.port, transport, 5.0)  # type: ignore[arg-type]
    assert result.status == "ok" and "seen from there: 127.0.0.1:" in result.detail


async def test_stun_server_that_does_not_answer(closed_port: int) -> None:
    result = await check_stun("stun", "127.0.0.1", closed_port, "udp", 1.0)
    assert (result.status, result.detail) == ("fail", "no STUN answer within 1 s")


# -- clock, disk, everything for a paired board ---------------------------------------------


def test_clock_before_what_happened_fails_and_unknown_ntp_is_not_a_failure() -> None:
    now = time.time()
    early = check_clock(now - 86_400, {"device certificate": now - 3600}, True)
    assert (early.status, early.detail.split(" is ")[1]) == (
        "fail",
        "before the device certificate",
    )
    assert check_clock(now, {"x": now - 1}, None).status == "unknown"
    assert check_clock(now, {}, False).status == "warn"
    assert check_clock(now, {}, True).status == "ok"
    assert ntp_synchronised() in (True, False, None)


def test_disk_space_of_the_state_directory(tmp_path: Path) -> None:
    ok = check_disk(tmp_path / "not" / "made" / "yet")
    assert ok.status == "ok" and ok.detail.endswith(f"at {tmp_path}")
    assert check_disk(tmp_path, min_free=1 << 60).status == "fail"


async def test_a_paired_board_checks_its_broker_and_turn_from_pairing(
    tmp_path: Path, coturn: Coturn
) -> None:
    pki = RelayPki.open(tmp_path / "pki")
    tls = broker_tls(pki, tmp_path, relay_listener=False)
    device = device_files(pki, tmp_path, "door-1")
    assert device.key_file is not None and device.cert_file is not None
    state = tmp_path / "state"
    enrollment = {
        "device_id": "door-1",
        "broker": "mqtts://127.0.0.1:{port}",
        "turn": [{"urls": [f"turn:{coturn.host}:{coturn.port}?transport=udp"]}],
    }
    agent_file = tmp_path / "agent.toml"
    agent_file.write_text(f'state_dir = "{state}"\n')
    with Mosquitto.running(root=tmp_path / "broker", tls=tls) as broker:
        enrollment["broker"] = f"mqtts://127.0.0.1:{broker.port}"
        save_identity(
            state,
            device.key_file.read_bytes(),
            device.cert_file.read_bytes(),
            pki.ca_path.read_bytes(),
            enrollment,
        )
        results = await run_checks(load_config(agent_file), limit_s=5.0, audio=None)
    by_name = {r.name.split(" ")[0]: r for r in results}
    assert [r.name.split(" ")[0] for r in results] == ["broker", "turn", "clock", "disk"]
    assert "TLS handshake" in by_name["broker"].detail
    assert by_name["turn"].status == "ok" and by_name["clock"].status != "fail"


# -- the command ----------------------------------------------------------------------------


def test_check_command_prints_a_line_each_and_fails_on_any_failure(
    tmp_path: Path, broker: Mosquitto, closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    agent_file = tmp_path / "agent.toml"
    agent_file.write_text(
        f'state_dir = "{tmp_path}"\n[mqtt]\nport = {broker.port}\n'
        f'[ice]\nstun_servers = [{{ host = "127.0.0.1", port = {closed_port} }}]\n'
    )
    assert main(["--config", str(agent_file), "check", "--no-audio", "--timeout", "1"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["OK", "broker"],
        ["FAIL", "stun"],
        [lines[2].split()[0], "clock:"],
        ["OK", "disk:"],
    ]
    assert lines[1] == f"FAIL    stun 127.0.0.1:{closed_port}/udp: no STUN answer within 1 s"
