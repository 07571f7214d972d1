"""A Server-Sent Events reader for the relay's ``/api/v1/events``, for tests and benches."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp


async def sse_events(
    response: aiohttp.ClientResponse, connected: asyncio.Event
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(event kind, data) as they come; ``connected`` is set at the stream's greeting."""
    kind = ""
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line == ": connected":
            connected.set()
        elif line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            yield kind, json.loads(line[6:])
