"""The namespace NAT lab (tools.lab.netns): mappings, filtering, hole punching, teardown.

Real namespaces, veths and conntrack: these tests need root and fail (never skip) without it.
A UDP "reflector" on the public host answers each datagram with the source address it saw
(what a STUN server does); "peers" on LAN hosts are driven line by line over stdin/stdout.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tools.lab.netns import NatKind, NetLab, NetLabError, list_netns

ROOT = Path(__file__).resolve().parents[1]

NO_ANSWER_S = 0.3
"""How long to wait for a datagram that must not come; delivery here takes well under 1 ms."""

Address = tuple[str, int]

# Two UDP ports and one TCP port. A datagram gets {"ip", "port"} of its source back, from
# the port it came in on; the datagram b"other" gets it from the other UDP port instead (a
# STUN CHANGE-REQUEST). A TCP connection gets one such line and is closed.
REFLECTOR = r"""
import json, selectors, socket
sel = selectors.DefaultSelector()
udp = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
for s in udp:
    s.bind(("0.0.0.0", 0))
    sel.register(s, selectors.EVENT_READ)
tcp = socket.create_server(("0.0.0.0", 0))
sel.register(tcp, selectors.EVENT_READ)
ports = {"udp": [s.getsockname()[1] for s in udp], "tcp": tcp.getsockname()[1]}
print(json.dumps(ports), flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is tcp:
            conn, src = tcp.accept()
            with conn:
                conn.sendall(json.dumps({"ip": src[0], "port": src[1]}).encode() + b"\n")
            continue
        s = key.fileobj
        data, src = s.recvfrom(2048)
        out = udp[1 - udp.index(s)] if data == b"other" else s
        out.sendto(json.dumps({"ip": src[0], "port": src[1]}).encode(), src)
"""

# One UDP socket (on port argv[1], or any), kept bound for the peer's life; one JSON
# command per stdin line, one JSON answer per stdout line.
PEER = r"""
import json, select, socket, sys
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", int(sys.argv[1]) if len(sys.argv) > 1 else 0))
print(json.dumps({"port": udp.getsockname()[1]}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    out = {}
    if cmd["op"] == "send":
        udp.sendto(cmd["data"].encode(), tuple(cmd["to"]))
    elif cmd["op"] == "recv":
        if select.select([udp], [], [], cmd["timeout"])[0]:
            data, src = udp.recvfrom(2048)
            out = {"from": list(src), "data": data.decode()}
    elif cmd["op"] == "tcp":
        try:
            with socket.create_connection(tuple(cmd["to"]), timeout=cmd["timeout"]) as s:
                out = {"line": s.makefile().readline()}
        except OSError as e:
            out = {"error": repr(e)}
    print(json.dumps(out), flush=True)
"""


async def _read_json(proc: asyncio.subprocess.Process, what: str) -> dict[str, Any]:
    assert proc.stdout is not None
    async with asyncio.timeout(10):
        line = await proc.stdout.readline()
    if not line:
        raise AssertionError(f"{what} exited with {await proc.wait()}")
    result: dict[str, Any] = json.loads(line)
    return result


@dataclass(frozen=True, slots=True)
class Reflector:
    address: str
    udp: tuple[Address, Address]
    tcp: Address

    @classmethod
    async def start(cls, lab: NetLab, node: str) -> Reflector:
        proc = await lab.spawn(node, [sys.executable, "-c", REFLECTOR], stdout=subprocess.PIPE)
        ports = await _read_json(proc, "reflector")
        ip = lab.address(node)
        a, b = ports["udp"]
        return cls(ip, ((ip, a), (ip, b)), (ip, ports["tcp"]))


class Peer:
    """A UDP socket on a node, driven from the test."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, port: int) -> None:
        self.name, self.proc, self.port = name, proc, port

    @classmethod
    async def start(cls, lab: NetLab, node: str, port: int = 0) -> Peer:
        proc = await lab.spawn(
            node,
            [sys.executable, "-c", PEER, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        hello = await _read_json(proc, f"peer on {node}")
        return cls(node, proc, hello["port"])

    async def _call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        await self.proc.stdin.drain()
        return await _read_json(self.proc, f"peer on {self.name}")

    async def send(self, to: Address, data: str) -> None:
        await self._call(op="send", to=to, data=data)

    async def recv(self, wait_s: float = 5.0) -> tuple[Address, str] | None:
        """The next datagram and its source, or ``None`` after ``wait_s``."""
        got = await self._call(op="recv", timeout=wait_s)
        if not got:
            return None
        ip, port = got["from"]
        return (ip, port), got["data"]

    async def mapping(self, to: Address, wait_s: float = 5.0) -> Address | None:
        """The source address ``to`` (a reflector port) saw, or ``None`` without an answer."""
        await self.send(to, "probe")
        got = await self.recv(wait_s)
        if got is None:
            return None
        source, data = got
        assert source == to
        seen = json.loads(data)
        return seen["ip"], seen["port"]

    async def tcp_line(self, to: Address) -> dict[str, Any]:
        return await self._call(op="tcp", to=to, timeout=5.0)


async def start(lab: NetLab, *peers: str) -> tuple[Reflector, list[Peer]]:
    """A reflector on ``pub`` and a peer on each of ``peers``, started side by side."""
    reflector, started = await asyncio.gather(
        Reflector.start(lab, "pub"), asyncio.gather(*(Peer.start(lab, n) for n in peers))
    )
    return reflector, list(started)


@pytest.fixture
async def lab() -> AsyncIterator[NetLab]:
    async with NetLab() as lab:
        yield lab


async def test_cone_nat_maps_one_socket_to_one_public_address(lab: NetLab) -> None:
    net = lab.two_nats(NatKind.CONE, NatKind.CONE)
    reflector, (peer,) = await start(lab, "h1")
    first, second = reflector.udp

    seen = [await peer.mapping(first), await peer.mapping(second)]

    # Endpoint-independent mapping, with the local port preserved on the public address.
    assert seen == [(net.nat1.public_address, peer.port)] * 2
    assert lab.address("nat1") == net.nat1.public_address == "203.0.113.101"


async def test_cone_nat_filters_on_address_and_port(lab: NetLab) -> None:
    lab.two_nats(NatKind.CONE, NatKind.CONE)
    reflector, (peer,) = await start(lab, "h1")
    first, second = reflector.udp

    # Answered from the other port: same public IP, but h1 never sent to that port.
    await peer.send(first, "other")
    # Sent after it on the same path, so it arrives after the answer would have.
    assert await peer.mapping(first) is not None
    assert await peer.recv(NO_ANSWER_S) is None
    # Once h1 has sent to the second port, the second port gets in.
    await peer.mapping(second)
    await peer.send(first, "other")
    got = await peer.recv()
    assert got is not None and got[0] == second


async def test_hosts_sharing_a_cone_nat_get_one_mapping_each_and_no_hairpin(
    lab: NetLab,
) -> None:
    net = lab.two_nats(NatKind.CONE, NatKind.CONE)
    lab.add_host("h3", behind="nat1")
    reflector, _ = await start(lab)
    # Same local port on both: private namespaces, so no other program can hold it.
    h1, h3 = await Peer.start(lab, "h1", 40000), await Peer.start(lab, "h3", 40000)
    first, second = reflector.udp
    public = net.nat1.public_address

    m1 = await h1.mapping(first)
    m3 = await h3.mapping(first)
    assert m1 == (public, 40000)
    assert m3 is not None and m3[0] == public and m3[1] != 40000
    # Either socket keeps its own mapping towards a new destination.
    assert await h3.mapping(second) == m3
    assert await h1.mapping(second) == m1

    # No hairpinning: h1 cannot reach its neighbour through the NAT's public side.
    await h1.send(m3, "hairpin")
    assert await h3.recv(NO_ANSWER_S) is None


async def test_symmetric_nat_maps_each_destination_to_its_own_port(lab: NetLab) -> None:
    net = lab.two_nats(NatKind.SYMMETRIC, NatKind.CONE)
    reflector, (peer,) = await start(lab, "h1")
    first, second = reflector.udp

    seen = [await peer.mapping(first), await peer.mapping(second)]

    assert seen[0] is not None and seen[1] is not None
    assert seen[0][0] == seen[1][0] == net.nat1.public_address
    # --random-fully draws each port at random: equal by chance about once in 64,000 runs.
    assert seen[0][1] != seen[1][1]
    # The mapping of a flow is stable, so the reflector sees the same port again.
    assert await peer.mapping(first) == seen[0]


async def test_hosts_cannot_reach_private_addresses_of_other_lans(lab: NetLab) -> None:
    net = lab.two_nats(NatKind.CONE, NatKind.CONE)
    reflector, (h1, h2, pub) = await start(lab, "h1", "h2", "pub")
    assert net.h1.address == "10.0.1.10" and net.h2.address == "10.0.2.10"
    assert lab.address("h2") == net.h2.address

    await h1.send((net.h2.address, h2.port), "direct")
    await pub.send((net.h1.address, h1.port), "direct")

    got = await asyncio.gather(h2.recv(NO_ANSWER_S), h1.recv(NO_ANSWER_S))
    assert list(got) == [None, None]
    # Both are otherwise online.
    assert await h1.mapping(reflector.udp[0]) is not None
    assert await h2.mapping(reflector.udp[0]) is not None


async def test_block_udp_lets_only_tcp_out(lab: NetLab) -> None:
    net = lab.two_nats(NatKind.BLOCK_UDP, NatKind.CONE)
    reflector, (h1, h2) = await start(lab, "h1", "h2")

    assert await h1.mapping(reflector.udp[0], NO_ANSWER_S) is None
    got = await h1.tcp_line(reflector.tcp)
    assert "line" in got, got
    assert json.loads(got["line"])["ip"] == net.nat1.public_address
    # The other NAT lets UDP through.
    assert await h2.mapping(reflector.udp[0]) is not None


@pytest.mark.parametrize(
    ("kind1", "kind2", "punches_through"),
    [
        (NatKind.CONE, NatKind.CONE, True),
        (NatKind.SYMMETRIC, NatKind.SYMMETRIC, False),
        (NatKind.CONE, NatKind.SYMMETRIC, False),
    ],
)
async def test_udp_hole_punching_through_mapped_addresses(
    lab: NetLab, kind1: NatKind, kind2: NatKind, punches_through: bool
) -> None:
    """What ICE does with server-reflexive candidates: learn, exchange, both send first."""
    lab.two_nats(kind1, kind2)
    reflector, (h1, h2) = await start(lab, "h1", "h2")
    m1, m2 = await h1.mapping(reflector.udp[0]), await h2.mapping(reflector.udp[0])
    assert m1 is not None and m2 is not None

    # h1's punch is dropped at nat2 but opens nat1 for m2; h2's then finds nat1 open, and
    # opens nat2 for m1 on its way.
    await h1.send(m2, "punch from h1")
    await h2.send(m1, "punch from h2")
    await h1.send(m2, "hello from h1")
    wait_s = 5.0 if punches_through else NO_ANSWER_S
    got = list(await asyncio.gather(h1.recv(wait_s), h2.recv(wait_s)))

    if punches_through:
        assert got == [(m2, "punch from h2"), (m1, "hello from h1")]
    else:
        assert got == [None, None]


def _root_state() -> tuple[list[str], list[str]]:
    """The root namespace's iptables rules (without the dated comments) and link names."""
    rules = subprocess.run(["iptables-save"], capture_output=True, check=True, timeout=10)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, check=True, timeout=10)
    return (
        [r for r in rules.stdout.decode().splitlines() if not r.startswith("#")],
        sorted(line.split(":")[1].strip() for line in links.stdout.decode().splitlines()),
    )


async def test_teardown_removes_everything_after_an_exception() -> None:
    before = _root_state()
    with pytest.raises(ZeroDivisionError):
        async with NetLab() as lab:
            lab.two_nats(NatKind.SYMMETRIC, NatKind.BLOCK_UDP)
            lab.add_host("h3", behind="nat1")
            created = lab.netns
            _, peers = await start(lab, "h1", "h2", "h3")
            _ = 1 / 0

    assert len(created) == 7
    assert not set(created) & set(list_netns())
    assert all(p.proc.returncode is not None for p in peers)
    assert _root_state() == before
    assert lab.netns == []


def test_sync_lab_stops_its_processes_and_deletes_its_namespaces() -> None:
    before = _root_state()
    with NetLab(grace=0.2) as lab:
        lab.add_public_host("pub")
        lab.add_nat("nat", NatKind.CONE)
        lab.add_host("h", behind="nat")
        # Ignores SIGTERM, so it takes the SIGKILL after the grace period.
        stubborn = lab.popen(
            "h", [sys.executable, "-c", "import signal, time\n"
                  "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(flush=True)\n"
                  "time.sleep(600)"], stdout=subprocess.PIPE,
        )  # fmt: skip
        assert stubborn.stdout is not None
        stubborn.stdout.readline()
        created = lab.netns
        assert lab.exec("h", ["ip", "-o", "-4", "addr", "show", "eth0"]).stdout.split()[3] == (
            b"10.0.1.10/24"
        )

    assert stubborn.returncode == -9
    assert not set(created) & set(list_netns())
    assert _root_state() == before


async def test_failing_commands_raise_with_the_command_and_its_stderr(lab: NetLab) -> None:
    lab.add_public_host("pub")

    with pytest.raises(NetLabError, match="exited 3: boom") as caught:
        lab.exec("pub", ["sh", "-c", "echo boom >&2; exit 3"])
    assert caught.value.argv[-3:] == ("sh", "-c", "echo boom >&2; exit 3")
    assert caught.value.stderr == "boom"
    with pytest.raises(NetLabError, match="no-such-program") as caught:
        lab.exec("pub", ["no-such-program"])
    assert "No such file or directory" in caught.value.stderr
    with pytest.raises(NetLabError, match=r"no exit in 0\.2 s"):
        lab.exec("pub", ["sleep", "5"], timeout=0.2)
    assert lab.exec("pub", ["false"], check=False).returncode == 1
    with pytest.raises(ValueError, match="already exists"):
        lab.add_public_host("pub")
    with pytest.raises(ValueError, match="not a NAT"):
        lab.add_host("h", behind="pub")


def test_without_privileges_the_lab_fails_loudly() -> None:
    # Root without capabilities: ``ip netns add`` is refused, and NetLab says so.
    script = "from tools.lab.netns import NetLab\nNetLab(prefix='elabnocap').open()"
    done = subprocess.run(
        ["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-c", script],
        cwd=ROOT, capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    stderr = done.stderr.decode()
    assert done.returncode != 0
    assert "NetLabError: ip netns add elabnocap-" in stderr, stderr
    assert "not permitted" in stderr, stderr
    assert not [n for n in list_netns() if n.startswith("elabnocap-")]


def test_namespaces_of_dead_labs_are_deleted() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = f"elabstale-{gone.pid}-abcd-h1"
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=10)
    try:
        mine = f"elabstale-{os.getpid()}-abcd-h1"
        subprocess.run(["ip", "netns", "add", mine], check=True, timeout=10)
        try:
            with NetLab(prefix="elabstale"):
                names = list_netns()
            assert stale not in names
            assert mine in names
        finally:
            subprocess.run(["ip", "netns", "delete", mine], check=True, timeout=10)
    finally:
        if stale in list_netns():
            subprocess.run(["ip", "netns", "delete", stale], check=True, timeout=10)
