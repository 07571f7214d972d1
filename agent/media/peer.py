"""One WebRTC-compatible audio call: SDP offer/answer, ICE, DTLS-SRTP, then the media session.

The order is the one every WebRTC stack follows, so a browser or aiortc can be
the other end: the offerer describes itself (ICE credentials, certificate
fingerprint, codecs), the answerer narrows that down, candidates trickle both
ways, ICE picks a pair, DTLS runs over it and yields the SRTP keys, and only
then does audio flow. How the descriptions travel (MQTT, a test's pipe) is the
caller's business; this class only produces and consumes SDP text and
candidates.

One ICE component carries everything: STUN inside ICE, DTLS and SRTP/SRTCP
told apart by their first byte (``Demux``). The call ends when the media
session ends (BYE, no media, transport gone), when the peer closes DTLS, or
on ``close()``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from agent.audio.base import AudioSink, AudioSource
from agent.media import sdp
from agent.media.dtls import DtlsCertificate, DtlsError, DtlsKeying, DtlsRole, DtlsTimers
from agent.media.session import EndReason, MediaConfig, MediaSession
from agent.media.srtp import SrtpProfile
from agent.net.candidate import Candidate
from agent.net.demux import Demux
from agent.net.ice import IceConfig, IceError, IceTransport
from agent.net.transport import TransportClosed

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """Everything one call needs besides its audio ends and the device certificate."""

    ice: IceConfig = field(default_factory=IceConfig)
    """STUN/TURN servers, candidate policy and ICE timers."""
    media: MediaConfig = field(default_factory=MediaConfig)
    """Codec, RED, jitter buffer and RTCP settings; payload types come from the SDP."""
    dtls: DtlsTimers = field(default_factory=DtlsTimers)
    """DTLS retransmission and handshake timers."""
    srtp_profiles: tuple[SrtpProfile, ...] = (
        SrtpProfile.AEAD_AES_128_GCM,
        SrtpProfile.AES_CM_128_HMAC_SHA1_80,
    )
    """SRTP protection profiles we accept, most preferred first."""
    red: bool = True
    """Offer and accept RED (RFC 2198) redundancy."""
    direction: sdp.Direction = sdp.Direction.SENDRECV
    """What we want to do; the answer may narrow it (a peer that only listens)."""


class CallSetupError(Exception):
    """The call could not be set up; the message says which step failed and why."""


class MediaPeer:
    """One side of one call. Offerer: ``create_offer``, ``accept_answer``, ``connect``.
    Answerer: ``accept_offer``, ``connect``. Both: trickle with ``local_candidates`` and
    ``add_remote_candidate``; ``close`` ends the call and frees everything.
    """

    def __init__(
        self,
        config: PeerConfig,
        certificate: DtlsCertificate,
        source: AudioSource,
        sink: AudioSink,
        *,
        call_id: str = "-",
    ) -> None:
        self._config = config
        self._certificate = certificate
        self._source, self._sink = source, sink
        self._call_id = call_id
        self._log = logging.LoggerAdapter(logger, {"call": call_id})
        self._ssrc = int.from_bytes(os.urandom(4), "big")
        self._session_id = secrets.randbits(62)
        self._ice: IceTransport | None = None
        self._offer: sdp.SessionDescription | None = None
        self._negotiated: sdp.NegotiatedMedia | None = None
        self._demux: Demux | None = None
        self._dtls: DtlsKeying | None = None
        self._session: MediaSession | None = None
        self._watch: asyncio.Task[None] | None = None
        self._closed = False

    # -- offer/answer ----------------------------------------------------------

    def _local(self, ice: IceTransport, candidates: tuple[Candidate, ...]) -> sdp.LocalParameters:
        params = ice.local_parameters
        return sdp.LocalParameters(
            ice_ufrag=params.ufrag,
            ice_pwd=params.pwd,
            fingerprint=self._certificate.fingerprint,
            ssrc=self._ssrc,
            cname=self._config.media.cname,
            session_id=self._session_id,
            candidates=candidates,
            end_of_candidates=bool(candidates),
            opus_payload_type=self._config.media.opus_payload_type,
            red_payload_type=self._config.media.red_payload_type if self._config.red else None,
            direction=self._config.direction,
        )

    async def _gathered(self, ice: IceTransport, trickle: bool) -> tuple[Candidate, ...]:
        if trickle:
            return ()
        return tuple([c async for c in ice.gather()])

    async def create_offer(self, *, trickle: bool = True) -> str:
        """Our offer. With ``trickle`` it carries no candidates (``local_candidates`` yields
        them); without, it waits for gathering and carries them all."""
        if self._ice is not None:
            raise RuntimeError("this call already has an offer or an answer")
        self._ice = IceTransport(self._config.ice, controlling=True, name=self._call_id)
        candidates = await self._gathered(self._ice, trickle)
        self._offer = sdp.create_offer(self._local(self._ice, candidates))
        return sdp.serialize(self._offer)

    async def accept_offer(self, offer: str, *, trickle: bool = True) -> str:
        """Answer the peer's offer; raises ``sdp.SdpError`` when we cannot accept it."""
        if self._ice is not None:
            raise RuntimeError("this call already has an offer or an answer")
        remote = sdp.parse(offer)
        # An ICE-lite peer never controls (RFC 8445 section 6.1.1).
        self._ice = IceTransport(self._config.ice, controlling=remote.ice_lite, name=self._call_id)
        candidates = await self._gathered(self._ice, trickle)
        answer, negotiated = sdp.negotiate(remote, self._local(self._ice, candidates))
        await self._apply(negotiated)
        return sdp.serialize(answer)

    async def accept_answer(self, answer: str) -> None:
        """Take the peer's answer to our offer; raises ``sdp.SdpError`` when it is unusable."""
        if self._offer is None or self._negotiated is not None:
            raise RuntimeError("accept_answer() needs our offer and comes once")
        await self._apply(sdp.apply_answer(self._offer, sdp.parse(answer)))

    async def _apply(self, negotiated: sdp.NegotiatedMedia) -> None:
        assert self._ice is not None
        self._negotiated = negotiated
        self._ice.set_remote_parameters(
            negotiated.remote_ice_ufrag, negotiated.remote_ice_pwd,
            ice_lite=negotiated.remote_ice_lite,
        )  # fmt: skip
        for candidate in negotiated.remote_candidates:
            await self._ice.add_remote_candidate(candidate)
        if negotiated.remote_end_of_candidates:
            await self._ice.add_remote_candidate(None)
        self._log.info(
            "negotiated opus=%d red=%s direction=%s dtls=%s ice=%s",
            negotiated.opus_payload_type, negotiated.red_payload_type,
            negotiated.direction.value, negotiated.dtls_role.value,
            "controlling" if negotiated.ice_controlling else "controlled",
        )  # fmt: skip

    # -- trickle ---------------------------------------------------------------

    async def local_candidates(self) -> AsyncIterator[Candidate]:
        """Our candidates as they are gathered (after a trickle offer or answer)."""
        if self._ice is None:
            raise RuntimeError("create_offer() or accept_offer() first")
        async for candidate in self._ice.gather():
            yield candidate

    async def add_remote_candidate(self, candidate: Candidate | None) -> None:
        """A candidate the peer trickled; None is its end-of-candidates."""
        if self._ice is None:
            raise RuntimeError("create_offer() or accept_offer() first")
        await self._ice.add_remote_candidate(candidate)

    # -- connection ------------------------------------------------------------

    @property
    def negotiated(self) -> sdp.NegotiatedMedia | None:
        return self._negotiated

    @property
    def ice(self) -> IceTransport | None:
        return self._ice

    @property
    def session(self) -> MediaSession | None:
        return self._session

    async def connect(self) -> MediaSession:
        """ICE, then DTLS, then media. Raises CallSetupError naming the step that failed."""
        ice, negotiated = self._ice, self._negotiated
        if ice is None or negotiated is None:
            raise RuntimeError("connect() needs a completed offer/answer")
        try:
            await ice.connect()
        except (IceError, TransportClosed) as exc:
            raise CallSetupError(f"ICE failed: {exc}") from exc
        self._demux = Demux(ice, name=self._call_id)
        role = DtlsRole.CLIENT if negotiated.dtls_role is sdp.Setup.ACTIVE else DtlsRole.SERVER
        self._dtls = DtlsKeying(
            self._demux.dtls, self._certificate, role,
            negotiated.remote_fingerprints,
            self._config.srtp_profiles, timers=self._config.dtls, call_id=self._call_id,
        )  # fmt: skip
        media = replace(
            self._config.media,
            opus_payload_type=negotiated.opus_payload_type,
            red_payload_type=negotiated.red_payload_type or self._config.media.red_payload_type,
        )
        self._session = MediaSession(
            self._demux.media, self._dtls, self._source, self._sink, media,
            remote_red=negotiated.red, send=negotiated.direction.sends, call_id=self._call_id,
            ssrc=self._ssrc,
        )  # fmt: skip
        try:
            await self._session.start()  # awaits the DTLS keys
        except (DtlsError, TransportClosed) as exc:
            raise CallSetupError(f"DTLS failed: {exc}") from exc
        self._watch = asyncio.get_running_loop().create_task(
            self._watch_dtls(self._dtls, self._session), name=f"peer-dtls-{self._call_id}"
        )
        return self._session

    async def _watch_dtls(self, dtls: DtlsKeying, session: MediaSession) -> None:
        """A close_notify from the peer ends the call like its RTCP BYE would."""
        await dtls.ended()
        if session.running:
            await session.close(EndReason.REMOTE_BYE)

    async def ended(self) -> EndReason:
        """Why the call ended, once it has."""
        if self._session is None:
            raise RuntimeError("connect() first")
        return await self._session.ended()

    @property
    def bye_reason(self) -> str:
        """The reason for leaving in the peer's RTCP BYE, if it sent one with a reason."""
        return "" if self._session is None else self._session.bye_reason

    async def close(
        self, reason: EndReason = EndReason.LOCAL_HANGUP, *, why: str = ""
    ) -> EndReason:
        """End the call (BYE with ``why``, close_notify) and free the transport; safe to
        call again."""
        final = reason
        if self._closed:
            return final if self._session is None else await self._session.close(reason)
        self._closed = True
        if self._session is not None:
            final = await self._session.close(reason, why=why)
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self._dtls is not None:
            await self._dtls.close()
        if self._demux is not None:
            await self._demux.close()
        if self._ice is not None:
            await self._ice.close()
        self._log.info("call closed: %s", final.value)
        return final
