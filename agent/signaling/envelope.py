"""The call-signaling envelope on the MQTT control plane (ARCHITECTURE.md, "Control plane").

One JSON object per message::

    {"v": 1, "type": "invite", "id": "<32 hex>", "call": "<32 hex>", "ts": <unix ms>,
     "from": "<device id>", "to": "<device id>", "body": {...}, "sig": "<base64url>"}

``body`` has one fixed schema per ``type`` (one frozen dataclass each, below);
every body field is required on the wire and no other field is allowed, at
either level. ``sig`` is the sender's signature over ``signing_bytes(env)``, the
canonical JSON of everything but ``sig`` and ``cert`` (``agent.signaling.signing``);
``cert`` is the signer's certificate (base64url DER), which the relay attaches so
that the receiver can check the signature against the relay's CA. ``from`` and ``to``
are device ids or web peer ids (``topics.WEB_PEER_PREFIX``: a browser the relay speaks
for, whose envelopes the relay signs). Both are optional
in the format: a lab broker without pairing carries unsigned messages.

Call set-up, and why the SDP rides on ``invite``/``accept``::

    caller                     relay                     callee
    invite{mode, sdp=offer}  ->  (policy, sets from)  ->   ringing
    candidate ...            ->                       ->   (buffered until it answers)
                             <-                       <-   ringing{}
                             <-                       <-   accept{sdp=answer} | decline | busy
    candidate ...           <->                      <->   candidate ...
    hangup{reason}          <->                      <->   (either side, any time after invite)

The invite carries the offer and the accept carries the answer: one signed
message binds the caller's DTLS fingerprint to the call request, the callee can
start ICE and DTLS as soon as it answers (auto-answer modes answer at once),
and no extra round trip through relay and broker is spent on a separate
offer/answer after ``accept``. The callee sends nothing that reveals its
addresses (SDP, candidates) before it accepts. ``cancel`` is the caller giving
up before an answer; ``hangup`` ends an accepted call. ``offer``/``answer`` are
only for renegotiating an accepted call (an ICE restart after a network
change). Glare (both sides invite each other) needs no extra field: each side
sees both call ids, so one rule (say, the lower call id survives) picks the same
call on both.

Parsing is strict because these arrive from the network: ``from_json`` raises
``EnvelopeError`` (a ``SignalError``, so a ``ValueError``) naming the field, and
nothing else. ``ReplayGuard`` then refuses stale, future and repeated messages.
"""

from __future__ import annotations

import base64
import heapq
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, ClassVar, NoReturn

from agent.signaling.messages import (
    MAX_MESSAGE_BYTES,
    Description,
    Hangup,
    RemoteCandidate,
    Signal,
    SignalError,
)
from agent.signaling.topics import TopicError, check_peer_id

VERSION = 1
MAX_ENVELOPE_BYTES = MAX_MESSAGE_BYTES
"""Larger envelopes are refused unparsed; an invite with a one-stream SDP is ~3-7 KiB."""

TS_MIN_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z
TS_MAX_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z
MAX_CANDIDATE_CHARS = 1024
MAX_CANDIDATES = 1000
"""Most candidates one side trickles in a call (the end's ``count``)."""
MAX_SIG_CHARS = 512
MAX_CERT_CHARS = 2048
"""A P-256 device certificate is ~600 bytes of DER, ~800 characters here."""

_HEX_ID = re.compile(r"[0-9a-f]{32}")
_REASON = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_CANDIDATE = re.compile(r"[\x20-\x7e]+")  # printable ASCII: no CR/LF to smuggle SDP lines
_SIG = re.compile(r"[A-Za-z0-9_-]+")  # base64url, unpadded


class EnvelopeError(SignalError):
    """An envelope that cannot be used; the text says why.

    ``field`` is the culprit (``v``, ``type``, ``id``, ``call``, ``ts``, ``from``,
    ``to``, ``body``, ``body.<name>``, ``sig``) or None for the message as a whole,
    a fixed vocabulary fit for counter labels; names from the wire stay in the text.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message if field is None else f"field {field!r}: {message}")
        self.field = field

    @property
    def label(self) -> str:
        """``malformed-<field>`` (``malformed-message`` for the whole): a counter label."""
        return f"malformed-{self.field or 'message'}"


def _fail(field_name: str | None, message: str) -> NoReturn:
    raise EnvelopeError(message, field_name)


class CallMode(StrEnum):
    """How the callee's board takes the call (door-intercom modes)."""

    NORMAL = "normal"
    """Two-way; rings, the callee answers (or auto-answer per policy)."""
    ANNOUNCE = "announce"
    """Caller sends only (paging); auto-answered, the callee's microphone stays closed."""
    LISTEN = "listen"
    """Caller receives only; policy-gated, shown on the callee's LED, refused in privacy mode."""
    FORCE = "force"
    """Two-way, auto-answered even in do-not-disturb (emergencies); policy-gated."""


_MODES = frozenset(CallMode)


# --- field checks (shared by the dataclasses and the parser) ---------------------------------


def _check_hex_id(value: object, name: str) -> str:
    if not isinstance(value, str) or _HEX_ID.fullmatch(value) is None:
        _fail(name, "must be 32 lowercase hex digits")
    return value


def _check_peer(value: object, name: str) -> str:
    try:
        return check_peer_id(value)
    except TopicError as exc:
        raise EnvelopeError(str(exc), name) from None


def _check_ts(value: object, name: str = "ts") -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(name, "must be an integer (unix milliseconds)")
    if not TS_MIN_MS <= value <= TS_MAX_MS:
        _fail(name, f"{value} is not unix milliseconds between 2020 and 2100")
    return value


def _check_sdp(value: object, name: str) -> str:
    if not isinstance(value, str):
        _fail(name, "must be a string")
    if not value.startswith("v=0"):
        _fail(name, "is not an SDP (must start with 'v=0')")
    if "\x00" in value:
        _fail(name, "contains NUL")
    _check_utf8(value, name)
    return value


def _check_reason(value: object, name: str) -> str:
    if not isinstance(value, str) or _REASON.fullmatch(value) is None:
        _fail(name, "must be a token of 1-32 of a-z, 0-9, '_', '-'")
    return value


def _check_detail(value: object, name: str) -> str:
    if value == "":
        return ""
    if not isinstance(value, str) or _REASON.fullmatch(value) is None:
        _fail(name, "must be empty or a token of 1-32 of a-z, 0-9, '_', '-'")
    return value


def _check_candidate(value: object, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        _fail(name, "must be a string or null")
    if len(value) > MAX_CANDIDATE_CHARS or _CANDIDATE.fullmatch(value) is None:
        _fail(name, f"must be 1-{MAX_CANDIDATE_CHARS} printable ASCII characters")
    return value


def _check_count(value: object, name: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_CANDIDATES:
        _fail(name, f"must be null or an integer 0-{MAX_CANDIDATES}")
    return value


def _check_mode(value: object, name: str) -> CallMode:
    if not isinstance(value, str) or value not in _MODES:
        _fail(name, f"must be one of {', '.join(CallMode)}")
    return CallMode(value)


def _check_utf8(value: str, name: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        _fail(name, "is not valid Unicode (lone surrogate)")


# --- bodies ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InviteBody:
    """Caller -> callee: ring (or auto-answer) in ``mode``; ``sdp`` is the caller's offer."""

    TYPE: ClassVar[str] = "invite"
    sdp: str
    mode: CallMode = CallMode.NORMAL

    def __post_init__(self) -> None:
        _check_sdp(self.sdp, "body.sdp")
        # A plain "announce" becomes CallMode.ANNOUNCE, so ``mode is CallMode.X`` holds.
        object.__setattr__(self, "mode", _check_mode(self.mode, "body.mode"))


@dataclass(frozen=True, slots=True)
class RingingBody:
    """Callee -> caller: the invite arrived and the board is alerting."""

    TYPE: ClassVar[str] = "ringing"


@dataclass(frozen=True, slots=True)
class AcceptBody:
    """Callee -> caller: answered; ``sdp`` is the callee's answer."""

    TYPE: ClassVar[str] = "accept"
    sdp: str

    def __post_init__(self) -> None:
        _check_sdp(self.sdp, "body.sdp")


@dataclass(frozen=True, slots=True)
class DeclineBody:
    """Callee -> caller: refused (declined, do-not-disturb, privacy, ...).

    The relay sends it too, from ``topics.RELAY_ID``, for a callee that is offline,
    unknown, or that the call policy does not let the caller reach.
    """

    TYPE: ClassVar[str] = "decline"
    reason: str = "declined"
    detail: str = ""
    """Empty, or a token refining ``reason`` (e.g. policy-refused / do-not-disturb)."""

    def __post_init__(self) -> None:
        _check_reason(self.reason, "body.reason")
        _check_detail(self.detail, "body.detail")


@dataclass(frozen=True, slots=True)
class BusyBody:
    """Callee -> caller: already in a call."""

    TYPE: ClassVar[str] = "busy"


@dataclass(frozen=True, slots=True)
class CancelBody:
    """Caller -> callee: gave up before an answer (user, timeout)."""

    TYPE: ClassVar[str] = "cancel"
    reason: str = "cancelled"

    def __post_init__(self) -> None:
        _check_reason(self.reason, "body.reason")


@dataclass(frozen=True, slots=True)
class OfferBody:
    """Either side, in an accepted call: renegotiate (ICE restart)."""

    TYPE: ClassVar[str] = "offer"
    sdp: str

    def __post_init__(self) -> None:
        _check_sdp(self.sdp, "body.sdp")


@dataclass(frozen=True, slots=True)
class AnswerBody:
    """The reply to an ``offer``."""

    TYPE: ClassVar[str] = "answer"
    sdp: str

    def __post_init__(self) -> None:
        _check_sdp(self.sdp, "body.sdp")


@dataclass(frozen=True, slots=True)
class CandidateBody:
    """A trickled ICE candidate (the ``candidate:`` attribute value); null ends the list.

    The end carries ``count``, how many candidates its sender trickled before it: relay
    workers that share the signaling do not keep one sender's messages in order, so the
    receiver holds the end until that many have arrived."""

    TYPE: ClassVar[str] = "candidate"
    candidate: str | None
    count: int | None = None

    def __post_init__(self) -> None:
        _check_candidate(self.candidate, "body.candidate")
        _check_count(self.count, "body.count")
        if self.count is not None and self.candidate is not None:
            _fail("body.count", "only the end of candidates (candidate null) has a count")


@dataclass(frozen=True, slots=True)
class HangupBody:
    """Either side: the accepted call ends (hangup, ice-failed, timeout, ...)."""

    TYPE: ClassVar[str] = "hangup"
    reason: str = "hangup"

    def __post_init__(self) -> None:
        _check_reason(self.reason, "body.reason")


Body = (
    InviteBody
    | RingingBody
    | AcceptBody
    | DeclineBody
    | BusyBody
    | CancelBody
    | OfferBody
    | AnswerBody
    | CandidateBody
    | HangupBody
)

BODY_TYPES: dict[str, type[Body]] = {
    cls.TYPE: cls
    for cls in (
        InviteBody,
        RingingBody,
        AcceptBody,
        DeclineBody,
        BusyBody,
        CancelBody,
        OfferBody,
        AnswerBody,
        CandidateBody,
        HangupBody,
    )
}
"""Message type -> its body class."""

# How each body field is checked when it comes off the wire.
_BODY_FIELD_CHECKS: dict[str, Callable[[object, str], object]] = {
    "sdp": _check_sdp,
    "reason": _check_reason,
    "detail": _check_detail,
    "candidate": _check_candidate,
    "count": _check_count,
    "mode": _check_mode,
}


_ADDED_FIELDS = frozenset({"count"})
"""Body fields added to version 1 later: optional, and left out while at their default,
so that peers which predate them read the message as before."""


def _body_to_dict(body: Body) -> dict[str, Any]:
    return {
        f.name: getattr(body, f.name)
        for f in fields(body)
        if f.name not in _ADDED_FIELDS or getattr(body, f.name) != f.default
    }


def _body_from_dict(kind: str, raw: object) -> Body:
    cls = BODY_TYPES[kind]
    if not isinstance(raw, dict):
        _fail("body", f"must be a JSON object for {kind}")
    names = [f.name for f in fields(cls)]
    for key in sorted(raw):
        if key not in names:
            _fail("body", f"unknown field {key[:40]!r} for {kind}")
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in raw:
            values[f.name] = _BODY_FIELD_CHECKS[f.name](raw[f.name], f"body.{f.name}")
        elif f.name not in _ADDED_FIELDS:
            _fail(f"body.{f.name}", f"missing for {kind}")
    return cls(**values)


# --- the envelope ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    """One signaling message. ``from_`` is the wire's ``from`` (a Python keyword)."""

    type: str
    id: str
    call: str
    ts: int
    from_: str
    to: str
    body: Body
    sig: str | None = None
    cert: str | None = None
    """The signer's certificate, base64url DER (attached by the relay; not signed)."""
    v: int = VERSION

    def __post_init__(self) -> None:
        if self.v != VERSION or isinstance(self.v, bool):
            _fail("v", f"unsupported version {self.v!r}, expected {VERSION}")
        cls = BODY_TYPES.get(self.type)
        if cls is None:
            _fail("type", f"unknown message type {self.type!r}")
        if not isinstance(self.body, cls):
            _fail("body", f"{type(self.body).__name__} does not belong to type {self.type!r}")
        _check_hex_id(self.id, "id")
        _check_hex_id(self.call, "call")
        _check_ts(self.ts)
        _check_peer(self.from_, "from")
        _check_peer(self.to, "to")
        if self.sig is not None:
            _check_b64(self.sig, "sig", MAX_SIG_CHARS)
        if self.cert is not None:
            _check_b64(self.cert, "cert", MAX_CERT_CHARS)


def _check_b64(value: object, name: str, limit: int) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        _fail(name, f"must be a string of 1-{limit} base64url characters")
    if _SIG.fullmatch(value) is None or len(value) % 4 == 1:
        _fail(name, "must be unpadded base64url")
    return value


def new_id() -> str:
    """A fresh 128-bit random id (message or call), as 32 lowercase hex digits."""
    return secrets.token_hex(16)


def make(
    body: Body, *, call: str, from_: str, to: str, ts: int, msg_id: str | None = None
) -> Envelope:
    """A new unsigned envelope for ``body``; ``ts`` is the sender's clock in unix ms."""
    return Envelope(
        type=body.TYPE,
        id=new_id() if msg_id is None else msg_id,
        call=call,
        ts=ts,
        from_=from_,
        to=to,
        body=body,
    )


def respond(env: Envelope, body: Body, *, ts: int, msg_id: str | None = None) -> Envelope:
    """A message in the same call, back to ``env``'s sender (e.g. ``ringing`` to an invite)."""
    return make(body, call=env.call, from_=env.to, to=env.from_, ts=ts, msg_id=msg_id)


def with_sender(env: Envelope, device_id: str) -> Envelope:
    """``env`` with ``from`` set to ``device_id``, the sender the relay knows from the topic.

    Whatever the device claimed is overwritten. If the claim was different, the
    signature (which covered the claim) is dropped: it cannot be valid for the
    new content, and a receiver that requires signatures will refuse the message.
    Compare ``env.from_`` with ``device_id`` first to count forged senders.
    """
    _check_peer(device_id, "from")
    if env.from_ == device_id:
        return env
    return replace(env, from_=device_id, sig=None)


def with_sig(env: Envelope, sig: bytes) -> Envelope:
    """``env`` carrying the signature ``sig`` (raw bytes, sent as unpadded base64url)."""
    return replace(env, sig=base64.urlsafe_b64encode(sig).rstrip(b"=").decode("ascii"))


def sig_bytes(env: Envelope) -> bytes | None:
    """The raw signature bytes of ``env``, or None when unsigned."""
    if env.sig is None:
        return None
    return base64.urlsafe_b64decode(env.sig + "=" * (-len(env.sig) % 4))


def to_signal(body: Body) -> Signal | None:
    """The carrier-neutral media signal inside ``body`` (offer, answer, candidate, hangup).

    ``invite`` carries an offer and ``accept`` an answer; call-control bodies
    without media (ringing, decline, busy, cancel) give None.
    """
    match body:
        case InviteBody(sdp=sdp) | OfferBody(sdp=sdp):
            return Description("offer", sdp)
        case AcceptBody(sdp=sdp) | AnswerBody(sdp=sdp):
            return Description("answer", sdp)
        case CandidateBody(candidate=candidate):
            return RemoteCandidate(candidate)
        case HangupBody(reason=reason):
            return Hangup(reason)
    return None


def _to_dict(env: Envelope, *, with_sig: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "v": env.v,
        "type": env.type,
        "id": env.id,
        "call": env.call,
        "ts": env.ts,
        "from": env.from_,
        "to": env.to,
        "body": _body_to_dict(env.body),
    }
    if with_sig and env.sig is not None:
        out["sig"] = env.sig
    if with_sig and env.cert is not None:
        out["cert"] = env.cert
    return out


def _canonical(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def signing_bytes(env: Envelope) -> bytes:
    """What the sender signs: canonical JSON (sorted keys, no spaces, UTF-8) of all but
    ``sig`` and ``cert``.

    A receiver recomputes it from the parsed envelope, so the wire's key order
    and whitespace do not matter, while every value does.
    """
    return _canonical(_to_dict(env, with_sig=False)).encode("utf-8")


def to_json(env: Envelope) -> str:
    """The wire form (canonical JSON); raises ``EnvelopeError`` if it would be too large."""
    text = _canonical(_to_dict(env, with_sig=True))
    size = len(text.encode("utf-8"))
    if size > MAX_ENVELOPE_BYTES:
        _fail(None, f"envelope of {size} bytes is larger than {MAX_ENVELOPE_BYTES}")
    return text


_REQUIRED = ("v", "type", "id", "call", "ts", "from", "to", "body")
_OPTIONAL = ("sig", "cert")
_FIELDS = frozenset(_REQUIRED + _OPTIONAL)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # Two values for one key: a verifier and a consumer could each see a different one.
            _fail(None, f"key {key[:40]!r} appears twice")
        out[key] = value
    return out


def _no_constant(name: str) -> NoReturn:
    _fail(None, f"not JSON: {name} is not a number")


def from_json(data: str | bytes) -> Envelope:
    """Parse and check one envelope from the wire (UTF-8 JSON)."""
    if len(data) > MAX_ENVELOPE_BYTES:
        _fail(None, f"envelope larger than {MAX_ENVELOPE_BYTES} bytes")
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            _fail(None, "not UTF-8")
    else:
        text = data
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            _fail(None, "not valid Unicode (lone surrogate)")
        if size > MAX_ENVELOPE_BYTES:
            _fail(None, f"envelope larger than {MAX_ENVELOPE_BYTES} bytes")
    try:
        raw = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except EnvelopeError:
        raise
    except (ValueError, RecursionError) as exc:
        _fail(None, f"not JSON: {exc}")
    if not isinstance(raw, dict):
        _fail(None, "envelope must be a JSON object")
    return _from_dict(raw)


def _from_dict(raw: dict[str, Any]) -> Envelope:
    # The version first: a newer sender's message fails as "version", not as "unknown field".
    if "v" not in raw:
        _fail("v", "missing")
    if raw["v"] != VERSION or not isinstance(raw["v"], int) or isinstance(raw["v"], bool):
        _fail("v", f"unsupported version {raw['v']!r}, expected {VERSION}")
    for key in sorted(raw):
        if key not in _FIELDS:
            _fail(None, f"unknown envelope field {key[:40]!r}")
    for key in _REQUIRED:
        if key not in raw:
            _fail(key, "missing")
    kind = raw["type"]
    if not isinstance(kind, str):
        _fail("type", "must be a string")
    if kind not in BODY_TYPES:
        _fail("type", f"unknown message type {kind[:40]!r}")
    sig = _check_b64(raw["sig"], "sig", MAX_SIG_CHARS) if "sig" in raw else None
    cert = _check_b64(raw["cert"], "cert", MAX_CERT_CHARS) if "cert" in raw else None
    return Envelope(
        type=kind,
        id=_check_hex_id(raw["id"], "id"),
        call=_check_hex_id(raw["call"], "call"),
        ts=_check_ts(raw["ts"]),
        from_=_check_peer(raw["from"], "from"),
        to=_check_peer(raw["to"], "to"),
        body=_body_from_dict(kind, raw["body"]),
        sig=sig,
        cert=cert,
    )


# --- replay protection -----------------------------------------------------------------------


class ReplayVerdict(StrEnum):
    """What ``ReplayGuard.check`` decided; the value is a good counter label."""

    FRESH = "fresh"
    STALE = "stale"
    """Older than the maximum age."""
    FUTURE = "future"
    """Further ahead of our clock than the skew allowance."""
    DUPLICATE = "duplicate"
    """An id seen before, within the window."""
    OVERFLOW = "overflow"
    """No older than the maximum age, but older than ids the full memory had to forget."""


@dataclass(slots=True)
class ReplayGuard:
    """Refuses stale, future and repeated messages; the clock is passed in (unix ms).

    An id is remembered until its message would be stale anyway (``ts`` +
    ``max_age_ms``), so memory follows the message rate over one window. If more
    than ``max_ids`` would be remembered, the oldest are forgotten early and
    every message no newer than them is refused as ``OVERFLOW``: the guard gets
    stricter under a flood, never blind to a replay. The clock it uses never
    runs backwards: after a step back it keeps the latest time it was given.
    """

    max_age_ms: int = 60_000
    max_skew_ms: int = 60_000
    max_ids: int = 100_000
    _expiry: list[tuple[int, str]] = field(default_factory=list, init=False, repr=False)
    _seen: set[str] = field(default_factory=set, init=False, repr=False)
    _now: int = field(default=0, init=False, repr=False)
    _floor: int = field(default=-1, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_age_ms < 0 or self.max_skew_ms < 0 or self.max_ids < 1:
            raise ValueError("ReplayGuard: ages must be >= 0 and max_ids >= 1")

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, env: Envelope, now_ms: int) -> ReplayVerdict:
        """Judge ``env`` at ``now_ms``; a ``FRESH`` message's id is remembered."""
        now = self._now = max(self._now, now_ms)
        while self._expiry and self._expiry[0][0] < now:
            self._seen.discard(heapq.heappop(self._expiry)[1])
        if env.ts > now + self.max_skew_ms:
            return ReplayVerdict.FUTURE
        if env.ts + self.max_age_ms < now:
            return ReplayVerdict.STALE
        if env.id in self._seen:
            return ReplayVerdict.DUPLICATE
        if env.ts <= self._floor:
            return ReplayVerdict.OVERFLOW
        self._seen.add(env.id)
        heapq.heappush(self._expiry, (env.ts + self.max_age_ms, env.id))
        while len(self._seen) > self.max_ids:
            expiry, forgotten = heapq.heappop(self._expiry)
            self._seen.discard(forgotten)
            self._floor = max(self._floor, expiry - self.max_age_ms)
        return ReplayVerdict.FRESH
