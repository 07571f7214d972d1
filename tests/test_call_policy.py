"""Device call policy: do-not-disturb, privacy, auto-answer, listen and force gating."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.calls.policy import (
    DEFAULT_POLICY,
    CallPolicy,
    Decision,
    Refusal,
    Verdict,
    decide,
)
from agent.signaling.envelope import CallMode

NORMAL, ANNOUNCE, LISTEN, FORCE = (
    CallMode.NORMAL,
    CallMode.ANNOUNCE,
    CallMode.LISTEN,
    CallMode.FORCE,
)
RING, AUTO, REFUSE = Verdict.RING, Verdict.AUTO_ANSWER, Verdict.REFUSE

TRUSTED = frozenset({"parent"})
BASE = CallPolicy(
    auto_answer=frozenset({"kitchen"}),
    listen_allowed=TRUSTED,
    force_allowed=frozenset({"parent", "alarm"}),
)
DND = CallPolicy(
    do_not_disturb=True,
    auto_answer=BASE.auto_answer,
    listen_allowed=BASE.listen_allowed,
    force_allowed=BASE.force_allowed,
)
PRIVATE = CallPolicy(
    privacy=True,
    auto_answer=BASE.auto_answer,
    listen_allowed=BASE.listen_allowed,
    force_allowed=BASE.force_allowed,
)
NO_PAGING = CallPolicy(announce_auto_answer=False, auto_answer=frozenset({"kitchen"}))

# (policy, caller, mode) -> (verdict, refusal)
CASES: list[tuple[str, CallPolicy, str, CallMode, Verdict, Refusal | None]] = [
    ("normal rings", BASE, "door", NORMAL, RING, None),
    ("auto-answer list", BASE, "kitchen", NORMAL, AUTO, None),
    ("announce plays at once", BASE, "door", ANNOUNCE, AUTO, None),
    ("announce rings when paging is off", NO_PAGING, "door", ANNOUNCE, RING, None),
    ("auto-answer list beats paging off", NO_PAGING, "kitchen", ANNOUNCE, AUTO, None),
    ("listen allowed", BASE, "parent", LISTEN, AUTO, None),
    ("listen not allowed", BASE, "door", LISTEN, REFUSE, Refusal.LISTEN_NOT_ALLOWED),
    (
        "auto-answer is no listen permit",
        BASE,
        "kitchen",
        LISTEN,
        REFUSE,
        Refusal.LISTEN_NOT_ALLOWED,
    ),
    ("force allowed", BASE, "alarm", FORCE, AUTO, None),
    ("force not allowed", BASE, "door", FORCE, REFUSE, Refusal.FORCE_NOT_ALLOWED),
    ("dnd refuses normal", DND, "door", NORMAL, REFUSE, Refusal.DO_NOT_DISTURB),
    ("dnd beats auto-answer", DND, "kitchen", NORMAL, REFUSE, Refusal.DO_NOT_DISTURB),
    ("dnd refuses announce", DND, "door", ANNOUNCE, REFUSE, Refusal.DO_NOT_DISTURB),
    ("force beats dnd", DND, "alarm", FORCE, AUTO, None),
    ("dnd still gates force", DND, "door", FORCE, REFUSE, Refusal.FORCE_NOT_ALLOWED),
    ("dnd does not stop listen", DND, "parent", LISTEN, AUTO, None),
    ("privacy refuses listen", PRIVATE, "parent", LISTEN, REFUSE, Refusal.PRIVACY),
    ("privacy refuses unlisted listen too", PRIVATE, "door", LISTEN, REFUSE, Refusal.PRIVACY),
    ("privacy leaves normal calls", PRIVATE, "door", NORMAL, RING, None),
    ("privacy leaves force", PRIVATE, "parent", FORCE, AUTO, None),
    ("default: normal rings", DEFAULT_POLICY, "x", NORMAL, RING, None),
    ("default: nobody listens", DEFAULT_POLICY, "x", LISTEN, REFUSE, Refusal.LISTEN_NOT_ALLOWED),
    ("default: nobody forces", DEFAULT_POLICY, "x", FORCE, REFUSE, Refusal.FORCE_NOT_ALLOWED),
]


@pytest.mark.parametrize(
    ("policy", "caller", "mode", "verdict", "refusal"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_decide(
    policy: CallPolicy, caller: str, mode: CallMode, verdict: Verdict, refusal: Refusal | None
) -> None:
    decision = decide(policy, caller, mode)
    assert (decision.verdict, decision.refusal) == (verdict, refusal)
    assert decision.why


device_ids = st.sampled_from(["a", "b", "c", "d"])
id_sets = st.frozensets(device_ids)


@given(
    dnd=st.booleans(),
    privacy=st.booleans(),
    paging=st.booleans(),
    auto=id_sets,
    listen=id_sets,
    force=id_sets,
    caller=device_ids,
    mode=st.sampled_from(list(CallMode)),
)
def test_decide_invariants(
    *,
    dnd: bool,
    privacy: bool,
    paging: bool,
    auto: frozenset[str],
    listen: frozenset[str],
    force: frozenset[str],
    caller: str,
    mode: CallMode,
) -> None:
    policy = CallPolicy(dnd, privacy, auto, paging, listen, force)
    decision = decide(policy, caller, mode)
    assert isinstance(decision, Decision)
    assert (decision.verdict is REFUSE) == (decision.refusal is not None)
    if mode is LISTEN:
        # Listen never rings; it needs a permit, and privacy mode overrides every permit.
        assert decision.verdict is not RING
        assert (decision.verdict is AUTO) == (not privacy and caller in listen)
    if mode is FORCE:
        assert (decision.verdict is AUTO) == (caller in force)
        assert decision.verdict is not RING
    if mode in (NORMAL, ANNOUNCE):
        assert (decision.verdict is REFUSE) == dnd


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"auto_answer": {"a"}}, TypeError),
        ({"listen_allowed": ["a"]}, TypeError),
        ({"force_allowed": frozenset({""})}, ValueError),
        ({"auto_answer": frozenset({1})}, ValueError),
    ],
)
def test_policy_validates_id_sets(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        CallPolicy(**kwargs)
