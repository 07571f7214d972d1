"""Trickled candidates taken in any order, the end of candidates last (pure)."""

from __future__ import annotations

import pytest

from agent.calls.runtime import TrickleOrder
from agent.net.candidate import Candidate
from agent.signaling.envelope import CandidateBody, EnvelopeError, from_json, make, new_id, to_json

C1 = Candidate.parse("candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host")
TS = 1_800_000_000_000
C2 = Candidate.parse("candidate:2 1 udp 2130706431 127.0.0.1 5002 typ host")


def test_an_end_that_overtook_its_candidates_waits_for_them() -> None:
    order = TrickleOrder()
    assert order.take(None, 2) == []
    assert order.take(C2, None) == [C2]
    assert order.take(C1, None) == [C1, None]
    assert order.take(None, 2) == []  # a second end changes nothing


def test_an_end_in_order_or_without_a_count_goes_at_once() -> None:
    order = TrickleOrder()
    assert order.take(C1, None) == [C1]
    assert order.take(None, 1) == [None]
    assert TrickleOrder().take(None, None) == [None]  # a peer that sends no count


def test_the_count_rides_only_on_the_end_and_is_optional_on_the_wire() -> None:
    end = make(CandidateBody(None, count=3), call=new_id(), from_="a", to="b", ts=TS)
    assert from_json(to_json(end)).body == CandidateBody(None, count=3)
    one = make(CandidateBody(C1.to_sdp()), call=new_id(), from_="a", to="b", ts=TS)
    assert "count" not in to_json(one)
    with pytest.raises(EnvelopeError, match="count"):
        CandidateBody(C1.to_sdp(), count=1)
    with pytest.raises(EnvelopeError, match="count"):
        CandidateBody(None, count=-1)
