"""Alert clips without a network: the wire format (with garbage), the crypto, the PCM ring,
clips made of real Opus, the playable files (decoded by FFmpeg through PyAV, a decoder we
did not write), the relay's clip key, and held alerts in the outbox."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import json
import sqlite3
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.audio.format import FRAME_BYTES, FRAME_SAMPLES, SAMPLE_RATE
from agent.edge.alerts import (
    ALERT_VERSION,
    CLIP_VERSION,
    Alert,
    AlertError,
    Severity,
    decode_alert,
)
from agent.edge.clip import (
    HEADER_BYTES,
    MAX_CLIP_BYTES,
    ClipAudio,
    ClipError,
    ClipSettings,
    SealedClip,
    new_private_key,
    public_key_from_text,
    public_key_of,
    seal,
    unseal,
)
from agent.edge.outbox import Outbox
from agent.edge.recorder import CLIP_KEY_FILE, ClipRecorder, PcmRing, RelayClipKey, make_clip
from agent.service.config import AgentConfig
from agent.service.tomlconf import ConfigError, from_dict
from cloud_relay.clips import ClipKey, ClipKeyError, check_clip, clip_file, ogg_opus, wav

ALERT_ID = "0123456789abcdef" * 2
OTHER_ID = "f" * 32
PRIVATE = new_private_key()
PUBLIC = public_key_of(PRIVATE)


def tone(freq_hz: float, seconds: float, amplitude: float = 8000.0) -> list[bytes]:
    """A sine as 20 ms frames of 48 kHz int16."""
    n = round(seconds * SAMPLE_RATE) // FRAME_SAMPLES * FRAME_SAMPLES
    pcm = (amplitude * np.sin(2 * np.pi * freq_hz * np.arange(n) / SAMPLE_RATE)).astype("<i2")
    data = pcm.tobytes()
    return [data[i : i + FRAME_BYTES] for i in range(0, len(data), FRAME_BYTES)]


def peak_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64) * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * SAMPLE_RATE / len(samples))


def sample_audio() -> ClipAudio:
    return ClipAudio(2, (b"\x01" * 40, b"\x02" * 33, b"\x03" * 61))


def alert(clip: str | None = None) -> Alert:
    t = 1_760_000_000_000
    return Alert(ALERT_ID, "alarm", "smoke_alarm", Severity.CRITICAL, t, t + 4000, 0.9, -20.0,
                 t + 4100, clip=clip)  # fmt: skip


# --- the wire format -------------------------------------------------------------------


@given(
    before=st.integers(0, 5),
    packets=st.lists(st.binary(min_size=1, max_size=300), min_size=5, max_size=40),
)
def test_clip_audio_round_trip(before: int, packets: list[bytes]) -> None:
    audio = ClipAudio(before, tuple(packets))
    assert ClipAudio.from_bytes(audio.to_bytes()) == audio


@given(st.binary(max_size=400))
def test_garbage_clip_audio_is_a_clip_error(data: bytes) -> None:
    try:
        ClipAudio.from_bytes(data)
    except ClipError as exc:
        assert exc.label in ("audio", "version", "before", "packet")


@given(st.binary(max_size=MAX_CLIP_BYTES + 10))
def test_garbage_sealed_clip_is_a_clip_error(data: bytes) -> None:
    try:
        clip = SealedClip.from_bytes(data)
    except ClipError as exc:
        assert exc.label in ("size", "version", "header")
        return
    with pytest.raises(ClipError) as err:
        unseal(clip, PRIVATE, ALERT_ID)
    assert err.value.label in ("key", "auth")


@given(st.text(max_size=200))
def test_garbage_clip_text_is_a_clip_error(text: str) -> None:
    with pytest.raises(ClipError):
        SealedClip.from_text(text)


def test_oversize_clips_are_refused() -> None:
    big = seal(ClipAudio(0, (b"x" * 1000,) * 23), PUBLIC, ALERT_ID).to_bytes()
    assert len(big) <= MAX_CLIP_BYTES
    with pytest.raises(ClipError) as err:
        SealedClip.from_bytes(big + b"x" * (MAX_CLIP_BYTES - len(big) + 1))
    assert err.value.label == "size"
    with pytest.raises(ClipError) as err:
        SealedClip.from_text("A" * (4 * MAX_CLIP_BYTES // 3 + 8))
    assert err.value.label == "size"


def test_alert_with_a_clip_is_version_2_and_round_trips() -> None:
    text = seal(sample_audio(), PUBLIC, ALERT_ID).to_text()
    with_clip = alert(text)
    assert json.loads(with_clip.to_json())["v"] == CLIP_VERSION
    assert decode_alert(with_clip.to_json()) == with_clip
    assert json.loads(alert().to_json())["v"] == ALERT_VERSION
    assert "clip" not in alert().to_dict()
    data = with_clip.to_dict() | {"v": ALERT_VERSION}
    with pytest.raises(AlertError) as err:
        decode_alert(json.dumps(data).encode())
    assert err.value.label == "v"
    for bad in ("", 5):
        with pytest.raises(AlertError) as err:
            Alert.from_dict(with_clip.to_dict() | {"clip": bad})
        assert err.value.label == "clip"


# --- the crypto ------------------------------------------------------------------------


def test_a_sealed_clip_opens_with_the_relay_key_for_its_alert_only() -> None:
    audio = sample_audio()
    sealed = SealedClip.from_text(seal(audio, PUBLIC, ALERT_ID).to_text())
    assert unseal(sealed, PRIVATE, ALERT_ID) == audio
    # Every clip has its own ephemeral key and nonce: the same audio never looks the same.
    again = seal(audio, PUBLIC, ALERT_ID)
    assert (again.ephemeral, again.ciphertext) != (sealed.ephemeral, sealed.ciphertext)
    # Moved to another alert: does not open.
    with pytest.raises(ClipError) as err:
        unseal(sealed, PRIVATE, OTHER_ID)
    assert err.value.label == "auth"
    # Another relay's key.
    with pytest.raises(ClipError) as err:
        unseal(sealed, new_private_key(), ALERT_ID)
    assert err.value.label == "key"
    # Sealed to another key but claiming ours (key id rewritten): does not open either.
    other = seal(audio, public_key_of(new_private_key()), ALERT_ID)
    with pytest.raises(ClipError) as err:
        unseal(dataclasses.replace(other, key_id=sealed.key_id), PRIVATE, ALERT_ID)
    assert err.value.label == "auth"


def test_any_altered_byte_makes_the_clip_fail() -> None:
    data = seal(sample_audio(), PUBLIC, ALERT_ID).to_bytes()
    for at in range(len(data)):
        altered = bytearray(data)
        altered[at] ^= 0x01
        with pytest.raises(ClipError):
            unseal(SealedClip.from_bytes(bytes(altered)), PRIVATE, ALERT_ID)


def test_relay_clip_key_text_is_checked() -> None:
    assert public_key_from_text(base64.b64encode(PUBLIC).decode()) == PUBLIC
    for bad in (None, 5, "not base64!", base64.b64encode(b"short").decode(), "A" * 100):
        with pytest.raises(ClipError):
            public_key_from_text(bad)


# --- settings and the ring -------------------------------------------------------------


def test_clip_settings_are_checked() -> None:
    config = from_dict(AgentConfig, {"alerts": {"clip": {"enabled": True, "before_s": 3}}})
    assert config.alerts.clip.enabled and config.alerts.clip.before_frames == 150
    assert not AgentConfig().alerts.clip.enabled  # off by default
    for bad, words in (
        ({"bitrate": 64_000}, "bitrate"),
        ({"before_s": 8.0, "after_s": 5.0}, "must be 0.2-10 s"),
        ({"before_s": 8.0, "bitrate": 24_000}, "does not fit"),
        ({"after_s": -1.0}, "after_s"),
        ({"kinds": ["smoke"]}, "unknown alert kind"),
        ({"enabled": "yes"}, "enabled"),
    ):
        with pytest.raises(ConfigError, match=words):
            from_dict(AgentConfig, {"alerts": {"clip": bad}})


def test_the_ring_keeps_only_the_last_frames() -> None:
    ring = PcmRing(3)
    for n in range(10):
        ring.append(bytes([n]) * 4)
    assert len(ring) == 3
    assert ring.snapshot() == [bytes([n]) * 4 for n in (7, 8, 9)]


# --- clips of real Opus, and the files made of them ------------------------------------


def test_a_clip_holds_the_tone_it_heard_as_ogg_opus_and_as_wav(tmp_path: Path) -> None:
    frames = tone(3100.0, 5.0)
    sealed, truncated = make_clip(frames, 150, ClipSettings(), PUBLIC, ALERT_ID)
    assert not truncated and len(sealed.to_bytes()) <= MAX_CLIP_BYTES
    info = check_clip(sealed.to_text(), ClipKey(PRIVATE, PUBLIC), ALERT_ID)
    assert (info.seconds, info.before_s) == (5.0, 3.0)
    audio = unseal(sealed, PRIVATE, ALERT_ID)
    # Ogg Opus, read by FFmpeg.
    path = tmp_path / "clip.ogg"
    path.write_bytes(clip_file(audio, path))
    with av.open(str(path)) as container:
        assert container.streams.audio[0].codec_context.name == "opus"
        decoded = np.concatenate([f.to_ndarray().ravel() for f in container.decode(audio=0)])
    assert len(decoded) == 5 * SAMPLE_RATE - 312  # all of it, less the encoder's pre-skip
    assert abs(peak_hz(decoded[SAMPLE_RATE : 2 * SAMPLE_RATE]) - 3100.0) < 5
    # WAV, decoded by us.
    with wave.open(io.BytesIO(wav(audio))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getnframes()) == (SAMPLE_RATE, 1, 240_000)
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    assert abs(peak_hz(pcm[SAMPLE_RATE : 2 * SAMPLE_RATE]) - 3100.0) < 5
    with pytest.raises(ValueError, match="ogg"):
        clip_file(audio, tmp_path / "clip.mp3")


def test_ogg_pages_carry_the_lacing_of_long_packets() -> None:
    audio = ClipAudio(0, (b"\x00" * 600,) * 3)  # not Opus: only the page layout is checked
    data = ogg_opus(audio, serial=7)
    assert data.count(b"OggS") == 3 and data.startswith(b"OggS")
    last = data.rindex(b"OggS")
    assert data[last + 5] == 0x04  # end of stream
    assert data[last + 27 : last + 27 + 3] == bytes([255, 255, 90])  # 600 = 255 + 255 + 90


def test_a_clip_too_big_loses_its_last_frames_not_its_head() -> None:
    noise = np.random.default_rng(1).integers(-20000, 20000, 10 * SAMPLE_RATE).astype("<i2")
    data = noise.tobytes()
    frames = [data[i : i + FRAME_BYTES] for i in range(0, len(data), FRAME_BYTES)]
    settings = ClipSettings(bitrate=24_000)  # 10 s of it is more than a clip holds
    sealed, truncated = make_clip(frames, 100, settings, PUBLIC, ALERT_ID)
    assert truncated and len(sealed.to_bytes()) <= MAX_CLIP_BYTES
    audio = unseal(sealed, PRIVATE, ALERT_ID)
    assert audio.before == 100 and 100 < len(audio.packets) < len(frames)


async def test_recorder_takes_the_seconds_around_the_event_and_cuts_short_at_close(
    tmp_path: Path,
) -> None:
    key = RelayClipKey("door-1", tmp_path)
    settings = ClipSettings(enabled=True, before_s=1.0, after_s=1.0, post_timeout_s=10.0)
    recorder = ClipRecorder("door-1", settings, key)
    assert recorder.wants("smoke_alarm") and not recorder.wants("voice")
    # No relay key yet: no clip, counted.
    assert await recorder.clip_for(ALERT_ID) is None
    assert recorder.stats.no_key == 1
    key.on_config({"clip_key": base64.b64encode(PUBLIC).decode()})
    assert RelayClipKey("door-1", tmp_path).current == PUBLIC  # kept for the next start
    for frame in tone(500.0, 2.0):  # older than the ring holds
        recorder.on_frame(frame)
    for frame in tone(1000.0, 1.0):
        recorder.on_frame(frame)
    making = asyncio.create_task(recorder.clip_for(ALERT_ID))
    await asyncio.sleep(0)
    for frame in tone(2000.0, 0.5):  # half of what it waits for; then the capture ends
        recorder.on_frame(frame)
    recorder.cut_short()
    text = await making
    assert text is not None
    audio = unseal(SealedClip.from_text(text), PRIVATE, ALERT_ID)
    assert (audio.before, len(audio.packets)) == (50, 75)
    assert recorder.stats.cut_short == 1 and recorder.stats.made == 1
    with wave.open(io.BytesIO(wav(audio))) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    assert abs(peak_hz(pcm[4800:43200]) - 1000.0) < 5  # before: the 1 kHz second
    assert abs(peak_hz(pcm[52800:]) - 2000.0) < 5  # after: 2 kHz


def test_a_bad_key_file_on_the_board_is_ignored(tmp_path: Path) -> None:
    (tmp_path / CLIP_KEY_FILE).write_text("garbage\n")
    assert RelayClipKey("door-1", tmp_path).current is None


def test_the_relay_clip_key_is_made_once_and_kept_private(tmp_path: Path) -> None:
    with pytest.raises(ClipKeyError, match="no clip key"):
        ClipKey.load(tmp_path / "pki")
    made = ClipKey.load(tmp_path / "pki", create=True)
    assert ClipKey.load(tmp_path / "pki") == made
    path = tmp_path / "pki" / "clip-key"
    assert path.stat().st_mode & 0o077 == 0
    path.chmod(0o644)
    with pytest.raises(ClipKeyError, match="others may read"):
        ClipKey.load(tmp_path / "pki")


# --- held alerts in the outbox ---------------------------------------------------------


async def test_held_alerts_wait_for_their_clip_and_are_released_at_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = await Outbox.open(path)
    try:
        await box.add(alert(), held=True)
        assert await box.pending(10) == [] and await box.count() == 1
        text = seal(sample_audio(), PUBLIC, ALERT_ID).to_text()
        assert await box.release(alert(text))
        assert await box.pending(10) == [alert(text)]
        assert not await box.release(alert())  # released once: its form is final
        assert await box.pending(10) == [alert(text)]
        other = dataclasses.replace(alert(), id=OTHER_ID)
        await box.add(other, held=True)
    finally:
        await box.close()
    # The process making its clip died: the alert goes without one.
    box = await Outbox.open(path)
    try:
        assert box.stats.released_at_open == 1
        assert [a.id for a in await box.pending(10)] == [ALERT_ID, OTHER_ID]
    finally:
        await box.close()


def test_the_sealed_header_is_what_the_docs_say() -> None:
    sealed = seal(sample_audio(), PUBLIC, ALERT_ID)
    data = sealed.to_bytes()
    assert data[0] == 1 and HEADER_BYTES == 53
    assert data[1:9] == hashlib.sha256(PUBLIC).digest()[:8]
    assert (data[9:41], data[41:53]) == (sealed.ephemeral, sealed.nonce)


async def test_an_outbox_from_before_clips_gets_its_held_column(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT "
            "NULL UNIQUE, rank INTEGER NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL)"
        )
        conn.execute("INSERT INTO outbox (id, rank, kind, body) VALUES (?, 2, ?, ?)",
                     (ALERT_ID, "smoke_alarm", alert().to_json().decode()))  # fmt: skip
    conn.close()
    box = await Outbox.open(path)
    try:
        assert await box.pending(10) == [alert()]
    finally:
        await box.close()
