"""Signaling messages: round trips, and anything else refused with a clear SignalError."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.signaling.messages import (
    MAX_MESSAGE_BYTES,
    Description,
    Hangup,
    RemoteCandidate,
    Signal,
    SignalError,
    from_json,
    to_json,
)

SDP = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"


@pytest.mark.parametrize(
    "signal",
    [
        Description("offer", SDP),
        Description("answer", SDP),
        RemoteCandidate("1 1 udp 2130706431 10.0.0.2 5000 typ host"),
        RemoteCandidate(None),
        Hangup("busy"),
    ],
)
def test_round_trip(signal: Signal) -> None:
    assert from_json(to_json(signal)) == signal


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"type": "offer"}', "'sdp' must be a string"),
        ('{"type": "offer", "sdp": 5}', "'sdp' must be a string"),
        ('{"type": "candidate", "candidate": 7}', "'candidate' must be a string"),
        ('{"type": "dance"}', "unknown message type 'dance'"),
        ('{"sdp": "x"}', "unknown message type None"),
        ("[" * 50_000, "not JSON"),  # deep nesting: RecursionError inside json
        (json.dumps({"type": "offer", "sdp": "x" * MAX_MESSAGE_BYTES}), "exceeds"),
    ],
)
def test_bad_messages_are_refused_clearly(text: str, reason: str) -> None:
    with pytest.raises(SignalError, match=reason):
        from_json(text)


@given(st.text(max_size=300) | st.binary(max_size=300))
def test_garbage_raises_only_signal_error(text: str | bytes) -> None:
    with contextlib.suppress(SignalError):
        from_json(text)


@given(
    st.dictionaries(
        st.sampled_from(["type", "sdp", "candidate", "reason"]),
        st.none() | st.text(max_size=20) | st.integers() | st.sampled_from(["offer", "answer"]),
    )
)
def test_any_object_parses_or_raises_signal_error(body: dict[str, object]) -> None:
    try:
        signal = from_json(json.dumps(body))
    except SignalError:
        return
    assert from_json(to_json(signal)) == signal
