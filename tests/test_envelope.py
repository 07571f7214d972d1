"""The signaling envelope: round trips, strict rejection, canonical signing bytes, replay guard."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.signaling.envelope import (
    BODY_TYPES,
    MAX_ENVELOPE_BYTES,
    TS_MAX_MS,
    TS_MIN_MS,
    AcceptBody,
    AnswerBody,
    Body,
    BusyBody,
    CallMode,
    CancelBody,
    CandidateBody,
    DeclineBody,
    Envelope,
    EnvelopeError,
    HangupBody,
    InviteBody,
    OfferBody,
    ReplayGuard,
    ReplayVerdict,
    RingingBody,
    from_json,
    make,
    new_id,
    respond,
    sig_bytes,
    signing_bytes,
    to_json,
    to_signal,
    with_sender,
    with_sig,
)
from agent.signaling.messages import Description, Hangup, RemoteCandidate, SignalError

SDP = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
CAND = "1 1 udp 2130706431 10.0.0.2 5000 typ host"
CALL = "0123456789abcdef0123456789abcdef"
MSG = "fedcba9876543210fedcba9876543210"
TS = 1_700_000_000_000

# --- strategies ------------------------------------------------------------------------------

hex_ids = st.from_regex(r"[0-9a-f]{32}", fullmatch=True)
device_ids = st.from_regex(r"[a-z0-9][a-z0-9-]{0,62}", fullmatch=True)
reasons = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,31}", fullmatch=True)
sdps = st.text(max_size=400).filter(lambda s: "\x00" not in s).map(lambda s: "v=0\r\n" + s)
candidates = st.none() | st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=200
)
signatures = st.binary(min_size=1, max_size=96)

bodies: st.SearchStrategy[Body] = st.one_of(
    st.builds(InviteBody, sdp=sdps, mode=st.sampled_from(CallMode)),
    st.just(RingingBody()),
    st.builds(AcceptBody, sdp=sdps),
    st.builds(DeclineBody, reason=reasons, detail=st.just("") | reasons),
    st.just(BusyBody()),
    st.builds(CancelBody, reason=reasons),
    st.builds(OfferBody, sdp=sdps),
    st.builds(AnswerBody, sdp=sdps),
    st.builds(CandidateBody, candidate=candidates),
    st.builds(HangupBody, reason=reasons),
)


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    env = make(
        draw(bodies),
        call=draw(hex_ids),
        from_=draw(device_ids),
        to=draw(device_ids),
        ts=draw(st.integers(TS_MIN_MS, TS_MAX_MS)),
        msg_id=draw(hex_ids),
    )
    if draw(st.booleans()):
        env = with_sig(env, draw(signatures))
    return env


def invite(**changes: Any) -> Envelope:
    env = make(InviteBody(SDP), call=CALL, from_="door-1", to="kitchen", ts=TS, msg_id=MSG)
    return replace(env, **changes)


def wire(**changes: Any) -> dict[str, Any]:
    """A valid invite as a JSON object, with top-level keys changed (None value: removed)."""
    raw: dict[str, Any] = json.loads(to_json(invite()))
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


# --- round trips -----------------------------------------------------------------------------


def test_every_type_has_a_body_class() -> None:
    assert set(BODY_TYPES) == {
        "invite",
        "ringing",
        "accept",
        "decline",
        "busy",
        "cancel",
        "offer",
        "answer",
        "candidate",
        "hangup",
    }
    assert all(name == cls.TYPE for name, cls in BODY_TYPES.items())


def test_wire_form_by_hand() -> None:
    text = to_json(invite())
    assert text == (
        '{"body":{"mode":"normal",'
        '"sdp":"v=0\\r\\no=- 1 1 IN IP4 0.0.0.0\\r\\ns=-\\r\\nt=0 0\\r\\n"},'
        f'"call":"{CALL}","from":"door-1","id":"{MSG}","to":"kitchen","ts":{TS},'
        '"type":"invite","v":1}'
    )
    assert signing_bytes(invite()) == text.encode()


@given(envelopes())
def test_round_trip(env: Envelope) -> None:
    text = to_json(env)
    assert from_json(text) == env
    assert from_json(text.encode("utf-8")) == env


@given(envelopes(), signatures)
def test_signing_bytes_cover_everything_but_sig(env: Envelope, sig: bytes) -> None:
    signed = with_sig(env, sig)
    assert sig_bytes(signed) == sig
    assert signing_bytes(signed) == signing_bytes(env)
    assert signing_bytes(from_json(to_json(signed))) == signing_bytes(env)
    assert b'"sig"' not in signing_bytes(signed)
    # Key order and whitespace on the wire do not change what was signed.
    shuffled = json.dumps(dict(reversed(json.loads(to_json(signed)).items())), indent=2)
    assert signing_bytes(from_json(shuffled)) == signing_bytes(env)
    # Any value that changes does.
    other_ts = env.ts - 1 if env.ts > TS_MIN_MS else env.ts + 1
    assert signing_bytes(replace(env, ts=other_ts)) != signing_bytes(env)


def test_sig_is_absent_not_null_when_unsigned() -> None:
    assert "sig" not in json.loads(to_json(invite()))
    assert sig_bytes(invite()) is None


def test_respond_and_media_signals() -> None:
    env = invite()
    ringing = respond(env, RingingBody(), ts=TS + 5)
    assert (ringing.type, ringing.call, ringing.from_, ringing.to) == (
        "ringing",
        CALL,
        "kitchen",
        "door-1",
    )
    assert ringing.id != env.id
    assert to_signal(env.body) == Description("offer", SDP)
    assert to_signal(AcceptBody(SDP)) == Description("answer", SDP)
    assert to_signal(OfferBody(SDP)) == Description("offer", SDP)
    assert to_signal(AnswerBody(SDP)) == Description("answer", SDP)
    assert to_signal(CandidateBody(None)) == RemoteCandidate(None)
    assert to_signal(HangupBody("ice-failed")) == Hangup("ice-failed")
    assert to_signal(BusyBody()) is None


def test_new_ids_are_128_bit_hex_and_distinct() -> None:
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


# --- with_sender -----------------------------------------------------------------------------


def test_with_sender_overwrites_the_claim_and_drops_a_stale_signature() -> None:
    signed = with_sig(invite(from_="mallory"), b"\x01" * 64)
    routed = with_sender(signed, "door-1")
    assert routed.from_ == "door-1"
    assert routed.sig is None  # it covered "mallory": it cannot verify any more
    honest = with_sig(invite(), b"\x01" * 64)
    assert with_sender(honest, "door-1") is honest
    with pytest.raises(EnvelopeError, match="'from'"):
        with_sender(honest, "bad/id")


# --- strict rejection ------------------------------------------------------------------------


def _big_invite() -> str:
    return json.dumps(wire(body={"mode": "normal", "sdp": "v=0" + "x" * MAX_ENVELOPE_BYTES}))


REJECTIONS: list[tuple[str | bytes, str | None, str]] = [
    ("not json", None, "not JSON"),
    (b"\xff\xfe{}", None, "not UTF-8"),
    ('{"v": 1, "type": "\ud800"}', None, "lone surrogate"),  # a raw one, not a JSON escape
    ("[" * 50_000, None, "not JSON"),
    ('{"v": 1, "ts": NaN}', None, "NaN is not a number"),
    ("[1, 2]", None, "JSON object"),
    ('"invite"', None, "JSON object"),
    ("{}", "v", "missing"),
    (_big_invite(), None, "larger than"),
    (_big_invite().encode(), None, "larger than"),
    # Under the limit in characters, over it in UTF-8 bytes.
    (json.dumps(wire(to="é" * (MAX_ENVELOPE_BYTES // 2)), ensure_ascii=False), None, "larger"),
    (json.dumps(wire(v=2)), "v", "unsupported version 2"),
    (json.dumps(wire(v=True)), "v", "unsupported version"),
    (json.dumps(wire(v=1.0)), "v", "unsupported version"),
    (json.dumps(wire(v="1")), "v", "unsupported version"),
    (to_json(invite()).replace('"v":1', '"v":1,"v":1'), None, "'v' appears twice"),
    (to_json(invite()).replace('"sdp"', '"sdp":"v=0","sdp"'), None, "'sdp' appears twice"),
    (json.dumps(wire(extra=1)), None, "unknown envelope field 'extra'"),
    (json.dumps(wire(type=None)), "type", "missing"),
    (json.dumps(wire(id=None)), "id", "missing"),
    (json.dumps(wire(call=None)), "call", "missing"),
    (json.dumps(wire(ts=None)), "ts", "missing"),
    (json.dumps(wire(to=None)), "to", "missing"),
    (json.dumps(wire(body=None)), "body", "missing"),
    (json.dumps({**wire(), "from": 5}), "from", "must be a string"),
    (json.dumps(wire(type=7)), "type", "must be a string"),
    (json.dumps(wire(type="dance")), "type", "unknown message type 'dance'"),
    (json.dumps(wire(type="Invite")), "type", "unknown message type"),
    (json.dumps(wire(id=MSG.upper())), "id", "32 lowercase hex"),
    (json.dumps(wire(id=MSG[:-1])), "id", "32 lowercase hex"),
    (json.dumps(wire(id=MSG + "0")), "id", "32 lowercase hex"),
    (json.dumps(wire(id=int(MSG, 16))), "id", "32 lowercase hex"),
    (json.dumps(wire(call="g" * 32)), "call", "32 lowercase hex"),
    (json.dumps(wire(ts="1700000000000")), "ts", "must be an integer"),
    (json.dumps(wire(ts=1.7e12)), "ts", "must be an integer"),
    (json.dumps(wire(ts=True)), "ts", "must be an integer"),
    (json.dumps(wire(ts=1_700_000_000)), "ts", "between 2020 and 2100"),  # seconds, not ms
    (json.dumps(wire(ts=-1)), "ts", "between 2020 and 2100"),
    (json.dumps(wire(ts=10**20)), "ts", "between 2020 and 2100"),
    (json.dumps({**wire(), "from": "door/1"}), "from", "bad device id"),
    (json.dumps({**wire(), "from": "+"}), "from", "bad device id"),
    (json.dumps(wire(to="#")), "to", "bad device id"),
    (json.dumps(wire(to="")), "to", "bad device id"),
    (json.dumps(wire(to="Kitchen")), "to", "bad device id"),
    (json.dumps(wire(sig=None) | {"sig": None}), "sig", "must be a string"),
    (json.dumps(wire(sig="")), "sig", "must be a string"),
    (json.dumps(wire(sig="AAAA==")), "sig", "base64url"),
    (json.dumps(wire(sig="A")), "sig", "base64url"),
    (json.dumps(wire(sig="a+b/")), "sig", "base64url"),
    (json.dumps(wire(sig="A" * 600)), "sig", "must be a string"),
    (json.dumps(wire(body=[])), "body", "JSON object for invite"),
    (json.dumps(wire(body={"sdp": SDP})), "body.mode", "missing for invite"),
    (json.dumps(wire(body={"mode": "normal"})), "body.sdp", "missing for invite"),
    (json.dumps(wire(body={"mode": "loud", "sdp": SDP})), "body.mode", "must be one of"),
    (json.dumps(wire(body={"mode": 1, "sdp": SDP})), "body.mode", "must be one of"),
    (json.dumps(wire(body={"mode": "normal", "sdp": 5})), "body.sdp", "must be a string"),
    (json.dumps(wire(body={"mode": "normal", "sdp": ""})), "body.sdp", "not an SDP"),
    (json.dumps(wire(body={"mode": "normal", "sdp": "v=0\x00"})), "body.sdp", "NUL"),
    (to_json(invite()).replace("v=0", "v=0\\ud800"), "body.sdp", "surrogate"),
    (
        json.dumps(wire(body={"mode": "normal", "sdp": SDP, "x": 1})),
        "body",
        "unknown field 'x' for invite",
    ),
    (json.dumps(wire(type="ringing", body={"x": 1})), "body", "unknown field 'x' for ringing"),
    (json.dumps(wire(type="accept", body={})), "body.sdp", "missing for accept"),
    (json.dumps(wire(type="decline", body={})), "body.reason", "missing for decline"),
    (
        json.dumps(wire(type="decline", body={"reason": "declined"})),
        "body.detail",
        "missing for decline",
    ),
    (
        json.dumps(wire(type="decline", body={"reason": "declined", "detail": "Do Not"})),
        "body.detail",
        "empty or a token",
    ),
    (
        json.dumps(wire(type="decline", body={"reason": "declined", "detail": None})),
        "body.detail",
        "empty or a token",
    ),
    (
        json.dumps(wire(type="decline", body={"reason": "No Thanks", "detail": ""})),
        "body.reason",
        "token",
    ),
    (json.dumps(wire(type="cancel", body={"reason": ""})), "body.reason", "token"),
    (json.dumps(wire(type="hangup", body={"reason": None})), "body.reason", "token"),
    (json.dumps(wire(type="candidate", body={})), "body.candidate", "missing for candidate"),
    (
        json.dumps(wire(type="candidate", body={"candidate": 7})),
        "body.candidate",
        "string or null",
    ),
    (
        json.dumps(wire(type="candidate", body={"candidate": CAND + "\r\na=x"})),
        "body.candidate",
        "printable ASCII",
    ),
    (json.dumps(wire(type="candidate", body={"candidate": ""})), "body.candidate", "printable"),
    (
        json.dumps(wire(type="candidate", body={"candidate": "1" * 2000})),
        "body.candidate",
        "printable ASCII",
    ),
    (json.dumps(wire(type="offer", body={"sdp": "hello"})), "body.sdp", "not an SDP"),
]


@pytest.mark.parametrize(("data", "field", "reason"), REJECTIONS)
def test_bad_envelopes_are_refused_clearly(
    data: str | bytes, field: str | None, reason: str
) -> None:
    with pytest.raises(EnvelopeError, match=reason) as caught:
        from_json(data)
    assert caught.value.field == field
    assert isinstance(caught.value, SignalError)
    assert isinstance(caught.value, ValueError)


def test_the_sample_wire_is_valid() -> None:
    """The rejection table mutates this; it must be accepted untouched."""
    assert from_json(json.dumps(wire())) == invite()


def test_construction_validates_too() -> None:
    with pytest.raises(EnvelopeError, match=r"'body\.sdp'"):
        InviteBody("hello")
    with pytest.raises(EnvelopeError, match=r"'body\.mode'"):
        InviteBody(SDP, "loud")  # type: ignore[arg-type]
    assert InviteBody(SDP, "listen").mode is CallMode.LISTEN  # type: ignore[arg-type]
    with pytest.raises(EnvelopeError, match=r"'body\.reason'"):
        HangupBody("Bye now")
    with pytest.raises(EnvelopeError, match=r"'body'.* does not belong"):
        replace(invite(), type="hangup")
    with pytest.raises(EnvelopeError, match="'type'"):
        replace(invite(), type="dance")
    with pytest.raises(EnvelopeError, match="'v'"):
        replace(invite(), v=2)
    with pytest.raises(EnvelopeError, match="'ts'"):
        replace(invite(), ts=5)
    with pytest.raises(EnvelopeError, match="'to'"):
        replace(invite(), to="a/b")
    with pytest.raises(EnvelopeError, match="'sig'"):
        replace(invite(), sig="not base64!")


def test_to_json_refuses_what_the_receiver_would() -> None:
    env = invite(body=InviteBody("v=0" + "x" * MAX_ENVELOPE_BYTES))
    with pytest.raises(EnvelopeError, match="larger than"):
        to_json(env)


@given(st.text(max_size=300) | st.binary(max_size=300))
def test_garbage_raises_only_envelope_error(data: str | bytes) -> None:
    with contextlib.suppress(EnvelopeError):
        from_json(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@given(
    envelopes(),
    st.sampled_from(["v", "type", "id", "call", "ts", "from", "to", "body", "sig", "extra"]),
    json_values | hex_ids | device_ids | st.sampled_from(list(BODY_TYPES)),
)
def test_any_tampered_field_parses_or_raises_envelope_error(
    env: Envelope, key: str, value: object
) -> None:
    raw = json.loads(to_json(env))
    raw[key] = value
    try:
        parsed = from_json(json.dumps(raw))
    except EnvelopeError:
        return
    assert from_json(to_json(parsed)) == parsed


@given(envelopes(), st.text(max_size=10), json_values)
def test_any_tampered_body_parses_or_raises_envelope_error(
    env: Envelope, key: str, value: object
) -> None:
    raw = json.loads(to_json(env))
    raw["body"][key] = value
    try:
        parsed = from_json(json.dumps(raw))
    except EnvelopeError:
        return
    assert from_json(to_json(parsed)) == parsed


# --- replay guard ----------------------------------------------------------------------------


def at(ts: int, msg_id: str | None = None) -> Envelope:
    return make(HangupBody(), call=CALL, from_="a", to="b", ts=ts, msg_id=msg_id)


def test_replay_guard_verdicts() -> None:
    guard = ReplayGuard(max_age_ms=60_000, max_skew_ms=5_000)
    now = TS
    assert guard.check(at(now), now) is ReplayVerdict.FRESH
    assert guard.check(at(now - 60_000), now) is ReplayVerdict.FRESH  # exactly at the limit
    assert guard.check(at(now - 60_001), now) is ReplayVerdict.STALE
    assert guard.check(at(now + 5_000), now) is ReplayVerdict.FRESH
    assert guard.check(at(now + 5_001), now) is ReplayVerdict.FUTURE
    env = at(now)
    assert guard.check(env, now) is ReplayVerdict.FRESH
    assert guard.check(env, now + 1) is ReplayVerdict.DUPLICATE
    # Same id, different content: still the same message id, still refused.
    assert guard.check(replace(env, ts=now + 2), now + 2) is ReplayVerdict.DUPLICATE
    # Refusals are not remembered: a stale or future message does not poison its id.
    late = at(now + 10_000)
    assert guard.check(late, now) is ReplayVerdict.FUTURE
    assert guard.check(late, now + 10_000) is ReplayVerdict.FRESH
    assert len({v.value for v in ReplayVerdict}) == len(ReplayVerdict)


def test_replay_guard_forgets_by_age() -> None:
    guard = ReplayGuard(max_age_ms=1_000, max_skew_ms=0)
    envs = [at(TS + i * 10) for i in range(100)]
    for env in envs:
        assert guard.check(env, env.ts) is ReplayVerdict.FRESH
    assert len(guard) == 100
    # Once a message would be stale anyway, its id is no longer needed.
    assert guard.check(at(TS + 1_500), TS + 1_500) is ReplayVerdict.FRESH
    assert len(guard) == 100 - 50 + 1
    # The replay of a forgotten id is refused as stale; a remembered one as duplicate.
    assert guard.check(envs[0], TS + 1_500) is ReplayVerdict.STALE
    assert guard.check(envs[99], TS + 1_500) is ReplayVerdict.DUPLICATE
    guard.check(at(TS + 100_000), TS + 100_000)
    assert len(guard) == 1


@given(
    st.lists(st.tuples(st.integers(0, 5_000), st.integers(-3_000, 3_000)), max_size=200),
    st.integers(1, 20),
)
def test_replay_guard_is_bounded_and_never_accepts_a_replay(
    steps: list[tuple[int, int]], max_ids: int
) -> None:
    guard = ReplayGuard(max_age_ms=2_000, max_skew_ms=1_000, max_ids=max_ids)
    now = TS
    accepted: list[Envelope] = []
    for advance, offset in steps:
        now += advance
        env = at(now + offset)
        if guard.check(env, now) is ReplayVerdict.FRESH:
            accepted.append(env)
        assert len(guard) <= max_ids
        for old in accepted[-30:]:
            assert guard.check(old, now) is not ReplayVerdict.FRESH


def test_replay_guard_overflow_refuses_what_it_had_to_forget() -> None:
    guard = ReplayGuard(max_age_ms=60_000, max_skew_ms=60_000, max_ids=3)
    envs = [at(TS + i) for i in range(5)]
    for env in envs:
        assert guard.check(env, TS + 10) is ReplayVerdict.FRESH
    assert len(guard) == 3
    assert guard.check(envs[0], TS + 10) is ReplayVerdict.OVERFLOW
    assert guard.check(at(TS + 1), TS + 10) is ReplayVerdict.OVERFLOW  # as old as a forgotten id
    assert guard.check(envs[4], TS + 10) is ReplayVerdict.DUPLICATE
    assert guard.check(at(TS + 2), TS + 10) is ReplayVerdict.FRESH  # newer than anything forgotten


def test_replay_guard_clock_never_runs_backwards() -> None:
    guard = ReplayGuard(max_age_ms=1_000, max_skew_ms=0)
    env = at(TS)
    assert guard.check(env, TS) is ReplayVerdict.FRESH
    assert guard.check(at(TS + 5_000), TS + 5_000) is ReplayVerdict.FRESH  # forgets env's id
    # The wall clock steps back: env would look fresh, but its id is gone, so the guard
    # keeps its latest time and calls it stale.
    assert guard.check(env, TS) is ReplayVerdict.STALE


def test_replay_guard_refuses_nonsense_limits() -> None:
    with pytest.raises(ValueError, match="max_ids"):
        ReplayGuard(max_ids=0)
