"""Agent configuration: a tree of frozen dataclasses read from TOML.

A board profile (``firmware_configs/*.toml``) gives the hardware defaults;
the agent's own file overrides them key by key. Unknown keys and wrong types
are errors that name the offending key, so a typo never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agent.audio.device import DeviceConfig
from agent.media.dtls import DtlsTimers
from agent.media.session import MediaConfig
from agent.net.ice import IceConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


@dataclass(frozen=True, slots=True)
class AudioConfig:
    capture: DeviceConfig = field(default_factory=lambda: DeviceConfig(name="default"))
    """Microphone, matched by device name."""
    playback: DeviceConfig = field(default_factory=lambda: DeviceConfig(name="default"))
    """Speaker, matched by device name."""


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """The broker the agent keeps its device session with (the relay's, or its embedded one)."""

    host: str = "127.0.0.1"
    """Broker host name or address."""
    port: int = 1883
    """Broker TCP port."""
    keepalive: int = 30
    """MQTT keep-alive in seconds; the broker declares the device offline after 1.5x this."""
    session_expiry: int = 3600
    """Seconds the broker keeps the session (and queued QoS 1 messages) after a disconnect."""
    backoff_min: float = 0.5
    """First reconnect delay in seconds; doubles per failed attempt."""
    backoff_max: float = 30.0
    """Largest reconnect delay in seconds."""
    connect_timeout: float = 10.0
    """Seconds one connect attempt may take."""
    publish_timeout: float = 10.0
    """Seconds a QoS 1 publish may wait for its acknowledgement."""
    misc_interval: float = 1.0
    """Seconds between keep-alive checks."""


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


def _convert(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"{where}: expected one of {choices}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected an array")
        item = typing.get_args(tp)[0]
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (isinstance(tp, type) and not isinstance(value, tp)) or (
        tp is int and isinstance(value, bool)
    ):
        raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a parsed TOML table, checking keys and types."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {', '.join(unknown)}")
    kwargs = {
        key: _convert(hints[key], value, f"{where}.{key}" if where else key)
        for key, value in data.items()
    }
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


PROFILE_DIR = Path(__file__).resolve().parents[2] / "firmware_configs"


def load_config(path: Path | None, profile_dir: Path = PROFILE_DIR) -> AgentConfig:
    """The agent file's settings on top of its board profile's ``[agent]`` table."""
    data = _read_toml(path) if path is not None else {}
    board = data.get("board", "generic")
    if not isinstance(board, str) or not board.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"board: invalid profile name {board!r}")
    profile_path = profile_dir / f"{board}.toml"
    profile = _read_toml(profile_path).get("agent", {}) if profile_path.exists() else {}
    if board != "generic" and not profile_path.exists():
        raise ConfigError(f"board: no profile {profile_path}")
    return from_dict(AgentConfig, _merge(profile, data))
