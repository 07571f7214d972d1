"""Alerts on the wire: the ``alert`` message a board sends and the relay's ``alert/ack``.

Pure codecs shared by the agent (outbox, uplink) and the relay, so that both sides
accept exactly the same messages. Parsing is strict: unknown or missing fields,
wrong types, out-of-range numbers and oversized payloads raise ``AlertError``,
whose ``label`` is a fixed word fit for a counter; names from the wire stay in
the text.

An alert's ``id`` (128 random bits, hex) is chosen once, on the board, before the
alert is stored in the outbox: every resend carries the same id, which is what
lets the relay store each alert exactly once.

Times are integer milliseconds since the Unix epoch (UTC), like envelope ``ts``.

An alert may carry ``clip``: a few seconds of the sound around it, sealed to the relay's
clip key (``agent.edge.clip``), as base64. Such an alert is version 2 (``CLIP_VERSION``),
so that a relay that knows nothing of clips refuses it rather than dropping the clip
unseen; one without a clip stays version 1. Here the clip is only checked for its size:
what is inside is the relay's to open (``agent.edge.clip``), and a clip that does not
open costs the alert its clip, never the alert itself.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from agent.edge.clip import MAX_CLIP_TEXT

ALERT_VERSION: Final = 1
"""``v`` of an alert message without a clip; a relay refuses versions it does not know, so
new fields need a new version."""

CLIP_VERSION: Final = 2
"""``v`` of an alert message with a ``clip``."""

MAX_ALERT_BYTES: Final = 4096 + MAX_CLIP_TEXT
"""Largest alert message accepted: a few hundred bytes, plus the clip if it has one."""

MAX_ACK_BYTES: Final = 8192
MAX_ACK_IDS: Final = 100
"""Most ids in one ``alert/ack`` (each 34 bytes encoded: well under ``MAX_ACK_BYTES``)."""

MAX_DETAIL: Final = 16
"""Most entries in an alert's ``detail``."""

MAX_TEXT: Final = 200
"""Longest string value in ``detail``."""

OUTBOX_OVERFLOW: Final = "outbox_overflow"
"""``kind`` of the alert a board raises about alerts its full outbox dropped."""

TAMPER: Final = "tamper"
"""``kind`` of the alert a board's tamper switch raises when its enclosure is opened
(detector ``gpio``, severity critical: ``agent.gpio.board``)."""

SELFTEST_FAILED: Final = "selftest_failed"
"""``kind`` of the alert a board raises when its audio self-test failed twice in a row
(``agent.service.selftest``); severity warning."""

_ID = re.compile(r"[0-9a-f]{32}")
_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
_FIELDS: Final = frozenset(
    {"v", "id", "detector", "kind", "severity", "start", "end", "confidence", "level",
     "created", "detail", "clip"}
)  # fmt: skip
_MAX_MS: Final = 2**53
"""Times beyond this are not exact in JSON numbers (and are nonsense anyway)."""


class AlertError(ValueError):
    """A malformed ``alert`` or ``alert/ack`` payload; ``label`` names what was wrong."""

    def __init__(self, message: str, label: str) -> None:
        super().__init__(message)
        self.label = label


class Severity(StrEnum):
    """How urgent an alert is; a full outbox drops the lowest first."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """0 (info) to 2 (critical)."""
        return _RANK[self]


_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}

Detail = Mapping[str, str | int | float | bool]


def new_alert_id() -> str:
    """128 random bits as 32 lowercase hex digits."""
    return secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class Alert:
    """One event a detector raised (or the outbox, about itself)."""

    id: str
    """32 lowercase hex digits (``new_alert_id``); the same on every resend."""
    detector: str
    """Which detector raised it, e.g. ``alarm``, ``glass``, ``outbox``."""
    kind: str
    """What it found, e.g. ``smoke``, ``co``, ``alarm_sound``, ``outbox_overflow``, ``tamper``."""
    severity: Severity
    start: int
    """When the event began, ms since the Unix epoch."""
    end: int
    """When it ended (or was last seen), ms since the Unix epoch; >= ``start``."""
    confidence: float
    """0 to 1."""
    level: float
    """Sound level of the event in dB (the detector says which weighting in ``detail``)."""
    created: int
    """When the board raised it, ms since the Unix epoch."""
    detail: Detail = field(default_factory=dict)
    """Up to ``MAX_DETAIL`` flat, detector-specific values (e.g. ``dropped`` counts)."""
    clip: str | None = None
    """The sealed audio clip (``agent.edge.clip.SealedClip.to_text``), if it has one."""

    def __post_init__(self) -> None:
        _check(self)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the wire form."""
        data: dict[str, Any] = {
            "v": ALERT_VERSION if self.clip is None else CLIP_VERSION,
            "id": self.id,
            "detector": self.detector,
            "kind": self.kind,
            "severity": self.severity.value,
            "start": self.start,
            "end": self.end,
            "confidence": self.confidence,
            "level": self.level,
            "created": self.created,
            "detail": dict(self.detail),
        }
        if self.clip is not None:
            data["clip"] = self.clip
        return data

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON (the ``alert`` payload)."""
        data = json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode()
        if len(data) > MAX_ALERT_BYTES:
            raise AlertError(f"alert is {len(data)} bytes, over {MAX_ALERT_BYTES}", "size")
        return data

    @classmethod
    def from_dict(cls, data: object) -> Alert:
        """Validate a decoded JSON object; ``AlertError`` says what is wrong."""
        if not isinstance(data, dict):
            raise AlertError("alert must be a JSON object", "json")
        unknown = data.keys() - _FIELDS
        if unknown:
            raise AlertError(f"unknown alert fields {sorted(unknown)[:5]!r}", "fields")
        missing = (_FIELDS - {"detail", "clip"}) - data.keys()
        if missing:
            raise AlertError(f"missing alert fields {sorted(missing)!r}", "fields")
        version = ALERT_VERSION if data.get("clip") is None else CLIP_VERSION
        if data["v"] != version or isinstance(data["v"], bool):
            raise AlertError(f"alert version {str(data['v'])[:20]!r} is not {version}", "v")
        severity = data["severity"]
        if not isinstance(severity, str) or severity not in _SEVERITIES:
            raise AlertError(f"severity {str(severity)[:20]!r} unknown", "severity")
        detail = data.get("detail", {})
        if not isinstance(detail, dict):
            raise AlertError("detail must be a JSON object", "detail")
        return cls(
            id=data["id"],
            detector=data["detector"],
            kind=data["kind"],
            severity=Severity(severity),
            start=data["start"],
            end=data["end"],
            confidence=_number(data["confidence"], "confidence"),
            level=_number(data["level"], "level"),
            created=data["created"],
            detail=detail,
            clip=data.get("clip"),
        )


_SEVERITIES = frozenset(s.value for s in Severity)


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AlertError(f"{name} must be a number", name)
    return float(value)


def _check(alert: Alert) -> None:
    """Every rule of the wire form; the constructor runs it, so no invalid ``Alert`` exists."""
    if not isinstance(alert.id, str) or _ID.fullmatch(alert.id) is None:
        raise AlertError(f"alert id {str(alert.id)[:40]!r} is not 32 hex digits", "id")
    for name in ("detector", "kind"):
        value = getattr(alert, name)
        if not isinstance(value, str) or _NAME.fullmatch(value) is None:
            raise AlertError(f"{name} {str(value)[:40]!r}: use 1-40 of a-z, 0-9, '_'", name)
    if not isinstance(alert.severity, Severity):
        raise AlertError("severity must be a Severity", "severity")
    for name in ("start", "end", "created"):
        value = getattr(alert, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX_MS:
            raise AlertError(f"{name} must be ms since the epoch (an integer)", name)
    if alert.end < alert.start:
        raise AlertError("end is before start", "end")
    for name in ("confidence", "level"):
        value = getattr(alert, name)
        finite = isinstance(value, int | float) and math.isfinite(value)
        if isinstance(value, bool) or not finite:
            raise AlertError(f"{name} must be a finite number", name)
    if not 0.0 <= alert.confidence <= 1.0:
        raise AlertError(f"confidence {alert.confidence} is not within 0-1", "confidence")
    if not -200.0 <= alert.level <= 200.0:
        raise AlertError(f"level {alert.level} dB is out of range", "level")
    _check_detail(alert.detail)
    if alert.clip is not None and (not isinstance(alert.clip, str) or not alert.clip
                                   or len(alert.clip) > MAX_CLIP_TEXT):  # fmt: skip
        raise AlertError(f"clip must be 1 to {MAX_CLIP_TEXT} characters of base64", "clip")


def _check_detail(detail: object) -> None:
    if not isinstance(detail, Mapping):
        raise AlertError("detail must be a mapping", "detail")
    if len(detail) > MAX_DETAIL:
        raise AlertError(f"detail has {len(detail)} entries, over {MAX_DETAIL}", "detail")
    for key, value in detail.items():
        if not isinstance(key, str) or _NAME.fullmatch(key) is None:
            raise AlertError(f"detail key {str(key)[:40]!r}: use a-z, 0-9, '_'", "detail")
        if isinstance(value, str):
            if len(value) > MAX_TEXT:
                raise AlertError(f"detail {key!r} is over {MAX_TEXT} characters", "detail")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise AlertError(f"detail {key!r} is not finite", "detail")
        elif not isinstance(value, int | bool):
            raise AlertError(f"detail {key!r} must be a string, number or boolean", "detail")


def _loads(payload: bytes, limit: int, what: str) -> object:
    if not isinstance(payload, bytes | bytearray):
        raise AlertError(f"{what} payload must be bytes", "json")
    if len(payload) > limit:
        raise AlertError(f"{what} is {len(payload)} bytes, over {limit}", "size")
    try:
        return json.loads(payload, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AlertError(f"{what} is not JSON: {exc}", "json") from None


def _refuse_constant(name: str) -> object:
    raise AlertError(f"{name} is not a JSON number", "json")


def decode_alert(payload: bytes) -> Alert:
    """Parse an ``alert`` payload; ``AlertError`` if it is not a valid alert."""
    return Alert.from_dict(_loads(payload, MAX_ALERT_BYTES, "alert"))


def encode_ack(ids: Iterable[str]) -> bytes:
    """The ``alert/ack`` payload ``{"ids": [...]}`` for 1 to ``MAX_ACK_IDS`` alert ids."""
    listed = list(ids)
    _check_ids(listed)
    return json.dumps({"ids": listed}, separators=(",", ":")).encode()


def decode_ack(payload: bytes) -> tuple[str, ...]:
    """The alert ids of an ``alert/ack`` payload; ``AlertError`` if it is malformed."""
    data = _loads(payload, MAX_ACK_BYTES, "ack")
    if not isinstance(data, dict) or data.keys() != {"ids"}:
        raise AlertError('ack must be a JSON object {"ids": [...]}', "fields")
    ids = data["ids"]
    if not isinstance(ids, list):
        raise AlertError("ack ids must be a list", "ids")
    _check_ids(ids)
    return tuple(ids)


def _check_ids(ids: list[Any]) -> None:
    if not 1 <= len(ids) <= MAX_ACK_IDS:
        raise AlertError(f"ack must name 1 to {MAX_ACK_IDS} ids, not {len(ids)}", "ids")
    for value in ids:
        if not isinstance(value, str) or _ID.fullmatch(value) is None:
            raise AlertError(f"ack id {str(value)[:40]!r} is not 32 hex digits", "ids")


__all__ = [
    "ALERT_VERSION",
    "CLIP_VERSION",
    "MAX_ACK_IDS",
    "MAX_ALERT_BYTES",
    "OUTBOX_OVERFLOW",
    "SELFTEST_FAILED",
    "TAMPER",
    "Alert",
    "AlertError",
    "Severity",
    "decode_ack",
    "decode_alert",
    "encode_ack",
    "new_alert_id",
]
