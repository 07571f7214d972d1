"""An aiortc<->aiortc audio call between two processes, the yardstick of the media benchmark.

``python -m tools.lab.aiortc_call --role offerer|answerer --wav PATH --duration S`` is
one side: an aiortc RTCPeerConnection that sends the WAV (48 kHz mono int16, looped,
paced in real time) with aiortc's default Opus settings and reads, and so decodes,
every frame of the other side's audio. Host candidates are on 127.0.0.1 only, like
the agents' in the benchmark, and DTLS-SRTP is on (aiortc cannot turn it off).

Signaling is JSON lines, as with ``agent.app call``: a side prints
``{"event": "signal", "type": "offer"|"answer", "sdp": ...}`` and reads the other's
signal (the same object without ``event``) on stdin. It then prints
``{"event": "connected"}`` once audio arrives, and after ``--duration`` seconds
``{"event": "ended", "frames_received": ..., "packets_sent": ..., "packets_received": ...}``
(or ``{"event": "failed", "reason": ...}``) and exits. :class:`AiortcCall` runs both
sides and carries their signals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import aioice.ice

from agent.audio.format import SAMPLE_RATE
from tools.lab.aiortc_peer import AiortcPeer, LoopTrack
from tools.lab.virtual_audio import read_wav


def _loopback_only(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return ["127.0.0.1"]


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def _stdin() -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    return reader


async def _signal(reader: asyncio.StreamReader, kind: str) -> str:
    """The SDP of the next line on stdin, which must be a signal of type ``kind``."""
    line = await reader.readline()
    if not line:
        raise EOFError("signaling pipe closed")
    signal = json.loads(line)
    if signal.get("type") != kind or not isinstance(signal.get("sdp"), str):
        raise ValueError(f"expected an {kind}, got {line[:80]!r}")
    return str(signal["sdp"])


async def run(role: str, wav: Path, seconds: float, setup_timeout: float) -> int:
    """One side of the call; the exit status."""
    # aioice offers every interface but loopback, and aiortc has no setting for it: swap in
    # the function aioice gathers host addresses with, in this process only.
    aioice.ice.get_host_addresses = _loopback_only
    samples, rate = read_wav(wav)
    if rate != SAMPLE_RATE:
        raise ValueError(f"{wav}: {rate} Hz, expected {SAMPLE_RATE}")
    peer = AiortcPeer(source=LoopTrack(samples), record=False)
    try:
        reader = await _stdin()
        async with asyncio.timeout(setup_timeout):
            if role == "offerer":
                _emit({"event": "signal", "type": "offer", "sdp": await peer.offer()})
                await peer.accept(await _signal(reader, "answer"))
            else:
                answer = await peer.answer(await _signal(reader, "offer"))
                _emit({"event": "signal", "type": "answer", "sdp": answer})
            await peer.first_audio
    except (TimeoutError, EOFError, ValueError) as exc:
        _emit({"event": "failed", "reason": repr(exc)})
        await peer.close()
        return 1
    _emit({"event": "connected"})
    await asyncio.sleep(seconds)
    sent, received = await peer.rtp_packets()
    frames = peer.frames_received
    await peer.close()
    _emit(
        {
            "event": "ended",
            "frames_received": frames,
            "packets_sent": sent,
            "packets_received": received,
        }
    )
    return 0


class AiortcCall:
    """Two runner processes in one call (offerer first); ``start`` then ``wait``."""

    def __init__(self, wav: Path) -> None:
        self.wav = wav
        self.procs: list[asyncio.subprocess.Process] = []
        self._readers: list[asyncio.Task[dict[str, Any]]] = []
        self._up: list[asyncio.Future[None]] = []

    async def start(self, seconds: float, setup_limit_s: float = 30.0) -> None:
        """Start both sides and return once each hears the other; they hang up by themselves
        after ``seconds`` of call."""
        loop = asyncio.get_running_loop()
        self._up = [loop.create_future() for _ in range(2)]
        for role in ("offerer", "answerer"):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tools.lab.aiortc_call", "--role", role,
                "--wav", str(self.wav), "--duration", str(seconds),
                "--setup-timeout", str(setup_limit_s),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            self.procs.append(proc)
        for side, (proc, to) in enumerate(zip(self.procs, self.procs[::-1], strict=True)):
            self._readers.append(
                asyncio.create_task(self._read(side, proc, to), name=f"aiortc-read-{side}")
            )
        async with asyncio.timeout(setup_limit_s + 5.0):
            while not all(f.done() for f in self._up):
                pending: list[asyncio.Future[Any]] = [
                    *[f for f in self._up if not f.done()],
                    *self._readers,
                ]
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(r.done() for r in self._readers):
                    break
        for side, up in enumerate(self._up):
            if not up.done() or up.exception() is not None:
                raise RuntimeError(f"aiortc side {side} did not connect: {up}")

    async def _read(
        self, side: int, proc: asyncio.subprocess.Process, to: asyncio.subprocess.Process
    ) -> dict[str, Any]:
        assert proc.stdout is not None and to.stdin is not None
        last: dict[str, Any] = {}
        async for raw in proc.stdout:
            record = json.loads(raw)
            if record.get("event") == "signal":
                if not to.stdin.is_closing():
                    signal = {k: v for k, v in record.items() if k != "event"}
                    to.stdin.write(json.dumps(signal).encode() + b"\n")
                continue
            if record.get("event") == "connected":
                self._up[side].set_result(None)
            elif record.get("event") == "failed" and not self._up[side].done():
                self._up[side].set_exception(RuntimeError(f"{side}: {record['reason']}"))
            last = record
        return last

    async def wait(self, limit_s: float = 60.0) -> list[dict[str, Any]]:
        """Each side's ``ended`` record once both have hung up."""
        try:
            async with asyncio.timeout(limit_s):
                results = [await r for r in self._readers]
                codes = [await p.wait() for p in self.procs]
        finally:
            await self.close()
        if any(codes) or any(r.get("event") != "ended" for r in results):
            raise RuntimeError(f"aiortc sides exited {codes} with {results}")
        return results

    async def close(self) -> None:
        """Kill sides still running and stop reading them (after a failed ``start``, too)."""
        for p in self.procs:
            if p.stdin is not None:
                p.stdin.close()
            if p.returncode is None:
                p.kill()
                await p.wait()
        for r in self._readers:
            r.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--role", choices=("offerer", "answerer"), required=True)
    parser.add_argument("--wav", type=Path, required=True, help="48 kHz mono 16-bit, looped")
    parser.add_argument("--duration", type=float, required=True, help="seconds after connecting")
    parser.add_argument("--setup-timeout", type=float, default=30.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.exit(asyncio.run(run(args.role, args.wav, args.duration, args.setup_timeout)))


if __name__ == "__main__":
    main()
