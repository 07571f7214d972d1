"""Device presence: the retained ``dev/{id}/presence`` payload and the relay's view of it.

Pure: ``parse_presence`` checks a payload, ``PresenceTable`` keeps the latest
state per device and says whether a new report changes it. The relay writes
changes to the store; history gets one row per change, not per repeat (a
retained message seen again after a reconnect is not a new event).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

OFFLINE = "offline"
MAX_PRESENCE_BYTES = 4096

_TOKEN = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_TEXT = re.compile(r"[\x20-\x7e]{1,100}")


class PresenceError(ValueError):
    """A presence payload that cannot be used; the text says why."""


@dataclass(frozen=True, slots=True)
class Presence:
    state: str
    """``online``, ``offline`` (the will), or another token a device reports (``busy``, ...)."""
    board: str | None = None
    version: str | None = None

    @property
    def reachable(self) -> bool:
        return self.state != OFFLINE


def _text(raw: Mapping[str, object], key: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or _TEXT.fullmatch(value) is None:
        raise PresenceError(f"{key}: must be 1-100 printable ASCII characters")
    return value


def parse_presence(payload: bytes) -> Presence:
    """A device's presence JSON (``state`` required; ``board``, ``version`` optional)."""
    if len(payload) > MAX_PRESENCE_BYTES:
        raise PresenceError(f"larger than {MAX_PRESENCE_BYTES} bytes")
    try:
        raw = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PresenceError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise PresenceError("must be a JSON object")
    state = raw.get("state")
    if not isinstance(state, str) or _TOKEN.fullmatch(state) is None:
        raise PresenceError("state: must be a token of 1-32 of a-z, 0-9, '_', '-'")
    return Presence(state=state, board=_text(raw, "board"), version=_text(raw, "version"))


class PresenceTable:
    """Latest presence state of every device the relay knows (from the store, then MQTT)."""

    def __init__(self, known: Mapping[str, str | None] | None = None) -> None:
        self._state: dict[str, str | None] = dict(known or {})

    def update(self, device: str, state: str) -> bool:
        """Record ``state``; True if it differs from what was known (a history event)."""
        changed = self._state.get(device) != state or device not in self._state
        self._state[device] = state
        return changed

    def known(self, device: str) -> bool:
        return device in self._state

    def online(self) -> int:
        """How many devices are online now."""
        return sum(state == "online" for state in self._state.values())

    def state(self, device: str) -> str | None:
        """The last state, None if unknown or never reported."""
        return self._state.get(device)

    def reachable(self, device: str) -> bool:
        state = self._state.get(device)
        return state is not None and state != OFFLINE

    def devices(self) -> Iterable[str]:
        return list(self._state)
