"""The relay's side of signed signaling (``agent.signaling.signing``).

Each device signs what it sends with the key it made at pairing; the relay knows the
certificate it issued then (the store keeps each device's current one). ``Senders``
attaches that certificate to a device's envelope and checks the signature before the
envelope is routed, so the receiver can check it again against the relay's CA; the
relay's own messages (a decline for an unreachable callee) it signs with its client
key. ``from`` cannot be rewritten any more (the signature covers it): an envelope
claiming another sender than its topic's device is dropped as forged.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from agent.signaling.envelope import Envelope
from agent.signaling.signing import Signing, Verifier, certificate_field

FORGED_FROM = "forged-from"


class Senders:
    """Device certificates by id, and the relay's own signing credentials."""

    def __init__(self, signing: Signing, relay_cert: Path) -> None:
        self._signing = signing
        self._relay_cert = certificate_field(relay_cert.read_bytes())
        self._certs: dict[str, str] = {}

    @classmethod
    def load(cls, key: Path, cert: Path, ca: Path) -> Senders:
        return cls(Signing.load(key, ca), cert)

    @property
    def verifier(self) -> Verifier:
        return self._signing.verifier

    def knows(self, device: str) -> bool:
        return device in self._certs

    def learn(self, device: str, cert_pem: str) -> bool:
        """Take ``device``'s current certificate; True if it is new to us."""
        field = certificate_field(cert_pem.encode())
        new = self._certs.get(device) != field
        self._certs[device] = field
        return new

    def check(self, env: Envelope) -> Envelope:
        """``env`` with its sender's certificate attached, if its signature holds;
        ``SignatureError`` otherwise. Call ``knows`` first."""
        signed = replace(env, cert=self._certs[env.from_])
        self._signing.verifier.check(signed)
        return signed

    def sign(self, env: Envelope) -> Envelope:
        """The relay's own message, signed, with the relay's certificate."""
        return replace(self._signing.sign(env), cert=self._relay_cert)
