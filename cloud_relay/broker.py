"""The embedded broker: a mosquitto child process the relay configures, starts and supervises.

``EmbeddedBroker.start()`` writes ``mosquitto.conf`` into its directory (one
listener, persistence there, log to ``mosquitto.log``), starts mosquitto and
waits until it accepts TCP connections. A supervisor task restarts it whenever
it exits, with exponential backoff (reset once it has stayed up for
``stable_after`` seconds). ``close()`` stops the supervisor, then mosquitto
(SIGTERM, SIGKILL after ``stop_timeout``). The current pid is in ``mosquitto.pid``.

``mosquitto_config`` with ``BrokerTls`` gives the secured listener: TLS with a client
certificate from the relay's CA required, its CN as the username, the CRL, and
``acl_text`` confining each device to its own topics. With ``BrokerTls.relay`` (meant
to be always set) a second TLS listener on loopback serves the relay's own sessions,
whose client ids stay free (several workers and the CLI share the CN ``relay``), and
the device listener forces the client id to the CN as well: without that, a device
connecting with another device's client id takes over its session (mosquitto closes
the other connection), and the relay's own sessions are exposed the same way.

Revocation (``apply_revocations``), from what mosquitto 2.0.11 does on SIGHUP: it
re-reads ``crlfile`` (new TLS handshakes with a revoked certificate fail with a
"certificate revoked" alert) and the ACL file, but it keeps every open connection,
revoked or not, with its rights. So after SIGHUP, once the log says "Reloading
config.", the relay ends each revoked device's session itself: it connects on the
relay listener with the device's client id (mosquitto closes the device's connection:
session taken over), publishes the device's offline presence (a takeover does not send
the will) and disconnects with session expiry 0, which deletes the session and what
was queued for it. Other clients are not touched. Without a relay listener the only
way is a restart: every client is cut off for the restart plus its reconnect backoff.

An external broker (``BrokerSettings.url``) is the operator's job; on every revocation
the same two steps must happen there within seconds: (1) make it read the relay's CRL
(``crl.pem`` in the PKI directory; a separately run mosquitto: ``kill -HUP``; EMQX:
its CRL/listener reload), and (2) close the revoked device's live connection and
delete its session (mosquitto: the takeover above from a trusted listener, or a
restart; EMQX: ``DELETE /api/v5/clients/{device id}``). A relay setting such as
``BrokerSettings.revoke_command`` (argv run with the device ids appended, non-zero
exit or a timeout being an error) would let the relay trigger it.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import os
import shutil
import signal
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.signaling import topics
from agent.signaling.mqtt import OFFLINE_PRESENCE, MqttClient, MqttConfig, MqttTls
from agent.signaling.topics import Kind, device_topic
from cloud_relay.config import HA_STATE_ROOT, BrokerSettings, HomeAssistantSettings

logger = logging.getLogger(__name__)

RELOADED = "Reloading config."
"""What mosquitto logs when it handles SIGHUP, just before re-reading its files."""
SERVICE_MANAGER_ENV = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"})
"""What systemd tells the relay's process alone."""
REVOCATION_TIMEOUT = 5.0
"""Seconds ``apply_revocations`` may take: the reload, then ending the sessions."""


class BrokerError(RuntimeError):
    """mosquitto could not be started; the text ends with its log."""


@dataclass(frozen=True, slots=True)
class RelayListener:
    """A TLS listener on loopback for the relay's own sessions; see the module docstring."""

    port: int
    """Its TCP port on 127.0.0.1 (the broker certificate must name 127.0.0.1)."""
    client: MqttTls
    """The relay's client certificate, with which ``apply_revocations`` ends sessions."""


@dataclass(frozen=True, slots=True)
class BrokerTls:
    """A listener that takes only clients with a certificate of the relay's CA."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    crl_file: Path
    acl_file: Path
    """Written by ``write_acl``: devices confined to their own topics."""
    relay: RelayListener | None = None
    """The relay's loopback listener; None: revocation restarts the broker."""


def acl_text(home_assistant: HomeAssistantSettings | None = None) -> str:
    """mosquitto ACL: each device (username = its certificate's CN = its device id) reads
    and writes only its own topics, as ``topics.DEVICE_SUBSCRIBES``/``DEVICE_PUBLISHES``
    say; the relay reads and writes every device topic and its workers' sync topic, and
    with ``home_assistant`` enabled its discovery prefix and the states the relay mirrors
    for it (``cloud_relay.homeassistant``)."""
    lines = ["# Generated by edge-intercom-relay: do not edit."]
    lines += [f"pattern read {topics.ROOT}/dev/%u/{k}" for k in sorted(topics.DEVICE_SUBSCRIBES)]
    lines += [f"pattern write {topics.ROOT}/dev/%u/{k}" for k in sorted(topics.DEVICE_PUBLISHES)]
    # The relay's client certificate has CN ``relay`` (``topics.RELAY_ID``, never a device).
    lines += [f"user {topics.RELAY_ID}", f"topic readwrite {topics.ROOT}/#"]
    if home_assistant is not None and home_assistant.enabled:
        # Home Assistant connects with that certificate too (an operator client).
        prefix = home_assistant.discovery_prefix
        lines += [f"topic readwrite {prefix}/#", f"topic readwrite {HA_STATE_ROOT}/#"]
    return "\n".join(lines) + "\n"


def _tls_lines(tls: BrokerTls) -> list[str]:
    return [
        f"cafile {tls.ca_file}",
        f"certfile {tls.cert_file}",
        f"keyfile {tls.key_file}",
        f"crlfile {tls.crl_file}",
        "tls_version tlsv1.2",
        "require_certificate true",
        # The certificate's CN (the device id the relay's CA put there) is the username
        # the ACL patterns use: a device cannot claim another identity.
        "use_identity_as_username true",
    ]


def _listener_lines(host: str, port: int, tls: BrokerTls | None) -> list[str]:
    if tls is None:
        return [f"listener {port} {host}", "allow_anonymous true"]
    lines = [f"listener {port} {host}", *_tls_lines(tls)]
    if tls.relay is not None:
        # ... and the client id: a device connecting with another's id gets its own, and
        # cannot take over (disconnect) the other's session. Only with the relay on its
        # own listener: relay workers and the CLI (all CN "relay") need their own ids,
        # and ending a revoked device's session takes its id. Loopback only.
        lines += ["use_username_as_clientid true"]
        lines += [f"listener {tls.relay.port} 127.0.0.1", *_tls_lines(tls)]
    return [*lines, "allow_anonymous false", f"acl_file {tls.acl_file}"]


def mosquitto_config(
    *,
    host: str,
    port: int,
    persistence_dir: Path,
    log_path: Path,
    autosave_interval: int | None = 60,
    tls: BrokerTls | None = None,
    extra: Sequence[str] = (),
) -> str:
    """``mosquitto.conf`` text: one listener (anonymous, or ``tls`` with client certificates
    and the ACL), persistence, a log file, ``extra`` lines.

    Tuned for signaling through a relay: no Nagle delay, and an in-flight window and
    queue per client that fit the relay's one session carrying every device's messages.

    ``autosave_interval`` None: persistence is saved only when mosquitto exits.
    """
    lines = [
        *_listener_lines(host, port, tls),
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


async def reload_mosquitto(pid: int, log_path: Path) -> None:
    """SIGHUP mosquitto and return once it logged ``RELOADED``: it then re-reads the CRL,
    certificates and ACL before it handles any new connection. The caller bounds the wait."""
    start = await asyncio.to_thread(_size, log_path)
    os.kill(pid, signal.SIGHUP)
    while True:
        if await asyncio.to_thread(_logged_since, log_path, start, RELOADED):
            return
        await asyncio.sleep(0.02)


async def revoke_sessions(
    pid: int, log_path: Path, relay: RelayListener, revoked: Collection[str], *, within: float
) -> None:
    """``reload_mosquitto`` then ``end_sessions``, in ``within`` seconds or ``BrokerError``.

    In this order: once the CRL is read, an ended device cannot come back."""
    try:
        async with asyncio.timeout(within):
            await reload_mosquitto(pid, log_path)
            await end_sessions(revoked, relay, connect_timeout=within)
    except TimeoutError:
        raise BrokerError(
            f"revocation of {', '.join(revoked)} not applied within {within}s"
        ) from None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _logged_since(log_path: Path, offset: int, text: str) -> bool:
    with log_path.open("rb") as log:
        log.seek(offset)
        return text.encode() in log.read()


async def end_sessions(
    device_ids: Collection[str], relay: RelayListener, *, connect_timeout: float = 5.0
) -> None:
    """Close each device's live connection and delete its session, from the relay listener.

    Taking the session over (same client id) makes mosquitto close the device's
    connection; the device's offline presence is then published as its will would have
    been, and the disconnect with session expiry 0 drops the session and its queue.
    """
    devices = sorted(device_ids)
    results = await asyncio.gather(
        *(_end_session(device, relay, connect_timeout) for device in devices),
        return_exceptions=True,
    )
    failed = [f"{d}: {r}" for d, r in zip(devices, results, strict=True) if r is not None]
    if failed:
        raise BrokerError("sessions not ended: " + "; ".join(failed))


async def _end_session(device: str, relay: RelayListener, connect_timeout: float) -> None:
    config = MqttConfig(
        client_id=topics.check_device_id(device),
        port=relay.port,
        tls=relay.client,
        session_expiry=0,
        connect_timeout=connect_timeout,
        publish_timeout=connect_timeout,
    )
    client = MqttClient(config)
    await client.start()
    try:
        offline = json.dumps(dict(OFFLINE_PRESENCE), sort_keys=True, separators=(",", ":"))
        await client.publish(device_topic(device, Kind.PRESENCE), offline.encode(), retain=True)
    finally:
        await client.close()
    logger.warning("%s: session ended (certificate revoked)", device)


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
    def __init__(self, settings: BrokerSettings, root: Path, tls: BrokerTls | None = None) -> None:
        self.settings = settings
        self.root = root
        self.tls = tls
        """The secured listener (with ``tls.relay`` for revocations); None: anonymous."""
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
            tls=self.tls,
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
        await self._stop_supervisor()
        await self._stop_process()

    async def _stop_supervisor(self) -> None:
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is None:
            return
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
        if (current := asyncio.current_task()) is not None and current.cancelling():
            raise asyncio.CancelledError

    async def apply_revocations(
        self, revoked: Collection[str], *, within: float = REVOCATION_TIMEOUT
    ) -> None:
        """After ``RelayPki.revoke``: the CRL is re-read and the ``revoked`` devices' live
        sessions are ended, within ``within`` seconds; other clients stay connected.

        Without a relay listener, mosquitto is restarted instead (every client is cut
        off). ``BrokerError`` if it is not running or does not reload in time.
        """
        if self.tls is None:
            raise RuntimeError("no TLS listener: nothing to revoke")
        if self.tls.relay is None:
            await self.restart()
            return
        pid = self.pid
        if pid is None:
            raise BrokerError("mosquitto is not running")
        await revoke_sessions(pid, self.log_path, self.tls.relay, revoked, within=within)

    async def restart(self) -> None:
        """Stop mosquitto (it saves its persistence) and start it again with the config."""
        if self._supervisor is None:
            raise RuntimeError("embedded broker not started")
        await self._stop_supervisor()
        await self._stop_process()
        self.config_path.write_text(self.config_text())
        try:
            await self._spawn()
        finally:
            # Supervised again even if it failed to come up: the supervisor retries.
            self._supervisor = asyncio.create_task(self._supervise(), name="broker-supervisor")

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
        # The relay is the service systemd watches: mosquitto (built with sd_notify) must
        # not answer for it (READY, watchdog) on the relay's notify socket.
        env = {k: v for k, v in os.environ.items() if k not in SERVICE_MANAGER_ENV}
        with (self.root / "mosquitto.out").open("ab") as out:
            process = await asyncio.create_subprocess_exec(
                *prefix,
                binary,
                "-c",
                str(self.config_path),
                env=env,
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
