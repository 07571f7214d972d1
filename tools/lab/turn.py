"""A real coturn (``turnserver``) for tests, benchmarks and the demo.

``with Coturn.running() as turn:`` writes the relay's hardened config
(``cloud_relay.turn.coturn_config``: TURN REST auth with a random shared secret, no
TLS, no CLI, private and loopback peers denied) into a temp dir, lets through only the
test network the daemon listens on (by default), starts it, waits until it answers on
UDP and TCP, and stops it on exit. ``turn.turn_server()`` gives an
``agent.net.ice.TurnServer`` with freshly minted credentials. coturn ignores an option
it does not know, with a warning in its log; here that warning is an error.

With ``argv_prefix`` (e.g. ``("ip", "netns", "exec", "pub")``) the daemon runs
inside a network namespace; since its addresses may not be reachable from here,
readiness then comes from its log unless ``probe=True``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from agent.net.ice import IceServer, TurnCredentials, TurnServer, mint_turn_credentials
from cloud_relay.turn import TurnSettings, coturn_config

logger = logging.getLogger(__name__)

_STUN_COOKIE = 0x2112A442
_BIND_RETRIES = 3


class CoturnError(RuntimeError):
    """turnserver failed to start or died; the message ends with its log."""


class _PortTaken(CoturnError):
    pass


def lab_networks(listen: Sequence[str]) -> tuple[str, ...]:
    """The networks of the listening addresses, where the lab's peers are: a loopback
    address by itself, else its /24 (IPv4) or /64 (IPv6)."""
    networks: list[str] = []
    for host in listen:
        address = ipaddress.ip_address(host)
        prefix = (
            address.max_prefixlen if address.is_loopback else (24 if address.version == 4 else 64)
        )
        network = str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
        if network not in networks:
            networks.append(network)
    return tuple(networks)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(hosts: Sequence[str] = ("127.0.0.1",)) -> int:
    """A port free for both UDP and TCP on the wildcard address of each host's family.

    The sockets are closed before the daemon binds, so another process may take the
    port meanwhile: ``Coturn.running`` retries with a new port when that happens.
    """
    families = sorted({_family(h) for h in hosts})
    for _ in range(100):
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(socket.socket(families[0], socket.SOCK_DGRAM))
            first.bind(("::" if families[0] == socket.AF_INET6 else "0.0.0.0", 0))
            port: int = first.getsockname()[1]
            try:
                for family in families:
                    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
                    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                        if family == families[0] and kind == socket.SOCK_DGRAM:
                            continue
                        s = stack.enter_context(socket.socket(family, kind))
                        if family == socket.AF_INET6:
                            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                        s.bind((wildcard, port))
            except OSError:
                continue
            return port
    raise CoturnError("no free port for both UDP and TCP")


def _stun_probe(host: str, port: int, timeout: float) -> bool:
    """True if a STUN Binding request over UDP gets a success response."""
    transaction = secrets.token_bytes(12)
    request = struct.pack("!HHI12s", 0x0001, 0, _STUN_COOKIE, transaction)
    with socket.socket(_family(host), socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(request, (host, port))
            data = s.recv(2048)
        except OSError:
            return False
    return len(data) >= 20 and data[0:2] == b"\x01\x01" and data[8:20] == transaction


def _tcp_probe(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Coturn:
    """A running turnserver; create with ``Coturn.running(...)``."""

    def __init__(
        self,
        root: Path,
        process: subprocess.Popen[bytes],
        *,
        secret: str,
        realm: str,
        listen: tuple[str, ...],
        port: int,
    ) -> None:
        self.root = root
        self.process = process
        self.secret = secret
        """The ``static-auth-secret`` (TURN REST shared secret)."""
        self.realm = realm
        self.listen = listen
        self.port = port

    @property
    def host(self) -> str:
        """The first listening address."""
        return self.listen[0]

    @property
    def log_path(self) -> Path:
        return self.root / "turn.log"

    def log_tail(self, lines: int = 40) -> str:
        """The end of the daemon's log and of its stdout/stderr."""
        parts = []
        for path in (self.log_path, self.root / "turnserver.out"):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()
                parts.append(f"--- {path.name}\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)

    def credentials(self, user: str = "lab", ttl: float = 600.0) -> TurnCredentials:
        """TURN REST credentials as the relay would mint them for an agent."""
        return mint_turn_credentials(self.secret, user, ttl)

    def turn_server(
        self,
        transport: Literal["udp", "tcp"] = "udp",
        *,
        user: str = "lab",
        ttl: float = 600.0,
        shared_secret: bool = False,
    ) -> TurnServer:
        """This server as agent config: minted credentials, or the shared secret itself."""
        if shared_secret:
            return TurnServer(
                self.host, self.port, transport, shared_secret=self.secret, rest_user=user
            )
        creds = self.credentials(user, ttl)
        return TurnServer(
            self.host, self.port, transport, username=creds.username, password=creds.password
        )

    def stun_server(self) -> IceServer:
        return IceServer(self.host, self.port)

    @classmethod
    @contextlib.contextmanager
    def running(
        cls,
        *,
        listen: Sequence[str] = ("127.0.0.1",),
        port: int = 0,
        relay_ip: str | None = None,
        relay_ports: tuple[int, int] = (49152, 65535),
        external_ip: str | None = None,
        realm: str = "edge.test",
        secret: str | None = None,
        user_quota: int = 100,
        total_quota: int = 1000,
        allowed_peers: Sequence[str] | None = None,
        denied_peers: Sequence[str] = (),
        tls: tuple[Path, Path] | None = None,
        argv_prefix: Sequence[str] = (),
        probe: bool | None = None,
        extra: Sequence[str] = (),
        timeout: float = 10.0,
        root: Path | None = None,
    ) -> Iterator[Coturn]:
        """Start turnserver, wait until it answers, and stop it on exit.

        ``port`` 0 picks a free one (UDP and TCP listen on the same port); the relay
        address defaults to the first listening address. ``allowed_peers`` are the
        networks (``10.0.1.0/24``, ``127.0.0.1``) coturn may relay to despite its
        denylist, by default ``lab_networks(listen)``; ``denied_peers`` are denied on
        top. ``user_quota`` and ``total_quota`` bound concurrent allocations (the
        lab's are generous: tests share one user name). ``tls`` is a (certificate,
        key) pair, without it TLS and DTLS are off. ``extra`` lines go
        into the config as they are. ``probe`` (default: unless ``argv_prefix``)
        waits for a STUN answer over UDP and a TCP connection instead of just the
        log's "listener opened" lines.
        """
        if not listen:
            raise ValueError("coturn needs a listening address")
        made_root = root is None
        root = Path(tempfile.mkdtemp(prefix="edge-coturn-")) if root is None else root
        secret = secrets.token_hex(16) if secret is None else secret
        settings = TurnSettings(realm=realm, user_quota=user_quota, total_quota=total_quota)
        allowed = lab_networks(listen) if allowed_peers is None else tuple(allowed_peers)
        probe = not argv_prefix if probe is None else probe
        try:
            for attempt in range(_BIND_RETRIES if port == 0 else 1):
                chosen = port or free_port(listen)
                conf = cls._write_config(
                    root, chosen, listen=tuple(listen), relay_ip=relay_ip or listen[0],
                    relay_ports=relay_ports, external_ip=external_ip, settings=settings,
                    secret=secret, allowed_peers=allowed, denied_peers=tuple(denied_peers),
                    tls=tls, extra=tuple(extra),
                )  # fmt: skip
                try:
                    with cls._process(root, conf, argv_prefix) as process:
                        server = cls(
                            root, process, secret=secret, realm=realm, listen=tuple(listen),
                            port=chosen,
                        )  # fmt: skip
                        server._wait_ready(time.monotonic() + timeout, probe)
                        logger.info("coturn ready on %s port %d", ",".join(listen), chosen)
                        yield server
                        return
                except _PortTaken:
                    if attempt + 1 >= _BIND_RETRIES or port != 0:
                        raise
                    logger.info("coturn port %d was taken meanwhile, trying another", chosen)
        finally:
            if made_root:
                shutil.rmtree(root, ignore_errors=True)

    @staticmethod
    def _write_config(
        root: Path,
        port: int,
        *,
        listen: tuple[str, ...],
        relay_ip: str,
        relay_ports: tuple[int, int],
        external_ip: str | None,
        settings: TurnSettings,
        secret: str,
        allowed_peers: tuple[str, ...],
        denied_peers: tuple[str, ...],
        tls: tuple[Path, Path] | None,
        extra: tuple[str, ...],
    ) -> Path:
        text = coturn_config(
            settings, secret, listen=listen, port=port, relay_ip=relay_ip,
            relay_ports=relay_ports, external_ip=external_ip, allowed_peers=allowed_peers,
            denied_peers=denied_peers, tls=tls,
            tls_port=free_port(listen) if tls is not None else 5349,
        )  # fmt: skip
        lines = [
            "verbose",  # logs "listener opened", which readiness without probing needs
            f"log-file={root / 'turn.log'}",
            "simple-log",  # exactly that file name, no rotation
            f"pidfile={root / 'turn.pid'}",
            f"userdb={root / 'turndb'}",
            *extra,
        ]
        conf = root / "turnserver.conf"
        conf.write_text(text + "\n".join(lines) + "\n")
        conf.chmod(0o600)  # holds the secret
        return conf

    @staticmethod
    @contextlib.contextmanager
    def _process(
        root: Path, conf: Path, argv_prefix: Sequence[str]
    ) -> Iterator[subprocess.Popen[bytes]]:
        (root / "turn.log").unlink(missing_ok=True)
        with (root / "turnserver.out").open("wb") as out:
            process = subprocess.Popen(
                [*argv_prefix, "turnserver", "-c", str(conf)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _wait_ready(self, deadline: float, probe: bool) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CoturnError(
                    f"turnserver exited with {self.process.returncode}\n{self.log_tail()}"
                )
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            if any("Cannot bind" in line and f":{self.port}" in line for line in log.splitlines()):
                raise _PortTaken(f"turnserver cannot bind port {self.port}\n{self.log_tail()}")
            if "Bad configuration format" in log:
                raise CoturnError(f"turnserver ignored config lines\n{self.log_tail()}")
            if self._ready(log, probe):
                return
            time.sleep(0.05)
        raise CoturnError(f"turnserver not ready in time\n{self.log_tail()}")

    def _ready(self, log: str, probe: bool) -> bool:
        if probe:
            return all(
                _stun_probe(ip, self.port, 0.2) and _tcp_probe(ip, self.port, 0.2)
                for ip in self.listen
            )
        return all(
            f"UDP listener opened on: {ip}:{self.port}" in log
            and f"TCP listener opened on : {ip}:{self.port}" in log
            for ip in self.listen
        )
