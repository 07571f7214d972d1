"""Relay configuration: a tree of frozen dataclasses, read from TOML.

Every table and key of the file maps to one dataclass and field below; unknown
keys and wrong types are errors naming the key, so a typo never silently does
nothing. Command-line flags (``--data-dir``, ``--broker-url``) override the file.
"""

from __future__ import annotations

import dataclasses
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.service.tomlconf import ConfigError, from_dict, read_toml
from agent.signaling.mqtt import MqttTimers
from agent.signaling.topics import TopicError, check_device_id
from cloud_relay.pki import PkiSettings
from cloud_relay.turn import TurnSettings
from cloud_relay.webhooks import WebhookSettings

ANY_GROUP = "*"
"""In a call rule: any device, whether or not it belongs to a group."""


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Where the MQTT broker is, or how to run the embedded one."""

    url: str | None = None
    """External broker as ``mqtts://host:port`` (TLS with the relay's client certificate;
    the broker must trust the relay's CA) or ``mqtt://host:port`` (plain TCP: labs and
    benchmarks on loopback only); None: start and supervise our own mosquitto."""
    host: str = "127.0.0.1"
    """Embedded broker: listener address (``0.0.0.0`` for every interface)."""
    port: int = 8883
    """Embedded broker: listener TCP port."""
    tls: bool = True
    """Embedded broker: TLS with client certificates of the relay's CA and the device ACL.
    False: anonymous plain TCP, for labs and benchmarks on loopback only."""
    relay_port: int = 8884
    """Embedded TLS broker: the relay's own listener on 127.0.0.1, where the relay's
    workers and CLI connect (devices cannot: a device's client id there is free, and the
    relay ends a revoked device's session by taking its id over)."""
    binary: str = "mosquitto"
    """Embedded broker: the mosquitto executable (a name on PATH or a path)."""
    start_timeout: float = 10.0
    """Embedded broker: seconds it may take to accept TCP connections after being started."""
    stop_timeout: float = 10.0
    """Embedded broker: seconds it may take to exit after SIGTERM before it gets SIGKILL."""
    restart_min: float = 0.5
    """Embedded broker: first delay before restarting it after it died; doubles per failure."""
    restart_max: float = 30.0
    """Embedded broker: largest restart delay."""
    stable_after: float = 30.0
    """Embedded broker: seconds up after which the restart delay is ``restart_min`` again."""

    def __post_init__(self) -> None:
        if self.url is not None:
            parse_broker_url(self.url)
        for port in (self.port, self.relay_port):
            if not 0 < port < 65536:
                raise ValueError(f"port {port} out of range")
        if self.tls and self.url is None and self.relay_port == self.port:
            raise ValueError("relay_port must differ from port")
        if not 0 < self.restart_min <= self.restart_max:
            raise ValueError("need 0 < restart_min <= restart_max")
        for name in ("start_timeout", "stop_timeout", "stable_after"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")

    def endpoint(self) -> tuple[str, int]:
        """(host, port) where the relay's own clients (workers, CLI) reach the broker."""
        if self.url is not None:
            return parse_broker_url(self.url)
        if self.tls:
            return "127.0.0.1", self.relay_port
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return host, self.port

    @property
    def secure(self) -> bool:
        """Whether the broker is reached over TLS with client certificates."""
        return self.tls if self.url is None else self.url.startswith("mqtts:")


@dataclass(frozen=True, slots=True)
class MqttSettings(MqttTimers):
    """The relay's own MQTT connection. Timers are here so that tests can shrink them."""

    client_id: str = "relay-1"
    """MQTT client id; names the relay's persistent session. Unique per relay worker."""


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """Where the relay keeps devices, presence history, calls and commands."""

    url: str | None = None
    """SQLAlchemy URL (``postgresql+psycopg://...``); None: SQLite ``relay.db`` in the data dir."""


@dataclass(frozen=True, slots=True)
class GroupSettings:
    """A named set of devices, for call rules."""

    name: str
    """Group name, used in rules and stored as the device's group."""
    members: tuple[str, ...] = ()
    """Device ids in the group."""

    def __post_init__(self) -> None:
        if not self.name or self.name == ANY_GROUP:
            raise ValueError(f"bad group name {self.name!r}")
        for member in self.members:
            try:
                check_device_id(member)
            except TopicError as exc:
                raise ValueError(f"group {self.name!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class RuleSettings:
    """Devices of group ``caller`` may call devices of group ``callee``."""

    caller: str = ANY_GROUP
    """Group name, or ``*`` for any device."""
    callee: str = ANY_GROUP
    """Group name, or ``*`` for any device."""


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """Who may call whom. No rules at all: everybody may call everybody."""

    groups: tuple[GroupSettings, ...] = ()
    """Named groups of devices."""
    rules: tuple[RuleSettings, ...] = ()
    """Allowed (caller group, callee group) pairs; an invite matching none is refused."""

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError("group names must be unique")
        for rule in self.rules:
            for side in (rule.caller, rule.callee):
                if side != ANY_GROUP and side not in names:
                    raise ValueError(f"rule names unknown group {side!r}")

    def groups_of(self, device_id: str) -> frozenset[str]:
        return frozenset(g.name for g in self.groups if device_id in g.members)

    def allows(self, caller: str, callee: str) -> bool:
        """True if ``caller`` may invite ``callee``."""
        if not self.rules:
            return True
        mine, theirs = self.groups_of(caller), self.groups_of(callee)
        return any(
            (r.caller == ANY_GROUP or r.caller in mine)
            and (r.callee == ANY_GROUP or r.callee in theirs)
            for r in self.rules
        )


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    """Signaling checks."""

    max_age_ms: int = 60_000
    """Envelopes older than this (by their ``ts``) are dropped as stale."""
    max_skew_ms: int = 60_000
    """Envelopes further ahead of the relay's clock than this are dropped."""
    max_calls: int = 100_000
    """Calls the relay remembers in memory at most (the oldest are forgotten first)."""


@dataclass(frozen=True, slots=True)
class PresenceSettings:
    """How presence reports are taken."""

    offline_grace_s: float = 5.0
    """An offline report stands only if the device is not back online within this: shorter
    gaps are reconnects (a broker or relay restart makes the broker send every device's
    will, and the devices come straight back). Meanwhile the device counts as reachable;
    a lasting offline is recorded with the time it was reported. 0: take it at once."""

    def __post_init__(self) -> None:
        if not 0 <= self.offline_grace_s <= 300:
            raise ValueError("offline_grace_s must be within 0..300")


@dataclass(frozen=True, slots=True)
class PairingSettings:
    """The HTTPS pairing endpoint, what paired boards are told, and the attempt limits."""

    host: str = "0.0.0.0"
    """Listener address of the HTTPS endpoint."""
    port: int = 8443
    """Listener TCP port (0: any free port, for tests)."""
    public_host: str | None = None
    """Name or address boards reach this relay at: in tokens, the HTTPS and broker
    certificates, and the broker URL boards get. None: this machine's host name."""
    broker_url: str | None = None
    """The broker as boards reach it; None: ``mqtts://{public_host}:{broker.port}``."""
    token_ttl_s: float = 600.0
    """Default lifetime of a minted token."""
    per_source: int = 5
    """Attempts per source address per window."""
    overall: int = 30
    """Attempts in all per window."""
    window_s: float = 60.0
    lockout_after: int = 20
    """Failed attempts in one window after which pairing closes for ``lockout_s``."""
    lockout_s: float = 600.0

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} out of range")
        if self.broker_url is not None and not self.broker_url.startswith("mqtts://"):
            raise ValueError("broker_url: boards reach the broker over TLS (mqtts://)")
        for name in ("token_ttl_s", "per_source", "overall", "window_s", "lockout_after"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")

    def public(self) -> str:
        return self.public_host or socket.gethostname()


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """Prometheus metrics (``cloud_relay.metrics``), at ``GET /metrics`` on the HTTPS
    listener; like the API, a scrape needs an API token (``token new``)."""

    enabled: bool = True
    """Serve ``/metrics``."""


HA_STATE_ROOT = "edge-intercom"
"""Root of the states the relay publishes for Home Assistant, and of its buttons' presses."""
_TOPIC_LEVELS = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*")


@dataclass(frozen=True, slots=True)
class HomeAssistantSettings:
    """Home Assistant MQTT discovery (``cloud_relay.homeassistant``): entities per device
    on the relay's broker, which Home Assistant reads as an operator client."""

    enabled: bool = False
    """Publish discovery configs and states, and take the entities' button presses."""
    discovery_prefix: str = "homeassistant"
    """Home Assistant's discovery prefix (its MQTT integration's setting)."""
    call_targets: Mapping[str, str] = field(default_factory=dict)
    """The peer each device's Call button calls (``{door-a = "hall"}``); a device without
    one gets no Call button."""

    def __post_init__(self) -> None:
        if _TOPIC_LEVELS.fullmatch(self.discovery_prefix) is None:
            raise ValueError("discovery_prefix: topic levels of A-Z, a-z, 0-9, '_', '-'")
        if not isinstance(self.call_targets, Mapping):
            raise ValueError("call_targets: expected a table of device = peer")
        for device, peer in self.call_targets.items():
            for value in (device, peer):
                try:
                    check_device_id(value)
                except TopicError as exc:
                    raise ValueError(f"call_targets: {exc}") from None


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """The whole relay."""

    data_dir: str = "/var/lib/edge-intercom-relay"
    """Database, embedded broker config, persistence and log live here."""
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    presence: PresenceSettings = field(default_factory=PresenceSettings)
    pairing: PairingSettings = field(default_factory=PairingSettings)
    pki: PkiSettings = field(default_factory=PkiSettings)
    """Certificate lifetimes."""
    turn: TurnSettings = field(default_factory=TurnSettings)
    """TURN servers and the credentials the relay mints for calls."""
    pki_dir: str | None = None
    """The CA and the relay's certificates (``cloud_relay.pki``); None: ``data_dir/pki``.
    Relay workers on one machine share it."""
    webhooks: tuple[WebhookSettings, ...] = ()
    """Receivers of new alerts (``[[webhooks]]`` tables), each with its own URL."""
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    home_assistant: HomeAssistantSettings = field(default_factory=HomeAssistantSettings)

    def __post_init__(self) -> None:
        urls = [w.url for w in self.webhooks]
        if len(set(urls)) != len(urls):
            raise ValueError("webhooks: each URL may appear once")

    def store_url(self) -> str:
        if self.store.url is not None:
            return self.store.url
        return f"sqlite:///{Path(self.data_dir).resolve() / 'relay.db'}"

    def pki_directory(self) -> Path:
        return Path(self.pki_dir) if self.pki_dir is not None else Path(self.data_dir) / "pki"

    def pairing_url(self) -> str:
        """The HTTPS endpoint as tokens name it."""
        return f"https://{_url_host(self.pairing.public())}:{self.pairing.port}"

    def device_broker_url(self) -> str:
        """The broker as paired boards reach it."""
        if self.pairing.broker_url is not None:
            return self.pairing.broker_url
        if self.broker.url is not None:
            return self.broker.url.replace("mqtt://", "mqtts://", 1)
        return f"mqtts://{_url_host(self.pairing.public())}:{self.broker.port}"

    def certificate_hosts(self) -> list[str]:
        """Names and addresses in the HTTPS and broker certificates."""
        hosts = [self.pairing.public(), "localhost", "127.0.0.1"]
        return list(dict.fromkeys(hosts))


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_broker_url(url: str) -> tuple[str, int]:
    """``mqtt[s]://host[:port]`` to (host, port); anything else raises ``ValueError``."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"broker URL {url!r}: expected mqtt[s]://host[:port]")
    if parts.path not in ("", "/") or parts.query or parts.username:
        raise ValueError(f"broker URL {url!r}: only host and port are supported")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError as exc:
        raise ValueError(f"broker URL {url!r}: {exc}") from None
    return parts.hostname, port


def load_config(
    path: Path | None, *, data_dir: str | None = None, broker_url: str | None = None
) -> RelayConfig:
    """The file's settings (defaults without one), then the command-line overrides."""
    data: dict[str, Any] = read_toml(path) if path is not None else {}
    config = from_dict(RelayConfig, data)
    if data_dir is not None:
        config = dataclasses.replace(config, data_dir=data_dir)
    if broker_url is not None:
        try:
            broker = dataclasses.replace(config.broker, url=broker_url)
        except ValueError as exc:
            raise ConfigError(f"--broker-url: {exc}") from exc
        config = dataclasses.replace(config, broker=broker)
    return config


__all__ = [
    "ANY_GROUP",
    "HA_STATE_ROOT",
    "BrokerSettings",
    "ConfigError",
    "GroupSettings",
    "HomeAssistantSettings",
    "MetricsSettings",
    "MqttSettings",
    "PairingSettings",
    "PolicySettings",
    "RelayConfig",
    "RoutingSettings",
    "RuleSettings",
    "StoreSettings",
    "WebhookSettings",
    "load_config",
    "parse_broker_url",
]
