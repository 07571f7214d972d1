"""The GPIO interface the agent uses, whatever the chip: lines by role, logical levels.

Levels are logical: *active* is a pressed button, an opened enclosure, an energised relay,
a lit LED. Whether that is 0 V or 3.3 V on the pin (``GpioLine.active_low``) is the
chip's business (the kernel's, on a real one). Edge times are seconds of the monotonic
clock, the one ``loop.time()`` reads, so that debouncing can compare them with timers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from agent.service.profile import GpioLine

MAX_QUEUED_EDGES = 64
"""Edges kept per input line while nobody reads them; past that the oldest go (counted)."""


class GpioError(OSError):
    """A chip or line that cannot be had: missing, busy, refused by the kernel."""


@dataclass(frozen=True, slots=True)
class LineEvent:
    """One edge on an input line."""

    timestamp: float
    """When it happened, in seconds of the monotonic clock (``loop.time()``)."""
    active: bool
    """The line's logical level after the edge."""


class InputLine(Protocol):
    """An input line with edge detection on both edges."""

    def value(self) -> bool:
        """The logical level now."""
        ...

    async def recv(self) -> LineEvent:
        """The next edge, oldest first."""
        ...


class OutputLine(Protocol):
    """An output line."""

    def set(self, active: bool) -> None:
        """Drive the line to a logical level; ``OSError`` if the chip refuses."""
        ...


class GpioChip(Protocol):
    """One GPIO chip; ``close()`` releases every line requested from it."""

    name: str
    """What the chip was opened as (a label, a device, ``fake:PATH``): for logs."""

    def request_input(self, pin: GpioLine) -> InputLine:
        """Take ``pin`` as an input with both edges detected; ``GpioError`` if it cannot."""
        ...

    def request_output(self, pin: GpioLine, initial: bool = False) -> OutputLine:
        """Take ``pin`` as an output at ``initial``; ``GpioError`` if it cannot."""
        ...

    async def close(self) -> None: ...


class EdgeQueue:
    """An input line's edges between the chip (pushing) and its reader (``recv``).

    Bounded: past ``MAX_QUEUED_EDGES`` the oldest edge is dropped and counted in
    ``dropped`` (a reader that lost edges sees a level twice, which the debouncer
    takes as a bounce)."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[LineEvent] = asyncio.Queue(MAX_QUEUED_EDGES)
        self.dropped = 0

    def push(self, event: LineEvent) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(event)

    async def recv(self) -> LineEvent:
        return await self._queue.get()


__all__ = ["EdgeQueue", "GpioChip", "GpioError", "InputLine", "LineEvent", "OutputLine"]
