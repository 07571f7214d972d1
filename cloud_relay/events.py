"""The relay's in-process pub/sub of what the dashboard shows live.

``Relay`` publishes (``presence``, ``alert``, ``call-started``, ``call-answered``,
``call-ended``, ``command-reply``) without ever waiting: each subscriber has its own
bounded queue, and a subscriber whose queue is full (a slow page) loses what it had
queued and gets one ``resync`` event instead, which tells it to read the state again
over the API. ``close()`` ends every subscription (``EventsClosed`` from ``get``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Final

from agent.edge.alerts import Alert
from cloud_relay.presence import Presence
from cloud_relay.routing import CallAnswered, CallEnded, CallEvent, CallStarted
from cloud_relay.service import RelayObserver

logger = logging.getLogger(__name__)

QUEUE: Final = 256
"""Events one subscriber may have waiting."""
RESYNC: Final = "resync"


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    """Increasing per relay process."""
    kind: str
    data: dict[str, Any]


class EventsClosed(Exception):
    """The bus closed: the subscriber's stream ends."""


_CLOSED: Final = Event(0, "", {})


class Subscription:
    """One subscriber's queue; ``get()`` the next event."""

    def __init__(self, size: int) -> None:
        self._queue: asyncio.Queue[Event] = asyncio.Queue(size)

    async def get(self) -> Event:
        event = await self._queue.get()
        if event is _CLOSED:
            raise EventsClosed
        return event

    def _put(self, event: Event) -> bool:
        """Queue ``event``; False (and a ``resync`` in place of what was queued) if full."""
        try:
            self._queue.put_nowait(event)
            return True
        except asyncio.QueueFull:
            self._drain()
            self._queue.put_nowait(Event(event.id, RESYNC, {}))
            return False

    def _close(self) -> None:
        self._drain()
        self._queue.put_nowait(_CLOSED)

    def _drain(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()


class EventBus:
    """Publishers call ``publish``; subscribers use ``subscribe()`` as a context manager."""

    def __init__(self, queue: int = QUEUE) -> None:
        self._size = queue
        self._subscribers: set[Subscription] = set()
        self._ids = itertools.count(1)
        self._closed = False
        self.published: Counter[str] = Counter()
        self.lagged = 0
        """Times a subscriber's queue was full (it was told to resync)."""

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        if self._closed:
            return
        event = Event(next(self._ids), kind, data)
        self.published[kind] += 1
        for sub in self._subscribers:
            if not sub._put(event):
                self.lagged += 1
                logger.info("an event subscriber lagged: told to resync")

    @contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        sub = Subscription(self._size)
        if self._closed:
            sub._close()
        self._subscribers.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)

    def close(self) -> None:
        self._closed = True
        for sub in self._subscribers:
            sub._close()


class RelayEvents(RelayObserver):
    """Publishes on ``bus`` what the relay takes in (given to ``Relay`` as an observer)."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._states: dict[str, str] = {}
        """Each device's last state: presence reports that change nothing are not events."""

    def presence(self, device: str, presence: Presence) -> None:
        if self._states.get(device) == presence.state:
            return
        self._states[device] = presence.state
        data = {"device": device, "state": presence.state, "board": presence.board,
                "version": presence.version}  # fmt: skip
        self._bus.publish("presence", data)

    def alert(self, device: str, alert: Alert) -> None:
        body = alert.to_dict()
        body.pop("clip", None)  # the API serves it; an event stays small
        self._bus.publish("alert", {"device": device, "alert": body})

    def call(self, event: CallEvent) -> None:
        kind = {CallStarted: "call-started", CallAnswered: "call-answered",
                CallEnded: "call-ended"}[type(event)]  # fmt: skip
        self._bus.publish(kind, asdict(event))

    def command_reply(self, device: str, cmd_id: str, status: str, reply: dict[str, Any]) -> None:
        self._bus.publish("command-reply", {"device": device, "id": cmd_id, "status": status,
                                            "reply": reply})  # fmt: skip
