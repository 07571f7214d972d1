"""Operator tools: ``edge-intercom-agent devices`` and ``edge-intercom-agent check``.

``devices`` lists what PortAudio sees, with the rates each device opens at, and marks
the ones the configuration picks. ``check`` runs one small function per check (audio
loop, broker, each STUN/TURN server, clock, disk), each returning a ``CheckResult``;
every network wait is bounded by a time limit, and a check that cannot tell says so
(``unknown``) rather than fail. The command prints a line each and exits 1 if any failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import json
import math
import secrets
import shutil
import socket
import ssl
import struct
import sys
import time
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509

import agent
from agent.audio.device import (
    AlsaCapture,
    AlsaPlayback,
    DeviceConfig,
    DeviceNotFound,
    DeviceReport,
    survey,
)
from agent.audio.format import FRAME_SAMPLES, SAMPLE_RATE
from agent.audio.looptest import LoopThresholds, analyse_loop, from_pcm, loop_signal, to_frames
from agent.net.ice import parse_turn_url
from agent.service.config import AgentConfig
from agent.service.identity import Identity, IdentityError, load_identity

Status = Literal["ok", "warn", "fail", "unknown"]


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one check."""

    name: str
    """What was checked (``audio loop``, ``broker``, ``stun 192.0.2.1:3478``, ...)."""
    status: Status
    """``fail`` makes ``check`` exit non-zero; ``warn`` and ``unknown`` do not."""
    detail: str
    """One line for people: what was measured, or why it failed."""

    def line(self) -> str:
        return f"{self.status.upper():<7} {self.name}: {self.detail}"


# -- audio loop ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoopSettings(LoopThresholds):
    """The audio loop test: a sweep played on the speaker, looked for in the microphone
    (``agent.audio.looptest``)."""

    sweep_s: float = 0.5
    """Length of the sweep (300 Hz to 3 kHz, where any speaker and mic meet)."""
    amplitude: float = 0.3
    """Sweep amplitude, fraction of full scale (-10.5 dBFS)."""
    listen_s: float = 1.0
    """The microphone is recorded this long after the sweep: the longest delay found."""
    timeout_s: float = 10.0
    """Whole test, device opening included (a PulseAudio capture starts after ~2 s)."""


async def check_audio_loop(
    capture: DeviceConfig, playback: DeviceConfig, settings: LoopSettings = LoopSettings()
) -> CheckResult:
    """Play a sweep on ``playback`` and look for it on ``capture``."""
    played = loop_signal(settings.sweep_s, settings.amplitude)
    pcm = to_frames(played.samples)
    frames = len(pcm) + math.ceil(settings.listen_s * SAMPLE_RATE / FRAME_SAMPLES)
    mic, speaker = AlsaCapture(capture), AlsaPlayback(playback)
    try:
        async with asyncio.timeout(settings.timeout_s):
            await mic.start()
            await speaker.start()
            await mic.read()  # the microphone delivers: from here on, time is shared
            mic.discard_pending()
            recording = asyncio.ensure_future(_record(mic, frames))
            try:
                for frame in pcm:
                    await speaker.write(frame)
                heard = await recording
            finally:
                recording.cancel()
    except TimeoutError:
        return CheckResult("audio loop", "fail", f"devices silent for {settings.timeout_s:.0f} s")
    except (DeviceNotFound, OSError) as exc:
        return CheckResult("audio loop", "fail", str(exc))
    finally:
        await speaker.close()
        await mic.close()
    result = analyse_loop(from_pcm(heard), played, settings)
    return CheckResult("audio loop", "ok" if result.passed else "fail", result.summary())


async def _record(mic: AlsaCapture, frames: int) -> bytes:
    return b"".join([await mic.read() for _ in range(frames)])


# -- broker ---------------------------------------------------------------------------------


async def check_broker(
    host: str, port: int, tls: ssl.SSLContext | None, limit_s: float
) -> CheckResult:
    """A TCP connection to the broker and, with ``tls``, a TLS handshake that verifies it."""
    name = f"broker {host}:{port}"
    started = time.monotonic()
    try:
        async with asyncio.timeout(limit_s):
            _, writer = await asyncio.open_connection(host, port, ssl=tls)
    except TimeoutError:
        return CheckResult(name, "fail", f"no answer within {limit_s:.0f} s")
    except ConnectionRefusedError:
        return CheckResult(name, "fail", "connection refused (nothing listens there)")
    except ssl.SSLCertVerificationError as exc:
        return CheckResult(name, "fail", f"TLS certificate not trusted: {exc.verify_message}")
    except (OSError, ssl.SSLError) as exc:
        return CheckResult(name, "fail", exc.strerror or str(exc))
    took = 1000 * (time.monotonic() - started)
    ssl_object = writer.get_extra_info("ssl_object")
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(limit_s):
            await writer.wait_closed()
    if ssl_object is None:
        return CheckResult(name, "ok", f"TCP connected in {took:.0f} ms (plain MQTT: not paired)")
    return CheckResult(name, "ok", f"TLS handshake ({ssl_object.version()}) in {took:.0f} ms")


# -- STUN / TURN ------------------------------------------------------------------------------

_STUN_COOKIE = 0x2112A442
_BINDING_REQUEST, _BINDING_SUCCESS, _BINDING_ERROR = 0x0001, 0x0101, 0x0111
_XOR_MAPPED_ADDRESS = 0x0020


def stun_request() -> bytes:
    """A STUN Binding request (RFC 8489) with a random transaction id, no attributes."""
    return struct.pack("!HHI12s", _BINDING_REQUEST, 0, _STUN_COOKIE, secrets.token_bytes(12))


def stun_mapped_address(request: bytes, response: bytes) -> str | None:
    """``host:port`` from a Binding success response to ``request`` (its
    XOR-MAPPED-ADDRESS); None if it is no such response. A Binding error counts too
    (the server is there), as ``""``."""
    if len(response) < 20 or response[4:20] != request[4:20]:
        return None
    kind, length = struct.unpack_from("!HH", response)
    if kind == _BINDING_ERROR:
        return ""
    if kind != _BINDING_SUCCESS:
        return None
    offset, end = 20, min(len(response), 20 + length)
    while offset + 4 <= end:
        attr, size = struct.unpack_from("!HH", response, offset)
        value = response[offset + 4 : offset + 4 + size]
        if attr == _XOR_MAPPED_ADDRESS and len(value) >= 8:
            port = struct.unpack_from("!H", value, 2)[0] ^ (_STUN_COOKIE >> 16)
            mask = request[4:20] if value[1] == 2 else request[4:8]
            raw = bytes(a ^ b for a, b in zip(value[4:], mask, strict=False))
            family = socket.AF_INET6 if value[1] == 2 else socket.AF_INET
            address = socket.inet_ntop(family, raw)
            return f"[{address}]:{port}" if value[1] == 2 else f"{address}:{port}"
        offset += 4 + (size + 3) // 4 * 4
    return ""


class _StunClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.replies.put_nowait(data)


async def _stun_udp(host: str, port: int, request: bytes, limit_s: float) -> bytes:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(_StunClient, remote_addr=(host, port))
    try:
        async with asyncio.timeout(limit_s):
            retransmit = 0.5  # RFC 8489's RTO, doubled each time: UDP loses requests
            while True:
                transport.sendto(request)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(retransmit):
                        while True:
                            reply = await client.replies.get()
                            if stun_mapped_address(request, reply) is not None:
                                return reply
                retransmit *= 2
    finally:
        transport.close()


async def _stun_tcp(host: str, port: int, request: bytes, limit_s: float) -> bytes:
    async with asyncio.timeout(limit_s):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request)
            header = await reader.readexactly(20)
            return header + await reader.readexactly(struct.unpack_from("!H", header, 2)[0])
        finally:
            writer.close()


async def check_stun(
    kind: Literal["stun", "turn"],
    host: str,
    port: int,
    transport: Literal["udp", "tcp"],
    limit_s: float,
) -> CheckResult:
    """A STUN Binding request to a STUN or TURN server (TURN servers answer them too)."""
    name = f"{kind} {host}:{port}/{transport}"
    request = stun_request()
    exchange = _stun_udp if transport == "udp" else _stun_tcp
    try:
        reply = await exchange(host, port, request, limit_s)
    except TimeoutError:
        return CheckResult(name, "fail", f"no STUN answer within {limit_s:.0f} s")
    except (OSError, asyncio.IncompleteReadError) as exc:
        return CheckResult(name, "fail", getattr(exc, "strerror", None) or str(exc))
    mapped = stun_mapped_address(request, reply)
    if not mapped:
        return CheckResult(name, "ok", "answers STUN (with an error: needs credentials)")
    return CheckResult(name, "ok", f"answers STUN; our address seen from there: {mapped}")


# -- clock and disk -------------------------------------------------------------------------

_STA_UNSYNC = 0x0040


class _Timex(ctypes.Structure):
    # struct timex (<sys/timex.h>) up to ``status``; the rest is padding we never read.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("_rest", ctypes.c_byte * 256),
    ]


def ntp_synchronised() -> bool | None:
    """The kernel's view (what ``timedatectl``'s NTPSynchronized reports): None if it
    cannot be asked."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        adjtimex = ctypes.CDLL(name, use_errno=True).adjtimex
    except (OSError, AttributeError):
        return None
    timex = _Timex()  # modes 0: read only
    if adjtimex(ctypes.byref(timex)) < 0:
        return None
    return not timex.status & _STA_UNSYNC


def check_clock(now: float, not_before: Mapping[str, float], synced: bool | None) -> CheckResult:
    """The clock is not earlier than anything known to have happened (``not_before``:
    what to its Unix time), and whether NTP keeps it right."""
    behind = [what for what, when in not_before.items() if now < when]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    if behind:
        return CheckResult("clock", "fail", f"{stamp} is before the {', '.join(behind)}")
    if synced is None:
        return CheckResult("clock", "unknown", f"{stamp}; NTP synchronisation unknown")
    if not synced:
        return CheckResult("clock", "warn", f"{stamp}; NTP not synchronised")
    return CheckResult("clock", "ok", f"{stamp}; NTP synchronised")


def clock_bounds(identity: Identity | None) -> dict[str, float]:
    """Times the clock cannot be before: the agent's installation and, when paired, the
    start of the device certificate's validity."""
    bounds = {"agent's installation": Path(agent.__file__).stat().st_mtime}
    if identity is not None:
        cert = x509.load_pem_x509_certificate(identity.cert_path.read_bytes())
        bounds["device certificate"] = cert.not_valid_before_utc.timestamp()
    return bounds


def check_disk(
    state_dir: Path, min_free: int = 50 << 20, warn_free: int = 200 << 20
) -> CheckResult:
    """Free space where the state directory is (or would be made)."""
    where = state_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    usage = shutil.disk_usage(where)
    detail = f"{usage.free / 1e6:.0f} MB free of {usage.total / 1e9:.1f} GB at {where}"
    status: Status = "fail" if usage.free < min_free else "warn" if usage.free < warn_free else "ok"
    return CheckResult("disk", status, detail)


# -- the commands ---------------------------------------------------------------------------


async def run_checks(
    config: AgentConfig, *, limit_s: float = 5.0, audio: LoopSettings | None = LoopSettings()
) -> list[CheckResult]:
    """Every check for this configuration, run together; results in a fixed order."""
    state_dir = Path(config.state_dir)
    identity: Identity | None = None
    results: list[CheckResult] = []
    try:
        identity = await asyncio.to_thread(load_identity, state_dir)
    except IdentityError as exc:
        results.append(CheckResult("identity", "fail", str(exc)))
    checks: list[Awaitable[CheckResult]] = []
    if audio is not None:
        checks.append(check_audio_loop(config.audio.capture, config.audio.playback, audio))
    if identity is None:
        checks.append(check_broker(config.mqtt.host, config.mqtt.port, None, limit_s))
    else:
        tls = identity.mqtt_tls().context()
        checks.append(check_broker(identity.broker_host, identity.broker_port, tls, limit_s))
    checks += [check_stun("stun", s.host, s.port, "udp", limit_s) for s in config.ice.stun_servers]
    for kind, host, port, transport in _turn_servers(config, identity):
        checks.append(check_stun(kind, host, port, transport, limit_s))
    results += await asyncio.gather(*checks)
    results.append(check_clock(time.time(), clock_bounds(identity), ntp_synchronised()))
    results.append(check_disk(state_dir))
    return results


def _turn_servers(
    config: AgentConfig, identity: Identity | None
) -> list[tuple[Literal["turn"], str, int, Literal["udp", "tcp"]]]:
    """The configured TURN servers and those pairing named, each once; ``turns:`` ones are
    left out (the agent does not use them)."""
    found = [(t.host, t.port, t.transport) for t in config.ice.turn_servers]
    for entry in identity.turn if identity is not None else ():
        urls = entry.get("urls", [])
        for url in [urls] if isinstance(urls, str) else urls:
            with contextlib.suppress(ValueError):
                scheme, host, port, transport = parse_turn_url(url)
                if scheme == "turn":
                    found.append((host, port, transport))
    return [("turn", *server) for server in dict.fromkeys(found)]


async def check_command(config: AgentConfig, *, limit_s: float, audio: bool) -> int:
    """``check``: a line per check on stdout; 1 if any failed."""
    results = await run_checks(config, limit_s=limit_s, audio=LoopSettings() if audio else None)
    for result in results:
        print(result.line())
    return 1 if any(r.status == "fail" for r in results) else 0


def devices_command(config: AgentConfig, *, as_json: bool) -> int:
    """``devices``: every audio device, marked ``<`` where the configuration picks it."""
    reports = survey(config.audio.capture, config.audio.playback)
    if as_json:
        json.dump([_device_json(r) for r in reports], sys.stdout, indent=1)
        print()
        return 0
    print(_device_table(reports))
    for kind, device in (("capture", config.audio.capture), ("playback", config.audio.playback)):
        if not any(kind in r.selected_for for r in reports):
            print(f"no {kind} device matches {device.name!r}")
    return 0


def _device_json(report: DeviceReport) -> dict[str, object]:
    return {
        **dataclasses.asdict(report.device),
        "capture_rates": list(report.capture_rates),
        "playback_rates": list(report.playback_rates),
        "selected_for": list(report.selected_for),
    }


def _rates(rates: Iterable[int]) -> str:
    return ",".join(f"{r // 1000}.{r % 1000 // 100}k".replace(".0k", "k") for r in rates) or "-"


def _device_table(reports: list[DeviceReport]) -> str:
    rows = [("#", "name", "in", "out", "default", "capture rates", "playback rates", "selected")]
    rows += [
        (
            str(r.device.index),
            r.device.name,
            str(r.device.max_input_channels),
            str(r.device.max_output_channels),
            str(r.device.default_rate),
            _rates(r.capture_rates),
            _rates(r.playback_rates),
            " ".join(f"<{kind}" for kind in r.selected_for),
        )
        for r in reports
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
