"""The door relay: who may open the door (pure) and the pulse that opens it.

``door/open`` arrives as a command on the device's ``cmd`` topic, which only the relay
and operator clients can write (broker ACL). Without ``by`` it is the operator's own and
always opens. With ``by`` the operator client acts for that device (a resident's indoor
station, a browser in the call), and the door opens only if that device is in
``door_allowed`` and is the peer of this board's answered call, or was, within
``door_window_s`` after it ended. Refusals are counted by reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

from agent.gpio.chip import OutputLine
from agent.gpio.settings import GpioSettings

logger = logging.getLogger(__name__)


class DoorRefused(Exception):
    """``door/open`` not allowed; ``label`` is a fixed word for the counter."""

    def __init__(self, label: str, message: str) -> None:
        super().__init__(message)
        self.label = label


def door_refusal(
    by: str | None,
    settings: GpioSettings,
    *,
    in_call_with: str | None,
    last_call: tuple[str, float] | None,
    now: float,
) -> DoorRefused | None:
    """Why ``by`` may not open the door now (None: it may). ``in_call_with``: the peer of
    the answered call in progress; ``last_call``: (peer, end time) of the last answered
    call; times on one monotonic clock."""
    if by is None:
        return None
    window = settings.door_window_s
    if by not in settings.door_allowed:
        return DoorRefused("not-allowed", f"{by} may not open the door (not in door_allowed)")
    if by == in_call_with:
        return None
    if last_call is not None and last_call[0] == by:
        ago = now - last_call[1]
        if ago <= window:
            return None
        return DoorRefused(
            "window-expired",
            f"the call with {by} ended {ago:.0f} s ago, more than door_window_s ({window:g} s)",
        )
    return DoorRefused("no-call", f"{by} is not in a call with this board")


class DoorOpener:
    """Pulses the door relay for ``door_pulse_s``; ``close()`` leaves it off."""

    def __init__(self, device_id: str, relay: OutputLine, settings: GpioSettings) -> None:
        self.device_id = device_id
        self.settings = settings
        self._relay = relay
        self._last_call: tuple[str, float] | None = None
        self._off: asyncio.TimerHandle | None = None
        self.opened = 0
        """Pulses since start."""
        self.refused: Counter[str] = Counter()
        """``door/open`` refusals since start, by reason."""

    def call_ended(self, peer: str, ended_at: float) -> None:
        """An answered call with ``peer`` ended at ``ended_at`` (``loop.time()``)."""
        self._last_call = (peer, ended_at)

    def open(self, by: str | None, in_call_with: str | None, now: float) -> str:
        """Open the door for ``by`` (None: the operator) if it may (``door_refusal``, else
        ``DoorRefused``); what happened, for the reply. Opening during a pulse makes the
        pulse last ``door_pulse_s`` from now."""
        refusal = door_refusal(
            by, self.settings, in_call_with=in_call_with, last_call=self._last_call, now=now
        )
        if refusal is not None:
            self.refused[refusal.label] += 1
            raise refusal
        try:
            self._relay.set(True)
        except OSError as exc:
            self.refused["relay-failed"] += 1
            raise DoorRefused("relay-failed", f"door relay failed: {exc}") from exc
        if self._off is not None:
            self._off.cancel()
        pulse = self.settings.door_pulse_s
        self._off = asyncio.get_running_loop().call_later(pulse, self._release)
        self.opened += 1
        who = "the operator" if by is None else by
        logger.info("device %s: door opened for %s (%g s)", self.device_id, who, pulse)
        return f"door opened for {who} ({pulse:g} s)"

    def _release(self) -> None:
        self._off = None
        try:
            self._relay.set(False)
        except OSError as exc:
            logger.error("device %s: door relay not released: %s", self.device_id, exc)

    def stats(self) -> dict[str, Any]:
        """For ``status``: pulses, refusals by reason, whether the relay is on now."""
        return {"opened": self.opened, "refused": dict(self.refused), "open": self._off is not None}

    def close(self) -> None:
        """End any pulse now: the door never stays open because the agent stopped."""
        if self._off is not None:
            self._off.cancel()
            self._release()


__all__ = ["DoorOpener", "DoorRefused", "door_refusal"]
