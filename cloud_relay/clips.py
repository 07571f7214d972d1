"""The relay's side of alert clips: its clip key, opening a stored clip, playable files.

The clip key is an X25519 key pair made on first start, next to the CA in the PKI
directory (``clip-key``: the 32-byte private key in base64, 0600; a copy that group or
others can read is refused, as the PKI refuses its keys). Its public half goes to every
device on its retained ``config`` (``clip_key``); boards seal their clips to it
(``agent.edge.clip``), so the store holds only ciphertext and only who holds this key
hears a clip. Several relay workers share the PKI directory, and so the key.

``check_clip`` is what ingest runs on an alert's clip: it must open (for that alert,
with this key) and hold valid audio; ``ClipInfo`` is what is stored. ``ogg_opus``
(RFC 7845: what browsers play) and ``wav`` (decoded PCM) make files of an opened clip,
for the CLI now and the dashboard later.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
import struct
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.audio.format import CHANNELS, FRAME_SAMPLES, SAMPLE_BYTES, SAMPLE_RATE
from agent.codec.opus import CodecError, OpusDecoder
from agent.edge.clip import (
    KEY_BYTES,
    ClipAudio,
    SealedClip,
    new_private_key,
    public_key_of,
    unseal,
)
from agent.service.files import write_atomic

CLIP_KEY_FILE: Final = "clip-key"
"""In the PKI directory: the relay's private clip key."""

PRE_SKIP: Final = 312
"""Samples (48 kHz) libopus's encoder delays its output by (VOIP and AUDIO modes); the Ogg
header tells players to drop them."""

OGG_PAGE_PACKETS: Final = 50
"""Packets per Ogg page: one second of audio, well under 255 lacing values."""


class ClipKeyError(ValueError):
    """The relay's clip key file is unusable."""


@dataclass(frozen=True, slots=True)
class ClipKey:
    """The relay's clip key pair."""

    private: bytes
    public: bytes

    @classmethod
    def load(cls, directory: Path, *, create: bool = False) -> ClipKey:
        """The key in ``directory``; ``create``: made if there is none (``serve``), else
        ``ClipKeyError``. Blocking file I/O."""
        path = directory / CLIP_KEY_FILE
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            if not create:
                raise ClipKeyError(f"{path}: no clip key (the relay makes it on start)") from None
            private = new_private_key()
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(path, base64.b64encode(private) + b"\n", 0o600)
            return cls(private, public_key_of(private))
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ClipKeyError(f"{path}: group or others may read it (it may have leaked)")
        try:
            private = base64.b64decode(path.read_bytes().strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ClipKeyError(f"{path}: not base64") from None
        if len(private) != KEY_BYTES:
            raise ClipKeyError(f"{path}: not a {KEY_BYTES}-byte key")
        return cls(private, public_key_of(private))


@dataclass(frozen=True, slots=True)
class ClipInfo:
    """A checked clip as the store keeps it: ciphertext, and what it holds."""

    sealed: bytes
    seconds: float
    before_s: float

    def summary(self) -> dict[str, float | int]:
        """What the alert's stored body, the listing and webhooks say of the clip."""
        return {"bytes": len(self.sealed), "seconds": self.seconds, "before_s": self.before_s}


def check_clip(text: str, key: ClipKey, alert_id: str) -> ClipInfo:
    """The clip of an alert, opened once to prove it is whole; ``ClipError`` if not."""
    sealed = SealedClip.from_text(text)
    audio = unseal(sealed, key.private, alert_id)
    return ClipInfo(sealed.to_bytes(), audio.seconds, audio.before_s)


def open_clip(sealed: bytes, key: ClipKey, alert_id: str) -> ClipAudio:
    """A stored clip's audio; ``ClipError`` if it does not open."""
    return unseal(SealedClip.from_bytes(sealed), key.private, alert_id)


def decode_pcm(audio: ClipAudio) -> bytes:
    """The clip as 48 kHz mono int16 PCM; a packet that does not decode is concealed."""
    decoder = OpusDecoder()
    frames: list[bytes] = []
    for packet in audio.packets:
        try:
            frames.append(decoder.decode(packet))
        except CodecError:  # one bad packet is concealed, not the end of the clip
            frames.append(decoder.conceal())
    return b"".join(frames)


def wav(audio: ClipAudio) -> bytes:
    """The clip decoded, as a WAV file (48 kHz mono 16-bit)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(CHANNELS)
        w.setsampwidth(SAMPLE_BYTES)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(decode_pcm(audio))
    return out.getvalue()


def ogg_opus(audio: ClipAudio, serial: int | None = None) -> bytes:
    """The clip as an Ogg Opus file (RFC 7845), without re-encoding."""
    serial = int.from_bytes(os.urandom(4), "big") if serial is None else serial
    head = b"OpusHead" + struct.pack("<BBHIhB", 1, CHANNELS, PRE_SKIP, SAMPLE_RATE, 0, 0)
    vendor = b"edge-intercom"
    tags = b"OpusTags" + struct.pack("<I", len(vendor)) + vendor + struct.pack("<I", 0)
    pages = [_ogg_page([head], 0, serial, 0, bos=True), _ogg_page([tags], 0, serial, 1)]
    packets = audio.packets
    chunks = [packets[i : i + OGG_PAGE_PACKETS] for i in range(0, len(packets), OGG_PAGE_PACKETS)]
    done = 0
    for n, chunk in enumerate(chunks):
        done += len(chunk)
        pages.append(
            _ogg_page(list(chunk), done * FRAME_SAMPLES, serial, 2 + n, eos=n == len(chunks) - 1)
        )
    return b"".join(pages)


def _ogg_page(
    packets: list[bytes], granule: int, serial: int, seq: int, *, bos: bool = False,
    eos: bool = False,
) -> bytes:  # fmt: skip
    lacing = bytearray()
    for packet in packets:
        lacing += b"\xff" * (len(packet) // 255) + bytes([len(packet) % 255])
    flags = (0x02 if bos else 0) | (0x04 if eos else 0)
    header = b"OggS" + struct.pack("<BBqIIIB", 0, flags, granule, serial, seq, 0, len(lacing))
    page = header + bytes(lacing) + b"".join(packets)
    crc = _ogg_crc(page)
    return page[:22] + struct.pack("<I", crc) + page[26:]


def _crc_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else r << 1
        table.append(r & 0xFFFFFFFF)
    return tuple(table)


_CRC = _crc_table()


def _ogg_crc(data: bytes) -> int:
    """Ogg's CRC-32 (polynomial 0x04C11DB7, not reflected, no final xor): not zlib's."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC[(crc >> 24) ^ byte]
    return crc


def clip_file(audio: ClipAudio, path: Path) -> bytes:
    """The file ``path``'s extension asks for: ``.ogg``/``.opus`` or ``.wav``."""
    suffix = path.suffix.lower()
    if suffix in (".ogg", ".opus"):
        return ogg_opus(audio)
    if suffix == ".wav":
        return wav(audio)
    raise ValueError(f"{path}: write .ogg, .opus or .wav")


__all__ = [
    "CLIP_KEY_FILE",
    "ClipInfo",
    "ClipKey",
    "ClipKeyError",
    "check_clip",
    "clip_file",
    "ogg_opus",
    "open_clip",
    "wav",
]
