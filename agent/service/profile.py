"""A board profile's ``[board]`` table: the hardware around the agent.

``firmware_configs/NAME.toml`` holds one profile per supported board. Its ``[agent]``
table gives the agent's defaults for that board (ALSA device patterns, rates, channels,
Opus complexity; see ``agent.service.config``); its ``[board]`` table, read into
``BoardProfile`` here, says what the agent cannot set itself: the boot configuration
the sound card needs, mixer levels, and which GPIO lines the button, relay, LED and
tamper switch are on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

Bias = Literal["as-is", "pull-up", "pull-down", "disabled"]

# ``key=value`` as config.txt takes it (dtoverlay=..., dtparam=..., gpu_mem=...).
_BOOT_LINE = re.compile(r"[a-z][a-z0-9_]*=[^\s#][^#\n]*")


@dataclass(frozen=True, slots=True)
class GpioLine:
    """One GPIO line, by its offset on the board's chip."""

    line: int
    """Line offset on the chip; on a Raspberry Pi the BCM GPIO number, not the header pin."""
    active_low: bool = False
    """True when the line is active at 0 V: a button to ground, most relay modules."""
    bias: Bias = "as-is"
    """Internal pull resistor: a button to ground with no resistor of its own needs
    ``pull-up``; outputs keep ``as-is``."""

    def __post_init__(self) -> None:
        if self.line < 0:
            raise ValueError(f"GPIO line must be >= 0, got {self.line}")


@dataclass(frozen=True, slots=True)
class GpioPins:
    """The intercom's GPIO lines (libgpiod character device); each is optional."""

    chip: str = "gpiochip0"
    """The chip, by label as ``gpiodetect`` shows it (stable across kernels: the Pi 5
    header's ``pinctrl-rp1`` was gpiochip4 before kernel 6.6.45 and gpiochip0 after) or
    by device name (``gpiochip0``)."""
    call_button: GpioLine | None = None
    """Input: a press calls the configured peer."""
    door_relay: GpioLine | None = None
    """Output: pulsed to open the door."""
    status_led: GpioLine | None = None
    """Output: online / ringing / in call. Leave it out when the LED is a kernel
    ``gpio-led`` (``status_led`` in the ``[agent]`` table)."""
    tamper_switch: GpioLine | None = None
    """Input: active when the enclosure is opened; raises an alert."""

    def used(self) -> dict[str, int]:
        """Role to line offset, for the lines that are set."""
        roles = {
            "call_button": self.call_button,
            "door_relay": self.door_relay,
            "status_led": self.status_led,
            "tamper_switch": self.tamper_switch,
        }
        return {role: pin.line for role, pin in roles.items() if pin is not None}

    def __post_init__(self) -> None:
        if not self.chip:
            raise ValueError("GPIO chip must not be empty")
        by_line: dict[int, str] = {}
        for role, line in self.used().items():
            if line in by_line:
                raise ValueError(f"{role} and {by_line[line]} are both on line {line}")
            by_line[line] = role


@dataclass(frozen=True, slots=True)
class MixerControl:
    """One ALSA simple mixer control of the sound card the agent uses, as ``amixer`` names it."""

    control: str
    """Simple control name (``Speaker``, ``Mic``, ``Capture``, ``Headphone``)."""
    percent: int
    """Level, 0..100 (0 on a playback control also mutes it)."""
    direction: Literal["playback", "capture"] = "playback"
    """Which side of the control: USB cards' ``Mic`` has both, and its playback side is
    the analog monitor (sidetone) that must stay at 0."""

    def __post_init__(self) -> None:
        if not self.control:
            raise ValueError("mixer control name must not be empty")
        if not 0 <= self.percent <= 100:
            raise ValueError(f"mixer {self.control!r}: percent must be 0..100, got {self.percent}")


@dataclass(frozen=True, slots=True)
class BoardProfile:
    """``[board]``: hardware facts of one supported board."""

    description: str = "Generic Linux board"
    """What the profile is for, for people (``devices``, logs)."""
    boot_config: tuple[str, ...] = ()
    """Lines ``/boot/firmware/config.txt`` must have for the sound card and LED
    (``dtparam=i2s=on``, ``dtoverlay=hifiberry-dac``); the installer checks them."""
    reserved_lines: tuple[int, ...] = ()
    """GPIO lines the sound card's interface takes (I2S: 18-21); no pin may use them."""
    mixer: tuple[MixerControl, ...] = ()
    """Mixer levels set on the card of the configured devices at start."""
    gpio: GpioPins = field(default_factory=GpioPins)

    def __post_init__(self) -> None:
        if not self.description:
            raise ValueError("description must not be empty")
        for line in self.boot_config:
            if not _BOOT_LINE.fullmatch(line):
                raise ValueError(f"boot_config line {line!r}: expected key=value as in config.txt")
        taken = sorted(
            f"{role} (line {line})"
            for role, line in self.gpio.used().items()
            if line in self.reserved_lines
        )
        if taken:
            raise ValueError(
                f"gpio: {', '.join(taken)} on a line the sound card takes "
                f"(reserved_lines {list(self.reserved_lines)})"
            )
        names = [(m.control, m.direction) for m in self.mixer]
        if len(set(names)) != len(names):
            raise ValueError("mixer: a control and direction is listed twice")
