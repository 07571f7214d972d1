"""Agent configuration: a tree of frozen dataclasses read from TOML.

A board profile (``firmware_configs/*.toml``) gives the hardware defaults;
the agent's own file overrides them key by key. Unknown keys and wrong types
are errors that name the offending key, so a typo never silently does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent.audio.device import DeviceConfig
from agent.calls.policy import CallPolicy
from agent.media.dtls import DtlsTimers
from agent.media.session import MediaConfig
from agent.net.ice import IceConfig
from agent.service.tomlconf import ConfigError, from_dict, merge, read_toml
from agent.signaling.mqtt import MqttTimers


@dataclass(frozen=True, slots=True)
class AudioConfig:
    capture: DeviceConfig = field(default_factory=lambda: DeviceConfig(name="default"))
    """Microphone, matched by device name."""
    playback: DeviceConfig = field(default_factory=lambda: DeviceConfig(name="default"))
    """Speaker, matched by device name."""
    volume: int = 100
    """Speaker gain in percent, 0..100 (attenuation only); the ``volume`` command sets it."""

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
class CallSettings:
    """Call timers and this board's own policy for incoming calls."""

    invite_timeout_s: float = 5.0
    """Caller: the callee must acknowledge the invite within this (else unreachable)."""
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

    def policy(self) -> CallPolicy:
        """The incoming-call policy these settings describe."""
        return CallPolicy(
            do_not_disturb=self.do_not_disturb,
            privacy=self.privacy,
            auto_answer=frozenset(self.auto_answer),
            announce_auto_answer=self.announce_auto_answer,
            listen_allowed=frozenset(self.listen_allowed),
            force_allowed=frozenset(self.force_allowed),
        )


@dataclass(frozen=True, slots=True)
class AgentConfig:
    device_id: str = "unpaired"
    """Identity issued at pairing; appears in every log line."""
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


PROFILE_DIR = Path(__file__).resolve().parents[2] / "firmware_configs"


def load_config(path: Path | None, profile_dir: Path = PROFILE_DIR) -> AgentConfig:
    """The agent file's settings on top of its board profile's ``[agent]`` table."""
    data = read_toml(path) if path is not None else {}
    board = data.get("board", "generic")
    if not isinstance(board, str) or not board.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"board: invalid profile name {board!r}")
    profile_path = profile_dir / f"{board}.toml"
    profile = read_toml(profile_path).get("agent", {}) if profile_path.exists() else {}
    if board != "generic" and not profile_path.exists():
        raise ConfigError(f"board: no profile {profile_path}")
    return from_dict(AgentConfig, merge(profile, data))


__all__ = [
    "PROFILE_DIR",
    "AgentConfig",
    "AudioConfig",
    "CallSettings",
    "ConfigError",
    "MqttSettings",
    "from_dict",
    "load_config",
]
