"""The relay's JSON API (aiohttp handlers), for the dashboard and for scripts.

Every request needs an API token (``cloud_relay.tokens``) except the ones ``WebServer``
exempts (pairing, which has its own one-time secrets): ``Authorization: Bearer
eirt_...``, else 401 with ``WWW-Authenticate: Bearer`` and no word on what was wrong,
or 429 with ``Retry-After`` for a source that sent too many bad tokens.

``OPENAPI`` (served at ``/api/v1/openapi.json``) documents the endpoints:

- ``GET /api/v1/alerts``: stored alerts, newest first, filtered by ``device``,
  ``kind``, ``severity`` and a ``since``/``until`` window on when the relay received
  them; pages of ``limit`` (at most ``MAX_LIMIT``), the reply's ``next`` is the
  ``before`` of the next page (null on the last).
- ``GET /api/v1/alerts/{id}``: one alert.
- ``GET /api/v1/alerts/{id}/clip``: its audio clip as Ogg Opus, decrypted for this
  reply only (nothing in clear is written anywhere; ``Cache-Control: no-store``).
- ``POST /api/v1/alerts/{id}/ack``: acknowledge it, as the token's name; the first
  acknowledgement stands, so doing it again is harmless.

A bad query or path parameter is a 400 with a message that names it, counted in
``Api.bad_requests``; store work runs on the store's thread, decryption in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Middleware

from agent.edge.alerts import Severity
from agent.edge.clip import ClipError
from cloud_relay.clips import ClipKey, ogg_opus, open_clip
from cloud_relay.store import AlertCursor, AlertRecord, ApiTokenRecord, Store
from cloud_relay.tokens import Authenticator, Refusal, Refused

logger = logging.getLogger(__name__)

API_PREFIX: Final = "/api/v1"
OPENAPI_PATH: Final = f"{API_PREFIX}/openapi.json"
ALERTS_PATH: Final = f"{API_PREFIX}/alerts"
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 500
_TOKEN_KEY: Final = web.RequestKey("api_token", ApiTokenRecord)

_DEVICE = r"[a-z0-9][a-z0-9-]{0,62}"
_NAME = r"[a-z][a-z0-9_]{0,39}"
_ALERT_ID = r"[0-9a-f]{32}"
_CURSOR = re.compile(rf"(-?\d{{1,19}}):({_ALERT_ID})")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class BadRequest(ValueError):
    """A request parameter that is not acceptable; ``label`` (the parameter) is counted."""

    def __init__(self, label: str, message: str) -> None:
        super().__init__(message)
        self.label = label


@dataclass(frozen=True, slots=True)
class AlertQuery:
    """``GET /api/v1/alerts``'s validated query."""

    device: str | None = None
    kind: str | None = None
    severity: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    before: AlertCursor | None = None
    limit: int = DEFAULT_LIMIT


def _pattern(name: str, value: str, pattern: str) -> str:
    if re.fullmatch(pattern, value) is None:
        raise BadRequest(name, f"{name} {value[:80]!r} must match {pattern}")
    return value


def _time(name: str, value: str) -> datetime:
    try:
        at = datetime.fromisoformat(value)
        # Naive: UTC. Far ends of the calendar with an offset overflow when moved to UTC.
        return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    except (ValueError, OverflowError):
        raise BadRequest(
            name, f"{name} must be an ISO 8601 time, e.g. 2026-01-31T08:00:00Z"
        ) from None


def _limit(value: str) -> int:
    if re.fullmatch(r"\d{1,4}", value) is None or not 1 <= int(value) <= MAX_LIMIT:
        raise BadRequest("limit", f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(value)


_SEVERITIES: Final = frozenset(s.value for s in Severity)


def _severity(value: str) -> str:
    if value not in _SEVERITIES:
        raise BadRequest("severity", "severity must be one of info, warning, critical")
    return value


def parse_alert_query(query: Mapping[str, str], keys: Collection[str]) -> AlertQuery:
    """The query of ``GET /api/v1/alerts`` (``keys``: every key given, repeats included);
    ``BadRequest`` for an unknown, repeated or bad parameter."""
    seen: set[str] = set()
    for key in keys:
        if key not in _PARSERS:
            raise BadRequest("unknown", f"unknown parameter {key[:40]!r}")
        if key in seen:
            raise BadRequest(key, f"{key} given more than once")
        seen.add(key)
    q = AlertQuery(**{key: _PARSERS[key](query[key]) for key in seen})
    if q.since is not None and q.until is not None and q.until <= q.since:
        raise BadRequest("until", "until must be after since")
    return q


def encode_cursor(alert: AlertRecord) -> str:
    """The ``before`` of the page after the one that ends with ``alert``."""
    us = (alert.received - _EPOCH) // _MICROSECOND
    return base64.urlsafe_b64encode(f"{us}:{alert.id}".encode()).decode().rstrip("=")


def decode_cursor(text: str) -> AlertCursor:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
        match = _CURSOR.fullmatch(raw)
        if match is None:
            raise ValueError
        return _EPOCH + int(match[1]) * _MICROSECOND, match[2]
    except (ValueError, binascii.Error, OverflowError):
        raise BadRequest("before", "before must be a reply's 'next' cursor, as it was") from None


_PARSERS: Final[dict[str, Callable[[str], Any]]] = {
    "device": lambda v: _pattern("device", v, _DEVICE),
    "kind": lambda v: _pattern("kind", v, _NAME),
    "severity": _severity,
    "since": lambda v: _time("since", v),
    "until": lambda v: _time("until", v),
    "before": decode_cursor,
    "limit": _limit,
}


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(UTC).isoformat()


def alert_json(a: AlertRecord) -> dict[str, Any]:
    """An alert as the API shows it (``Alert`` in ``OPENAPI``)."""
    clip = a.body.get("clip") if a.has_clip else None
    return {
        "id": a.id,
        "device": a.device,
        "detector": a.detector,
        "kind": a.kind,
        "severity": a.severity,
        "start": _iso(a.start),
        "end": _iso(a.end),
        "received": _iso(a.received),
        "confidence": a.confidence,
        "level": a.level,
        "detail": a.body.get("detail", {}),
        "clip": clip,
        "acked": _iso(a.acked),
        "acked_by": a.acked_by,
    }


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Api:
    """The API's routes and its authentication middleware."""

    def __init__(self, store: Store, auth: Authenticator, clip_key: ClipKey | None) -> None:
        self._store = store
        self._auth = auth
        self._clip_key = clip_key
        self.bad_requests: Counter[str] = Counter()
        """400s by parameter."""

    @property
    def refusals(self) -> Counter[Refusal]:
        return self._auth.refusals

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get(OPENAPI_PATH, self._openapi)
        router.add_get(ALERTS_PATH, self._alerts)
        router.add_get(ALERTS_PATH + "/{id}", self._alert)
        router.add_get(ALERTS_PATH + "/{id}/clip", self._clip)
        router.add_post(ALERTS_PATH + "/{id}/ack", self._ack)

    def middleware(self, open_paths: Collection[str]) -> Middleware:
        """Authenticates every request but those for ``open_paths``; turns ``BadRequest``
        into 400."""

        @web.middleware
        async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path in open_paths:
                return await handler(request)
            source = request.remote or "unknown"
            checked = await self._auth.check(source, request.headers.get("Authorization"))
            if isinstance(checked, Refused):
                return _refusal(checked)
            request[_TOKEN_KEY] = checked
            try:
                response = await handler(request)
            except BadRequest as exc:
                self.bad_requests[exc.label] += 1
                logger.info("API request from %s: 400: %s", source, exc)
                response = _error(400, "bad-request", str(exc))
            response.headers["Cache-Control"] = "no-store"
            return response

        return authenticate

    async def _openapi(self, _request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    async def _alerts(self, request: web.Request) -> web.Response:
        q = parse_alert_query(request.query, [key for key, _ in request.query.items()])
        query = functools.partial(
            self._store.alerts, device=q.device, kind=q.kind, severity=q.severity,
            since=q.since, until=q.until, after=q.before, limit=q.limit + 1,
        )  # fmt: skip
        found = await self._store.run(query)
        page = found[: q.limit]
        after = encode_cursor(page[-1]) if len(found) > q.limit else None
        return web.json_response({"alerts": [alert_json(a) for a in page], "next": after})

    async def _alert(self, request: web.Request) -> web.Response:
        alert_id = _alert_id(request)
        found = await self._store.run(self._store.alert, alert_id)
        if found is None:
            return _not_found(alert_id)
        return web.json_response(alert_json(found))

    async def _clip(self, request: web.Request) -> web.Response:
        alert_id = _alert_id(request)
        stored = await self._store.run(self._store.alert_clip, alert_id)
        if stored is None or self._clip_key is None:
            return _error(404, "not-found", f"no alert {alert_id} with a clip")
        try:
            data = await asyncio.to_thread(_ogg, stored[1], self._clip_key, alert_id)
        except ClipError as exc:  # checked when stored: the relay's clip key was replaced
            logger.error("alert %s: its stored clip does not open: %s", alert_id, exc)
            return _error(500, "clip", "the stored clip does not open with this relay's key")
        return web.Response(
            body=data,
            content_type="audio/ogg",
            headers={"Content-Disposition": f'inline; filename="{alert_id}.ogg"'},
        )

    async def _ack(self, request: web.Request) -> web.Response:
        alert_id = _alert_id(request)
        by, now = request[_TOKEN_KEY].name, datetime.now(UTC)
        acked = await self._store.run(self._store.ack_alert, alert_id, by, now)
        if acked is None:
            return _not_found(alert_id)
        if acked.acked == now:  # this request's acknowledgement, not an earlier one
            logger.info("alert %s acknowledged by %s", alert_id, by)
        return web.json_response(alert_json(acked))


def _ogg(sealed: bytes, key: ClipKey, alert_id: str) -> bytes:
    return ogg_opus(open_clip(sealed, key, alert_id))


def _alert_id(request: web.Request) -> str:
    return _pattern("id", request.match_info["id"], _ALERT_ID)


def _error(status: int, error: str, message: str) -> web.Response:
    return web.json_response({"error": error, "message": message}, status=status)


def _not_found(alert_id: str) -> web.Response:
    return _error(404, "not-found", f"no alert {alert_id}")


def _refusal(refused: Refused) -> web.Response:
    if refused.reason is Refusal.RATE_LIMITED:
        response = _error(429, "rate-limited", "too many bad tokens from here; try later")
        response.headers["Retry-After"] = str(refused.retry_after_s)
    else:
        response = _error(401, "unauthorized", "a valid API token is required")
        response.headers["WWW-Authenticate"] = 'Bearer realm="edge-intercom"'
    return response


# --- the OpenAPI document ------------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


_REFUSED = {
    "401": _json("No valid API token (missing, unknown, expired or revoked)", "Error"),
    "429": {
        **_json("Too many bad tokens from this source", "Error"),
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    },
}
_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "The alert's id",
    "schema": {"type": "string", "pattern": f"^{_ALERT_ID}$"},
}
_ONE_ALERT = {
    "200": _json("The alert", "Alert"),
    "400": _json("The id is not 32 hex digits", "Error"),
    "404": _json("No such alert", "Error"),
    **_REFUSED,
}
_TIME = {"type": "string", "format": "date-time"}
_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}

OPENAPI: Final[dict[str, Any]] = {
    "openapi": "3.1.0",
    "info": {"title": "edge-intercom relay API", "version": "1"},
    "security": [{"token": []}],
    "paths": {
        ALERTS_PATH: {
            "get": {
                "operationId": "listAlerts",
                "summary": "Stored alerts, newest (by received) first",
                "parameters": [
                    _query(
                        "device",
                        "Only this device's",
                        {"type": "string", "pattern": f"^{_DEVICE}$"},
                    ),
                    _query(
                        "kind",
                        "Only of this kind (smoke_alarm, glass_break, ...)",
                        {"type": "string", "pattern": f"^{_NAME}$"},
                    ),
                    _query(
                        "severity",
                        "Only of this severity",
                        {"type": "string", "enum": sorted(_SEVERITIES)},
                    ),
                    _query("since", "Received at or after (ISO 8601; UTC without offset)", _TIME),
                    _query("until", "Received before (ISO 8601; UTC without offset)", _TIME),
                    _query(
                        "before", "The previous reply's next: the page after it", {"type": "string"}
                    ),
                    _query(
                        "limit",
                        f"At most this many ({DEFAULT_LIMIT})",
                        {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                    ),
                ],
                "responses": {
                    "200": _json("A page of alerts", "AlertPage"),
                    "400": _json("A bad parameter (the message names it)", "Error"),
                    **_REFUSED,
                },
            }
        },
        ALERTS_PATH + "/{id}": {
            "get": {
                "operationId": "getAlert",
                "summary": "One alert",
                "parameters": [_ID_PARAM],
                "responses": _ONE_ALERT,
            }
        },
        ALERTS_PATH + "/{id}/clip": {
            "get": {
                "operationId": "getAlertClip",
                "summary": "The alert's audio clip, decrypted, as Ogg Opus",
                "parameters": [_ID_PARAM],
                "responses": {
                    **_ONE_ALERT,
                    "200": {
                        "description": "Ogg Opus (RFC 7845), 48 kHz mono",
                        "content": {
                            "audio/ogg": {"schema": {"type": "string", "format": "binary"}}
                        },
                    },
                    "404": _json("No such alert, or it has no clip", "Error"),
                },
            }
        },
        ALERTS_PATH + "/{id}/ack": {
            "post": {
                "operationId": "ackAlert",
                "summary": "Acknowledge the alert (the first acknowledgement stands)",
                "parameters": [_ID_PARAM],
                "responses": {**_ONE_ALERT, "200": _json("The alert, acknowledged", "Alert")},
            }
        },
        OPENAPI_PATH: {
            "get": {
                "operationId": "getOpenApi",
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_REFUSED,
                },
            }
        },
    },
    "components": {
        "securitySchemes": {
            "token": {
                "type": "http",
                "scheme": "bearer",
                "description": "An API token: edge-intercom-relay token new",
            },
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "message"],
                "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
            },
            "Alert": {
                "type": "object",
                "required": [
                    "id",
                    "device",
                    "detector",
                    "kind",
                    "severity",
                    "start",
                    "end",
                    "received",
                    "confidence",
                    "level",
                    "detail",
                    "clip",
                    "acked",
                    "acked_by",
                ],
                "properties": {
                    "id": {"type": "string", "pattern": f"^{_ALERT_ID}$"},
                    "device": {"type": "string"},
                    "detector": {"type": "string"},
                    "kind": {"type": "string"},
                    "severity": {"type": "string", "enum": sorted(_SEVERITIES)},
                    "start": _TIME,
                    "end": _TIME,
                    "received": _TIME,
                    "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                    "level": {"type": "number", "description": "dB"},
                    "detail": {"type": "object"},
                    "clip": {
                        "description": "The clip's summary, null if it has none",
                        "type": ["object", "null"],
                        "properties": {
                            "bytes": {"type": "integer"},
                            "seconds": {"type": "number"},
                            "before_s": {"type": "number"},
                        },
                    },
                    "acked": _NULLABLE_TIME,
                    "acked_by": {"type": ["string", "null"]},
                },
            },
            "AlertPage": {
                "type": "object",
                "required": ["alerts", "next"],
                "properties": {
                    "alerts": {"type": "array", "items": _ref("Alert")},
                    "next": {
                        "type": ["string", "null"],
                        "description": "before of the next page; null on the last",
                    },
                },
            },
        },
    },
}
