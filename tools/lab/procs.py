"""The lab's child processes: whether one still runs, and stopping it politely, then for
sure."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path


def alive(pid: int | None) -> bool:
    """``pid`` runs (a zombie waiting for its parent counts as gone)."""
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


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
