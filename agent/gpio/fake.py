"""A GPIO chip in memory, for tests and for labs without GPIO: never on a board.

Tests drive its inputs (``set_input``, ``press``) and read its outputs (``FakeOutput``:
every level change with its ``loop.time()``). Levels are logical (a press is *active*);
``active_low`` and bias mean nothing here.

An agent process gets one with ``[gpio] chip = "fake:PATH"``: it then serves the chip on
a unix socket at PATH (``serve``), one JSON object per line each way, so that a test
outside the process can drive it (``FakeChipClient``):

* ``{"op": "set", "line": 23, "active": true}``: an input's level changes (an edge now);
* ``{"op": "press", "line": 17, "hold_s": 0.1}``: active now, inactive ``hold_s`` later;
* ``{"op": "output", "line": 27}``: ``{"active": ..., "history": [[t, active], ...]}``.

Every answer has ``ok``, and ``message`` when ``ok`` is false.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from agent.gpio.chip import EdgeQueue, GpioError, LineEvent
from agent.service.profile import GpioLine

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096


class FakeInput:
    """An input line whose level the test sets."""

    def __init__(self) -> None:
        self.active = False
        self.edges = EdgeQueue()

    def value(self) -> bool:
        return self.active

    async def recv(self) -> LineEvent:
        return await self.edges.recv()


class FakeOutput:
    """An output line that remembers every level it was driven to."""

    def __init__(self, initial: bool) -> None:
        self.active = initial
        self.history: list[tuple[float, bool]] = [(asyncio.get_running_loop().time(), initial)]
        """(``loop.time()``, level) of the request and of every change."""

    def set(self, active: bool) -> None:
        if active != self.active:
            self.active = active
            self.history.append((asyncio.get_running_loop().time(), active))


def pulses(history: list[tuple[float, bool]]) -> list[tuple[float, float | None]]:
    """(start, end) of each active period in an output's ``history``; end None while it lasts."""
    found: list[tuple[float, float | None]] = []
    for at, active in history:
        if active:
            found.append((at, None))
        elif found and found[-1][1] is None:
            found[-1] = (found[-1][0], at)
    return found


class FakeChip:
    """``GpioChip`` in memory; ``serve`` puts it on a unix socket (``fake:PATH``)."""

    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.inputs: dict[int, FakeInput] = {}
        self.outputs: dict[int, FakeOutput] = {}
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    def _take(self, pin: GpioLine) -> None:
        if pin.line in self.inputs or pin.line in self.outputs:
            raise GpioError(f"{self.name} line {pin.line}: busy")

    def request_input(self, pin: GpioLine) -> FakeInput:
        self._take(pin)
        line = self.inputs[pin.line] = FakeInput()
        return line

    def request_output(self, pin: GpioLine, initial: bool = False) -> FakeOutput:
        self._take(pin)
        line = self.outputs[pin.line] = FakeOutput(initial)
        return line

    def set_input(self, line: int, active: bool, at: float | None = None) -> None:
        """Input ``line`` goes to ``active`` (an edge at ``at``, default now), unless it is
        there already: a real line has no edge without a change."""
        pin = self._input(line)
        if pin.active == active:
            return
        pin.active = active
        when = asyncio.get_running_loop().time() if at is None else at
        pin.edges.push(LineEvent(when, active))

    def press(self, line: int, hold_s: float = 0.1, at: float | None = None) -> None:
        """A clean press of the button on ``line`` at ``at`` (default now), released
        ``hold_s`` later (the edges carry their times, so nothing waits)."""
        when = asyncio.get_running_loop().time() if at is None else at
        self.set_input(line, True, when)
        self.set_input(line, False, when + hold_s)

    def _input(self, line: int) -> FakeInput:
        try:
            return self.inputs[line]
        except KeyError:
            raise GpioError(f"{self.name} line {line}: not requested as an input") from None

    def output(self, line: int) -> FakeOutput:
        try:
            return self.outputs[line]
        except KeyError:
            raise GpioError(f"{self.name} line {line}: not requested as an output") from None

    # --- on a unix socket, for a test outside the process ---

    @classmethod
    async def serve(cls, path: Path) -> FakeChip:
        """A fake chip driven through a unix socket at ``path`` (replaced if it exists)."""
        chip = cls(f"fake:{path}")
        await asyncio.to_thread(path.unlink, missing_ok=True)  # a stale one from a past run
        chip._server = await asyncio.start_unix_server(chip._client, path)
        logger.warning("GPIO: fake chip on %s (tests and labs only)", path)
        return chip

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            while line := await reader.readline():
                writer.write(json.dumps(self._answer(line)).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError) as exc:  # ValueError: a line over the limit
            logger.info("GPIO: fake chip client gone: %s", exc)
        finally:
            self._clients.discard(task)
            writer.close()

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line[:MAX_REQUEST_BYTES])
            op, number = request["op"], request["line"]
            if op == "set":
                self.set_input(number, bool(request["active"]))
                return {"ok": True}
            if op == "press":
                self.press(number, float(request.get("hold_s", 0.1)))
                return {"ok": True}
            if op == "output":
                output = self.output(number)
                return {"ok": True, "active": output.active, "history": output.history}
            return {"ok": False, "message": f"unknown op {str(op)[:40]!r}"}
        except (ValueError, TypeError, KeyError, GpioError) as exc:
            return {"ok": False, "message": f"bad request: {exc!r}"[:200]}

    async def close(self) -> None:
        """Stop serving; the lines stay readable (a test looks at them afterwards)."""
        if self._server is not None:
            self._server.close()
            for task in self._clients:
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None


class FakeChipClient:
    """Drives a served ``FakeChip`` from another process (tests, labs)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, path: Path) -> FakeChipClient:
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    async def request(self, **request: Any) -> dict[str, Any]:
        """One request; ``GpioError`` if the chip answers ``ok: false``."""
        self._writer.write(json.dumps(request).encode() + b"\n")
        await self._writer.drain()
        answer: dict[str, Any] = json.loads(await self._reader.readline())
        if not answer.get("ok"):
            raise GpioError(f"fake chip: {answer.get('message')}")
        return answer

    async def press(self, line: int, hold_s: float = 0.1) -> None:
        await self.request(op="press", line=line, hold_s=hold_s)

    async def set(self, line: int, active: bool) -> None:
        await self.request(op="set", line=line, active=active)

    async def history(self, line: int) -> list[tuple[float, bool]]:
        """Output ``line``'s levels since it was requested, with their times."""
        answer = await self.request(op="output", line=line)
        return [(float(t), bool(v)) for t, v in answer["history"]]

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


__all__ = ["FakeChip", "FakeChipClient", "FakeInput", "FakeOutput", "pulses"]
