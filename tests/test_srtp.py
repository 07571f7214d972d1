"""SRTP on real libsrtp: round trips, and attackers (replay, tampering, wrong key) refused."""

import struct

import pytest

from agent.media.srtp import KeyPair, PresharedKeying, SrtpContext, SrtpError, SrtpKeys, SrtpProfile


def _rtp(seq: int) -> bytes:
    return bytes([0x80, 111]) + struct.pack("!HII", seq, seq * 960, 0x1234) + bytes(range(80))


def _rtcp_rr() -> bytes:
    return bytes([0x80, 201]) + struct.pack("!HI", 1, 0x1234)


@pytest.fixture(params=list(SrtpProfile))
def pair(request: pytest.FixtureRequest) -> tuple[SrtpContext, SrtpContext]:
    profile: SrtpProfile = request.param
    keys = KeyPair(SrtpKeys.generate(profile), SrtpKeys.generate(profile))
    return SrtpContext(keys), SrtpContext(KeyPair(tx=keys.rx, rx=keys.tx))


def test_round_trip_rtp_and_rtcp(pair: tuple[SrtpContext, SrtpContext]) -> None:
    a, b = pair
    for seq in range(5):
        sealed = a.protect(_rtp(seq))
        assert sealed[12:20] != _rtp(seq)[12:20]  # payload is encrypted
        assert b.unprotect(sealed) == _rtp(seq)
    assert b.unprotect_rtcp(a.protect_rtcp(_rtcp_rr())) == _rtcp_rr()


def test_replay_is_refused(pair: tuple[SrtpContext, SrtpContext]) -> None:
    a, b = pair
    sealed = a.protect(_rtp(7))
    b.unprotect(sealed)
    with pytest.raises(SrtpError) as info:
        b.unprotect(sealed)
    assert info.value.replay


def test_tampering_is_refused(pair: tuple[SrtpContext, SrtpContext]) -> None:
    a, b = pair
    sealed = bytearray(a.protect(_rtp(9)))
    sealed[20] ^= 0x01
    with pytest.raises(SrtpError) as info:
        b.unprotect(bytes(sealed))
    assert not info.value.replay


@pytest.mark.parametrize("junk", [b"", b"\x80", bytes(11), bytes(200), b"\x80\x6f" + bytes(40)])
def test_junk_is_an_srtp_error(pair: tuple[SrtpContext, SrtpContext], junk: bytes) -> None:
    _, b = pair
    with pytest.raises(SrtpError):
        b.unprotect(junk)
    with pytest.raises(SrtpError):
        b.unprotect_rtcp(junk)


def test_psk_derivation_pairs_up_and_differs_by_secret() -> None:
    profile = SrtpProfile.AEAD_AES_128_GCM
    offerer = PresharedKeying.from_secret(b"s" * 32, offerer=True, profile=profile)
    answerer = PresharedKeying.from_secret(b"s" * 32, offerer=False, profile=profile)
    assert offerer.pair.tx == answerer.pair.rx and offerer.pair.rx == answerer.pair.tx
    assert offerer.pair.tx != offerer.pair.rx
    other = PresharedKeying.from_secret(b"t" * 32, offerer=False, profile=profile)
    sealed = SrtpContext(offerer.pair).protect(_rtp(1))
    with pytest.raises(SrtpError):
        SrtpContext(other.pair).unprotect(sealed)
    assert SrtpContext(answerer.pair).unprotect(sealed) == _rtp(1)
    with pytest.raises(ValueError):
        PresharedKeying.from_secret(b"short", offerer=True, profile=profile)


def test_keys_are_checked_and_never_printed() -> None:
    with pytest.raises(ValueError):
        SrtpKeys(SrtpProfile.AEAD_AES_128_GCM, bytes(16), bytes(14))
    keys = SrtpKeys.generate(SrtpProfile.AES_CM_128_HMAC_SHA1_80)
    assert keys.master_key.hex() not in repr(keys)
