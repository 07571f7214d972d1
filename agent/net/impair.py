"""A seeded userspace UDP impairment proxy: loss, bursty loss, delay, jitter, reordering.

The kernel on our test machines has no netem, so tests, benchmarks and the
demo put this proxy between two media endpoints. The loss models are pure and
seeded, so a run is reproducible.
"""

from __future__ import annotations

import asyncio
import random
import typing
from dataclasses import dataclass, field

from agent.net.transport import Address


@dataclass(frozen=True, slots=True)
class Impairment:
    """What happens to each datagram in one direction."""

    loss: float = 0.0
    """Average loss probability, 0..1."""
    mean_burst: float = 1.0
    """Mean length of a loss burst in packets; 1 means independent (random) loss, more
    makes a two-state Gilbert-Elliott channel with the same average loss."""
    delay_ms: float = 0.0
    """Fixed one-way delay."""
    jitter_ms: float = 0.0
    """Extra delay drawn uniformly from [0, jitter_ms] per packet; reorders packets."""
    seed: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        if self.mean_burst < 1.0:
            raise ValueError("mean_burst must be >= 1")
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError("delay and jitter must be >= 0")


@dataclass(slots=True)
class LossModel:
    """Gilbert-Elliott: the bad state loses every packet, the good state none.

    With p = P(good->bad) and r = P(bad->good): mean burst = 1/r and average
    loss = p/(p+r). mean_burst == 1 gives r = 1, i.e. Bernoulli loss.
    """

    impairment: Impairment
    _rng: random.Random = field(init=False)
    _bad: bool = field(init=False, default=False)
    _p: float = field(init=False)
    _r: float = field(init=False)

    def __post_init__(self) -> None:
        imp = self.impairment
        self._rng = random.Random(imp.seed)
        self._r = 1.0 / imp.mean_burst
        self._p = imp.loss * self._r / (1.0 - imp.loss) if imp.loss else 0.0

    def lost(self) -> bool:
        if self._bad:
            self._bad = self._rng.random() >= self._r
        else:
            self._bad = self._rng.random() < self._p
        return self._bad

    def delay_s(self) -> float:
        imp = self.impairment
        jitter = self._rng.uniform(0.0, imp.jitter_ms) if imp.jitter_ms else 0.0
        return (imp.delay_ms + jitter) / 1000.0


@dataclass(frozen=True, slots=True)
class ProxyStats:
    forwarded: int
    dropped: int


class _Side(asyncio.DatagramProtocol):
    """One socket of the proxy; what it receives from its endpoint goes out the other side."""

    def __init__(self, proxy: ImpairmentProxy, name: str) -> None:
        self.proxy = proxy
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None
        self.peer: Address | None = None
        self.other: _Side | None = None
        self.model: LossModel | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if self.peer is None:
            self.peer = addr[:2]  # latch onto the first sender, like a NAT would
        elif addr[:2] != self.peer:
            return
        if self.other is None or self.model is None:
            return
        if self.model.lost():
            self.proxy._dropped += 1
            return
        delay = self.model.delay_s()
        other = self.other
        if delay <= 0.0:
            other.send(data)
        else:
            asyncio.get_running_loop().call_later(delay, other.send, data)

    def send(self, data: bytes) -> None:
        if self.transport is not None and self.peer is not None and not self.transport.is_closing():
            self.transport.sendto(data, self.peer)
            self.proxy._forwarded += 1


class ImpairmentProxy:
    """Sits between endpoints A and B: A sends to ``address_for_a``, B to ``address_for_b``."""

    def __init__(self) -> None:
        self._a = _Side(self, "a")
        self._b = _Side(self, "b")
        self._a.other, self._b.other = self._b, self._a
        self._forwarded = 0
        self._dropped = 0

    @classmethod
    async def start(cls, host: str = "127.0.0.1") -> ImpairmentProxy:
        self = cls()
        loop = asyncio.get_running_loop()
        for side in (self._a, self._b):
            await loop.create_datagram_endpoint(lambda s=side: s, local_addr=(host, 0))  # type: ignore[misc]
        return self

    def connect(
        self,
        a: Address | None,
        b: Address | None,
        a_to_b: Impairment = Impairment(),
        b_to_a: Impairment = Impairment(),
    ) -> None:
        """Set the endpoints and the impairment in each direction; an endpoint left None is
        learnt from the first datagram that reaches its side."""
        self._a.peer, self._b.peer = a, b
        self._a.model = LossModel(a_to_b)
        self._b.model = LossModel(b_to_a)

    @staticmethod
    def _address(side: _Side) -> Address:
        assert side.transport is not None
        host, port = side.transport.get_extra_info("sockname")[:2]
        return host, port

    @property
    def address_for_a(self) -> Address:
        return self._address(self._a)

    @property
    def address_for_b(self) -> Address:
        return self._address(self._b)

    @property
    def stats(self) -> ProxyStats:
        return ProxyStats(self._forwarded, self._dropped)

    async def close(self) -> None:
        for side in (self._a, self._b):
            if side.transport is not None:
                side.transport.close()
