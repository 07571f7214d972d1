"""One full-duplex audio call over a datagram transport.

Three owned tasks: send (capture -> Opus -> RED -> RTP -> SRTP), playout
(jitter buffer -> Opus -> speaker, clocked by the speaker) and RTCP (reports,
RTT, loss feedback to the encoder). Receiving (SRTP -> RTP/RTCP -> RED ->
jitter buffer) needs no task: the session is attached to its transport, which
hands it each datagram from the socket's read callback. Bad datagrams are
counted and dropped; they never end the call.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.audio.base import AudioSink, AudioSource, EndOfStream
from agent.audio.format import FRAME_SAMPLES, SAMPLE_RATE, SILENCE
from agent.codec.opus import CodecError, OpusConfig, OpusDecoder, OpusEncoder
from agent.media import rtcp
from agent.media.jitterbuffer import JitterBuffer, JitterConfig, PlayoutKind, PushResult
from agent.media.red import RedEncoder, RedError, split_red, spread_offsets
from agent.media.rtp import HEADER_SIZE, RtpError, is_rtcp, pack_media, parse_media
from agent.media.srtp import Keying, SrtpContext, SrtpError
from agent.media.stats import ReceiverStats
from agent.net.transport import PushTransport, TransportClosed

logger = logging.getLogger(__name__)

_TS_MASK = 0xFFFFFFFF
_SOME_LOSS = 0.005  # below this the decaying loss estimate counts as a clean link


@dataclass(frozen=True, slots=True)
class MediaConfig:
    """Per-call media settings; both ends must agree on payload types (SDP does that later)."""

    opus: OpusConfig = field(default_factory=OpusConfig)
    opus_payload_type: int = 111
    """Dynamic payload type of opus/48000/2 (the WebRTC convention)."""
    red_payload_type: int = 63
    """Payload type of red/48000/2 (what Chrome offers)."""
    red_distance: int = 5
    """Most earlier frames repeated in each packet (RFC 2198); 0 turns RED off. The sender
    repeats one frame while the peer reports no loss, two under loss, this many under heavy
    loss (``red_heavy_loss``), spread out to ``red_reach``: bursts of loss need the deeper
    history, a clean link does not. Five cost about six times the audio bitrate (~190 kbit/s
    at 32 kbit/s Opus) while the loss lasts."""
    red_reach: int = 8
    """Under heavy loss, how far back the ``red_distance`` copies reach
    (``agent.media.red.spread_offsets``): a burst of up to this many packets loses no frame.
    The peer's jitter buffer then waits as many frames for the copies (180 ms at 8). With a
    mean burst of 3 at 10 % loss, five copies reaching 8 leave 0.45 % of frames to
    concealment, reaching 5 (contiguous) 1.3 %."""
    red_heavy_loss: float = 0.03
    """Reported loss fraction from which the full ``red_distance`` is used."""
    jitter: JitterConfig = field(default_factory=JitterConfig)
    rtcp_interval_s: float = 1.0
    """Mean RTCP report interval; each one is randomised by +-50% (RFC 3550 6.2)."""
    media_timeout_s: float = 10.0
    """End the call when nothing valid arrives from the peer for this long."""
    cname: str = "edge-intercom"

    def __post_init__(self) -> None:
        spread_offsets(self.red_distance, self.red_reach)  # raises ValueError if out of range
        for pt in (self.opus_payload_type, self.red_payload_type):
            if not 96 <= pt <= 127 and not 35 <= pt <= 63:
                raise ValueError(f"payload type {pt} is not a dynamic one")


class EndReason(enum.Enum):
    LOCAL_HANGUP = "local hangup"
    REMOTE_BYE = "remote hangup"
    MEDIA_TIMEOUT = "no media from peer"
    TRANSPORT_CLOSED = "transport closed"
    SOURCE_ENDED = "audio source ended"


@dataclass(frozen=True, slots=True)
class MediaStats:
    """A snapshot for telemetry and the demo's live line."""

    packets_sent: int
    packets_received: int
    packets_lost: int
    loss_fraction: float
    """Loss the peer sees on our stream, from its last RTCP report (0..1)."""
    jitter_ms: float
    rtt_ms: float | None
    jitter_target_ms: float
    jitter_buffered_ms: float
    played: int
    fec_recovered: int
    concealed: int
    red_recovered: int
    late: int
    dropped_for_latency: int
    srtp_auth_failed: int
    srtp_replayed: int
    malformed: int
    wrong_ssrc: int
    unknown_payload_type: int
    decode_errors: int
    encoder_loss_hint: int


class MediaSession:
    """Runs one call until ``close()`` or until it ends by itself (see ``ended``)."""

    def __init__(
        self,
        transport: PushTransport,
        keying: Keying,
        source: AudioSource,
        sink: AudioSink,
        config: MediaConfig = MediaConfig(),
        *,
        remote_red: bool = True,
        send: bool = True,
        call_id: str = "-",
        ssrc: int | None = None,
    ) -> None:
        """``ssrc``: what we send with, the one our SDP announced (None: a random one).
        Browsers demultiplex by it: RTP from another SSRC than the answer's ``a=ssrc``
        is counted but played as silence by Chromium."""
        self._transport = transport
        self._keying = keying
        self._source = source
        self._sink = sink
        self._config = config
        self._send_red = remote_red and config.red_distance > 0
        self._send = send
        self._opus_pt = config.opus_payload_type
        self._red_pt = config.red_payload_type
        self._log = logging.LoggerAdapter(logger, {"call": call_id})
        self._call_id = call_id
        self._srtp: SrtpContext | None = None
        self._encoder = OpusEncoder(config.opus)
        self._decoder = OpusDecoder()
        self._red = (
            RedEncoder(min(1, config.red_distance), payload_type=config.opus_payload_type)
            if self._send_red
            else None
        )
        self._jitter = JitterBuffer(config.jitter)
        # FEC alone reaches back one frame; RED packets tell how far theirs reaches.
        self._jitter.set_recovery_frames(1)
        self._peer_red_reach = 0  # RTP timestamp units
        self._frame_samples = config.jitter.frame_samples
        self._rx_stats = ReceiverStats(SAMPLE_RATE)
        self.ssrc = struct.unpack("!I", os.urandom(4))[0] if ssrc is None else ssrc
        self._seq = struct.unpack("!H", os.urandom(2))[0]
        self._ts = struct.unpack("!I", os.urandom(4))[0]
        self._remote_ssrc: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ended: asyncio.Future[EndReason] | None = None
        self._first_audio: asyncio.Future[float] | None = None
        self._closed = False
        self.bye_reason = ""
        """The peer's RTCP BYE reason for leaving (our agents send the call end reason)."""
        self._attached = False
        # The loop's clock (asyncio's default), bound in start(): one call per datagram.
        self._clock: Callable[[], float] = time.monotonic
        self._last_rx = 0.0
        self._last_sr_ntp32 = 0
        self._last_sr_arrival = 0.0
        self._last_tx_time = 0.0
        self._octets_sent = 0
        self._rtt: float | None = None
        self._loss_fraction = 0.0
        self._loss_estimate = 0.0
        self._packets_sent = 0
        self._red_recovered = 0
        self._auth_failed = 0
        self._replayed = 0
        self._malformed = 0
        self._wrong_ssrc = 0
        self._unknown_pt = 0
        self._decode_errors = 0

    async def start(self) -> None:
        """Key the session and start media; returns once the tasks run."""
        loop = asyncio.get_running_loop()
        self._ended = loop.create_future()
        self._first_audio = loop.create_future()
        self._srtp = SrtpContext(await self._keying.keys())
        self._clock = loop.time
        self._last_rx = loop.time()
        loops = {
            "send": self._send_loop,
            "playout": self._playout_loop,
            "rtcp": self._rtcp_loop,
        }
        if not self._send:
            del loops["send"]  # receive only: the microphone is not even read
        for name, run in loops.items():
            self._tasks.append(loop.create_task(run(), name=f"media-{name}-{self._call_id}"))
        self._log.info("media started ssrc=%08x red=%s", self.ssrc, self._send_red)
        self._attached = True
        self._transport.attach(self)  # what arrived meanwhile is handed over now

    @property
    def running(self) -> bool:
        """Started and not ended."""
        return self._ended is not None and not self._ended.done()

    async def ended(self) -> EndReason:
        """Wait until the session ends by itself or is closed."""
        assert self._ended is not None, "start() first"
        return await asyncio.shield(self._ended)

    async def first_audio(self) -> float:
        """Loop time at which the first frame from the peer was decoded for playback."""
        assert self._first_audio is not None, "start() first"
        return await asyncio.shield(self._first_audio)

    def _end(self, reason: EndReason) -> None:
        if self._ended is not None and not self._ended.done():
            self._log.info("media ending: %s", reason.value)
            self._ended.set_result(reason)

    async def close(
        self, reason: EndReason = EndReason.LOCAL_HANGUP, *, why: str = ""
    ) -> EndReason:
        """Stop every task, say BYE to the peer (best effort, ``why`` as its reason for
        leaving) and return why it ended.

        Closing again, or closing a session that never started, only returns the reason.
        """
        if self._ended is None:
            return reason
        if self._closed:
            return self._ended.result()
        self._closed = True
        self._end(reason)
        self._detach()
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        final = self._ended.result()
        if final is not EndReason.REMOTE_BYE and final is not EndReason.TRANSPORT_CLOSED:
            await self._send_rtcp(bye=True, why=why)
        return final

    # -- sending ---------------------------------------------------------------

    async def _send_loop(self) -> None:
        opus_pt = self._opus_pt
        red_pt = self._red_pt
        ssrc = self.ssrc
        read = self._source.read
        encode = self._encoder.encode
        red = self._red
        send = self._transport.send
        assert self._srtp is not None
        protect = self._srtp.protect
        clock = self._clock
        stale = self._source.discard_pending()
        if stale:
            self._log.debug("dropped %d frames captured before the call", stale)
        try:
            while True:
                payload = encode(await read())
                ts = self._ts
                if red is not None:
                    packet = pack_media(red_pt, self._seq, ts, ssrc, red.encode(ts, payload))
                else:
                    packet = pack_media(opus_pt, self._seq, ts, ssrc, payload)
                await send(protect(packet))
                self._last_tx_time = clock()
                self._packets_sent += 1
                self._octets_sent += len(packet) - HEADER_SIZE
                self._seq = (self._seq + 1) & 0xFFFF
                self._ts = (ts + FRAME_SAMPLES) & _TS_MASK
        except EndOfStream:
            self._end(EndReason.SOURCE_ENDED)
        except TransportClosed:
            self._end(EndReason.TRANSPORT_CLOSED)

    # -- receiving -------------------------------------------------------------

    def datagram_received(self, data: bytes) -> None:
        """One datagram from the peer: called by the transport the session is attached to."""
        now = self._clock()
        try:
            if is_rtcp(data):
                self._on_rtcp(data, now)
            else:
                self._on_rtp(data, now)
        except Exception:
            # A bug, not bad input (that is counted and dropped above): stop receiving, as
            # a failed receive task would; no media then ends the call.
            self._log.exception("receiving failed; no longer receiving")
            self._detach()

    def transport_closed(self, reason: str) -> None:
        """The transport ended: called by the transport the session is attached to."""
        self._attached = False
        self._log.debug("transport closed: %s", reason)
        self._end(EndReason.TRANSPORT_CLOSED)

    def _detach(self) -> None:
        if self._attached:
            self._attached = False
            self._transport.detach()

    def _unprotect(self, data: bytes, rtcp_packet: bool) -> bytes | None:
        assert self._srtp is not None
        try:
            if rtcp_packet:
                return self._srtp.unprotect_rtcp(data)
            return self._srtp.unprotect(data)
        except SrtpError as exc:
            if exc.replay:
                self._replayed += 1
            else:
                self._auth_failed += 1
            if self._log.isEnabledFor(logging.DEBUG):
                self._log.debug("dropped %d-byte datagram: %s", len(data), exc)
            return None

    def _on_rtp(self, data: bytes, now: float) -> None:
        plain = self._unprotect(data, False)
        if plain is None:
            return
        try:
            pt, sequence, timestamp, ssrc, payload = parse_media(plain)
        except RtpError as exc:
            self._drop_malformed(exc)
            return
        if self._remote_ssrc is None:
            self._remote_ssrc = ssrc
        elif ssrc != self._remote_ssrc:
            self._wrong_ssrc += 1
            return
        jitter = self._jitter
        if pt == self._red_pt:
            try:
                blocks = split_red(payload)
            except RedError as exc:
                self._drop_malformed(exc)
                return
            opus_pt = self._opus_pt
            for block_pt, _, _ in blocks:
                if block_pt != opus_pt:
                    self._unknown_pt += 1
                    return
            primary = blocks.pop()
            reach = blocks[0][1] if blocks else 0  # the oldest block comes first
            if reach != self._peer_red_reach:
                self._peer_red_reach = reach
                jitter.set_recovery_frames(max(1, -(-reach // self._frame_samples)))
            for _, offset, block in blocks:
                ts = (timestamp - offset) & _TS_MASK
                if jitter.push(ts, block, now, redundant=True) is PushResult.ACCEPTED:
                    self._red_recovered += 1
            jitter.push(timestamp, primary[2], now)
        elif pt == self._opus_pt:
            jitter.push(timestamp, payload, now)
        else:
            self._unknown_pt += 1
            return
        self._rx_stats.update(sequence, timestamp, now)
        self._last_rx = now

    def _drop_malformed(self, exc: Exception) -> None:
        self._malformed += 1
        if self._log.isEnabledFor(logging.DEBUG):
            self._log.debug("dropped malformed packet: %s", exc)

    def _on_rtcp(self, data: bytes, now: float) -> None:
        plain = self._unprotect(data, True)
        if plain is None:
            return
        try:
            packets = rtcp.parse_compound(plain)
        except rtcp.RtcpError as exc:
            self._drop_malformed(exc)
            return
        self._last_rx = now
        arrival32 = rtcp.ntp_middle32(rtcp.ntp_now(time.time()))
        for p in packets:
            if isinstance(p, rtcp.SenderReport):
                self._last_sr_ntp32 = rtcp.ntp_middle32(p.ntp_timestamp)
                self._last_sr_arrival = now
            if isinstance(p, rtcp.SenderReport | rtcp.ReceiverReport):
                for block in p.reports:
                    if block.ssrc == self.ssrc:
                        self._on_report(block, arrival32)
            elif isinstance(p, rtcp.Bye):
                self._on_bye(p)

    def _on_bye(self, bye: rtcp.Bye) -> None:
        """The peer leaves if the BYE names the source we hear (any source, before we
        hear one); a BYE for another source, or for none, changes nothing."""
        ours = self._remote_ssrc
        if not bye.ssrcs or (ours is not None and ours not in bye.ssrcs):
            self._wrong_ssrc += 1
            if self._log.isEnabledFor(logging.DEBUG):
                self._log.debug("ignored a BYE for %s", [f"{s:08x}" for s in bye.ssrcs])
            return
        self.bye_reason = bye.reason
        self._end(EndReason.REMOTE_BYE)

    def _on_report(self, block: rtcp.ReportBlock, arrival32: int) -> None:
        rtt = rtcp.rtt_from_report(block, arrival32)
        if rtt is not None:
            self._rtt = rtt
        self._loss_fraction = block.fraction_lost / 256.0
        # Fast attack, slow release: one lucky interval must not switch protection off.
        self._loss_estimate = max(
            self._loss_fraction, 0.9 * self._loss_estimate + 0.1 * self._loss_fraction
        )
        # Size in-band FEC to the loss that RED leaves: a frame is gone only when it and its
        # `distance` repeats are all lost. FEC bits come out of the primary frame (at 32 kbit/s
        # a 10 % hint costs ~0.7 PESQ on clean speech), so it must not duplicate RED's work.
        distance = 0
        loss = self._loss_estimate
        if self._red is not None:
            full = self._config.red_distance
            if loss >= self._config.red_heavy_loss:
                distance = full
                self._red.set_distance(full, self._config.red_reach)
            else:
                distance = min(full, 2 if loss >= _SOME_LOSS else 1)
                self._red.set_distance(distance)
        self._encoder.set_packet_loss(round(100 * loss ** (1 + distance)))

    # -- playout ---------------------------------------------------------------

    async def _playout_loop(self) -> None:
        pop = self._jitter.pop
        write = self._sink.write
        clock = asyncio.get_running_loop().time
        decoder = self._decoder
        started = False
        while True:
            out = pop(clock())
            kind = out.kind
            try:
                if kind is PlayoutKind.NORMAL:
                    assert out.payload is not None
                    pcm = decoder.decode(out.payload)
                    if not started:
                        started = True
                        assert self._first_audio is not None
                        self._first_audio.set_result(clock())
                elif kind is PlayoutKind.FEC:
                    assert out.payload is not None
                    pcm = decoder.decode_fec(out.payload)
                elif started:
                    pcm = decoder.conceal()
                else:
                    pcm = SILENCE
            except CodecError as exc:
                self._decode_errors += 1
                if self._log.isEnabledFor(logging.DEBUG):
                    self._log.debug("decode failed: %s", exc)
                pcm = decoder.conceal() if started else SILENCE
            await write(pcm)

    # -- RTCP ------------------------------------------------------------------

    async def _rtcp_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self._config.rtcp_interval_s
        try:
            while True:
                await asyncio.sleep(interval * random.uniform(0.5, 1.5))
                if loop.time() - self._last_rx > self._config.media_timeout_s:
                    self._end(EndReason.MEDIA_TIMEOUT)
                    return
                await self._send_rtcp(bye=False)
        except TransportClosed:
            self._end(EndReason.TRANSPORT_CLOSED)

    def _report_blocks(self) -> tuple[rtcp.ReportBlock, ...]:
        if self._remote_ssrc is None:
            return ()
        dlsr = 0
        if self._last_sr_ntp32:
            elapsed = asyncio.get_running_loop().time() - self._last_sr_arrival
            dlsr = int(elapsed * 65536) & 0xFFFFFFFF
        return (self._rx_stats.report_block(self._remote_ssrc, self._last_sr_ntp32, dlsr),)

    async def _send_rtcp(self, *, bye: bool, why: str = "") -> None:
        if self._srtp is None:
            return
        now = asyncio.get_running_loop().time()
        blocks = self._report_blocks()
        report: rtcp.SenderReport | rtcp.ReceiverReport
        if self._packets_sent:
            rtp_ts = (self._ts + int((now - self._last_tx_time) * SAMPLE_RATE)) & _TS_MASK
            report = rtcp.SenderReport(
                ssrc=self.ssrc,
                ntp_timestamp=rtcp.ntp_now(time.time()),
                rtp_timestamp=rtp_ts,
                packet_count=self._packets_sent & 0xFFFFFFFF,
                octet_count=self._octets_sent & 0xFFFFFFFF,
                reports=blocks,
            )
        else:
            report = rtcp.ReceiverReport(ssrc=self.ssrc, reports=blocks)
        packets: list[rtcp.RtcpPacket] = [report, rtcp.Sdes(((self.ssrc, self._config.cname),))]
        if bye:
            packets.append(rtcp.Bye((self.ssrc,), why))
        try:
            await self._transport.send(self._srtp.protect_rtcp(rtcp.serialize_compound(packets)))
        except TransportClosed:
            if not bye:
                raise

    # -- statistics ------------------------------------------------------------

    @property
    def stats(self) -> MediaStats:
        jb = self._jitter.stats
        rx = self._rx_stats
        return MediaStats(
            packets_sent=self._packets_sent,
            packets_received=rx.packets_received,
            packets_lost=rx.packets_lost,
            loss_fraction=self._loss_fraction,
            jitter_ms=rx.jitter_ms,
            rtt_ms=None if self._rtt is None else self._rtt * 1000.0,
            jitter_target_ms=jb.target_delay_ms,
            jitter_buffered_ms=jb.buffered_ms,
            played=jb.played,
            fec_recovered=jb.fec,
            concealed=jb.plc,
            red_recovered=self._red_recovered,
            late=jb.late,
            dropped_for_latency=jb.dropped_for_latency,
            srtp_auth_failed=self._auth_failed,
            srtp_replayed=self._replayed,
            malformed=self._malformed,
            wrong_ssrc=self._wrong_ssrc,
            unknown_payload_type=self._unknown_pt,
            decode_errors=self._decode_errors,
            encoder_loss_hint=self._encoder.packet_loss,
        )
