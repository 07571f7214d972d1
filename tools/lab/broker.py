"""A real mosquitto broker for tests, benchmarks and the demo.

``with Mosquitto.running() as broker:`` writes a config into a temp dir (one
loopback listener, anonymous access, persistence in that dir, logging to a file),
starts the Debian ``mosquitto``, waits until it accepts TCP connections, and stops
it on exit. ``broker.restart()`` (graceful or with SIGKILL) and ``broker.stop()``
/ ``broker.start()`` are for fault tests; the port stays the same.

With ``tls`` it is the relay's secured listener (``cloud_relay.broker.BrokerTls``); a
``tls.relay`` listener with port 0 gets a free port. ``await broker.apply_revocations(ids)``
does what the embedded broker does after a revocation (SIGHUP, then the revoked devices'
sessions ended from the relay listener; a restart without one).

Errors (``BrokerError``) end with the tail of the broker's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from cloud_relay.broker import (
    REVOCATION_TIMEOUT,
    BrokerError,
    BrokerFiles,
    BrokerTls,
    mosquitto_config,
    revoke_sessions,
)

_PORT_RETRIES = 3


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _tcp_probe(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _with_relay_port(tls: BrokerTls | None) -> BrokerTls | None:
    """``tls`` with a free port for a relay listener asking for port 0."""
    if tls is None or tls.relay is None or tls.relay.port:
        return tls
    return replace(tls, relay=replace(tls.relay, port=_free_port("127.0.0.1")))


class Mosquitto(BrokerFiles):
    """A mosquitto process; create with ``Mosquitto.running(...)``."""

    def __init__(
        self,
        root: Path,
        *,
        host: str,
        port: int,
        extra: Sequence[str],
        timeout: float,
        tls: BrokerTls | None = None,
    ) -> None:
        self.root = root
        self.host = host
        self.port = port
        self.timeout = timeout
        self.tls = tls
        self._extra = tuple(extra)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def persistence_dir(self) -> Path:
        return self.root / "data"

    def log_tail(self, lines: int = 40) -> str:
        """The end of the broker's log file and of its stdout/stderr."""
        parts = []
        for path in (self.log_path, self.root / "mosquitto.out"):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()
                parts.append(f"--- {path.name}\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)

    def _write_config(self) -> None:
        self.persistence_dir.mkdir(parents=True, exist_ok=True)
        text = mosquitto_config(
            host=self.host,
            port=self.port,
            persistence_dir=self.persistence_dir,
            log_path=self.log_path,
            autosave_interval=None,
            tls=self.tls,
            extra=self._extra,
        )
        self.config_path.write_text(text)

    @property
    def running_now(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start mosquitto with the config and wait until it accepts connections."""
        if self.running_now:
            raise BrokerError("mosquitto is already running")
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise BrokerError("mosquitto not installed (apt-get install mosquitto)")
        self._write_config()
        with (self.root / "mosquitto.out").open("ab") as out:
            self.process = subprocess.Popen(
                [binary, "-c", str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(
                    f"mosquitto exited with {self.process.returncode}\n{self.log_tail()}"
                )
            if _tcp_probe(self.host, self.port):
                return
            time.sleep(0.02)
        self.stop(kill=True)
        raise BrokerError(f"mosquitto not listening after {self.timeout}s\n{self.log_tail()}")

    def stop(self, *, kill: bool = False) -> None:
        """Stop mosquitto: SIGTERM (it saves persistence) or, with ``kill``, SIGKILL."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        process.send_signal(signal.SIGCONT)  # in case it was paused
        try:
            process.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=self.timeout)

    async def apply_revocations(
        self, revoked: Collection[str], *, within: float = REVOCATION_TIMEOUT
    ) -> None:
        """After ``RelayPki.revoke``: as ``EmbeddedBroker.apply_revocations``."""
        if self.tls is None:
            raise RuntimeError("no TLS listener: nothing to revoke")
        if self.tls.relay is None:
            await asyncio.to_thread(self.restart)
            return
        if self.process is None or not self.running_now:
            raise BrokerError("mosquitto is not running")
        await revoke_sessions(
            self.process.pid, self.log_path, self.tls.relay, revoked, within=within
        )

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a silent network)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause``."""
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def restart(self, *, kill: bool = False) -> None:
        """Stop (gracefully or with SIGKILL) and start again on the same port."""
        self.stop(kill=kill)
        self.start()

    @classmethod
    @contextlib.contextmanager
    def running(
        cls,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        root: Path | None = None,
        extra: Sequence[str] = (),
        timeout: float = 10.0,
        tls: BrokerTls | None = None,
    ) -> Iterator[Mosquitto]:
        """Start mosquitto, wait until it accepts connections, and stop it on exit.

        ``port`` 0 picks a free one (retried if another process takes it first);
        ``root`` holds config, log and persistence (default: a temp dir, removed on
        exit); ``extra`` lines go into the config as they are; ``tls``: the secured
        listener (client certificates, CRL, ACL) instead of an anonymous one.
        """
        made_root = root is None
        root = Path(tempfile.mkdtemp(prefix="edge-mosquitto-")) if root is None else root
        broker: Mosquitto | None = None
        try:
            for attempt in range(_PORT_RETRIES):
                broker = cls(
                    root,
                    host=host,
                    port=port or _free_port(host),
                    extra=extra,
                    timeout=timeout,
                    tls=_with_relay_port(tls),
                )
                try:
                    broker.start()
                    break
                except BrokerError as exc:
                    in_use = "Address already in use" in str(exc)
                    if port or not in_use or attempt == _PORT_RETRIES - 1:
                        raise
            assert broker is not None
            yield broker
        finally:
            if broker is not None:
                broker.stop()
            if made_root:
                shutil.rmtree(root, ignore_errors=True)
