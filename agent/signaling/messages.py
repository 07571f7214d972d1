"""The signaling messages of one call, carrier-neutral (a pipe today, MQTT next).

Each is a frozen dataclass with ``to_json``/``from_json``; ``from_json``
validates everything, because these arrive from the network: a bad message
raises ``SignalError`` naming the problem, never anything else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE_BYTES = 64 * 1024
"""Larger messages are refused unparsed (an SDP for one audio stream is ~2-6 KiB)."""


class SignalError(ValueError):
    """A signaling message that cannot be used; the text says why."""


@dataclass(frozen=True, slots=True)
class Description:
    """An SDP offer or answer."""

    kind: str  # "offer" | "answer"
    sdp: str


@dataclass(frozen=True, slots=True)
class RemoteCandidate:
    """A trickled ICE candidate (the ``candidate:`` attribute value); None ends the list."""

    candidate: str | None


@dataclass(frozen=True, slots=True)
class Hangup:
    reason: str = "hangup"


Signal = Description | RemoteCandidate | Hangup


def to_json(signal: Signal) -> str:
    body: dict[str, Any]
    match signal:
        case Description(kind, sdp):
            body = {"type": kind, "sdp": sdp}
        case RemoteCandidate(candidate):
            body = {"type": "candidate", "candidate": candidate}
        case Hangup(reason):
            body = {"type": "hangup", "reason": reason}
    return json.dumps(body, separators=(",", ":"))


def _string(body: dict[str, Any], key: str, *, optional: bool = False) -> Any:
    value = body.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise SignalError(f"{body.get('type')} message: {key!r} must be a string")
    return value


def from_json(text: str | bytes) -> Signal:
    """Parse and check one message."""
    if len(text) > MAX_MESSAGE_BYTES:
        raise SignalError(f"message of {len(text)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise SignalError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise SignalError("message must be a JSON object")
    kind = body.get("type")
    if kind in ("offer", "answer"):
        return Description(kind, _string(body, "sdp"))
    if kind == "candidate":
        return RemoteCandidate(_string(body, "candidate", optional=True))
    if kind == "hangup":
        return Hangup(_string(body, "reason", optional=True) or "hangup")
    raise SignalError(f"unknown message type {kind!r}")
