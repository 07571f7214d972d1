"""``edge-intercom-agent devices`` on real ALSA: PCMs from a generated ``.asoundrc``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from audio_env import file_capture_pcm, file_playback_pcm, write_asoundrc, write_raw

from agent.app import main


@pytest.fixture
def agent_file(alsa_home: Path) -> Path:
    silence = write_raw(alsa_home / "in.raw", np.zeros(48_000, np.int16))
    write_asoundrc(
        alsa_home,
        {
            "door_mic": file_capture_pcm(silence),
            "door_spk": file_playback_pcm(alsa_home / "out.raw"),
            "spare_mic": file_capture_pcm(silence),
        },
    )
    path = alsa_home / "agent.toml"
    path.write_text(
        f'state_dir = "{alsa_home}"\n'
        '[audio.capture]\nname = "door_mic"\n[audio.playback]\nname = "door_spk"\n'
    )
    return path


def test_devices_json_lists_rates_and_the_selected_devices(
    agent_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(agent_file), "devices", "--json"]) == 0
    devices = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    mic, spk, spare = devices["door_mic"], devices["door_spk"], devices["spare_mic"]
    assert mic["selected_for"] == ["capture"] and spk["selected_for"] == ["playback"]
    assert spare["selected_for"] == []
    # File PCMs over the null PCM take any rate (and either direction).
    assert mic["capture_rates"] == [48_000, 44_100, 16_000]
    assert spk["playback_rates"] == [48_000, 44_100, 16_000]
    assert mic["max_input_channels"] > 0 and isinstance(mic["default_rate"], int)


def test_devices_table_marks_the_selection_and_says_what_matches_nothing(
    agent_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agent_file.write_text(agent_file.read_text().replace('"door_spk"', '"lobby_spk"'))
    assert main(["--config", str(agent_file), "devices"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [
        "#", "name", "in", "out", "default", "capture", "rates", "playback", "rates", "selected",
    ]  # fmt: skip
    (mic,) = [line for line in out if " door_mic " in line]
    assert mic.split()[1:] == [
        "door_mic",
        "128",
        "128",
        "44100",
        *["48k,44.1k,16k"] * 2,
        "<capture",
    ]
    assert "no playback device matches 'lobby_spk'" in out
