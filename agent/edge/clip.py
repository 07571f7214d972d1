"""The encrypted audio clip an alert may carry: its settings, its wire format and its crypto.

Pure code over bytes and frozen dataclasses, shared by the board (which seals a clip)
and the relay (which opens it), so both accept exactly the same clips. Parsing is
strict and raises ``ClipError``, whose ``label`` is a fixed word fit for a counter.

A clip is a few seconds of Opus around an event, sealed to the relay's clip key so
that the broker and anything else between board and relay cannot hear it, and the
relay's store holds only ciphertext. Two layers, both versioned by their first byte:

Sealed clip (``SealedClip``; in the alert's ``clip`` field as standard base64)::

    u8  version = 1
    8   key id: the first 8 bytes of SHA-256 over the relay's 32-byte public key
    32  the board's ephemeral X25519 public key (a new one for every clip)
    12  AES-GCM nonce
    ... AES-256-GCM ciphertext of the clip audio, with its 16-byte tag

The key is HKDF-SHA256 (salt: ephemeral public key + relay public key, info:
``INFO``) over X25519(ephemeral private, relay public). The associated data is
the 53 header bytes followed by the alert id (ASCII), so a clip moved to another
alert, or a header altered on the way, fails to open.

Clip audio (``ClipAudio``, the plaintext)::

    u8  version = 1
    u16 frames before the event (big endian)
    then per 20 ms frame of 48 kHz mono Opus: u16 length (1..1275) + the packet

A sealed clip is at most ``MAX_CLIP_BYTES``; a board that would make a longer one
leaves out its last frames.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.audio.format import FRAME_MS
from agent.edge.base import check_settings

CLIP_VERSION: Final = 1
"""First byte of a sealed clip and of its plaintext."""

MAX_CLIP_BYTES: Final = 24 * 1024
"""Largest sealed clip (binary); about 10 s of 16 kbit/s Opus."""

MAX_CLIP_TEXT: Final = 4 * ((MAX_CLIP_BYTES + 2) // 3)
"""Largest ``clip`` field of an alert (base64 of ``MAX_CLIP_BYTES``)."""

KEY_BYTES: Final = 32
KEY_ID_BYTES: Final = 8
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
HEADER_BYTES: Final = 1 + KEY_ID_BYTES + KEY_BYTES + NONCE_BYTES
"""Version, key id, ephemeral key and nonce: what precedes the ciphertext."""

INFO: Final = b"edge-intercom alert clip v1"
"""HKDF info: keys for clips are no use for anything else."""

MAX_OPUS_PACKET: Final = 1275
_AUDIO_HEADER = struct.Struct(">BH")
_LENGTH = struct.Struct(">H")

DEFAULT_KINDS: Final = ("smoke_alarm", "co_alarm", "alarm_sound", "glass_break", "loud_noise")
"""Alerts that get a clip by default: sounds someone may want to hear. Not ``voice``: a
clip of every voice heard would be eavesdropping; not the microphone faults: nothing
to hear."""


class ClipError(ValueError):
    """A clip that cannot be parsed or opened; ``label`` names what was wrong."""

    def __init__(self, message: str, label: str) -> None:
        super().__init__(message)
        self.label = label


@dataclass(frozen=True, slots=True)
class ClipSettings:
    """``[alerts.clip]``: an encrypted Opus clip of the sound around an alert (off by default)."""

    enabled: bool = False
    """Attach clips to alerts (only once the relay's clip key is known; never in clear)."""
    before_s: float = 3.0
    """Seconds of sound before the detection, kept in memory (PCM) all the time."""
    after_s: float = 2.0
    """Seconds of sound after the detection; the alert waits for them."""
    post_timeout_s: float = 1.0
    """Extra seconds the alert waits for the ``after_s`` audio when the microphone stalls or
    ends; then the clip is cut short there."""
    bitrate: int = 16_000
    """Opus bit rate (bit/s): 16 kbit/s codes wideband (8 kHz audio), enough for speech
    and alarm tones (520 Hz-4 kHz)."""
    complexity: int = 5
    """Opus complexity 0-10: CPU spent per clip (made only when an alert fires)."""
    kinds: tuple[str, ...] = DEFAULT_KINDS
    """Alert kinds that get a clip."""
    max_pending: int = 2
    """Clips made at once, at most; an alert beyond that goes without one (counted)."""

    def __post_init__(self) -> None:
        check_settings(
            self,
            {"before_s": (0.0, 8.0), "after_s": (0.0, 5.0), "post_timeout_s": (0.1, 10.0),
             "bitrate": (6_000, 32_000), "complexity": (0, 10), "max_pending": (1, 8)},
        )  # fmt: skip
        total = self.before_s + self.after_s
        if not 0.2 <= total <= 10.0:
            raise ValueError(f"ClipSettings: before_s + after_s must be 0.2-10 s, got {total:g}")
        # VBR overshoots its target: leave a quarter of the limit as headroom.
        if total * self.bitrate / 8 > 0.75 * MAX_CLIP_BYTES:
            raise ValueError(
                f"ClipSettings: {total:g} s at {self.bitrate} bit/s does not fit a "
                f"{MAX_CLIP_BYTES // 1024} KB clip: lower the bitrate or the seconds"
            )

    @property
    def before_frames(self) -> int:
        return round(self.before_s * 1000 / FRAME_MS)

    @property
    def after_frames(self) -> int:
        return round(self.after_s * 1000 / FRAME_MS)


@dataclass(frozen=True, slots=True)
class ClipAudio:
    """The plaintext: 20 ms Opus packets (48 kHz mono), the first ``before`` of them heard
    before the detection."""

    before: int
    packets: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not 0 <= self.before <= len(self.packets):
            raise ClipError(f"{self.before} frames before the event of {len(self.packets)}",
                            "before")  # fmt: skip
        for packet in self.packets:
            if not 1 <= len(packet) <= MAX_OPUS_PACKET:
                raise ClipError(f"Opus packet of {len(packet)} bytes", "packet")

    @property
    def seconds(self) -> float:
        return len(self.packets) * FRAME_MS / 1000

    @property
    def before_s(self) -> float:
        return self.before * FRAME_MS / 1000

    def to_bytes(self) -> bytes:
        parts = [_AUDIO_HEADER.pack(CLIP_VERSION, self.before)]
        for packet in self.packets:
            parts += (_LENGTH.pack(len(packet)), packet)
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> ClipAudio:
        if len(data) < _AUDIO_HEADER.size:
            raise ClipError("clip audio is too short", "audio")
        version, before = _AUDIO_HEADER.unpack_from(data)
        if version != CLIP_VERSION:
            raise ClipError(f"clip audio version {version} is not {CLIP_VERSION}", "version")
        packets: list[bytes] = []
        at = _AUDIO_HEADER.size
        while at < len(data):
            if at + _LENGTH.size > len(data):
                raise ClipError("clip audio ends inside a packet length", "audio")
            (length,) = _LENGTH.unpack_from(data, at)
            at += _LENGTH.size
            if at + length > len(data):
                raise ClipError("clip audio ends inside a packet", "audio")
            packets.append(data[at : at + length])
            at += length
        return cls(before, tuple(packets))


def audio_size(packets: Sequence[bytes]) -> int:
    """Bytes of the sealed clip that holds ``packets``."""
    return HEADER_BYTES + TAG_BYTES + _AUDIO_HEADER.size + sum(2 + len(p) for p in packets)


@dataclass(frozen=True, slots=True)
class SealedClip:
    """A clip as it travels and as the relay stores it."""

    key_id: bytes
    ephemeral: bytes
    """The board's one-time X25519 public key."""
    nonce: bytes
    ciphertext: bytes
    """AES-256-GCM ciphertext with its tag."""

    def __post_init__(self) -> None:
        for name, size in (("key_id", KEY_ID_BYTES), ("ephemeral", KEY_BYTES),
                           ("nonce", NONCE_BYTES)):  # fmt: skip
            if len(getattr(self, name)) != size:
                raise ClipError(f"clip {name} must be {size} bytes", "header")
        if len(self.ciphertext) < TAG_BYTES + _AUDIO_HEADER.size:
            raise ClipError("clip ciphertext is too short", "size")
        if HEADER_BYTES + len(self.ciphertext) > MAX_CLIP_BYTES:
            raise ClipError(f"clip is over {MAX_CLIP_BYTES} bytes", "size")

    def header(self) -> bytes:
        return bytes([CLIP_VERSION]) + self.key_id + self.ephemeral + self.nonce

    def to_bytes(self) -> bytes:
        return self.header() + self.ciphertext

    def to_text(self) -> str:
        """The alert's ``clip`` field."""
        return base64.b64encode(self.to_bytes()).decode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SealedClip:
        if len(data) > MAX_CLIP_BYTES:
            raise ClipError(f"clip is {len(data)} bytes, over {MAX_CLIP_BYTES}", "size")
        if len(data) < HEADER_BYTES:
            raise ClipError("clip is shorter than its header", "size")
        if data[0] != CLIP_VERSION:
            raise ClipError(f"clip version {data[0]} is not {CLIP_VERSION}", "version")
        at = 1 + KEY_ID_BYTES
        return cls(data[1:at], data[at : at + KEY_BYTES], data[at + KEY_BYTES : HEADER_BYTES],
                   data[HEADER_BYTES:])  # fmt: skip

    @classmethod
    def from_text(cls, text: str) -> SealedClip:
        if not isinstance(text, str) or len(text) > MAX_CLIP_TEXT:
            raise ClipError(f"clip must be base64 text of at most {MAX_CLIP_TEXT} characters",
                            "size")  # fmt: skip
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ClipError("clip is not base64", "base64") from None
        return cls.from_bytes(data)


def key_id(public_key: bytes) -> bytes:
    return hashlib.sha256(public_key).digest()[:KEY_ID_BYTES]


def public_key_from_text(text: object) -> bytes:
    """A relay clip key as the ``config`` topic carries it (base64 of 32 bytes)."""
    if not isinstance(text, str) or len(text) > 64:
        raise ClipError("clip key must be base64 text", "key")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ClipError("clip key is not base64", "key") from None
    if len(raw) != KEY_BYTES:
        raise ClipError(f"clip key must be {KEY_BYTES} bytes, got {len(raw)}", "key")
    return raw


def public_key_text(public_key: bytes) -> str:
    return base64.b64encode(public_key).decode()


def new_private_key() -> bytes:
    """32 random bytes: an X25519 private key (the relay's, made once)."""
    return X25519PrivateKey.generate().private_bytes_raw()


def public_key_of(private_key: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def _aead(shared: bytes, ephemeral: bytes, public_key: bytes) -> AESGCM:
    key = HKDF(hashes.SHA256(), 32, salt=ephemeral + public_key, info=INFO).derive(shared)
    return AESGCM(key)


def seal(audio: ClipAudio, public_key: bytes, alert_id: str) -> SealedClip:
    """``audio`` encrypted to the relay's ``public_key``, bound to ``alert_id``."""
    if len(public_key) != KEY_BYTES:
        raise ClipError(f"clip key must be {KEY_BYTES} bytes", "key")
    secret = X25519PrivateKey.generate()
    ephemeral = secret.public_key().public_bytes_raw()
    shared = secret.exchange(X25519PublicKey.from_public_bytes(public_key))
    nonce = os.urandom(NONCE_BYTES)
    header = bytes([CLIP_VERSION]) + key_id(public_key) + ephemeral + nonce
    ciphertext = _aead(shared, ephemeral, public_key).encrypt(
        nonce, audio.to_bytes(), header + alert_id.encode()
    )
    return SealedClip(key_id(public_key), ephemeral, nonce, ciphertext)


def unseal(clip: SealedClip, private_key: bytes, alert_id: str) -> ClipAudio:
    """The audio of ``clip`` (sealed for ``alert_id``) with the relay's ``private_key``."""
    secret = X25519PrivateKey.from_private_bytes(private_key)
    public_key = secret.public_key().public_bytes_raw()
    if clip.key_id != key_id(public_key):
        raise ClipError("clip is sealed to another relay key", "key")
    try:
        shared = secret.exchange(X25519PublicKey.from_public_bytes(clip.ephemeral))
        plain = _aead(shared, clip.ephemeral, public_key).decrypt(
            clip.nonce, clip.ciphertext, clip.header() + alert_id.encode()
        )
    except (InvalidTag, ValueError):  # ValueError: a low-order ephemeral key
        raise ClipError("clip does not open: altered, or not for this alert", "auth") from None
    return ClipAudio.from_bytes(plain)


__all__ = [
    "MAX_CLIP_BYTES",
    "MAX_CLIP_TEXT",
    "ClipAudio",
    "ClipError",
    "ClipSettings",
    "SealedClip",
    "audio_size",
    "new_private_key",
    "public_key_from_text",
    "public_key_of",
    "public_key_text",
    "seal",
    "unseal",
]
