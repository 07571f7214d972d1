"""Two real agent processes in a call on virtual boards, through the impairment proxy.

Each agent is ``python -m agent.app call`` on its own virtual board (real ALSA
through PulseAudio); the proxy between them applies loss, bursts and jitter.
Agents print JSON lines (``stats`` every interval, ``ended`` last), which are
handed to ``on_line`` as they arrive.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.codec.opus import OpusConfig
from agent.net.impair import Impairment, ImpairmentProxy
from tools.lab.virtual_audio import VirtualAudio

LineHandler = Callable[[str, dict[str, Any]], None]


class AgentCall:
    """Boards ``a`` (offerer) and ``b`` (answerer) in one call; ``start`` then ``wait``."""

    def __init__(
        self,
        audio: VirtualAudio,
        work: Path,
        impairment: Impairment = Impairment(),
        opus: OpusConfig = OpusConfig(),
        on_line: LineHandler | None = None,
    ) -> None:
        self.audio, self.work, self.impairment, self.opus = audio, work, impairment, opus
        self.on_line = on_line
        self.procs: list[asyncio.subprocess.Process] = []
        self._readers: list[asyncio.Task[dict[str, Any]]] = []
        self.proxy: ImpairmentProxy | None = None

    def _config(self, board: str) -> Path:
        b = next(x for x in self.audio.boards if x.name == board)
        path = self.work / f"{board}.toml"
        path.write_text(
            f'device_id = "lab-{board}"\n'
            f'[audio.capture]\nname = "^{b.mic}$"\n[audio.playback]\nname = "^{b.speaker}$"\n'
            f"[media.opus]\ncomplexity = {self.opus.complexity}\nbitrate = {self.opus.bitrate}\n"
        )
        return path

    async def start(self, seconds: float, stats_interval: float = 1000.0) -> None:
        """Start both agents; they hang up by themselves after ``seconds``."""
        self.proxy = await ImpairmentProxy.start()
        # Agents bind port 0; the proxy learns each one from its first datagram.
        self.proxy.connect(None, None, a_to_b=self.impairment, b_to_a=self.impairment)
        psk = self.work / "psk"
        psk.write_bytes(os.urandom(32).hex().encode())
        sides = (
            ("a", "offerer", self.proxy.address_for_a),
            ("b", "answerer", self.proxy.address_for_b),
        )
        for board, role, (host, port) in sides:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.app", "--config", str(self._config(board)),
                "--log-level", "WARNING", "call", "--bind", "127.0.0.1:0",
                "--peer", f"{host}:{port}", "--psk-file", str(psk), "--role", role,
                "--duration", str(seconds), "--stats-interval", str(stats_interval),
                env=self.audio.env, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            self.procs.append(proc)
            self._readers.append(asyncio.create_task(self._read(board, proc), name=f"read-{board}"))

    async def _read(self, board: str, proc: asyncio.subprocess.Process) -> dict[str, Any]:
        assert proc.stdout is not None
        last: dict[str, Any] = {}
        async for raw in proc.stdout:
            last = json.loads(raw)
            if self.on_line is not None:
                self.on_line(board, last)
        return last

    async def wait(self, limit_s: float = 120.0) -> list[dict[str, Any]]:
        """Each agent's ``ended`` record once both have hung up."""
        try:
            async with asyncio.timeout(limit_s):
                results = [await r for r in self._readers]
                codes = [await p.wait() for p in self.procs]
        finally:
            for p in self.procs:
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
