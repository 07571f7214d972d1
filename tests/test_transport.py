"""UDP transport and the impairment proxy on real loopback sockets."""

import asyncio

import pytest
from net_env import Receiver

from agent.net.impair import Impairment, ImpairmentProxy, LossModel
from agent.net.transport import DatagramQueue, TransportClosed, UdpTransport


async def _pair() -> tuple[UdpTransport, UdpTransport]:
    a, b = await UdpTransport.bind(), await UdpTransport.bind()
    a.connect(b.local_address)
    b.connect(a.local_address)
    return a, b


async def test_datagrams_flow_both_ways_and_close_ends_recv() -> None:
    a, b = await _pair()
    await a.send(b"ping")
    assert await asyncio.wait_for(b.recv(), 2) == b"ping"
    await b.send(b"pong")
    assert await asyncio.wait_for(a.recv(), 2) == b"pong"
    await a.close()
    with pytest.raises(TransportClosed):
        await asyncio.wait_for(a.recv(), 2)
    with pytest.raises(TransportClosed):
        await a.send(b"x")
    await b.close()


async def test_foreign_sender_is_dropped_and_counted() -> None:
    a, b = await _pair()
    stranger = await UdpTransport.bind()
    stranger.connect(b.local_address)
    await stranger.send(b"spoof")
    await a.send(b"real")
    assert await asyncio.wait_for(b.recv(), 2) == b"real"
    assert b.stats.dropped_foreign == 1
    for t in (a, b, stranger):
        await t.close()


async def test_slow_reader_loses_oldest_not_newest() -> None:
    a = await UdpTransport.bind()
    b = await UdpTransport.bind(queue_size=4)
    a.connect(b.local_address)
    b.connect(a.local_address)
    for i in range(10):
        await a.send(bytes([i]))
    for _ in range(100):
        if b.stats.received == 10:
            break
        await asyncio.sleep(0.01)
    assert [await b.recv() for _ in range(4)] == [bytes([i]) for i in range(6, 10)]
    assert b.stats.dropped_overflow == 6
    await a.close()
    await b.close()


def test_an_attached_receiver_gets_the_queue_first_then_each_datagram_at_once() -> None:
    queue = DatagramQueue(2)
    for i in range(3):
        queue.put(bytes([i]))
    receiver = Receiver()
    queue.attach(receiver)
    assert receiver.datagrams == [b"\x01", b"\x02"]  # the oldest was dropped while queued
    queue.put(b"\x03")  # no task, no loop iteration: handed over inside put()
    assert receiver.datagrams[-1] == b"\x03"
    assert (queue.queued, queue.dropped) == (4, 1)
    queue.detach()
    queue.put(b"\x04")
    assert receiver.datagrams[-1] == b"\x03"  # queued for get() again
    queue.attach(receiver)
    queue.close("gone")
    queue.close("again")
    assert receiver.datagrams[-1] == b"\x04"
    assert receiver.closed == ["gone"]  # said once, with the first reason
    assert not queue.put(b"late")


def test_attaching_to_a_closed_queue_delivers_what_is_left_then_the_end() -> None:
    queue = DatagramQueue(4)
    queue.put(b"last")
    queue.close("done")
    receiver = Receiver()
    queue.attach(receiver)
    assert receiver.datagrams == [b"last"]
    assert receiver.closed == ["done"]


async def test_one_reader_either_get_or_a_receiver() -> None:
    queue = DatagramQueue(4)
    queue.attach(Receiver())
    with pytest.raises(RuntimeError):
        queue.attach(Receiver())
    with pytest.raises(RuntimeError):
        await queue.get()
    queue.detach()
    waiting = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError):
        queue.attach(Receiver())
    queue.put(b"x")
    assert await waiting == b"x"


async def test_udp_transport_pushes_to_an_attached_receiver() -> None:
    a, b = await _pair()
    receiver = Receiver()
    b.attach(receiver)
    await a.send(b"ping")
    async with asyncio.timeout(2):
        while not receiver.datagrams:
            await asyncio.sleep(0.005)
    assert receiver.datagrams == [b"ping"]
    await b.close()
    assert receiver.closed == ["udp transport closed"]
    await a.close()


@pytest.mark.parametrize(("loss", "burst"), [(0.1, 1.0), (0.1, 3.0), (0.3, 2.0)])
def test_loss_model_hits_average_and_burst_length(loss: float, burst: float) -> None:
    model = LossModel(Impairment(loss=loss, mean_burst=burst, seed=4))
    pattern = [model.lost() for _ in range(200_000)]
    assert abs(sum(pattern) / len(pattern) - loss) < 0.01
    bursts, run = [], 0
    for lost in pattern:
        if lost:
            run += 1
        elif run:
            bursts.append(run)
            run = 0
    assert abs(sum(bursts) / len(bursts) - burst) < 0.1 * burst


def test_loss_model_is_reproducible() -> None:
    first = LossModel(Impairment(loss=0.2, seed=9))
    second = LossModel(Impairment(loss=0.2, seed=9))
    assert [first.lost() for _ in range(500)] == [second.lost() for _ in range(500)]


async def test_proxy_drops_delays_and_reorders() -> None:
    a, b = await UdpTransport.bind(), await UdpTransport.bind()
    proxy = await ImpairmentProxy.start()
    proxy.connect(
        a.local_address,
        b.local_address,
        a_to_b=Impairment(loss=0.2, jitter_ms=30, seed=3),
        b_to_a=Impairment(delay_ms=50),
    )
    a.connect(proxy.address_for_a)
    b.connect(proxy.address_for_b)
    for i in range(200):
        await a.send(i.to_bytes(2, "big"))
    got = []
    while True:
        try:
            got.append(int.from_bytes(await asyncio.wait_for(b.recv(), 0.5), "big"))
        except TimeoutError:
            break
    assert 130 < len(got) < 185
    assert got != sorted(got)  # jitter reordered some
    loop = asyncio.get_running_loop()
    start = loop.time()
    await b.send(b"back")
    assert await asyncio.wait_for(a.recv(), 2) == b"back"
    assert loop.time() - start >= 0.045
    assert proxy.stats.dropped == 200 - len(got)
    for t in (a, b, proxy):
        await t.close()
