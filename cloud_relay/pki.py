"""The relay's PKI: its CA, device certificates from CSRs, its own certificates and the CRL.

The only relay module that imports ``cryptography``; the rest of the relay sees PEM
bytes, paths and the dataclasses below. All of it lives in one directory (created
0700), so backing it up is copying it: the CA (``ca-key.pem``, ``ca.pem``: ECDSA
P-256, pathlen 0), the relay's own certificates (``https``, ``broker`` and
``relay-client``, each ``<role>.pem`` + ``<role>-key.pem``), ``ledger.json`` (each
device certificate issued, and which are revoked) and ``crl.pem`` (mosquitto's
``crlfile``).

Keys are written 0600 with ``write_atomic``, key before certificate. A key that group
or others can read is refused, not tightened (it may have leaked), and so is a CA key
that does not match ``ca.pem``. A CA certificate missing next to its key is made
again from it: the CA's name derives from its key, so what it issued still chains.
Writers hold an ``flock`` on ``.lock``, so two relay workers, or the CLI next to a
running relay, never make two CAs or lose a revocation.

A device certificate names the device twice: subject CN (mosquitto's
``use_identity_as_username`` makes it the MQTT username the ACL patterns match) and
the URI SAN ``urn:edge-intercom:device:<id>``. A URI, not a DNS name: a device id is
not a host name, and the URI marks a device identity, which the relay's client
certificate (``urn:edge-intercom:relay``) and server certificates do not carry.

Revocations live in ``ledger.json`` next to the CA key rather than in the store: the
CRL is signed with that key and read by mosquitto from this directory, the CLI can
revoke without the database, and the PKI stays one unit to back up and restore.

A CRL past its nextUpdate makes OpenSSL, and so mosquitto, refuse every client: call
``refresh_crl()`` periodically and reload the broker when it returns True. Times come
from an injected clock, so tests never sleep. Every method does blocking file I/O and
may wait for the lock: the relay calls them from a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from agent.media.sdp import fingerprint_of
from agent.service.files import write_atomic
from agent.signaling.topics import RELAY_ID, check_device_id, is_relay_name

logger = logging.getLogger(__name__)

DEVICE_URI_PREFIX = "urn:edge-intercom:device:"
"""Device certificates have the URI SAN ``DEVICE_URI_PREFIX + device_id``."""
RELAY_URI = "urn:edge-intercom:relay"
"""URI SAN of the relay's own client certificate."""
MAX_CSR_BYTES = 16_384
"""A CSR longer than this is refused before parsing (a P-256 CSR is under 1 KiB)."""

CA_KEY, CA_CERT, CRL_FILE = "ca-key.pem", "ca.pem", "crl.pem"
LEDGER_FILE, LOCK_FILE = "ledger.json", ".lock"
_BACKDATE = timedelta(days=1)  # boards without a clock battery may run a little behind


class PkiError(Exception):
    """The PKI directory cannot be used as it is; the text says why and what to do."""


class CsrError(ValueError):
    """A certificate signing request was refused; the text says why."""


class CertificateRejected(ValueError):
    """A device certificate does not verify; the text says why."""


class Role(StrEnum):
    """The relay's own certificates; the value names their files."""

    HTTPS = "https"
    BROKER = "broker"
    RELAY_CLIENT = "relay-client"


@dataclass(frozen=True, slots=True)
class PkiSettings:
    """Lifetimes of what the PKI signs."""

    ca_validity_days: int = 3650
    """The CA certificate made on first start."""
    device_validity_days: int = 730
    """Device certificates issued at pairing."""
    server_validity_days: int = 397
    """The relay's HTTPS, broker and client certificates."""
    renew_before_days: int = 30
    """The relay's certificates are renewed when they expire within this."""
    crl_validity_days: int = 7
    """CRL nextUpdate; ``refresh_crl()`` publishes a new one past half of it."""

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.renew_before_days >= self.server_validity_days:
            raise ValueError("renew_before_days must be < server_validity_days")


@dataclass(frozen=True, slots=True)
class CertFiles:
    """One of the relay's own certificates, as the files TLS libraries and mosquitto take."""

    cert: Path
    key: Path
    fingerprint: str
    """SHA-256 of the certificate, colon-separated upper-case hex (what pairing tokens pin)."""
    not_after: datetime
    renewed: bool
    """True if this call wrote new files: whoever serves them must reload."""


def check_csr(csr_pem: bytes) -> ec.EllipticCurvePublicKey:
    """The public key of a CSR fit for a device certificate: PEM, at most
    ``MAX_CSR_BYTES``, signed by its own ECDSA P-256 key; else ``CsrError``."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CsrError(f"CSR is {len(csr_pem)} bytes, more than {MAX_CSR_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise CsrError("not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise CsrError("CSR signature does not verify (not signed by its key)")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise CsrError(f"CSR key must be ECDSA P-256, not {type(public_key).__name__}")
    return public_key


def _utc_now() -> datetime:
    return datetime.now(UTC)


def fingerprint_sha256(cert_pem: bytes) -> str:
    """SHA-256 of a PEM certificate's DER, as ``AB:CD:...`` (the SDP fingerprint form)."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return fingerprint_of(der, "sha-256").value


class RelayPki:
    """The CA in one directory. ``open()`` it; every method may be called from any process."""

    def __init__(
        self,
        directory: Path,
        key: ec.EllipticCurvePrivateKey,
        ca: x509.Certificate,
        settings: PkiSettings,
        clock: Callable[[], datetime],
    ) -> None:
        self.directory = directory
        self._key = key
        self._ca = ca
        self._ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self._settings = settings
        self._clock = clock
        self._ledger_stat: tuple[int, int, int] | None = None
        self._issued: dict[int, str] = {}  # serial: device id
        self._revoked: dict[int, datetime] = {}  # serial: when
        self._crl_number = 0

    @classmethod
    def open(
        cls,
        directory: Path,
        settings: PkiSettings = PkiSettings(),
        *,
        clock: Callable[[], datetime] = _utc_now,
    ) -> RelayPki:
        """Load the CA in ``directory``, creating it (and the directory) on first start."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(directory):
            key, ca = _load_or_create_ca(directory, settings, clock())
            pki = cls(directory, key, ca, settings, clock)
            pki._refresh_crl()
        return pki

    @property
    def ca_path(self) -> Path:
        """The CA certificate (mosquitto ``cafile``, what devices get at pairing)."""
        return self.directory / CA_CERT

    @property
    def crl_path(self) -> Path:
        """The current CRL (mosquitto ``crlfile``)."""
        return self.directory / CRL_FILE

    # -- issuing ---------------------------------------------------------------------------

    def issue_device(
        self, csr_pem: bytes, device_id: str, *, validity_days: int | None = None
    ) -> bytes:
        """A device certificate (PEM) for the key in ``csr_pem``, named ``device_id``.

        Only the CSR's public key is used: its subject and extensions are ignored. Bad
        CSRs raise ``CsrError``; a bad device id raises ``ValueError``.
        """
        if is_relay_name(check_device_id(device_id)):
            raise ValueError(f"{device_id!r} is a name of the relay's, not a device id")
        public_key = check_csr(csr_pem)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
        san = x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device_id)
        days = self._settings.device_validity_days if validity_days is None else validity_days
        if days <= 0:
            raise ValueError("validity_days must be > 0")
        cert = self._sign(public_key, subject, [san], ExtendedKeyUsageOID.CLIENT_AUTH, days)
        with _locked(self.directory):
            self._load_ledger()
            self._issued[cert.serial_number] = device_id
            self._write_ledger()
        logger.info(
            "issued certificate %x to device %s until %s",
            cert.serial_number,
            device_id,
            cert.not_valid_after_utc.date().isoformat(),
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def server_certificate(self, role: Role, hosts: Sequence[str]) -> CertFiles:
        """The HTTPS or broker certificate for ``hosts`` (names or IP addresses).

        Issued when missing, unreadable, not from this CA, for other hosts, or
        expiring within ``renew_before_days``; otherwise the stored one.
        """
        if role is Role.RELAY_CLIENT or not hosts:
            raise ValueError("server certificates are for HTTPS or the broker, with hosts")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
        sans = [_host_name(host) for host in hosts]
        return self._ensure(role, subject, sans, ExtendedKeyUsageOID.SERVER_AUTH)

    def relay_client_certificate(self) -> CertFiles:
        """The relay's MQTT client certificate (CN ``relay``), issued or renewed as needed."""
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, RELAY_ID)])
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(RELAY_URI)]
        return self._ensure(Role.RELAY_CLIENT, subject, sans, ExtendedKeyUsageOID.CLIENT_AUTH)

    def _ensure(
        self,
        role: Role,
        subject: x509.Name,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
    ) -> CertFiles:
        cert_path = self.directory / f"{role}.pem"
        key_path = self.directory / f"{role}-key.pem"
        with _locked(self.directory):
            reason = self._replace_reason(cert_path, key_path, sans)
            if reason is not None:
                key = ec.generate_private_key(ec.SECP256R1())
                days = self._settings.server_validity_days
                cert = self._sign(key.public_key(), subject, sans, usage, days)
                write_atomic(key_path, _key_pem(key), 0o600)
                write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
                logger.info("%s certificate issued (%s)", role, reason)
            pem = cert_path.read_bytes()
        return CertFiles(
            cert=cert_path,
            key=key_path,
            fingerprint=fingerprint_sha256(pem),
            not_after=x509.load_pem_x509_certificate(pem).not_valid_after_utc,
            renewed=reason is not None,
        )

    def _replace_reason(
        self, cert_path: Path, key_path: Path, sans: list[x509.GeneralName]
    ) -> str | None:
        """Why the stored certificate must be replaced, or None to keep it."""
        if not cert_path.exists() or not key_path.exists():
            return "none stored"
        try:
            _, cert = _load_pair(key_path, cert_path)
            cert.verify_directly_issued_by(self._ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            return f"stored one unusable: {exc}"
        stored = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if set(stored) != set(sans):
            return "host names changed"
        if (
            cert.not_valid_after_utc - timedelta(days=self._settings.renew_before_days)
            <= self._clock()
        ):
            return f"stored one expires {cert.not_valid_after_utc.isoformat()}"
        return None

    def _sign(
        self,
        public_key: ec.EllipticCurvePublicKey,
        subject: x509.Name,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        days: int,
    ) -> x509.Certificate:
        now = self._clock()
        not_after = min(now + timedelta(days=days), self._ca.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._ca.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ca_ski),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )

    # -- revocation ------------------------------------------------------------------------

    def revoke(self, target: int | str) -> tuple[int, ...]:
        """Revoke one certificate (by serial) or all of a device's (by device id).

        Returns the serials newly revoked (empty if all were already), publishes the CRL,
        and raises ``LookupError`` if this CA never issued such a certificate. The broker
        must then be reloaded to read the new CRL.
        """
        with _locked(self.directory):
            self._load_ledger()
            if isinstance(target, int):
                serials = [target] if target in self._issued else []
            else:
                serials = [s for s, device in self._issued.items() if device == target]
            if not serials:
                raise LookupError(f"no certificate issued to {target!r}")
            fresh = tuple(s for s in serials if s not in self._revoked)
            for serial in fresh:
                self._revoked[serial] = self._clock()
                logger.warning("revoking certificate %x of %s", serial, self._issued[serial])
            if fresh:
                self._publish_crl()
        return fresh

    def revoked_devices(self) -> frozenset[str]:
        """Devices cut off: every certificate issued to them is revoked."""
        self._load_ledger()
        live = {d for s, d in self._issued.items() if s not in self._revoked}
        return frozenset(d for d in self._issued.values() if d not in live)

    def is_revoked(self, cert_pem: bytes) -> bool:
        """Whether this CA revoked the certificate (one it never issued is not revoked)."""
        return self._is_revoked(x509.load_pem_x509_certificate(cert_pem).serial_number)

    def _is_revoked(self, serial: int) -> bool:
        self._load_ledger()
        return serial in self._revoked

    def refresh_crl(self) -> bool:
        """Publish a new CRL if the file is missing, unreadable or past half its lifetime."""
        with _locked(self.directory):
            return self._refresh_crl()

    def _refresh_crl(self) -> bool:
        try:
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
            next_update = crl.next_update_utc
            fresh = (
                crl.is_signature_valid(self._key.public_key())
                and next_update is not None
                and self._clock() < next_update - (next_update - crl.last_update_utc) / 2
            )
        except (OSError, ValueError):
            fresh = False
        if not fresh:
            self._load_ledger()
            self._publish_crl()
        return not fresh

    def _publish_crl(self) -> None:
        """With the lock held and the ledger loaded: save it with the next CRL number and
        write a CRL of every revoked certificate."""
        self._crl_number += 1
        self._write_ledger()
        now = self._clock()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._ca.subject)
            .last_update(now)
            .next_update(now + timedelta(days=self._settings.crl_validity_days))
            .add_extension(x509.CRLNumber(self._crl_number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ca_ski),
                critical=False,
            )
        )
        for serial, when in sorted(self._revoked.items()):
            entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
            builder = builder.add_revoked_certificate(entry.build())
        crl = builder.sign(self._key, hashes.SHA256())
        write_atomic(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)

    # -- verification ----------------------------------------------------------------------

    def verify_device_certificate(self, cert_pem: bytes) -> str:
        """The device id of a certificate this CA issued, valid now, with clientAuth, not
        revoked; anything else raises ``CertificateRejected``."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise CertificateRejected("not a PEM certificate") from None
        verifier = PolicyBuilder().store(Store([self._ca])).time(self._clock())
        try:
            verifier.build_client_verifier().verify(cert, [])
        except VerificationError as exc:
            raise CertificateRejected(
                f"certificate does not verify against this relay's CA now: {exc}"
            ) from None
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        device_id = str(names[0].value) if len(names) == 1 else ""
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if sans.get_values_for_type(x509.UniformResourceIdentifier) != [
            DEVICE_URI_PREFIX + device_id
        ]:
            raise CertificateRejected("not a device certificate (no device URI matching its CN)")
        if self._is_revoked(cert.serial_number):
            raise CertificateRejected(f"certificate {cert.serial_number:x} of {device_id} revoked")
        return device_id

    # -- ledger ----------------------------------------------------------------------------

    def _load_ledger(self) -> None:
        """Read ``ledger.json`` again if it changed since last read (another process wrote)."""
        path = self.directory / LEDGER_FILE
        try:
            st = path.stat()
        except FileNotFoundError:
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._ledger_stat:
            return
        try:
            data = json.loads(path.read_bytes())
            self._crl_number = int(data["crl_number"])
            self._issued = {int(k, 16): str(v) for k, v in data["issued"].items()}
            self._revoked = {
                int(k, 16): datetime.fromisoformat(v) for k, v in data["revoked"].items()
            }
        except (ValueError, KeyError, TypeError) as exc:
            raise PkiError(f"{path} is corrupt ({exc!r}): restore it from a backup") from exc
        self._ledger_stat = stamp

    def _write_ledger(self) -> None:
        path = self.directory / LEDGER_FILE
        data = {
            "version": 1,
            "crl_number": self._crl_number,
            "issued": {f"{serial:x}": device for serial, device in self._issued.items()},
            "revoked": {f"{serial:x}": at.isoformat() for serial, at in self._revoked.items()},
        }
        write_atomic(path, json.dumps(data, indent=1).encode(), 0o644)
        st = path.stat()
        self._ledger_stat = (st.st_ino, st.st_mtime_ns, st.st_size)


# -- helpers -------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold the directory's write lock (an ``flock``; not re-entrant, so never nest)."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_or_create_ca(
    directory: Path, settings: PkiSettings, now: datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    has_key, has_cert = key_path.exists(), cert_path.exists()
    if has_cert and not has_key:
        raise PkiError(
            f"{cert_path} has no {CA_KEY}: restore the key from a backup, or remove "
            f"{CA_CERT} to make a new CA (every device must then pair again)"
        )
    try:
        if has_cert:
            key, ca = _load_pair(key_path, cert_path)
            logger.info("CA loaded: %s", ca.subject.rfc4514_string())
            return key, ca
        if has_key:
            key = _load_key(key_path)
            logger.warning("CA certificate missing: made again from %s", key_path)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"CA in {directory} unusable ({exc}): restore it from a backup") from None
    if not has_key:
        key = ec.generate_private_key(ec.SECP256R1())
        write_atomic(key_path, _key_pem(key), 0o600)
    ca = _ca_certificate(key, now, settings.ca_validity_days)
    write_atomic(cert_path, ca.public_bytes(serialization.Encoding.PEM), 0o644)
    logger.info("CA created: %s", ca.subject.rfc4514_string())
    return key, ca


def _ca_certificate(key: ec.EllipticCurvePrivateKey, now: datetime, days: int) -> x509.Certificate:
    """Self-signed; its name comes from its key, so the same key always makes the same CA."""
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge-intercom"),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"edge-intercom relay CA {ski.digest[:4].hex()}"
            ),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """An unencrypted P-256 key (else ``ValueError``) that only its owner can read (else
    ``PkiError``)."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PkiError(
            f"{path} has mode {mode:o}: group or others can read it, so it may have leaked; "
            "replace it, or chmod 600 if you are sure it did not"
        )
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"{path.name} is not an ECDSA P-256 key")
    return key


def _load_pair(
    key_path: Path, cert_path: Path
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Key and certificate; ``ValueError`` if they do not belong together."""
    key = _load_key(key_path)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if cert.public_key() != key.public_key():
        raise ValueError(f"{key_path.name} does not match {cert_path.name}")
    return key, cert


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        if not host or "*" in host:
            raise ValueError(f"bad host name {host!r}") from None
        return x509.DNSName(host)
