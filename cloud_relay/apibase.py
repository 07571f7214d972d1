"""What every part of the JSON API shares: who is asking, bad requests, JSON bodies, and
the building blocks of the OpenAPI document."""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web

from cloud_relay.sessions import Session

API_PREFIX: Final = "/api/v1"
MAX_BODY_BYTES: Final = 16_384
"""A JSON request body larger than this is a 400 (the endpoints take a few fields)."""
DEVICE_ID: Final = r"[a-z0-9][a-z0-9-]{0,62}"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is from: an API token's name, or a logged-in user."""

    name: str
    session: Session | None = None
    """The session of a request authenticated by its cookie; None for an API token."""


PRINCIPAL: Final = web.RequestKey("principal", Principal)


class BadRequest(ValueError):
    """A request parameter that is not acceptable; ``label`` (the parameter) is counted."""

    def __init__(self, label: str, message: str) -> None:
        super().__init__(message)
        self.label = label


def pattern(name: str, value: str, regex: str) -> str:
    if re.fullmatch(regex, value) is None:
        raise BadRequest(name, f"{name} {value[:80]!r} must match {regex}")
    return value


def parse_time(name: str, value: str) -> datetime:
    try:
        at = datetime.fromisoformat(value)
        # Naive: UTC. Far ends of the calendar with an offset overflow when moved to UTC.
        return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    except (ValueError, OverflowError):
        raise BadRequest(
            name, f"{name} must be an ISO 8601 time, e.g. 2026-01-31T08:00:00Z"
        ) from None


def parse_int(name: str, value: str, low: int, high: int) -> int:
    if re.fullmatch(r"\d{1,6}", value) is None or not low <= int(value) <= high:
        raise BadRequest(name, f"{name} must be an integer from {low} to {high}")
    return int(value)


def iso(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(UTC).isoformat()


def query_keys(request: web.Request, allowed: Collection[str]) -> dict[str, str]:
    """The query as a dict; ``BadRequest`` for an unknown or repeated parameter."""
    seen: dict[str, str] = {}
    for key, value in request.query.items():
        if key not in allowed:
            raise BadRequest("unknown", f"unknown parameter {key[:40]!r}")
        if key in seen:
            raise BadRequest(key, f"{key} given more than once")
        seen[key] = value
    return seen


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; ``BadRequest`` for anything else."""
    if request.content_type != "application/json":
        raise BadRequest("body", "the body must be JSON (Content-Type: application/json)")
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise BadRequest("body", f"the body must be at most {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest("body", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("body", "the body must be a JSON object")
    return body


def fields(body: Mapping[str, Any], allowed: Collection[str]) -> None:
    """``BadRequest`` if ``body`` has a field not in ``allowed``."""
    for key in body:
        if key not in allowed:
            raise BadRequest("body", f"unknown field {str(key)[:40]!r}")


def text_field(
    body: Mapping[str, Any], key: str, *, required: bool = False, most: int = 200
) -> str | None:
    """A string field of 1 to ``most`` printable characters (absent or null: None)."""
    value = body.get(key)
    if value is None:
        if required:
            raise BadRequest(key, f"{key} is required")
        return None
    if not isinstance(value, str) or not 0 < len(value) <= most or not value.isprintable():
        raise BadRequest(key, f"{key} must be 1 to {most} printable characters")
    return value


def error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": kind, "message": message}, status=status)


# --- OpenAPI building blocks ---------------------------------------------------------------


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_reply(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref(schema)}}}


def json_request(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


def path_param(name: str, description: str, regex: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "pattern": f"^{regex}$"},
    }


REFUSED: Final = {
    "401": json_reply(
        "No valid API token or session (missing, unknown, expired, revoked)", "Error"
    ),
    "403": json_reply("A session's change without its CSRF token", "Error"),
    "429": {
        **json_reply("Too many bad tokens from this source", "Error"),
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    },
}
BAD: Final = {"400": json_reply("A bad parameter or body; the message names it", "Error")}
TIME: Final = {"type": "string", "format": "date-time"}
NULLABLE_TIME: Final = {"type": ["string", "null"], "format": "date-time"}
NULLABLE_TEXT: Final = {"type": ["string", "null"], "minLength": 1, "maxLength": 200}
