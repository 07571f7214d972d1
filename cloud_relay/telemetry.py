"""Device telemetry (``dev/{id}/telemetry``, QoS 0) as the relay takes it: a JSON object of
at most ``MAX_TELEMETRY_BYTES`` with an optional ``event`` name (``call-ended`` with the
call's ``media`` statistics, ``audio-flowing``, ``selftest``, ``levels``, ...). Pure."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

MAX_TELEMETRY_BYTES: Final = 8192
CALL_ENDED: Final = "call-ended"
CALL_STATS: Final = "call-stats"
"""A side's media statistics every few seconds of a call: live calls show their quality."""
LEVELS: Final = "levels"
"""Records of signal levels (sound level, Wi-Fi, CPU...): the devices list shows the last."""
_EVENT = re.compile(r"[a-z][a-z0-9_-]{0,39}")
_CALL = re.compile(r"[A-Za-z0-9_-]{1,32}")


class TelemetryError(ValueError):
    """A payload that is not a telemetry record; the text says why."""


@dataclass(frozen=True, slots=True)
class Telemetry:
    event: str
    """"" when the record names none."""
    record: dict[str, Any]

    def call_stats(self) -> tuple[str, dict[str, Any]] | None:
        """(call id, media statistics) of a ``call-stats`` or ``call-ended`` record that
        has them (the latest one a side sends stands)."""
        call, media = self.record.get("call_id"), self.record.get("media")
        if self.event not in (CALL_STATS, CALL_ENDED) or not isinstance(media, dict):
            return None
        if not isinstance(call, str) or _CALL.fullmatch(call) is None:
            return None
        return call, media


def parse_telemetry(payload: bytes) -> Telemetry:
    if len(payload) > MAX_TELEMETRY_BYTES:
        raise TelemetryError(f"larger than {MAX_TELEMETRY_BYTES} bytes")
    try:
        raw = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TelemetryError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise TelemetryError("not a JSON object")
    event = raw.get("event", "")
    if event != "" and (not isinstance(event, str) or _EVENT.fullmatch(event) is None):
        raise TelemetryError("event: must be a name of 1-40 of a-z, 0-9, '_', '-'")
    return Telemetry(event, raw)
