"""Pacing by the event loop's clock, for sources and sinks that have no device clock."""

from __future__ import annotations

import asyncio

from agent.audio.format import FRAME_MS

FRAME_S = FRAME_MS / 1000


class FramePacer:
    """``await wait()`` returns once per frame period of loop time.

    The first call returns at once. A caller that falls more than ``max_lag``
    periods behind restarts from now instead of bursting to catch up.
    """

    def __init__(self, period_s: float = FRAME_S, max_lag: int = 5) -> None:
        self._period = period_s
        self._max_lag = max_lag
        self._next: float | None = None

    def reset(self) -> None:
        """Forget the schedule: the next ``wait()`` returns at once."""
        self._next = None

    async def wait(self) -> None:
        now = asyncio.get_running_loop().time()
        if self._next is None or now - self._next > self._max_lag * self._period:
            self._next = now
        delay = self._next - now
        self._next += self._period
        if delay > 0:
            await asyncio.sleep(delay)
