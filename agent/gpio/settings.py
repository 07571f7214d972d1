"""``[gpio]`` of the agent's configuration: what the board profile's GPIO lines do.

The lines themselves (which offset, active-low, pull) are hardware and come from the
board profile's ``[board.gpio]`` table (``agent.service.profile.GpioPins``).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.signaling.topics import TopicError, check_device_id

FAKE_CHIP = "fake:"
"""``chip = "fake:PATH"``: an in-memory chip driven through a unix socket at PATH
(``agent.gpio.fake``), for tests and labs only."""


@dataclass(frozen=True, slots=True)
class GpioSettings:
    """``[gpio]``: call button, door relay and tamper switch behaviour."""

    chip: str | None = None
    """Overrides the board profile's chip (a label, a device name or a ``/dev`` path).
    ``fake:PATH`` is the lab chip of ``agent.gpio.fake``, for tests only: never on a board."""
    button_peer: str | None = None
    """The device id the call button calls; None: the button only answers and hangs up."""
    debounce_s: float = 0.03
    """How long a button or switch level must hold to count (contacts bounce for a few ms)."""
    tamper_cooldown_s: float = 300.0
    """After a tamper alert, openings within this long are logged but raise no new alert."""
    door_pulse_s: float = 1.0
    """How long the door relay is energised by ``door/open``."""
    door_window_s: float = 30.0
    """After an answered call ends, how long its peer may still open the door."""
    door_allowed: tuple[str, ...] = ()
    """Device ids that may open the door during (or ``door_window_s`` after) a call with
    this board; the operator (a command without ``by``) always may."""
    hangup_after_door: bool = False
    """Hang up the call in progress once ``door/open`` has opened the door (whoever asked)."""

    def __post_init__(self) -> None:
        if self.chip is not None and not self.chip.removeprefix(FAKE_CHIP):
            raise ValueError("chip must not be empty")
        for name in ("debounce_s", "tamper_cooldown_s", "door_window_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if not 0 < self.door_pulse_s <= 30:
            raise ValueError(f"door_pulse_s must be within 0-30 s, got {self.door_pulse_s}")
        try:
            if self.button_peer is not None:
                check_device_id(self.button_peer)
            for device in self.door_allowed:
                check_device_id(device)
        except TopicError as exc:
            raise ValueError(f"button_peer / door_allowed: {exc}") from None


__all__ = ["FAKE_CHIP", "GpioSettings"]
