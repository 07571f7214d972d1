"""Composition root: builds the agent's parts from config and owns their lifetime.

``run`` is the long-running mode: the device's MQTT session, the call runtime and the
audio ends opened once, until SIGTERM/SIGINT. Its identity (device id, broker, TLS
certificate) comes from pairing (``agent.service.identity``); an unpaired board waits
for ``pair`` to give it one, and SIGHUP makes a running agent start over with the
identity on disk. ``pair`` redeems a pairing token (``tools/pair-device``). ``call``
runs one call whose offer, answer and candidates travel as JSON lines on stdin/stdout
(tests, benchmarks, NAT labs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import enum
import functools
import json
import logging
import os
import pwd
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.audio.base import AudioSink, AudioSource, EndOfStream
from agent.audio.device import AlsaCapture, AlsaPlayback, DeviceNotFound
from agent.audio.frontend import AudioFrontend
from agent.audio.gain import AudioControls, GainSink, MutableSource
from agent.audio.tee import CaptureTee
from agent.calls.machine import CallConfig, CallMachine, Indicator
from agent.calls.runtime import CallRuntime
from agent.edge.listener import EdgeListener
from agent.edge.outbox import OUTBOX_FILE, Outbox
from agent.edge.pipeline import EdgeAnalyzer
from agent.edge.recorder import ClipRecorder, RelayClipKey
from agent.edge.uplink import AlertUplink
from agent.gpio.board import GpioBoard
from agent.media import sdp
from agent.media.dtls import DtlsCertificate
from agent.media.peer import CallSetupError, MediaPeer, PeerConfig
from agent.media.session import EndReason, MediaSession
from agent.net.candidate import Candidate, CandidateError
from agent.net.ice import TurnServer
from agent.pairing.client import PID_FILE, AlreadyPaired, PairingFailed, pair
from agent.service.config import UNPAIRED, AgentConfig, ConfigError, config_path, load_config
from agent.service.files import write_atomic
from agent.service.identity import Identity, IdentityError, load_identity
from agent.service.led import StatusLed
from agent.service.notifier import ServiceNotifier
from agent.service.selftest import SelfTestScheduler
from agent.service.status import AgentStatus
from agent.service.systemd import LOG_TARGETS, journal_fields, setup_logging
from agent.service.telemetry import TelemetryReporter
from agent.signaling.messages import (
    MAX_MESSAGE_BYTES,
    Description,
    Hangup,
    RemoteCandidate,
    Signal,
    SignalError,
    from_json,
    to_json,
)
from agent.signaling.mqtt import ConnectFailed, MqttConfig, MqttSession, Outage
from agent.signaling.signing import Signing

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CallOptions:
    """What ``edge-intercom-agent call`` was asked to do."""

    offerer: bool
    trickle: bool
    source: str
    sink: str
    duration: float | None
    stats_interval: float
    setup_timeout: float


async def _open_source(spec: str, config: AgentConfig) -> AudioSource:
    """``device`` (the configured microphone), ``wav:PATH`` or ``tone:HZ``; all paced."""
    kind, _, arg = spec.partition(":")
    if kind == "device":
        capture = AlsaCapture(config.audio.capture)
        await capture.start()
        return capture
    # Test and demo sources need numpy; a board on its microphone never loads it.
    from agent.audio.sources import ToneSource, WavSource  # noqa: PLC0415

    if kind == "wav":
        return WavSource(Path(arg), paced=True)
    if kind == "tone":
        return ToneSource(float(arg or 440), paced=True)
    raise ConfigError(f"unknown source {spec!r}: use device, wav:PATH or tone:HZ")


async def _open_sink(spec: str, config: AgentConfig) -> AudioSink:
    """``device`` (the configured speaker), ``wav:PATH`` or ``null``; all paced."""
    kind, _, arg = spec.partition(":")
    if kind == "device":
        playback = AlsaPlayback(config.audio.playback)
        await playback.start()
        return playback
    from agent.audio.sources import NullSink, WavSink  # noqa: PLC0415

    if kind == "wav":
        return WavSink(Path(arg), paced=True)
    if kind == "null":
        return NullSink(paced=True)
    raise ConfigError(f"unknown sink {spec!r}: use device, wav:PATH or null")


def _frontend(
    config: AgentConfig, source_spec: str, stack: contextlib.AsyncExitStack
) -> AudioFrontend | None:
    """The call's microphone front end (echo cancellation, ...) for a real microphone;
    files and tones are clean already."""
    if source_spec != "device" or not config.audio.frontend.enabled:
        return None
    frontend = AudioFrontend(config.audio.frontend)
    stack.callback(frontend.close)
    return frontend


async def _stdin() -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=MAX_MESSAGE_BYTES + 1)
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    return reader


class PipeSignaling:
    """Signaling over this process's stdin/stdout as JSON lines (tests, demo, benchmarks).

    Outgoing messages are ``{"event": "signal", ...}`` lines among the agent's other output;
    incoming ones are read from stdin. A bad line is logged, counted and skipped.
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self.rejected = 0

    def send(self, signal: Signal) -> None:
        sys.stdout.write('{"event":"signal",' + to_json(signal)[1:] + "\n")
        sys.stdout.flush()

    async def recv(self) -> Signal:
        """The next valid message; EOFError when stdin is closed."""
        while True:
            try:
                line = await self._reader.readline()
            except ValueError:  # longer than the limit: skip to the end of that line
                self.rejected += 1
                logger.warning("signal rejected: message too long")
                continue
            if not line:
                raise EOFError("signaling pipe closed")
            try:
                return from_json(line)
            except SignalError as exc:
                self.rejected += 1
                logger.warning("signal rejected: %s", exc)


async def _negotiate(
    peer: MediaPeer, signaling: PipeSignaling, opts: CallOptions, trickle: Callable[[], None]
) -> None:
    """Offer/answer over the pipe, calling ``trickle`` once our description is out;
    candidates that come early wait for the description."""
    early: list[RemoteCandidate] = []
    if opts.offerer:
        signaling.send(Description("offer", await peer.create_offer(trickle=opts.trickle)))
        trickle()
    while True:
        signal = await signaling.recv()
        if isinstance(signal, Hangup):
            raise CallSetupError(f"peer hung up during setup: {signal.reason}")
        if isinstance(signal, RemoteCandidate):
            early.append(signal)
            continue
        if signal.kind == "answer" and opts.offerer:
            await peer.accept_answer(signal.sdp)
            break
        if signal.kind == "offer" and not opts.offerer:
            answer = await peer.accept_offer(signal.sdp, trickle=opts.trickle)
            signaling.send(Description("answer", answer))
            trickle()
            break
        logger.warning("ignored unexpected %s", signal.kind)
    for candidate in early:
        await _add_candidate(peer, candidate)


async def _add_candidate(peer: MediaPeer, signal: RemoteCandidate) -> None:
    try:
        candidate = None if signal.candidate is None else Candidate.parse(signal.candidate)
    except CandidateError as exc:
        logger.warning("skipped remote candidate: %s", exc)  # one bad one must not end a call
        return
    await peer.add_remote_candidate(candidate)


async def _trickle(peer: MediaPeer, signaling: PipeSignaling) -> None:
    async for candidate in peer.local_candidates():
        signaling.send(RemoteCandidate(candidate.to_sdp()))
    signaling.send(RemoteCandidate(None))


async def _follow(peer: MediaPeer, signaling: PipeSignaling, hangup: asyncio.Event) -> None:
    """After the offer/answer: remote candidates, and the peer's hang-up."""
    try:
        while True:
            signal = await signaling.recv()
            if isinstance(signal, RemoteCandidate):
                await _add_candidate(peer, signal)
            elif isinstance(signal, Hangup):
                hangup.set()
                return
    except EOFError:
        return  # no more signaling; the media path decides how the call ends


async def run_call(config: AgentConfig, opts: CallOptions) -> EndReason:
    """One call: signaling over the pipe, then until hang-up (signal, duration, peer) or
    media loss."""
    certificate = await asyncio.to_thread(
        DtlsCertificate.load_or_create, Path(config.state_dir) / "dtls", config.device_id
    )
    peer_config = PeerConfig(ice=config.ice, media=config.media, dtls=config.dtls)
    call_id = f"{config.device_id}/pipe"
    loop = asyncio.get_running_loop()
    hangup = asyncio.Event()
    tasks: list[asyncio.Task[object]] = []
    signaling = PipeSignaling(await _stdin())
    async with contextlib.AsyncExitStack() as stack:
        # Closed in reverse order, whatever fails on the way.
        source = await _open_source(opts.source, config)
        stack.push_async_callback(source.close)
        sink = await _open_sink(opts.sink, config)
        stack.push_async_callback(sink.close)
        if (frontend := _frontend(config, opts.source, stack)) is not None:
            source, sink = frontend.source(source), frontend.tap(sink)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, hangup.set)
            stack.callback(loop.remove_signal_handler, sig)
        peer = MediaPeer(peer_config, certificate, source, sink, call_id=call_id)
        stack.push_async_callback(peer.close)  # on any failure below; else a no-op
        try:
            setup_started = loop.time()

            def trickle() -> None:
                if opts.trickle:
                    tasks.append(loop.create_task(_trickle(peer, signaling), name="trickle"))

            async with asyncio.timeout(opts.setup_timeout):
                await _negotiate(peer, signaling, opts, trickle)
                tasks.append(loop.create_task(_follow(peer, signaling, hangup), name="signals"))
                session = await peer.connect()
            pair = peer.ice.selected_pair if peer.ice is not None else None
            _emit({
                "event": "connected",
                "setup_ms": round(1000 * (loop.time() - setup_started), 1),
                "local_candidate": pair.local.type if pair else None,
                "remote_candidate": pair.remote.type if pair else None,
            })  # fmt: skip
            tasks.append(loop.create_task(_print_stats(session, opts.stats_interval), name="stats"))
            waits = [
                loop.create_task(session.ended(), name="session-ended"),
                loop.create_task(hangup.wait(), name="hangup"),
            ]
            if opts.duration is not None:
                waits.append(loop.create_task(asyncio.sleep(opts.duration), name="duration"))
            tasks += waits
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            reason = await peer.close()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    _emit({"event": "ended", "reason": reason.name, **asdict(session.stats)})
    return reason


PAIRING_POLL_S = 1.0
"""An unpaired agent looks for an identity this often (besides waking on SIGHUP)."""


def mqtt_config(config: AgentConfig, identity: Identity | None = None) -> MqttConfig:
    """The device session: to the broker pairing named, over TLS with the device's
    certificate; without an identity, plain TCP to ``mqtt.host`` (loopback labs)."""
    m = config.mqtt
    if identity is None:
        return m.mqtt_config(config.device_id, m.host, m.port)
    connection = m.mqtt_config(identity.device_id, identity.broker_host, identity.broker_port)
    return dataclasses.replace(connection, tls=identity.mqtt_tls())


def call_machine(config: AgentConfig) -> CallMachine:
    c = config.calls
    return CallMachine(
        CallConfig(
            device_id=config.device_id,
            invite_timeout_s=c.invite_timeout_s,
            answer_timeout_s=c.answer_timeout_s,
            ring_timeout_s=c.ring_timeout_s,
            connect_timeout_s=c.connect_timeout_s,
            max_active_s=c.max_active_s,
            ended_hold_s=c.ended_hold_s,
        ),
        c.policy(),
    )


async def _connect(
    session: MqttSession, config: AgentConfig, stop: asyncio.Event, service: _Service
) -> bool:
    """Start the session, retrying until connected (True) or asked to stop (False)."""
    delay = config.mqtt.backoff_min
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        try:
            await session.start()
            service.status.connect_outage = None
            return True
        except ConnectFailed as exc:
            logger.warning("device %s: %s; retrying in %.1fs", config.device_id, exc, delay)
            service.status.connect_outage = Outage(exc.reason, loop.time() + delay)
            service.notifier.refresh()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await stop.wait()
        delay = min(config.mqtt.backoff_max, delay * 2)
    return False


class Ending(enum.Enum):
    STOP = "stop"
    """SIGTERM/SIGINT: the process ends."""
    RELOAD = "reload"
    """SIGHUP: start over with the identity on disk (pairing gave a new one)."""


class _Signals:
    """SIGTERM/SIGINT and SIGHUP as events the run loop waits for."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.reload = asyncio.Event()

    async def wait(self) -> Ending:
        waiters = [asyncio.ensure_future(e.wait()) for e in (self.stop, self.reload)]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        if self.stop.is_set():
            return Ending.STOP
        self.reload.clear()
        return Ending.RELOAD


@dataclass(frozen=True, slots=True)
class _Service:
    """``run`` as a service: the status it tells systemd, the notifier sending it, and the
    file SIGHUP reloads the configuration from."""

    status: AgentStatus
    notifier: ServiceNotifier
    config_file: Path | None


async def run_agent(
    config: AgentConfig, source_spec: str, sink_spec: str, config_file: Path | None = None
) -> int:
    """Calls through the relay until SIGTERM/SIGINT; then hang up and go offline. SIGHUP
    reloads ``config_file`` (and the identity on disk): see ``_reload``."""
    loop = asyncio.get_running_loop()
    signals = _Signals()
    status = AgentStatus(loop.time)
    service = _Service(status, ServiceNotifier(status.describe), config_file)
    state_dir = Path(config.state_dir)
    pid_file = state_dir / PID_FILE
    await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
    write_atomic(pid_file, f"{os.getpid()}\n".encode(), 0o644)

    def stop() -> None:
        service.notifier.stopping("stopping: ending calls, sending the last alerts")
        signals.stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGHUP, signals.reload.set)
    service.notifier.start()
    try:
        while True:
            identity = await _identity(config, signals, service)
            if identity is None and config.device_id == UNPAIRED:
                return 0  # stopped while waiting for pairing
            online = config
            if identity is not None:
                online = dataclasses.replace(config, device_id=identity.device_id)
            with journal_fields(DEVICE_ID=online.device_id):
                ending = await _serve(
                    online, identity, source_spec, sink_spec, signals=signals, service=service
                )
            if ending is Ending.STOP:
                return 0
            logger.info("reloading: starting over with the identity on disk")
            service.notifier.reloading("reloading: starting over with the identity on disk")
            config = await _reread(service.config_file, config)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        pid_file.unlink(missing_ok=True)
        await service.notifier.close()


async def _identity(config: AgentConfig, signals: _Signals, service: _Service) -> Identity | None:
    """The paired identity; else, for a board configured with a device id, None (plain
    lab broker); else wait until pairing gives one (None if stopped meanwhile)."""
    state_dir = Path(config.state_dir)
    announced = False
    while not signals.stop.is_set():
        try:
            identity = await asyncio.to_thread(load_identity, state_dir)
        except IdentityError as exc:
            identity = None
            logger.error("%s", exc)
        if identity is not None or config.device_id != UNPAIRED:
            return identity
        if not announced:
            logger.warning("not paired: run tools/pair-device TOKEN on this board")
            service.status.phase = "not paired: run tools/pair-device TOKEN on this board"
            service.notifier.refresh()
            announced = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PAIRING_POLL_S):
                await signals.wait()
    return None


async def _serve(
    config: AgentConfig,
    identity: Identity | None,
    source_spec: str,
    sink_spec: str,
    *,
    signals: _Signals,
    service: _Service,
) -> Ending:
    """The board online: audio, session, alerts and calls, until a signal ends it."""
    signing = None
    if identity is not None:
        signing = await asyncio.to_thread(Signing.load, identity.key_path, identity.ca_path)
    device_cert = await _certificate(identity)
    certificate = await asyncio.to_thread(
        DtlsCertificate.load_or_create, Path(config.state_dir) / "dtls", config.device_id
    )
    async with contextlib.AsyncExitStack() as stack:
        # Mute and volume act on these wrappers, so they hold in and between calls.
        controls = AudioControls(volume=config.audio.volume)
        device = await _open_source(source_spec, config)
        stack.push_async_callback(device.close)
        speaker = await _open_sink(sink_spec, config)
        frontend = _frontend(config, source_spec, stack)
        # The front end's echo reference is what the speaker plays: after the volume.
        sink = GainSink(speaker if frontend is None else frontend.tap(speaker), controls)
        stack.push_async_callback(sink.close)
        presence = {"state": "online", "board": config.board, "version": "0.1.0"}
        session = MqttSession(mqtt_config(config, identity), presence)
        stack.push_async_callback(session.close)
        # Alerts wait in the outbox until the relay has stored them (acked): the detectors
        # listen from here on, also while the broker cannot be reached.
        outbox = await Outbox.open(
            Path(config.state_dir) / OUTBOX_FILE, capacity=config.alerts.outbox_capacity
        )
        stack.push_async_callback(outbox.close)
        uplink = AlertUplink(session, outbox, config.alerts)
        uplink.start()
        stack.push_async_callback(uplink.close)
        # The tamper switch too: an enclosure opened while the network is cut still tells.
        gpio = await GpioBoard.open(config.device_id, config.profile.gpio, config.gpio)
        stack.push_async_callback(gpio.close)
        gpio.watch_tamper(uplink.submit)
        # The detectors hear the microphone whether or not a call is up, muted or not.
        # The relay's clip key comes on its retained config; clips are sealed to it.
        clip_key = await asyncio.to_thread(RelayClipKey, config.device_id, Path(config.state_dir))
        clips = config.alerts.clip
        recorder = ClipRecorder(config.device_id, clips, clip_key) if clips.enabled else None
        listener = EdgeListener(config.device_id, config.edge, uplink, recorder)
        stack.push_async_callback(listener.close)
        tee = CaptureTee(device, listener.on_frame)
        tee.start()
        stack.push_async_callback(tee.close)
        service.status.broker = f"{session.config.host}:{session.config.port}"
        service.status.phase = f"connecting to the broker at {service.status.broker}"
        service.notifier.refresh()
        connected = asyncio.ensure_future(_connect(session, config, signals.stop, service))
        ending = asyncio.ensure_future(signals.wait())
        stack.callback(ending.cancel)
        await asyncio.wait([connected, ending], return_when=asyncio.FIRST_COMPLETED)
        if not connected.done() or not connected.result():
            connected.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connected
            return await ending
        # Mute and volume act on these wrappers, so they hold in and between calls.
        source = MutableSource(tee if frontend is None else frontend.source(tee), controls)

        def make_peer(
            call_id: str, direction: sdp.Direction, turn: tuple[TurnServer, ...]
        ) -> MediaPeer:
            ice = dataclasses.replace(config.ice, turn_servers=turn + config.ice.turn_servers)
            peer_config = PeerConfig(
                ice=ice, media=config.media, dtls=config.dtls, direction=direction
            )
            return MediaPeer(
                peer_config, certificate, source, sink, call_id=f"{config.device_id}/{call_id[:8]}"
            )

        led = gpio.led if config.status_led is None else StatusLed(Path(config.status_led))
        runtime = CallRuntime(
            session,
            call_machine(config),
            make_peer,
            controls=controls,
            speaker=sink,
            config=config,
            presence=presence,
            led=led,
            signing=signing,
            door=gpio.door,
        )
        if led is not None:
            stack.push_async_callback(led.close)  # off: the board is offline
        runtime.on_alert_ack = uplink.on_ack
        runtime.on_config = clip_key.on_config
        # Closed first (``_stop_serving``): the runtime hangs up, the microphone's readers
        # stop, the relay acks the last alerts; then the session goes offline, audio closes.
        await runtime.start()
        stack.push_async_callback(runtime.close)
        gpio.watch_button(runtime.local_command, lambda: runtime.machine.phase)
        stack.push_async_callback(_stop_serving, runtime, tee, listener, uplink, config)
        # The self-test plays through the runtime (a call stops it) and hears through a tap.
        selftest = SelfTestScheduler(
            config.device_id,
            config.selftest,
            play=runtime.play,
            tap=tee.tap,
            busy=lambda: runtime.machine.state.live is not None,
            publish=runtime.telemetry,
            submit=uplink.submit,
        )
        runtime.selftest = selftest.run_now
        selftest.start()
        stack.push_async_callback(selftest.close)
        telemetry = TelemetryReporter(
            config.device_id,
            config.telemetry,
            session,
            sound=listener.take_levels,
            media=runtime.live_media,
            pending=outbox.count,
        )
        telemetry.start()
        stack.push_async_callback(telemetry.close)
        _watch(service, config.service.stall_s, tee=tee, outbox=outbox, audio=(device, speaker))
        stack.callback(service.notifier.clear_checks)
        service.status.session = session

        def on_indicator(indicator: Indicator, peer: str | None) -> None:
            service.status.indicator, service.status.peer = indicator, peer
            service.notifier.refresh()

        runtime.on_indicator = on_indicator
        service.notifier.ready()
        logger.info(
            "device %s: online at %s:%d%s",
            config.device_id,
            session.config.host,
            session.config.port,
            "" if identity is not None else " (plain MQTT: not paired, labs only)",
        )
        result = await ending
        while result is Ending.RELOAD:
            running = await _reload(config, (identity, device_cert), runtime, listener, service)
            if running is None:
                break  # a new identity: start over with it
            config = running
            service.notifier.ready()
            result = await signals.wait()
        logger.info("device %s: stopping", config.device_id)
        service.status.session = None
    return result


async def _reread(config_file: Path | None, running: AgentConfig) -> AgentConfig:
    """The configuration as the files say now; the running one if they are broken."""
    try:
        return await asyncio.to_thread(load_config, config_file)
    except ConfigError as exc:
        logger.error("reload: %s; the running configuration stays", exc)
        return running


async def _reload(
    config: AgentConfig,
    paired: tuple[Identity | None, bytes | None],
    runtime: CallRuntime,
    listener: EdgeListener,
    service: _Service,
) -> AgentConfig | None:
    """SIGHUP while online. A new identity on disk (pairing) needs a fresh start: None.
    Else the configuration files are read again: the call policy, the volume and the
    detector settings change at once, and the log names the keys that wait for a restart
    (``systemctl restart edge-intercom-agent``). ``paired``: the identity the agent runs
    with and its certificate's bytes when it started. Returns the configuration in effect."""
    service.notifier.reloading("reloading the configuration")
    identity, certificate = paired
    try:
        on_disk = await asyncio.to_thread(load_identity, Path(config.state_dir))
    except IdentityError as exc:
        logger.error("reload: %s; the running identity stays", exc)
        on_disk = identity
    if on_disk != identity or await _certificate(on_disk) != certificate:
        return None
    new = await _reread(service.config_file, config)
    new = dataclasses.replace(new, device_id=config.device_id)  # pairing's, not the file's
    applied, waiting = runtime.reconfigure(new)
    listener.reconfigure(new.edge)
    logger.info("device %s: configuration reloaded; applied: %s", config.device_id,
                ", ".join(applied) or "nothing changed")  # fmt: skip
    if waiting:
        logger.warning("device %s: these keys take effect after a restart: %s",
                       config.device_id, ", ".join(waiting))  # fmt: skip
    return new


async def _certificate(identity: Identity | None) -> bytes | None:
    """The device certificate's bytes: pairing again under the same id replaces them."""
    if identity is None:
        return None
    try:
        return await asyncio.to_thread(identity.cert_path.read_bytes)
    except OSError:
        return None


def _watch(
    service: _Service,
    stall_s: float,
    *,
    tee: CaptureTee,
    outbox: Outbox,
    audio: tuple[AudioSource, AudioSink],
) -> None:
    """The health checks behind the watchdog pings (see ``ServiceNotifier``)."""
    notifier = service.notifier
    notifier.add_check("microphone", lambda: tee.health(stall_s))
    notifier.add_check("outbox", lambda: outbox.health(stall_s))
    for name, end in zip(("capture device", "playback device"), audio, strict=True):
        if isinstance(end, AlsaCapture | AlsaPlayback):
            notifier.add_check(name, functools.partial(end.health, stall_s))


async def _stop_serving(
    runtime: CallRuntime,
    tee: CaptureTee,
    listener: EdgeListener,
    uplink: AlertUplink,
    config: AgentConfig,
) -> None:
    """SIGTERM's order: hang up (the peer hears ``shutdown`` at once), stop the detectors
    (their last alerts go into the outbox), then give the relay a moment to acknowledge
    what the outbox holds; the rest waits there for the next start."""
    await runtime.end_calls()
    await tee.close()
    await listener.close()
    left = await uplink.drain(config.service.stop_flush_s)
    if left:
        logger.warning("device %s: %d alert(s) not acknowledged yet: kept in the outbox",
                       config.device_id, left)  # fmt: skip


async def analyze_wav(config: AgentConfig, path: Path) -> int:
    """``analyze``: the board's detectors (``[edge]`` of the config) over a recording, as
    fast as they go; one JSON object per detection on stdout."""
    from agent.audio.sources import WavSource  # noqa: PLC0415 - numpy and soxr for files only

    source = WavSource(path)
    analyzer = EdgeAnalyzer(config.edge)
    try:
        while True:
            try:
                frame = await source.read()
            except EndOfStream:
                break
            for found in analyzer.feed(frame):
                _emit(
                    {
                        "detector": found.detector,
                        "kind": found.kind,
                        "start_s": round(found.start_s, 2),
                        "end_s": round(found.end_s, 2),
                        "confidence": round(found.confidence, 3),
                        "level_dbfs": round(found.level_dbfs, 1),
                        "detail": found.detail,
                    }
                )
    finally:
        await source.close()
    return 0


def pair_board(config: AgentConfig, token: str, *, force: bool, user: str | None) -> int:
    """``pair``: redeem the token, asking before replacing an identity on a terminal."""
    state_dir = Path(config.state_dir)
    owner = None
    if user is not None:
        entry = pwd.getpwnam(user)
        owner = (entry.pw_uid, entry.pw_gid)
    try:
        try:
            done = pair(token, state_dir, force=force, owner=owner)
        except AlreadyPaired as exc:
            if not sys.stdin.isatty():
                raise PairingFailed(f"{exc}: run again with --force to replace it") from None
            answer = input(f"{exc}. Replace it? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("left as it was", file=sys.stderr)
                return 1
            done = pair(token, state_dir, force=True, owner=owner)
    except PairingFailed as exc:
        print(f"pairing failed: {exc}", file=sys.stderr)
        return 1
    told = {
        "signalled": "the running agent is picking it up",
        "restarted": "the agent service was restarted",
        "not-running": "start the agent: edge-intercom-agent run",
    }[done.agent_told]
    print(f"paired as {done.identity.device_id}: {told}")
    return 0


def _emit(record: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def _print_stats(session: MediaSession, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        _emit({"event": "stats", **asdict(session.stats)})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-intercom-agent", description=__doc__)
    parser.add_argument("--config", type=Path, help="agent TOML file (board profile + overrides)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--log-target", choices=LOG_TARGETS, default="auto",
        help="auto: the journal when systemd connects stderr to it (structured fields)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    devices = sub.add_parser(
        "devices", help="list audio devices, their rates, and the ones the config picks"
    )
    devices.add_argument("--json", action="store_true", help="a JSON array, for scripts")
    check = sub.add_parser("check", help="self-test: audio loop, broker, STUN/TURN, clock, disk")
    check.add_argument("--timeout", type=float, default=5.0, help="seconds per network check")
    check.add_argument("--no-audio", action="store_true", help="skip the audio loop test")
    call = sub.add_parser(
        "call", help="one call, signaled as JSON lines on stdin/stdout (tests, demo)"
    )
    call.add_argument("--role", choices=("offerer", "answerer"), required=True)
    call.add_argument(
        "--no-trickle", action="store_true", help="put every candidate into the SDP instead"
    )
    call.add_argument("--setup-timeout", type=float, default=30.0)
    call.add_argument("--source", default="device", help="device | wav:PATH | tone:HZ")
    call.add_argument("--sink", default="device", help="device | wav:PATH | null")
    call.add_argument("--duration", type=float, help="hang up after this many seconds")
    call.add_argument("--stats-interval", type=float, default=1.0)
    run = sub.add_parser("run", help="stay online and make calls through the relay")
    run.add_argument("--source", default="device", help="device | wav:PATH | tone:HZ")
    run.add_argument("--sink", default="device", help="device | wav:PATH | null")
    analyze = sub.add_parser(
        "analyze", help="run the edge detectors over a recording; one JSON line per detection"
    )
    analyze.add_argument("wav", type=Path, help="16-bit WAV, any rate, mono or stereo")
    pair_cmd = sub.add_parser("pair", help="join a fleet with a pairing token from the relay")
    pair_cmd.add_argument("token", help="the token (eipair1. ...)")
    pair_cmd.add_argument("--force", action="store_true", help="replace an existing identity")
    pair_cmd.add_argument("--state-dir", help="state directory (overrides the config's)")
    pair_cmd.add_argument("--user", help="the service user who must read the identity")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level, args.log_target)
    try:
        config = load_config(config_path(args.config))
        if args.command in ("devices", "check"):
            # numpy and the checks only for these operator commands.
            from agent.service.check import check_command, devices_command  # noqa: PLC0415

            if args.command == "devices":
                return devices_command(config, as_json=args.json)
            return asyncio.run(check_command(config, limit_s=args.timeout, audio=not args.no_audio))
        if args.command == "run":
            return asyncio.run(run_agent(config, args.source, args.sink, config_path(args.config)))
        if args.command == "analyze":
            return asyncio.run(analyze_wav(config, args.wav))
        if args.command == "pair":
            if args.state_dir is not None:
                config = dataclasses.replace(config, state_dir=args.state_dir)
            return pair_board(config, args.token, force=args.force, user=args.user)
        opts = CallOptions(
            offerer=args.role == "offerer",
            trickle=not args.no_trickle,
            source=args.source,
            sink=args.sink,
            duration=args.duration,
            stats_interval=args.stats_interval,
            setup_timeout=args.setup_timeout,
        )
        asyncio.run(run_call(config, opts))
    except (ConfigError, DeviceNotFound, OSError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    except (CallSetupError, TimeoutError, EOFError) as exc:
        logger.error("call setup failed: %s", exc or "timed out")
        _emit({"event": "failed", "reason": str(exc) or "setup timed out"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
