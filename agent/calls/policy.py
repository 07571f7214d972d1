"""Call policy on the device: which invites ring, which are answered at once, which are refused.

Pure: ``decide(policy, caller, mode)`` looks only at its arguments. The relay checks who may
call whom before it forwards an invite; this is the board's own, last word (its owner's
do-not-disturb and privacy switches live here, not on the relay).

The rules, in order:

* a web peer (a browser the relay speaks for, ``web.<name>``) not in ``web_allowed``:
  refused, whatever the mode. The other lists name web peers like devices, and
  ``web.*`` in a list stands for every web peer (never for a device).
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
from agent.signaling.topics import WEB_PEERS, is_web_peer


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
    WEB_NOT_ALLOWED = "web-not-allowed"


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
    web_allowed: frozenset[str] = frozenset({WEB_PEERS})
    """Web peers that may call this board at all (then as the other lists say). By default
    every one: the relay authenticated them, and listening in or forcing a call still
    needs ``listen_allowed``/``force_allowed``. Empty: no calls from browsers."""

    def __post_init__(self) -> None:
        for name in ("auto_answer", "listen_allowed", "force_allowed", "web_allowed"):
            ids = getattr(self, name)
            if not isinstance(ids, frozenset):
                raise TypeError(f"{name} must be a frozenset of device ids")
            if not all(isinstance(i, str) and i for i in ids):
                raise ValueError(f"{name} must hold non-empty device ids")


DEFAULT_POLICY = CallPolicy()
"""Every normal call rings, announcements play at once, nobody may listen in or force calls."""


def listed(ids: frozenset[str], caller: str) -> bool:
    """``caller`` is in ``ids``, by name or (a web peer) through ``web.*``."""
    return caller in ids or (WEB_PEERS in ids and is_web_peer(caller))


def decide(policy: CallPolicy, caller: str, mode: CallMode) -> Decision:
    """What to do with an invite from ``caller`` in ``mode``."""
    if is_web_peer(caller) and not listed(policy.web_allowed, caller):
        return Decision(
            Verdict.REFUSE, Refusal.WEB_NOT_ALLOWED, f"{caller} may not call from a browser"
        )
    if mode is CallMode.LISTEN:
        if policy.privacy:
            return Decision(Verdict.REFUSE, Refusal.PRIVACY, "privacy mode refuses listening")
        if not listed(policy.listen_allowed, caller):
            return Decision(
                Verdict.REFUSE, Refusal.LISTEN_NOT_ALLOWED, f"{caller} may not listen in"
            )
        return Decision(Verdict.AUTO_ANSWER, why=f"{caller} may listen in")
    if mode is CallMode.FORCE:
        if not listed(policy.force_allowed, caller):
            return Decision(
                Verdict.REFUSE, Refusal.FORCE_NOT_ALLOWED, f"{caller} may not force calls"
            )
        return Decision(Verdict.AUTO_ANSWER, why=f"force call from {caller}")
    if policy.do_not_disturb:
        return Decision(Verdict.REFUSE, Refusal.DO_NOT_DISTURB, "do-not-disturb is on")
    if listed(policy.auto_answer, caller):
        return Decision(Verdict.AUTO_ANSWER, why=f"{caller} is on the auto-answer list")
    if mode is CallMode.ANNOUNCE and policy.announce_auto_answer:
        return Decision(Verdict.AUTO_ANSWER, why="announcements play at once")
    return Decision(Verdict.RING, why=f"{mode} call from {caller}")
