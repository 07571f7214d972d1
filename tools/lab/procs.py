"""Stopping the lab's child processes: politely, then for sure."""

from __future__ import annotations

import asyncio
import signal


async def terminate(proc: asyncio.subprocess.Process, grace_s: float) -> int | None:
    """SIGTERM ``proc`` (if it still runs) and wait up to ``grace_s`` seconds; its exit code,
    or None if it ignored SIGTERM and was killed."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(grace_s):
            return await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None
