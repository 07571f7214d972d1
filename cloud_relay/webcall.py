"""Talk from the browser: the relay speaks signaling for a web page's WebRTC call to a board.

The browser does its own media (ICE, DTLS-SRTP, Opus); the relay only carries the
offer/answer between the page's HTTP requests and the board's MQTT topics. A browser is no
paired device: it has no key, so it cannot sign envelopes. The relay, which authenticated
the person (a dashboard session or an API token, ``cloud_relay.api``), takes the call on as
the web peer ``web.<name>`` (``topics.WEB_PEER_PREFIX``) and signs its envelopes with its
own key; boards accept a web peer's envelopes only with the relay's signature
(``signing.Verifier``) and apply their own policy to it (``agent.calls.policy``: ``listen``
needs the web peer, or ``web.*``, in ``listen_allowed``). The call goes through ``Router``
like any other (relay policy, presence, the call record in the store, the other workers'
call tables); what the board sends to the web peer comes back here (``Relay.web_peers``).

Non-trickle towards the page, because a page is simplest that way and costs one request:

- ``POST /api/v1/devices/{id}/calls`` ``{mode: "talk"|"listen", sdp}``: ``sdp`` is the
  browser's offer once ICE gathering is complete (every candidate is in it), so the
  invite carries it and an end-of-candidates (count 0) follows at once. The reply waits
  (at most ``answer_timeout_s``; a talk call may ring) for the board's ``accept``, then
  (at most ``candidates_timeout_s``) for the candidates it trickles, and gives 201
  ``{call, peer, sdp}`` with those candidates written into the answer. A decline or busy
  is a 409 ``{error: "refused", reason, detail}`` (``detail``: e.g. the board's
  ``listen-not-allowed``); no answer in time is a 504 and the invite is cancelled.
- ``DELETE /api/v1/calls/{id}``: hang up (or cancel) one of the asker's own calls; 204,
  or 404 for a call that is not (any more) the asker's.
- ``GET /api/v1/ice-servers``: what the page gives its ``RTCPeerConnection`` before it
  makes the offer: ``{iceServers, expires}``, the relay's TURN servers with credentials
  minted for this one call (``Relay.turn_credentials``, as a device gets them on its
  ``config``), or none when the relay has no TURN. A page behind a NAT then offers
  server-reflexive and relayed candidates the board can reach, besides Chromium's host
  candidates (hidden behind mDNS names unless the page may use the microphone).

Calls end also when the board hangs up or its media times out (a page closed without
hanging up). A call lives on the worker whose HTTP request placed it: with several relay
workers, what the board sends in it must reach that worker, which shared subscriptions do
not promise yet (the other workers drop it as unknown here; see the README's status).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web

from agent.media import sdp
from agent.net.candidate import Candidate, CandidateError
from agent.signaling.envelope import (
    AcceptBody,
    Body,
    BusyBody,
    CallMode,
    CancelBody,
    CandidateBody,
    DeclineBody,
    Envelope,
    EnvelopeError,
    HangupBody,
    InviteBody,
    make,
    new_id,
)
from agent.signaling.topics import WEB_PEER_PREFIX, TopicError, check_peer_id, is_web_peer
from cloud_relay.apibase import (
    API_PREFIX,
    BAD,
    DEVICE_ID,
    NULLABLE_TIME,
    PRINCIPAL,
    REFUSED,
    BadRequest,
    error,
    fields,
    json_body,
    json_reply,
    json_request,
    path_param,
    pattern,
)
from cloud_relay.service import Relay

logger = logging.getLogger(__name__)

DEVICE_CALLS_PATH: Final = f"{API_PREFIX}/devices/{{id}}/calls"
CALL_PATH: Final = f"{API_PREFIX}/calls/{{call}}"
ICE_SERVERS_PATH: Final = f"{API_PREFIX}/ice-servers"
MODES: Final = {"talk": CallMode.NORMAL, "listen": CallMode.LISTEN}
"""What the page asks for, and the call mode the board sees."""
_CALL_ID: Final = r"[0-9a-f]{32}"


@dataclass(frozen=True, slots=True)
class WebCallSettings:
    answer_timeout_s: float = 35.0
    """How long a request waits for the board to answer: a talk call rings (the agent's
    ``ring_timeout_s`` is 30 s by default)."""
    candidates_timeout_s: float = 2.0
    """After the answer, how long to wait for the board's candidates (it trickles them
    from its gathered host addresses, so they follow the answer within milliseconds)."""
    max_calls: int = 32
    """Web calls up at once on this worker; more get a 503."""


class CallRefused(Exception):
    """The board (or the relay for it) refused the call; ``reason``/``detail`` are its words."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Answered:
    call: str
    peer: str
    """The web peer the board saw as the caller."""
    sdp: str
    """The board's answer with its candidates written in."""


def web_peer_id(principal: str) -> str:
    """The web peer a principal (user or API token name) calls as; ``BadRequest`` if its name
    does not fit an id (a user name longer than a device id, say)."""
    try:
        return check_peer_id(WEB_PEER_PREFIX + principal)
    except TopicError:
        raise BadRequest("principal", f"{principal[:80]!r} cannot call from a browser") from None


def with_candidates(answer: str, candidates: Sequence[Candidate], *, complete: bool) -> str:
    """``answer`` with ``candidates`` (and, if ``complete``, end-of-candidates) in its first
    m-section that is not rejected: a bundled answer's transport lives there.
    ``sdp.SdpError`` if ``answer`` is no SDP we accept."""
    desc = sdp.parse(answer)
    index = next((i for i, m in enumerate(desc.media) if not m.rejected), None)
    if index is None:
        raise sdp.SdpError("the answer rejects every m-section")
    section = desc.media[index]
    section = replace(
        section,
        candidates=(*section.candidates, *candidates),
        end_of_candidates=section.end_of_candidates or complete,
    )
    media = (*desc.media[:index], section, *desc.media[index + 1 :])
    return sdp.serialize(replace(desc, media=media))


@dataclass(slots=True)
class _WebCall:
    """One web call's signaling state, as the board's messages come in."""

    call: str
    peer: str
    device: str
    answer: asyncio.Future[str]
    """The board's answer SDP, or ``CallRefused``."""
    candidates: list[Candidate] = field(default_factory=list)
    expected: int | None = None
    """How many candidates the board said it trickled (its end of candidates)."""
    gathered: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once, never cleared: every candidate the board trickled is here."""
    answered: bool = False

    def take(self, body: Body) -> bool:
        """Apply a message of the board; True if it ended the call."""
        match body:
            case AcceptBody(sdp=answer):
                self.answered = True
                if not self.answer.done():
                    self.answer.set_result(answer)
            case CandidateBody(candidate=None, count=count):
                self.expected = count if count is not None else len(self.candidates)
            case CandidateBody(candidate=text) if text is not None:
                try:
                    self.candidates.append(Candidate.parse(text))
                except CandidateError as exc:
                    logger.warning("call %s: bad candidate from %s: %s", self.call, self.device,
                                   exc)  # fmt: skip
            case DeclineBody(reason=reason, detail=detail):
                self._refuse(CallRefused(reason, detail))
                return True
            case BusyBody():
                self._refuse(CallRefused("busy"))
                return True
            case HangupBody(reason=reason):
                self._refuse(CallRefused(reason))
                return True
        if self.expected is not None and len(self.candidates) >= self.expected:
            self.gathered.set()
        return False

    def _refuse(self, exc: CallRefused) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)
        self.gathered.set()


class WebCalls:
    """The bridge: web calls of this worker, and their HTTP endpoints."""

    def __init__(
        self,
        relay: Relay,
        settings: WebCallSettings | None = None,
        *,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self._relay = relay
        self._settings = settings or WebCallSettings()
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._calls: dict[str, _WebCall] = {}
        relay.web_peers = self.deliver

    def open_calls(self) -> int:
        return len(self._calls)

    def deliver(self, env: Envelope) -> None:
        """A message the router forwarded (or the relay's decline) for a web peer."""
        entry = self._calls.get(env.call)
        if entry is None or env.to != entry.peer:
            logger.info("%s for %s: no such web call here (call %s)", env.type, env.to, env.call)
            return
        if entry.take(env.body):
            del self._calls[env.call]
            logger.info("web call %s (%s -> %s) ended: %s", env.call, entry.peer, entry.device,
                        getattr(env.body, "reason", env.type))  # fmt: skip

    async def call(self, peer: str, device: str, mode: CallMode, offer: str) -> Answered:
        """Invite ``device`` on behalf of ``peer`` with the browser's complete ``offer``.

        ``CallRefused`` if it declines, ``TimeoutError`` if it does not answer in time
        (the invite is cancelled), ``OverflowError`` when this worker has too many calls.
        """
        if not is_web_peer(peer):
            raise ValueError(f"{peer!r} is not a web peer")
        if len(self._calls) >= self._settings.max_calls:
            raise OverflowError(f"{len(self._calls)} web calls up already")
        call = new_id()
        entry = _WebCall(call, peer, device, asyncio.get_running_loop().create_future())
        self._calls[call] = entry
        invite = InviteBody(sdp=offer, mode=mode)  # EnvelopeError: not an SDP
        logger.info("web call %s: %s -> %s (%s)", call, peer, device, mode)
        done = False
        try:
            self._send(entry, invite)
            if not entry.answer.done():  # the relay may have refused it at once
                # The offer held every candidate the browser gathered: none will trickle.
                self._send(entry, CandidateBody(candidate=None, count=0))
            async with asyncio.timeout(self._settings.answer_timeout_s):
                answer = await entry.answer
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.candidates_timeout_s):
                    await entry.gathered.wait()
            if call not in self._calls:  # it hung up while its candidates came
                raise CallRefused("hangup")
            sdp_text = with_candidates(
                answer, entry.candidates, complete=entry.expected is not None
            )
            done = True
            return Answered(call, peer, sdp_text)
        finally:
            if not done:
                self._finish(entry, "cancelled")

    def hang_up(self, peer: str, call: str) -> bool:
        """End ``peer``'s ``call``; False if it has no such call (any more)."""
        entry = self._calls.get(call)
        if entry is None or entry.peer != peer:
            return False
        self._finish(entry, "hangup")
        return True

    def close(self) -> None:
        """Hang up every web call (the relay is going away; the pages cannot stay)."""
        for entry in list(self._calls.values()):
            self._finish(entry, "relay-shutdown")

    def _finish(self, entry: _WebCall, reason: str) -> None:
        """Forget the call and tell the board: a cancel before its answer, else a hangup."""
        if self._calls.pop(entry.call, None) is None:
            return  # the board ended it
        body: Body = HangupBody(reason=reason) if entry.answered else CancelBody(reason=reason)
        if not entry.answer.done():
            entry.answer.cancel()
        self._send(entry, body)

    def _send(self, entry: _WebCall, body: Body) -> None:
        env = make(body, call=entry.call, from_=entry.peer, to=entry.device, ts=self._clock_ms())
        self._relay.originate(env)

    # --- HTTP -----------------------------------------------------------------------------

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post(DEVICE_CALLS_PATH, self._post)
        router.add_delete(CALL_PATH, self._delete)
        router.add_get(ICE_SERVERS_PATH, self._ice_servers)

    def ice_servers(self, peer: str) -> dict[str, Any]:
        """``GET /api/v1/ice-servers``'s reply for ``peer``: fresh TURN credentials for one
        call (``RTCConfiguration.iceServers``), or none when the relay has no TURN."""
        creds = self._relay.turn_credentials()
        if creds is None:
            return {"iceServers": [], "expires": None}
        logger.info("TURN credentials for %s's web call (until %d)", peer, creds.expires_at)
        expires = datetime.fromtimestamp(creds.expires_at, UTC).isoformat()
        return {"iceServers": [creds.to_json()], "expires": expires}

    async def _post(self, request: web.Request) -> web.Response:
        device = pattern("id", request.match_info["id"], DEVICE_ID)
        peer = web_peer_id(request[PRINCIPAL].name)
        body = await json_body(request)
        fields(body, ("mode", "sdp"))
        raw_mode = body.get("mode")
        mode = MODES.get(raw_mode) if isinstance(raw_mode, str) else None
        if mode is None:
            raise BadRequest("mode", f"mode must be one of {', '.join(MODES)}")
        offer = body.get("sdp")
        if not isinstance(offer, str):
            raise BadRequest("sdp", "sdp must be the browser's offer (a string)")
        try:
            sdp.parse(offer)
            InviteBody(sdp=offer, mode=mode)
        except (sdp.SdpError, EnvelopeError) as exc:
            raise BadRequest("sdp", f"sdp: {exc}") from None
        try:
            answered = await self.call(peer, device, mode, offer)
        except CallRefused as exc:
            return web.json_response(
                {"error": "refused", "reason": exc.reason, "detail": exc.detail,
                 "message": f"{device} refused the call: {exc}"},
                status=409,
            )  # fmt: skip
        except TimeoutError:
            return error(504, "no-answer", f"{device} did not answer")
        except OverflowError as exc:
            return error(503, "busy", str(exc))
        except sdp.SdpError as exc:
            return error(502, "bad-answer", f"{device}'s answer: {exc}")
        return web.json_response(
            {"call": answered.call, "peer": answered.peer, "sdp": answered.sdp}, status=201
        )

    async def _ice_servers(self, request: web.Request) -> web.Response:
        return web.json_response(self.ice_servers(web_peer_id(request[PRINCIPAL].name)))

    async def _delete(self, request: web.Request) -> web.Response:
        call = pattern("call", request.match_info["call"], _CALL_ID)
        if not self.hang_up(web_peer_id(request[PRINCIPAL].name), call):
            return error(404, "not-found", f"no call {call} of yours is up")
        return web.Response(status=204)


# --- OpenAPI -----------------------------------------------------------------------------

WEBCALL_PATHS: Final[dict[str, Any]] = {
    DEVICE_CALLS_PATH: {
        "post": {
            "summary": "Call the device from this browser (WebRTC); answers with its SDP",
            "parameters": [path_param("id", "Device id", DEVICE_ID)],
            "requestBody": json_request(
                {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["mode", "sdp"],
                    "properties": {
                        "mode": {"enum": list(MODES)},
                        "sdp": {"type": "string", "description": "Offer, ICE gathering complete"},
                    },
                }
            ),
            "responses": {
                "201": json_reply("The device answered", "WebCall"),
                "409": json_reply("The device (or the relay) refused the call", "Refused"),
                "502": json_reply("The device's answer was not usable", "Error"),
                "503": json_reply("Too many web calls up", "Error"),
                "504": json_reply("No answer in time (the invite was cancelled)", "Error"),
                **BAD,
                **REFUSED,
            },
        }
    },
    ICE_SERVERS_PATH: {
        "get": {
            "summary": "ICE servers for one web call: TURN with credentials minted for it",
            "responses": {
                "200": json_reply("The page's RTCConfiguration.iceServers", "IceServers"),
                **BAD,
                **REFUSED,
            },
        }
    },
    CALL_PATH: {
        "delete": {
            "summary": "Hang up one of your web calls",
            "parameters": [path_param("call", "Call id", _CALL_ID)],
            "responses": {
                "204": {"description": "Hung up"},
                "404": json_reply("No such call of yours", "Error"),
                **BAD,
                **REFUSED,
            },
        }
    },
}

WEBCALL_SCHEMAS: Final[dict[str, Any]] = {
    "WebCall": {
        "type": "object",
        "required": ["call", "peer", "sdp"],
        "properties": {
            "call": {"type": "string", "pattern": f"^{_CALL_ID}$"},
            "peer": {"type": "string", "description": "The web peer the device sees"},
            "sdp": {"type": "string", "description": "The device's answer, with candidates"},
        },
    },
    "IceServers": {
        "type": "object",
        "required": ["iceServers", "expires"],
        "properties": {
            "iceServers": {
                "type": "array",
                "description": "RTCIceServer entries; empty when the relay has no TURN",
                "items": {
                    "type": "object",
                    "required": ["urls", "username", "credential"],
                    "properties": {
                        "urls": {"type": "array", "items": {"type": "string"}},
                        "username": {"type": "string"},
                        "credential": {"type": "string"},
                    },
                },
            },
            "expires": {
                **NULLABLE_TIME,
                "description": "After this, coturn takes no new allocation with these",
            },
        },
    },
    "Refused": {
        "type": "object",
        "required": ["error", "reason", "detail", "message"],
        "properties": {
            "error": {"const": "refused"},
            "reason": {"type": "string"},
            "detail": {"type": "string"},
            "message": {"type": "string"},
        },
    },
}
