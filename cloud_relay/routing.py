"""Call signaling through the relay: what to do with one message from a device's ``out``.

Pure: ``Router.route(sender, payload, now_ms)`` looks at the message, the
presence table, the policy and the calls it has seen, and returns a ``Route``
(forward, reject with a decline from the relay, or drop) plus the call-record
changes for the store. The relay service does the MQTT and database I/O.

Rules:

* The payload must be a valid envelope (``envelope.from_json``), fresh and not
  replayed (``ReplayGuard``); ``from`` is overwritten with the device id of the
  topic it came on (``with_sender``), whatever the device claimed.
* ``invite``: the callee must be allowed by the policy, known, and not offline;
  otherwise the caller at once gets ``decline`` from ``RELAY_ID`` with reason
  ``policy-refused`` (detail ``relay``) or ``unreachable`` (detail ``unknown`` /
  ``offline``). A forwarded invite opens the call.
* Everything else must belong to an open call between exactly these two devices
  (a message of a call not known yet is parked until another worker's sync opens
  it, or dropped as ``unknown-call`` when the service expires it),
  sent by the side that may send it (``ringing``/``accept``/``decline``/``busy`` by
  the callee, ``cancel`` by the caller). ``decline``/``busy``/``cancel``/``hangup``
  end the call; what still comes for it (both sides hanging up at once) is dropped
  as ``finished-call``, not as an unknown call.

Web peers (``topics.WEB_PEER_PREFIX``, browsers the relay itself speaks for:
``cloud_relay.webcall``) come in through ``originate`` instead of a device's ``out``; only
a web peer's messages may, so that door stays shut to anything claiming a device. They
pass the same rules: a web peer is never present, so an invite to one is ``unreachable``
like one to an unknown device, and what a device sends in a web peer's call is forwarded
to it (the service hands it to the bridge instead of the broker). The relay's groups never
name a web peer: only rules whose caller is ``*`` let one call.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.signaling.envelope import (
    AcceptBody,
    BusyBody,
    CancelBody,
    DeclineBody,
    Envelope,
    EnvelopeError,
    HangupBody,
    InviteBody,
    ReplayGuard,
    ReplayVerdict,
    RingingBody,
    from_json,
    make,
    with_sender,
)
from agent.signaling.topics import RELAY_ID, is_web_peer
from cloud_relay.config import PolicySettings, RoutingSettings
from cloud_relay.presence import PresenceTable

UNREACHABLE = "unreachable"
POLICY_REFUSED = "policy-refused"
MAX_PARKED_PER_CALL = 64
MAX_PARKED = 10_000
FINISHED_CALL = "finished-call"
"""Drop reason of a message for a call that just ended (the peer's own hang-up, mostly)."""


class Action(enum.Enum):
    FORWARD = "forward"
    """Publish ``envelope`` on the recipient's ``in``."""
    REJECT = "reject"
    """Publish ``envelope`` (a decline from the relay) on the sender's ``in``."""
    DROP = "drop"
    """Nothing; ``reason`` says why (a counter label)."""
    PARK = "park"
    """Held: a message of a call this worker has not heard of yet (``Router.apply``)."""


@dataclass(frozen=True, slots=True)
class CallStarted:
    call: str
    caller: str
    callee: str
    mode: str


@dataclass(frozen=True, slots=True)
class CallAnswered:
    call: str


@dataclass(frozen=True, slots=True)
class CallEnded:
    call: str
    reason: str


CallEvent = CallStarted | CallAnswered | CallEnded


@dataclass(frozen=True, slots=True)
class Route:
    action: Action
    envelope: Envelope | None = None
    reason: str = ""
    """Why it was rejected or dropped: a short token fit for a counter label."""
    forged: bool = False
    """The device claimed another ``from`` than its topic's device id."""
    events: tuple[CallEvent, ...] = ()

    @property
    def recipient(self) -> str | None:
        return None if self.envelope is None else self.envelope.to


@dataclass(slots=True)
class _Call:
    caller: str
    callee: str
    answered: bool = False


_CALLEE_SENDS = (RingingBody, AcceptBody, DeclineBody, BusyBody)


@dataclass(slots=True)
class Router:
    presence: PresenceTable
    policy: PolicySettings = field(default_factory=PolicySettings)
    settings: RoutingSettings = field(default_factory=RoutingSettings)
    _calls: OrderedDict[str, _Call] = field(default_factory=OrderedDict, init=False)
    _parked: dict[str, list[tuple[Envelope, bool]]] = field(default_factory=dict, init=False)
    """Messages of calls not known yet, by call: another worker may have routed the invite
    and its sync message not have arrived (the broker does not keep one sender's order
    across workers). ``apply`` routes them once it comes; ``expire`` drops them."""
    _ended: OrderedDict[str, None] = field(default_factory=OrderedDict, init=False)
    """Recently ended calls: both sides often hang up at once, and the second is no error."""
    _guard: ReplayGuard = field(init=False)
    _parked_count: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._guard = ReplayGuard(
            max_age_ms=self.settings.max_age_ms, max_skew_ms=self.settings.max_skew_ms
        )

    def restore(self, open_calls: Iterable[tuple[str, str, str, bool]]) -> None:
        """Calls (id, caller, callee, answered) still open in the store, e.g. after a restart."""
        for call, caller, callee, answered in open_calls:
            self._remember(call, _Call(caller, callee, answered))

    def open_calls(self) -> int:
        return len(self._calls)

    def _end(self, call: str) -> None:
        self._calls.pop(call, None)
        self._ended[call] = None
        while len(self._ended) > self.settings.max_calls:
            self._ended.popitem(last=False)

    def apply(self, event: CallEvent) -> tuple[Route, ...]:
        """A call event another relay worker routed (``cloud_relay.sync``); the routes of
        the messages of that call parked here meanwhile, in the order they came."""
        match event:
            case CallStarted(call=call, caller=caller, callee=callee):
                if call not in self._calls:
                    self._remember(call, _Call(caller, callee))
                return tuple(self._in_call(env, forged) for env, forged in self._unpark(call))
            case CallAnswered(call=call):
                if (entry := self._calls.get(call)) is not None:
                    entry.answered = True
            case CallEnded(call=call):
                self._end(call)
        return ()

    def expire(self, call: str) -> tuple[Route, ...]:
        """Drop what is parked for ``call``: no worker opened it in time."""
        return tuple(
            Route(Action.DROP, env, reason="unknown-call", forged=forged)
            for env, forged in self._unpark(call)
        )

    def _unpark(self, call: str) -> list[tuple[Envelope, bool]]:
        parked = self._parked.pop(call, [])
        self._parked_count -= len(parked)
        return parked

    def _remember(self, call: str, entry: _Call) -> None:
        self._calls[call] = entry
        while len(self._calls) > self.settings.max_calls:
            self._calls.popitem(last=False)

    def route(self, sender: str, payload: bytes, now_ms: int) -> Route:
        """Decide about ``payload`` that device ``sender`` published on its ``out``."""
        try:
            claimed = from_json(payload)
        except EnvelopeError as exc:
            return Route(Action.DROP, reason=exc.label)
        return self.route_envelope(sender, claimed, now_ms)

    def route_envelope(self, sender: str, claimed: Envelope, now_ms: int) -> Route:
        """``route`` for an envelope parsed (and its signature checked) already."""
        forged = claimed.from_ != sender
        env = with_sender(claimed, sender)
        verdict = self._guard.check(env, now_ms)
        if verdict is not ReplayVerdict.FRESH:
            return Route(Action.DROP, env, reason=str(verdict), forged=forged)
        if env.to in (sender, RELAY_ID):
            return Route(Action.DROP, env, reason="bad-recipient", forged=forged)
        if isinstance(env.body, InviteBody):
            return self._invite(env, env.body, now_ms, forged)
        return self._in_call(env, forged)

    def originate(self, env: Envelope, now_ms: int) -> Route:
        """``route_envelope`` for a message the relay sends for a web peer (its ``from``);
        anything from another sender is dropped as ``not-web-peer``."""
        if not is_web_peer(env.from_):
            return Route(Action.DROP, env, reason="not-web-peer")
        return self.route_envelope(env.from_, env, now_ms)

    def _invite(self, env: Envelope, body: InviteBody, now_ms: int, forged: bool) -> Route:
        caller, callee = env.from_, env.to
        if env.call in self._calls or env.call in self._ended:
            return Route(Action.DROP, env, reason="duplicate-call", forged=forged)
        started = CallStarted(env.call, caller, callee, body.mode.value)
        refusal: tuple[str, str] | None = None
        if not self.policy.allows(caller, callee):
            refusal = (POLICY_REFUSED, "relay")
        elif not self.presence.known(callee):
            refusal = (UNREACHABLE, "unknown")
        elif not self.presence.reachable(callee):
            refusal = (UNREACHABLE, "offline")
        if refusal is not None:
            reason, detail = refusal
            decline = make(
                DeclineBody(reason=reason, detail=detail),
                call=env.call,
                from_=RELAY_ID,
                to=caller,
                ts=now_ms,
            )
            return Route(
                Action.REJECT,
                decline,
                reason=f"{reason}-{detail}",
                forged=forged,
                events=(started, CallEnded(env.call, reason)),
            )
        self._remember(env.call, _Call(caller, callee))
        return Route(Action.FORWARD, env, forged=forged, events=(started,))

    def _in_call(self, env: Envelope, forged: bool) -> Route:
        call = self._calls.get(env.call)
        if call is None:
            if env.call in self._ended:
                return Route(Action.DROP, env, reason=FINISHED_CALL, forged=forged)
            parked = self._parked.get(env.call, [])
            if len(parked) >= MAX_PARKED_PER_CALL or self._parked_count >= MAX_PARKED:
                return Route(Action.DROP, env, reason="unknown-call", forged=forged)
            self._parked[env.call] = [*parked, (env, forged)]
            self._parked_count += 1
            return Route(Action.PARK, env, reason="unknown-call", forged=forged)
        if {env.from_, env.to} != {call.caller, call.callee}:
            return Route(Action.DROP, env, reason="not-in-call", forged=forged)
        body = env.body
        if isinstance(body, _CALLEE_SENDS) and env.from_ != call.callee:
            return Route(Action.DROP, env, reason="wrong-side", forged=forged)
        if isinstance(body, CancelBody) and env.from_ != call.caller:
            return Route(Action.DROP, env, reason="wrong-side", forged=forged)
        events: tuple[CallEvent, ...] = ()
        match body:
            case AcceptBody():
                if call.answered:
                    return Route(Action.DROP, env, reason="duplicate-accept", forged=forged)
                call.answered = True
                events = (CallAnswered(env.call),)
            case DeclineBody(reason=reason) | CancelBody(reason=reason) | HangupBody(reason=reason):
                self._end(env.call)
                events = (CallEnded(env.call, reason),)
            case BusyBody():
                self._end(env.call)
                events = (CallEnded(env.call, "busy"),)
        return Route(Action.FORWARD, env, forged=forged, events=events)
