"""The relay's JSON API (aiohttp handlers), for the dashboard and for scripts.

Every request needs an API token (``cloud_relay.tokens``: ``Authorization: Bearer
eirt_...``) or a dashboard session (``cloud_relay.sessions``: the cookie, and for a
change the session's ``X-CSRF-Token``), except login and what ``WebServer`` exempts
(pairing, which has its own one-time secrets). Else 401 (``WWW-Authenticate: Bearer``)
and no word on what was wrong, 403 for a session's change without its CSRF token, or
429 with ``Retry-After`` for a source that sent too many bad tokens.

``OPENAPI`` (served at ``/api/v1/openapi.json``) documents the endpoints:

- ``POST /api/v1/login`` ``{name, password}``: sets the session cookie and returns the
  session's CSRF token (429 after too many failures); ``POST /api/v1/logout``;
  ``GET /api/v1/session``: who is asking (and the CSRF token, for a page reloaded).
- ``GET /api/v1/alerts``: stored alerts, newest first, filtered by ``device``,
  ``kind``, ``severity`` and a ``since``/``until`` window on when the relay received
  them; pages of ``limit`` (at most ``MAX_LIMIT``), the reply's ``next`` is the
  ``before`` of the next page (null on the last).
- ``GET /api/v1/alerts/{id}``: one alert.
- ``GET /api/v1/alerts/{id}/clip``: its audio clip as Ogg Opus, decrypted for this
  reply only (nothing in clear is written anywhere; ``Cache-Control: no-store``).
- ``POST /api/v1/alerts/{id}/ack``: acknowledge it, as the token's (or user's) name; the
  first acknowledgement stands, so doing it again is harmless.
- ``GET /api/v1/alert-counts``: alerts per day per kind (``cloud_relay.alert_counts``).
- devices, calls, pairing tokens, commands and events: ``cloud_relay.fleet_api``.

A bad query, path parameter or body is a 400 with a message that names it, counted in
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
from cloud_relay.alert_counts import (
    ALERT_COUNTS_PATH,
    ALERT_COUNTS_PATHS,
    ALERT_COUNTS_SCHEMAS,
    alert_counts,
)
from cloud_relay.apibase import (
    API_PREFIX,
    BAD,
    DEVICE_ID,
    NULLABLE_TIME,
    PRINCIPAL,
    REFUSED,
    TIME,
    BadRequest,
    Principal,
    error,
    fields,
    iso,
    json_body,
    json_reply,
    json_request,
    parse_time,
    pattern,
    query,
    ref,
    text_field,
)
from cloud_relay.clips import ClipKey, ogg_opus, open_clip
from cloud_relay.fleet_api import FLEET_PATHS, FLEET_SCHEMAS, FleetApi
from cloud_relay.sessions import COOKIE, CSRF_HEADER, LoginLimited, Sessions
from cloud_relay.store import AlertCursor, AlertRecord, SessionRecord, Store
from cloud_relay.tokens import Authenticator, Refusal, Refused
from cloud_relay.users import USER_NAME
from cloud_relay.webcall import WEBCALL_PATHS, WEBCALL_SCHEMAS, WebCalls

logger = logging.getLogger(__name__)

OPENAPI_PATH: Final = f"{API_PREFIX}/openapi.json"
ALERTS_PATH: Final = f"{API_PREFIX}/alerts"
LOGIN_PATH: Final = f"{API_PREFIX}/login"
LOGOUT_PATH: Final = f"{API_PREFIX}/logout"
SESSION_PATH: Final = f"{API_PREFIX}/session"
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 500
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})

_DEVICE = DEVICE_ID
_NAME = r"[a-z][a-z0-9_]{0,39}"
_ALERT_ID = r"[0-9a-f]{32}"
_CURSOR = re.compile(rf"(-?\d{{1,19}}):({_ALERT_ID})")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


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


def _limit(value: str) -> int:
    if re.fullmatch(r"\d{1,4}", value) is None or not 1 <= int(value) <= MAX_LIMIT:
        raise BadRequest("limit", f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(value)


_SEVERITIES: Final = frozenset(s.value for s in Severity)


def _severity(value: str) -> str:
    if value not in _SEVERITIES:
        raise BadRequest("severity", "severity must be one of info, warning, critical")
    return value


def parse_alertquery(query: Mapping[str, str], keys: Collection[str]) -> AlertQuery:
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
    "device": lambda v: pattern("device", v, _DEVICE),
    "kind": lambda v: pattern("kind", v, _NAME),
    "severity": _severity,
    "since": lambda v: parse_time("since", v),
    "until": lambda v: parse_time("until", v),
    "before": decode_cursor,
    "limit": _limit,
}


def alertjson_reply(a: AlertRecord) -> dict[str, Any]:
    """An alert as the API shows it (``Alert`` in ``OPENAPI``)."""
    clip = a.body.get("clip") if a.has_clip else None
    return {
        "id": a.id,
        "device": a.device,
        "detector": a.detector,
        "kind": a.kind,
        "severity": a.severity,
        "start": iso(a.start),
        "end": iso(a.end),
        "received": iso(a.received),
        "confidence": a.confidence,
        "level": a.level,
        "detail": a.body.get("detail", {}),
        "clip": clip,
        "acked": iso(a.acked),
        "acked_by": a.acked_by,
    }


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Api:
    """The API's routes and its authentication middleware."""

    def __init__(
        self,
        store: Store,
        auth: Authenticator,
        clip_key: ClipKey | None,
        *,
        sessions: Sessions | None = None,
        fleet: FleetApi | None = None,
        webcalls: WebCalls | None = None,
    ) -> None:
        """``sessions``: dashboard logins (None: API tokens only); ``fleet``: the devices,
        calls, pairing, commands and events endpoints, which need the running relay;
        ``webcalls``: calls from the browser (``cloud_relay.webcall``)."""
        self._store = store
        self._auth = auth
        self._clip_key = clip_key
        self._sessions = sessions
        self._fleet = fleet
        self._webcalls = webcalls
        self.bad_requests: Counter[str] = Counter()
        """400s by parameter."""
        self.csrf_refused = 0
        """Session requests that changed something without their CSRF token."""

    @property
    def refusals(self) -> Counter[Refusal]:
        return self._auth.refusals

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get(OPENAPI_PATH, self._openapi)
        router.add_get(ALERTS_PATH, self._alerts)
        router.add_get(ALERTS_PATH + "/{id}", self._alert)
        router.add_get(ALERTS_PATH + "/{id}/clip", self._clip)
        router.add_post(ALERTS_PATH + "/{id}/ack", self._ack)
        router.add_get(ALERT_COUNTS_PATH, functools.partial(alert_counts, self._store))
        router.add_get(SESSION_PATH, self._session)
        if self._sessions is not None:
            router.add_post(LOGIN_PATH, self._login)
            router.add_post(LOGOUT_PATH, self._logout)
        if self._fleet is not None:
            self._fleet.add_routes(router)
        if self._webcalls is not None:
            self._webcalls.add_routes(router)

    def middleware(self, open_paths: Collection[str]) -> Middleware:
        """Authenticates every request but login and those for ``open_paths``: a bearer
        API token, else a session cookie (and its CSRF token for a change); turns
        ``BadRequest`` into 400."""
        open_paths = {*open_paths, LOGIN_PATH}

        @web.middleware
        async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
            source = request.remote or "unknown"
            if request.path not in open_paths:
                refused = await self._authenticate(request, source)
                if refused is not None:
                    return refused
            try:
                response = await handler(request)
            except BadRequest as exc:
                self.bad_requests[exc.label] += 1
                logger.info("API request from %s: 400: %s", source, exc)
                response = error(400, "bad-request", str(exc))
            if not response.prepared:  # an event stream has sent its headers already
                response.headers["Cache-Control"] = "no-store"
            return response

        return authenticate

    async def _authenticate(self, request: web.Request, source: str) -> web.Response | None:
        """Set the request's ``PRINCIPAL``, or the response that refuses it."""
        authorization = request.headers.get("Authorization")
        cookie = request.cookies.get(COOKIE)
        if authorization is None and cookie is not None and self._sessions is not None:
            session = await self._sessions.check(cookie)
            if session is None:
                return _refusal(Refused(Refusal.UNKNOWN))
            if request.method not in SAFE_METHODS and not session.csrf_ok(
                request.headers.get(CSRF_HEADER)
            ):
                self.csrf_refused += 1
                logger.warning("API request from %s (%s): refused without its CSRF token",
                               source, session.record.user)  # fmt: skip
                return error(403, "csrf", f"a session's changes need its {CSRF_HEADER}")
            request[PRINCIPAL] = Principal(session.record.user, session)
            return None
        checked = await self._auth.check(source, authorization)
        if isinstance(checked, Refused):
            return _refusal(checked)
        request[PRINCIPAL] = Principal(checked.name)
        return None

    async def shutdown(self, _app: web.Application) -> None:
        """End the event streams (aiohttp then waits for the handlers still running)."""
        if self._fleet is not None:
            self._fleet.close()
        if self._sessions is not None:
            await self._sessions.close()

    async def _login(self, request: web.Request) -> web.Response:
        assert self._sessions is not None
        body = await json_body(request)
        fields(body, ("name", "password"))
        name = text_field(body, "name", required=True, most=64)
        password = body.get("password")
        if not isinstance(password, str) or not password:
            raise BadRequest("password", "password is required")
        assert name is not None
        outcome = await self._sessions.login(request.remote or "unknown", name, password)
        if isinstance(outcome, LoginLimited):
            response = error(429, "rate-limited", "too many failed logins; try later")
            response.headers["Retry-After"] = str(outcome.retry_after_s)
            return response
        if outcome is None:
            return error(401, "unauthorized", "wrong name or password")
        session_id, record = outcome
        response = web.json_response(_session_json(record))
        response.set_cookie(
            COOKIE, session_id, max_age=int(self._sessions.settings.absolute_s), path="/",
            secure=True, httponly=True, samesite="Strict",
        )  # fmt: skip
        return response

    async def _logout(self, request: web.Request) -> web.Response:
        assert self._sessions is not None
        session = request[PRINCIPAL].session
        if session is None:
            raise BadRequest("session", "logout ends a session: revoke an API token instead")
        await self._sessions.logout(session)
        response = web.json_response({"user": session.record.user})
        response.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
        return response

    async def _session(self, request: web.Request) -> web.Response:
        """Who is asking: a user (with the session's CSRF token) or an API token."""
        principal = request[PRINCIPAL]
        if principal.session is None:
            return web.json_response({"user": principal.name, "kind": "token", "csrf": None,
                                      "expires": None})  # fmt: skip
        return web.json_response(_session_json(principal.session.record))

    async def _openapi(self, _request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    async def _alerts(self, request: web.Request) -> web.Response:
        q = parse_alertquery(request.query, [key for key, _ in request.query.items()])
        lookup = functools.partial(
            self._store.alerts, device=q.device, kind=q.kind, severity=q.severity,
            since=q.since, until=q.until, after=q.before, limit=q.limit + 1,
        )  # fmt: skip
        found = await self._store.run(lookup)
        page = found[: q.limit]
        after = encode_cursor(page[-1]) if len(found) > q.limit else None
        return web.json_response({"alerts": [alertjson_reply(a) for a in page], "next": after})

    async def _alert(self, request: web.Request) -> web.Response:
        alert_id = _alert_id(request)
        found = await self._store.run(self._store.alert, alert_id)
        if found is None:
            return _not_found(alert_id)
        return web.json_response(alertjson_reply(found))

    async def _clip(self, request: web.Request) -> web.Response:
        alert_id = _alert_id(request)
        stored = await self._store.run(self._store.alert_clip, alert_id)
        if stored is None or self._clip_key is None:
            return error(404, "not-found", f"no alert {alert_id} with a clip")
        try:
            data = await asyncio.to_thread(_ogg, stored[1], self._clip_key, alert_id)
        except ClipError as exc:  # checked when stored: the relay's clip key was replaced
            logger.error("alert %s: its stored clip does not open: %s", alert_id, exc)
            return error(500, "clip", "the stored clip does not open with this relay's key")
        return web.Response(
            body=data,
            content_type="audio/ogg",
            headers={"Content-Disposition": f'inline; filename="{alert_id}.ogg"'},
        )

    async def _ack(self, request: web.Request) -> web.Response:
        alert_id = _alert_id(request)
        by, now = request[PRINCIPAL].name, datetime.now(UTC)
        acked = await self._store.run(self._store.ack_alert, alert_id, by, now)
        if acked is None:
            return _not_found(alert_id)
        if acked.acked == now:  # this request's acknowledgement, not an earlier one
            logger.info("alert %s acknowledged by %s", alert_id, by)
        return web.json_response(alertjson_reply(acked))


def _session_json(record: SessionRecord) -> dict[str, Any]:
    return {"user": record.user, "kind": "session", "csrf": record.csrf,
            "expires": iso(record.expires)}  # fmt: skip


def _ogg(sealed: bytes, key: ClipKey, alert_id: str) -> bytes:
    return ogg_opus(open_clip(sealed, key, alert_id))


def _alert_id(request: web.Request) -> str:
    return pattern("id", request.match_info["id"], _ALERT_ID)


def _not_found(alert_id: str) -> web.Response:
    return error(404, "not-found", f"no alert {alert_id}")


def _refusal(refused: Refused) -> web.Response:
    if refused.reason is Refusal.RATE_LIMITED:
        response = error(429, "rate-limited", "too many bad tokens from here; try later")
        response.headers["Retry-After"] = str(refused.retry_after_s)
    else:
        response = error(401, "unauthorized", "a valid API token or session is required")
        response.headers["WWW-Authenticate"] = 'Bearer realm="edge-intercom"'
    return response


# --- the OpenAPI document ------------------------------------------------------------------


_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "The alert's id",
    "schema": {"type": "string", "pattern": f"^{_ALERT_ID}$"},
}
_ONE_ALERT = {
    "200": json_reply("The alert", "Alert"),
    "400": json_reply("The id is not 32 hex digits", "Error"),
    "404": json_reply("No such alert", "Error"),
    **REFUSED,
}

OPENAPI: Final[dict[str, Any]] = {
    "openapi": "3.1.0",
    "info": {"title": "edge-intercom relay API", "version": "1"},
    "security": [{"token": []}, {"session": []}],
    "paths": {
        ALERTS_PATH: {
            "get": {
                "operationId": "listAlerts",
                "summary": "Stored alerts, newest (by received) first",
                "parameters": [
                    query(
                        "device",
                        "Only this device's",
                        {"type": "string", "pattern": f"^{_DEVICE}$"},
                    ),
                    query(
                        "kind",
                        "Only of this kind (smoke_alarm, glass_break, ...)",
                        {"type": "string", "pattern": f"^{_NAME}$"},
                    ),
                    query(
                        "severity",
                        "Only of this severity",
                        {"type": "string", "enum": sorted(_SEVERITIES)},
                    ),
                    query("since", "Received at or after (ISO 8601; UTC without offset)", TIME),
                    query("until", "Received before (ISO 8601; UTC without offset)", TIME),
                    query(
                        "before", "The previous reply's next: the page after it", {"type": "string"}
                    ),
                    query(
                        "limit",
                        f"At most this many ({DEFAULT_LIMIT})",
                        {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                    ),
                ],
                "responses": {
                    "200": json_reply("A page of alerts", "AlertPage"),
                    "400": json_reply("A bad parameter (the message names it)", "Error"),
                    **REFUSED,
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
                    "404": json_reply("No such alert, or it has no clip", "Error"),
                },
            }
        },
        ALERTS_PATH + "/{id}/ack": {
            "post": {
                "operationId": "ackAlert",
                "summary": "Acknowledge the alert (the first acknowledgement stands)",
                "parameters": [_ID_PARAM],
                "responses": {**_ONE_ALERT, "200": json_reply("The alert, acknowledged", "Alert")},
            }
        },
        LOGIN_PATH: {
            "post": {
                "operationId": "login",
                "summary": "Log in: sets the session cookie, returns the CSRF token",
                "security": [],
                "requestBody": json_request(ref("Login")),
                "responses": {
                    "200": json_reply("Logged in (Set-Cookie: the session)", "Session"),
                    **BAD,
                    "401": json_reply("Wrong name or password", "Error"),
                    "429": REFUSED["429"],
                },
            }
        },
        LOGOUT_PATH: {
            "post": {
                "operationId": "logout",
                "summary": "End this session (needs its X-CSRF-Token)",
                "responses": {
                    "200": {
                        "description": "Logged out",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "400": json_reply("Not a session (an API token)", "Error"),
                    **REFUSED,
                },
            }
        },
        SESSION_PATH: {
            "get": {
                "operationId": "getSession",
                "summary": "Who is asking: a logged-in user (with its CSRF token), or a token",
                "responses": {"200": json_reply("The session or token", "Session"), **REFUSED},
            }
        },
        **FLEET_PATHS,
        **ALERT_COUNTS_PATHS,
        **WEBCALL_PATHS,
        OPENAPI_PATH: {
            "get": {
                "operationId": "getOpenApi",
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **REFUSED,
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
            "session": {
                "type": "apiKey",
                "in": "cookie",
                "name": COOKIE,
                "description": f"POST {LOGIN_PATH}; changes also need {CSRF_HEADER}",
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
                    "start": TIME,
                    "end": TIME,
                    "received": TIME,
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
                    "acked": NULLABLE_TIME,
                    "acked_by": {"type": ["string", "null"]},
                },
            },
            "Login": {
                "type": "object",
                "required": ["name", "password"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "pattern": f"^{USER_NAME}$"},
                    "password": {"type": "string", "minLength": 1, "maxLength": 1024},
                },
            },
            "Session": {
                "type": "object",
                "required": ["user", "kind", "csrf", "expires"],
                "properties": {
                    "user": {"type": "string"},
                    "kind": {"type": "string", "enum": ["session", "token"]},
                    "csrf": {"type": ["string", "null"]},
                    "expires": NULLABLE_TIME,
                },
            },
            **FLEET_SCHEMAS,
            **ALERT_COUNTS_SCHEMAS,
            **WEBCALL_SCHEMAS,
            "AlertPage": {
                "type": "object",
                "required": ["alerts", "next"],
                "properties": {
                    "alerts": {"type": "array", "items": ref("Alert")},
                    "next": {
                        "type": ["string", "null"],
                        "description": "before of the next page; null on the last",
                    },
                },
            },
        },
    },
}
