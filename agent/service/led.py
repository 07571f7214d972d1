"""The status LED: one interface (``Led``), two kinds of LED.

``StatusLed`` drives an LED of the Linux LED class (``/sys/class/leds/NAME``): the board
profile wires it to a GPIO with a kernel overlay (on a Raspberry Pi:
``dtoverlay=gpio-led,gpio=27,label=intercom-status``), so the agent needs no access to
``/dev/gpiochip*``: it writes the LED's ``trigger``, ``brightness`` and, for blinking, the
``timer`` trigger's ``delay_on``/``delay_off`` attributes, and the kernel does the
blinking without waking the agent. ``GpioLed`` drives an LED on a GPIO output line
(``[board.gpio] status_led``) and blinks it with a task of its own.

``PATTERNS`` (pure) says what each call indicator looks like: steady on while the agent
is online and idle, blinking while a call is set up or rings, on in a call, off once
the agent stops. Being listened to gets its own pattern, distinct from a normal call,
so that anyone near the board can see that its microphone is going out.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.calls.machine import Indicator
from agent.gpio.chip import OutputLine

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Pattern:
    """Steady (``on_ms`` 0: off, ``off_ms`` 0: on) or blinking."""

    on_ms: int
    off_ms: int


OFF = Pattern(0, 1)
ON = Pattern(1, 0)

PATTERNS: dict[Indicator, Pattern] = {
    Indicator.IDLE: ON,  # online
    Indicator.CALLING: Pattern(500, 500),
    Indicator.REMOTE_RINGING: Pattern(500, 500),
    Indicator.RINGING: Pattern(250, 250),
    Indicator.CONNECTING: Pattern(100, 100),
    Indicator.IN_CALL: ON,
    Indicator.ANNOUNCING: ON,
    Indicator.HEARING_ANNOUNCEMENT: ON,
    Indicator.LISTENING: ON,
    Indicator.BEING_LISTENED: Pattern(150, 850),
    Indicator.ENDED: OFF,
}


class Led(Protocol):
    """A status LED; ``show`` never raises (a broken LED must not stop a call)."""

    async def show(self, indicator: Indicator) -> None: ...

    async def close(self) -> None:
        """Off: the agent is stopping (offline)."""
        ...


class _PatternLed:
    """What both kinds share: each indicator shown as its pattern, a failure counted and
    logged (and tried again with the next indicator), never raised."""

    def __init__(self, name: str) -> None:
        self.name = name
        """For logs: the LED's directory, or its chip and line."""
        self.failures = 0
        self._current: Pattern | None = None

    async def show(self, indicator: Indicator) -> None:
        await self._show(PATTERNS[indicator])

    async def close(self) -> None:
        await self._show(OFF)

    async def _show(self, pattern: Pattern) -> None:
        if pattern == self._current:
            return
        try:
            await self._apply(pattern)
        except OSError as exc:
            self.failures += 1
            logger.warning("status LED %s: %s", self.name, exc)
            self._current = None
            return
        self._current = pattern

    async def _apply(self, pattern: Pattern) -> None:
        raise NotImplementedError


class StatusLed(_PatternLed):
    """One LED class device."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.path = path

    async def _apply(self, pattern: Pattern) -> None:
        await asyncio.to_thread(self._write, pattern)

    def _write(self, pattern: Pattern) -> None:
        if pattern.on_ms and pattern.off_ms:
            # Setting the trigger creates delay_on/delay_off.
            (self.path / "trigger").write_text("timer")
            (self.path / "delay_on").write_text(str(pattern.on_ms))
            (self.path / "delay_off").write_text(str(pattern.off_ms))
            return
        (self.path / "trigger").write_text("none")
        (self.path / "brightness").write_text("1" if pattern.on_ms else "0")


class GpioLed(_PatternLed):
    """An LED on a GPIO output line, blinked by a task of its own (``close`` ends it)."""

    def __init__(self, line: OutputLine, name: str) -> None:
        super().__init__(name)
        self._line = line
        self._blinking: asyncio.Task[None] | None = None

    async def _apply(self, pattern: Pattern) -> None:
        if self._blinking is not None:
            self._blinking.cancel()
            await asyncio.gather(self._blinking, return_exceptions=True)
            self._blinking = None
        if not (pattern.on_ms and pattern.off_ms):
            self._line.set(bool(pattern.on_ms))
            return
        self._blinking = asyncio.get_running_loop().create_task(
            self._blink(pattern), name=f"led-{self.name}"
        )

    async def _blink(self, pattern: Pattern) -> None:
        try:
            while True:
                self._line.set(True)
                await asyncio.sleep(pattern.on_ms / 1000)
                self._line.set(False)
                await asyncio.sleep(pattern.off_ms / 1000)
        except OSError as exc:  # the next indicator tries again
            self.failures += 1
            self._current = None
            logger.warning("status LED %s: %s", self.name, exc)
