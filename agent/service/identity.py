"""The board's identity from pairing, on disk under the state directory.

``identity`` is a symbolic link to a directory ``identity-<time>`` holding the device
key (``device-key.pem``, 0600: made on the board, it never leaves it), its
certificate, the relay's CA and ``enrollment.json`` (device id, broker, TURN servers).
Pairing again writes a new directory and swaps the link with one ``rename``, so a
power cut leaves the old identity or the new one, never half of each.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.service.files import write_atomic
from agent.signaling.mqtt import MqttTls
from agent.signaling.topics import TopicError, check_device_id

logger = logging.getLogger(__name__)

LINK = "identity"
KEY_FILE = "device-key.pem"
CERT_FILE = "device.pem"
CA_FILE = "ca.pem"
ENROLLMENT_FILE = "enrollment.json"
MQTTS_PORT = 8883


class IdentityError(ValueError):
    """The identity on disk is damaged or incomplete: pair the board again."""


def parse_broker(url: str) -> tuple[str, int]:
    """``mqtts://host[:port]`` to (host, port): devices reach the broker over TLS only."""
    parts = urlsplit(url)
    if parts.scheme != "mqtts" or not parts.hostname:
        raise IdentityError(f"broker {url!r}: expected mqtts://host[:port]")
    try:
        return parts.hostname, parts.port or MQTTS_PORT
    except ValueError as exc:
        raise IdentityError(f"broker {url!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Identity:
    device_id: str
    directory: Path
    broker_host: str
    broker_port: int
    turn: tuple[Mapping[str, Any], ...] = ()
    """TURN servers the relay named (``{"urls": [...]}``); credentials come per call."""

    @property
    def key_path(self) -> Path:
        return self.directory / KEY_FILE

    @property
    def cert_path(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def ca_path(self) -> Path:
        return self.directory / CA_FILE

    def mqtt_tls(self) -> MqttTls:
        return MqttTls(ca_file=self.ca_path, cert_file=self.cert_path, key_file=self.key_path)


def load_identity(state_dir: Path) -> Identity | None:
    """The board's identity; None if it was never paired, ``IdentityError`` if damaged."""
    link = state_dir / LINK
    if not link.exists():
        return None
    directory = link.resolve()
    try:
        raw = json.loads((directory / ENROLLMENT_FILE).read_text())
        device_id = check_device_id(raw["device_id"])
        host, port = parse_broker(raw["broker"])
        turn = tuple(dict(server) for server in raw.get("turn", ()))
    except (OSError, ValueError, KeyError, TypeError, TopicError) as exc:
        raise IdentityError(f"identity in {directory} is damaged: {exc}") from None
    for name in (KEY_FILE, CERT_FILE, CA_FILE):
        if not (directory / name).is_file():
            raise IdentityError(f"identity in {directory} lacks {name}")
    if (directory / KEY_FILE).stat().st_mode & 0o077:
        raise IdentityError(f"{directory / KEY_FILE} is readable by others: pair again")
    return Identity(device_id, directory, host, port, turn)


def save_identity(
    state_dir: Path,
    key_pem: bytes,
    cert_pem: bytes,
    ca_pem: bytes,
    enrollment: Mapping[str, Any],
    *,
    owner: tuple[int, int] | None = None,
) -> Identity:
    """Write a new identity and make it the current one; the previous one is removed.

    ``owner`` (uid, gid): the service user that must read the key (pairing runs as root).
    """
    state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    directory = state_dir / f"{LINK}-{time.time_ns()}"
    directory.mkdir(mode=0o700)
    write_atomic(directory / KEY_FILE, key_pem, 0o600)
    write_atomic(directory / CERT_FILE, cert_pem, 0o644)
    write_atomic(directory / CA_FILE, ca_pem, 0o644)
    write_atomic(
        directory / ENROLLMENT_FILE, json.dumps(dict(enrollment), indent=2).encode(), 0o644
    )
    if owner is not None:
        for path in (directory, *directory.iterdir()):
            os.chown(path, *owner)
    link = state_dir / LINK
    previous = link.resolve() if link.is_symlink() else None
    tmp = state_dir / f".{LINK}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(directory.name)
    os.replace(tmp, link)
    if previous is not None and previous != directory:
        shutil.rmtree(previous, ignore_errors=True)
    identity = load_identity(state_dir)
    assert identity is not None
    logger.info("device %s: identity saved in %s", identity.device_id, directory)
    return identity
