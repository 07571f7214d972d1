"""Agent configuration: a tree of frozen dataclasses read from TOML.

A board profile (``firmware_configs/*.toml``) gives the hardware defaults in its
``[agent]`` table and the hardware itself in ``[board]`` (``agent.service.profile``);
the agent's own file overrides the ``[agent]`` defaults key by key. Without
``--config`` the agent file is ``$EDGE_INTERCOM_CONFIG``, else ``DEFAULT_CONFIG`` if
it exists, else there is none (built-in defaults). Unknown keys and wrong types
are errors that name the offending key, so a typo never silently does nothing.
What operators set with the ``config/set`` command is saved under the state
directory (``OVERRIDES_FILE``) and overrides both at every start.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.audio.device import DeviceConfig
from agent.audio.frontend import FrontendSettings
from agent.calls.policy import CallPolicy
from agent.edge.clip import ClipSettings
from agent.edge.outbox import DEFAULT_CAPACITY
from agent.edge.pipeline import SEVERITY, EdgeSettings
from agent.edge.uplink import UplinkConfig
from agent.gpio.settings import GpioSettings
from agent.media.dtls import DtlsTimers
from agent.media.session import MediaConfig
from agent.net.ice import IceConfig
from agent.service.files import write_atomic
from agent.service.profile import BoardProfile
from agent.service.selftest import SelfTestSettings
from agent.service.telemetry import TelemetrySettings
from agent.service.tomlconf import ConfigError, from_dict, merge, read_toml, replace_key
from agent.signaling.mqtt import MqttTimers
from agent.signaling.topics import WEB_PEERS

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AudioConfig:
    capture: DeviceConfig = field(default_factory=lambda: DeviceConfig(name="default"))
    """Microphone, matched by device name."""
    playback: DeviceConfig = field(default_factory=lambda: DeviceConfig(name="default"))
    """Speaker, matched by device name."""
    volume: int = 100
    """Speaker gain in percent, 0..100 (attenuation only); the ``volume`` command sets it."""
    frontend: FrontendSettings = field(default_factory=FrontendSettings)
    """``[audio.frontend]``: echo cancellation, noise suppression and gain control of the
    microphone in calls (``agent.audio.frontend``)."""

    def __post_init__(self) -> None:
        if not 0 <= self.volume <= 100:
            raise ValueError(f"volume must be 0..100, got {self.volume}")


@dataclass(frozen=True, slots=True)
class MqttSettings(MqttTimers):
    """The broker the agent keeps its device session with (the relay's, or its embedded one)."""

    host: str = "127.0.0.1"
    """Broker host name or address."""
    port: int = 1883
    """Broker TCP port."""
    publish_timeout: float = 10.0
    """Seconds a QoS 1 publish may wait for its acknowledgement."""


@dataclass(frozen=True, slots=True)
class AlertSettings(UplinkConfig):
    """``[alerts]``: the board's outbox, and how its alerts go to the relay."""

    outbox_capacity: int = DEFAULT_CAPACITY
    """Alerts the outbox holds at most while the relay cannot be reached; past it the
    oldest of the lowest severity go first, counted and reported by an alert of its own."""
    clip: ClipSettings = field(default_factory=ClipSettings)
    """``[alerts.clip]``: an encrypted audio clip of the sound around an alert (off)."""

    def __post_init__(self) -> None:
        UplinkConfig.__post_init__(self)
        if self.outbox_capacity < 2:
            raise ValueError(f"outbox_capacity must be at least 2, got {self.outbox_capacity}")
        unknown = sorted(set(self.clip.kinds) - set(SEVERITY))
        if unknown:
            raise ValueError(f"clip.kinds: unknown alert kind(s) {unknown}: choose from "
                             f"{', '.join(SEVERITY)}")  # fmt: skip


@dataclass(frozen=True, slots=True)
class CallSettings:
    """Call timers and this board's own policy for incoming calls."""

    invite_timeout_s: float = 5.0
    """Caller: the callee must acknowledge the invite within this (else unreachable)."""
    invite_resend_s: float = 1.0
    """Caller: send the same invite again after this long without an answer (0: never)."""
    answer_timeout_s: float = 30.0
    """Caller: how long the callee may ring."""
    ring_timeout_s: float = 30.0
    """Callee: how long this board rings before declining with no-answer."""
    connect_timeout_s: float = 10.0
    """Both: from answer to media connected."""
    max_active_s: float | None = None
    """Both: longest connected call; None: no limit."""
    ended_hold_s: float = 3.0
    """How long an ended call is shown before idle."""
    do_not_disturb: bool = False
    """Refuse normal calls and announcements."""
    privacy: bool = False
    """Refuse every listen request."""
    auto_answer: tuple[str, ...] = ()
    """Device ids whose normal calls are answered without ringing."""
    announce_auto_answer: bool = True
    """Play announcements at once instead of ringing."""
    listen_allowed: tuple[str, ...] = ()
    """Device ids that may listen in."""
    force_allowed: tuple[str, ...] = ()
    """Device ids that may place force calls."""
    web_allowed: tuple[str, ...] = (WEB_PEERS,)
    """Web peers (``web.<name>``: a browser the relay speaks for) that may call at all;
    ``web.*`` is all of them (also in the lists above); empty: none."""

    def policy(self) -> CallPolicy:
        """The incoming-call policy these settings describe."""
        return CallPolicy(
            do_not_disturb=self.do_not_disturb,
            privacy=self.privacy,
            auto_answer=frozenset(self.auto_answer),
            announce_auto_answer=self.announce_auto_answer,
            listen_allowed=frozenset(self.listen_allowed),
            force_allowed=frozenset(self.force_allowed),
            web_allowed=frozenset(self.web_allowed),
        )


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """``[service]``: how the agent behaves as a systemd service (``run``)."""

    stall_s: float = 30.0
    """A part stuck this long (no microphone frame, a PortAudio or outbox call that does not
    return) stops the watchdog pings, so systemd restarts the agent."""
    stop_flush_s: float = 5.0
    """On SIGTERM, how long the agent waits for the relay to acknowledge the alerts still in
    its outbox (they stay there for the next start if it cannot)."""

    def __post_init__(self) -> None:
        if self.stall_s <= 0 or self.stop_flush_s < 0:
            raise ValueError("stall_s must be positive and stop_flush_s not negative")


UNPAIRED = "unpaired"
"""The default device id: the identity comes from pairing (``agent.service.identity``)."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    device_id: str = UNPAIRED
    """Identity issued at pairing, which overrides this; set it only for a lab board that
    talks plain MQTT without pairing. Appears in every log line."""
    board: str = "generic"
    """Board profile name (a file in firmware_configs/)."""
    state_dir: str = "/var/lib/edge-intercom"
    """Where the device keeps what must survive restarts (its DTLS certificate, ...)."""
    audio: AudioConfig = field(default_factory=AudioConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    ice: IceConfig = field(default_factory=IceConfig)
    """STUN/TURN servers and ICE timers (the relay's retained config can set the servers)."""
    dtls: DtlsTimers = field(default_factory=DtlsTimers)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    """The device's MQTT session (``run``)."""
    calls: CallSettings = field(default_factory=CallSettings)
    """Call timers and incoming-call policy (``run``)."""
    edge: EdgeSettings = field(default_factory=EdgeSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    """The detectors on the capture stream (``[edge]``) and their settings."""
    service: ServiceSettings = field(default_factory=ServiceSettings)
    selftest: SelfTestSettings = field(default_factory=SelfTestSettings)
    """``[selftest]``: the scheduled speaker-to-microphone test (``agent.service.selftest``)."""
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    """``[telemetry]``: the periodic sound level, load and call quality records the relay's
    dashboard charts (``agent.service.telemetry``)."""
    gpio: GpioSettings = field(default_factory=GpioSettings)
    """``[gpio]``: what the board profile's call button, door relay and tamper switch do."""
    status_led: str | None = None
    """The status LED's Linux LED class directory (``/sys/class/leds/NAME``); None: no LED."""
    profile: BoardProfile = field(default_factory=BoardProfile)
    """The board profile's ``[board]`` table; comes from the profile file only."""


PROFILE_DIR = Path(__file__).resolve().parents[2] / "firmware_configs"

DEFAULT_CONFIG = Path("/etc/edge-intercom/agent.toml")
"""The agent file when neither ``--config`` nor ``CONFIG_ENV`` names one (if it exists)."""
CONFIG_ENV = "EDGE_INTERCOM_CONFIG"
"""Environment variable naming the agent file (``--config`` wins over it)."""


OVERRIDES_FILE = "config-overrides.json"
"""Under the state directory: what operators set with ``config/set``, key by dotted key."""

FIXED_KEYS = frozenset({"device_id", "board", "state_dir", "profile"})
"""Set at pairing or in the agent file only: ``config/set`` refuses them."""


def read_overrides(state_dir: Path) -> dict[str, Any]:
    """The saved ``config/set`` values; a missing file is none, a broken one a ConfigError."""
    path = state_dir / OVERRIDES_FILE
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a JSON object")
    return raw


def save_override(state_dir: Path, key: str, value: Any) -> None:
    """Add ``key = value`` to the saved overrides (0600: values may be secrets)."""
    overrides = read_overrides(state_dir)
    overrides[key] = value
    state_dir.mkdir(parents=True, exist_ok=True)
    data = json.dumps(overrides, indent=1, sort_keys=True).encode()
    write_atomic(state_dir / OVERRIDES_FILE, data, 0o600)


def apply_overrides(config: AgentConfig) -> AgentConfig:
    """``config`` with the saved ``config/set`` values on top; one that no longer fits (a
    key renamed by an upgrade, say) is logged and skipped, never fatal."""
    for key, value in read_overrides(Path(config.state_dir)).items():
        if key.split(".")[0] in FIXED_KEYS:
            logger.warning("config override %s ignored: set in the agent file only", key)
            continue
        try:
            config = replace_key(config, key, value)
        except ConfigError as exc:
            logger.warning("config override ignored: %s", exc)
    return config


def config_path(
    flag: Path | None, env: Mapping[str, str] = os.environ, default: Path = DEFAULT_CONFIG
) -> Path | None:
    """The agent file: ``--config``, else ``$EDGE_INTERCOM_CONFIG`` (which must exist, as
    the flag's must), else ``default`` if it exists; None: built-in defaults only."""
    if flag is not None:
        return flag
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    return default if default.exists() else None


def load_profile(path: Path) -> tuple[BoardProfile, dict[str, Any]]:
    """A board profile file: its ``[board]`` table and its ``[agent]`` table (checked on
    its own, so that a mistake in it names the profile file)."""
    data = read_toml(path)
    unknown = sorted(set(data) - {"board", "agent"})
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(unknown)}; expected board, agent")
    board, agent = data.get("board"), data.get("agent", {})
    if not isinstance(board, dict) or not isinstance(agent, dict):
        raise ConfigError(f"{path}: board (required) and agent must be tables")
    if "profile" in agent:
        raise ConfigError(f"{path}: agent.profile: the hardware goes in the board table")
    from_dict(AgentConfig, agent, f"{path}: agent")
    return from_dict(BoardProfile, board, f"{path}: board"), agent


def load_config(path: Path | None, profile_dir: Path = PROFILE_DIR) -> AgentConfig:
    """The agent file's settings on top of its board profile's ``[agent]`` table, and the
    operators' saved ``config/set`` values on top of both. Errors name the file and key."""
    data = read_toml(path) if path is not None else {}
    where = "" if path is None else f"{path}: "
    board = data.get("board", "generic")
    if not isinstance(board, str) or not board.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"{where}board: invalid profile name {board!r}")
    if "profile" in data:
        raise ConfigError(f"{where}profile: set by the board profile's board table, not here")
    profile_path = profile_dir / f"{board}.toml"
    if profile_path.exists():
        profile, defaults = load_profile(profile_path)
    elif board == "generic":
        profile, defaults = BoardProfile(), {}
    else:
        raise ConfigError(f"{where}board: no profile {profile_path}")
    try:
        config = from_dict(AgentConfig, merge(defaults, data))
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from exc
    return apply_overrides(dataclasses.replace(config, profile=profile))


__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG",
    "PROFILE_DIR",
    "AgentConfig",
    "AudioConfig",
    "CallSettings",
    "ConfigError",
    "MqttSettings",
    "config_path",
    "from_dict",
    "load_config",
    "load_profile",
]
