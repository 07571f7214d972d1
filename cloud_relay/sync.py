"""Call table sync between relay workers sharing the signaling load.

Relay workers take devices' ``out`` messages from one MQTT v5 shared subscription,
so the broker hands the messages of one call to any of them: worker A may route
the ``invite`` and worker B the ``accept``. Each worker therefore tells the others
about every call event it routes (opened, answered, ended) on ``RELAY_SYNC_TOPIC``,
and applies theirs to its own call table (``Router.apply``), without store writes
(the worker that routed the message wrote them).

Ordering makes this enough: a worker publishes the sync message before it
forwards the routed envelope, on the same connection, so the broker fans the sync
message out first; the callee can only answer what it was forwarded, and the
broker delivers to each worker in order, so every worker has the call before it
can receive any reply about it.

Pure: ``encode``/``decode`` of one JSON message ``{"worker": ID, "events": [...]}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from agent.signaling.topics import ROOT, is_device_id, is_web_peer
from cloud_relay.routing import CallAnswered, CallEnded, CallEvent, CallStarted

RELAY_SYNC_TOPIC = f"{ROOT}/relay/calls"
"""Every worker publishes its routed call events here and subscribes to everyone's."""

MAX_SYNC_BYTES = 16_384


class SyncError(ValueError):
    """A sync message that cannot be used; the text says why."""


def encode(worker: str, events: Sequence[CallEvent]) -> bytes:
    out: list[dict[str, str]] = []
    for event in events:
        match event:
            case CallStarted(call=call, caller=caller, callee=callee, mode=mode):
                out.append(
                    {
                        "op": "started",
                        "call": call,
                        "caller": caller,
                        "callee": callee,
                        "mode": mode,
                    }
                )
            case CallAnswered(call=call):
                out.append({"op": "answered", "call": call})
            case CallEnded(call=call, reason=reason):
                out.append({"op": "ended", "call": call, "reason": reason})
    return json.dumps({"worker": worker, "events": out}, separators=(",", ":")).encode()


def _text(raw: dict[str, Any], key: str, *, device: bool = False) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= 128:
        raise SyncError(f"{key}: must be a string of 1-128 characters")
    if device and not (is_device_id(value) or is_web_peer(value)):
        raise SyncError(f"{key}: not a device id (nor a web peer's)")
    return value


def _event(raw: object) -> CallEvent:
    if not isinstance(raw, dict):
        raise SyncError("each event must be an object")
    call = _text(raw, "call")
    match raw.get("op"):
        case "started":
            return CallStarted(
                call, _text(raw, "caller", device=True), _text(raw, "callee", device=True),
                _text(raw, "mode"),
            )  # fmt: skip
        case "answered":
            return CallAnswered(call)
        case "ended":
            return CallEnded(call, _text(raw, "reason"))
        case op:
            raise SyncError(f"unknown op {str(op)[:40]!r}")


def decode(payload: bytes) -> tuple[str, tuple[CallEvent, ...]]:
    """(the sending worker's id, its events); ``SyncError`` for anything malformed."""
    if len(payload) > MAX_SYNC_BYTES:
        raise SyncError(f"larger than {MAX_SYNC_BYTES} bytes")
    try:
        raw = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SyncError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("events"), list):
        raise SyncError("must be an object with an 'events' list")
    return _text(raw, "worker"), tuple(_event(e) for e in raw["events"])
