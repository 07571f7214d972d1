"""``GET /api/v1/alert-counts``: alerts per UTC day per kind, for the dashboard's chart.

``days`` (1 to ``MAX_DAYS``, default ``DEFAULT_DAYS``) is the window, today included;
``device`` narrows it to one device. The reply lists every day of the window, oldest
first, and for each kind seen in it one count per day (zeros included), so that a page
draws it without filling gaps: ``{"days": [...], "counts": {kind: [n, ...]}}``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Final

from aiohttp import web

from cloud_relay.apibase import (
    API_PREFIX,
    BAD,
    DEVICE_ID,
    REFUSED,
    json_reply,
    parse_int,
    pattern,
    query,
    query_keys,
)
from cloud_relay.store import Store

ALERT_COUNTS_PATH: Final = f"{API_PREFIX}/alert-counts"
DEFAULT_DAYS: Final = 14
MAX_DAYS: Final = 366


def day_counts(rows: list[tuple[str, str, int]], first: datetime, days: int) -> dict[str, Any]:
    """The reply for ``rows`` (day, kind, count) over ``days`` days from ``first``."""
    labels = [(first + timedelta(days=n)).date().isoformat() for n in range(days)]
    index = {day: n for n, day in enumerate(labels)}
    counts: dict[str, list[int]] = {}
    for day, kind, n in rows:
        if day in index:  # a row on the window's edge in another time zone's day
            counts.setdefault(kind, [0] * days)[index[day]] += n
    return {"days": labels, "counts": dict(sorted(counts.items()))}


async def alert_counts(store: Store, request: web.Request) -> web.Response:
    q = query_keys(request, ("days", "device"))
    days = parse_int("days", q["days"], 1, MAX_DAYS) if "days" in q else DEFAULT_DAYS
    device = pattern("device", q["device"], DEVICE_ID) if "device" in q else None
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    first = today - timedelta(days=days - 1)
    rows = await store.run(lambda: store.alert_day_counts(first, device=device))
    return web.json_response(day_counts(rows, first, days))


ALERT_COUNTS_PATHS: Final[dict[str, Any]] = {
    ALERT_COUNTS_PATH: {
        "get": {
            "operationId": "countAlertsPerDay",
            "summary": "Alerts received per UTC day per kind, every day of the window listed",
            "parameters": [
                query(
                    "days",
                    f"The window in days, today included ({DEFAULT_DAYS})",
                    {"type": "integer", "minimum": 1, "maximum": MAX_DAYS},
                ),
                query(
                    "device",
                    "Only this device's",
                    {"type": "string", "pattern": f"^{DEVICE_ID}$"},
                ),
            ],
            "responses": {
                "200": json_reply("Counts per day per kind", "AlertCounts"),
                **BAD,
                **REFUSED,
            },
        }
    }
}
ALERT_COUNTS_SCHEMAS: Final[dict[str, Any]] = {
    "AlertCounts": {
        "type": "object",
        "required": ["days", "counts"],
        "properties": {
            "days": {"type": "array", "items": {"type": "string", "format": "date"}},
            "counts": {
                "type": "object",
                "description": "Per kind: one count per day of days",
                "additionalProperties": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0},
                },
            },
        },
    }
}
