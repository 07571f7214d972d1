"""An aiortc peer for interop tests and benchmarks: a WebRTC stack nobody here wrote.

It sends a tone (or silence, or a looped recording) on one audio track and keeps
what it receives as 48 kHz mono int16, so a test can check which frequency
arrived; a benchmark can have it only count what it receives. Offers and
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
    RTCInboundRtpStreamStats,
    RTCOutboundRtpStreamStats,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame, AudioResampler

from agent.audio.format import FRAME_SAMPLES, SAMPLE_RATE

logger = logging.getLogger(__name__)


class PacedTrack(MediaStreamTrack):
    """48 kHz mono int16 frames of 20 ms, handed out in real time; subclasses make the samples."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._start: float | None = None
        self._sent = 0

    def samples(self, first: int, count: int) -> np.ndarray:
        """Samples ``first`` to ``first + count`` of the stream."""
        raise NotImplementedError

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            await asyncio.sleep(max(0.0, self._start + self._sent / SAMPLE_RATE - now))
        pcm = self.samples(self._sent, FRAME_SAMPLES)
        frame = AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(pcm.astype("<i2").tobytes())
        frame.pts = self._sent
        frame.sample_rate = SAMPLE_RATE
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self._sent += FRAME_SAMPLES
        return frame


class ToneTrack(PacedTrack):
    """A paced 48 kHz mono sine (0 Hz gives silence), 20 ms per frame."""

    def __init__(self, frequency: float, amplitude: float = 8000.0) -> None:
        super().__init__()
        self.frequency, self.amplitude = frequency, amplitude

    def samples(self, first: int, count: int) -> np.ndarray:
        n = np.arange(first, first + count)
        return self.amplitude * np.sin(2 * math.pi * self.frequency * n / SAMPLE_RATE)


class LoopTrack(PacedTrack):
    """A paced recording (48 kHz mono int16, held in memory) played over and over."""

    def __init__(self, recording: np.ndarray) -> None:
        super().__init__()
        if len(recording) < FRAME_SAMPLES:
            raise ValueError(f"recording shorter than one frame ({FRAME_SAMPLES} samples)")
        # Two copies end to end: any frame is one slice, wherever the loop point falls.
        self._looped = np.concatenate([recording, recording]).astype(np.int16)
        self._length = len(recording)

    def samples(self, first: int, count: int) -> np.ndarray:
        start = first % self._length
        return self._looped[start : start + count]


class AiortcPeer:
    """One aiortc RTCPeerConnection with a tone track out and a recorder on the track in.

    ``source`` replaces the tone; with ``record`` False the track in is read (so aiortc
    decodes it) and counted but not kept.
    """

    def __init__(
        self,
        frequency: float = 440.0,
        *,
        ice_servers: list[RTCIceServer] | None = None,
        relay_only: bool = False,
        source: PacedTrack | None = None,
        record: bool = True,
    ) -> None:
        policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
        config = RTCConfiguration(iceServers=ice_servers or [], iceTransportPolicy=policy)
        self.pc = RTCPeerConnection(config)
        self.track = source if source is not None else ToneTrack(frequency)
        self.pc.addTrack(self.track)
        self.record = record
        self.received: list[bytes] = []
        self.frames_received = 0
        """Decoded frames read from the track in."""
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
                self.frames_received += 1
                if self.record:
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

    async def rtp_packets(self) -> tuple[int, int]:
        """RTP packets sent and received so far, from aiortc's statistics."""
        report = await self.pc.getStats()
        sent = sum(
            s.packetsSent for s in report.values() if isinstance(s, RTCOutboundRtpStreamStats)
        )
        received = sum(
            s.packetsReceived for s in report.values() if isinstance(s, RTCInboundRtpStreamStats)
        )
        return sent, received

    async def close(self) -> None:
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
