"""A webhook receiver for tests: a real aiohttp server on loopback that records what it
gets and answers with the statuses it is told to (or hangs)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Answers each request with the next of ``statuses`` (then ``default``); or hangs
    (never answers) while ``hang`` is set."""

    url: str
    statuses: list[int] = field(default_factory=list)
    default: int = 200
    hang: bool = False
    got: list[Received] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.got.append(Received(request.path, dict(request.headers), body))
        if self.hang:
            await asyncio.Event().wait()  # cancelled when the client gives up
        status = self.statuses.pop(0) if self.statuses else self.default
        return web.Response(status=status, text="ok" if status < 300 else "no")


@contextlib.asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    app = web.Application()
    r = Receiver("")
    app.router.add_post("/{name}", r.handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    r.url = f"http://{host}:{port}"
    try:
        yield r
    finally:
        await runner.cleanup()
