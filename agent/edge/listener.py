"""The detectors on the live capture stream: each detection becomes an alert in the
outbox (``AlertUplink.submit``), which sends it until the relay has stored it."""

from __future__ import annotations

import asyncio
import logging
import time

from agent.edge.pipeline import EdgeAnalyzer, EdgeSettings, to_alert
from agent.edge.uplink import AlertUplink

logger = logging.getLogger(__name__)


class EdgeListener:
    """``on_frame`` for a ``CaptureTee``; ``close()`` waits for alerts being stored."""

    def __init__(self, device_id: str, settings: EdgeSettings, uplink: AlertUplink) -> None:
        self._device_id = device_id
        self._analyzer = EdgeAnalyzer(settings)
        self._uplink = uplink
        self._stream_start_ms: int | None = None
        self._submits: set[asyncio.Task[str]] = set()

    def on_frame(self, frame: bytes) -> None:
        if self._stream_start_ms is None:
            self._stream_start_ms = time.time_ns() // 1_000_000
        for found in self._analyzer.feed(frame):
            alert = to_alert(found, self._stream_start_ms, time.time_ns() // 1_000_000)
            logger.warning("device %s: %s (%s, confidence %.2f): alert %s", self._device_id,
                           found.kind, found.detector, found.confidence, alert.id)  # fmt: skip
            task = asyncio.get_running_loop().create_task(self._uplink.submit(alert))
            self._submits.add(task)
            task.add_done_callback(self._submitted)

    def _submitted(self, task: asyncio.Task[str]) -> None:
        self._submits.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("device %s: alert not stored in the outbox: %s", self._device_id, exc)

    async def close(self) -> None:
        if self._submits:
            await asyncio.gather(*self._submits, return_exceptions=True)
