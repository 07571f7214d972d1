"""The I/O shell around ``CallMachine``: MQTT envelopes and commands in, envelopes and media out.

One worker task takes, in order, everything that can change the call: messages from the
device's ``in`` and ``cmd`` topics (read by a reader task) and the runtime's own events
(timers firing, media connected or lost). For each it asks the pure machine what to do
and carries the actions out:

* ``Send``: an envelope on ``out``. The SDP rides on the call-control messages
  (``envelope`` module docstring): the ``invite`` carries our offer and the ``accept`` our
  answer, so the ``MediaPeer`` of a call is made when that message goes out; once it is
  published our candidates trickle as ``candidate`` envelopes.
* ``StartMedia``: apply the peer's answer (caller), then connect (ICE, DTLS) in a task of
  the call, which reports ``MediaConnected`` / ``IceFailed`` / ``MediaFailed`` and later
  how the session ended. ``StopMedia`` (and any ended call) closes the peer.
* ``StartTimer``/``CancelTimer``: ``loop.call_later`` handles that post ``TimerExpired``.
* ``CallEnded``: a telemetry record with the media statistics; ``status`` shows it.

Incoming envelopes are checked (``from_json``, addressed to us, signed by their sender
when the device is paired, ``ReplayGuard``); a bad
one is logged and counted in ``rejected``, never fatal. A ``decline`` from the relay
(unknown or offline callee) is taken as the callee's answer to our current call.
Candidates that arrive before their call has a peer wait for it (bounded).

The relay's retained ``config`` carries TURN credentials (``turn``: RTCIceServer objects),
fresh for each call: the peer of a call gets the latest ones.

Commands (``{"name": ..., "args": {...}}`` on ``cmd``) are answered on ``reply`` with the
request's correlation data: ``{"ok": bool, "message": str, ...}``. Anything wrong with a
command gets an ``ok: false`` reply and a log line.

Audio commands act on the ``AudioControls`` shared with the microphone and speaker
wrappers (``agent.audio.gain``), so they work in and out of calls and last until changed:
``mute``/``unmute`` (silence is sent instead of the microphone; RTP keeps flowing),
``volume`` (``level`` 0..100) and ``test-tone`` (``frequency`` Hz, ``seconds``; only while no
call has media: the speaker belongs to the call). ``config/get`` returns the effective
configuration with secrets redacted; ``config/set`` (``key``, ``value``) checks the new value
with the TOML loader, saves it under the state directory (it overrides the agent file at
every start), applies call-policy keys and ``audio.volume`` at once and says that any other
key takes effect after a restart. Identity keys (``device_id``, ...) are refused.
``selftest`` runs the audio self-test now (``agent.service.selftest``) and replies with its
figures; it takes seconds, so it is answered from a task of its own
and calls are handled meanwhile (one that comes aborts the test).

``door/open`` (``by``: the device an operator client acts for, if any) pulses the door
relay if ``agent.gpio.door`` allows it, then hangs up if ``gpio.hangup_after_door``. The
board's own call button runs its commands through ``local_command``, in turn with the
messages and commands from the session.

Every call indicator change (``Notify``) is shown on the status LED and republished in
the retained presence (``call``, and ``listener`` while someone listens in).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
import tomllib
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.audio.base import AudioSink
from agent.audio.gain import AudioControls, tone_frames
from agent.calls.machine import (
    Accept,
    Action,
    AnswerCommand,
    Busy,
    CallCommand,
    CallEnded,
    CallEndReason,
    CallMachine,
    Cancel,
    CancelTimer,
    CommandRefused,
    Decline,
    DeclineCommand,
    Event,
    Hangup,
    HangupCommand,
    IceFailed,
    Indicator,
    Invite,
    MediaConnected,
    MediaFailed,
    Message,
    Notify,
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
)
from agent.gpio.door import DoorOpener, DoorRefused
from agent.media.peer import CallSetupError, MediaPeer
from agent.media.sdp import Direction
from agent.media.session import EndReason, MediaSession, MediaStats
from agent.net.candidate import Candidate, CandidateError
from agent.net.ice import IceError, TurnServer, turn_servers_from_json
from agent.net.transport import TransportClosed
from agent.service.config import FIXED_KEYS, AgentConfig, save_override
from agent.service.led import Led
from agent.service.selftest import Aborted
from agent.service.systemd import journal_fields
from agent.service.tomlconf import ConfigError, changed_keys, replace_key, to_plain
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
    ReplayGuard,
    ReplayVerdict,
    RingingBody,
    from_json,
    make,
    new_id,
    to_json,
)
from agent.signaling.mqtt import Incoming, MqttSession, PublishFailed, SessionClosed
from agent.signaling.signing import SignatureError, Signing
from agent.signaling.topics import RELAY_ID, Kind, TopicError, check_device_id

logger = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 16 * 1024
"""Larger command payloads are refused unparsed."""
MAX_EARLY_CANDIDATES = 32
"""Candidates kept per call while it has no peer yet; more are dropped."""
MAX_PENDING_OFFERS = 8
"""Offers of invites not (yet) answered that are kept, newest last."""

LIVE_KEYS = frozenset({
    "audio.volume",
    *(f"calls.{k}" for k in (
        "do_not_disturb", "privacy", "auto_answer",
        "announce_auto_answer", "listen_allowed", "force_allowed", "web_allowed",
    )),
})  # fmt: skip
"""``config/set`` keys that apply at once; every other key needs a restart."""
SLOW_COMMANDS = frozenset({"selftest"})
"""Commands answered from a task of their own: they take seconds, calls go on meanwhile."""
LIVE_PREFIXES = ("edge.",)
"""Tables a reload (SIGHUP) applies at once: the detectors are made anew with them."""
_SECRET = re.compile(r"password|secret|credential|token|private", re.IGNORECASE)
REDACTED = "***"

PeerFactory = Callable[[str, Direction, tuple[TurnServer, ...]], MediaPeer]
"""Makes a call's peer: (call id, media direction, TURN servers the relay sent)."""
"""Makes the media peer of call ``call_id`` with our media direction."""


def now_ms() -> int:
    """Wall-clock unix milliseconds, the envelopes' ``ts``."""
    return time.time_ns() // 1_000_000


class CommandRejected(ValueError):
    """A command that cannot be carried out as given; the text goes into the reply."""


# --- pure mappings between envelopes, machine messages and commands ---------------------------


def message_of(env: Envelope) -> Message | None:
    """The machine message an envelope carries; None for candidates and renegotiation."""
    call = env.call
    match env.body:
        case InviteBody(mode=mode):
            return Invite(call, mode)
        case RingingBody():
            return Ringing(call)
        case AcceptBody():
            return Accept(call)
        case DeclineBody(reason=reason, detail=detail):
            return Decline(call, _end_reason(reason, CallEndReason.DECLINED), detail)
        case BusyBody():
            return Busy(call)
        case CancelBody():
            return Cancel(call)
        case HangupBody(reason=reason):
            return Hangup(call, _end_reason(reason, CallEndReason.LOCAL_HANGUP))
    return None


def _end_reason(value: str, default: CallEndReason) -> CallEndReason:
    try:
        return CallEndReason(value)
    except ValueError:
        return default


def body_of(message: Message, sdp: str | None = None) -> Body:
    """The envelope body for a machine message; invite and accept need ``sdp``."""
    match message:
        case Invite(mode=mode):
            assert sdp is not None
            return InviteBody(sdp=sdp, mode=mode)
        case Ringing():
            return RingingBody()
        case Accept():
            assert sdp is not None
            return AcceptBody(sdp=sdp)
        case Decline(reason=reason, detail=detail):
            try:
                return DeclineBody(reason=reason.value, detail=detail)
            except EnvelopeError:  # a detail that is not a token: the reason alone
                return DeclineBody(reason=reason.value)
        case Busy():
            return BusyBody()
        case Cancel():
            return CancelBody()
        case Hangup(reason=reason):
            return HangupBody(reason=reason.value)
    raise AssertionError(f"no body for {message!r}")


def parse_command(payload: bytes) -> tuple[str, dict[str, Any]]:
    """``(name, args)`` of a command request; ``CommandRejected`` says what is wrong."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandRejected(f"command larger than {MAX_COMMAND_BYTES} bytes")
    try:
        request = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CommandRejected(f"malformed command: {exc}") from None
    if not isinstance(request, dict):
        raise CommandRejected("malformed command: not a JSON object")
    name = request.get("name")
    if not isinstance(name, str) or not name:
        raise CommandRejected("malformed command: 'name' must be a non-empty string")
    args = request.get("args", {})
    if not isinstance(args, dict):
        raise CommandRejected("malformed command: 'args' must be an object")
    return name, args


def _check_args(args: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise CommandRejected(f"unknown argument(s): {', '.join(unknown)}")


def _optional_call_id(args: Mapping[str, Any]) -> str | None:
    _check_args(args, frozenset({"call_id"}))
    call_id = args.get("call_id")
    if call_id is not None and (
        not isinstance(call_id, str) or len(call_id) != 32 or not call_id.isalnum()
    ):
        raise CommandRejected("call_id must be 32 hex digits")
    return call_id


def redact(data: Any) -> Any:
    """TOML-shaped config data with the values of secret-looking keys replaced."""
    if isinstance(data, dict):
        return {
            k: REDACTED if _SECRET.search(k) and v not in (None, "") else redact(v)
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [redact(v) for v in data]
    return data


def parse_value(value: Any) -> Any:
    """A ``config/set`` value: JSON values as they are; text that is a TOML value
    (``true``, ``3``, ``["a"]``) as that value, else as text."""
    if not isinstance(value, str):
        return value
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _number(args: Mapping[str, Any], name: str, default: float) -> float:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandRejected(f"{name} must be a number, got {value!r}")
    return float(value)


# --- the shell ---------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Media:
    """The media side of the current call, from our SDP going out until it is closed."""

    call_id: str
    peer_id: str
    peer: MediaPeer
    role: Role
    remote_sdp: str | None = None
    """Caller: the answer from the accept, until it is applied."""
    ready: bool = False
    """The remote description is applied: candidates go straight to ICE."""
    early: list[Candidate | None] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class _Local:
    """A command of the board itself (``CallRuntime.local_command``), for the worker."""

    name: str
    args: dict[str, Any]
    reply: asyncio.Future[dict[str, Any]]


@dataclass(slots=True)
class TrickleOrder:
    """The peer's trickled candidates of one call, ends last.

    Relay workers sharing the signaling do not keep one sender's messages in order, so
    the end of candidates may overtake candidates sent before it. It says how many
    those were (``count``); ``take`` holds it until they have all arrived. An end
    without a count (an older peer) is taken as it comes."""

    received: int = 0
    end_after: int | None = None
    ended: bool = False

    def take(self, candidate: Candidate | None, count: int | None) -> list[Candidate | None]:
        """What to hand to ICE now, in order."""
        if candidate is not None:
            self.received += 1
            if self.end_after is not None and self.received >= self.end_after:
                self.end_after, self.ended = None, True
                return [candidate, None]
            return [candidate]
        if self.ended or self.end_after is not None:
            return []  # a second end
        if count is None or self.received >= count:
            self.ended = True
            return [None]
        self.end_after = count
        return []


class CallRuntime:
    """Runs calls for one device over its MQTT session; ``start()``, then ``close()``."""

    def __init__(
        self,
        session: MqttSession,
        machine: CallMachine,
        make_peer: PeerFactory,
        *,
        wall_ms: Callable[[], int] = now_ms,
        controls: AudioControls | None = None,
        speaker: AudioSink | None = None,
        config: AgentConfig | None = None,
        presence: Mapping[str, object] | None = None,
        led: Led | None = None,
        signing: Signing | None = None,
        door: DoorOpener | None = None,
    ) -> None:
        """``controls``: the mute and volume the audio wrappers read; ``speaker``: where a
        test tone plays (None: ``test-tone`` is refused); ``config``: the effective config
        for ``config/get``/``config/set`` (None: ``AgentConfig()``); ``presence``: the
        device's online presence, republished with the call indicator as it changes
        (None: not republished); ``led``: the status LED showing the indicator;
        ``signing``: the paired device's key and CA: what it sends is signed, and what it
        receives must be signed by the device (or relay) it says it is from (None: an
        unpaired lab board; nothing is signed or checked); ``door``: the door relay that
        ``door/open`` pulses (None: refused)."""
        self.device_id = session.device_id
        self._session = session
        self.machine = machine
        self._make_peer = make_peer
        self._wall_ms = wall_ms
        self._guard = ReplayGuard()
        self._signing = signing
        self.on_alert_ack: Callable[[bytes], None] | None = None
        self.on_indicator: Callable[[Indicator, str | None], None] | None = None
        """Told each new indicator and its peer (the service's STATUS line)."""
        """Where the relay's acks of our alerts go (``agent.edge.uplink``)."""
        self.turn_servers: tuple[TurnServer, ...] = ()
        """TURN servers with credentials for the next call, from the relay (``config``)."""
        self.on_config: Callable[[Mapping[str, Any]], None] | None = None
        """Who else reads the relay's desired config (the clip key: ``agent.edge.recorder``)."""
        self._queue: asyncio.Queue[Incoming | Event | _Local] = asyncio.Queue()
        self._timers: dict[tuple[Timer, str], asyncio.TimerHandle] = {}
        self._media: _Media | None = None
        self._offers: dict[str, tuple[str, str]] = {}
        """Call id -> (caller, offer SDP) of invites that have no peer yet."""
        self._early: dict[str, list[Candidate | None]] = {}
        self._trickle_order: dict[str, TrickleOrder] = {}
        self._reader: asyncio.Task[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._ending = False
        self.rejected: Counter[str] = Counter()
        """Incoming envelopes refused, by reason."""
        self.last_call: dict[str, Any] | None = None
        """The record of the last ended call (what ``status`` shows)."""
        self._media_stats: dict[str, MediaStats] = {}
        self.config = config if config is not None else AgentConfig(device_id=self.device_id)
        self.controls = controls if controls is not None else AudioControls()
        self._speaker = speaker
        self._presence = presence
        self._led = led
        self._door = door
        self._indicator = Indicator.IDLE
        self._presence_tasks: set[asyncio.Task[None]] = set()
        self._tone: asyncio.Task[None] | None = None
        self._slow: set[asyncio.Task[None]] = set()
        self.selftest: Callable[[], Awaitable[dict[str, Any]]] | None = None
        """Runs the audio self-test now, its record (``SelfTestScheduler.run_now``); None:
        ``selftest`` is refused."""
        self._commands: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "call": self._cmd_call,
            "hangup": self._cmd_simple(HangupCommand, "hung up"),
            "answer": self._cmd_simple(AnswerCommand, "answered"),
            "decline": self._cmd_simple(DeclineCommand, "declined"),
            "status": self._cmd_status,
            "mute": self._cmd_mute(True),
            "unmute": self._cmd_mute(False),
            "volume": self._cmd_volume,
            "test-tone": self._cmd_test_tone,
            "selftest": self._cmd_selftest,
            "config/get": self._cmd_config_get,
            "config/set": self._cmd_config_set,
            "door/open": self._cmd_door_open,
        }

    # --- lifetime ---

    async def start(self) -> None:
        """Start reading the session (which must be started) and handling events."""
        loop = asyncio.get_running_loop()
        self._worker = loop.create_task(self._work(), name=f"calls-{self.device_id}")
        self._reader = loop.create_task(self._read(), name=f"calls-read-{self.device_id}")
        if self._led is not None:
            await self._led.show(self._indicator)  # online

    async def end_calls(self) -> None:
        """Stop handling calls and commands: hang up any call (telling the peer it is a
        ``shutdown``), stop media and timers. Alert acks are still taken until ``close``
        (a stopping agent waits for them). Idempotent."""
        if self._ending:
            return
        self._ending = True
        tasks = [t for t in (self._worker, self._tone, *self._slow) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.machine.state.live is not None:
            try:
                await self._handle(HangupCommand(shutdown=True))
            except Exception:
                logger.exception("device %s: hang-up on close failed", self.device_id)
        if self._media is not None:
            await self._stop_media(self._media.call_id)
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()

    async def close(self) -> None:
        """``end_calls``, then stop reading the session. Idempotent."""
        if self._closed:
            return
        await self.end_calls()
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._presence_tasks:
            # The session publishes its offline presence next; these are moot.
            for task in self._presence_tasks:
                task.cancel()
            await asyncio.gather(*self._presence_tasks, return_exceptions=True)

    def _post(self, event: Event) -> None:
        if not self._ending:
            self._queue.put_nowait(event)

    async def _read(self) -> None:
        while True:
            try:
                msg = await self._session.recv()
            except SessionClosed:
                return
            if msg.kind is Kind.ALERT_ACK:
                # Here, not in the worker: acks are no call's business, and a stopping
                # agent still takes them after ``end_calls``.
                if self.on_alert_ack is not None:
                    self.on_alert_ack(msg.payload)
                continue
            self._queue.put_nowait(msg)

    async def _work(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                if isinstance(item, Incoming):
                    await self._on_incoming(item)
                elif isinstance(item, _Local):
                    await self._on_local(item)
                else:
                    await self._handle(item)
            except Exception:
                # One bad message or failed action must not end the device's signaling.
                logger.exception("device %s: failed to handle %r", self.device_id, item)

    async def _on_incoming(self, msg: Incoming) -> None:
        if msg.kind is Kind.IN:
            await self._on_envelope(msg.payload)
        elif msg.kind is Kind.CMD:
            await self._on_command(msg)
        elif msg.kind is Kind.CONFIG:
            self._on_config(msg.payload)
        else:
            logger.debug("device %s: ignored a message on %s", self.device_id, msg.kind)

    def _on_config(self, payload: bytes) -> None:
        """The relay's desired config (retained): for now the TURN credentials."""
        if not payload:
            return  # the retained message was cleared
        try:
            desired = json.loads(payload)
            if not isinstance(desired, dict):
                raise ValueError("config must be a JSON object")
            turn = turn_servers_from_json(desired.get("turn", []))
        except (ValueError, RecursionError) as exc:
            self._reject("bad-config", f"config from the relay: {exc}")
            return
        self.turn_servers = turn
        logger.info("device %s: %d TURN server(s) from the relay", self.device_id, len(turn))
        if self.on_config is not None:
            self.on_config(desired)

    # --- the machine ---

    async def _handle(self, event: Event) -> tuple[Action, ...]:
        actions = self.machine.handle(event, asyncio.get_running_loop().time())
        call = self.machine.state.call
        # The call's media tasks start in here, and inherit the call's journal fields.
        with journal_fields(
            CALL_ID=None if call is None else call.call_id,
            PEER=None if call is None else call.peer,
        ):
            for action in actions:
                await self._perform(action)
        return actions

    async def _perform(self, action: Action) -> None:
        match action:
            case Send(to=to, message=message):
                await self._send(to, message)
            case StartMedia():
                await self._start_media(action)
            case StopMedia(call_id=call_id, reason=reason):
                await self._stop_media(call_id, reason)
            case StartTimer(timer=timer, call_id=call_id, duration_s=duration):
                self._cancel_timer(timer, call_id)
                self._timers[(timer, call_id)] = asyncio.get_running_loop().call_later(
                    duration, self._fire, timer, call_id
                )
            case CancelTimer(timer=timer, call_id=call_id):
                self._cancel_timer(timer, call_id)
            case CallEnded(summary=summary):
                await self._stop_media(summary.call_id)
                self._offers.pop(summary.call_id, None)
                self._early.pop(summary.call_id, None)
                self._trickle_order.pop(summary.call_id, None)
                stats = self._media_stats.pop(summary.call_id, None)
                self.last_call = {
                    "call_id": summary.call_id,
                    "peer": summary.peer,
                    "mode": summary.mode.value,
                    "role": summary.role.value,
                    "reason": summary.reason.value,
                    "detail": summary.detail,
                    "setup_s": summary.setup_s,
                    "talk_s": summary.talk_s,
                    "media": None if stats is None else asdict(stats),
                }
                await self.telemetry({"event": "call-ended", **self.last_call})
                if self._door is not None and summary.answered_at is not None:
                    self._door.call_ended(summary.peer, summary.ended_at)
            case Notify():
                await self._indicate(action)
            case _:
                pass  # refusals and ignored events: the machine logs and counts them

    async def _indicate(self, notify: Notify) -> None:
        """Show the call indicator on the LED and in the retained presence.

        Being listened to names the listener in the presence, so that the relay and the
        dashboard show who hears this board's microphone."""
        logger.info("device %s call %s: %s", self.device_id, notify.call_id, notify.indicator)
        if notify.indicator is self._indicator:
            return
        self._indicator = notify.indicator
        if self.on_indicator is not None:
            self.on_indicator(notify.indicator, notify.peer)
        if self._led is not None:
            await self._led.show(notify.indicator)
        if self._presence is None:
            return
        presence = {**self._presence, "call": notify.indicator.value}
        if notify.indicator is Indicator.BEING_LISTENED and notify.peer is not None:
            presence["listener"] = notify.peer
        # Not awaited here: the call must not wait for the broker. Updates still go out in
        # order (each task queues its publish when it starts).
        task = asyncio.get_running_loop().create_task(self._publish_presence(presence))
        self._presence_tasks.add(task)
        task.add_done_callback(self._presence_tasks.discard)

    async def _publish_presence(self, presence: Mapping[str, object]) -> None:
        try:
            await self._session.set_presence(presence)
        except PublishFailed as exc:
            # The latest presence is republished on the next connect anyway.
            logger.info("device %s: presence not confirmed: %s", self.device_id, exc)

    def _fire(self, timer: Timer, call_id: str) -> None:
        self._timers.pop((timer, call_id), None)
        self._post(TimerExpired(timer, call_id))

    def _cancel_timer(self, timer: Timer, call_id: str) -> None:
        handle = self._timers.pop((timer, call_id), None)
        if handle is not None:
            handle.cancel()

    # --- outgoing envelopes ---

    async def _send(self, to: str, message: Message) -> None:
        call_id = message.call_id
        sdp: str | None = None
        if isinstance(message, Invite):
            sdp = await self._prepare_caller(call_id, to, message.mode)
            if sdp is None:
                self._post(HangupCommand(call_id))
                return
        elif isinstance(message, Accept):
            sdp = await self._prepare_callee(call_id, to)
            if sdp is None:
                self._post(MediaFailed(call_id, "bad-offer"))
                return
        body = body_of(message, sdp)
        env = make(body, call=call_id, from_=self.device_id, to=to, ts=self._wall_ms())
        await self._publish(env)
        media = self._media
        if sdp is not None and media is not None and media.call_id == call_id:
            loop = asyncio.get_running_loop()
            media.tasks.append(
                loop.create_task(self._trickle(media), name=f"trickle-{call_id[:8]}")
            )
            if isinstance(message, Invite) and self.config.calls.invite_resend_s > 0:
                media.tasks.append(
                    loop.create_task(self._resend_invite(env), name=f"resend-{call_id[:8]}")
                )

    async def _resend_invite(self, env: Envelope) -> None:
        """Publish the same invite again until the callee answers anything.

        The broker acknowledges a message that no relay was subscribed to take (a relay
        reconnecting after a broker restart, say), so a PUBACK does not mean the invite
        got anywhere. The copy has the same message id: relay and callee drop it as a
        duplicate if the first one did arrive. The invite timer still bounds the call."""
        while True:
            await asyncio.sleep(self.config.calls.invite_resend_s)
            live = self.machine.state.live
            if (
                self.machine.phase is not Phase.OUTGOING
                or live is None
                or live.call_id != env.call
                or live.remote_ringing_at is not None
            ):
                return
            logger.info(
                "device %s call %s: no answer yet, invite sent again", self.device_id, env.call
            )
            await self._publish(env)

    async def _publish(self, env: Envelope) -> None:
        if self._signing is not None:
            env = self._signing.sign(env)
        try:
            await self._session.publish(Kind.OUT, to_json(env).encode("utf-8"))
        except (PublishFailed, EnvelopeError) as exc:
            # The machine's timers end a call whose messages do not get through.
            logger.warning(
                "device %s call %s: %s to %s not sent: %s",
                self.device_id, env.call, env.type, env.to, exc,
            )  # fmt: skip

    async def _trickle(self, media: _Media) -> None:
        sent = 0
        async for candidate in media.peer.local_candidates():
            await self._publish(self._candidate(media, CandidateBody(candidate.to_sdp())))
            sent += 1
        await self._publish(self._candidate(media, CandidateBody(None, count=sent)))

    def _candidate(self, media: _Media, body: CandidateBody) -> Envelope:
        return make(
            body,
            call=media.call_id,
            from_=self.device_id,
            to=media.peer_id,
            ts=self._wall_ms(),
        )

    async def telemetry(self, record: Mapping[str, Any]) -> None:
        """Publish ``record`` on the device's telemetry topic (QoS 0: lost if offline)."""
        try:
            await self._session.publish(Kind.TELEMETRY, json.dumps(record).encode("utf-8"))
        except PublishFailed as exc:
            logger.info("device %s: telemetry not sent: %s", self.device_id, exc)

    # --- media ---

    async def _prepare_caller(self, call_id: str, peer_id: str, mode: CallMode) -> str | None:
        """A peer for our new call and its offer; None if it cannot be made."""
        await self._drop_media()
        await self._stop_tone()
        peer = self._make_peer(call_id, media_direction(mode, Role.CALLER), self.turn_servers)
        try:
            offer = await peer.create_offer(trickle=True)
        except (OSError, ValueError) as exc:
            logger.error("device %s call %s: no offer: %s", self.device_id, call_id, exc)
            await peer.close()
            return None
        self._media = _Media(call_id, peer_id, peer, Role.CALLER)
        return offer

    async def _prepare_callee(self, call_id: str, peer_id: str) -> str | None:
        """A peer for the call we answer and its answer SDP; None if the offer is unusable."""
        await self._drop_media()
        await self._stop_tone()
        offer = self._offers.pop(call_id, None)
        early = self._early.pop(call_id, [])
        live = self.machine.state.live
        if offer is None or offer[0] != peer_id or live is None or live.call_id != call_id:
            logger.warning("device %s call %s: no offer to answer", self.device_id, call_id)
            return None
        peer = self._make_peer(call_id, live.direction, self.turn_servers)
        try:
            answer = await peer.accept_offer(offer[1], trickle=True)
        except (OSError, ValueError) as exc:  # SdpError is a ValueError
            logger.warning("device %s call %s: offer refused: %s", self.device_id, call_id, exc)
            await peer.close()
            return None
        media = self._media = _Media(call_id, peer_id, peer, Role.CALLEE, ready=True)
        for candidate in early:
            await media.peer.add_remote_candidate(candidate)
        return answer

    async def _start_media(self, action: StartMedia) -> None:
        media = self._media
        if media is None or media.call_id != action.call_id:
            self._post(MediaFailed(action.call_id, "no-peer"))
            return
        if action.role is Role.CALLER:
            try:
                if media.remote_sdp is None:
                    raise ValueError("the accept carried no answer")
                await media.peer.accept_answer(media.remote_sdp)
            except (ValueError, RuntimeError) as exc:
                logger.warning(
                    "device %s call %s: answer refused: %s", self.device_id, media.call_id, exc
                )
                self._post(MediaFailed(media.call_id, "bad-answer"))
                return
            media.ready = True
            for candidate in media.early:
                await media.peer.add_remote_candidate(candidate)
            media.early.clear()
        media.tasks.append(
            asyncio.get_running_loop().create_task(
                self._run_media(media), name=f"media-{media.call_id[:8]}"
            )
        )

    async def _run_media(self, media: _Media) -> None:
        call_id = media.call_id
        try:
            session = await media.peer.connect()
        except CallSetupError as exc:
            logger.warning("device %s call %s: %s", self.device_id, call_id, exc)
            ice = isinstance(exc.__cause__, IceError | TransportClosed)
            self._post(IceFailed(call_id) if ice else MediaFailed(call_id, "dtls-failed"))
            return
        self._post(MediaConnected(call_id))
        ended = asyncio.get_running_loop().create_task(
            media.peer.ended(), name=f"media-ended-{call_id[:8]}"
        )
        try:
            await self._audio_flowing(media, session, ended)
            reason = await ended
        finally:
            ended.cancel()  # our wait only: the session's own end is shielded
        event = media_end_event(reason, call_id, media.peer.bye_reason)
        if event is not None:
            self._post(event)

    async def _audio_flowing(
        self,
        media: _Media,
        session: MediaSession,
        ended: asyncio.Future[EndReason],
        wait_s: float = 10.0,
    ) -> None:
        """Publish ``audio-flowing`` once the first frame from the peer is decoded.

        ``at_ms`` is the wall clock (``wall_ms``) when it was decoded: the end of call
        setup, for operators and ``tools/bench/e2e.py``. Waits at most ``wait_s`` and
        never past the end of the session; a call in which we only send hears nothing and
        publishes nothing.
        """
        negotiated = media.peer.negotiated
        if negotiated is not None and not negotiated.direction.receives:
            return
        loop = asyncio.get_running_loop()
        first = loop.create_task(session.first_audio(), name=f"first-audio-{media.call_id[:8]}")
        waiting: set[asyncio.Future[Any]] = {first, ended}
        try:
            done, _ = await asyncio.wait(
                waiting, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            first.cancel()  # our wait only: first_audio() is shielded
        if first not in done:
            if not ended.done():
                logger.warning(
                    "device %s call %s: media connected but no audio decoded within %g s",
                    self.device_id, media.call_id, wait_s,
                )  # fmt: skip
            return
        at_ms = self._wall_ms() - round(1000 * (loop.time() - first.result()))
        logger.info("device %s call %s: audio flowing", self.device_id, media.call_id)
        await self.telemetry({
            "event": "audio-flowing",
            "call_id": media.call_id,
            "peer": media.peer_id,
            "at_ms": at_ms,
        })  # fmt: skip

    async def _stop_media(self, call_id: str, why: str = "") -> None:
        media = self._media
        if media is None or media.call_id != call_id:
            return
        self._media = None
        for task in media.tasks:
            task.cancel()
        await asyncio.gather(*media.tasks, return_exceptions=True)
        await media.peer.close(why=why)
        session = media.peer.session
        if session is not None:
            self._media_stats[call_id] = session.stats
            stats = session.stats
            logger.info(
                "device %s call %s: media closed, %d packets sent, %d received, %d lost",
                self.device_id, call_id,
                stats.packets_sent, stats.packets_received, stats.packets_lost,
            )  # fmt: skip

    async def _drop_media(self) -> None:
        if self._media is not None:
            await self._stop_media(self._media.call_id)

    # --- incoming envelopes ---

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        logger.warning("device %s: envelope rejected (%s): %s", self.device_id, reason, detail)

    async def _on_envelope(self, payload: bytes) -> None:
        try:
            env = from_json(payload)
        except EnvelopeError as exc:
            self._reject(exc.label, str(exc))
            return
        if env.to != self.device_id:
            self._reject("wrong-recipient", f"{env.type} for {env.to}")
            return
        if self._signing is not None:
            try:
                self._signing.verifier.check(env)
            except SignatureError as exc:
                self._reject(exc.reason, str(exc))
                return
        verdict = self._guard.check(env, self._wall_ms())
        if verdict is not ReplayVerdict.FRESH:
            self._reject(str(verdict), f"{env.type} {env.id} of call {env.call}")
            return
        if isinstance(env.body, CandidateBody):
            await self._on_candidate(env, env.body)
            return
        message = message_of(env)
        if message is None:
            self._reject("unsupported", f"{env.type} of call {env.call}")
            return
        sender = env.from_
        live = self.machine.state.live
        if sender == RELAY_ID:
            # The relay answers for a callee it cannot reach or that the policy shields.
            if not (
                isinstance(message, Decline)
                and live is not None
                and live.call_id == env.call
                and live.role is Role.CALLER
            ):
                self._reject("relay-message", f"{env.type} of call {env.call}")
                return
            sender = live.peer
        if isinstance(env.body, InviteBody):
            self._offers[env.call] = (sender, env.body.sdp)
            while len(self._offers) > MAX_PENDING_OFFERS:
                self._offers.pop(next(iter(self._offers)))
        elif isinstance(env.body, AcceptBody):
            media = self._media
            if media is not None and media.call_id == env.call and media.peer_id == sender:
                media.remote_sdp = media.remote_sdp or env.body.sdp
        await self._handle(Received(sender, message))
        live = self.machine.state.live
        if isinstance(env.body, InviteBody) and (live is None or live.call_id != env.call):
            self._offers.pop(env.call, None)  # refused or ignored: its offer is of no use
            self._early.pop(env.call, None)

    async def _on_candidate(self, env: Envelope, body: CandidateBody) -> None:
        try:
            candidate = None if body.candidate is None else Candidate.parse(body.candidate)
        except CandidateError as exc:
            self._reject("bad-candidate", str(exc))
            return
        media = self._media
        if media is not None and media.call_id == env.call:
            if env.from_ != media.peer_id:
                self._reject("wrong-peer", f"candidate of call {env.call} from {env.from_}")
                return
        else:
            offer = self._offers.get(env.call)
            if offer is None or offer[0] != env.from_:
                self._reject("unknown-call", f"candidate of call {env.call}")
                return
        order = self._trickle_order.setdefault(env.call, TrickleOrder())
        for item in order.take(candidate, body.count):
            media = self._media
            if media is not None and media.call_id == env.call:
                if media.ready:
                    await media.peer.add_remote_candidate(item)
                elif len(media.early) < MAX_EARLY_CANDIDATES:
                    media.early.append(item)
            else:
                early = self._early.setdefault(env.call, [])
                if len(early) < MAX_EARLY_CANDIDATES:
                    early.append(item)

    # --- commands ---

    async def _on_command(self, msg: Incoming) -> None:
        try:
            name, args = parse_command(msg.payload)
            handler = self._commands.get(name)
            if handler is None:
                raise CommandRejected(f"unknown command {name[:40]!r}")
        except CommandRejected as exc:
            name, args, handler = "", {}, functools.partial(_refused, exc)
        if name not in SLOW_COMMANDS:
            await self._answer(msg, name, handler, args)
            return
        task = asyncio.get_running_loop().create_task(
            self._answer(msg, name, handler, args), name=f"command-{name}-{self.device_id}"
        )
        self._slow.add(task)
        task.add_done_callback(self._slow.discard)

    async def _answer(
        self,
        msg: Incoming,
        name: str,
        handler: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
        args: dict[str, Any],
    ) -> None:
        try:
            reply = await handler(args)
        except CommandRejected as exc:
            logger.warning("device %s: command refused: %s", self.device_id, exc)
            reply = {"ok": False, "message": str(exc)}
        else:
            level = logging.DEBUG if name == "status" else logging.INFO  # polled often
            logger.log(level, "device %s: command %s: %s", self.device_id, name, reply["message"])
        await self._reply(msg, reply)

    async def _reply(self, msg: Incoming, reply: Mapping[str, Any]) -> None:
        if msg.correlation_data is None:
            logger.warning("device %s: command without correlation data", self.device_id)
        try:
            await self._session.publish(
                Kind.REPLY,
                json.dumps(reply).encode("utf-8"),
                correlation_data=msg.correlation_data,
            )
        except PublishFailed as exc:
            logger.warning("device %s: reply not sent: %s", self.device_id, exc)

    async def local_command(self, name: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """Run command ``name`` for the board itself (its call button), in turn with the
        session's messages and commands; its reply (``ok``, ``message``, ...)."""
        if self._ending:
            return {"ok": False, "message": "the agent is stopping"}
        item = _Local(name, dict(args), asyncio.get_running_loop().create_future())
        self._queue.put_nowait(item)
        return await item.reply

    async def _on_local(self, item: _Local) -> None:
        reply = {"ok": False, "message": f"{item.name} failed (see the log)"}
        try:
            reply = await self._commands[item.name](item.args)
        except CommandRejected as exc:
            reply = {"ok": False, "message": str(exc)}
        finally:  # answered whatever happens: the button waits for it
            if not item.reply.done():
                item.reply.set_result(reply)

    async def _cmd_door_open(self, args: dict[str, Any]) -> dict[str, Any]:
        _check_args(args, frozenset({"by"}))
        if self._door is None:
            raise CommandRejected("this board has no door relay")
        by = args.get("by")
        if by is not None:
            try:
                by = check_device_id(by)
            except TopicError as exc:
                raise CommandRejected(f"by: {exc}") from None
        live = self.machine.state.live
        talking = None if live is None or live.answered_at is None else live.peer
        try:
            message = self._door.open(by, talking, asyncio.get_running_loop().time())
        except DoorRefused as exc:
            raise CommandRejected(f"door/open refused: {exc}") from None
        hung_up = None
        if live is not None and self._door.settings.hangup_after_door:
            refusal = self._refusal(await self._handle(HangupCommand(live.call_id)))
            hung_up = live.call_id if refusal is None else None
            message += f"; call {live.call_id} hung up" if refusal is None else f"; {refusal}"
        return {"ok": True, "message": message, "by": by, "hung_up": hung_up}

    def _refusal(self, actions: tuple[Action, ...]) -> str | None:
        for action in actions:
            if isinstance(action, CommandRefused):
                return action.reason
        return None

    async def _cmd_call(self, args: dict[str, Any]) -> dict[str, Any]:
        _check_args(args, frozenset({"peer", "mode"}))
        try:
            peer = check_device_id(args.get("peer"))
        except TopicError as exc:
            raise CommandRejected(f"peer: {exc}") from None
        try:
            mode = CallMode(args.get("mode", CallMode.NORMAL.value))
        except ValueError:
            raise CommandRejected(f"mode must be one of {', '.join(CallMode)}") from None
        call_id = new_id()
        refusal = self._refusal(await self._handle(CallCommand(call_id, peer, mode)))
        if refusal is not None:
            return {"ok": False, "message": refusal}
        live = self.machine.state.live
        return {
            "ok": True,
            "message": f"calling {peer}",
            "call_id": call_id if live is None else live.call_id,
            "phase": self.machine.phase.value,
        }

    def _cmd_simple(
        self, command: type[AnswerCommand | DeclineCommand | HangupCommand], done: str
    ) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
        async def run(args: dict[str, Any]) -> dict[str, Any]:
            live = self.machine.state.live
            refusal = self._refusal(await self._handle(command(_optional_call_id(args))))
            if refusal is not None:
                return {"ok": False, "message": refusal}
            assert live is not None
            return {"ok": True, "message": f"{done} call {live.call_id}", "call_id": live.call_id}

        return run

    def live_media(self) -> tuple[str, MediaStats] | None:
        """The call whose media is up now and its statistics (periodic telemetry)."""
        media = self._media
        session = None if media is None else media.peer.session
        return None if media is None or session is None else (media.call_id, session.stats)

    def _live_stats(self) -> dict[str, Any] | None:
        live = self.live_media()
        return None if live is None else asdict(live[1])

    async def _cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        _check_args(args, frozenset())
        state = self.machine.state
        call = state.call
        return {
            "ok": True,
            "message": str(state.phase) if call is None else f"{state.phase} with {call.peer}",
            "device": self.device_id,
            "phase": state.phase.value,
            "call_id": None if call is None else call.call_id,
            "peer": None if call is None else call.peer,
            "mode": None if call is None else call.mode.value,
            "role": None if call is None else call.role.value,
            "reason": None if state.reason is None else state.reason.value,
            "media": self._live_stats(),
            "last_call": self.last_call,
            "rejected": dict(self.rejected),
            "muted": self.controls.muted,
            "volume": self.controls.volume,
            "test_tone": self._tone is not None and not self._tone.done(),
            "do_not_disturb": self.machine.policy.do_not_disturb,
            "door": None if self._door is None else self._door.stats(),
        }

    def _cmd_mute(self, muted: bool) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
        async def run(args: dict[str, Any]) -> dict[str, Any]:
            _check_args(args, frozenset())
            self.controls.muted = muted
            word = "muted" if muted else "unmuted"
            where = "" if self._media is None else f" in call {self._media.call_id}"
            return {"ok": True, "message": f"microphone {word}{where}", "muted": muted}

        return run

    async def _cmd_volume(self, args: dict[str, Any]) -> dict[str, Any]:
        _check_args(args, frozenset({"level"}))
        if "level" not in args:
            raise CommandRejected("level is required: a whole number 0..100")
        try:
            config = replace_key(self.config, "audio.volume", args["level"])
        except ConfigError:
            raise CommandRejected(
                f"level must be a whole number 0..100, got {args['level']!r}"
            ) from None
        self.config = config
        level = self.controls.set_volume(config.audio.volume)
        return {"ok": True, "message": f"volume {level}", "volume": level}

    async def _cmd_test_tone(self, args: dict[str, Any]) -> dict[str, Any]:
        _check_args(args, frozenset({"frequency", "seconds"}))
        frequency = _number(args, "frequency", 1000.0)
        seconds = _number(args, "seconds", 1.0)
        try:
            frames = tone_frames(frequency, seconds)
        except ValueError as exc:
            raise CommandRejected(str(exc)) from None
        self.play(frames)
        return {
            "ok": True,
            "message": f"playing {frequency:g} Hz for {seconds:g} s",
            "frequency": frequency,
            "seconds": seconds,
        }

    def play(self, frames: list[bytes]) -> asyncio.Task[None]:
        """Play ``frames`` on the speaker as the test tone (a call that starts stops it);
        ``CommandRejected`` says why not now (no speaker, a call, a tone playing)."""
        if self._speaker is None:
            raise CommandRejected("this agent has no speaker to play a tone on")
        if self._media is not None or self.machine.state.live is not None:
            raise CommandRejected("refused: a call is in progress and has the speaker")
        if self._tone is not None and not self._tone.done():
            raise CommandRejected("a test tone is already playing")
        self._tone = asyncio.get_running_loop().create_task(
            self._play_tone(self._speaker, frames), name=f"test-tone-{self.device_id}"
        )
        return self._tone

    async def _cmd_selftest(self, args: dict[str, Any]) -> dict[str, Any]:
        _check_args(args, frozenset())
        if self.selftest is None:
            raise CommandRejected("this agent has no audio self-test")
        try:
            record = await self.selftest()
        except Aborted as exc:
            raise CommandRejected(f"self-test aborted: {exc}") from None
        verdict = "passed" if record["pass"] else "failed: " + "; ".join(record["failures"])
        return {"ok": True, "message": f"self-test {verdict}", **record}

    async def _play_tone(self, speaker: AudioSink, frames: list[bytes]) -> None:
        try:
            for frame in frames:
                await speaker.write(frame)
        except (OSError, RuntimeError) as exc:
            logger.warning("device %s: test tone failed: %s", self.device_id, exc)

    async def _stop_tone(self) -> None:
        tone, self._tone = self._tone, None
        if tone is not None and not tone.done():
            tone.cancel()
            await asyncio.gather(tone, return_exceptions=True)
            logger.info("device %s: test tone stopped for a call", self.device_id)

    def reconfigure(self, config: AgentConfig) -> tuple[list[str], list[str]]:
        """A reloaded configuration (SIGHUP): the call policy and the volume change at once;
        returns the changed keys applied here and those that wait for a restart (the
        caller applies ``edge.`` itself)."""
        changed = changed_keys(self.config, config)
        self.config = config
        self.machine.policy = config.calls.policy()
        self.controls.set_volume(config.audio.volume)
        live = [k for k in changed if k in LIVE_KEYS or k.startswith(LIVE_PREFIXES)]
        return live, [k for k in changed if k not in live]

    async def _cmd_config_get(self, args: dict[str, Any]) -> dict[str, Any]:
        _check_args(args, frozenset())
        return {"ok": True, "message": "effective config", "config": redact(to_plain(self.config))}

    async def _cmd_config_set(self, args: dict[str, Any]) -> dict[str, Any]:
        _check_args(args, frozenset({"key", "value"}))
        key = args.get("key")
        if not isinstance(key, str) or not key:
            raise CommandRejected("key must be a dotted config key, e.g. calls.do_not_disturb")
        if key.split(".")[0] in FIXED_KEYS:
            raise CommandRejected(f"config/set: {key} is set in the agent file only")
        if "value" not in args:
            raise CommandRejected("value is required")
        value = args["value"]
        try:
            config = replace_key(self.config, key, value)
        except ConfigError as first:
            parsed = parse_value(value)
            if parsed is value or isinstance(parsed, str):
                raise CommandRejected(f"config/set: {first}") from None
            try:
                config = replace_key(self.config, key, parsed)
            except ConfigError as exc:
                raise CommandRejected(f"config/set: {exc}") from None
        plain = to_plain(_lookup(config, key))
        try:
            await asyncio.to_thread(save_override, Path(config.state_dir), key, plain)
        except (OSError, ConfigError) as exc:
            logger.error("device %s: config/set %s not saved: %s", self.device_id, key, exc)
            return {"ok": False, "message": f"config/set: {key} not saved: {exc}"}
        self.config = config
        shown = json.dumps(redact({key.rsplit(".", 1)[-1]: plain}).popitem()[1])
        if key in LIVE_KEYS:
            self.machine.policy = config.calls.policy()
            self.controls.set_volume(config.audio.volume)
            return {
                "ok": True,
                "message": f"{key} = {shown}, applied and saved",
                "applied": True,
                "restart_required": False,
            }
        return {
            "ok": True,
            "message": f"{key} = {shown} saved; takes effect after a restart",
            "applied": False,
            "restart_required": True,
        }


async def _refused(exc: CommandRejected, args: dict[str, Any]) -> dict[str, Any]:
    raise exc


def _lookup(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


__all__ = [
    "LIVE_KEYS",
    "CallRuntime",
    "CommandRejected",
    "PeerFactory",
    "body_of",
    "message_of",
    "now_ms",
    "parse_command",
    "parse_value",
    "redact",
]
