"""Call quality: a MOS estimate from loss, jitter and round-trip time (the E-model, ITU-T
G.107, in the simplified form of Cole and Rosenbluth, "Voice over IP performance
monitoring", 2001), and a call's quality from what both sides reported.

R = 93.2 - Id - Ie_eff, with the one-way delay d = RTT/2 + 2 x jitter (the jitter
buffer) + 20 ms (one Opus frame), Id = 0.024 d + 0.11 (d - 177.3) for d > 177.3,
and Ie_eff = Ie + (95 - Ie) x Ppl / (Ppl + Bpl) for random loss (Ppl in percent).
Opus has no G.113 values: Ie = 0 (it is transparent at 32 kbit/s) and Bpl = 25 (what
G.113 gives a PLC codec; Opus FEC and RED do better, so this errs low). R maps to
MOS with G.107 Annex B. Pure functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

FRAME_MS: Final = 20.0
IE: Final = 0.0
BPL: Final = 25.0


def r_factor(loss: float, jitter_ms: float, rtt_ms: float) -> float:
    """The E-model's R for ``loss`` (fraction 0..1), jitter and RTT in ms."""
    d = max(0.0, rtt_ms) / 2 + 2 * max(0.0, jitter_ms) + FRAME_MS
    delay = 0.024 * d + (0.11 * (d - 177.3) if d > 177.3 else 0.0)
    ppl = 100.0 * min(1.0, max(0.0, loss))
    equipment = IE + (95.0 - IE) * ppl / (ppl + BPL)
    return 93.2 - delay - equipment


def mos(r: float) -> float:
    """MOS (1..4.5) of an R factor (G.107 Annex B)."""
    if r <= 0:
        return 1.0
    if r >= 100:
        return 4.5
    # The cubic dips just under 1 for R below 6.4: still the worst there is.
    return max(1.0, 1 + 0.035 * r + 7e-6 * r * (r - 60) * (100 - r))


def mos_estimate(loss: float, jitter_ms: float, rtt_ms: float) -> float:
    return round(mos(r_factor(loss, jitter_ms, rtt_ms)), 2)


@dataclass(frozen=True, slots=True)
class CallQuality:
    """The worse of both sides' figures, and its MOS."""

    loss: float
    jitter_ms: float
    rtt_ms: float | None
    mos: float

    def to_json(self) -> dict[str, Any]:
        return {"loss": self.loss, "jitter_ms": self.jitter_ms, "rtt_ms": self.rtt_ms,
                "mos": self.mos}  # fmt: skip


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def call_quality(by_device: Mapping[str, Any] | None) -> CallQuality | None:
    """From the media statistics each side reported (``MediaStats``: ``loss_fraction``,
    ``jitter_ms``, ``rtt_ms``), by device; None if no side reported loss and jitter."""
    losses, jitters, rtts = [], [], []
    for stats in (by_device or {}).values():
        if not isinstance(stats, Mapping):
            continue
        loss, jitter = _number(stats.get("loss_fraction")), _number(stats.get("jitter_ms"))
        if loss is None or jitter is None:
            continue
        losses.append(loss)
        jitters.append(jitter)
        if (rtt := _number(stats.get("rtt_ms"))) is not None:
            rtts.append(rtt)
    if not losses:
        return None
    rtt = max(rtts) if rtts else None
    # Without an RTCP round trip yet: a LAN-like 20 ms rather than no delay at all.
    estimate = mos_estimate(max(losses), max(jitters), 20.0 if rtt is None else rtt)
    return CallQuality(max(losses), max(jitters), rtt, estimate)
