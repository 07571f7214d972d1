"""A board profile's GPIO lines at work (``[board.gpio]`` pins, ``[gpio]`` settings).

* Call button (debounced): a press does what an intercom's button does
  (``button_command``): it answers a ringing call, hangs up (or cancels) the call in
  progress, and otherwise calls ``button_peer``. It goes through the call runtime like
  an operator's command (``CallRuntime.local_command``).
* Tamper switch (debounced): opening the enclosure raises a ``tamper`` alert (critical)
  through the outbox, at most one per ``tamper_cooldown_s``; closing it is logged. Open
  at start counts as an opening (it was opened while the agent was not watching).
* Door relay: ``DoorOpener``, for the runtime's ``door/open``.
* Status LED: ``GpioLed``, for the runtime's ``led``.

A board whose chip or lines cannot be had runs without GPIO (an error in the log): calls
and alerts do not depend on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from agent.calls.machine import Phase
from agent.edge.alerts import TAMPER, Alert, Severity, new_alert_id
from agent.gpio.chip import GpioChip, InputLine
from agent.gpio.debounce import Debouncer
from agent.gpio.door import DoorOpener
from agent.gpio.fake import FakeChip
from agent.gpio.settings import FAKE_CHIP, GpioSettings
from agent.service.led import GpioLed
from agent.service.profile import GpioPins

logger = logging.getLogger(__name__)

CONSUMER = "edge-intercom"
"""What ``gpioinfo`` shows as the user of our lines."""

LocalCommand = Callable[[str, Mapping[str, Any]], Awaitable[dict[str, Any]]]
"""Runs a call command for the board itself and returns its reply (``ok``, ``message``)."""
Submit = Callable[[Alert], Awaitable[object]]
"""Stores an alert in the outbox to be sent (``AlertUplink.submit``)."""


def button_command(phase: Phase, peer: str | None) -> tuple[str, dict[str, Any]] | None:
    """The command a press of the call button gives in ``phase``; None: nothing to do."""
    if phase is Phase.RINGING:
        return "answer", {}
    if phase in (Phase.OUTGOING, Phase.CONNECTING, Phase.ACTIVE):
        return "hangup", {}
    return None if peer is None else ("call", {"peer": peer})


def tamper_alert(line: int, now_ms: int, *, at_start: bool = False) -> Alert:
    """The alert for an opened enclosure (switch on GPIO ``line``)."""
    return Alert(
        id=new_alert_id(),
        detector="gpio",
        kind=TAMPER,
        severity=Severity.CRITICAL,
        start=now_ms,
        end=now_ms,
        confidence=1.0,
        level=0.0,  # no sound: a switch
        created=now_ms,
        detail={"line": line, "at_start": at_start},
    )


async def open_chip(spec: str) -> GpioChip:
    """Chip ``spec``: ``fake:PATH`` (``agent.gpio.fake``), else a label, device or path."""
    if spec.startswith(FAKE_CHIP):
        return await FakeChip.serve(Path(spec.removeprefix(FAKE_CHIP)))
    # Only a board with real GPIO loads libgpiod.
    from agent.gpio.gpiod_chip import GpiodChip  # noqa: PLC0415

    return await asyncio.to_thread(GpiodChip.open, spec, CONSUMER)


async def watch(
    line: InputLine, debouncer: Debouncer, on_change: Callable[[bool], Awaitable[None]]
) -> None:
    """Feed ``line``'s edges to ``debouncer`` and await ``on_change`` with each settled level."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            async with asyncio.timeout_at(debouncer.deadline):  # None: no deadline
                event = await line.recv()
        except TimeoutError:
            changed = debouncer.settle(loop.time())
        else:
            changed = debouncer.edge(event.timestamp, event.active)
        if changed is not None:
            await on_change(changed)


class GpioBoard:
    """The lines of one board; ``watch_*`` start their tasks, ``close()`` ends them."""

    def __init__(
        self, device_id: str, pins: GpioPins, settings: GpioSettings, chip: GpioChip | None
    ) -> None:
        """Requests ``pins`` on ``chip`` (``GpioError`` if one cannot be had); None: no GPIO."""
        self.device_id = device_id
        self.chip = chip
        self._pins = pins
        self._settings = settings
        self._tasks: list[asyncio.Task[None]] = []
        self._tampered_at: float | None = None
        self.led: GpioLed | None = None
        """The status LED, if the board has one on GPIO."""
        self.door: DoorOpener | None = None
        """The door relay, if the board has one."""
        self._button: InputLine | None = None
        self._tamper: InputLine | None = None
        if chip is None:
            return
        if pins.status_led is not None:
            line = chip.request_output(pins.status_led)
            self.led = GpioLed(line, f"{chip.name} line {pins.status_led.line}")
        if pins.door_relay is not None:
            self.door = DoorOpener(device_id, chip.request_output(pins.door_relay), settings)
        if pins.call_button is not None:
            self._button = chip.request_input(pins.call_button)
        if pins.tamper_switch is not None:
            self._tamper = chip.request_input(pins.tamper_switch)

    @classmethod
    async def open(cls, device_id: str, pins: GpioPins, settings: GpioSettings) -> GpioBoard:
        """The board's lines on its chip (``settings.chip``, else the profile's); without
        GPIO (none configured, or it cannot be had: logged) a board that does nothing."""
        if not pins.used():
            return cls(device_id, pins, settings, None)
        spec = settings.chip or pins.chip
        chip: GpioChip | None = None
        try:
            chip = await open_chip(spec)
            board = cls(device_id, pins, settings, chip)
        except OSError as exc:  # GpioError, or a fake chip's socket
            logger.error("device %s: no GPIO (chip %s): %s", device_id, spec, exc)
            if chip is not None:
                await chip.close()
            return cls(device_id, pins, settings, None)
        logger.info("device %s: GPIO on %s: %s", device_id, chip.name, pins.used())
        return board

    def _start(self, name: str, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(job, name=f"{name}-{self.device_id}")
        self._tasks.append(task)

    # --- call button ---

    def watch_button(self, command: LocalCommand, phase: Callable[[], Phase]) -> None:
        """Act on presses: ``button_command`` for the ``phase()`` at the press, run by
        ``command``. A press that races a change of call (an invite arriving) may be
        refused by the runtime; the reply is logged and the next press acts on the new call."""
        line = self._button
        if line is None:
            return

        async def pressed(down: bool) -> None:
            if not down:
                return
            choice = button_command(phase(), self._settings.button_peer)
            if choice is None:
                logger.info("device %s: call button: no button_peer to call", self.device_id)
                return
            reply = await command(*choice)
            level = logging.INFO if reply.get("ok") else logging.WARNING
            logger.log(level, "device %s: call button: %s: %s", self.device_id, choice[0],
                       reply.get("message"))  # fmt: skip

        debouncer = Debouncer(self._settings.debounce_s, stable=line.value())
        self._start("call-button", watch(line, debouncer, pressed))

    # --- tamper switch ---

    def watch_tamper(self, submit: Submit) -> None:
        """Raise an alert when the enclosure opens (and at start if it is open)."""
        line = self._tamper
        if line is None:
            return
        self._start("tamper", self._watch_tamper(line, line.value(), submit))

    async def _watch_tamper(self, line: InputLine, opened: bool, submit: Submit) -> None:
        if opened:
            await self._tamper_changed(submit, True, at_start=True)

        async def changed(opened: bool) -> None:
            await self._tamper_changed(submit, opened)

        await watch(line, Debouncer(self._settings.debounce_s, stable=opened), changed)

    async def _tamper_changed(self, submit: Submit, opened: bool, at_start: bool = False) -> None:
        if not opened:
            logger.info("device %s: enclosure closed", self.device_id)
            return
        now = asyncio.get_running_loop().time()
        cooldown = self._settings.tamper_cooldown_s
        if self._tampered_at is not None and now - self._tampered_at < cooldown:
            logger.warning("device %s: enclosure opened again (no new alert within %g s)",
                           self.device_id, cooldown)  # fmt: skip
            return
        self._tampered_at = now
        assert self._pins.tamper_switch is not None
        alert = tamper_alert(
            self._pins.tamper_switch.line, time.time_ns() // 1_000_000, at_start=at_start
        )
        logger.warning("device %s: enclosure opened: tamper alert %s", self.device_id, alert.id)
        try:
            await submit(alert)
        except Exception:  # the outbox failed; the switch is still watched
            logger.exception("device %s: tamper alert %s not stored", self.device_id, alert.id)

    async def close(self) -> None:
        """Stop watching, release the door relay and the LED, release the lines."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.door is not None:
            self.door.close()
        if self.led is not None:
            await self.led.close()
        if self.chip is not None:
            await self.chip.close()


__all__ = ["GpioBoard", "button_command", "open_chip", "tamper_alert", "watch"]
