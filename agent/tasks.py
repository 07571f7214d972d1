"""Stopping the tasks an object owns."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel ``tasks`` (None ones skipped) and wait until they have finished.

    Their exceptions are not raised here (their owners log them as they end); a
    cancellation of the caller itself is not swallowed by the wait: it goes on once they
    are done, so a ``close()`` under a stopping task still stops that task.
    """
    live = [task for task in tasks if task is not None]
    for task in live:
        task.cancel()
    await asyncio.gather(*live, return_exceptions=True)
    if (current := asyncio.current_task()) is not None and current.cancelling():
        raise asyncio.CancelledError
