"""SRTP/SRTCP through pylibsrtp: the only module that imports it.

Keys reach a session through a keying step (``Keying``): pre-shared here,
DTLS-SRTP later. Both produce one ``SrtpKeys`` per direction.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Protocol

import pylibsrtp


class SrtpProfile(enum.Enum):
    """The protection profiles we negotiate (RFC 5764 / RFC 7714 names)."""

    AES_CM_128_HMAC_SHA1_80 = "SRTP_AES128_CM_SHA1_80"
    AEAD_AES_128_GCM = "SRTP_AEAD_AES_128_GCM"

    @property
    def key_len(self) -> int:
        return 16

    @property
    def salt_len(self) -> int:
        return 14 if self is SrtpProfile.AES_CM_128_HMAC_SHA1_80 else 12

    @property
    def _libsrtp(self) -> int:
        if self is SrtpProfile.AES_CM_128_HMAC_SHA1_80:
            return int(pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80)
        return int(pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM)


@dataclass(frozen=True, slots=True)
class SrtpKeys:
    """Master key and salt for one direction of one session."""

    profile: SrtpProfile
    master_key: bytes
    master_salt: bytes

    def __post_init__(self) -> None:
        if len(self.master_key) != self.profile.key_len:
            raise ValueError(f"{self.profile.name} needs a {self.profile.key_len}-byte key")
        if len(self.master_salt) != self.profile.salt_len:
            raise ValueError(f"{self.profile.name} needs a {self.profile.salt_len}-byte salt")

    @classmethod
    def generate(cls, profile: SrtpProfile) -> SrtpKeys:
        return cls(profile, os.urandom(profile.key_len), os.urandom(profile.salt_len))

    def __repr__(self) -> str:  # keys never reach logs
        return f"SrtpKeys({self.profile.name}, <secret>)"


@dataclass(frozen=True, slots=True)
class KeyPair:
    """What a keying step yields: keys to protect what we send and unprotect what we get."""

    tx: SrtpKeys
    rx: SrtpKeys


class Keying(Protocol):
    """Produces the session keys once the peer is reachable (DTLS-SRTP runs a handshake)."""

    async def keys(self) -> KeyPair: ...


@dataclass(frozen=True, slots=True)
class PresharedKeying:
    """Keys agreed out of band (tests, demo); the next issue replaces it with DTLS-SRTP."""

    pair: KeyPair

    async def keys(self) -> KeyPair:
        return self.pair

    def reversed(self) -> PresharedKeying:
        """The same keys as the other end sees them."""
        return PresharedKeying(KeyPair(tx=self.pair.rx, rx=self.pair.tx))

    @classmethod
    def from_secret(cls, secret: bytes, *, offerer: bool, profile: SrtpProfile) -> PresharedKeying:
        """Both directions' keys derived (HKDF-SHA256, RFC 5869) from one shared secret."""
        if len(secret) < 16:
            raise ValueError("pre-shared secret must be at least 16 bytes")
        prk = hmac.new(b"edge-intercom srtp", secret, hashlib.sha256).digest()

        def expand(label: bytes) -> SrtpKeys:
            okm = hmac.new(prk, label + profile.value.encode() + b"\x01", hashlib.sha256).digest()
            return SrtpKeys(profile, okm[: profile.key_len], okm[16 : 16 + profile.salt_len])

        ours, theirs = expand(b"offerer"), expand(b"answerer")
        return cls(KeyPair(tx=ours, rx=theirs) if offerer else KeyPair(tx=theirs, rx=ours))


class SrtpError(Exception):
    """A packet failed authentication, replay protection or decryption."""

    def __init__(self, message: str, *, replay: bool) -> None:
        super().__init__(message)
        self.replay = replay


def _policy(keys: SrtpKeys, ssrc_type: int) -> pylibsrtp.Policy:
    policy = pylibsrtp.Policy(
        key=keys.master_key + keys.master_salt,
        ssrc_type=ssrc_type,
        srtp_profile=keys.profile._libsrtp,
    )
    # Opus at 50 packets/s with RED/FEC: a 1024-packet window covers 20 s of reordering.
    policy.window_size = 1024
    return policy


class SrtpContext:
    """Protects outgoing and unprotects incoming RTP and RTCP of one session."""

    def __init__(self, pair: KeyPair) -> None:
        self._tx = pylibsrtp.Session(_policy(pair.tx, pylibsrtp.Policy.SSRC_ANY_OUTBOUND))
        self._rx = pylibsrtp.Session(_policy(pair.rx, pylibsrtp.Policy.SSRC_ANY_INBOUND))

    def protect(self, rtp: bytes) -> bytes:
        return bytes(self._tx.protect(rtp))

    def protect_rtcp(self, rtcp: bytes) -> bytes:
        return bytes(self._tx.protect_rtcp(rtcp))

    def unprotect(self, srtp: bytes) -> bytes:
        try:
            return bytes(self._rx.unprotect(srtp))
        except pylibsrtp.Error as exc:
            raise SrtpError(f"SRTP: {exc}", replay="replay" in str(exc)) from None

    def unprotect_rtcp(self, srtcp: bytes) -> bytes:
        try:
            return bytes(self._rx.unprotect_rtcp(srtcp))
        except pylibsrtp.Error as exc:
            raise SrtpError(f"SRTCP: {exc}", replay="replay" in str(exc)) from None
