"""Where the speaker's signal is in the microphone: delay estimation and a reference aligned to it.

The echo canceller (``agent.audio.speexdsp``) models the room with a filter a few hundred
milliseconds long, but the speaker's frames reach the microphone later by the playback
and capture buffering (tens of milliseconds, different on every device, and drifting
apart by the two clocks' ppm). ``ReferenceAligner`` keeps the frames the speaker was given
(the reference) by sample count and hands the canceller, for each microphone frame, the
reference that explains it: sample ``i`` of the microphone is paired with sample
``i + offset`` of the reference. ``offset`` is measured, and measured again every
``interval`` samples while the far end talks, with ``gcc_phat`` (generalised
cross-correlation with phase transform: the cross-spectrum whitened, so a room's colouring
and the talker's pitch do not smear the peak) between the last ``window`` microphone
samples and the reference around them. A new estimate is taken once two in a row agree
(one alone may be a double-talk artefact), and the reference is handed over ``lead``
samples early, so that the canceller's causal filter also covers an estimate a little late.

Whether the microphone hears the speaker at all is read from the same measurements:
``echo`` turns on at a peak of ``echo_prominence`` and off again after ``echo_timeout``
measurements in a row with the far end playing and no such peak (a headset plugged in, a
speaker muted); until it is on, the canceller stays out of the way
(``agent.audio.frontend``). In half-second windows (half a ``window`` while searching, so
the echo is found from the far end's first half second) an echo of speech through a room
scores a median 85 while only the far end talks and 48 against a near-end talker as loud;
a reference unrelated to the microphone (speech, noise, a tone) about 5, and only music
or a ring tone, once in a hundred windows, over 20.

Pure numpy over sample counts: no clocks, no I/O; the caller feeds both streams.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

Samples = npt.NDArray[np.int16]


@dataclass(frozen=True, slots=True)
class DelayEstimate:
    """One cross-correlation between microphone and reference."""

    lag: int
    """Samples by which the microphone follows the reference (0..max_lag)."""
    prominence: float
    """The correlation peak over the mean magnitude around it: ~1-3 for unrelated
    signals, tens for a clear echo."""


def gcc_phat(
    mic: npt.NDArray[np.float64], ref: npt.NDArray[np.float64], max_lag: int
) -> DelayEstimate:
    """The lag at which ``ref`` best explains ``mic``: ``mic[n] ~ ref[n + max_lag - lag]``,
    i.e. ``ref`` holds the ``max_lag`` samples before ``mic``'s first one and then the
    same span as ``mic`` (``len(ref) == len(mic) + max_lag``).

    Both are faded in and out over a sixteenth of ``mic``'s length: whitened, a cut edge
    is a click, and a click lines up with any onset in the other signal (a steady tone as
    reference scored prominences up to 110 against unrelated speech; faded, 6)."""
    if len(ref) != len(mic) + max_lag or max_lag < 0 or not len(mic):
        raise ValueError("ref must be len(mic) + max_lag samples")
    # Lags 0..max_lag reach no further than ref's end: a circular correlation as long as
    # ref wraps nothing into them (no padding to len(ref) + len(mic): 1.8x fewer points).
    n = len(ref)
    fade = np.hanning(2 * (len(mic) // 16) + 1)[: len(mic) // 16]
    cross = np.fft.rfft(_faded(ref, fade), n) * np.conj(np.fft.rfft(_faded(mic, fade), n))
    cross /= np.abs(cross) + 1e-12
    corr = np.fft.irfft(cross, n)[: max_lag + 1]  # corr[k] = sum mic[i] ref[i + k]
    magnitude = np.abs(corr)
    k = int(np.argmax(magnitude))
    floor = float(np.mean(magnitude)) or 1e-12
    return DelayEstimate(lag=max_lag - k, prominence=float(magnitude[k]) / floor)


def _faded(x: npt.NDArray[np.float64], fade: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``x`` faded in and out with ``fade`` (rising) at its ends."""
    out = x.copy()
    out[: len(fade)] *= fade
    out[len(out) - len(fade) :] *= fade[::-1]
    return out


@dataclass(frozen=True, slots=True)
class AlignerSettings:
    """How ``ReferenceAligner`` looks for the echo (all in samples at the processing rate)."""

    max_lag: int
    """Longest delay from reference to microphone that is searched."""
    initial_lag: int
    """Delay assumed until the first measurement."""
    window: int
    """Microphone samples one measurement correlates (half as many while no echo is
    known: it is found sooner)."""
    interval: int
    """Microphone samples between measurements."""
    lead: int
    """The reference is handed over this much early (the canceller's filter absorbs it)."""
    tolerance: int
    """Estimates this close count as agreeing; a smaller change is not applied (drift is
    followed in steps of about this size)."""
    track: bool = True
    """Measure the delay (else ``initial_lag`` throughout: a device whose delay is known)."""
    min_prominence: float = 6.0
    """A correlation peak below this is no measurement (far end silent, noise)."""
    min_level: float = 30.0
    """The reference's RMS (int16 units) below which the far end counts as silent."""
    echo_prominence: float = 20.0
    """A correlation peak from which on the microphone counts as hearing the speaker."""
    echo_timeout: int = 20
    """Measurements in a row, with the far end playing, without such a peak after which
    the echo counts as gone (20: 10 s of far-end sound at the front end's interval)."""


class ReferenceAligner:
    """The reference stream, paired with the microphone stream by sample count (module
    docstring). ``push_reference`` as the speaker is fed; ``align`` once per microphone
    frame; ``restart`` when the two streams resume after a pause (a new call)."""

    def __init__(self, settings: AlignerSettings) -> None:
        self.settings = settings
        keep = settings.window + settings.max_lag + settings.lead + settings.tolerance
        self._ref = np.zeros(1 << int(np.ceil(np.log2(4 * keep))), np.int16)
        self._mic = np.zeros(len(self._ref), np.int16)
        self._written = 0  # reference samples pushed, ever
        self._heard = 0  # microphone samples aligned, ever
        self._offset = -settings.initial_lag
        self._lag = settings.initial_lag
        self._since = 0  # microphone samples since the last measurement
        self._candidate: int | None = None
        self._missed = 0  # measurements in a row without an echo peak
        self.echo = not settings.track
        """Whether the microphone hears the speaker (module docstring); without
        measurements (``track`` off) it is assumed to."""
        self.estimates = 0
        """Measurements taken (a confident peak)."""
        self.changes = 0
        """Times the offset moved to a new measurement."""

    @property
    def lag(self) -> int:
        """The delay last applied: samples from reference to microphone, as measured."""
        return self._lag

    def restart(self) -> None:
        """The streams pause and resume (a new call): keep the last delay, re-anchored at
        the counts now, and measure again."""
        self._offset = self._written - self._heard - self._lag
        self._candidate = None
        self._since = self.settings.interval  # measure as soon as a window is there

    def push_reference(self, samples: Samples) -> None:
        """Samples the speaker was given, in order."""
        self._written = _put(self._ref, self._written, samples)

    def align(self, mic: Samples) -> Samples:
        """The reference for these microphone samples (zeros where there is none), after
        measuring the delay again if it is time."""
        n = len(mic)
        self._heard = _put(self._mic, self._heard, mic)
        self._since += n
        s = self.settings
        window = s.window if self.echo else s.window // 2
        if s.track and self._since >= s.interval and self._heard >= window:
            self._since = 0
            self._measure(window)
        start = self._heard - n + self._offset + s.lead
        return self._reference(start, n)

    def _measure(self, window: int) -> None:
        s = self.settings
        end = self._written  # the newest reference that can explain the newest mic sample
        ref = self._reference(end - window - s.max_lag, window + s.max_lag).astype(np.float64)
        if float(np.sqrt(np.mean(ref**2))) < s.min_level:
            return
        mic = _take(self._mic, self._heard - window, window).astype(np.float64)
        found = gcc_phat(mic, ref, s.max_lag)
        peak = found.prominence >= s.echo_prominence
        self._missed = 0 if peak else self._missed + 1
        found_echo = peak and not self.echo
        if found_echo or (self.echo and self._missed >= s.echo_timeout):
            self.echo = peak
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("echo %s (prominence %.1f)", "found" if peak else "gone",
                             found.prominence)  # fmt: skip
        if found.prominence < s.min_prominence:
            return
        self.estimates += 1
        # mic[heard - window + i] pairs with ref[end - window + i - lag].
        offset = end - self._heard - found.lag
        agreed = self._candidate is not None and abs(offset - self._candidate) <= s.tolerance
        self._candidate = offset
        first = self.estimates == 1
        if (agreed or first or found_echo) and abs(offset - self._offset) > s.tolerance // 2:
            self._offset, self._lag = offset, found.lag
            self.changes += 1
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("echo delay %d samples (prominence %.1f)", found.lag,
                             found.prominence)  # fmt: skip

    def _reference(self, start: int, n: int) -> Samples:
        """Reference samples ``start .. start + n``; zeros for those not (or no longer) kept."""
        out = np.zeros(n, np.int16)
        lo, hi = max(start, self._written - len(self._ref)), min(start + n, self._written)
        if lo < hi:
            out[lo - start : hi - start] = _take(self._ref, lo, hi - lo)
        return out


def _put(ring: Samples, count: int, samples: Samples) -> int:
    """Append ``samples`` to the ring whose sample ``count`` comes next; the new count."""
    size = len(ring)
    total = len(samples)
    kept = samples[-size:]
    i = (count + total - len(kept)) % size
    first = min(len(kept), size - i)
    ring[i : i + first] = kept[:first]
    ring[: len(kept) - first] = kept[first:]
    return count + total


def _take(ring: Samples, start: int, n: int) -> Samples:
    """``n`` samples of the ring from absolute sample ``start`` (which it must still hold)."""
    i = start % len(ring)
    return np.concatenate((ring[i : i + n], ring[: max(0, i + n - len(ring))]))


__all__ = ["AlignerSettings", "DelayEstimate", "ReferenceAligner", "gcc_phat"]
