"""The agent's one-line status for ``systemctl status``: what it is doing right now.

``AgentStatus`` holds what the run loop and the call runtime tell it; ``describe`` turns
that into the line (the ``ServiceNotifier`` sends it when it changes), e.g. "online,
idle", "in call with front-door", "broker 10.0.0.2:8883 unreachable (connection
refused), retrying in 8 s".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from agent.calls.machine import Indicator
from agent.signaling.mqtt import MqttSession, Outage

_CALL_PHRASES = {
    Indicator.CALLING: "calling {peer}",
    Indicator.REMOTE_RINGING: "calling {peer} (ringing there)",
    Indicator.RINGING: "ringing: call from {peer}",
    Indicator.CONNECTING: "connecting a call with {peer}",
    Indicator.IN_CALL: "in call with {peer}",
    Indicator.ANNOUNCING: "announcing to {peer}",
    Indicator.HEARING_ANNOUNCEMENT: "playing an announcement from {peer}",
    Indicator.LISTENING: "listening to {peer}",
    Indicator.BEING_LISTENED: "being listened to by {peer}",
    Indicator.ENDED: "online, call with {peer} ended",
}


def call_line(indicator: Indicator, peer: str | None) -> str:
    """The line while online: idle, or what the call is doing and with whom."""
    if indicator is Indicator.IDLE:
        return "online, idle"
    return _CALL_PHRASES[indicator].format(peer=peer or "?")


def outage_line(broker: str, outage: Outage, now: float) -> str:
    """ "broker HOST:PORT unreachable (why), retrying in N s"."""
    line = f"broker {broker} unreachable ({outage.reason})"
    if outage.retry_at is not None:
        line += f", retrying in {max(0, math.ceil(outage.retry_at - now))} s"
    return line


@dataclass
class AgentStatus:
    """Mutable on purpose: the run loop and the runtime update it as things happen."""

    clock: Callable[[], float]
    """The event loop's clock (retry times are on it)."""
    phase: str = "starting"
    """What the agent does before it has a session (pairing, opening audio, ...)."""
    session: MqttSession | None = None
    """Once set, the broker session's state decides the line."""
    connect_outage: Outage | None = None
    """While the first connection is retried (before ``session`` is set)."""
    indicator: Indicator = Indicator.IDLE
    peer: str | None = None
    broker: str = "?"
    """host:port of the broker, for the outage line."""

    def describe(self) -> str:
        if self.connect_outage is not None and self.session is None:
            return outage_line(self.broker, self.connect_outage, self.clock())
        if self.session is None:
            return self.phase
        if (outage := self.session.outage) is not None:
            return outage_line(self.broker, outage, self.clock())
        return call_line(self.indicator, self.peer)
