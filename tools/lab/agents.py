"""Two real agent processes in a call on virtual boards, through the impairment proxy.

Each agent is ``python -m agent.app call`` on its own virtual board (real ALSA
through PulseAudio) with ICE and DTLS-SRTP. This harness is their signaling:
it carries offer, answer and trickled candidates between the agents' stdout
and stdin. To put the impairment proxy on the media path it rewrites each
agent's candidates into one host candidate on the proxy, so ICE checks,
DTLS and SRTP all cross the proxy (and its loss, bursts and jitter). Agents
print JSON lines (``connected``, ``stats`` every interval, ``ended`` last),
which are handed to ``on_line`` as they arrive.

``relay_signals`` is that signaling on its own, for any two agent processes (the NAT
tests run them in network namespaces).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.codec.opus import OpusConfig
from agent.net.candidate import Candidate
from agent.net.impair import Impairment, ImpairmentProxy
from agent.net.transport import Address
from tools.lab.virtual_audio import VirtualAudio

LineHandler = Callable[[str, dict[str, Any]], None]
Rewrite = Callable[[dict[str, Any]], dict[str, Any] | None]
"""Changes a signal on its way to the other agent; None drops it."""


async def relay_signals(
    source: asyncio.subprocess.Process,
    to: asyncio.subprocess.Process,
    rewrite: Rewrite | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Carry ``source``'s signals to ``to`` until ``source`` closes its stdout.

    Each ``{"event": "signal", ...}`` line of ``source`` is written, without its
    ``event`` key and after ``rewrite``, as a JSON line to ``to``'s stdin (unless that is
    closed). Every other record goes to ``on_record``; the last one is returned (``{}``
    if there was none): ``ended`` or ``failed`` when the agent exits normally.
    """
    assert source.stdout is not None and to.stdin is not None
    last: dict[str, Any] = {}
    async for raw in source.stdout:
        record = json.loads(raw)
        if record.get("event") == "signal":
            signal = {k: v for k, v in record.items() if k != "event"}
            out = signal if rewrite is None else rewrite(signal)
            if out is not None and not to.stdin.is_closing():
                to.stdin.write(json.dumps(out).encode() + b"\n")
            continue
        last = record
        if on_record is not None:
            on_record(record)
    return last


def via_address(signal: dict[str, Any], address: Address) -> dict[str, Any] | None:
    """The signal with its candidate moved to ``address``; None drops it."""
    text = signal.get("candidate")
    if signal.get("type") != "candidate" or text is None:
        return signal
    candidate = Candidate.parse(text)
    if candidate.type != "host" or candidate.transport != "udp":
        return None
    host, port = address
    return {**signal, "candidate": replace(candidate, host=host, port=port).to_sdp()}


class AgentCall:
    """Boards ``a`` (offerer) and ``b`` (answerer) in one call; ``start`` then ``wait``."""

    def __init__(
        self,
        audio: VirtualAudio,
        work: Path,
        impairment: Impairment = Impairment(),
        opus: OpusConfig = OpusConfig(),
        on_line: LineHandler | None = None,
        *,
        frontend: Mapping[str, bool | int | float] | None = None,
    ) -> None:
        self.audio, self.work, self.impairment, self.opus = audio, work, impairment, opus
        self.frontend = frontend or {}
        """Both agents' ``[audio.frontend]`` keys (echo cancellation, ...)."""
        self.on_line = on_line
        self.procs: list[asyncio.subprocess.Process] = []
        self._readers: list[asyncio.Task[dict[str, Any]]] = []
        self.proxy: ImpairmentProxy | None = None
        self.connected: dict[str, dict[str, Any]] = {}
        """Each agent's ``connected`` record (setup time, selected candidate types)."""
        self._up: dict[str, asyncio.Future[None]] = {}

    def _config(self, board: str) -> Path:
        b = next(x for x in self.audio.boards if x.name == board)
        path = self.work / f"{board}.toml"
        path.write_text(
            f'device_id = "lab-{board}"\nstate_dir = "{self.work / board}"\n'
            f'[audio.capture]\nname = "^{b.mic}$"\n[audio.playback]\nname = "^{b.speaker}$"\n'
            f"[media.opus]\ncomplexity = {self.opus.complexity}\nbitrate = {self.opus.bitrate}\n"
            '[ice]\nhost_addresses = ["127.0.0.1"]\n'
            "[audio.frontend]\n"
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in self.frontend.items())
        )
        return path

    @property
    def _env(self) -> dict[str, str]:
        # Untraced even under coverage: tracing glitches the real-time audio being scored.
        return {k: v for k, v in self.audio.env.items() if k != "COVERAGE_PROCESS_START"}

    async def start(
        self, seconds: float, stats_interval: float = 1000.0, setup_limit_s: float = 30.0
    ) -> None:
        """Start both agents and return once both are connected; they hang up by themselves
        after ``seconds`` of call."""
        loop = asyncio.get_running_loop()
        self._up = {board: loop.create_future() for board in "ab"}
        self.proxy = await ImpairmentProxy.start()
        # The proxy learns each agent from its first datagram (an ICE check).
        self.proxy.connect(None, None, a_to_b=self.impairment, b_to_a=self.impairment)
        for board, role in (("a", "offerer"), ("b", "answerer")):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.app", "--config", str(self._config(board)),
                "--log-level", "WARNING", "call", "--role", role,
                "--duration", str(seconds), "--stats-interval", str(stats_interval),
                env=self._env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            self.procs.append(proc)
        # What a sends reaches b at the proxy's b side, and the other way round.
        routes = (
            (self.procs[1], self.proxy.address_for_b),
            (self.procs[0], self.proxy.address_for_a),
        )
        for board, proc, (to, via) in zip("ab", self.procs, routes, strict=True):
            task = asyncio.create_task(self._read(board, proc, to, via), name=f"read-{board}")
            self._readers.append(task)
        # Done when both are up; an agent that fails or exits first ends the wait.
        async with asyncio.timeout(setup_limit_s):
            while not all(f.done() for f in self._up.values()):
                pending: list[asyncio.Future[Any]] = [
                    *[f for f in self._up.values() if not f.done()],
                    *self._readers,
                ]
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(r.done() for r in self._readers):
                    break
        for board, up in self._up.items():
            if not up.done() or up.exception() is not None:
                raise RuntimeError(f"agent {board} did not connect: {up}")

    async def _read(
        self, board: str, proc: asyncio.subprocess.Process,
        to: asyncio.subprocess.Process, via: Address,
    ) -> dict[str, Any]:  # fmt: skip
        def record(line: dict[str, Any]) -> None:
            if line.get("event") == "connected":
                self.connected[board] = line
                self._up[board].set_result(None)
            elif line.get("event") == "failed" and not self._up[board].done():
                self._up[board].set_exception(RuntimeError(f"{board}: {line['reason']}"))
            if self.on_line is not None:
                self.on_line(board, line)

        return await relay_signals(proc, to, lambda s: via_address(s, via), record)

    async def wait(self, limit_s: float = 120.0) -> list[dict[str, Any]]:
        """Each agent's ``ended`` record once both have hung up."""
        try:
            async with asyncio.timeout(limit_s):
                results = [await r for r in self._readers]
                codes = [await p.wait() for p in self.procs]
        finally:
            for p in self.procs:
                if p.stdin is not None:
                    p.stdin.close()
                if p.returncode is None:
                    p.kill()
                    await p.wait()
            if self.proxy is not None:
                await self.proxy.close()
        if any(codes) or any(r.get("event") != "ended" for r in results):
            raise RuntimeError(f"agents exited {codes} with {results}")
        return results

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]
