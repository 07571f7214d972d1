"""The embedded broker: a mosquitto child process the relay configures, starts and supervises.

``EmbeddedBroker.start()`` writes ``mosquitto.conf`` into its directory (one
listener, persistence there, log to ``mosquitto.log``), starts mosquitto and
waits until it accepts TCP connections. A supervisor task restarts it whenever
it exits, with exponential backoff (reset once it has stayed up for
``stable_after`` seconds). ``close()`` stops the supervisor, then mosquitto
(SIGTERM, SIGKILL after ``stop_timeout``). The current pid is in ``mosquitto.pid``.

Later: TLS listener with client certificates, ACL patterns, CRL reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from cloud_relay.config import BrokerSettings

logger = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """mosquitto could not be started; the text ends with its log."""


def mosquitto_config(
    *,
    host: str,
    port: int,
    persistence_dir: Path,
    log_path: Path,
    autosave_interval: int | None = 60,
    extra: Sequence[str] = (),
) -> str:
    """``mosquitto.conf`` text: one anonymous listener, persistence, a log file, ``extra`` lines.

    Tuned for signaling through a relay: no Nagle delay, and an in-flight window and
    queue per client that fit the relay's one session carrying every device's messages.

    ``autosave_interval`` None: persistence is saved only when mosquitto exits.
    """
    lines = [
        f"listener {port} {host}",
        "allow_anonymous true",
        # Started as root, mosquitto would switch to user "mosquitto", who cannot
        # write into our data dir; stay whoever runs us.
        f"user {getpass.getuser()}",
        # Signaling is small messages that must leave at once: without this, Nagle holds a
        # message back while an earlier one to the same client waits for its TCP ACK, which
        # the peer delays by up to 40 ms.
        "set_tcp_nodelay true",
        # The relay's one session receives every device's messages: at the default 20 in
        # flight and 1,000 queued, a burst (every device's retained presence after a
        # restart, thousands of calls) had mosquitto drop messages for it.
        "max_inflight_messages 1000",
        "max_queued_messages 100000",
        "persistence true",
        f"persistence_location {persistence_dir}/",
        *([] if autosave_interval is None else [f"autosave_interval {autosave_interval}"]),
        f"log_dest file {log_path}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp true",
        *extra,
    ]
    return "\n".join(lines) + "\n"


class BrokerFiles:
    """Where a mosquitto's generated config and its log live, under ``root``."""

    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.root / "mosquitto.log"


class EmbeddedBroker(BrokerFiles):
    def __init__(self, settings: BrokerSettings, root: Path) -> None:
        self.settings = settings
        self.root = root
        self.restarts = 0
        """Times the supervisor started mosquitto again after it died."""
        self._process: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def pid_path(self) -> Path:
        return self.root / "mosquitto.pid"

    @property
    def pid(self) -> int | None:
        process = self._process
        return None if process is None or process.returncode is not None else process.pid

    def config_text(self) -> str:
        return mosquitto_config(
            host=self.settings.host,
            port=self.settings.port,
            persistence_dir=self.root / "data",
            log_path=self.log_path,
        )

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def start(self) -> None:
        """Start mosquitto and its supervisor; ``BrokerError`` if it does not come up."""
        if self._supervisor is not None:
            raise RuntimeError("embedded broker already started")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "data").mkdir(exist_ok=True)
        self.config_path.write_text(self.config_text())
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="broker-supervisor")

    async def close(self) -> None:
        """Stop the supervisor and mosquitto; idempotent."""
        self._closing = True
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
            if (current := asyncio.current_task()) is not None and current.cancelling():
                raise asyncio.CancelledError
        await self._stop_process()

    async def _stop_process(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            async with asyncio.timeout(self.settings.stop_timeout):
                await process.wait()
        except TimeoutError:
            logger.warning("mosquitto (pid %d) ignored SIGTERM; killing it", process.pid)
            process.kill()
            await process.wait()
        self.pid_path.unlink(missing_ok=True)
        logger.info("embedded mosquitto stopped")

    async def _spawn(self) -> None:
        binary = shutil.which(self.settings.binary)
        if binary is None:
            raise BrokerError(f"mosquitto not found ({self.settings.binary!r})")
        # setpriv (util-linux, on every Debian) has the kernel SIGTERM the broker when the
        # relay dies, even by SIGKILL: an orphan would hold the port the next relay needs.
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig", "TERM"] if setpriv else []
        with (self.root / "mosquitto.out").open("ab") as out:
            process = await asyncio.create_subprocess_exec(
                *prefix,
                binary,
                "-c",
                str(self.config_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        self._process = process
        self.pid_path.write_text(f"{process.pid}\n")
        host, port = self.settings.endpoint()
        try:
            async with asyncio.timeout(self.settings.start_timeout):
                while not await _accepts(host, port):
                    if process.returncode is not None:
                        raise BrokerError(
                            f"mosquitto exited with {process.returncode}\n{self.log_tail()}"
                        )
                    await asyncio.sleep(0.05)
        except TimeoutError:
            await self._stop_process()
            raise BrokerError(
                f"mosquitto not listening on {host}:{port} after "
                f"{self.settings.start_timeout}s\n{self.log_tail()}"
            ) from None
        except BaseException:
            await self._stop_process()
            raise
        logger.info("embedded mosquitto (pid %d) listening on %s:%d", process.pid, host, port)

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        started = loop.time()
        while True:
            process = self._process
            if process is not None:
                code = await process.wait()
                if self._closing:
                    return
                logger.error(
                    "embedded mosquitto (pid %d) exited with %s\n%s",
                    process.pid,
                    code,
                    self.log_tail(10),
                )
                if loop.time() - started >= self.settings.stable_after:
                    failures = 0
            delay = min(self.settings.restart_max, self.settings.restart_min * 2.0**failures)
            failures += 1
            logger.info("restarting mosquitto in %.2fs", delay)
            await asyncio.sleep(delay)
            self._process = None
            try:
                await self._spawn()
            except BrokerError as exc:
                logger.error("mosquitto restart failed: %s", exc)
                continue
            self.restarts += 1
            started = loop.time()


async def _accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
