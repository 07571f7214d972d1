"""Config loading: board profile + agent file, with clear errors that name the key."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.service.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    OVERRIDES_FILE,
    AgentConfig,
    ConfigError,
    config_path,
    from_dict,
    load_config,
    save_override,
)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    config = load_config(None)
    assert config.board == "generic"
    assert config.media.opus.bitrate == 32_000


def test_config_path_flag_then_environment_then_default_if_it_exists(tmp_path: Path) -> None:
    flag, env_file, default = tmp_path / "flag.toml", tmp_path / "env.toml", tmp_path / "etc.toml"
    env = {CONFIG_ENV: str(env_file)}
    assert config_path(flag, env, default) == flag
    assert config_path(None, env, default) == env_file  # used even if absent: then an error
    assert config_path(None, {}, default) is None
    default.write_text('device_id = "door-1"\n')
    assert config_path(None, {}, default) == default
    assert config_path(None, {CONFIG_ENV: ""}, default) == default
    assert Path("/etc/edge-intercom/agent.toml") == DEFAULT_CONFIG


def test_agent_file_overrides_the_profile(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        'board = "raspberry-pi-zero-2w-i2s"\ndevice_id = "door-1"\n'
        "[media]\nred_distance = 1\n[media.opus]\nbitrate = 24000\n",
    )
    config = load_config(path)
    assert config.device_id == "door-1"
    assert config.media.red_distance == 1
    assert config.media.opus.bitrate == 24_000
    assert config.media.opus.complexity == 5  # from the Zero's profile
    assert "googlevoicehat" in config.audio.capture.name
    assert config.profile.gpio.call_button is not None  # the profile's [board] table


def test_alert_outbox_and_uplink_are_configured(tmp_path: Path) -> None:
    path = _write(tmp_path, "[alerts]\noutbox_capacity = 500\nack_timeout = 5.0\n")
    alerts = load_config(path).alerts
    assert (alerts.outbox_capacity, alerts.ack_timeout, alerts.window) == (500, 5.0, 32)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[media.opus]\nbitrat = 1\n", "agent.toml: media.opus: unknown key"),
        ('[media.opus]\nbitrate = "fast"\n', "media.opus.bitrate: expected int"),
        ("[media.opus]\ncomplexity = 12\n", "complexity"),
        ("media = 3\n", "media: expected a table"),
        ('board = "../../etc/passwd"\n', "invalid profile name"),
        ('board = "no-such-board"\n', "no profile"),
        ("[media\n", "agent.toml"),
        ("[alerts]\noutbox_capacity = 1\n", "alerts: outbox_capacity must be at least 2"),
        ("[alerts]\nwindow = 0\n", "alerts: uplink window must be at least 1"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


_toml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(
    st.dictionaries(st.sampled_from(["device_id", "board", "audio", "media", "x"]), _toml_values)
)
def test_arbitrary_tables_give_a_config_or_a_config_error(data: dict[str, object]) -> None:
    try:
        config = from_dict(AgentConfig, data)
    except ConfigError:
        return
    assert isinstance(config, AgentConfig)


def test_saved_overrides_win_and_bad_ones_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent_file = tmp_path / "agent.toml"
    agent_file.write_text(f'state_dir = "{tmp_path}"\n[calls]\nring_timeout_s = 20.0\n')
    save_override(tmp_path, "calls.ring_timeout_s", 12.0)
    save_override(tmp_path, "calls.renamed_in_an_upgrade", True)
    save_override(tmp_path, "state_dir", "/elsewhere")
    assert (tmp_path / OVERRIDES_FILE).stat().st_mode & 0o777 == 0o600
    config = load_config(agent_file)
    assert (config.calls.ring_timeout_s, config.state_dir) == (12.0, str(tmp_path))
    assert "renamed_in_an_upgrade" in caplog.text and "state_dir" in caplog.text
    (tmp_path / OVERRIDES_FILE).write_text("[1, 2")
    with pytest.raises(ConfigError, match=OVERRIDES_FILE):
        load_config(agent_file)
