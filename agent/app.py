"""Composition root: builds the agent's parts from config and owns their lifetime.

For now the agent runs one direct call (``call``) with pre-shared SRTP keys;
signaling, ICE and DTLS-SRTP plug in here in later issues.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.audio.base import AudioSink, AudioSource
from agent.audio.device import AlsaCapture, AlsaPlayback, DeviceNotFound
from agent.audio.pyaudio_backend import list_devices
from agent.media.session import EndReason, MediaSession
from agent.media.srtp import PresharedKeying, SrtpProfile
from agent.net.transport import Address, UdpTransport
from agent.service.config import AgentConfig, ConfigError, load_config

logger = logging.getLogger(__name__)


def _address(text: str) -> Address:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


@dataclass(frozen=True, slots=True)
class CallOptions:
    """What ``edge-intercom-agent call`` was asked to do."""

    bind: Address
    peer: Address
    psk_file: Path
    offerer: bool
    profile: SrtpProfile
    source: str
    sink: str
    duration: float | None
    stats_interval: float


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


async def run_call(config: AgentConfig, opts: CallOptions) -> EndReason:
    """One call until hang-up (signal or duration), a BYE from the peer, or media loss."""
    secret = opts.psk_file.read_bytes().strip()
    keying = PresharedKeying.from_secret(secret, offerer=opts.offerer, profile=opts.profile)
    loop = asyncio.get_running_loop()
    hangup = asyncio.Event()
    tasks: list[asyncio.Task[object]] = []
    async with contextlib.AsyncExitStack() as stack:
        # Closed in reverse order, whatever fails on the way.
        transport = await UdpTransport.bind(*opts.bind)
        stack.push_async_callback(transport.close)
        transport.connect(opts.peer)
        source = await _open_source(opts.source, config)
        stack.push_async_callback(source.close)
        sink = await _open_sink(opts.sink, config)
        stack.push_async_callback(sink.close)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, hangup.set)
            stack.callback(loop.remove_signal_handler, sig)
        session = MediaSession(
            transport, keying, source, sink, config.media, call_id=f"{config.device_id}/direct"
        )
        try:
            await session.start()
            stack.push_async_callback(session.close)  # on any failure below; else a no-op
            tasks.append(loop.create_task(_print_stats(session, opts.stats_interval), name="stats"))
            waits = [
                loop.create_task(session.ended(), name="session-ended"),
                loop.create_task(hangup.wait(), name="hangup"),
            ]
            if opts.duration is not None:
                waits.append(loop.create_task(asyncio.sleep(opts.duration), name="duration"))
            tasks += waits
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            reason = await session.close()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    _emit({"event": "ended", "reason": reason.name, **asdict(session.stats)})
    return reason


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
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("devices", help="list the audio devices PortAudio sees")
    call = sub.add_parser("call", help="one direct call with pre-shared SRTP keys")
    call.add_argument("--bind", type=_address, default=("127.0.0.1", 0))
    call.add_argument("--peer", type=_address, required=True)
    call.add_argument("--psk-file", type=Path, required=True, help="file holding the secret")
    call.add_argument("--role", choices=("offerer", "answerer"), required=True)
    call.add_argument(
        "--srtp-profile", choices=[p.name for p in SrtpProfile], default="AEAD_AES_128_GCM"
    )
    call.add_argument("--source", default="device", help="device | wav:PATH | tone:HZ")
    call.add_argument("--sink", default="device", help="device | wav:PATH | null")
    call.add_argument("--duration", type=float, help="hang up after this many seconds")
    call.add_argument("--stats-interval", type=float, default=1.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(args.config)
        if args.command == "devices":
            for dev in list_devices():
                print(dev)
            return 0
        opts = CallOptions(
            bind=args.bind,
            peer=args.peer,
            psk_file=args.psk_file,
            offerer=args.role == "offerer",
            profile=SrtpProfile[args.srtp_profile],
            source=args.source,
            sink=args.sink,
            duration=args.duration,
            stats_interval=args.stats_interval,
        )
        asyncio.run(run_call(config, opts))
    except (ConfigError, DeviceNotFound, OSError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
