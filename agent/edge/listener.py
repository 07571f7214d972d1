"""The detectors on the live capture stream: each detection becomes an alert in the
outbox (``AlertUplink.submit``), which sends it until the relay has stored it.

With clips on (``ClipRecorder``), an alert that gets one is stored *held* at once (so a
crash while its clip is made loses the clip, not the alert), then released with its
clip a few seconds later, or without one if there can be none."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Coroutine
from typing import Any

from agent.edge.alerts import Alert
from agent.edge.base import Detection
from agent.edge.level import SoundLevel
from agent.edge.pipeline import EdgeAnalyzer, EdgeSettings, to_alert
from agent.edge.recorder import ClipRecorder
from agent.edge.uplink import AlertUplink
from agent.service.systemd import journal_fields

logger = logging.getLogger(__name__)


class EdgeListener:
    """``on_frame`` for a ``CaptureTee``; ``close()`` waits for alerts being stored."""

    def __init__(
        self,
        device_id: str,
        settings: EdgeSettings,
        uplink: AlertUplink,
        recorder: ClipRecorder | None = None,
    ) -> None:
        """``recorder``: makes the clips of alerts that want one (None: no clips)."""
        self._device_id = device_id
        self._analyzer = EdgeAnalyzer(settings)
        self._uplink = uplink
        self._recorder = recorder
        self._stream_start_ms: int | None = None
        self._submits: set[asyncio.Task[object]] = set()

    def reconfigure(self, settings: EdgeSettings) -> None:
        """New detector settings (a reload): the detectors start afresh from the next
        frame, which is their new time zero."""
        self._analyzer = EdgeAnalyzer(settings)
        self._stream_start_ms = None

    def take_levels(self) -> SoundLevel | None:
        """The microphone's A-weighted level since the last call (telemetry); None: no
        audio since (a reload starts the count afresh)."""
        return self._analyzer.levels.take()

    def on_frame(self, frame: bytes) -> None:
        if self._stream_start_ms is None:
            self._stream_start_ms = time.time_ns() // 1_000_000
        if self._recorder is not None:
            self._recorder.on_frame(frame)
        for found in self._analyzer.feed(frame):
            alert = to_alert(found, self._stream_start_ms, time.time_ns() // 1_000_000)
            # Its lines (and its storing task's) carry its id in the journal.
            with journal_fields(ALERT_ID=alert.id):
                self._raise(found, alert)

    def _raise(self, found: Detection, alert: Alert) -> None:
        logger.warning("device %s: %s (%s, confidence %.2f): alert %s", self._device_id,
                       found.kind, found.detector, found.confidence, alert.id)  # fmt: skip
        recorder = self._recorder
        job: Coroutine[Any, Any, object]
        if recorder is not None and recorder.wants(alert.kind):
            job = self._submit_with_clip(alert, recorder)
        else:
            job = self._uplink.submit(alert)
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(
            job, name=f"alert-{alert.id[:8]}"
        )
        self._submits.add(task)
        task.add_done_callback(self._submitted)

    async def _submit_with_clip(self, alert: Alert, recorder: ClipRecorder) -> bool:
        await self._uplink.submit(alert, held=True)
        clip = None
        try:
            clip = await recorder.clip_for(alert.id)
        finally:
            # Cancelled or failed, the alert still goes (without its clip).
            final = alert if clip is None else dataclasses.replace(alert, clip=clip)
            released = await asyncio.shield(self._uplink.release(final))
        return released

    def _submitted(self, task: asyncio.Task[object]) -> None:
        self._submits.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("device %s: alert not stored in the outbox: %s", self._device_id, exc)

    async def close(self) -> None:
        """Finish the clips being collected with the audio they have, and wait until every
        alert is in the outbox."""
        if self._recorder is not None:
            self._recorder.cut_short()
        if self._submits:
            await asyncio.gather(*self._submits, return_exceptions=True)
