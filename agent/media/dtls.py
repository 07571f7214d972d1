"""DTLS-SRTP keying (RFC 5763/5764) through pyOpenSSL: the only module that imports it.

The handshake runs on pyOpenSSL memory BIOs over the DTLS channel of a
``Demux``: each datagram from the peer is written into the SSL object and
whatever OpenSSL writes back is cut into datagrams at record boundaries.
Trust comes from the certificate fingerprint that signaling carried in the SDP,
not from a CA, so the verify callback accepts self-signed certificates and
checks the fingerprint instead. Once the handshake is done the SRTP keys are
exported (RFC 5764 section 4.2) and this module keeps serving the channel: it
answers a peer that retransmits its last flight and treats the peer's
close_notify as the end of the call.

Retransmission. pyOpenSSL exposes OpenSSL's own DTLS timer (1 s doubling to
60 s) but not the hook that sets it, so ``DtlsTimers`` drives a second timer:
when it fires before OpenSSL's, the last flight is sent again byte for byte.
A copy the peer already has is dropped by its replay window, one it missed
moves the handshake on. OpenSSL's timer keeps running underneath and
retransmits with fresh record numbers, which is what makes a peer that has
completed resend its own last flight; the side that sent the final flight
does that here too when the peer's byte-identical copy comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import enum
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL, crypto

from agent.media.sdp import SUPPORTED_FINGERPRINTS, Fingerprint, certificate_matches, fingerprint_of
from agent.media.srtp import KeyPair, SrtpKeys, SrtpProfile
from agent.net.transport import DatagramTransport, TransportClosed
from agent.service.files import write_atomic

logger = logging.getLogger(__name__)

_DTLS1_2_VERSION = 0xFEFD
# AEAD suites with forward secrecy only, AES-128-GCM first as browsers rank it. The
# DTLS ciphers protect only the handshake here (media goes over SRTP). The RSA suites
# are for peers with RSA certificates; ours is ECDSA.
_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-RSA-CHACHA20-POLY1305:ECDHE-RSA-AES256-GCM-SHA384"
)
_EXPORTER_LABEL = b"EXTRACTOR-dtls_srtp"
_OPENSSL_PROFILE_NAMES: dict[SrtpProfile, bytes] = {
    SrtpProfile.AEAD_AES_128_GCM: b"SRTP_AEAD_AES_128_GCM",
    SrtpProfile.AES_CM_128_HMAC_SHA1_80: b"SRTP_AES128_CM_SHA1_80",
}
_PROFILES_BY_OPENSSL_NAME = {name: profile for profile, name in _OPENSSL_PROFILE_NAMES.items()}

_RECORD_HEADER = 13  # type(1) version(2) epoch(2) sequence(6) length(2)
_CT_CHANGE_CIPHER_SPEC = 20
_CT_HANDSHAKE = 22
_CT_APPLICATION_DATA = 23
_BIO_CHUNK = 65536
_MIN_WAIT_S = 0.001
_KEYS_GRACE_S = 5.0  # keys() waits this long past the handshake deadline, as a last resort
_SEND_TIMEOUT_S = 1.0
_MAX_FINAL_FLIGHT_RESENDS = 10

CERT_FILE = "dtls-cert.pem"
KEY_FILE = "dtls-key.pem"


class DtlsError(Exception):
    """The DTLS handshake failed or the association broke; the call cannot be keyed."""


class DtlsTimeout(DtlsError):
    """No handshake within ``DtlsTimers.handshake_timeout_s``."""


class DtlsFingerprintError(DtlsError):
    """The peer's certificate does not match the fingerprint from its SDP."""


# -- certificate ------------------------------------------------------------------------


class DtlsCertificate:
    """Our ECDSA P-256 self-signed certificate and its key.

    Peers never check its dates (WebRTC stacks trust the fingerprint), so validity
    only drives rotation: a year, back-dated a day for peers and clocks that are
    a little behind, renewed when under a month is left.
    """

    VALIDITY = datetime.timedelta(days=365)
    BACKDATE = datetime.timedelta(days=1)
    RENEW_BEFORE = datetime.timedelta(days=30)

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("DTLS key must be ECDSA P-256")
        if _public_der(cert.public_key()) != _public_der(key.public_key()):
            raise ValueError("certificate does not belong to the key")
        self._key = key
        self._cert = cert
        self._der = cert.public_bytes(serialization.Encoding.DER)

    @classmethod
    def generate(
        cls,
        common_name: str,
        *,
        now: datetime.datetime | None = None,
        validity: datetime.timedelta = VALIDITY,
    ) -> DtlsCertificate:
        now = now or datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - cls.BACKDATE)
            .not_valid_after(now + validity)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load_or_create(
        cls,
        path_dir: str | os.PathLike[str],
        device_id: str,
        *,
        now: datetime.datetime | None = None,
        renew_before: datetime.timedelta = RENEW_BEFORE,
    ) -> DtlsCertificate:
        """The certificate stored in ``path_dir``, or a new one stored there.

        A new one replaces the stored one when that is missing, unreadable, made for
        another device id, or expires within ``renew_before``.
        """
        directory = Path(path_dir)
        now = now or datetime.datetime.now(datetime.UTC)
        reason: str
        try:
            stored = cls._load(directory)
        except FileNotFoundError as exc:
            present = [name for name in (KEY_FILE, CERT_FILE) if (directory / name).exists()]
            reason = f"stored one incomplete, {exc.filename} missing" if present else "none stored"
        except (OSError, ValueError, TypeError) as exc:
            reason = f"stored one unreadable ({exc})"
        else:
            expires = stored.not_valid_after
            if stored.common_name != device_id:
                reason = "stored one is for another device id"
            elif expires - renew_before <= now:
                reason = f"stored one expires {expires.isoformat()}"
            else:
                _tighten_key_mode(directory / KEY_FILE)
                logger.info(
                    "dtls certificate loaded, expires %s, fingerprint %s",
                    expires.date().isoformat(),
                    stored.fingerprint.value,
                )
                return stored
        cert = cls.generate(device_id, now=now)
        cert._store(directory)
        logger.log(
            logging.INFO if reason == "none stored" else logging.WARNING,
            "dtls certificate generated (%s), expires %s, fingerprint %s",
            reason,
            cert.not_valid_after.date().isoformat(),
            cert.fingerprint.value,
        )
        return cert

    @classmethod
    def _load(cls, directory: Path) -> DtlsCertificate:
        key = serialization.load_pem_private_key((directory / KEY_FILE).read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("key is not an EC key")
        cert = x509.load_pem_x509_certificate((directory / CERT_FILE).read_bytes())
        return cls(key, cert)

    def _store(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Key first: a crash between the two leaves a pair that does not match, which
        # the next start detects and replaces.
        write_atomic(directory / KEY_FILE, key_pem, 0o600)
        write_atomic(
            directory / CERT_FILE, self._cert.public_bytes(serialization.Encoding.PEM), 0o644
        )

    @property
    def fingerprint(self) -> Fingerprint:
        """SHA-256 of the DER certificate, as the SDP ``a=fingerprint`` line carries it."""
        return self.fingerprint_with("sha-256")

    def fingerprint_with(self, algorithm: str) -> Fingerprint:
        """The fingerprint with another RFC 8122 hash (sha-256, sha-384, sha-512)."""
        return fingerprint_of(self._der, algorithm)

    @property
    def common_name(self) -> str:
        names = self._cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return str(names[0].value) if names else ""

    @property
    def not_valid_after(self) -> datetime.datetime:
        return self._cert.not_valid_after_utc

    def __repr__(self) -> str:  # the key never reaches logs
        return f"DtlsCertificate({self.common_name!r}, {self.fingerprint.value})"


def _public_der(key: object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("certificate key is not an EC key")
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _tighten_key_mode(path: Path) -> None:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        logger.warning("dtls key %s had mode %o; set to 600", path, mode)
        path.chmod(0o600)


# -- records and datagrams (pure) ---------------------------------------------------------


def _whole_records(data: bytes) -> int:
    """Length of the longest prefix of ``data`` made of whole DTLS 1.0/1.2 records."""
    pos, end = 0, len(data)
    while pos + _RECORD_HEADER <= end:
        content_type = data[pos]
        if not _CT_CHANGE_CIPHER_SPEC <= content_type <= _CT_APPLICATION_DATA:
            break
        if data[pos + 1] != 0xFE or data[pos + 2] not in (0xFF, 0xFD):
            break
        record_end = pos + _RECORD_HEADER + (data[pos + 11] << 8 | data[pos + 12])
        if record_end > end:
            break
        pos = record_end
    return pos


def _datagrams(records: bytes, mtu: int) -> list[bytes]:
    """Pack consecutive records into datagrams of at most ``mtu`` bytes, never splitting one.

    OpenSSL keeps each record within the MTU, so only a single oversized record (or a
    tail that is no record) can exceed it; those go out as they are.
    """
    out: list[bytes] = []
    start = pos = 0
    end = len(records)
    while pos < end:
        if pos + _RECORD_HEADER <= end:
            length = records[pos + 11] << 8 | records[pos + 12]
            record_end = min(end, pos + _RECORD_HEADER + length)
        else:
            record_end = end
        if record_end - start > mtu and pos > start:
            out.append(records[start:pos])
            start = pos
        pos = record_end
    if start < end:
        out.append(records[start:end])
    return out


# -- keying ---------------------------------------------------------------------------------


class DtlsRole(enum.Enum):
    """Our DTLS role, named by the SDP ``a=setup`` value that selects it (RFC 5763)."""

    CLIENT = "active"
    SERVER = "passive"


@dataclass(frozen=True, slots=True)
class DtlsTimers:
    """Handshake timers; tests shrink them."""

    retransmit_s: float = 1.0
    """Wait before sending an unanswered flight again (RFC 6347 4.2.4.1 suggests 1 s)."""
    retransmit_max_s: float = 60.0
    """Each retransmission doubles the wait up to this (RFC 6347: no less than 60 s)."""
    handshake_timeout_s: float = 15.0
    """Give up on the handshake after this long (from ``start()``)."""

    def __post_init__(self) -> None:
        if not 0 < self.retransmit_s <= self.retransmit_max_s:
            raise ValueError("need 0 < retransmit_s <= retransmit_max_s")
        if self.handshake_timeout_s <= 0:
            raise ValueError("handshake_timeout_s must be > 0")


class DtlsEnd(enum.Enum):
    PEER_CLOSED = "peer sent close_notify"
    LOCAL_CLOSE = "closed locally"
    TRANSPORT_CLOSED = "transport closed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class DtlsStats:
    received: int
    """Datagrams read from the DTLS channel."""
    sent: int
    """Datagrams written to it, retransmissions included."""
    retransmissions: int
    """Flights sent again because the timer fired."""
    final_flight_resends: int
    """Times our final flight went again because the peer repeated its own."""
    malformed: int
    """Datagrams that were not (or not only) whole DTLS 1.x records; the rest was cut off."""
    app_data_dropped: int
    """DTLS application data records (we run no data channel)."""
    handshake_s: float | None
    """How long the handshake took, once it has completed."""


class DtlsKeying:
    """Keys one call with a DTLS-SRTP handshake over ``channel`` (a ``Keying``).

    ``keys()`` starts the handshake (``start()`` does so earlier) and returns the
    SRTP keys; after that a task keeps answering the peer on the channel until
    ``close()``, which sends close_notify, or until the peer sends its own
    (``closed_by_peer``, ``ended()``).
    """

    def __init__(
        self,
        channel: DatagramTransport,
        certificate: DtlsCertificate,
        role: DtlsRole,
        remote_fingerprints: Sequence[Fingerprint],
        profiles: Sequence[SrtpProfile] = (
            SrtpProfile.AEAD_AES_128_GCM,
            SrtpProfile.AES_CM_128_HMAC_SHA1_80,
        ),
        *,
        timers: DtlsTimers = DtlsTimers(),
        mtu: int = 1200,
        call_id: str = "-",
    ) -> None:
        if not profiles or len(set(profiles)) != len(profiles):
            raise ValueError("profiles must be a non-empty list without repeats")
        if not 256 <= mtu <= 65507:
            raise ValueError("mtu must be 256..65507")
        # SHA-1 and MD5 fingerprints are ignored: too weak to bind keys.
        self._expected = tuple(
            f for f in remote_fingerprints if f.algorithm.lower() in SUPPORTED_FINGERPRINTS
        )
        if not self._expected:
            raise ValueError(
                f"no usable remote fingerprint (need one of {', '.join(SUPPORTED_FINGERPRINTS)})"
            )
        self._channel = channel
        self._certificate = certificate
        self.role = role
        self._profiles = tuple(profiles)
        self._timers = timers
        self._mtu = mtu
        self._log = logging.LoggerAdapter(logger, {"call": call_id})
        self._call_id = call_id

        self._ssl = SSL.Connection(self._context(), None)
        self._ssl.set_ciphertext_mtu(mtu)
        if role is DtlsRole.CLIENT:
            self._ssl.set_connect_state()
        else:
            self._ssl.set_accept_state()

        self._task: asyncio.Task[None] | None = None
        self._keys: asyncio.Future[KeyPair] | None = None
        self._ended: asyncio.Future[DtlsEnd] | None = None
        self._started_at = 0.0
        self._deadline = 0.0
        self._established = False
        self._closing = False
        self._closed_by_peer = False
        self._peer_fingerprint: str | None = None  # set by the verify callback
        self._fingerprint_rejected = False
        self._last_flight: list[bytes] = []
        self._final_flight_ours = False
        self._interval = timers.retransmit_s
        self._retransmit_at = 0.0
        self._last_final_resend = -1e9
        self._received = 0
        self._sent = 0
        self._retransmissions = 0
        self._final_resends = 0
        self._malformed = 0
        self._app_data = 0
        self._handshake_s: float | None = None

    def _context(self) -> SSL.Context:
        ctx = SSL.Context(SSL.DTLS_METHOD)
        # DTLS 1.2 only: 1.0 is deprecated (RFC 8996), and the record handling here
        # assumes 1.2 headers (a future OpenSSL offering 1.3 would change them).
        ctx.set_min_proto_version(_DTLS1_2_VERSION)
        ctx.set_max_proto_version(_DTLS1_2_VERSION)
        # No tickets or session cache (one handshake per call, never resumed); no
        # renegotiation; keep our MTU (a memory BIO would otherwise shrink it to the
        # minimum after two timeouts).
        ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_QUERY_MTU)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_cipher_list(_CIPHERS)
        ctx.use_certificate(self._certificate._cert)
        ctx.use_privatekey(self._certificate._key)
        ctx.check_privatekey()
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        ctx.set_tlsext_use_srtp(b":".join(_OPENSSL_PROFILE_NAMES[p] for p in self._profiles))
        return ctx

    def _verify(
        self, conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
    ) -> bool:
        """Trust is the SDP fingerprint of the peer's own certificate, not a chain."""
        if depth != 0:
            return True
        der = cert.to_cryptography().public_bytes(serialization.Encoding.DER)
        self._peer_fingerprint = fingerprint_of(der).value
        matched = certificate_matches(der, self._expected)
        self._fingerprint_rejected = not matched
        return matched

    # -- public ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the handshake task (idempotent); the handshake timeout counts from here."""
        if self._closing:
            raise DtlsError("DTLS keying closed")
        if self._task is not None:
            return
        loop = asyncio.get_running_loop()
        self._keys = loop.create_future()
        self._keys.add_done_callback(_retrieve)
        self._ended = loop.create_future()
        self._started_at = loop.time()
        self._deadline = self._started_at + self._timers.handshake_timeout_s
        self._task = loop.create_task(
            self._run(), name=f"dtls-{self.role.name.lower()}-{self._call_id}"
        )

    async def keys(self) -> KeyPair:
        """Run (or join) the handshake; the SRTP keys, or DtlsError once it fails."""
        if self._keys is None:
            self.start()
        assert self._keys is not None
        if self._keys.done():
            return self._keys.result()
        try:
            async with asyncio.timeout_at(self._deadline + _KEYS_GRACE_S):
                return await asyncio.shield(self._keys)
        except TimeoutError:  # the task enforces the deadline; this is a last resort
            raise DtlsTimeout("DTLS handshake did not finish") from None

    @property
    def closed_by_peer(self) -> bool:
        """The peer ended the association with close_notify (it hung up)."""
        return self._closed_by_peer

    async def ended(self) -> DtlsEnd:
        """Wait until the association ends: peer close, local close, transport or failure."""
        if self._ended is None:
            if self._closing:
                return DtlsEnd.LOCAL_CLOSE
            self.start()
        assert self._ended is not None
        return await asyncio.shield(self._ended)

    @property
    def local_fingerprint(self) -> Fingerprint:
        return self._certificate.fingerprint

    @property
    def stats(self) -> DtlsStats:
        return DtlsStats(
            received=self._received,
            sent=self._sent,
            retransmissions=self._retransmissions,
            final_flight_resends=self._final_resends,
            malformed=self._malformed,
            app_data_dropped=self._app_data,
            handshake_s=self._handshake_s,
        )

    async def close(self) -> None:
        """Stop the task and, if the association is up, send close_notify (best effort)."""
        if self._closing:
            return
        self._closing = True
        say_goodbye = self._established and self._ended is not None and not self._ended.done()
        task = self._task
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        if say_goodbye:
            try:
                self._ssl.shutdown()
            except SSL.Error as exc:
                self._log.debug("dtls shutdown: %s", _describe(exc))
            await self._flush(best_effort=True)
            self._log.info("dtls closed, close_notify sent")
        self._settle(DtlsEnd.LOCAL_CLOSE, DtlsError("DTLS keying closed before the handshake"))

    # -- task -------------------------------------------------------------------------------

    def _settle(self, end: DtlsEnd, error: DtlsError) -> None:
        if self._keys is not None and not self._keys.done():
            self._keys.set_exception(error)
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(end)

    async def _run(self) -> None:
        assert self._keys is not None
        try:
            try:
                pair = await self._handshake()
            except DtlsError as exc:
                self._log.warning("dtls handshake failed: %s", exc)
                self._settle(DtlsEnd.FAILED, exc)
                return
            self._keys.set_result(pair)
            end = await self._serve()
            self._log.info("dtls association ended: %s", end.value)
            self._settle(end, DtlsError(end.value))
        except asyncio.CancelledError:
            self._settle(DtlsEnd.LOCAL_CLOSE, DtlsError("DTLS keying closed before the handshake"))
            raise
        except Exception as exc:  # a bug: end the call rather than hang it
            self._log.exception("dtls task crashed")
            self._settle(DtlsEnd.FAILED, DtlsError(f"DTLS keying crashed: {exc!r}"))

    async def _handshake(self) -> KeyPair:
        loop = asyncio.get_running_loop()
        ssl = self._ssl
        recv = self._channel.recv
        self._log.debug("dtls handshake starting as %s", self.role.name.lower())
        done = await self._advance(None)
        while not done:
            now = loop.time()
            if now >= self._deadline:
                raise DtlsTimeout(
                    f"DTLS handshake timed out after {self._timers.handshake_timeout_s:g} s "
                    f"({self._retransmissions} retransmissions, {self._received} datagrams in)"
                )
            wake = self._deadline
            if self._last_flight:
                wake = min(wake, self._retransmit_at)
            openssl_timeout = ssl.DTLSv1_get_timeout()
            if openssl_timeout is not None:
                wake = min(wake, now + openssl_timeout)
            try:
                async with asyncio.timeout(max(wake - now, _MIN_WAIT_S)):
                    data = await recv()
            except TimeoutError:
                await self._on_timer(loop.time())
                continue
            except TransportClosed as exc:
                raise DtlsError("transport closed during the DTLS handshake") from exc
            records = self._admit(data)
            if records is not None:
                done = await self._advance(records)
        self._established = True
        return await self._finish_handshake(loop.time() - self._started_at)

    async def _advance(self, records: bytes | None) -> bool:
        """Feed the peer's records (if any) to OpenSSL, send what it answers; True once done."""
        ssl = self._ssl
        if records is not None:
            ssl.bio_write(records)
        try:
            ssl.do_handshake()
        except SSL.WantReadError:
            done = False
        except SSL.Error as exc:
            await self._flush(best_effort=True)  # our alert, so the peer fails fast
            if self._fingerprint_rejected:
                raise DtlsFingerprintError(
                    f"peer certificate sha-256 {self._peer_fingerprint} matches no fingerprint "
                    f"from its SDP"
                ) from None
            raise DtlsError(f"DTLS handshake failed: {_describe(exc)}") from None
        else:
            done = True
        sent = await self._flush(new_flight=True)
        if done:
            # Whoever sent the last flight resends it when the peer repeats its own.
            self._final_flight_ours = sent
        return done

    async def _on_timer(self, now: float) -> None:
        try:
            self._ssl.DTLSv1_handle_timeout()
        except SSL.Error as exc:
            await self._flush(best_effort=True)
            raise DtlsError(f"DTLS handshake gave up: {_describe(exc)}") from None
        # OpenSSL's own timer resends the flight with fresh record numbers; ours resends
        # the same datagrams.
        if not await self._flush():
            if not self._last_flight or now < self._retransmit_at:
                return
            for datagram in self._last_flight:
                await self._send(datagram, best_effort=False)
        self._retransmissions += 1
        self._interval = min(self._interval * 2, self._timers.retransmit_max_s)
        self._retransmit_at = now + self._interval
        self._log.debug(
            "dtls retransmission %d, next in %.3g s", self._retransmissions, self._interval
        )

    async def _finish_handshake(self, elapsed_s: float) -> KeyPair:
        ssl = self._ssl
        cert = ssl.get_peer_certificate(as_cryptography=True)
        if cert is None or self._fingerprint_rejected:
            await self._abandon()
            raise DtlsFingerprintError("peer presented no certificate matching its SDP")
        der = cert.public_bytes(serialization.Encoding.DER)
        if not certificate_matches(der, self._expected):
            await self._abandon()
            raise DtlsFingerprintError(
                f"peer certificate sha-256 {fingerprint_of(der).value} matches no "
                "fingerprint from its SDP"
            )
        profile = _PROFILES_BY_OPENSSL_NAME.get(ssl.get_selected_srtp_profile())
        if profile is None or profile not in self._profiles:
            await self._abandon()
            offered = ", ".join(p.name for p in self._profiles)
            raise DtlsError(f"no SRTP profile in common with the peer (we offered {offered})")
        key_len, salt_len = profile.key_len, profile.salt_len
        material = ssl.export_keying_material(_EXPORTER_LABEL, 2 * (key_len + salt_len))
        # RFC 5764 4.2: client key | server key | client salt | server salt
        client = SrtpKeys(
            profile,
            material[:key_len],
            material[2 * key_len : 2 * key_len + salt_len],
        )
        server = SrtpKeys(
            profile,
            material[key_len : 2 * key_len],
            material[2 * key_len + salt_len :],
        )
        self._log.info(
            "dtls handshake complete in %.0f ms as %s: %s, %s, %d retransmissions",
            elapsed_s * 1000,
            self.role.name.lower(),
            profile.name,
            ssl.get_cipher_name(),
            self._retransmissions,
        )
        self._handshake_s = elapsed_s
        if self.role is DtlsRole.CLIENT:
            return KeyPair(tx=client, rx=server)
        return KeyPair(tx=server, rx=client)

    async def _abandon(self) -> None:
        """The handshake finished but we will not use it: tell the peer (best effort)."""
        with contextlib.suppress(SSL.Error):
            self._ssl.shutdown()
        await self._flush(best_effort=True)

    async def _serve(self) -> DtlsEnd:
        """After the handshake: answer retransmissions, drop data, stop at close_notify."""
        loop = asyncio.get_running_loop()
        ssl = self._ssl
        recv = self._channel.recv
        while True:
            try:
                data = await recv()
            except TransportClosed:
                return DtlsEnd.TRANSPORT_CLOSED
            records = self._admit(data)
            if records is None:
                continue
            ssl.bio_write(records)
            try:
                while True:
                    ssl.recv(_BIO_CHUNK)
                    self._app_data += 1
            except SSL.WantReadError:
                pass
            except SSL.ZeroReturnError:
                self._closed_by_peer = True
                self._log.info("dtls peer sent close_notify")
                with contextlib.suppress(SSL.Error):
                    ssl.shutdown()  # our close_notify in reply
                await self._flush(best_effort=True)
                return DtlsEnd.PEER_CLOSED
            except SSL.Error as exc:
                self._log.warning("dtls association failed: %s", _describe(exc))
                await self._flush(best_effort=True)
                return DtlsEnd.FAILED
            if await self._flush(best_effort=True):
                continue  # OpenSSL answered a retransmission itself
            if (
                self._final_flight_ours
                and records[0] in (_CT_HANDSHAKE, _CT_CHANGE_CIPHER_SPEC)
                and self._final_resends < _MAX_FINAL_FLIGHT_RESENDS
            ):
                now = loop.time()
                if now - self._last_final_resend >= self._timers.retransmit_s / 2:
                    self._last_final_resend = now
                    self._final_resends += 1
                    self._log.debug("dtls peer repeated its flight: resending our final one")
                    for datagram in self._last_flight:
                        await self._send(datagram, best_effort=True)

    # -- datagrams ----------------------------------------------------------------------

    def _admit(self, data: bytes) -> bytes | None:
        """The whole records at the start of ``data``; None when there are none."""
        self._received += 1
        whole = _whole_records(data)
        if whole == len(data) and whole:
            return data
        self._malformed += 1
        if logger.isEnabledFor(logging.DEBUG):
            self._log.debug(
                "dtls malformed datagram: %d of %d bytes are whole records", whole, len(data)
            )
        return data[:whole] if whole else None

    def _drain(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            try:
                chunks.append(self._ssl.bio_read(_BIO_CHUNK))
            except SSL.WantReadError:
                return b"".join(chunks)

    async def _flush(self, *, new_flight: bool = False, best_effort: bool = False) -> bool:
        """Send what OpenSSL wrote; True if it wrote anything.

        A new flight (the answer to the peer's) becomes the one the timer retransmits.
        """
        out = self._drain()
        if not out:
            return False
        datagrams = _datagrams(out, self._mtu)
        if not self._established:
            self._last_flight = datagrams
            if new_flight:
                self._interval = self._timers.retransmit_s
            self._retransmit_at = asyncio.get_running_loop().time() + self._interval
        for datagram in datagrams:
            await self._send(datagram, best_effort=best_effort)
        return True

    async def _send(self, datagram: bytes, *, best_effort: bool) -> None:
        try:
            async with asyncio.timeout(_SEND_TIMEOUT_S):
                await self._channel.send(datagram)
        except (TransportClosed, TimeoutError) as exc:
            if best_effort:
                self._log.debug("dtls send failed: %r", exc)
                return
            raise DtlsError(f"DTLS send failed: {exc!r}") from exc
        self._sent += 1


def _describe(exc: SSL.Error) -> str:
    """OpenSSL's reasons from a pyOpenSSL error, e.g. 'sslv3 alert bad certificate'."""
    reasons: list[str] = []
    for arg in exc.args:
        if isinstance(arg, list):
            reasons.extend(str(item[-1]) for item in arg if isinstance(item, tuple) and item)
    return "; ".join(reasons) or repr(exc)


def _retrieve(future: asyncio.Future[KeyPair]) -> None:
    """Mark a failed handshake's exception as seen: it is logged, and keys() may never run."""
    if not future.cancelled():
        future.exception()
