"""The call state machine of one device, without I/O.

``step(state, event, now, config=..., policy=...)`` returns the next state and the actions
to carry out, in order: send a message to the peer, start or stop media, start or cancel a
timer, publish a call-ended record, update the LED/UI/presence, reply to a command. It
never raises on anything that arrives from outside; an event it cannot use becomes an
``Ignored`` action with a reason. ``CallMachine`` keeps the state and counts those.

An intercom has one call at a time: an invite while a call is up gets ``Busy``.

States (``Phase``) and transitions::

    IDLE/ENDED --call-------------------------------> OUTGOING   [timer INVITE]
    OUTGOING   --ringing------------------------------> OUTGOING   [timer ANSWER]
    OUTGOING   --accept-------------------------------> CONNECTING [timer CONNECT, start media]
    IDLE/ENDED --invite, policy rings-----------------> RINGING    [timer RING]
    IDLE/ENDED --invite, policy auto-answers----------> CONNECTING [start media]
    RINGING    --answer (or call to the same peer)----> CONNECTING [start media]
    CONNECTING --media connected----------------------> ACTIVE     [timer ACTIVE if limited]
    OUTGOING   --glare lost (see below)---------------> CONNECTING (the peer's call)
    OUTGOING, RINGING, CONNECTING, ACTIVE --hang-up, cancel, decline, busy, any timeout,
               ICE failure, media loss, media error---> ENDED      [stop media, timer ENDED]
    ENDED      --timer ENDED--------------------------> IDLE

ENDED shows the outcome for a moment and recognises late messages of that call; a new call
or invite is handled in it exactly as in IDLE. Media starts only on the way into
CONNECTING and stops on every way out of CONNECTING/ACTIVE.

Glare (two devices invite each other at once): each side, in OUTGOING towards the peer whose
invite arrives, compares the two calls by ``(call id, caller device id)``; the smaller one
survives. Both sides see the same two pairs, so both pick the same call whatever order the
messages arrive in. The winner ignores the peer's invite; the loser ends its own call
(reason GLARE, tells the peer with ``Cancel``) and answers the peer's call at once, since
its user has just asked to talk to that peer (the policy can still refuse a mode it does not
allow). Call ids are random, so which side wins is fair; the device id only breaks a tie of
identical ids, so the order is total.

Messages are checked against the current call: id, sender (the peer) and role (only the
caller sends ``Invite``/``Cancel``, only the callee ``Ringing``/``Accept``/``Decline``/
``Busy``). The ids of recently finished calls are remembered, so a late accept, a repeated
invite or a cancel that overtook its invite are recognised and never start anything.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from dataclasses import dataclass, replace
from typing import ClassVar

from agent.calls.policy import DEFAULT_POLICY, CallPolicy, Verdict, decide
from agent.media.sdp import Direction
from agent.media.session import EndReason
from agent.signaling.envelope import CallMode

logger = logging.getLogger(__name__)


class Phase(enum.StrEnum):
    IDLE = "idle"
    OUTGOING = "outgoing"
    RINGING = "ringing"
    CONNECTING = "connecting"
    ACTIVE = "active"
    ENDED = "ended"


LIVE_PHASES = frozenset({Phase.OUTGOING, Phase.RINGING, Phase.CONNECTING, Phase.ACTIVE})
"""Phases with a call in progress (the device is busy)."""
MEDIA_PHASES = frozenset({Phase.CONNECTING, Phase.ACTIVE})
"""Phases in which media runs."""


class Role(enum.StrEnum):
    CALLER = "caller"
    CALLEE = "callee"


class CallEndReason(enum.StrEnum):
    """Why a call ended, as this device saw it (the values go on the wire and in telemetry)."""

    LOCAL_HANGUP = "local-hangup"
    REMOTE_HANGUP = "remote-hangup"
    DECLINED = "declined"
    BUSY = "busy"
    CANCELLED = "cancelled"
    NO_ANSWER = "no-answer"
    """Rang until the ring timeout (either side's)."""
    UNREACHABLE = "unreachable"
    """The callee never acknowledged the invite (offline, or the relay said it is unknown)."""
    CONNECT_TIMEOUT = "connect-timeout"
    ICE_FAILED = "ice-failed"
    MEDIA_LOST = "media-lost"
    """No media from the peer any more (network loss mid-call)."""
    TIME_LIMIT = "time-limit"
    POLICY_REFUSED = "policy-refused"
    GLARE = "glare"
    """Both sides called each other and this call lost (the other one goes on)."""
    SHUTDOWN = "shutdown"
    """A side's agent was stopped (SIGTERM: a restart, an upgrade, a power-down)."""
    ERROR = "error"


# Reasons a callee may give in Decline, and a peer in Hangup, that we adopt as our own; any
# other value is read as a plain decline or hang-up.
_DECLINE_REASONS = frozenset(
    {
        CallEndReason.DECLINED,
        CallEndReason.POLICY_REFUSED,
        CallEndReason.NO_ANSWER,
        CallEndReason.UNREACHABLE,
        CallEndReason.SHUTDOWN,
        CallEndReason.ERROR,
    }
)
_SHARED_FAILURES = frozenset(
    {
        CallEndReason.CONNECT_TIMEOUT,
        CallEndReason.ICE_FAILED,
        CallEndReason.MEDIA_LOST,
        CallEndReason.TIME_LIMIT,
        CallEndReason.SHUTDOWN,
        CallEndReason.ERROR,
    }
)


class Timer(enum.StrEnum):
    """The one timer of each timed phase."""

    INVITE = "invite"
    ANSWER = "answer"
    RING = "ring"
    CONNECT = "connect"
    ACTIVE = "active"
    ENDED = "ended"


class Indicator(enum.StrEnum):
    """What the LED, UI and presence show."""

    IDLE = "idle"
    CALLING = "calling"
    REMOTE_RINGING = "remote-ringing"
    RINGING = "ringing"
    CONNECTING = "connecting"
    IN_CALL = "in-call"
    ANNOUNCING = "announcing"
    HEARING_ANNOUNCEMENT = "hearing-announcement"
    LISTENING = "listening"
    BEING_LISTENED = "being-listened"
    """Our microphone goes to a listener: shown from media start to media stop."""
    ENDED = "ended"


class IgnoreReason(enum.StrEnum):
    UNKNOWN_CALL = "unknown-call"
    FINISHED_CALL = "finished-call"
    """A late or repeated message for a call that has ended."""
    DUPLICATE = "duplicate"
    OUT_OF_ORDER = "out-of-order"
    """Known call, but the message does not fit its phase (e.g. ringing after accept)."""
    WRONG_PEER = "wrong-peer"
    WRONG_ROLE = "wrong-role"
    GLARE_WON = "glare-won"
    """The peer's crossing invite, dropped because our call survives."""
    STALE_TIMER = "stale-timer"


@dataclass(frozen=True, slots=True)
class CallConfig:
    """Timers and identity of the call machine; tests shrink the timers instead of sleeping."""

    device_id: str
    """This device's id (from pairing): calls to it are refused; it breaks glare ties."""
    invite_timeout_s: float = 5.0
    """Caller: the callee must acknowledge the invite (ringing, accept, decline, busy) within
    this, else the call ends as UNREACHABLE. Covers an offline callee the relay missed."""
    answer_timeout_s: float = 30.0
    """Caller: how long the callee may ring after its ringing arrived (then NO_ANSWER)."""
    ring_timeout_s: float = 30.0
    """Callee: how long this device rings before declining with NO_ANSWER."""
    connect_timeout_s: float = 10.0
    """Both: from answer to media connected (ICE + DTLS), else CONNECT_TIMEOUT."""
    max_active_s: float | None = None
    """Both: longest connected call (TIME_LIMIT), e.g. to bound announcements; None: no limit."""
    ended_hold_s: float = 3.0
    """How long ENDED is shown before IDLE. A new call or invite is accepted meanwhile."""
    remembered_calls: int = 64
    """How many finished call ids are kept to recognise their late or repeated messages."""

    def __post_init__(self) -> None:
        if not self.device_id:
            raise ValueError("device_id must not be empty")
        for name in (
            "invite_timeout_s",
            "answer_timeout_s",
            "ring_timeout_s",
            "connect_timeout_s",
            "ended_hold_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.max_active_s is not None and not self.max_active_s > 0:
            raise ValueError("max_active_s must be positive or None")
        if self.remembered_calls < 1:
            raise ValueError("remembered_calls must be at least 1")


def media_direction(mode: CallMode, role: Role) -> Direction:
    """Our media direction in a call of ``mode``: announce sends from the caller, listen
    from the callee, the others both ways."""
    if mode is CallMode.ANNOUNCE:
        return Direction.SENDONLY if role is Role.CALLER else Direction.RECVONLY
    if mode is CallMode.LISTEN:
        return Direction.RECVONLY if role is Role.CALLER else Direction.SENDONLY
    return Direction.SENDRECV


# --- state ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    call_id: str
    peer: str
    mode: CallMode
    role: Role
    created_at: float
    """When the invite was sent (caller) or received (callee)."""
    remote_ringing_at: float | None = None
    """Caller: when the callee's ringing arrived."""
    answered_at: float | None = None
    """When the call was accepted (by the callee, or by this device as callee)."""
    auto_answered: bool = False
    connected_at: float | None = None

    @property
    def direction(self) -> Direction:
        return media_direction(self.mode, self.role)


@dataclass(frozen=True, slots=True)
class CallState:
    phase: Phase = Phase.IDLE
    call: Call | None = None
    """The call in progress (live phases) or just ended (ENDED); None in IDLE."""
    timer: Timer | None = None
    """The timer running for this phase, if any."""
    reason: CallEndReason | None = None
    """Set exactly in ENDED."""
    finished: tuple[tuple[str, str], ...] = ()
    """Recently finished calls as (call id, caller device id), oldest first."""

    @property
    def live(self) -> Call | None:
        """The call in progress, if any."""
        return self.call if self.phase in LIVE_PHASES else None

    def is_finished(self, call_id: str) -> bool:
        return any(cid == call_id for cid, _ in self.finished)


# --- events --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallCommand:
    """Place a call. The shell makes ``call_id`` (random, 128 bits) so the machine stays pure.
    Calling the peer that is ringing us answers that call instead."""

    call_id: str
    peer: str
    mode: CallMode = CallMode.NORMAL


@dataclass(frozen=True, slots=True)
class AnswerCommand:
    call_id: str | None = None
    """If set, act only if this is the current call (guards against a call that changed)."""


@dataclass(frozen=True, slots=True)
class DeclineCommand:
    call_id: str | None = None


@dataclass(frozen=True, slots=True)
class HangupCommand:
    """Ends whatever call is up: cancels an outgoing one, declines a ringing one."""

    call_id: str | None = None
    shutdown: bool = False
    """The agent is stopping: the peer is told ``shutdown`` rather than a hang-up."""


@dataclass(frozen=True, slots=True)
class CancelCommand:
    call_id: str | None = None


Command = CallCommand | AnswerCommand | DeclineCommand | HangupCommand | CancelCommand


@dataclass(frozen=True, slots=True)
class Invite:
    kind: ClassVar[str] = "invite"
    call_id: str
    mode: CallMode = CallMode.NORMAL


@dataclass(frozen=True, slots=True)
class Ringing:
    kind: ClassVar[str] = "ringing"
    call_id: str


@dataclass(frozen=True, slots=True)
class Accept:
    kind: ClassVar[str] = "accept"
    call_id: str


@dataclass(frozen=True, slots=True)
class Decline:
    kind: ClassVar[str] = "decline"
    call_id: str
    reason: CallEndReason = CallEndReason.DECLINED
    detail: str = ""
    """E.g. the policy's refusal (``do-not-disturb``), for the caller's UI and log."""


@dataclass(frozen=True, slots=True)
class Busy:
    kind: ClassVar[str] = "busy"
    call_id: str


@dataclass(frozen=True, slots=True)
class Cancel:
    kind: ClassVar[str] = "cancel"
    call_id: str


@dataclass(frozen=True, slots=True)
class Hangup:
    kind: ClassVar[str] = "hangup"
    call_id: str
    reason: CallEndReason = CallEndReason.LOCAL_HANGUP
    """Why the sender ended the call, as the sender saw it."""


Message = Invite | Ringing | Accept | Decline | Busy | Cancel | Hangup
_FROM_CALLEE = (Ringing, Accept, Decline, Busy)


@dataclass(frozen=True, slots=True)
class Received:
    """A message from the peer; ``sender`` is the device id the relay vouches for."""

    sender: str
    message: Message


@dataclass(frozen=True, slots=True)
class MediaConnected:
    call_id: str


@dataclass(frozen=True, slots=True)
class IceFailed:
    call_id: str


@dataclass(frozen=True, slots=True)
class MediaLost:
    """Nothing from the peer for the media timeout, or the transport closed."""

    call_id: str


@dataclass(frozen=True, slots=True)
class PeerBye:
    """The peer ended its media (RTCP BYE); its hangup may still be on the way."""

    call_id: str
    reason: str = ""
    """The BYE's reason for leaving: our agents put their end reason there, which is
    taken up when it is one both sides share (e.g. ``shutdown``)."""


@dataclass(frozen=True, slots=True)
class MediaFailed:
    """Media could not be set up or broke for a local reason (exception, audio device)."""

    call_id: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class TimerExpired:
    timer: Timer
    call_id: str


MediaEvent = MediaConnected | IceFailed | MediaLost | PeerBye | MediaFailed
Event = Command | Received | MediaEvent | TimerExpired


def media_end_event(reason: EndReason, call_id: str, bye_reason: str = "") -> Event | None:
    """The event for a media session that ended by itself; None when we closed it."""
    if reason is EndReason.LOCAL_HANGUP:
        return None
    if reason is EndReason.REMOTE_BYE:
        return PeerBye(call_id, bye_reason)
    if reason is EndReason.SOURCE_ENDED:
        # Our audio ran out (an announcement played from a file): we are done talking.
        return HangupCommand(call_id)
    return MediaLost(call_id)


# --- actions -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    to: str
    message: Message


@dataclass(frozen=True, slots=True)
class StartMedia:
    call_id: str
    peer: str
    role: Role
    mode: CallMode
    direction: Direction


@dataclass(frozen=True, slots=True)
class StopMedia:
    call_id: str
    reason: str = ""
    """Why the call ended, for the peer (the RTCP BYE's reason for leaving)."""


@dataclass(frozen=True, slots=True)
class StartTimer:
    timer: Timer
    call_id: str
    duration_s: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    timer: Timer
    call_id: str


@dataclass(frozen=True, slots=True)
class CallSummary:
    """The record of one ended call; the shell adds the media quality stats it collected."""

    call_id: str
    peer: str
    mode: CallMode
    role: Role
    reason: CallEndReason
    detail: str
    created_at: float
    remote_ringing_at: float | None
    answered_at: float | None
    auto_answered: bool
    connected_at: float | None
    ended_at: float

    @property
    def setup_s(self) -> float | None:
        """From answer to media connected."""
        if self.answered_at is None or self.connected_at is None:
            return None
        return self.connected_at - self.answered_at

    @property
    def talk_s(self) -> float:
        """How long media was connected (0 if it never was)."""
        return 0.0 if self.connected_at is None else self.ended_at - self.connected_at


@dataclass(frozen=True, slots=True)
class CallEnded:
    summary: CallSummary


@dataclass(frozen=True, slots=True)
class Notify:
    indicator: Indicator
    call_id: str | None = None
    peer: str | None = None
    mode: CallMode | None = None
    reason: CallEndReason | None = None


@dataclass(frozen=True, slots=True)
class CommandRefused:
    command: Command
    reason: str


@dataclass(frozen=True, slots=True)
class InviteRefused:
    """An invite turned away without becoming our call (busy, or refused by policy)."""

    call_id: str
    caller: str
    mode: CallMode
    reason: CallEndReason
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Ignored:
    event: Event
    reason: IgnoreReason


Action = (
    Send
    | StartMedia
    | StopMedia
    | StartTimer
    | CancelTimer
    | CallEnded
    | Notify
    | CommandRefused
    | InviteRefused
    | Ignored
)
Step = tuple[CallState, tuple[Action, ...]]


# --- transitions ---------------------------------------------------------------------------


def step(
    state: CallState,
    event: Event,
    now: float,
    *,
    config: CallConfig,
    policy: CallPolicy = DEFAULT_POLICY,
) -> Step:
    """The next state and the actions for ``event`` at time ``now`` (seconds, any epoch)."""
    match event:
        case Received():
            return _on_received(state, event, now, config, policy)
        case MediaConnected() | IceFailed() | MediaLost() | PeerBye() | MediaFailed():
            return _on_media(state, event, now, config)
        case TimerExpired():
            return _on_timer(state, event, now, config)
        case _:
            return _on_command(state, event, now, config)


def _timer_for(phase: Phase, call: Call | None, config: CallConfig) -> tuple[Timer, float] | None:
    match phase:
        case Phase.OUTGOING:
            assert call is not None
            if call.remote_ringing_at is None:
                return Timer.INVITE, config.invite_timeout_s
            return Timer.ANSWER, config.answer_timeout_s
        case Phase.RINGING:
            return Timer.RING, config.ring_timeout_s
        case Phase.CONNECTING:
            return Timer.CONNECT, config.connect_timeout_s
        case Phase.ACTIVE:
            return None if config.max_active_s is None else (Timer.ACTIVE, config.max_active_s)
        case Phase.ENDED:
            return Timer.ENDED, config.ended_hold_s
        case _:
            return None


def _indicator(phase: Phase, call: Call | None) -> Indicator:
    if call is None or phase is Phase.IDLE:
        return Indicator.IDLE
    listened = call.mode is CallMode.LISTEN and call.role is Role.CALLEE
    match phase:
        case Phase.OUTGOING:
            return Indicator.CALLING if call.remote_ringing_at is None else Indicator.REMOTE_RINGING
        case Phase.RINGING:
            return Indicator.RINGING
        case Phase.CONNECTING:
            # Privacy first: shown as soon as our microphone may go out.
            return Indicator.BEING_LISTENED if listened else Indicator.CONNECTING
        case Phase.ACTIVE:
            if call.mode is CallMode.ANNOUNCE:
                if call.role is Role.CALLER:
                    return Indicator.ANNOUNCING
                return Indicator.HEARING_ANNOUNCEMENT
            if call.mode is CallMode.LISTEN:
                return Indicator.BEING_LISTENED if listened else Indicator.LISTENING
            return Indicator.IN_CALL
        case _:
            return Indicator.ENDED


def _enter(
    state: CallState,
    phase: Phase,
    call: Call | None,
    config: CallConfig,
    actions: list[Action],
    *,
    reason: CallEndReason | None = None,
    finished: tuple[tuple[str, str], ...] | None = None,
) -> Step:
    """Switch phase (or call): cancel the old timer, start the new one, notify the UI."""
    if state.timer is not None and state.call is not None:
        actions.append(CancelTimer(state.timer, state.call.call_id))
    timer = _timer_for(phase, call, config)
    if timer is not None:
        assert call is not None
        actions.append(StartTimer(timer[0], call.call_id, timer[1]))
    actions.append(
        Notify(
            _indicator(phase, call),
            call.call_id if call else None,
            call.peer if call else None,
            call.mode if call else None,
            reason,
        )
    )
    new = CallState(
        phase,
        call,
        timer[0] if timer else None,
        reason,
        state.finished if finished is None else finished,
    )
    return new, tuple(actions)


def _remember(
    state: CallState, key: tuple[str, str], config: CallConfig
) -> tuple[tuple[str, str], ...]:
    return (*state.finished, key)[-config.remembered_calls :]


def _caller_id(call: Call, config: CallConfig) -> str:
    return call.peer if call.role is Role.CALLEE else config.device_id


def _finish(
    state: CallState,
    reason: CallEndReason,
    now: float,
    config: CallConfig,
    *,
    send: Message | None,
    detail: str = "",
) -> tuple[list[Action], tuple[tuple[str, str], ...]]:
    """The actions that close the live call; the caller picks the next phase."""
    call = state.live
    assert call is not None
    actions: list[Action] = []
    if send is not None:
        actions.append(Send(call.peer, send))
    if state.phase in MEDIA_PHASES:
        actions.append(StopMedia(call.call_id, reason.value))
    summary = CallSummary(
        call.call_id,
        call.peer,
        call.mode,
        call.role,
        reason,
        detail,
        call.created_at,
        call.remote_ringing_at,
        call.answered_at,
        call.auto_answered,
        call.connected_at,
        now,
    )
    actions.append(CallEnded(summary))
    return actions, _remember(state, (call.call_id, _caller_id(call, config)), config)


def _end(
    state: CallState,
    reason: CallEndReason,
    now: float,
    config: CallConfig,
    *,
    send: Message | None = None,
    detail: str = "",
) -> Step:
    actions, finished = _finish(state, reason, now, config, send=send, detail=detail)
    return _enter(state, Phase.ENDED, state.call, config, actions, reason=reason, finished=finished)


def _hangup_and_end(
    state: CallState, reason: CallEndReason, now: float, config: CallConfig, detail: str = ""
) -> Step:
    """End the live call for a reason of our own and tell the peer, so it never waits."""
    call = state.live
    assert call is not None
    send: Message
    if state.phase is Phase.OUTGOING:
        send = Cancel(call.call_id)
    elif state.phase is Phase.RINGING:
        send = Decline(call.call_id, reason)
    else:
        send = Hangup(call.call_id, reason)
    return _end(state, reason, now, config, send=send, detail=detail)


def _answer(
    state: CallState,
    call: Call,
    now: float,
    config: CallConfig,
    actions: list[Action],
    *,
    auto: bool,
) -> Step:
    call = replace(call, answered_at=now, auto_answered=auto)
    actions.append(Send(call.peer, Accept(call.call_id)))
    actions.append(StartMedia(call.call_id, call.peer, call.role, call.mode, call.direction))
    return _enter(state, Phase.CONNECTING, call, config, actions)


def _refuse(state: CallState, command: Command, why: str) -> Step:
    return state, (CommandRefused(command, why),)


def _on_command(state: CallState, command: Command, now: float, config: CallConfig) -> Step:
    live = state.live
    if isinstance(command, CallCommand):
        if not command.call_id or not command.peer:
            return _refuse(state, command, "call id and peer must not be empty")
        if command.peer == config.device_id:
            return _refuse(state, command, "a device cannot call itself")
        if live is None:
            if (command.call_id, config.device_id) in state.finished:
                return _refuse(state, command, f"call id {command.call_id} was used already")
            call = Call(command.call_id, command.peer, command.mode, Role.CALLER, now)
            actions: list[Action] = [Send(call.peer, Invite(call.call_id, call.mode))]
            return _enter(state, Phase.OUTGOING, call, config, actions)
        if state.phase is Phase.RINGING and live.peer == command.peer:
            # Both users want to talk: take the call that is already ringing.
            return _answer(state, live, now, config, [], auto=False)
        return _refuse(state, command, f"busy: {state.phase} call with {live.peer}")
    if live is None:
        return _refuse(state, command, "no call in progress")
    if command.call_id is not None and command.call_id != live.call_id:
        return _refuse(
            state, command, f"no call {command.call_id}; the current one is {live.call_id}"
        )
    match command:
        case AnswerCommand():
            if state.phase is not Phase.RINGING:
                return _refuse(state, command, f"the call is {state.phase}, not ringing")
            return _answer(state, live, now, config, [], auto=False)
        case DeclineCommand():
            if state.phase is not Phase.RINGING:
                return _refuse(state, command, f"the call is {state.phase}, not ringing")
            return _end(state, CallEndReason.DECLINED, now, config, send=Decline(live.call_id))
        case CancelCommand():
            if state.phase is not Phase.OUTGOING:
                return _refuse(state, command, f"the call is {state.phase}, not outgoing")
            return _end(state, CallEndReason.CANCELLED, now, config, send=Cancel(live.call_id))
        case HangupCommand(shutdown=True):
            return _hangup_and_end(state, CallEndReason.SHUTDOWN, now, config)
        case _:  # HangupCommand
            if state.phase is Phase.OUTGOING:
                return _end(state, CallEndReason.CANCELLED, now, config, send=Cancel(live.call_id))
            if state.phase is Phase.RINGING:
                return _end(state, CallEndReason.DECLINED, now, config, send=Decline(live.call_id))
            return _hangup_and_end(state, CallEndReason.LOCAL_HANGUP, now, config)


def _ignore(state: CallState, event: Event, reason: IgnoreReason) -> Step:
    return state, (Ignored(event, reason),)


def _on_received(
    state: CallState, event: Received, now: float, config: CallConfig, policy: CallPolicy
) -> Step:
    message, sender = event.message, event.sender
    if isinstance(message, Invite):
        return _on_invite(state, event, message, now=now, config=config, policy=policy)
    live = state.live
    if live is None or live.call_id != message.call_id:
        if state.is_finished(message.call_id):
            return _ignore(state, event, IgnoreReason.FINISHED_CALL)
        if isinstance(message, Cancel):
            # A cancel that overtook its invite: remember it, so the invite never rings.
            state = replace(state, finished=_remember(state, (message.call_id, sender), config))
        return _ignore(state, event, IgnoreReason.UNKNOWN_CALL)
    if sender != live.peer:
        return _ignore(state, event, IgnoreReason.WRONG_PEER)
    from_callee = isinstance(message, _FROM_CALLEE)
    if (isinstance(message, Cancel) and live.role is not Role.CALLEE) or (
        from_callee and live.role is not Role.CALLER
    ):
        return _ignore(state, event, IgnoreReason.WRONG_ROLE)
    phase = state.phase
    match message:
        case Hangup(reason=reason):
            if phase is Phase.RINGING:
                return _end(state, CallEndReason.CANCELLED, now, config)
            if reason in _SHARED_FAILURES:
                return _end(state, reason, now, config)
            return _end(state, CallEndReason.REMOTE_HANGUP, now, config)
        case Cancel():
            if phase is Phase.ACTIVE:
                return _end(state, CallEndReason.REMOTE_HANGUP, now, config)
            return _end(state, CallEndReason.CANCELLED, now, config)
        case _ if phase is not Phase.OUTGOING:
            # Ringing/accept/decline/busy after the call was accepted.
            duplicate = isinstance(message, Accept) or (
                isinstance(message, Ringing) and live.remote_ringing_at is not None
            )
            return _ignore(
                state, event, IgnoreReason.DUPLICATE if duplicate else IgnoreReason.OUT_OF_ORDER
            )
        case Ringing():
            if live.remote_ringing_at is not None:
                return _ignore(state, event, IgnoreReason.DUPLICATE)
            return _enter(state, Phase.OUTGOING, replace(live, remote_ringing_at=now), config, [])
        case Accept():
            call = replace(live, answered_at=now)
            actions: list[Action] = [
                StartMedia(call.call_id, call.peer, call.role, call.mode, call.direction)
            ]
            return _enter(state, Phase.CONNECTING, call, config, actions)
        case Decline(reason=reason, detail=detail):
            reason = reason if reason in _DECLINE_REASONS else CallEndReason.DECLINED
            return _end(state, reason, now, config, detail=detail)
        case _:  # Busy
            return _end(state, CallEndReason.BUSY, now, config)


def _on_invite(
    state: CallState,
    event: Received,
    invite: Invite,
    *,
    now: float,
    config: CallConfig,
    policy: CallPolicy,
) -> Step:
    sender = event.sender
    if not invite.call_id:
        return _ignore(state, event, IgnoreReason.UNKNOWN_CALL)
    if sender == config.device_id:
        return _ignore(state, event, IgnoreReason.WRONG_PEER)
    if (invite.call_id, sender) in state.finished:
        return _ignore(state, event, IgnoreReason.FINISHED_CALL)
    live = state.live
    if live is None:
        return _incoming(state, event, invite, now=now, config=config, policy=policy)
    if live.call_id == invite.call_id and live.peer == sender and live.role is Role.CALLEE:
        return _ignore(state, event, IgnoreReason.DUPLICATE)
    if live.peer == sender and live.role is Role.CALLER:
        ours = (live.call_id, config.device_id)
        if ours < (invite.call_id, sender):
            # Glare, our call survives; so does any crossing invite that arrives after the
            # peer already accepted ours (messages may overtake each other).
            return _ignore(state, event, IgnoreReason.GLARE_WON)
        if state.phase is Phase.OUTGOING:
            actions, finished = _finish(
                state, CallEndReason.GLARE, now, config, send=Cancel(live.call_id)
            )
            state = replace(state, finished=finished)
            return _incoming(
                state,
                event,
                invite,
                now=now,
                config=config,
                policy=policy,
                actions=actions,
                glare=True,
            )
    refused = InviteRefused(invite.call_id, sender, invite.mode, CallEndReason.BUSY)
    return state, (Send(sender, Busy(invite.call_id)), refused)


def _incoming(
    state: CallState,
    event: Received,
    invite: Invite,
    *,
    now: float,
    config: CallConfig,
    policy: CallPolicy,
    actions: list[Action] | None = None,
    glare: bool = False,
) -> Step:
    """A new call from ``event.sender``; with ``glare``, our own call to it has just lost."""
    actions = [] if actions is None else actions
    sender = event.sender
    decision = decide(policy, sender, invite.mode)
    if decision.verdict is Verdict.REFUSE:
        detail = str(decision.refusal)
        reason = CallEndReason.POLICY_REFUSED
        actions.append(Send(sender, Decline(invite.call_id, reason, detail)))
        actions.append(InviteRefused(invite.call_id, sender, invite.mode, reason, detail))
        state = replace(state, finished=_remember(state, (invite.call_id, sender), config))
        if glare:  # our own call has ended for this invite
            return _enter(
                state, Phase.ENDED, state.call, config, actions, reason=CallEndReason.GLARE
            )
        return state, tuple(actions)
    call = Call(invite.call_id, sender, invite.mode, Role.CALLEE, now)
    if glare or decision.verdict is Verdict.AUTO_ANSWER:
        return _answer(state, call, now, config, actions, auto=not glare)
    actions.append(Send(sender, Ringing(call.call_id)))
    return _enter(state, Phase.RINGING, call, config, actions)


def _on_media(state: CallState, event: MediaEvent, now: float, config: CallConfig) -> Step:
    live = state.live
    if live is None or live.call_id != event.call_id or state.phase not in MEDIA_PHASES:
        if live is not None and live.call_id == event.call_id:
            return _ignore(state, event, IgnoreReason.OUT_OF_ORDER)
        if state.is_finished(event.call_id):
            return _ignore(state, event, IgnoreReason.FINISHED_CALL)
        return _ignore(state, event, IgnoreReason.UNKNOWN_CALL)
    match event:
        case MediaConnected():
            if state.phase is Phase.ACTIVE:
                return _ignore(state, event, IgnoreReason.DUPLICATE)
            return _enter(state, Phase.ACTIVE, replace(live, connected_at=now), config, [])
        case IceFailed():
            return _hangup_and_end(state, CallEndReason.ICE_FAILED, now, config)
        case MediaLost():
            return _hangup_and_end(state, CallEndReason.MEDIA_LOST, now, config)
        case PeerBye(reason=said):
            shared = said in _SHARED_FAILURES  # a StrEnum member equals its value
            reason = CallEndReason(said) if shared else CallEndReason.REMOTE_HANGUP
            return _hangup_and_end(state, reason, now, config)
        case MediaFailed(detail=detail):
            return _hangup_and_end(state, CallEndReason.ERROR, now, config, detail)


def _on_timer(state: CallState, event: TimerExpired, now: float, config: CallConfig) -> Step:
    if state.call is None or state.timer is not event.timer or state.call.call_id != event.call_id:
        return _ignore(state, event, IgnoreReason.STALE_TIMER)
    state = replace(state, timer=None)  # it has fired: nothing to cancel
    match event.timer:
        case Timer.ENDED:
            return _enter(state, Phase.IDLE, None, config, [])
        case Timer.INVITE:
            return _hangup_and_end(state, CallEndReason.UNREACHABLE, now, config)
        case Timer.ANSWER | Timer.RING:
            return _hangup_and_end(state, CallEndReason.NO_ANSWER, now, config)
        case Timer.CONNECT:
            return _hangup_and_end(state, CallEndReason.CONNECT_TIMEOUT, now, config)
        case _:  # Timer.ACTIVE
            return _hangup_and_end(state, CallEndReason.TIME_LIMIT, now, config)


# --- a stateful wrapper --------------------------------------------------------------------


class CallMachine:
    """Holds the state between events, logs and counts what was ignored or refused.

    ``policy`` may be replaced at any time (do-not-disturb switched on, say); it applies to
    the next invite.
    """

    def __init__(self, config: CallConfig, policy: CallPolicy = DEFAULT_POLICY) -> None:
        self.config = config
        self.policy = policy
        self.state = CallState()
        self.ignored: Counter[IgnoreReason] = Counter()
        self.refused_invites: Counter[CallEndReason] = Counter()

    @property
    def phase(self) -> Phase:
        return self.state.phase

    def handle(self, event: Event, now: float) -> tuple[Action, ...]:
        self.state, actions = step(self.state, event, now, config=self.config, policy=self.policy)
        for action in actions:
            match action:
                case Ignored(reason=reason):
                    self.ignored[reason] += 1
                    logger.info(
                        "device %s ignored %s: %s", self.config.device_id, action.event, reason
                    )
                case InviteRefused(call_id=call_id, caller=caller, reason=reason):
                    self.refused_invites[reason] += 1
                    logger.info(
                        "device %s call %s: invite from %s refused: %s %s",
                        self.config.device_id,
                        call_id,
                        caller,
                        reason,
                        action.detail,
                    )
                case CallEnded(summary=summary):
                    logger.info(
                        "device %s call %s with %s ended: %s",
                        self.config.device_id,
                        summary.call_id,
                        summary.peer,
                        summary.reason,
                    )
                case _:
                    pass
        return actions
