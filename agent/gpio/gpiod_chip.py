"""``GpioChip`` on libgpiod v2 (the ``gpiod`` package): the only module that sees its types.

Each line is its own request (one file descriptor each). Edges of an input are read
without blocking the loop and without a thread: the request's descriptor becomes
readable when the kernel has queued an edge, ``loop.add_reader`` calls us then, and
``read_edge_events`` returns what is queued at once. The kernel timestamps each edge
on ``CLOCK_MONOTONIC`` (libgpiod's default event clock), the clock ``loop.time()``
reads, so a late reader still debounces on the true times. Debouncing itself is ours
(``agent.gpio.debounce``), not the kernel's ``debounce_period``, so that a fake chip
and every real one behave the same.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import gpiod
from gpiod.line import Bias, Direction, Edge, Value

from agent.gpio.chip import EdgeQueue, GpioError, LineEvent
from agent.service.profile import GpioLine

logger = logging.getLogger(__name__)

_BIAS = {
    "as-is": Bias.AS_IS,
    "pull-up": Bias.PULL_UP,
    "pull-down": Bias.PULL_DOWN,
    "disabled": Bias.DISABLED,
}


def find_chip(name: str, dev: Path = Path("/dev")) -> Path:
    """The character device of chip ``name``: a path, a device name (``gpiochip0``) or
    a label as ``gpiodetect`` shows it (``pinctrl-rp1``)."""
    if "/" in name:
        if gpiod.is_gpiochip_device(name):
            return Path(name)
        raise GpioError(f"{name} is not a GPIO chip device")
    chips = [p for p in sorted(dev.glob("gpiochip*")) if gpiod.is_gpiochip_device(str(p))]
    for path in chips:
        if path.name == name:
            return path
    for path in chips:
        with gpiod.Chip(str(path)) as chip:
            if chip.get_info().label == name:
                return path
    found = ", ".join(p.name for p in chips) or "none"
    raise GpioError(f"no GPIO chip named or labelled {name!r} in {dev} (chips: {found})")


class GpiodInput:
    """An input line request, its edges queued as the loop finds them readable."""

    def __init__(self, request: gpiod.LineRequest, offset: int) -> None:
        self._request = request
        self._offset = offset
        self._edges = EdgeQueue()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(request.fd, self._readable)

    def value(self) -> bool:
        return self._request.get_value(self._offset) is Value.ACTIVE

    async def recv(self) -> LineEvent:
        return await self._edges.recv()

    def _readable(self) -> None:
        try:
            events = self._request.read_edge_events()
        except OSError as exc:
            logger.warning("GPIO line %d: edges not read: %s", self._offset, exc)
            return
        for event in events:
            rising = event.event_type is gpiod.EdgeEvent.Type.RISING_EDGE
            self._edges.push(LineEvent(event.timestamp_ns / 1e9, rising))

    def release(self) -> None:
        self._loop.remove_reader(self._request.fd)
        self._request.release()


class GpiodOutput:
    """An output line request."""

    def __init__(self, request: gpiod.LineRequest, offset: int) -> None:
        self._request = request
        self._offset = offset

    def set(self, active: bool) -> None:
        self._request.set_value(self._offset, Value.ACTIVE if active else Value.INACTIVE)

    def release(self) -> None:
        self._request.release()


class GpiodChip:
    """A chip's character device; the lines are requested as ``consumer``."""

    def __init__(self, name: str, path: Path, consumer: str) -> None:
        self.name = name
        self.path = path
        self._consumer = consumer
        self._lines: list[GpiodInput | GpiodOutput] = []

    @classmethod
    def open(cls, name: str, consumer: str) -> GpiodChip:
        """Find chip ``name`` (``find_chip``); blocking (sysfs and ioctls): run in a thread."""
        return cls(name, find_chip(name), consumer)

    def _request(self, pin: GpioLine, settings: gpiod.LineSettings) -> gpiod.LineRequest:
        settings.active_low = pin.active_low
        settings.bias = _BIAS[pin.bias]
        try:
            return gpiod.request_lines(
                str(self.path), {pin.line: settings}, consumer=self._consumer
            )
        except (OSError, ValueError) as exc:  # busy, refused; an offset the chip lacks
            raise GpioError(f"{self.name} line {pin.line}: {exc}") from exc

    def request_input(self, pin: GpioLine) -> GpiodInput:
        settings = gpiod.LineSettings(direction=Direction.INPUT, edge_detection=Edge.BOTH)
        line = GpiodInput(self._request(pin, settings), pin.line)
        self._lines.append(line)
        return line

    def request_output(self, pin: GpioLine, initial: bool = False) -> GpiodOutput:
        value = Value.ACTIVE if initial else Value.INACTIVE
        settings = gpiod.LineSettings(direction=Direction.OUTPUT, output_value=value)
        line = GpiodOutput(self._request(pin, settings), pin.line)
        self._lines.append(line)
        return line

    async def close(self) -> None:
        lines, self._lines = self._lines, []
        for line in lines:
            line.release()


__all__ = ["GpiodChip", "find_chip"]
