"""Debouncing a contact (button, switch), pure: edges in, settled levels out.

A mechanical contact bounces for a few milliseconds when it closes or opens. A level
counts once the line has held it for ``hold_s`` with no further edge; shorter pulses
(bounces, interference picked up by a long cable) are never reported. The edges carry
their own times (the kernel's), so a reader that was busy still judges them right;
the caller also asks ``settle`` when ``deadline`` passes with no new edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Debouncer:
    """The settled level of one contact."""

    hold_s: float
    """How long a level must hold, with no edge, to count."""
    stable: bool = False
    """The settled level (initially: what the line reads at start)."""
    _raw: bool = field(init=False)
    _since: float | None = field(init=False, default=None)
    """When the raw level last changed, until it settles."""

    def __post_init__(self) -> None:
        if self.hold_s < 0:
            raise ValueError(f"hold_s must not be negative, got {self.hold_s}")
        self._raw = self.stable

    @property
    def deadline(self) -> float | None:
        """When to call ``settle`` if no edge comes first; None: nothing pending."""
        return None if self._since is None else self._since + self.hold_s

    def edge(self, at: float, level: bool) -> bool | None:
        """An edge to ``level`` at ``at``; the new settled level if the level before it had
        held long enough to settle, else None. An edge to the level the line already had
        means one was missed in between: it is a bounce like any other."""
        changed = self.settle(at)
        self._raw, self._since = level, at
        return changed

    def settle(self, now: float) -> bool | None:
        """The new settled level if the raw one has held until ``now``; else None."""
        if self._since is None or now - self._since < self.hold_s:
            return None
        self._since = None
        if self._raw == self.stable:
            return None
        self.stable = self._raw
        return self.stable


__all__ = ["Debouncer"]
