"""What a service tells systemd while it runs: READY, STATUS, WATCHDOG, RELOADING, STOPPING.

``WATCHDOG=1`` goes out every half ``WatchdogSec=`` from a task on the event loop, and
only while every health check passes. So a loop that is stuck (a blocking call, a busy
loop) sends nothing because the task never runs, and a part that is stuck while the loop
runs (no microphone frames, an outbox write that never returns) stops the pings through
its check: either way systemd kills and restarts the service. The STATUS line is made
afresh by ``describe`` at each tick and whenever the owner calls ``refresh``, and sent
only when it changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from agent.service.systemd import notify, watchdog_interval

logger = logging.getLogger(__name__)

HealthCheck = Callable[[], str | None]
"""None while healthy, else what is wrong (it goes into the log and the STATUS line)."""

STATUS_PERIOD_S = 5.0
"""How often the STATUS line is refreshed when there is no watchdog to ping."""


def problems(checks: dict[str, HealthCheck]) -> list[str]:
    """What the checks report, each as "name: problem"; a check that raises is a problem."""
    found = []
    for name, check in checks.items():
        try:
            problem = check()
        except Exception as exc:
            problem = f"check failed: {exc!r}"
        if problem is not None:
            found.append(f"{name}: {problem}")
    return found


class ServiceNotifier:
    """The owner starts it, adds checks, says ``ready()`` once it serves, ``reloading()``
    and ``ready()`` around a restart in place, ``stopping()`` when asked to end, and
    closes it last."""

    def __init__(
        self,
        describe: Callable[[], str],
        *,
        watchdog_s: float | None = None,
        send: Callable[..., bool] = notify,
    ) -> None:
        self._describe = describe
        self._watchdog_s = watchdog_s if watchdog_s is not None else watchdog_interval()
        self._send = send
        self._checks: dict[str, HealthCheck] = {}
        self._status: str | None = None
        self._unhealthy: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._held = False  # reloading or stopping: that line stands until ready()
        self.pings = 0

    @property
    def watchdog_s(self) -> float | None:
        return self._watchdog_s

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sd-notify")

    def add_check(self, name: str, check: HealthCheck) -> None:
        self._checks[name] = check

    def clear_checks(self) -> None:
        """Drop every check (their parts are closing)."""
        self._checks.clear()

    def ready(self) -> None:
        self._held = False
        self._status = self._line()
        self._send("READY=1", f"STATUS={self._status}")

    def reloading(self, why: str) -> None:
        self._hold("RELOADING=1", why)

    def stopping(self, why: str) -> None:
        self._hold("STOPPING=1", why)

    def _hold(self, state: str, why: str) -> None:
        self._held = True
        self._status = why
        self._send(state, f"STATUS={why}")

    def refresh(self) -> None:
        """Send the STATUS line if it changed."""
        if self._held:
            return
        line = self._line()
        if line != self._status:
            self._status = line
            self._send(f"STATUS={line}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    raise

    def _line(self) -> str:
        line = self._describe()
        if self._unhealthy:
            line += "; unhealthy: " + ", ".join(self._unhealthy)
        return line

    async def _run(self) -> None:
        period = self._watchdog_s / 2 if self._watchdog_s is not None else STATUS_PERIOD_S
        while True:
            found = problems(self._checks)
            if found != self._unhealthy:
                if found:
                    logger.error("unhealthy, so no watchdog pings: %s", "; ".join(found))
                else:
                    logger.warning("healthy again")
                self._unhealthy = found
            self.refresh()  # first: the ping after it says the status is current
            if self._watchdog_s is not None and not found:
                self._send("WATCHDOG=1")
                self.pings += 1
            await asyncio.sleep(period)
