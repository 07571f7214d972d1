"""Board profiles: every file in firmware_configs/ validates, a mistake in one is an error
that names the profile file, the key and what was expected, and the channel settings a
HAT needs work on real ALSA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from audio_env import (
    dominant_frequency,
    file_capture_pcm,
    file_playback_pcm,
    read_raw,
    rms,
    tone,
    write_asoundrc,
    write_raw,
)

from agent.audio.device import AlsaCapture, AlsaPlayback, DeviceConfig
from agent.audio.format import FRAME_SAMPLES
from agent.service.config import PROFILE_DIR, ConfigError, load_config, load_profile
from agent.service.profile import BoardProfile, GpioLine, GpioPins

PROFILES = sorted(PROFILE_DIR.glob("*.toml"))


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_profile_validates_and_loads_as_a_board(path: Path, tmp_path: Path) -> None:
    profile, _ = load_profile(path)
    agent_file = tmp_path / "agent.toml"
    agent_file.write_text(f'board = "{path.stem}"\nstate_dir = "{tmp_path}"\n')
    config = load_config(agent_file)
    assert config.profile == profile and profile.description
    for device in (config.audio.capture, config.audio.playback):
        assert device.name and 0 <= device.channel < device.channels
    i2s = any(line.startswith(("dtparam=i2s", "dtoverlay=")) for line in profile.boot_config)
    assert not i2s or {18, 19, 20, 21} <= set(profile.reserved_lines)


def test_the_boards_of_issue_7_are_shipped() -> None:
    profiles = {p.stem: load_profile(p)[0] for p in PROFILES}
    boot = {name: p.boot_config for name, p in profiles.items()}
    assert "dtoverlay=wm8960-soundcard" in boot["raspberry-pi-4-respeaker-2mic"]
    assert "dtoverlay=googlevoicehat-soundcard" in boot["raspberry-pi-zero-2w-i2s"]
    assert "dtoverlay=hifiberry-dac" in boot["raspberry-pi-5-hifiberry-usb-mic"]
    assert boot["raspberry-pi-4-usb"] == ()


def _profile_dir(tmp_path: Path, text: str) -> tuple[Path, Path]:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "lab-board.toml").write_text(text)
    agent_file = tmp_path / "agent.toml"
    agent_file.write_text(f'board = "lab-board"\nstate_dir = "{tmp_path}"\n')
    return profiles, agent_file


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[board]\ndescription = "x"\ncolour = "red"\n',
            r"lab-board\.toml: board: unknown key\(s\) colour",
        ),
        (
            '[board]\ndescription = "x"\n[board.gpio]\ncall_button = { line = "17" }\n',
            r"lab-board\.toml: board\.gpio\.call_button\.line: expected int, got '17'",
        ),
        (
            '[board]\ndescription = "x"\n[board.gpio]\ncall_button = { line = 17, bias = "up" }\n',
            r"board\.gpio\.call_button\.bias: expected one of 'as-is', 'pull-up'",
        ),
        (
            '[board]\ndescription = "x"\nmixer = [{ control = "Mic", percent = 120 }]\n',
            r"lab-board\.toml: board\.mixer\[0\]: mixer 'Mic': percent must be 0\.\.100, got 120",
        ),
        (
            '[board]\ndescription = "x"\nboot_config = ["dtoverlay hifiberry-dac"]\n',
            r"boot_config line 'dtoverlay hifiberry-dac': expected key=value",
        ),
        (
            '[board]\ndescription = "x"\nreserved_lines = [18]\n[board.gpio]\n'
            "door_relay = { line = 18 }\n",
            r"board: gpio: door_relay \(line 18\) on a line the sound card takes",
        ),
        (
            '[board]\ndescription = "x"\n[board.gpio]\n'
            "door_relay = { line = 5 }\nstatus_led = { line = 5 }\n",
            r"board\.gpio: status_led and door_relay are both on line 5",
        ),
        (
            '[board]\ndescription = "x"\n[agent.audio.capture]\nname = "x"\nchannel = 1\n',
            r"lab-board\.toml: agent\.audio\.capture: channel must be 0\.\.0, got 1",
        ),
        ('[agent.audio.capture]\nname = "x"\n', r"lab-board\.toml: board \(required\)"),
        ('[board]\ndescription = "x"\n[hardware]\n', r"unknown table\(s\) hardware"),
    ],
)
def test_a_bad_profile_names_file_key_and_expectation(
    tmp_path: Path, text: str, message: str
) -> None:
    profiles, agent_file = _profile_dir(tmp_path, text)
    with pytest.raises(ConfigError, match=message):
        load_config(agent_file, profiles)


def test_the_agent_file_cannot_set_the_hardware(tmp_path: Path) -> None:
    profiles, agent_file = _profile_dir(tmp_path, '[board]\ndescription = "x"\n')
    agent_file.write_text(agent_file.read_text() + "[profile.gpio]\nchip = 'gpiochip9'\n")
    with pytest.raises(ConfigError, match=r"agent\.toml: profile: set by the board profile"):
        load_config(agent_file, profiles)


def test_gpio_pins_list_what_is_wired() -> None:
    pins = GpioPins(call_button=GpioLine(17, active_low=True, bias="pull-up"))
    assert pins.used() == {"call_button": 17}
    assert BoardProfile().gpio.used() == {}


async def test_capture_keeps_the_mic_channel_and_playback_fills_every_channel(
    alsa_home: Path,
) -> None:
    """A 2-mic HAT or an I2S card opens as stereo: capture keeps the configured channel,
    playback sends the mono signal to both (real ALSA file PCMs)."""
    left, right = tone(440, 0.5), tone(1000, 0.5)
    stereo = np.stack([left, right], axis=1).reshape(-1)
    write_asoundrc(
        alsa_home,
        {
            "hatmic": file_capture_pcm(write_raw(alsa_home / "in.raw", stereo)),
            "hatspk": file_playback_pcm(alsa_home / "out.raw"),
        },
    )
    capture = AlsaCapture(DeviceConfig(name="hatmic", channels=2, channel=1, queue_frames=100))
    await capture.start()
    try:
        heard = np.frombuffer(b"".join([await capture.read() for _ in range(20)]), "<i2")
    finally:
        await capture.close()
    assert abs(dominant_frequency(heard) - 1000) < 5  # the right channel, at full level
    assert np.array_equal(heard[:1000], right[:1000])

    playback = AlsaPlayback(DeviceConfig(name="hatspk", channels=2))
    await playback.start()
    try:
        for i in range(10):
            await playback.write(left[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES].tobytes())
    finally:
        await playback.close()
    played = read_raw(alsa_home / "out.raw").reshape(-1, 2)
    assert np.array_equal(played[:, 0], played[:, 1])
    assert rms(played[:, 0]) > 1000
