"""The JSON API of the fleet (what the dashboard shows and does): devices, calls, pairing
tokens, commands to devices, and live events. Thin handlers over the store and the
running ``Relay``; authenticated by ``Api.middleware`` like every other route.

- ``GET /api/v1/devices``: every device with its presence, board, version, last seen
  and its last ``levels`` telemetry; ``GET /api/v1/devices/{id}``: one, with its
  recent telemetry records (``since``, ``limit``); ``PATCH``: name, site, group;
  ``POST .../revoke``: revoke its certificates and cut it off the broker.
- ``GET /api/v1/calls``: newest first; ``live=1`` only the calls up now; ``device``,
  ``since``, ``limit``. Each with its duration and, once a side reported its media
  statistics, loss, jitter, RTT and a MOS estimate (``cloud_relay.quality``).
- ``POST /api/v1/pairing-tokens``: mint one (the token text and its QR code as SVG,
  shown once); ``GET``: those pending; ``DELETE .../{id}``: cancel one.
- ``POST /api/v1/devices/{id}/commands``: send a command, wait (at most ``timeout``)
  for the device's reply; recorded in the store as every operator's command is.
- ``GET /api/v1/events``: Server-Sent Events from the relay's ``EventBus`` (presence,
  alerts, calls, command replies), a comment every ``heartbeat_s``, and ``resync``
  when this client fell behind.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import segno
from aiohttp import web

from cloud_relay.apibase import (
    API_PREFIX,
    BAD,
    DEVICE_ID,
    NULLABLE_TEXT,
    NULLABLE_TIME,
    PRINCIPAL,
    REFUSED,
    TIME,
    BadRequest,
    error,
    fields,
    iso,
    json_body,
    json_reply,
    json_request,
    parse_int,
    parse_time,
    path_param,
    pattern,
    query,
    query_keys,
    ref,
    text_field,
)
from cloud_relay.commands import CommandError, CommandTimeout
from cloud_relay.events import EventBus, EventsClosed
from cloud_relay.pairing import MAX_TTL_S, mint_token, secret_digest
from cloud_relay.pki import RelayPki
from cloud_relay.quality import call_quality
from cloud_relay.service import Relay
from cloud_relay.store import DEVICE_FIELDS, CallRecord, DeviceRecord, PendingToken, Store
from cloud_relay.telemetry import LEVELS

logger = logging.getLogger(__name__)

DEVICES_PATH: Final = f"{API_PREFIX}/devices"
CALLS_PATH: Final = f"{API_PREFIX}/calls"
PAIRING_PATH: Final = f"{API_PREFIX}/pairing-tokens"
EVENTS_PATH: Final = f"{API_PREFIX}/events"
COMMANDS: Final = (
    "call", "hangup", "answer", "decline", "mute", "unmute", "volume", "test-tone",
    "door/open", "status",
)  # fmt: skip
"""What the API may send a device (the agent's ``calls.runtime`` commands, less config)."""
MAX_COMMAND_ARGS: Final = 2048
"""Bytes of a command's arguments as JSON."""
MAX_COMMAND_TIMEOUT_S: Final = 30
MAX_TELEMETRY: Final = 2000
MAX_CALLS: Final = 500
WRITE_TIMEOUT_S: Final = 10.0
"""An event stream whose client takes no bytes for this long is ended."""
_TOKEN_ID: Final = r"[0-9a-f]{64}"


def device_json(d: DeviceRecord, levels: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": d.id, "name": d.name, "site": d.site, "group": d.group, "board": d.board,
            "version": d.version, "presence": d.presence, "last_seen": iso(d.last_seen),
            "created": iso(d.created), "levels": levels}  # fmt: skip


def call_json(c: CallRecord, now: datetime) -> dict[str, Any]:
    """A call with its duration (talk time once answered, else ringing time) and quality."""
    since = c.answered or c.started
    quality = call_quality(c.quality)
    return {"id": c.id, "caller": c.caller, "callee": c.callee, "mode": c.mode,
            "started": iso(c.started), "answered": iso(c.answered), "ended": iso(c.ended),
            "end_reason": c.end_reason, "live": c.ended is None,
            "duration_s": round(max(0.0, ((c.ended or now) - since).total_seconds()), 3),
            "quality": None if quality is None else quality.to_json()}  # fmt: skip


def token_json(t: PendingToken) -> dict[str, Any]:
    return {"id": t.id, "device": t.device, "name": t.name, "site": t.site,
            "created": iso(t.created), "expires": iso(t.expires)}  # fmt: skip


def qr_svg(text: str) -> str:
    buf = io.BytesIO()
    segno.make(text, error="m").save(buf, kind="svg", scale=4, xmldecl=False)
    return buf.getvalue().decode()


class FleetApi:
    """The fleet's routes over the store and the running relay."""

    def __init__(
        self,
        store: Store,
        relay: Relay,
        events: EventBus,
        pki: RelayPki,
        *,
        pairing_url: str,
        fingerprint: Callable[[], str],
        on_revoked: Callable[[], None],
        pairing_ttl_s: float = 600.0,
        heartbeat_s: float = 15.0,
    ) -> None:
        """``fingerprint``: the HTTPS certificate's, which new pairing tokens pin (it is
        renewed while the relay runs); ``on_revoked``: cut revoked devices off the broker
        (``Upkeep.schedule``)."""
        self._store = store
        self._relay = relay
        self._events = events
        self._pki = pki
        self._pairing_url = pairing_url
        self._fingerprint = fingerprint
        self._on_revoked = on_revoked
        self._pairing_ttl_s = pairing_ttl_s
        self._heartbeat_s = heartbeat_s

    def add_routes(self, router: web.UrlDispatcher) -> None:
        one = DEVICES_PATH + "/{id}"
        router.add_get(DEVICES_PATH, self._devices)
        router.add_get(one, self._device)
        router.add_patch(one, self._patch_device)
        router.add_post(one + "/revoke", self._revoke)
        router.add_post(one + "/commands", self._command)
        router.add_get(CALLS_PATH, self._calls)
        router.add_get(PAIRING_PATH, self._pending_tokens)
        router.add_post(PAIRING_PATH, self._mint_token)
        router.add_delete(PAIRING_PATH + "/{id}", self._cancel_token)
        router.add_get(EVENTS_PATH, self._stream)

    def close(self) -> None:
        """End every event stream."""
        self._events.close()

    # --- devices ---

    async def _devices(self, request: web.Request) -> web.Response:
        query_keys(request, ())
        found = await self._store.run(self._store.devices)
        levels = await self._store.run(self._store.latest_telemetry, LEVELS)
        return web.json_response({"devices": [
            device_json(d, levels[d.id].record if d.id in levels else None) for d in found
        ]})  # fmt: skip

    async def _device(self, request: web.Request) -> web.Response:
        device = _device_id(request)
        q = query_keys(request, ("since", "limit"))
        since = parse_time("since", q["since"]) if "since" in q else None
        limit = parse_int("limit", q["limit"], 1, MAX_TELEMETRY) if "limit" in q else 500
        found = await self._store.run(self._store.device, device)
        if found is None:
            return _no_device(device)
        series = await self._store.run(
            lambda: self._store.telemetry(device, since=since, limit=limit)
        )
        levels = next((t.record for t in reversed(series) if t.event == LEVELS), None)
        telemetry = [{"at": iso(t.at), "event": t.event, "record": t.record} for t in series]
        return web.json_response({**device_json(found, levels), "telemetry": telemetry})

    async def _patch_device(self, request: web.Request) -> web.Response:
        device = _device_id(request)
        body = await json_body(request)
        fields(body, DEVICE_FIELDS)
        changes = {key: text_field(body, key) for key in body}
        updated = await self._store.run(self._store.update_device, device, changes)
        if updated is None:
            return _no_device(device)
        logger.info("device %s changed by %s: %s", device, request[PRINCIPAL].name,
                    ", ".join(sorted(changes)) or "nothing")  # fmt: skip
        return web.json_response(device_json(updated, None))

    async def _revoke(self, request: web.Request) -> web.Response:
        device = _device_id(request)
        try:
            serials = await asyncio.to_thread(self._pki.revoke, device)
        except LookupError:
            return _no_device(device)
        logger.warning("device %s revoked by %s (%d certificates)", device,
                       request[PRINCIPAL].name, len(serials))  # fmt: skip
        self._on_revoked()
        return web.json_response({"device": device, "revoked_certificates": len(serials)})

    async def _command(self, request: web.Request) -> web.Response:
        device = _device_id(request)
        body = await json_body(request)
        fields(body, ("name", "args", "timeout"))
        name, args = body.get("name"), body.get("args", {})
        if name not in COMMANDS:
            raise BadRequest("name", f"name must be one of {', '.join(COMMANDS)}")
        if not isinstance(args, dict) or len(json.dumps(args)) > MAX_COMMAND_ARGS:
            raise BadRequest("args", f"args must be an object of at most {MAX_COMMAND_ARGS} "
                             "bytes as JSON")  # fmt: skip
        timeout = body.get("timeout", 10)
        if not isinstance(timeout, int) or not 1 <= timeout <= MAX_COMMAND_TIMEOUT_S:
            raise BadRequest("timeout", f"timeout must be 1 to {MAX_COMMAND_TIMEOUT_S} s")
        if await self._store.run(self._store.device, device) is None:
            return _no_device(device)
        if not self._relay.presence.reachable(device):
            return error(409, "offline", f"device {device} is not online")
        logger.info("command %s to %s from %s", name, device, request[PRINCIPAL].name)
        try:
            reply = await self._relay.send_command(device, name, args, float(timeout))
        except CommandTimeout as exc:
            return error(504, "timeout", str(exc))
        except CommandError as exc:
            return error(502, "bad-reply", str(exc))
        return web.json_response({"device": device, "name": name, "reply": reply})

    # --- calls ---

    async def _calls(self, request: web.Request) -> web.Response:
        q = query_keys(request, ("live", "device", "since", "limit"))
        if q.get("live", "0") not in ("0", "1"):
            raise BadRequest("live", "live must be 0 or 1")
        device = pattern("device", q["device"], DEVICE_ID) if "device" in q else None
        since = parse_time("since", q["since"]) if "since" in q else None
        limit = parse_int("limit", q["limit"], 1, MAX_CALLS) if "limit" in q else 100
        found = await self._store.run(
            lambda: self._store.recent_calls(
                open_only=q.get("live") == "1", device=device, since=since, limit=limit
            )
        )
        now = datetime.now(UTC)
        return web.json_response({"calls": [call_json(c, now) for c in found]})

    # --- pairing tokens ---

    async def _pending_tokens(self, request: web.Request) -> web.Response:
        query_keys(request, ())
        pending = await self._store.run(self._store.pending_pairing_tokens, datetime.now(UTC))
        return web.json_response({"tokens": [token_json(t) for t in pending]})

    async def _mint_token(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        fields(body, ("name", "site", "expires_in", "device"))
        name, site = text_field(body, "name"), text_field(body, "site")
        device = body.get("device")
        if device is not None and (not isinstance(device, str) or not device):
            raise BadRequest("device", "device must be a device id")
        ttl = body.get("expires_in", self._pairing_ttl_s)
        if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not 60 <= ttl <= MAX_TTL_S:
            raise BadRequest("expires_in", f"expires_in must be 60 to {MAX_TTL_S} seconds")
        if device is not None:
            pattern("device", device, DEVICE_ID)
        now = datetime.now(UTC)
        try:
            token, device_id = await mint_token(
                self._store, self._pairing_url, self._fingerprint(), device=device, name=name,
                site=site, ttl_s=float(ttl), now=now,
            )  # fmt: skip
        except ValueError as exc:  # a relay name
            raise BadRequest("device", str(exc)) from None
        text = token.text()
        pending = PendingToken(
            secret_digest(token.secret), device_id, name, site, now, now + timedelta(seconds=ttl)
        )
        logger.info("pairing token for device %s minted by %s", device_id,
                    request[PRINCIPAL].name)  # fmt: skip
        reply = {**token_json(pending), "token": text, "qr_svg": qr_svg(text)}
        return web.json_response(reply, status=201)

    async def _cancel_token(self, request: web.Request) -> web.Response:
        token_id = pattern("id", request.match_info["id"], _TOKEN_ID)
        if not await self._store.run(self._store.cancel_pairing_token, token_id):
            return error(404, "not-found", f"no pending pairing token {token_id}")
        logger.info("pairing token %s… cancelled by %s", token_id[:12], request[PRINCIPAL].name)
        return web.json_response({"id": token_id})

    # --- events ---

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        query_keys(request, ())
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        with self._events.subscribe() as sub:
            try:
                await _send(response, b"retry: 3000\n: connected\n\n")
                while True:
                    try:
                        async with asyncio.timeout(self._heartbeat_s):
                            event = await sub.get()
                    except TimeoutError:
                        await _send(response, b": heartbeat\n\n")
                        continue
                    data = json.dumps(event.data, separators=(",", ":"))
                    await _send(response, f"id: {event.id}\nevent: {event.kind}\n"
                                          f"data: {data}\n\n".encode())  # fmt: skip
            except EventsClosed:
                pass  # the relay is stopping: the client reconnects to the next one
            except (ConnectionError, TimeoutError) as exc:
                logger.info("event stream to %s ended: %r", request.remote, exc)
        return response


async def _send(response: web.StreamResponse, data: bytes) -> None:
    async with asyncio.timeout(WRITE_TIMEOUT_S):
        await response.write(data)


def _device_id(request: web.Request) -> str:
    return pattern("id", request.match_info["id"], DEVICE_ID)


def _no_device(device: str) -> web.Response:
    return error(404, "not-found", f"no device {device}")


# --- the OpenAPI document's part ------------------------------------------------------------

_DEVICE_PARAM = path_param("id", "The device's id", DEVICE_ID)
_NO_DEVICE = {"404": json_reply("No such device", "Error")}
_TEXT_OR_NULL = {**NULLABLE_TEXT, "pattern": "^[^\\x00-\\x1f\\x7f]+$"}
_OBJECT = {"type": "object"}

FLEET_PATHS: Final[dict[str, Any]] = {
    DEVICES_PATH: {
        "get": {
            "operationId": "listDevices",
            "summary": "Every device, with presence and its last signal levels",
            "responses": {"200": json_reply("The devices", "DeviceList"), **BAD, **REFUSED},
        }
    },
    DEVICES_PATH + "/{id}": {
        "get": {
            "operationId": "getDevice",
            "summary": "One device with its recent telemetry, oldest first",
            "parameters": [
                _DEVICE_PARAM,
                query("since", "Telemetry received at or after (ISO 8601)", TIME),
                query(
                    "limit",
                    "At most this many telemetry records (500)",
                    {"type": "integer", "minimum": 1, "maximum": MAX_TELEMETRY},
                ),
            ],
            "responses": {
                "200": json_reply("The device", "DeviceDetail"),
                **BAD,
                **_NO_DEVICE,
                **REFUSED,
            },
        },
        "patch": {
            "operationId": "updateDevice",
            "summary": "Rename it, or move it to a site or group (null clears)",
            "parameters": [_DEVICE_PARAM],
            "requestBody": json_request(ref("DeviceChange")),
            "responses": {
                "200": json_reply("The device as changed", "Device"),
                **BAD,
                **_NO_DEVICE,
                **REFUSED,
            },
        },
    },
    DEVICES_PATH + "/{id}/revoke": {
        "post": {
            "operationId": "revokeDevice",
            "summary": "Revoke its certificates and cut it off the broker",
            "parameters": [_DEVICE_PARAM],
            "responses": {
                "200": json_reply("Revoked", "Revoked"),
                **BAD,
                "404": json_reply("No device of that id was ever paired", "Error"),
                **REFUSED,
            },
        }
    },
    DEVICES_PATH + "/{id}/commands": {
        "post": {
            "operationId": "sendCommand",
            "summary": "Send a command and wait for the device's reply",
            "parameters": [_DEVICE_PARAM],
            "requestBody": json_request(ref("Command")),
            "responses": {
                "200": json_reply("The device's reply (ok false: it refused)", "CommandReply"),
                **BAD,
                **_NO_DEVICE,
                "409": json_reply("The device is not online", "Error"),
                "502": json_reply("The device's reply was not JSON", "Error"),
                "504": json_reply("No reply within the timeout", "Error"),
                **REFUSED,
            },
        }
    },
    CALLS_PATH: {
        "get": {
            "operationId": "listCalls",
            "summary": "Calls, newest first, with duration and quality",
            "parameters": [
                query("live", "1: only the calls up now", {"type": "string", "enum": ["0", "1"]}),
                query(
                    "device",
                    "Only calls with this device on either side",
                    {"type": "string", "pattern": f"^{DEVICE_ID}$"},
                ),
                query("since", "Started at or after (ISO 8601)", TIME),
                query(
                    "limit",
                    "At most this many (100)",
                    {"type": "integer", "minimum": 1, "maximum": MAX_CALLS},
                ),
            ],
            "responses": {"200": json_reply("The calls", "CallList"), **BAD, **REFUSED},
        }
    },
    PAIRING_PATH: {
        "get": {
            "operationId": "listPairingTokens",
            "summary": "Pairing tokens neither used nor expired",
            "responses": {"200": json_reply("Pending tokens", "TokenList"), **BAD, **REFUSED},
        },
        "post": {
            "operationId": "mintPairingToken",
            "summary": "Mint a one-time pairing token (text and QR code, shown once)",
            "requestBody": json_request(ref("TokenRequest")),
            "responses": {
                "201": {
                    **json_reply("The token", "NewToken"),
                    "links": {
                        "cancel": {
                            "operationId": "cancelPairingToken",
                            "parameters": {"id": "$response.body#/id"},
                        },
                        "device": {
                            "operationId": "getDevice",
                            "parameters": {"id": "$response.body#/device"},
                        },
                    },
                },
                **BAD,
                **REFUSED,
            },
        },
    },
    PAIRING_PATH + "/{id}": {
        "delete": {
            "operationId": "cancelPairingToken",
            "summary": "Cancel a pending token",
            "parameters": [path_param("id", "The token's id", _TOKEN_ID)],
            "responses": {
                "200": {
                    "description": "Cancelled",
                    "content": {"application/json": {"schema": _OBJECT}},
                },
                **BAD,
                "404": json_reply("No such pending token", "Error"),
                **REFUSED,
            },
        }
    },
    EVENTS_PATH: {
        "get": {
            "operationId": "streamEvents",
            "summary": "Server-Sent Events: presence, alert, call-started, call-answered, "
            "call-ended, command-reply; resync when this client fell behind",
            "responses": {
                "200": {
                    "description": "An endless text/event-stream",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                **BAD,
                **REFUSED,
            },
        }
    },
}

_DEVICE_PROPS: Final[dict[str, Any]] = {
    "id": {"type": "string"},
    "name": {"type": ["string", "null"]},
    "site": {"type": ["string", "null"]},
    "group": {"type": ["string", "null"]},
    "board": {"type": ["string", "null"]},
    "version": {"type": ["string", "null"]},
    "presence": {"type": ["string", "null"]},
    "last_seen": NULLABLE_TIME,
    "created": TIME,
    "levels": {"type": ["object", "null"], "description": "The last 'levels' telemetry"},
}
_TOKEN_PROPS: Final[dict[str, Any]] = {
    "id": {"type": "string", "pattern": f"^{_TOKEN_ID}$"},
    "device": {"type": "string"},
    "name": {"type": ["string", "null"]},
    "site": {"type": ["string", "null"]},
    "created": TIME,
    "expires": TIME,
}


def _object(props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": sorted(props), "properties": props}


FLEET_SCHEMAS: Final[dict[str, Any]] = {
    "Device": _object(_DEVICE_PROPS),
    "DeviceDetail": _object(
        {
            **_DEVICE_PROPS,
            "telemetry": {
                "type": "array",
                "items": _object({"at": TIME, "event": {"type": "string"}, "record": _OBJECT}),
            },
        }
    ),
    "DeviceList": _object({"devices": {"type": "array", "items": ref("Device")}}),
    "DeviceChange": {
        "type": "object",
        "additionalProperties": False,
        "properties": {key: _TEXT_OR_NULL for key in DEVICE_FIELDS},
    },
    "Revoked": _object({"device": {"type": "string"}, "revoked_certificates": {"type": "integer"}}),
    "Command": {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "enum": list(COMMANDS)},
            "args": {"type": "object", "description": "e.g. call: {peer}, volume: {level}"},
            "timeout": {"type": "integer", "minimum": 1, "maximum": MAX_COMMAND_TIMEOUT_S},
        },
    },
    "CommandReply": _object(
        {"device": {"type": "string"}, "name": {"type": "string"}, "reply": _OBJECT}
    ),
    "Call": _object(
        {
            "id": {"type": "string"},
            "caller": {"type": "string"},
            "callee": {"type": "string"},
            "mode": {"type": "string"},
            "started": TIME,
            "answered": NULLABLE_TIME,
            "ended": NULLABLE_TIME,
            "end_reason": {"type": ["string", "null"]},
            "live": {"type": "boolean"},
            "duration_s": {"type": "number", "minimum": 0},
            "quality": {
                "type": ["object", "null"],
                "description": "The worse side's figures; null until a side reported them",
                "properties": {
                    "loss": {"type": "number"},
                    "jitter_ms": {"type": "number"},
                    "rtt_ms": {"type": ["number", "null"]},
                    "mos": {"type": "number", "minimum": 1, "maximum": 4.5},
                },
            },
        }
    ),
    "CallList": _object({"calls": {"type": "array", "items": ref("Call")}}),
    "TokenRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "name": _TEXT_OR_NULL,
            "site": _TEXT_OR_NULL,
            "device": {
                "type": "string",
                "pattern": f"^{DEVICE_ID}$",
                "description": "A device's id to pair that board again",
            },
            "expires_in": {"type": "number", "minimum": 60, "maximum": MAX_TTL_S},
        },
    },
    "PairingToken": _object(_TOKEN_PROPS),
    "NewToken": _object(
        {**_TOKEN_PROPS, "token": {"type": "string"}, "qr_svg": {"type": "string"}}
    ),
    "TokenList": _object({"tokens": {"type": "array", "items": ref("PairingToken")}}),
}
