"""Receiver statistics for one RTP source (RFC 3550 appendix A.1, A.3 and A.8)."""

from __future__ import annotations

from agent.media.rtcp import ReportBlock

MAX_DROPOUT = 3000
MAX_MISORDER = 100
_SEQ_MOD = 1 << 16
_SEQ_MASK = _SEQ_MOD - 1
_TS_MASK = 0xFFFFFFFF
_TS_HALF = 0x80000000
_LOST_MAX = 0x7FFFFF
_LOST_MIN = -0x800000


class ReceiverStats:
    """Sequence tracking, loss and interarrival jitter for reception reports.

    Source validation (A.1 probation) is left out: the first packet starts the sequence.
    A jump of MAX_DROPOUT or more (or a packet over MAX_MISORDER behind) is discarded
    unless the next packet follows it, in which case the sender is taken to have restarted.
    """

    __slots__ = (
        "_bad_seq",
        "_base_seq",
        "_clock_rate",
        "_cycles",
        "_expected_prior",
        "_fraction",
        "_jitter",
        "_last_arrival",
        "_last_timestamp",
        "_max_seq",
        "_received",
        "_received_prior",
        "_started",
    )

    def __init__(self, clock_rate: int = 48_000) -> None:
        if clock_rate <= 0:
            raise ValueError(f"clock rate must be positive, got {clock_rate}")
        self._clock_rate = clock_rate
        self._jitter = 0.0
        self._fraction = 0.0
        self._started = False
        self._init_seq(0)
        # Reference packet for the jitter transit difference; None until one is accepted.
        self._last_arrival: float | None = None
        self._last_timestamp = 0

    def _init_seq(self, seq: int) -> None:
        self._base_seq = seq
        self._max_seq = seq
        self._bad_seq = _SEQ_MOD + 1  # an impossible value, so no restart is pending
        self._cycles = 0
        self._received = 0
        self._received_prior = 0
        self._expected_prior = 0

    def update(self, seq: int, rtp_timestamp: int, arrival_seconds: float) -> bool:
        """Account for one received packet; False when it is discarded as a suspected jump."""
        if not self._started:
            self._started = True
            self._init_seq(seq)
        else:
            udelta = (seq - self._max_seq) & _SEQ_MASK
            if udelta < MAX_DROPOUT:
                if seq < self._max_seq:
                    self._cycles += _SEQ_MOD
                self._max_seq = seq
            elif udelta <= _SEQ_MOD - MAX_MISORDER:
                if seq != self._bad_seq:
                    self._bad_seq = (seq + 1) & _SEQ_MASK
                    return False
                # Two packets in sequence after a big jump: the sender restarted.
                self._init_seq(seq)
                self._last_arrival = None
            # Otherwise a duplicate or reordered packet: counted, max_seq unchanged.
        self._received += 1
        self._update_jitter(rtp_timestamp, arrival_seconds)
        return True

    def _update_jitter(self, rtp_timestamp: int, arrival_seconds: float) -> None:
        last_arrival = self._last_arrival
        if last_arrival is not None:
            # D(i-1, i) from A.8, using differences so that the timestamp may wrap.
            ts_delta = ((rtp_timestamp - self._last_timestamp + _TS_HALF) & _TS_MASK) - _TS_HALF
            d = abs((arrival_seconds - last_arrival) * self._clock_rate - ts_delta)
            self._jitter += (d - self._jitter) / 16.0
        self._last_arrival = arrival_seconds
        self._last_timestamp = rtp_timestamp

    @property
    def extended_highest_seq(self) -> int:
        return self._cycles + self._max_seq

    @property
    def expected(self) -> int:
        return self._cycles + self._max_seq - self._base_seq + 1 if self._started else 0

    @property
    def packets_received(self) -> int:
        return self._received

    @property
    def packets_lost(self) -> int:
        """Cumulative loss, clamped to the signed 24-bit range of a report block."""
        return max(_LOST_MIN, min(_LOST_MAX, self.expected - self._received))

    @property
    def jitter(self) -> float:
        """Interarrival jitter in RTP timestamp units."""
        return self._jitter

    @property
    def jitter_ms(self) -> float:
        return self._jitter * 1000.0 / self._clock_rate

    @property
    def loss_fraction(self) -> float:
        """Fraction of packets lost in the interval ending at the last report_block() call."""
        return self._fraction

    def report_block(self, ssrc: int, lsr: int, dlsr: int) -> ReportBlock:
        """Reception report for this source; starts a new fraction-lost interval.

        Before any packet all counters are zero, which is what the block then reports.
        """
        expected = self.expected
        expected_interval = expected - self._expected_prior
        self._expected_prior = expected
        received_interval = self._received - self._received_prior
        self._received_prior = self._received
        lost_interval = expected_interval - received_interval
        if expected_interval <= 0 or lost_interval <= 0:
            self._fraction = 0.0
            fraction_lost = 0
        else:
            self._fraction = lost_interval / expected_interval
            fraction_lost = (lost_interval << 8) // expected_interval
        return ReportBlock(
            ssrc=ssrc,
            fraction_lost=fraction_lost,
            packets_lost=self.packets_lost,
            highest_seq=self.extended_highest_seq & _TS_MASK,
            jitter=min(int(self._jitter), _TS_MASK),
            lsr=lsr,
            dlsr=dlsr,
        )
