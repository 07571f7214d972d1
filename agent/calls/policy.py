"""Call policy on the device: which invites ring, which are answered at once, which are refused.

Pure: ``decide(policy, caller, mode)`` looks only at its arguments. The relay checks who may
call whom before it forwards an invite; this is the board's own, last word (its owner's
do-not-disturb and privacy switches live here, not on the relay).

The rules, in order:

* ``listen``: refused in privacy mode, refused for callers not in ``listen_allowed``,
  otherwise answered at once (nobody is expected to pick up; the listened-to board shows
  it). Do-not-disturb does not refuse it: nothing rings.
* ``force``: refused for callers not in ``force_allowed``, otherwise answered at once, even
  in do-not-disturb (emergencies).
* ``normal`` and ``announce``: refused in do-not-disturb; answered at once for callers in
  ``auto_answer`` and for announcements when ``announce_auto_answer`` is on (paging does
  not wait for someone to pick up); otherwise the board rings.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent.signaling.envelope import CallMode


class Verdict(enum.Enum):
    RING = "ring"
    AUTO_ANSWER = "auto-answer"
    REFUSE = "refuse"


class Refusal(enum.StrEnum):
    """Why the policy refused an invite (sent to the caller as the decline's detail)."""

    DO_NOT_DISTURB = "do-not-disturb"
    PRIVACY = "privacy"
    LISTEN_NOT_ALLOWED = "listen-not-allowed"
    FORCE_NOT_ALLOWED = "force-not-allowed"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    refusal: Refusal | None = None
    """Set exactly when ``verdict`` is ``REFUSE``."""
    why: str = ""
    """One line for the log."""


@dataclass(frozen=True, slots=True)
class CallPolicy:
    """The device's own rules for incoming calls; replace the whole value to change it."""

    do_not_disturb: bool = False
    """Refuse normal calls and announcements. Listen and allowed force calls still get through."""
    privacy: bool = False
    """Refuse every listen request, whoever asks (stronger than ``listen_allowed``)."""
    auto_answer: frozenset[str] = frozenset()
    """Device ids whose normal calls and announcements are answered without ringing."""
    announce_auto_answer: bool = True
    """Play announcements from anyone at once instead of ringing first (paging)."""
    listen_allowed: frozenset[str] = frozenset()
    """Device ids that may listen in (receive-only calls); nobody else may."""
    force_allowed: frozenset[str] = frozenset()
    """Device ids that may place force calls (answered even in do-not-disturb)."""

    def __post_init__(self) -> None:
        for name in ("auto_answer", "listen_allowed", "force_allowed"):
            ids = getattr(self, name)
            if not isinstance(ids, frozenset):
                raise TypeError(f"{name} must be a frozenset of device ids")
            if not all(isinstance(i, str) and i for i in ids):
                raise ValueError(f"{name} must hold non-empty device ids")


DEFAULT_POLICY = CallPolicy()
"""Every normal call rings, announcements play at once, nobody may listen in or force calls."""


def decide(policy: CallPolicy, caller: str, mode: CallMode) -> Decision:
    """What to do with an invite from ``caller`` in ``mode``."""
    if mode is CallMode.LISTEN:
        if policy.privacy:
            return Decision(Verdict.REFUSE, Refusal.PRIVACY, "privacy mode refuses listening")
        if caller not in policy.listen_allowed:
            return Decision(
                Verdict.REFUSE, Refusal.LISTEN_NOT_ALLOWED, f"{caller} may not listen in"
            )
        return Decision(Verdict.AUTO_ANSWER, why=f"{caller} may listen in")
    if mode is CallMode.FORCE:
        if caller not in policy.force_allowed:
            return Decision(
                Verdict.REFUSE, Refusal.FORCE_NOT_ALLOWED, f"{caller} may not force calls"
            )
        return Decision(Verdict.AUTO_ANSWER, why=f"force call from {caller}")
    if policy.do_not_disturb:
        return Decision(Verdict.REFUSE, Refusal.DO_NOT_DISTURB, "do-not-disturb is on")
    if caller in policy.auto_answer:
        return Decision(Verdict.AUTO_ANSWER, why=f"{caller} is on the auto-answer list")
    if mode is CallMode.ANNOUNCE and policy.announce_auto_answer:
        return Decision(Verdict.AUTO_ANSWER, why="announcements play at once")
    return Decision(Verdict.RING, why=f"{mode} call from {caller}")
