"""A small fleet on this machine: the relay (with its embedded mosquitto) and real agents.

``async with fleet(root) as f:`` starts ``edge-intercom-relay serve`` with its data under
``root / "relay-data"`` (or ``data_dir``) and an MQTT client for commands; ``f.agent(...)``
pairs a board the way an operator does (a token minted on the relay, ``tools/pair-device``
on the board, state under ``root / DEVICE``) and starts ``edge-intercom-agent run`` on it.
The broker takes only TLS clients with certificates of the relay's CA: the command
client (``f.mqtt_config``) uses the relay's own certificate on the relay's listener.
Logs go to ``root / NAME.log``. Every wait is bounded and fails with ``FleetError``
naming what it waited for, with the logs' tails.
``f.restart_relay()`` and ``f.broker_pid()`` are for fault tests. Used by
``tests/test_agent_run.py``, ``tests/test_faults.py`` and the demo (``tools/demo_call.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.service.identity import load_identity
from agent.signaling.mqtt import MqttClient, MqttConfig, MqttTls
from agent.signaling.signing import Signing
from cloud_relay.commands import CommandError, reply_topic, send_command
from cloud_relay.pairing import mint_token
from cloud_relay.pki import fingerprint_sha256
from cloud_relay.store import Store
from tools.lab.broker import _free_port
from tools.lab.procs import terminate

REPO = Path(__file__).resolve().parents[2]
WAIT = 20.0
"""Upper bound of any single wait."""


class FleetError(AssertionError):
    """A bounded wait ran out or a process misbehaved (an assertion failure in tests)."""


def _entry(script: str, module: str) -> list[str]:
    """The console script next to this interpreter, else ``python -m module``."""
    path = Path(sys.executable).parent / script
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


RELAY_CMD = _entry("edge-intercom-relay", "cloud_relay")
RELAY_READY = "relay ready"
"""What ``edge-intercom-relay serve`` logs once it is connected and subscribed."""
AGENT_CMD = _entry("edge-intercom-agent", "agent.app")
PAIR_DEVICE = str(REPO / "tools" / "pair-device")


class Fleet:
    """The relay (with its broker), the agents and a command client on one port."""

    def __init__(
        self,
        root: Path,
        port: int,
        data_dir: Path,
        relay_port: int | None = None,
        pairing_port: int | None = None,
    ) -> None:
        """Without ``relay_port`` the broker is a plain lab one on ``port``: agents are not
        paired but configured with their device id, and the command client is anonymous."""
        self.root = root
        self.port = port
        """The broker's device listener."""
        self.relay_port = relay_port
        """The broker's listener for the relay's own clients (this fleet's too)."""
        self.pairing_port = pairing_port
        self.data_dir = data_dir
        self.url = (
            f"mqtt://127.0.0.1:{port}" if relay_port is None else f"mqtts://127.0.0.1:{relay_port}"
        )
        self.relay: asyncio.subprocess.Process | None = None
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        """The agents by device id."""
        self.client: MqttClient | None = None

    @property
    def db_path(self) -> Path:
        return self.data_dir / "relay.db"

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"

    def mqtt_config(self, client_id: str, **settings: Any) -> MqttConfig:
        """A connection as the relay: its certificate, on its listener (any topic)."""
        if self.relay_port is None:
            return MqttConfig(client_id=client_id, host="127.0.0.1", port=self.port, **settings)
        pki = self.pki_dir
        tls = MqttTls(pki / "ca.pem", pki / "relay-client.pem", pki / "relay-client-key.pem")
        return MqttConfig(
            client_id=client_id, host="127.0.0.1", port=self.relay_port, tls=tls, **settings
        )

    def state_dir(self, device: str) -> Path:
        return self.root / device

    def signing(self, device: str) -> Signing:
        """A paired device's key and the CA: to sign as that device does."""
        identity = load_identity(self.state_dir(device))
        assert identity is not None, f"{device} is not paired"
        return Signing.load(identity.key_path, identity.ca_path)

    async def mint(self, device: str | None = None, *, ago_s: float = 0.0) -> tuple[str, str]:
        """A token and its device id (a fresh one for None), as ``edge-intercom-relay pair
        new`` mints them, created ``ago_s`` ago with a minute to live."""
        store = await Store.open(f"sqlite:///{self.db_path}")
        try:
            https = await asyncio.to_thread((self.pki_dir / "https.pem").read_bytes)
            token, device_id = await mint_token(
                store,
                f"https://127.0.0.1:{self.pairing_port}",
                fingerprint_sha256(https),
                device=device,
                ttl_s=60,
                now=datetime.now(UTC) - timedelta(seconds=ago_s),
            )
        finally:
            await store.close()
        return token.text(), device_id

    async def token(self, device: str) -> str:
        """A pairing token for ``device``."""
        return (await self.mint(device))[0]

    def pair_new_argv(self, device: str) -> list[str]:
        """``edge-intercom-relay pair new`` for ``device``, printing one JSON line."""
        return [
            *RELAY_CMD, "pair", "new", "--config", str(self.root / "relay.toml"),
            "--data-dir", str(self.data_dir), "--id", device, "--json",
        ]  # fmt: skip

    async def token_cli(self, device: str) -> str:
        """A token minted by the operator's command (``pair_new_argv``)."""
        code, out, err = await self._run(self.pair_new_argv(device), f"pair new {device}")
        if code != 0:
            raise self.fail(f"pair new {device} exited {code}: {err.decode()}")
        token: str = json.loads(out)["token"]
        return token

    async def _run(self, argv: Sequence[str], what: str) -> tuple[int, bytes, bytes]:
        """Run a command to its end (bounded): exit code, stdout, stderr."""
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            async with asyncio.timeout(WAIT):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise self.fail(f"{what}: no exit within {WAIT:g} s") from None
        assert proc.returncode is not None
        return proc.returncode, out, err

    def pair_device_argv(self, device: str, token: str) -> list[str]:
        return [PAIR_DEVICE, token, "--state-dir", str(self.state_dir(device))]

    async def pair(self, device: str, token: str | None = None) -> None:
        """Pair ``device`` with ``tools/pair-device`` (state under ``state_dir(device)``),
        with ``token`` or one minted here."""
        if token is None:
            token = await self.token(device)
        argv = self.pair_device_argv(device, token)
        proc = await self.spawn(f"pair-{device}", argv)
        try:
            async with asyncio.timeout(WAIT):
                code = await proc.wait()
        except TimeoutError:
            proc.kill()
            raise self.fail(f"pair-device {device} did not finish") from None
        if code != 0:
            raise self.fail(f"pair-device {device} exited {code}: {self.log(f'pair-{device}')}")

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{self.log(name)}" for name in ("relay", *self.procs))

    def fail(self, what: str) -> FleetError:
        return FleetError(f"{what}\n{self.logs()}")

    async def spawn(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> asyncio.subprocess.Process:
        with (self.root / f"{name}.log").open("ab") as log:
            return await asyncio.create_subprocess_exec(
                *argv, cwd=REPO, env=None if env is None else dict(env),
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip

    async def agent(
        self,
        device: str,
        *,
        source: str = "device",
        sink: str = "device",
        auto_answer: Sequence[str] = (),
        settings: str = "",
        extra: str = "",
        env: Mapping[str, str] | None = None,
        keepalive: int = 5,
        ice: str = "",
        pair: bool = True,
        prefix: Sequence[str] = (),
    ) -> Path:
        """Pair ``device`` if it is not yet, and start ``edge-intercom-agent run`` on it;
        returns its config file.

        ``settings`` is TOML for the top level (before any table); ``extra`` is TOML
        appended to the generated configuration, inside its ``[calls]`` table unless it
        opens tables of its own (e.g. audio devices). ``keepalive``: its MQTT keep-alive in
        seconds (the broker declares it gone after 1.5x this). ``ice``: TOML for its
        ``[ice]`` table (e.g. ``policy = "relay"``). ``pair`` False: an unpaired board,
        which waits for ``pair()``. ``prefix``: a command the agent runs under (e.g.
        ``unshare``)."""
        if self.relay_port is None:
            lab = f'device_id = "{device}"'
            plain = f"port = {self.port}"
        else:
            lab = plain = ""
            paired = await asyncio.to_thread(load_identity, self.state_dir(device))
            if pair and paired is None:
                await self.pair(device)
        config = self.root / f"{device}.toml"
        auto = ", ".join(json.dumps(d) for d in auto_answer)
        config.write_text(
            f"""
{lab}
state_dir = "{self.state_dir(device)}"
{settings}
[ice]
host_addresses = ["127.0.0.1"]
{ice}
[mqtt]
{plain}
keepalive = {keepalive}
backoff_min = 0.05
backoff_max = 0.5
connect_timeout = 5.0
publish_timeout = 5.0
misc_interval = 0.2
[calls]
auto_answer = [{auto}]
invite_timeout_s = 5.0
ended_hold_s = 60.0
{extra}"""
        )
        argv = [*prefix, *AGENT_CMD, "--config", str(config), "run", "--source", source,
                "--sink", sink]  # fmt: skip
        self.procs[device] = await self.spawn(device, argv, env)
        return config

    def cmd_argv(self, device: str, name: str, *args: str, timeout: float = 10.0) -> list[str]:
        """The ``edge-intercom-relay cmd`` command line for one command."""
        return [
            *RELAY_CMD, "cmd", "--config", str(self.root / "relay.toml"),
            "--data-dir", str(self.data_dir), device, name, *args, "--timeout", f"{timeout:g}",
        ]  # fmt: skip

    async def command(self, device: str, name: str, **args: Any) -> dict[str, Any]:
        """One command through this fleet's own MQTT client."""
        assert self.client is not None
        return await send_command(self.client, device, name, args, timeout=5.0)

    async def cli(self, device: str, name: str, *args: str) -> tuple[int, dict[str, Any]]:
        """``edge-intercom-relay cmd`` as a process: its exit code and the printed reply."""
        argv = self.cmd_argv(device, name, *args)
        code, out, err = await self._run(argv, f"cmd {device} {name}")
        if not out:
            raise self.fail(f"cmd {device} {name}: no reply: {err.decode()}")
        reply: dict[str, Any] = json.loads(out)
        return code, reply

    async def until_status(
        self, device: str, check: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        """Poll ``status`` until ``check`` accepts the reply.

        Each request waits for its reply at most 2 s: one sent while the device was
        reconnecting to a new broker had no subscriber and is gone, so ask again."""
        assert self.client is not None
        last: dict[str, Any] = {}
        try:
            async with asyncio.timeout(WAIT):
                while True:
                    with contextlib.suppress(CommandError):
                        last = await send_command(self.client, device, "status", timeout=2.0)
                        if check(last):
                            return last
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise self.fail(f"timed out waiting for {what}; last status {last}") from None

    async def until_online(self, *devices: str) -> None:
        """The relay's store says every device is online (so it routes invites to them)."""
        store = await Store.open(f"sqlite:///{self.db_path}")

        def online(store: Store) -> bool:
            states = {d.id: d.presence for d in store.devices()}
            return all(states.get(i) == "online" for i in devices)

        try:
            async with asyncio.timeout(WAIT):
                while True:
                    if await store.run(online, store):
                        return
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise self.fail(f"timed out waiting for the relay to see {devices} online") from None
        finally:
            await store.close()

    async def stop_agent(self, device: str) -> None:
        """SIGTERM an agent; it must exit 0."""
        code = await self._stop(self.procs[device], device)
        if code != 0:
            raise FleetError(f"{device} exited with {code}\n{self.log(device)}")

    async def stop_relay(self) -> None:
        """SIGTERM the relay (and so its broker); it must exit 0."""
        assert self.relay is not None
        if self.client is not None:
            await self.client.close()
            self.client = None
        code = await self._stop(self.relay, "relay")
        if code != 0:
            raise FleetError(f"relay exited with {code}\n{self.log('relay')}")

    @property
    def broker_pid_path(self) -> Path:
        """Where the relay's embedded broker writes the pid of the current mosquitto."""
        return self.data_dir / "broker" / "mosquitto.pid"

    def broker_pid(self) -> int | None:
        """The pid of the relay's current mosquitto, None if it has not written one (yet)."""
        try:
            return int(self.broker_pid_path.read_text())
        except (OSError, ValueError):
            return None

    async def start_relay(self) -> None:
        """Start ``edge-intercom-relay serve`` (``root / relay.toml``, this data dir) and wait
        until it is ready: its broker listens and the relay is connected and subscribed (so
        no device message published from now on goes past it)."""
        config = self.root / "relay.toml"
        argv = [*RELAY_CMD, "serve", "--config", str(config), "--data-dir", str(self.data_dir)]
        log = self.root / "relay.log"
        readies = log.read_text(errors="replace").count(RELAY_READY) if log.exists() else 0
        self.relay = relay = await self.spawn("relay", argv, env=os.environ)
        try:
            async with asyncio.timeout(WAIT):
                while log.read_text(errors="replace").count(RELAY_READY) <= readies:
                    if relay.returncode is not None:
                        raise self.fail(f"relay exited with {relay.returncode}")
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise self.fail(f"the relay was not ready within {WAIT:g} s") from None

    async def restart_relay(self, *, kill: bool = False) -> None:
        """Stop the relay and start it again on the same config, data dir and port.

        ``kill`` False: SIGTERM, and it must exit 0; True: SIGKILL (its broker gets SIGTERM
        from the kernel), then wait until that broker has let go of the port. The command
        client stays: it reconnects to the new broker by itself."""
        relay = self.relay
        assert relay is not None
        if kill:
            relay.kill()
            await relay.wait()
            try:
                async with asyncio.timeout(WAIT):
                    while True:  # the kernel's SIGTERM takes mosquitto a moment
                        if not _tcp_open(self.port):
                            break
                        await asyncio.sleep(0.05)
            except TimeoutError:
                raise self.fail(f"the killed relay's broker still listens on {self.port}") from None
        else:
            code = await self._stop(relay, "relay")
            if code != 0:
                raise FleetError(f"relay exited with {code}\n{self.log('relay')}")
        await self.start_relay()

    async def _stop(self, proc: asyncio.subprocess.Process, name: str) -> int:
        code = await terminate(proc, WAIT)
        if code is None:
            raise FleetError(f"{name} ignored SIGTERM for {WAIT:g} s\n{self.log(name)}")
        return code


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@contextlib.asynccontextmanager
async def fleet(
    root: Path,
    *,
    devices: Sequence[str],
    data_dir: Path | None = None,
    client_id: str = "fleet",
    relay_extra: str = "",
    offline_grace_s: float = 2.0,
) -> AsyncIterator[Fleet]:
    """Start the relay and a command client for ``devices``; kill whatever still runs at exit.

    ``relay_extra``: TOML tables appended to the relay's configuration (e.g. ``[turn]``);
    ``offline_grace_s``: how long the relay waits before it believes a device offline."""
    port, relay_port, pairing_port = (_free_port("127.0.0.1") for _ in range(3))
    f = Fleet(root, port, data_dir or root / "relay-data", relay_port, pairing_port)
    config = root / "relay.toml"
    config.write_text(
        f"""
[broker]
port = {port}
relay_port = {relay_port}
[pairing]
host = "127.0.0.1"
port = {pairing_port}
public_host = "127.0.0.1"
per_source = 1000
overall = 1000
[mqtt]
client_id = "relay-{client_id}"
keepalive = 5
backoff_min = 0.05
backoff_max = 0.3
connect_timeout = 3.0
misc_interval = 0.2
[presence]
offline_grace_s = {offline_grace_s}
{relay_extra}"""
    )
    try:
        await f.start_relay()
        f.client = MqttClient(
            # Back within half a second of a broker that was killed or restarted.
            f.mqtt_config(client_id, session_expiry=0, backoff_min=0.05, backoff_max=0.5),
            subscriptions=[reply_topic(d) for d in devices],
        )
        await f.client.start()
        yield f
    finally:
        if f.client is not None:
            await f.client.close()
        for proc in f.procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if f.relay is not None:
            await terminate(f.relay, WAIT)  # politely first: it stops its broker on SIGTERM
