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
import dataclasses

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from agent.signaling.envelope import Envelope, signing_bytes

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
    raw = r.to_bytes(_HALF, "big") + s.to_bytes(_HALF, "big")
    return dataclasses.replace(env, sig=base64.urlsafe_b64encode(raw).rstrip(b"=").decode())


def verify(env: Envelope, key: ec.EllipticCurvePublicKey) -> None:
    """Return if ``env`` was signed by ``key``'s owner; ``SignatureError`` otherwise."""
    _require_p256(key)
    if env.sig is None:
        raise SignatureError("unsigned", f"{env.type} from {env.from_} carries no signature")
    try:
        raw = base64.urlsafe_b64decode(env.sig + "=" * (-len(env.sig) % 4))
    except (binascii.Error, ValueError):
        raw = b""
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
