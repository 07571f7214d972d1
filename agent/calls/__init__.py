"""Calls: the pure call state machine (``machine``) and the device's call policy (``policy``)."""

from agent.calls.machine import (
    CallConfig,
    CallEndReason,
    CallMachine,
    CallState,
    Phase,
    Role,
    media_direction,
    step,
)
from agent.calls.policy import CallPolicy, Decision, Refusal, Verdict, decide
from agent.signaling.envelope import CallMode

__all__ = [
    "CallConfig",
    "CallEndReason",
    "CallMachine",
    "CallMode",
    "CallPolicy",
    "CallState",
    "Decision",
    "Phase",
    "Refusal",
    "Role",
    "Verdict",
    "decide",
    "media_direction",
    "step",
]
