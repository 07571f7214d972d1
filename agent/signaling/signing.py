"""Signed signaling: the sender's device key over the envelope (ES256, as JWS has it).

``sign`` puts the signature into ``sig``: ECDSA P-256 with SHA-256 over
``envelope.signing_bytes`` (canonical JSON of everything but ``sig``), as the raw
64-byte r||s in unpadded base64url. ``verify`` checks it with the sender's public key
(from its certificate, which the relay's CA issued at pairing) and raises
``SignatureError`` with a counter-label reason. The relay verifies before routing and
the callee again on arrival, so the DTLS fingerprint in an SDP is bound to the device
that sent it, whatever the broker or the wire did.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from agent.signaling.envelope import Envelope, sig_bytes, signing_bytes, with_sig
from agent.signaling.topics import signer_of

_HALF = 32
"""Bytes of r and of s on P-256."""


class SignatureError(ValueError):
    """The envelope's signature is missing or wrong; ``reason`` is a counter label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _require_p256(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> None:
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"device keys are P-256, not {key.curve.name}")


def sign(env: Envelope, key: ec.EllipticCurvePrivateKey) -> Envelope:
    """``env`` with ``sig`` set by ``key``."""
    _require_p256(key)
    r, s = decode_dss_signature(key.sign(signing_bytes(env), ec.ECDSA(hashes.SHA256())))
    return with_sig(env, r.to_bytes(_HALF, "big") + s.to_bytes(_HALF, "big"))


def verify(env: Envelope, key: ec.EllipticCurvePublicKey) -> None:
    """Return if ``env`` was signed by ``key``'s owner; ``SignatureError`` otherwise."""
    _require_p256(key)
    try:
        raw = sig_bytes(env)
    except (binascii.Error, ValueError):
        raw = b""
    if raw is None:
        raise SignatureError("unsigned", f"{env.type} from {env.from_} carries no signature")
    if len(raw) != 2 * _HALF:
        raise SignatureError("bad-signature", f"{env.type} from {env.from_}: malformed signature")
    der = encode_dss_signature(
        int.from_bytes(raw[:_HALF], "big"), int.from_bytes(raw[_HALF:], "big")
    )
    try:
        key.verify(der, signing_bytes(env), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureError(
            "bad-signature", f"{env.type} from {env.from_}: signature does not match"
        ) from None


def certificate_field(cert_pem: bytes) -> str:
    """A PEM certificate as the envelope's ``cert`` (unpadded base64url DER)."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(der).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class _Signer:
    name: str
    key: ec.EllipticCurvePublicKey
    not_after: datetime


class Verifier:
    """Checks signed envelopes: the ``cert`` they carry must chain to ``ca_pem`` (the
    relay's CA) and name the sender's signer (``topics.signer_of``: the device itself;
    ``relay`` for the relay's own messages and for web peers, whom only the relay speaks
    for), and ``sig`` must be by its key. So a device cannot pass for a web peer (its
    certificate names the device) and the relay's key cannot pass for a device.
    Certificates checked once are kept (by their text) until they expire, so a call's
    every candidate costs one ECDSA verify.
    """

    def __init__(
        self,
        ca_pem: bytes,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        max_cached: int = 256,
    ) -> None:
        self._ca = x509.load_pem_x509_certificate(ca_pem)
        self._clock = clock
        self._max_cached = max_cached
        self._signers: dict[str, _Signer] = {}

    def check(self, env: Envelope) -> None:
        """Return if ``env`` is signed by the signer of its ``from``; ``SignatureError``
        otherwise."""
        if env.sig is None:
            raise SignatureError("unsigned", f"{env.type} from {env.from_} carries no signature")
        if env.cert is None:
            raise SignatureError("no-certificate", f"{env.type} from {env.from_}: no certificate")
        signer = self._signer(env.cert)
        if signer.name != signer_of(env.from_):
            raise SignatureError(
                "wrong-signer", f"{env.type} from {env.from_} carries {signer.name}'s certificate"
            )
        verify(env, signer.key)

    def _signer(self, cert_field: str) -> _Signer:
        now = self._clock()
        signer = self._signers.get(cert_field)
        if signer is not None and now < signer.not_after:
            return signer
        try:
            der = base64.urlsafe_b64decode(cert_field + "=" * (-len(cert_field) % 4))
            cert = x509.load_der_x509_certificate(der)
        except (binascii.Error, ValueError):
            raise SignatureError("bad-certificate", "certificate is not DER") from None
        verifier = PolicyBuilder().store(Store([self._ca])).time(now).build_client_verifier()
        try:
            verifier.verify(cert, [])
        except VerificationError as exc:
            raise SignatureError("bad-certificate", f"certificate not from the CA: {exc}") from None
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        key = cert.public_key()
        if len(names) != 1 or not isinstance(key, ec.EllipticCurvePublicKey):
            raise SignatureError("bad-certificate", "certificate names no single signer")
        if len(self._signers) >= self._max_cached:
            self._signers.clear()
        signer = _Signer(str(names[0].value), key, cert.not_valid_after_utc)
        self._signers[cert_field] = signer
        return signer


@dataclass(frozen=True, slots=True)
class Signing:
    """A paired device's signaling credentials: its key signs what it sends, and the
    relay's CA checks what it receives."""

    key: ec.EllipticCurvePrivateKey
    verifier: Verifier

    @classmethod
    def load(cls, key_path: Path, ca_path: Path) -> Signing:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: not an EC private key")
        return cls(key, Verifier(ca_path.read_bytes()))

    def sign(self, env: Envelope) -> Envelope:
        return sign(env, self.key)
