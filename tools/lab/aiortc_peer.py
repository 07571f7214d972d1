"""An aiortc peer for interop tests and benchmarks: a WebRTC stack nobody here wrote.

It sends a tone (or silence) on one audio track and keeps what it receives as
48 kHz mono int16, so a test can check which frequency arrived. Offers and
answers are plain SDP strings; aiortc gathers every candidate before it
returns a description (no trickle), so the SDP it hands out is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import math
import time

import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame, AudioResampler

from agent.audio.format import FRAME_SAMPLES, SAMPLE_RATE

logger = logging.getLogger(__name__)


class ToneTrack(MediaStreamTrack):
    """A paced 48 kHz mono sine (0 Hz gives silence), 20 ms per frame."""

    kind = "audio"

    def __init__(self, frequency: float, amplitude: float = 8000.0) -> None:
        super().__init__()
        self.frequency, self.amplitude = frequency, amplitude
        self._start: float | None = None
        self._sent = 0

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            await asyncio.sleep(max(0.0, self._start + self._sent / SAMPLE_RATE - now))
        n = np.arange(self._sent, self._sent + FRAME_SAMPLES)
        pcm = self.amplitude * np.sin(2 * math.pi * self.frequency * n / SAMPLE_RATE)
        frame = AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(pcm.astype("<i2").tobytes())
        frame.pts = self._sent
        frame.sample_rate = SAMPLE_RATE
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self._sent += FRAME_SAMPLES
        return frame


class AiortcPeer:
    """One aiortc RTCPeerConnection with a tone track out and a recorder on the track in."""

    def __init__(
        self,
        frequency: float = 440.0,
        *,
        ice_servers: list[RTCIceServer] | None = None,
        relay_only: bool = False,
    ) -> None:
        policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
        config = RTCConfiguration(iceServers=ice_servers or [], iceTransportPolicy=policy)
        self.pc = RTCPeerConnection(config)
        self.track = ToneTrack(frequency)
        self.pc.addTrack(self.track)
        self.received: list[bytes] = []
        self.first_audio = asyncio.get_running_loop().create_future()
        self._reader: asyncio.Task[None] | None = None
        self.pc.on("track", self._on_track)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(
                self._read(track), name="aiortc-rx"
            )

    async def _read(self, track: MediaStreamTrack) -> None:
        resampler = AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                assert isinstance(frame, AudioFrame)
                for out in resampler.resample(frame):
                    self.received.append(bytes(out.planes[0])[: out.samples * 2])
                if not self.first_audio.done():
                    self.first_audio.set_result(time.monotonic())

    def samples(self) -> np.ndarray:
        """Everything received so far as int16 samples."""
        return np.frombuffer(b"".join(self.received), "<i2")

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def answer(self, offer: str) -> str:
        await self.pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self.pc.localDescription.sdp

    async def accept(self, answer: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))

    async def close(self) -> None:
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
