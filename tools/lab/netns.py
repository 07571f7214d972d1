"""Real NAT topologies in Linux network namespaces, for NAT-traversal (ICE) tests.

Every node is a network namespace; packets cross real veths, bridges, routing tables and
conntrack NAT, so an ICE agent run inside a host sees what it would see behind a home router.
A lab is one ``NetLab``; its namespaces are named ``elab-<pid>-<random>-<node>``, so labs run
in parallel never clash, and the leftovers of a crashed run (whose pid is gone) are deleted
when the next lab starts. Addresses are the same in every lab::

    public hosts              internet ("inet" namespace)          NAT routers
    pub  eth0 203.0.113.10 ─┐                              ┌─ wan0 203.0.113.101  nat1
    pub2 eth0 203.0.113.11 ─┼── br0 bridge 203.0.113.1/24 ─┼─ wan0 203.0.113.102  nat2
                            ...                            ...

    NAT router nat<K> (K = 1, 2, ... in the order they were added)     hosts behind it
    lan0 bridge 10.0.K.1/24 ──┬─ eth0 10.0.K.10  (first host added behind nat<K>)
                              └─ eth0 10.0.K.11  ...

- The public network is one flat 203.0.113.0/24 (TEST-NET-3) segment: a bridge in the
  "inet" namespace, which also holds 203.0.113.1, the default gateway of every public host
  and NAT router. It has no route to any private network, so a packet sent to another LAN's
  private address dies there ("network unreachable"), as it would on the internet.
- Each NAT router has ``wan0`` on the public bridge and a bridge ``lan0`` for its LAN; each
  host behind it has one ``eth0`` on that bridge and a default route via 10.0.K.1.
- Only the routers forward (``ip_forward=1``). IPv6 is off in every lab namespace, so agents see
  exactly one IPv4 address per host; reverse-path filtering is off (there is one path to
  everywhere, so it could not change anything; setting it makes the lab independent of the
  machine's defaults). Loopback is up in every namespace.
- Every router runs the same firewall as a home router: on ``wan0`` it accepts only packets
  of connections opened from inside (conntrack ESTABLISHED/RELATED), in INPUT and FORWARD,
  and drops the rest *silently*. Dropping in INPUT matters for hole punching: a peer's first
  punch arriving before our own leaves no conntrack entry behind, so it cannot steal the
  mapping our own punch is about to need (with an ACCEPT there instead, hole punching
  between two ``CONE`` NATs fails). See ``NatKind`` for the NAT itself.

Nothing is created in the root namespace: veths are created directly inside their two
namespaces and every iptables rule lives in a router's namespace, so deleting the namespaces
removes them all. Teardown first stops every process found in a lab namespace (SIGTERM, then
SIGKILL after a grace period: a namespace with processes in it outlives its name), then
deletes the namespaces; it runs on every exit, exceptions included. Processes started with
``spawn`` are reaped by ``async with`` (``aclose``); a plain ``with`` only kills them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from tools.lab.procs import alive

logger = logging.getLogger(__name__)

PUBLIC_NETWORK = "203.0.113.0/24"
INTERNET_GATEWAY = "203.0.113.1"
"""The "inet" namespace's address: default gateway of public hosts and NAT routers."""

_NAME = re.compile(r"[a-z][a-z0-9]{0,11}")
_RESERVED = frozenset({"inet"})
_MAX_NATS = 150  # WAN addresses 203.0.113.101..250
_MAX_PUBLIC_HOSTS = 90  # 203.0.113.10..99
_MAX_LAN_HOSTS = 240  # 10.0.K.10..249


class NetLabError(RuntimeError):
    """The lab could not be built or torn down, or a command in it failed."""

    def __init__(self, message: str, argv: Sequence[str] = (), stderr: str = "") -> None:
        super().__init__(message)
        self.argv = tuple(argv)
        """The command that failed, if one did."""
        self.stderr = stderr
        """What it wrote to stderr."""


class NatKind(enum.Enum):
    """What a NAT router does to traffic from its LAN (RFC 4787 terms).

    All kinds share Linux conntrack's *filtering*: an inbound packet is let in only if it
    matches a flow opened from inside on its remote address **and** port, so this is
    address-and-port-dependent filtering (a "port-restricted" NAT), not merely
    address-dependent. Mappings live as long as a flow of theirs does in conntrack: 30 s
    after the last packet while unanswered, 120 s once answered (the kernel's defaults).
    None of them hairpins: a LAN host cannot reach a neighbour through the public address.
    """

    CONE = "cone"
    """``MASQUERADE``: endpoint-independent mapping, port preserved. The first flow of a
    LAN socket keeps its local port on the public address if that port is free; later flows
    of the same socket reuse that mapping (conntrack looks mappings up by internal source),
    so one socket shows one public ``ip:port`` to every destination: what STUN
    server-reflexive candidates and UDP hole punching need. A second LAN host on the same
    local port gets another port, again one for all destinations. The mapping changes only
    if reusing it would clash with another flow to the same destination."""

    SYMMETRIC = "symmetric"
    """``MASQUERADE --random-fully``: address-and-port-dependent mapping. Every new
    destination ``ip:port`` gets a fresh random public port, so the mapping a STUN server
    reports is useless to any other peer. With the filtering above, no peer behind any NAT
    of this lab can punch through to it: only a public host or a TURN relay reaches it."""

    BLOCK_UDP = "block-udp"
    """``CONE`` for TCP, and every UDP packet from the LAN to the outside dropped, like a
    firewall that only lets TCP out: ICE must fall back to TURN over TCP (or TLS)."""


@dataclass(frozen=True, slots=True)
class Node:
    """A host: on the public network or on a NAT's LAN."""

    name: str
    netns: str
    """The namespace's real name, for ``ip netns exec`` or ``nsenter`` by hand."""
    address: str
    """Its only IPv4 address: public for a public host, private behind a NAT."""
    gateway: str
    """Its default route."""
    nat: str | None
    """The NAT router it is behind; ``None`` on the public network."""


@dataclass(frozen=True, slots=True)
class Nat:
    """A NAT router between the public network and one private LAN."""

    name: str
    netns: str
    kind: NatKind
    public_address: str
    """Its ``wan0`` address: the address hosts behind it are seen from."""
    lan_address: str
    """Its ``lan0`` address: the LAN's default gateway."""
    lan_network: str
    """The LAN, e.g. ``10.0.1.0/24``."""


@dataclass(frozen=True, slots=True)
class TwoNats:
    """The usual ICE topology: ``h1`` behind ``nat1``, ``h2`` behind ``nat2``, and ``pub``."""

    public: Node
    nat1: Nat
    nat2: Nat
    h1: Node
    h2: Node


def _command_error(argv: Sequence[str], returncode: int, stderr: bytes | None) -> NetLabError:
    text = (stderr or b"").decode(errors="replace").strip()
    message = f"{shlex.join(argv)} exited {returncode}"
    return NetLabError(f"{message}: {text}" if text else message, argv, text)


def _run(argv: Sequence[str], timeout: float, input: bytes | None = None) -> str:
    """Run a lab command to completion; any failure is a ``NetLabError`` naming it."""
    logger.debug("netns: %s", shlex.join(argv))
    try:
        done = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise NetLabError(f"{shlex.join(argv)}: no exit in {timeout} s", argv) from e
    except OSError as e:
        raise NetLabError(f"{shlex.join(argv)}: {e}", argv) from e
    if done.returncode != 0:
        raise _command_error(argv, done.returncode, done.stderr)
    return done.stdout.decode()


def check_environment() -> None:
    """Raise ``NetLabError`` unless this process can build labs (root, iproute2, iptables)."""
    tools = {"ip": "iproute2", "iptables-restore": "iptables", "sysctl": "procps"}
    missing = [f"{tool} ({package})" for tool, package in tools.items() if not shutil.which(tool)]
    if missing:
        raise NetLabError(f"NetLab needs {', '.join(missing)} on PATH")
    if os.geteuid() != 0:
        raise NetLabError(
            "NetLab needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) to create network namespaces"
        )


def list_netns(timeout: float = 10.0) -> list[str]:
    """Names of the namespaces ``ip netns`` knows (the files in ``/run/netns``)."""
    return [line.split()[0] for line in _run(["ip", "netns", "list"], timeout).splitlines()]


def _netns_inode(netns: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{netns}").st_ino
    except FileNotFoundError:
        return None


def _pids_in(netns: Sequence[str]) -> list[int]:
    """Live processes in any of these namespaces (what ``ip netns pids`` finds; not zombies)."""
    inodes = {i for i in map(_netns_inode, netns) if i is not None}
    if not inodes:
        return []
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry.name}/ns/net").st_ino in inodes:
                    pids.append(int(entry.name))
    return pids


def _signal(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _stop_processes(netns: Sequence[str], grace: float, timeout: float) -> list[int]:
    """SIGTERM everything in the namespaces, SIGKILL what is left after ``grace``.

    Returns the pids still there after ``timeout`` more seconds (normally none).
    """
    _signal(_pids_in(netns), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (left := _pids_in(netns)) and time.monotonic() < deadline:
        time.sleep(0.01)
    if not left:
        return []
    logger.debug("netns: killing %s, still alive after SIGTERM", left)
    deadline = time.monotonic() + timeout
    while (left := _pids_in(netns)) and time.monotonic() < deadline:
        _signal(left, signal.SIGKILL)
        time.sleep(0.01)
    return left


def reap_stale(prefix: str = "elab", timeout: float = 10.0) -> list[str]:
    """Delete namespaces left by labs whose process is gone (a crash, a SIGKILL).

    Returns their names. Labs of live processes, this one's included, are left alone (pids
    are read in this PID namespace, like the ones in the names).
    """
    stale_name = re.compile(rf"{re.escape(prefix)}-(\d+)-[0-9a-f]{{4}}-")
    stale = []
    for name in list_netns(timeout):
        m = stale_name.match(name)
        if m and not alive(int(m[1])):
            stale.append(name)
    if stale:
        logger.info("netns: deleting stale namespaces %s", stale)
        _stop_processes(stale, grace=0.0, timeout=timeout)
        for name in stale:
            _run(["ip", "netns", "delete", name], timeout)
    return stale


class NetLab:
    """A set of namespaces forming a NAT topology; ``with`` or ``async with NetLab() as lab``.

    Build it with ``add_public_host``, ``add_nat`` and ``add_host`` (or ``two_nats``), then
    run programs in nodes with ``exec`` (to completion), ``popen`` or ``spawn`` (in the
    background; stopped on exit). Nodes are named by their short names (``"h1"``).

    ``timeout`` bounds each setup and teardown command; ``grace`` is how long processes get
    between SIGTERM and SIGKILL at teardown.
    """

    def __init__(
        self, prefix: str = "elab", timeout: float = 10.0, grace: float = 1.0, reap: bool = True
    ) -> None:
        self.prefix, self.timeout, self.grace, self.reap = prefix, timeout, grace, reap
        self._stem = f"{prefix}-{os.getpid()}-{secrets.token_hex(2)}"
        self._created: list[str] = []
        self._nodes: dict[str, Node | Nat] = {}
        self._lan_hosts: dict[str, int] = {}
        self._public_hosts = 0
        self._ports = 0
        self._popen: list[subprocess.Popen[bytes]] = []
        self._spawned: list[asyncio.subprocess.Process] = []
        self._open = False
        self._used = False

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> NetLab:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(raise_errors=exc is None)

    async def __aenter__(self) -> NetLab:
        self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose(raise_errors=exc is None)

    def open(self) -> None:
        """Check the environment and create the public network (the "inet" namespace)."""
        if self._used:
            raise NetLabError("a NetLab opens once; make a new one")
        self._used = True
        check_environment()
        if self.reap:
            reap_stale(self.prefix, self.timeout)
        self._open = True
        try:
            inet = self._new_netns("inet", forward=False)
            self._ip(inet, "link", "add", "br0", "type", "bridge")
            self._ip(inet, "addr", "add", f"{INTERNET_GATEWAY}/24", "dev", "br0")
            self._ip(inet, "link", "set", "br0", "up")
        except BaseException:
            self.close(raise_errors=False)
            raise

    def close(self, raise_errors: bool = True) -> None:
        """Stop every process in the lab and delete its namespaces (with their veths, rules)."""
        if not self._open:
            return
        self._open = False
        errors: list[str] = []
        left = _stop_processes(self._created, self.grace, self.timeout)
        if left:
            errors.append(f"processes {left} would not die")
        for proc in self._popen:
            try:
                proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                errors.append(f"{proc.args!r} did not exit")
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        for netns in reversed(self._created):
            try:
                _run(["ip", "netns", "delete", netns], self.timeout)
            except NetLabError as e:
                errors.append(str(e))
        self._created.clear()
        if errors:
            message = f"NetLab teardown: {'; '.join(errors)}"
            if raise_errors:
                raise NetLabError(message)
            logger.error("%s", message)

    async def aclose(self, raise_errors: bool = True) -> None:
        """``close``, and reap the processes ``spawn`` started (asyncio must see them exit)."""
        if self._open and self._spawned:
            _signal([p.pid for p in self._spawned if p.returncode is None], signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.grace):
                    await asyncio.gather(*(p.wait() for p in self._spawned))
        self.close(raise_errors)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.timeout):
                await asyncio.gather(*(p.wait() for p in self._spawned))

    # -- building ---------------------------------------------------------------------------

    def add_public_host(self, name: str) -> Node:
        """A host on the public network: 203.0.113.10, .11, ... in the order added."""
        self._check_new(name)
        if self._public_hosts >= _MAX_PUBLIC_HOSTS:
            raise NetLabError(f"no public address left for {name!r}")
        address = f"203.0.113.{10 + self._public_hosts}"
        self._public_hosts += 1
        netns = self._new_netns(name, forward=False)
        self._uplink(netns, "eth0", address)
        node = Node(name, netns, address, INTERNET_GATEWAY, None)
        self._nodes[name] = node
        return node

    def add_nat(self, name: str, kind: NatKind = NatKind.CONE) -> Nat:
        """A NAT router: the K-th one added is 203.0.113.(100+K) outside, 10.0.K.1 inside."""
        self._check_new(name)
        k = len(self._lan_hosts) + 1
        if k > _MAX_NATS:
            raise NetLabError(f"no public address left for {name!r}")
        netns = self._new_netns(name, forward=True)
        public = f"203.0.113.{100 + k}"
        self._uplink(netns, "wan0", public)
        lan_address = f"10.0.{k}.1"
        self._ip(netns, "link", "add", "lan0", "type", "bridge")
        self._ip(netns, "addr", "add", f"{lan_address}/24", "dev", "lan0")
        self._ip(netns, "link", "set", "lan0", "up")
        _run(
            ["ip", "netns", "exec", netns, "iptables-restore", "-w", str(int(self.timeout))],
            self.timeout,
            input=_firewall(kind).encode(),
        )
        nat = Nat(name, netns, kind, public, lan_address, f"10.0.{k}.0/24")
        self._nodes[name] = nat
        self._lan_hosts[name] = 0
        return nat

    def add_host(self, name: str, behind: str) -> Node:
        """A host on NAT ``behind``'s LAN: 10.0.K.10, .11, ... in the order added."""
        self._check_new(name)
        nat = self.node(behind)
        if not isinstance(nat, Nat):
            raise ValueError(f"{behind!r} is not a NAT")
        j = self._lan_hosts[behind]
        if j >= _MAX_LAN_HOSTS:
            raise NetLabError(f"no address left on {nat.lan_network} for {name!r}")
        self._lan_hosts[behind] = j + 1
        address = f"{nat.lan_network.rsplit('.', 1)[0]}.{10 + j}"
        netns = self._new_netns(name, forward=False)
        self._veth(netns, "eth0", nat.netns, "lan0")
        self._ip(netns, "addr", "add", f"{address}/24", "dev", "eth0")
        self._ip(netns, "link", "set", "eth0", "up")
        self._ip(netns, "route", "add", "default", "via", nat.lan_address)
        node = Node(name, netns, address, nat.lan_address, behind)
        self._nodes[name] = node
        return node

    def two_nats(self, kind1: NatKind = NatKind.CONE, kind2: NatKind = NatKind.CONE) -> TwoNats:
        """Public host ``pub``; ``h1`` behind ``nat1`` (``kind1``), ``h2`` behind ``nat2``."""
        public = self.add_public_host("pub")
        nat1, nat2 = self.add_nat("nat1", kind1), self.add_nat("nat2", kind2)
        h1, h2 = self.add_host("h1", behind="nat1"), self.add_host("h2", behind="nat2")
        return TwoNats(public, nat1, nat2, h1, h2)

    # -- looking up -------------------------------------------------------------------------

    def node(self, name: str) -> Node | Nat:
        try:
            return self._nodes[name]
        except KeyError:
            raise ValueError(f"no node {name!r} in this lab") from None

    def address(self, name: str) -> str:
        """A host's address, or a NAT's public address."""
        node = self.node(name)
        return node.public_address if isinstance(node, Nat) else node.address

    @property
    def netns(self) -> list[str]:
        """Real names of every namespace of this lab that still exists, "inet" included."""
        return list(self._created)

    # -- running ----------------------------------------------------------------------------

    def command(self, name: str, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run in node ``name``: ``ip netns exec <netns> argv...``."""
        if not self._open:
            raise NetLabError("the lab is closed")
        return ["ip", "netns", "exec", self.node(name).netns, *argv]

    def exec(
        self,
        name: str,
        argv: Sequence[str],
        *,
        timeout: float = 30.0,
        check: bool = True,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` in node ``name`` to completion (``subprocess.run`` keywords).

        stdout and stderr are captured unless given. A non-zero exit (with ``check``) or no
        exit within ``timeout`` (the process is killed) raises ``NetLabError``.
        """
        cmd = self.command(name, argv)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        try:
            done: subprocess.CompletedProcess[bytes] = subprocess.run(
                cmd, timeout=timeout, check=False, **kwargs
            )
        except subprocess.TimeoutExpired as e:
            raise NetLabError(f"{name}: {shlex.join(argv)}: no exit in {timeout} s", cmd) from e
        if check and done.returncode != 0:
            error = _command_error(cmd, done.returncode, done.stderr)
            raise NetLabError(f"{name}: {error}", cmd, error.stderr)
        return done

    def popen(self, name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` in node ``name`` (``subprocess.Popen`` keywords).

        On exit it is stopped, reaped, and its pipes are closed.
        """
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.command(name, argv), **kwargs)
        self._popen.append(proc)
        return proc

    async def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        env: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> asyncio.subprocess.Process:
        """Start ``argv`` in node ``name`` as an asyncio subprocess; stopped on exit.

        ``stdin``/``stdout``/``stderr`` take ``asyncio.subprocess.PIPE`` and friends.
        """
        proc = await asyncio.create_subprocess_exec(
            *self.command(name, argv), stdin=stdin, stdout=stdout, stderr=stderr, env=env,
            **kwargs,
        )  # fmt: skip
        self._spawned.append(proc)
        return proc

    # -- internals --------------------------------------------------------------------------

    def _check_new(self, name: str) -> None:
        if not self._open:
            raise NetLabError("the lab is closed")
        if not _NAME.fullmatch(name) or name in _RESERVED:
            raise ValueError(f"node name {name!r}: want [a-z][a-z0-9]{{0,11}}, not 'inet'")
        if name in self._nodes:
            raise ValueError(f"node {name!r} already exists")

    def _ip(self, netns: str, *args: str) -> None:
        _run(["ip", "-n", netns, *args], self.timeout)

    def _new_netns(self, name: str, forward: bool) -> str:
        netns = f"{self._stem}-{name}"
        _run(["ip", "netns", "add", netns], self.timeout)
        self._created.append(netns)
        settings = {
            "net.ipv6.conf.all.disable_ipv6": 1,
            "net.ipv6.conf.default.disable_ipv6": 1,
            "net.ipv4.ip_forward": int(forward),
            "net.ipv4.conf.all.rp_filter": 0,
            "net.ipv4.conf.default.rp_filter": 0,
        }
        sysctl = ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())]
        _run(["ip", "netns", "exec", netns, *sysctl], self.timeout)
        self._ip(netns, "link", "set", "lo", "up")
        return netns

    def _veth(self, netns: str, ifname: str, switch_netns: str, bridge: str) -> None:
        """A veth ``ifname`` in ``netns`` whose other end is a port of ``bridge``."""
        port = f"port{self._ports}"
        self._ports += 1
        self._ip(netns, "link", "add", ifname, "type", "veth", "peer", "name", port,
                 "netns", switch_netns)  # fmt: skip
        self._ip(switch_netns, "link", "set", port, "master", bridge, "up")

    def _uplink(self, netns: str, ifname: str, address: str) -> None:
        """Connect ``netns`` to the public network as ``address``, default route via inet."""
        self._veth(netns, ifname, self._created[0], "br0")
        self._ip(netns, "addr", "add", f"{address}/24", "dev", ifname)
        self._ip(netns, "link", "set", ifname, "up")
        self._ip(netns, "route", "add", "default", "via", INTERNET_GATEWAY)


def _firewall(kind: NatKind) -> str:
    """The ``iptables-restore`` input of a NAT router of this kind."""
    masquerade = "-j MASQUERADE --random-fully" if kind is NatKind.SYMMETRIC else "-j MASQUERADE"
    block_udp = ["-A FORWARD -o wan0 -p udp -j DROP"] if kind is NatKind.BLOCK_UDP else []
    lines = [
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        "-A INPUT -i wan0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A INPUT -i wan0 -j DROP",
        *block_udp,
        "-A FORWARD -i wan0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A FORWARD -i wan0 -j DROP",
        "COMMIT",
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        f"-A POSTROUTING -o wan0 {masquerade}",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"
