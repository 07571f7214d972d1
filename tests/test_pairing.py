"""Pairing tokens and attempt limits (pure)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.pairing.token import PREFIX, PairingToken, TokenError
from cloud_relay.pairing import AttemptLimiter, Verdict, secret_digest

FP = ":".join(["AB"] * 32)
URL = "https://relay.example:8443"


def test_a_token_round_trips_and_its_secret_is_fresh() -> None:
    token = PairingToken.new(URL, FP)
    text = token.text()
    assert text.startswith(PREFIX) and text.isascii() and " " not in text
    assert PairingToken.parse(f"  {text}\n") == token
    assert PairingToken.new(URL, FP).secret != token.secret
    digest = secret_digest(token.secret)
    assert len(digest) == 64 and secret_digest("x" + token.secret) != digest
    assert token.secret not in digest


@pytest.mark.parametrize(
    ("url", "fingerprint", "words"),
    [
        ("http://relay.example", FP, "https"),
        ("https://", FP, "https"),
        ("https://relay.example/pair", FP, "https"),
        (URL, FP[:-3], "fingerprint"),
        (URL, FP.lower(), "fingerprint"),
    ],
)
def test_bad_parts_are_refused_with_a_reason(url: str, fingerprint: str, words: str) -> None:
    with pytest.raises(TokenError, match=words):
        PairingToken.new(url, fingerprint)


def test_damaged_or_truncated_text_is_refused() -> None:
    text = PairingToken.new(URL, FP).text()
    for bad in ("", "hello", text[: len(text) // 2], text.replace(PREFIX, "eipair2."), text + "!"):
        with pytest.raises(TokenError):
            PairingToken.parse(bad)


@given(st.text(max_size=300))
def test_anything_else_is_a_token_error_or_a_token(text: str) -> None:
    with contextlib.suppress(TokenError):
        PairingToken.parse(PREFIX + text)


def test_limits_per_source_overall_and_lockout() -> None:
    limiter = AttemptLimiter(per_source=2, overall=3, window_s=10, lockout_after=4, lockout_s=60)
    assert [limiter.attempt("a", 0) for _ in range(3)] == [
        Verdict.ALLOWED,
        Verdict.ALLOWED,
        Verdict.SOURCE_LIMITED,
    ]
    assert limiter.attempt("b", 1) is Verdict.ALLOWED
    assert limiter.attempt("c", 1) is Verdict.OVERALL_LIMITED
    assert limiter.attempt("a", 10.5) is Verdict.ALLOWED  # the window moved on
    for t in (11, 12, 13):
        limiter.failed(t)
    assert not limiter.locked(13)
    limiter.failed(14)
    assert limiter.attempt("z", 15) is Verdict.LOCKED
    assert limiter.attempt("z", 74.5) is Verdict.ALLOWED  # 60 s after the fourth failure
