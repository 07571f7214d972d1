"""The pure call state machine: every transition, every timeout, glare, stray messages, fuzzing."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.calls.machine import (
    LIVE_PHASES,
    MEDIA_PHASES,
    Accept,
    Action,
    AnswerCommand,
    Busy,
    CallCommand,
    CallConfig,
    CallEnded,
    CallEndReason,
    CallMachine,
    CallState,
    Cancel,
    CancelCommand,
    CancelTimer,
    CommandRefused,
    Decline,
    DeclineCommand,
    Event,
    Hangup,
    HangupCommand,
    IceFailed,
    Ignored,
    IgnoreReason,
    Indicator,
    Invite,
    InviteRefused,
    MediaConnected,
    MediaFailed,
    MediaLost,
    Message,
    Notify,
    PeerBye,
    Phase,
    Received,
    Ringing,
    Role,
    Send,
    StartMedia,
    StartTimer,
    StopMedia,
    Timer,
    TimerExpired,
    media_direction,
    media_end_event,
    step,
)
from agent.calls.policy import DEFAULT_POLICY, CallPolicy
from agent.media.sdp import Direction
from agent.media.session import EndReason
from agent.signaling.envelope import CallMode

ME, PEER, OTHER = "me", "peer", "other"
CONFIG = CallConfig(
    ME,
    invite_timeout_s=0.1,
    answer_timeout_s=0.2,
    ring_timeout_s=0.3,
    connect_timeout_s=0.4,
    max_active_s=0.5,
    ended_hold_s=0.6,
)
R = CallEndReason


def run(
    events: Iterable[Event],
    *,
    config: CallConfig = CONFIG,
    policy: CallPolicy = DEFAULT_POLICY,
    state: CallState | None = None,
    start: float = 0.0,
) -> tuple[CallState, list[Action]]:
    """Feed ``events`` one per second of fake time; return the last state and all actions."""
    state = CallState() if state is None else state
    actions: list[Action] = []
    for i, event in enumerate(events):
        state, out = step(state, event, start + i, config=config, policy=policy)
        actions.extend(out)
    return state, actions


def sent(actions: Iterable[Action]) -> list[tuple[str, Message]]:
    return [(a.to, a.message) for a in actions if isinstance(a, Send)]


def ended(actions: Iterable[Action]) -> list[CallEnded]:
    return [a for a in actions if isinstance(a, CallEnded)]


T = TypeVar("T")


def of_type(actions: Iterable[Action], kind: type[T]) -> list[T]:
    return [a for a in actions if isinstance(a, kind)]


def rx(message: Message, sender: str = PEER) -> Received:
    return Received(sender, message)


# Event sequences that bring a fresh machine to each state, call "c1" with PEER.
OUTGOING: list[Event] = [CallCommand("c1", PEER)]
REMOTE_RINGING: list[Event] = [*OUTGOING, rx(Ringing("c1"))]
CONNECTING_CALLER: list[Event] = [*REMOTE_RINGING, rx(Accept("c1"))]
ACTIVE_CALLER: list[Event] = [*CONNECTING_CALLER, MediaConnected("c1")]
RINGING: list[Event] = [rx(Invite("c1"))]
CONNECTING_CALLEE: list[Event] = [*RINGING, AnswerCommand()]
ACTIVE_CALLEE: list[Event] = [*CONNECTING_CALLEE, MediaConnected("c1")]
ENDED: list[Event] = [*OUTGOING, rx(Busy("c1"))]
IDLE: list[Event] = []

START = "start"
STOP = "stop"


@dataclass(frozen=True)
class Row:
    """From ``setup``, ``event`` leads to ``phase``; optionally ends the call with ``reason``,
    sends ``sends``, starts or stops media."""

    name: str
    setup: Sequence[Event]
    event: Event
    phase: Phase
    reason: CallEndReason | None = None
    sends: tuple[tuple[str, Message], ...] = ()
    media: str | None = None
    timer: Timer | None = None


TRANSITIONS = [
    # idle
    Row("idle call", IDLE, CallCommand("c1", PEER), Phase.OUTGOING,
        sends=((PEER, Invite("c1")),), timer=Timer.INVITE),
    Row("idle announce", IDLE, CallCommand("c1", PEER, CallMode.ANNOUNCE), Phase.OUTGOING,
        sends=((PEER, Invite("c1", CallMode.ANNOUNCE)),), timer=Timer.INVITE),
    Row("idle invite rings", IDLE, rx(Invite("c1")), Phase.RINGING,
        sends=((PEER, Ringing("c1")),), timer=Timer.RING),
    Row("idle announce auto-answers", IDLE, rx(Invite("c1", CallMode.ANNOUNCE)), Phase.CONNECTING,
        sends=((PEER, Accept("c1")),), media=START, timer=Timer.CONNECT),
    # outgoing
    Row("outgoing ringing", OUTGOING, rx(Ringing("c1")), Phase.OUTGOING, timer=Timer.ANSWER),
    Row("outgoing accept", OUTGOING, rx(Accept("c1")), Phase.CONNECTING,
        media=START, timer=Timer.CONNECT),
    Row("ringing accept", REMOTE_RINGING, rx(Accept("c1")), Phase.CONNECTING,
        media=START, timer=Timer.CONNECT),
    Row("outgoing decline", OUTGOING, rx(Decline("c1")), Phase.ENDED, R.DECLINED,
        timer=Timer.ENDED),
    Row("outgoing refused", REMOTE_RINGING, rx(Decline("c1", R.POLICY_REFUSED, "privacy")),
        Phase.ENDED, R.POLICY_REFUSED),
    Row("outgoing decline no answer", REMOTE_RINGING, rx(Decline("c1", R.NO_ANSWER)),
        Phase.ENDED, R.NO_ANSWER),
    Row("outgoing relay unknown callee", OUTGOING, rx(Decline("c1", R.UNREACHABLE)),
        Phase.ENDED, R.UNREACHABLE),
    Row("odd decline reason is a decline", OUTGOING, rx(Decline("c1", R.GLARE)),
        Phase.ENDED, R.DECLINED),
    Row("outgoing busy", OUTGOING, rx(Busy("c1")), Phase.ENDED, R.BUSY),
    Row("outgoing hangup", REMOTE_RINGING, rx(Hangup("c1")), Phase.ENDED, R.REMOTE_HANGUP),
    Row("outgoing hangup ice", OUTGOING, rx(Hangup("c1", R.ICE_FAILED)), Phase.ENDED,
        R.ICE_FAILED),
    Row("outgoing cancel", OUTGOING, CancelCommand(), Phase.ENDED, R.CANCELLED,
        sends=((PEER, Cancel("c1")),)),
    Row("outgoing hangup cancels", REMOTE_RINGING, HangupCommand("c1"), Phase.ENDED,
        R.CANCELLED, sends=((PEER, Cancel("c1")),)),
    # ringing (callee)
    Row("ringing answer", RINGING, AnswerCommand("c1"), Phase.CONNECTING,
        sends=((PEER, Accept("c1")),), media=START, timer=Timer.CONNECT),
    Row("ringing call back answers", RINGING, CallCommand("c9", PEER), Phase.CONNECTING,
        sends=((PEER, Accept("c1")),), media=START),
    Row("ringing decline", RINGING, DeclineCommand(), Phase.ENDED, R.DECLINED,
        sends=((PEER, Decline("c1")),)),
    Row("ringing hangup declines", RINGING, HangupCommand(), Phase.ENDED, R.DECLINED,
        sends=((PEER, Decline("c1")),)),
    Row("ringing remote cancel", RINGING, rx(Cancel("c1")), Phase.ENDED, R.CANCELLED),
    Row("ringing remote hangup", RINGING, rx(Hangup("c1")), Phase.ENDED, R.CANCELLED),
    # connecting
    Row("connecting connected", CONNECTING_CALLER, MediaConnected("c1"), Phase.ACTIVE,
        timer=Timer.ACTIVE),
    Row("connecting callee connected", CONNECTING_CALLEE, MediaConnected("c1"), Phase.ACTIVE),
    Row("connecting ice failed", CONNECTING_CALLER, IceFailed("c1"), Phase.ENDED,
        R.ICE_FAILED, sends=((PEER, Hangup("c1", R.ICE_FAILED)),), media=STOP),
    Row("connecting media failed", CONNECTING_CALLEE, MediaFailed("c1", "dtls"), Phase.ENDED,
        R.ERROR, sends=((PEER, Hangup("c1", R.ERROR)),), media=STOP),
    Row("connecting local hangup", CONNECTING_CALLER, HangupCommand(), Phase.ENDED,
        R.LOCAL_HANGUP, sends=((PEER, Hangup("c1")),), media=STOP),
    Row("connecting remote hangup", CONNECTING_CALLER, rx(Hangup("c1")), Phase.ENDED,
        R.REMOTE_HANGUP, media=STOP),
    Row("cancel crossed our accept", CONNECTING_CALLEE, rx(Cancel("c1")), Phase.ENDED,
        R.CANCELLED, media=STOP),
    # active
    Row("active local hangup", ACTIVE_CALLER, HangupCommand(), Phase.ENDED, R.LOCAL_HANGUP,
        sends=((PEER, Hangup("c1")),), media=STOP),
    Row("active remote hangup", ACTIVE_CALLEE, rx(Hangup("c1")), Phase.ENDED,
        R.REMOTE_HANGUP, media=STOP),
    Row("active remote saw media loss", ACTIVE_CALLEE, rx(Hangup("c1", R.MEDIA_LOST)),
        Phase.ENDED, R.MEDIA_LOST, media=STOP),
    Row("active remote cancel", ACTIVE_CALLEE, rx(Cancel("c1")), Phase.ENDED,
        R.REMOTE_HANGUP, media=STOP),
    Row("active ice failed", ACTIVE_CALLER, IceFailed("c1"), Phase.ENDED, R.ICE_FAILED,
        sends=((PEER, Hangup("c1", R.ICE_FAILED)),), media=STOP),
    Row("active network loss", ACTIVE_CALLEE, MediaLost("c1"), Phase.ENDED, R.MEDIA_LOST,
        sends=((PEER, Hangup("c1", R.MEDIA_LOST)),), media=STOP),
    Row("active peer bye", ACTIVE_CALLER, PeerBye("c1"), Phase.ENDED, R.REMOTE_HANGUP,
        sends=((PEER, Hangup("c1", R.REMOTE_HANGUP)),), media=STOP),
    # ended
    Row("ended hold over", ENDED, TimerExpired(Timer.ENDED, "c1"), Phase.IDLE),
    Row("ended new call", ENDED, CallCommand("c2", OTHER), Phase.OUTGOING,
        sends=((OTHER, Invite("c2")),), timer=Timer.INVITE),
    Row("ended new invite", ENDED, rx(Invite("c2"), OTHER), Phase.RINGING,
        sends=((OTHER, Ringing("c2")),)),
]  # fmt: skip


@pytest.mark.parametrize("row", TRANSITIONS, ids=[r.name for r in TRANSITIONS])
def test_transition(row: Row) -> None:
    before, _ = run(row.setup)
    after, actions = run([row.event], state=before, start=100.0)
    assert after.phase is row.phase
    assert after.reason is row.reason
    assert sent(actions) == list(row.sends)
    done = ended(actions)
    assert [e.summary.reason for e in done] == ([row.reason] if row.reason else [])
    starts, stops = of_type(actions, StartMedia), of_type(actions, StopMedia)
    assert (len(starts), len(stops)) == {None: (0, 0), START: (1, 0), STOP: (0, 1)}[row.media]
    if row.timer is not None:
        assert after.timer is row.timer
        assert [t.timer for t in of_type(actions, StartTimer)] == [row.timer]
    # A change of phase or call always reaches the LED/UI, last.
    if (before.phase, before.call) != (after.phase, after.call):
        assert isinstance(actions[-1], Notify)
    assert not of_type(actions, Ignored)
    assert not of_type(actions, CommandRefused)


STRAYS = [
    ("idle accept", IDLE, rx(Accept("c1")), IgnoreReason.UNKNOWN_CALL),
    ("idle timer", IDLE, TimerExpired(Timer.RING, "c1"), IgnoreReason.STALE_TIMER),
    ("idle media", IDLE, MediaConnected("c1"), IgnoreReason.UNKNOWN_CALL),
    ("empty invite id", IDLE, rx(Invite("")), IgnoreReason.UNKNOWN_CALL),
    ("invite from self", IDLE, rx(Invite("c1"), ME), IgnoreReason.WRONG_PEER),
    ("outgoing wrong peer", OUTGOING, rx(Accept("c1"), OTHER), IgnoreReason.WRONG_PEER),
    ("outgoing cancel from callee", OUTGOING, rx(Cancel("c1")), IgnoreReason.WRONG_ROLE),
    ("outgoing other call id", OUTGOING, rx(Accept("c7")), IgnoreReason.UNKNOWN_CALL),
    ("outgoing media early", OUTGOING, MediaConnected("c1"), IgnoreReason.OUT_OF_ORDER),
    ("outgoing ring twice", REMOTE_RINGING, rx(Ringing("c1")), IgnoreReason.DUPLICATE),
    ("invite timer after ringing", REMOTE_RINGING, TimerExpired(Timer.INVITE, "c1"),
     IgnoreReason.STALE_TIMER),
    ("ringing accept from caller", RINGING, rx(Accept("c1")), IgnoreReason.WRONG_ROLE),
    ("ringing invite twice", RINGING, rx(Invite("c1")), IgnoreReason.DUPLICATE),
    ("ringing ice", RINGING, IceFailed("c1"), IgnoreReason.OUT_OF_ORDER),
    ("connecting accept twice", CONNECTING_CALLER, rx(Accept("c1")), IgnoreReason.DUPLICATE),
    ("connecting late ringing", [*OUTGOING, rx(Accept("c1"))], rx(Ringing("c1")),
     IgnoreReason.OUT_OF_ORDER),
    ("connecting decline", CONNECTING_CALLER, rx(Decline("c1")), IgnoreReason.OUT_OF_ORDER),
    ("connecting old timer", CONNECTING_CALLER, TimerExpired(Timer.ANSWER, "c1"),
     IgnoreReason.STALE_TIMER),
    ("connected twice", ACTIVE_CALLER, MediaConnected("c1"), IgnoreReason.DUPLICATE),
    ("active other call media", ACTIVE_CALLER, MediaLost("c2"), IgnoreReason.UNKNOWN_CALL),
    ("active busy", ACTIVE_CALLER, rx(Busy("c1")), IgnoreReason.OUT_OF_ORDER),
    ("accept after cancel", [*OUTGOING, CancelCommand()], rx(Accept("c1")),
     IgnoreReason.FINISHED_CALL),
    ("hangup after hangup", [*ACTIVE_CALLER, HangupCommand()], rx(Hangup("c1")),
     IgnoreReason.FINISHED_CALL),
    ("invite of ended call", [*RINGING, DeclineCommand()], rx(Invite("c1")),
     IgnoreReason.FINISHED_CALL),
    ("media of ended call", [*ACTIVE_CALLER, HangupCommand()], MediaLost("c1"),
     IgnoreReason.FINISHED_CALL),
    ("old call after new", [*ENDED, CallCommand("c2", PEER)], rx(Accept("c1")),
     IgnoreReason.FINISHED_CALL),
    ("ended timer of another call", ENDED, TimerExpired(Timer.ENDED, "c0"),
     IgnoreReason.STALE_TIMER),
]  # fmt: skip


@pytest.mark.parametrize(
    ("setup", "event", "reason"), [s[1:] for s in STRAYS], ids=[s[0] for s in STRAYS]
)
def test_stray_events_are_ignored(
    setup: Sequence[Event], event: Event, reason: IgnoreReason
) -> None:
    before, _ = run(setup)
    after, actions = run([event], state=before)
    assert actions == [Ignored(event, reason)]
    # Only the memory of cancelled-but-unseen calls may change.
    assert replace(after, finished=before.finished) == before


REFUSALS = [
    ("answer idle", IDLE, AnswerCommand()),
    ("hangup idle", IDLE, HangupCommand()),
    ("hangup ended", ENDED, HangupCommand()),
    ("call self", IDLE, CallCommand("c1", ME)),
    ("call without id", IDLE, CallCommand("", PEER)),
    ("call while calling", OUTGOING, CallCommand("c2", OTHER)),
    ("call same peer while calling", OUTGOING, CallCommand("c2", PEER)),
    ("call while ringing other", RINGING, CallCommand("c2", OTHER)),
    ("call in a call", ACTIVE_CALLER, CallCommand("c2", OTHER)),
    ("answer outgoing", OUTGOING, AnswerCommand()),
    ("decline outgoing", OUTGOING, DeclineCommand()),
    ("cancel ringing", RINGING, CancelCommand()),
    ("answer active", ACTIVE_CALLEE, AnswerCommand()),
    ("decline active", ACTIVE_CALLEE, DeclineCommand()),
    ("cancel active", ACTIVE_CALLER, CancelCommand()),
    ("answer another call", RINGING, AnswerCommand("c2")),
    ("reuse own call id", [*ENDED], CallCommand("c1", OTHER)),
]


@pytest.mark.parametrize(
    ("setup", "command"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_refused_commands_change_nothing(setup: Sequence[Event], command: Event) -> None:
    before, _ = run(setup)
    after, actions = run([command], state=before)
    assert after == before
    assert len(actions) == 1
    refused = actions[0]
    assert isinstance(refused, CommandRefused)
    assert refused.command == command
    assert refused.reason


@pytest.mark.parametrize(
    ("setup", "busy_in", "caller", "call_id"),
    [(OUTGOING, Phase.OUTGOING, OTHER, "x1"), (RINGING, Phase.RINGING, OTHER, "x1"),
     (CONNECTING_CALLEE, Phase.CONNECTING, OTHER, "x1"), (ACTIVE_CALLER, Phase.ACTIVE, OTHER, "x1"),
     # The peer itself, after it accepted our call: a newer call of its own, not glare.
     (CONNECTING_CALLER, Phase.CONNECTING, PEER, "a0")],
)  # fmt: skip
def test_invite_while_busy_gets_busy(
    setup: Sequence[Event], busy_in: Phase, caller: str, call_id: str
) -> None:
    before, _ = run(setup)
    invite = rx(Invite(call_id, CallMode.FORCE), caller)
    after, actions = run([invite], state=before)
    assert after == before and after.phase is busy_in
    assert actions == [
        Send(caller, Busy(call_id)),
        InviteRefused(call_id, caller, CallMode.FORCE, R.BUSY),
    ]


# --- timeouts ------------------------------------------------------------------------------

TIMEOUTS = [
    # setup, timer, configured duration, end reason, message sent to the peer, media stopped
    (OUTGOING, Timer.INVITE, CONFIG.invite_timeout_s, R.UNREACHABLE, Cancel("c1"), False),
    (REMOTE_RINGING, Timer.ANSWER, CONFIG.answer_timeout_s, R.NO_ANSWER, Cancel("c1"), False),
    (RINGING, Timer.RING, CONFIG.ring_timeout_s, R.NO_ANSWER, Decline("c1", R.NO_ANSWER), False),
    (CONNECTING_CALLER, Timer.CONNECT, CONFIG.connect_timeout_s, R.CONNECT_TIMEOUT,
     Hangup("c1", R.CONNECT_TIMEOUT), True),
    (CONNECTING_CALLEE, Timer.CONNECT, CONFIG.connect_timeout_s, R.CONNECT_TIMEOUT,
     Hangup("c1", R.CONNECT_TIMEOUT), True),
    (ACTIVE_CALLEE, Timer.ACTIVE, CONFIG.max_active_s, R.TIME_LIMIT,
     Hangup("c1", R.TIME_LIMIT), True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("setup", "timer", "duration", "reason", "message", "stops"),
    TIMEOUTS,
    ids=[f"{t[1]}-{i}" for i, t in enumerate(TIMEOUTS)],
)
def test_timeout(
    *,
    setup: Sequence[Event],
    timer: Timer,
    duration: float,
    reason: CallEndReason,
    message: Message,
    stops: bool,
) -> None:
    before, actions = run(setup)
    assert before.timer is timer
    assert of_type(actions, StartTimer)[-1] == StartTimer(timer, "c1", duration)
    after, actions = run([TimerExpired(timer, "c1")], state=before, start=50.0)
    assert after.phase is Phase.ENDED and after.reason is reason
    assert sent(actions) == [(PEER, message)]
    assert bool(of_type(actions, StopMedia)) == stops
    # The timer that fired is not cancelled again; the hold timer starts.
    assert not of_type(actions, CancelTimer)
    assert of_type(actions, StartTimer) == [StartTimer(Timer.ENDED, "c1", CONFIG.ended_hold_s)]
    (summary,) = [e.summary for e in ended(actions)]
    assert summary.reason is reason and summary.ended_at == 50.0
    # The hold timer brings it back to idle.
    idle, actions = run([TimerExpired(Timer.ENDED, "c1")], state=after)
    assert idle == CallState(finished=after.finished)
    assert actions == [Notify(Indicator.IDLE)]


def test_no_active_timer_without_a_limit() -> None:
    state, actions = run(ACTIVE_CALLER, config=replace(CONFIG, max_active_s=None))
    assert state.phase is Phase.ACTIVE and state.timer is None
    assert of_type(actions, CancelTimer)[-1] == CancelTimer(Timer.CONNECT, "c1")
    assert not [t for t in of_type(actions, StartTimer) if t.timer is Timer.ACTIVE]


@pytest.mark.parametrize(
    "kwargs",
    [{"device_id": ""}, {"ring_timeout_s": 0}, {"connect_timeout_s": -1.0},
     {"max_active_s": 0.0}, {"remembered_calls": 0}, {"invite_timeout_s": float("nan")}],
)  # fmt: skip
def test_config_is_checked(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"device_id": ME}
    with pytest.raises(ValueError):
        CallConfig(**(base | kwargs))  # type: ignore[arg-type]


# --- modes, policy, stats ------------------------------------------------------------------

MODES = [
    (CallMode.NORMAL, Direction.SENDRECV, Direction.SENDRECV, Indicator.IN_CALL, Indicator.IN_CALL),
    (CallMode.FORCE, Direction.SENDRECV, Direction.SENDRECV, Indicator.IN_CALL, Indicator.IN_CALL),
    (CallMode.ANNOUNCE, Direction.SENDONLY, Direction.RECVONLY, Indicator.ANNOUNCING,
     Indicator.HEARING_ANNOUNCEMENT),
    (CallMode.LISTEN, Direction.RECVONLY, Direction.SENDONLY, Indicator.LISTENING,
     Indicator.BEING_LISTENED),
]  # fmt: skip
OPEN = CallPolicy(listen_allowed=frozenset({PEER}), force_allowed=frozenset({PEER}))


@pytest.mark.parametrize(("mode", "caller_dir", "callee_dir", "caller_led", "callee_led"), MODES)
def test_modes_map_to_directions_and_indicators(
    mode: CallMode,
    caller_dir: Direction,
    callee_dir: Direction,
    caller_led: Indicator,
    callee_led: Indicator,
) -> None:
    assert media_direction(mode, Role.CALLER) is caller_dir
    assert media_direction(mode, Role.CALLEE) is callee_dir
    assert caller_dir.reversed() is callee_dir
    _, actions = run([CallCommand("c1", PEER, mode), rx(Accept("c1")), MediaConnected("c1")])
    assert of_type(actions, StartMedia) == [StartMedia("c1", PEER, Role.CALLER, mode, caller_dir)]
    assert of_type(actions, Notify)[-1] == Notify(caller_led, "c1", PEER, mode)
    callee, actions = run(
        [rx(Invite("c1", mode)), AnswerCommand(), MediaConnected("c1")], policy=OPEN
    )
    assert callee.phase is Phase.ACTIVE
    assert of_type(actions, StartMedia) == [StartMedia("c1", PEER, Role.CALLEE, mode, callee_dir)]
    assert of_type(actions, Notify)[-1] == Notify(callee_led, "c1", PEER, mode)


def test_listened_board_shows_it_from_media_start_to_stop() -> None:
    state, actions = run([rx(Invite("c1", CallMode.LISTEN))], policy=OPEN)
    assert state.phase is Phase.CONNECTING  # listen is answered at once
    start = next(i for i, a in enumerate(actions) if isinstance(a, StartMedia))
    assert of_type(actions[start:], Notify) == [
        Notify(Indicator.BEING_LISTENED, "c1", PEER, CallMode.LISTEN)
    ]
    state, actions = run([MediaConnected("c1"), rx(Hangup("c1"))], state=state, policy=OPEN)
    assert [n.indicator for n in of_type(actions, Notify)] == [
        Indicator.BEING_LISTENED,
        Indicator.ENDED,
    ]


@pytest.mark.parametrize(
    ("policy", "mode", "detail"),
    [
        (CallPolicy(privacy=True, listen_allowed=frozenset({PEER})), CallMode.LISTEN, "privacy"),
        (DEFAULT_POLICY, CallMode.LISTEN, "listen-not-allowed"),
        (DEFAULT_POLICY, CallMode.FORCE, "force-not-allowed"),
        (CallPolicy(do_not_disturb=True), CallMode.NORMAL, "do-not-disturb"),
    ],
)
def test_policy_refusal_declines_and_stays_idle(
    policy: CallPolicy, mode: CallMode, detail: str
) -> None:
    state, actions = run([rx(Invite("c1", mode))], policy=policy)
    assert state.phase is Phase.IDLE
    assert actions == [
        Send(PEER, Decline("c1", R.POLICY_REFUSED, detail)),
        InviteRefused("c1", PEER, mode, R.POLICY_REFUSED, detail),
    ]
    # The caller ends with the same reason and sees why.
    ((_, decline),) = sent(actions)
    _, caller_actions = run([CallCommand("c1", ME, mode), rx(decline, ME)], config=CallConfig(PEER))
    (summary,) = [e.summary for e in ended(caller_actions)]
    assert (summary.reason, summary.detail) == (R.POLICY_REFUSED, detail)
    # A repeat of the refused invite is recognised, not evaluated again.
    _, actions = run([rx(Invite("c1", mode))], state=state, policy=policy)
    assert actions == [Ignored(rx(Invite("c1", mode)), IgnoreReason.FINISHED_CALL)]


def test_force_call_auto_answers_through_do_not_disturb() -> None:
    policy = CallPolicy(do_not_disturb=True, force_allowed=frozenset({PEER}))
    _, actions = run(
        [rx(Invite("c1", CallMode.FORCE)), MediaConnected("c1"), rx(Hangup("c1"))], policy=policy
    )
    assert sent(actions)[0] == (PEER, Accept("c1"))
    (summary,) = [e.summary for e in ended(actions)]
    assert summary.auto_answered and summary.reason is R.REMOTE_HANGUP


def test_auto_answer_per_caller() -> None:
    policy = CallPolicy(auto_answer=frozenset({"kitchen"}))
    state, _ = run([rx(Invite("c1"), "kitchen")], policy=policy)
    assert state.phase is Phase.CONNECTING
    state, _ = run([rx(Invite("c1"), "door")], policy=policy)
    assert state.phase is Phase.RINGING


def test_summary_has_timing() -> None:
    # Fake time: one second per event.
    _, actions = run([*REMOTE_RINGING, rx(Accept("c1")), MediaConnected("c1"), HangupCommand()])
    (summary,) = [e.summary for e in ended(actions)]
    assert (summary.created_at, summary.remote_ringing_at, summary.answered_at) == (0, 1, 2)
    assert (summary.connected_at, summary.ended_at) == (3, 4)
    assert (summary.setup_s, summary.talk_s) == (1, 1)
    assert summary.role is Role.CALLER and not summary.auto_answered
    _, actions = run([*OUTGOING, CancelCommand()])
    (summary,) = [e.summary for e in ended(actions)]
    assert (summary.setup_s, summary.talk_s) == (None, 0.0)


@pytest.mark.parametrize(
    ("reason", "event"),
    [
        (EndReason.LOCAL_HANGUP, None),
        (EndReason.REMOTE_BYE, PeerBye("c1")),
        (EndReason.MEDIA_TIMEOUT, MediaLost("c1")),
        (EndReason.TRANSPORT_CLOSED, MediaLost("c1")),
        (EndReason.SOURCE_ENDED, HangupCommand("c1")),
    ],
)
def test_media_end_event(reason: EndReason, event: Event | None) -> None:
    assert media_end_event(reason, "c1") == event


# --- duplicates and out-of-order -----------------------------------------------------------


def test_cancel_that_overtook_its_invite() -> None:
    state, actions = run([rx(Cancel("c1")), rx(Invite("c1"))])
    assert state.phase is Phase.IDLE
    assert [a.reason for a in of_type(actions, Ignored)] == [
        IgnoreReason.UNKNOWN_CALL,
        IgnoreReason.FINISHED_CALL,
    ]
    # Only that caller's call: another device may use the same id.
    state, _ = run([rx(Invite("c1"), OTHER)], state=state)
    assert state.phase is Phase.RINGING


def test_finished_calls_memory_is_bounded() -> None:
    config = replace(CONFIG, remembered_calls=2)
    state, _ = run(
        [rx(Invite(c)) if i % 2 == 0 else DeclineCommand() for i, c in enumerate("aabbcc")],
        config=config,
    )
    assert [cid for cid, _ in state.finished] == ["b", "c"]
    state, _ = run([rx(Invite("a"))], state=state, config=config)
    assert state.phase is Phase.RINGING  # forgotten, so taken as a new call


def test_machine_counts_what_it_ignores() -> None:
    machine = CallMachine(CONFIG)
    events = [*ACTIVE_CALLER, rx(Accept("c1")), rx(Accept("zz")), rx(Invite("c5"), OTHER)]
    for i, event in enumerate([*events, rx(Hangup("c1")), rx(Hangup("c1"))]):
        machine.handle(event, float(i))
    assert machine.phase is Phase.ENDED
    machine.policy = CallPolicy(do_not_disturb=True)  # applies to the next invite
    machine.handle(rx(Invite("c6"), OTHER), 10.0)
    assert machine.phase is Phase.ENDED  # a refusal leaves the state alone
    assert machine.ignored == {
        IgnoreReason.DUPLICATE: 1,
        IgnoreReason.UNKNOWN_CALL: 1,
        IgnoreReason.FINISHED_CALL: 1,
    }
    assert machine.refused_invites == {R.BUSY: 1, R.POLICY_REFUSED: 1}


# --- glare: two machines against each other ------------------------------------------------


@dataclass(frozen=True)
class World:
    """Two devices, the messages in flight (delivered in any order) and the media model."""

    states: tuple[CallState, CallState]
    to_dial: frozenset[int]
    inflight: tuple[tuple[int, Message], ...] = ()
    """(destination, message); a multiset kept sorted."""
    media: frozenset[tuple[int, str]] = frozenset()
    connects: tuple[tuple[int, str], ...] = ()
    """MediaConnected events due: ICE completes once both ends run media for a call."""
    ended: tuple[tuple[int, str, CallEndReason], ...] = ()
    invited: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Duel:
    ids: tuple[str, str]
    call_ids: tuple[str, str]
    modes: tuple[CallMode, CallMode]
    policies: tuple[CallPolicy, CallPolicy]

    def config(self, i: int) -> CallConfig:
        return CallConfig(self.ids[i])

    def start(self) -> World:
        return World((CallState(), CallState()), frozenset({0, 1}))

    def moves(self, world: World) -> list[tuple[str, int]]:
        return (
            [("dial", i) for i in sorted(world.to_dial)]
            + [("msg", k) for k in range(len(world.inflight))]
            + [("connect", k) for k in range(len(world.connects))]
        )

    def play(self, world: World, move: tuple[str, int]) -> World:
        kind, k = move
        inflight, connects = list(world.inflight), list(world.connects)
        to_dial = world.to_dial
        event: Event
        if kind == "dial":
            i, to_dial = k, world.to_dial - {k}
            event = CallCommand(self.call_ids[i], self.ids[1 - i], self.modes[i])
        elif kind == "msg":
            i, message = inflight.pop(k)
            event = Received(self.ids[1 - i], message)
        else:
            i, call_id = connects.pop(k)
            event = MediaConnected(call_id)
        state, actions = step(
            world.states[i], event, 0.0, config=self.config(i), policy=self.policies[i]
        )
        check_actions(world.states[i], event, state, actions, self.ids[i])
        media, ended_calls, invited = set(world.media), list(world.ended), set(world.invited)
        for action in actions:
            match action:
                case Send(to=to, message=message):
                    assert to == self.ids[1 - i]
                    inflight.append((1 - i, message))
                    if isinstance(message, Invite):
                        invited.add(i)
                case StartMedia(call_id=call_id):
                    media.add((i, call_id))
                    if (1 - i, call_id) in media:
                        connects += [(0, call_id), (1, call_id)]
                case StopMedia(call_id=call_id):
                    media.discard((i, call_id))
                case CallEnded(summary=summary):
                    ended_calls.append((i, summary.call_id, summary.reason))
                case _:
                    pass
        states = (state, world.states[1]) if i == 0 else (world.states[0], state)
        return World(
            states,
            to_dial,
            tuple(sorted(inflight, key=repr)),
            frozenset(media),
            tuple(sorted(connects)),
            tuple(ended_calls),
            frozenset(invited),
        )

    def check_final(self, world: World) -> None:
        a, b = world.states
        assert a.phase is Phase.ACTIVE and b.phase is Phase.ACTIVE, world
        assert a.call is not None and b.call is not None
        assert a.call.call_id == b.call.call_id
        assert {a.call.role, b.call.role} == {Role.CALLER, Role.CALLEE}
        assert a.call.peer == self.ids[1] and b.call.peer == self.ids[0]
        survivor = 0 if a.call.role is Role.CALLER else 1
        assert a.call.mode is self.modes[survivor]
        if world.invited == {0, 1}:
            # Both invited: the deterministic rule picked the survivor on both sides.
            keys = [(self.call_ids[i], self.ids[i]) for i in (0, 1)]
            assert keys[survivor] == min(keys)
        # At most the losing call ended, with reason GLARE, at its caller.
        assert all(r is R.GLARE and i == 1 - survivor for i, _, r in world.ended), world.ended
        assert len(world.ended) <= 1
        assert world.media == {(0, a.call.call_id), (1, b.call.call_id)}


def explore(duel: Duel) -> int:
    """Every interleaving of both dials and every delivery order; returns the end states seen."""
    seen: set[World] = set()
    stack = [duel.start()]
    finals = 0
    while stack:
        world = stack.pop()
        if world in seen:
            continue
        seen.add(world)
        moves = duel.moves(world)
        if not moves:
            duel.check_final(world)
            finals += 1
        stack.extend(duel.play(world, move) for move in moves)
    return finals


@pytest.mark.parametrize(
    ("ids", "call_ids"),
    [
        (("a", "b"), ("c1", "c2")),  # A's call is lower
        (("a", "b"), ("c2", "c1")),  # B's call is lower
        (("b", "a"), ("c1", "c2")),
        (("a", "b"), ("same", "same")),  # identical ids: the device id decides
        (("b", "a"), ("same", "same")),
    ],
)
@pytest.mark.parametrize(
    "modes", [(CallMode.NORMAL, CallMode.NORMAL), (CallMode.ANNOUNCE, CallMode.NORMAL)]
)
@pytest.mark.parametrize("auto_answer", [False, True])
def test_glare_every_interleaving_ends_in_one_call(
    ids: tuple[str, str],
    call_ids: tuple[str, str],
    modes: tuple[CallMode, CallMode],
    auto_answer: bool,
) -> None:
    policies = tuple(
        CallPolicy(auto_answer=frozenset({ids[1 - i]}) if auto_answer else frozenset())
        for i in (0, 1)
    )
    duel = Duel(ids, call_ids, modes, (policies[0], policies[1]))
    assert explore(duel) > 1


def test_glare_both_invites_cross() -> None:
    """The textbook case, step by step: both dial, both invites arrive while outgoing."""
    a, b = CallConfig("a"), CallConfig("b")
    sa, _ = step(CallState(), CallCommand("c2", "b"), 0, config=a)
    sb, _ = step(CallState(), CallCommand("c1", "a"), 0, config=b)
    sa, acts_a = step(sa, Received("b", Invite("c1")), 1, config=a)
    sb, acts_b = step(sb, Received("a", Invite("c2")), 1, config=b)
    # ("c1", "b") < ("c2", "a"): B's call survives; A gives its own up and accepts B's.
    assert acts_b == (Ignored(Received("a", Invite("c2")), IgnoreReason.GLARE_WON),)
    assert sent(acts_a) == [("b", Cancel("c2")), ("b", Accept("c1"))]
    assert [e.summary.reason for e in ended(acts_a)] == [R.GLARE]
    assert sa.phase is Phase.CONNECTING and sa.call is not None and sa.call.call_id == "c1"
    sb, _ = step(sb, Received("a", Cancel("c2")), 2, config=b)
    sb, _ = step(sb, Received("a", Accept("c1")), 2, config=b)
    assert sb.phase is Phase.CONNECTING and sb.call is not None and sb.call.call_id == "c1"


def test_glare_loser_still_applies_policy() -> None:
    """A listen request from a peer not allowed to listen is refused even in glare."""
    a = CallConfig("a")
    state, _ = step(CallState(), CallCommand("c2", "b"), 0, config=a)
    state, actions = step(state, Received("b", Invite("c1", CallMode.LISTEN)), 1, config=a)
    assert state.phase is Phase.ENDED and state.reason is R.GLARE
    assert sent(actions) == [
        ("b", Cancel("c2")),
        ("b", Decline("c1", R.POLICY_REFUSED, "listen-not-allowed")),
    ]
    assert not of_type(actions, StartMedia)


@given(
    st.data(),
    st.lists(st.text("abcxyz", min_size=1, max_size=3), min_size=2, max_size=2, unique=True),
    st.lists(st.text("0123", min_size=1, max_size=2), min_size=2, max_size=2),
    st.lists(st.sampled_from([CallMode.NORMAL, CallMode.ANNOUNCE]), min_size=2, max_size=2),
)
def test_glare_random_schedules(
    data: st.DataObject, ids: list[str], call_ids: list[str], modes: list[CallMode]
) -> None:
    duel = Duel(
        (ids[0], ids[1]),
        (call_ids[0], call_ids[1]),
        (modes[0], modes[1]),
        (DEFAULT_POLICY, DEFAULT_POLICY),
    )
    world = duel.start()
    while moves := duel.moves(world):
        world = duel.play(world, data.draw(st.sampled_from(moves)))
    duel.check_final(world)


# --- invariants under random event sequences -----------------------------------------------


def check_actions(
    before: CallState, event: Event, after: CallState, actions: Sequence[Action], me: str
) -> None:
    """What must hold for any single step."""
    # State shape.
    if after.phase is Phase.IDLE:
        assert after.call is None and after.timer is None and after.reason is None
    elif after.phase is Phase.ENDED:
        assert after.call is not None and after.reason is not None
        assert after.timer is Timer.ENDED
    else:
        assert after.call is not None and after.reason is None
        assert after.call.peer != me and after.call.call_id
    # Timers: at most one runs, and it is the one the state names.
    running = (
        {(before.timer, before.call.call_id)} if before.timer and before.call else set[object]()
    )
    if isinstance(event, TimerExpired) and running == {(event.timer, event.call_id)}:
        running = set()  # it has just fired
    media = {before.call.call_id} if before.phase in MEDIA_PHASES and before.call else set()
    notified = False
    for action in actions:
        match action:
            case CancelTimer(timer=timer, call_id=call_id):
                assert running == {(timer, call_id)}
                running = set()
            case StartTimer(timer=timer, call_id=call_id, duration_s=duration):
                assert not running and duration > 0
                running = {(timer, call_id)}
            case StartMedia(call_id=call_id, role=role, mode=mode, direction=direction):
                # Media starts only on the way into CONNECTING, one call at a time.
                assert not media and after.phase is Phase.CONNECTING
                assert after.call is not None and after.call.call_id == call_id
                assert direction is media_direction(mode, role)
                media = {call_id}
            case StopMedia(call_id=call_id):
                assert media == {call_id}
                media = set()
            case CallEnded(summary=summary):
                assert isinstance(summary.reason, CallEndReason)
                assert before.call is not None and summary.call_id == before.call.call_id
                assert before.phase in LIVE_PHASES
            case Send(to=to, message=message):
                assert to and to != me and message.call_id
            case Notify():
                notified = True
            case _:
                pass
    assert running == ({(after.timer, after.call.call_id)} if after.timer and after.call else set())
    assert media == ({after.call.call_id} if after.phase in MEDIA_PHASES and after.call else set())
    if (before.phase, before.call and before.call.call_id) != (
        after.phase,
        after.call and after.call.call_id,
    ):
        assert notified


@dataclass
class Harness:
    machine: CallMachine
    now: float = 0.0
    ended_calls: list[tuple[str, str]] = field(default_factory=list)
    last_notify: Notify | None = None

    def apply(self, event: Event) -> None:
        before = self.machine.state
        self.now += 1.0
        actions = self.machine.handle(event, self.now)
        after = self.machine.state
        check_actions(before, event, after, actions, ME)
        for action in actions:
            if isinstance(action, CallEnded):
                # A call is (id, caller); each one ends exactly once.
                summary = action.summary
                key = (summary.call_id, ME if summary.role is Role.CALLER else summary.peer)
                assert key not in self.ended_calls
                self.ended_calls.append(key)
            if isinstance(action, Notify):
                self.last_notify = action
        if after.live is not None:
            call = after.live
            assert self.last_notify is not None and self.last_notify.call_id == call.call_id
            if after.phase in MEDIA_PHASES and call.mode is CallMode.LISTEN:
                listened = call.role is Role.CALLEE
                assert (self.last_notify.indicator is Indicator.BEING_LISTENED) == listened


CALL_IDS = st.sampled_from(["c1", "c2", "c3", ""])
SENDERS = st.sampled_from(["p1", "p2", ME])
MODES_ST = st.sampled_from(list(CallMode))
REASONS = st.sampled_from(list(CallEndReason))
OPTIONAL_IDS = st.none() | CALL_IDS
MESSAGES: st.SearchStrategy[Message] = st.one_of(
    st.builds(Invite, CALL_IDS, MODES_ST),
    st.builds(Ringing, CALL_IDS),
    st.builds(Accept, CALL_IDS),
    st.builds(Decline, CALL_IDS, REASONS, st.sampled_from(["", "why"])),
    st.builds(Busy, CALL_IDS),
    st.builds(Cancel, CALL_IDS),
    st.builds(Hangup, CALL_IDS, REASONS),
)


@dataclass(frozen=True)
class Fire:
    """Stands for: the timer that is running now expires."""


EVENTS: st.SearchStrategy[Event | Fire] = st.one_of(
    st.builds(CallCommand, CALL_IDS, SENDERS, MODES_ST),
    st.builds(AnswerCommand, OPTIONAL_IDS),
    st.builds(DeclineCommand, OPTIONAL_IDS),
    st.builds(HangupCommand, OPTIONAL_IDS),
    st.builds(CancelCommand, OPTIONAL_IDS),
    st.builds(Received, SENDERS, MESSAGES),
    st.builds(MediaConnected, CALL_IDS),
    st.builds(IceFailed, CALL_IDS),
    st.builds(MediaLost, CALL_IDS),
    st.builds(PeerBye, CALL_IDS),
    st.builds(MediaFailed, CALL_IDS, st.just("boom")),
    st.builds(TimerExpired, st.sampled_from(list(Timer)), CALL_IDS),
    st.just(Fire()),
)
PEER_SETS = st.frozensets(st.sampled_from(["p1", "p2"]))
POLICIES = st.builds(
    CallPolicy, st.booleans(), st.booleans(), PEER_SETS, st.booleans(), PEER_SETS, PEER_SETS
)


def resolve(event: Event | Fire, state: CallState) -> Event:
    if not isinstance(event, Fire):
        return event
    if state.timer is not None and state.call is not None:
        return TimerExpired(state.timer, state.call.call_id)
    return TimerExpired(Timer.ENDED, "none")


@settings(max_examples=400)
@given(st.lists(EVENTS, max_size=40), POLICIES, st.booleans())
def test_random_sequences_keep_invariants(
    events: list[Event | Fire], policy: CallPolicy, limited: bool
) -> None:
    config = replace(CONFIG, max_active_s=0.5 if limited else None)
    harness = Harness(CallMachine(config, policy))
    for event in events:
        harness.apply(resolve(event, harness.machine.state))


@given(st.lists(st.sampled_from(ACTIVE_CALLER + ACTIVE_CALLEE + [HangupCommand()]), max_size=30))
def test_known_events_in_any_order(events: list[Event]) -> None:
    harness = Harness(CallMachine(CONFIG))
    for event in events:
        harness.apply(event)
