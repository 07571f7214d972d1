"""The status LED, through the Linux LED class (``/sys/class/leds/NAME``).

The board profile wires the LED to a GPIO with a kernel overlay (on a Raspberry
Pi: ``dtoverlay=gpio-led,gpio=27,label=intercom-status``), so the agent needs no
GPIO library and no access to ``/dev/gpiochip*``: it writes the LED's ``trigger``,
``brightness`` and, for blinking, the ``timer`` trigger's ``delay_on``/``delay_off``
attributes, and the kernel does the blinking without waking the agent.

``PATTERNS`` (pure) says what each call indicator looks like. Being listened to
gets its own pattern, distinct from a normal call, so that anyone near the board
can see that its microphone is going out.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from agent.calls.machine import Indicator

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Pattern:
    """Steady (``on_ms`` 0: off, ``off_ms`` 0: on) or blinking."""

    on_ms: int
    off_ms: int


OFF = Pattern(0, 1)
ON = Pattern(1, 0)

PATTERNS: dict[Indicator, Pattern] = {
    Indicator.IDLE: OFF,
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


class StatusLed:
    """One LED class device; ``show`` never raises (a broken LED must not stop a call)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.failures = 0
        self._current: Pattern | None = None

    async def show(self, indicator: Indicator) -> None:
        pattern = PATTERNS[indicator]
        if pattern == self._current:
            return
        try:
            await asyncio.to_thread(self._write, pattern)
        except OSError as exc:
            self.failures += 1
            logger.warning("status LED %s: %s", self.path, exc)
            return
        self._current = pattern

    def _write(self, pattern: Pattern) -> None:
        if pattern.on_ms and pattern.off_ms:
            # Setting the trigger creates delay_on/delay_off.
            (self.path / "trigger").write_text("timer")
            (self.path / "delay_on").write_text(str(pattern.on_ms))
            (self.path / "delay_off").write_text(str(pattern.off_ms))
            return
        (self.path / "trigger").write_text("none")
        (self.path / "brightness").write_text("1" if pattern.on_ms else "0")
