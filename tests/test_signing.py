"""Signed signaling envelopes (pure)."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.signaling.envelope import (
    InviteBody,
    from_json,
    make,
    new_id,
    to_json,
    with_sender,
)
from agent.signaling.signing import SignatureError, sign, verify

TS = 1_800_000_000_000
SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_a_signed_envelope_verifies_after_the_wire(key: ec.EllipticCurvePrivateKey) -> None:
    env = sign(make(InviteBody(sdp=SDP), call=new_id(), from_="door-a", to="door-b", ts=TS), key)
    assert env.sig is not None and len(env.sig) == 86
    verify(from_json(to_json(env)), key.public_key())


def test_tampering_another_key_or_no_signature_is_refused(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    env = sign(make(InviteBody(sdp=SDP), call=new_id(), from_="door-a", to="door-b", ts=TS), key)
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    tampered = dataclasses.replace(env, body=InviteBody(sdp=SDP.replace("127.0.0.1", "10.6.6.6")))
    cases = {
        "tampered sdp": (tampered, key.public_key(), "bad-signature"),
        "other key": (env, other, "bad-signature"),
        "sender changed by hand": (
            dataclasses.replace(env, from_="door-c"),
            key.public_key(),
            "bad-signature",
        ),
        # The relay overwrites a forged claim and drops the signature that covered it.
        "forged sender": (with_sender(env, "door-c"), key.public_key(), "unsigned"),
        "unsigned": (dataclasses.replace(env, sig=None), key.public_key(), "unsigned"),
        "short": (dataclasses.replace(env, sig="AAAA"), key.public_key(), "bad-signature"),
    }
    for name, (candidate, public, reason) in cases.items():
        with pytest.raises(SignatureError) as caught:
            verify(candidate, public)
        assert caught.value.reason == reason, name


def test_only_p256_keys() -> None:
    env = make(InviteBody(sdp=SDP), call=new_id(), from_="door-a", to="door-b", ts=TS)
    with pytest.raises(ValueError, match="P-256"):
        sign(env, ec.generate_private_key(ec.SECP384R1()))
