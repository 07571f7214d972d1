"""``edge-intercom-relay``: the cloud relay.

``serve``: presence, call routing and commands over MQTT, with the store, and the
HTTPS pairing endpoint; runs and supervises its own mosquitto (TLS, client
certificates of the relay's CA) unless given a broker URL. ``cmd``: send one command
to a device and print its reply (exit 1 on timeout, error reply or no broker).
``pair new``: mint a one-time pairing token for a new board (text and QR code).
``device revoke``: revoke a device's certificates and cut it off the broker.
``alerts``: list the alerts in the store, newest first (a table, or JSON lines);
``alerts clip ID --out FILE``: decrypt an alert's audio clip into a playable file.
``webhooks dead``: list the webhook deliveries given up on; ``webhooks retry``: send
them (some or all) again, at once if the relay runs here.
``token new``: mint an API token (shown once); ``token list``; ``token revoke ID``
(takes effect at the next request: the relay checks the store each time).
``user add NAME`` (password typed twice, or ``--password-file``), ``user passwd NAME``,
``user remove NAME``, ``user list``: the dashboard's administrators; a new password or
a removal ends the user's sessions at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import getpass
import json
import logging
import os
import secrets
import signal
import ssl
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import segno

from agent.edge.clip import ClipError
from agent.service.files import write_atomic
from agent.service.notifier import ServiceNotifier
from agent.service.systemd import LOG_TARGETS, setup_logging
from agent.signaling.mqtt import ConnectFailed, MqttClient, MqttConfig, PublishFailed
from cloud_relay.api import Api
from cloud_relay.broker import BrokerError, EmbeddedBroker
from cloud_relay.clips import ClipKey, clip_file, open_clip
from cloud_relay.commands import CommandError, reply_topic, send_command
from cloud_relay.config import ConfigError, RelayConfig, load_config
from cloud_relay.credentials import RelayCredentials, open_credentials
from cloud_relay.events import EventBus, RelayEvents
from cloud_relay.fleet_api import FleetApi
from cloud_relay.homeassistant import HomeAssistant
from cloud_relay.metrics import RelayMetrics
from cloud_relay.pairing import AttemptLimiter, Enrollment, Pairing, mint_token
from cloud_relay.pki import PkiError, RelayPki
from cloud_relay.service import Relay
from cloud_relay.sessions import Sessions
from cloud_relay.signatures import Senders
from cloud_relay.store import ApiTokenRecord, Store
from cloud_relay.tokens import Authenticator, mint_api_token
from cloud_relay.turn import read_secret
from cloud_relay.users import PasswordError, check_password, check_user_name, hash_password
from cloud_relay.web import WebServer, tls_context
from cloud_relay.webcall import WebCalls
from cloud_relay.webhooks import Webhooks

logger = logging.getLogger("cloud_relay")


def _common(parser: argparse.ArgumentParser, default: Any = None) -> None:
    """``default``: ``argparse.SUPPRESS`` on a subcommand's parser, so that the options given
    before the subcommand are not reset by its defaults."""
    parser.add_argument("--config", type=Path, default=default, help="TOML configuration file")
    parser.add_argument("--broker-url", default=default, help="external broker, mqtt://host:port")
    parser.add_argument("--log-level", default="INFO" if default is None else default,
                        help="DEBUG, INFO, WARNING, ERROR")  # fmt: skip
    parser.add_argument("--log-target", choices=LOG_TARGETS,
                        default="auto" if default is None else default,
                        help="auto: the journal when systemd connects stderr to it")  # fmt: skip
    parser.add_argument("--data-dir", default=default,
                        help="the relay's data directory (overrides config)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-intercom-relay", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the relay")
    _common(serve)
    cmd = sub.add_parser("cmd", help="send a command to a device and print its reply")
    _common(cmd)
    cmd.add_argument("device", help="device id")
    cmd.add_argument("name", help="command name (call, hangup, status, ...)")
    cmd.add_argument("args", nargs="*", metavar="KEY=VALUE", help="arguments; values JSON or text")
    cmd.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the reply")
    pair = sub.add_parser("pair", help="pairing tokens").add_subparsers(dest="pair", required=True)
    new = pair.add_parser("new", help="mint a one-time token for a new board")
    _common(new)
    new.add_argument("--name", help="the board's display name")
    new.add_argument("--site", help="where the board is")
    new.add_argument("--id", dest="device_id", help="device id (default: a fresh one; an "
                     "existing device's id pairs that board again)")  # fmt: skip
    new.add_argument("--ttl", type=parse_duration, help="lifetime: 90s, 10m, 1h (default 10m)")
    new.add_argument("--json", action="store_true", help="one JSON line, for scripts")
    device = sub.add_parser("device", help="paired devices")
    dev_sub = device.add_subparsers(dest="device_command", required=True)
    revoke = dev_sub.add_parser("revoke", help="revoke a device and cut it off the broker")
    _common(revoke)
    revoke.add_argument("device", help="device id")
    alerts = sub.add_parser("alerts", help="list stored alerts, newest first")
    _common(alerts)
    alerts.add_argument("--device", dest="alert_device", help="only this device's alerts")
    alerts.add_argument("--since", type=parse_since, help="received at or after (ISO 8601; "
                        "UTC unless it has an offset)")  # fmt: skip
    alerts.add_argument("--limit", type=int, default=100, help="at most this many (100)")
    alerts.add_argument("--json", action="store_true", help="one JSON object per line")
    alerts_sub = alerts.add_subparsers(dest="alerts_command")
    clip = alerts_sub.add_parser("clip", help="decrypt an alert's audio clip into a file")
    _common(clip, default=argparse.SUPPRESS)
    clip.add_argument("alert_id", help="the alert's id")
    clip.add_argument(
        "--out", type=Path, required=True, help="FILE.ogg (Opus as recorded) or FILE.wav"
    )
    hooks = sub.add_parser("webhooks", help="webhook deliveries given up on (dead letters)")
    hooks_sub = hooks.add_subparsers(dest="webhooks_command", required=True)
    dead = hooks_sub.add_parser("dead", help="list dead letters, newest first")
    _common(dead)
    dead.add_argument("--limit", type=int, default=100, help="at most this many (100)")
    dead.add_argument("--json", action="store_true", help="one JSON object per line")
    retry = hooks_sub.add_parser("retry", help="send dead letters again from their first try")
    _common(retry)
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("ids", nargs="*", default=[], metavar="ID", help="dead letters' ids")
    which.add_argument("--all", action="store_true", help="every dead letter")
    token = sub.add_parser("token", help="API tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    token_new = token_sub.add_parser("new", help="mint an API token (shown once)")
    _common(token_new)
    token_new.add_argument("--name", required=True, help="who or what uses it")
    token_new.add_argument("--expires", type=parse_duration,
                           help="lifetime: 12h, 30d (default: until revoked)")  # fmt: skip
    token_new.add_argument("--json", action="store_true", help="one JSON line, for scripts")
    token_list = token_sub.add_parser("list", help="list API tokens, oldest first")
    _common(token_list)
    token_list.add_argument("--json", action="store_true", help="one JSON object per line")
    token_revoke = token_sub.add_parser("revoke", help="revoke an API token")
    _common(token_revoke)
    token_revoke.add_argument("token_id", metavar="ID", help="the token's id (token list)")
    user = sub.add_parser("user", help="dashboard administrators")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    user_commands = (
        ("add", "add a user (asks the password twice)"),
        ("passwd", "set a user's password (ends its sessions)"),
        ("remove", "remove a user (ends its sessions)"),
        ("list", "list users"),
    )
    for name, what in user_commands:
        one = user_sub.add_parser(name, help=what)
        _common(one)
        if name != "list":
            one.add_argument("user_name", metavar="NAME", help="the user's name")
        if name in ("add", "passwd"):
            one.add_argument("--password-file", type=Path,
                             help="read the password from this file's first line")  # fmt: skip
    return parser


def parse_since(text: str) -> datetime:
    """An ISO 8601 time; one without an offset is UTC."""
    at = datetime.fromisoformat(text)
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``1h``, ``2d`` in seconds (argparse reports a ValueError)."""
    text = text.strip().lower()
    unit = _UNITS.get(text[-1:])
    value = float(text[:-1] if unit is not None else text)
    if value <= 0:
        raise ValueError("duration must be > 0")
    return value * (unit or 1.0)


def parse_args_kv(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; a value that parses as JSON is taken as JSON, else as text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"argument {item!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


PID_FILE = "relay.pid"
"""In the data directory: the running ``serve``, which SIGHUP makes apply revocations and
take up the dead letters sent again."""


async def serve(config: RelayConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    relay: Relay | None = None
    serving: Relay | None = None  # the relay once it is ready
    phase = "starting: opening the store"

    def describe() -> str:
        return serving.describe() if serving is not None else phase

    notifier = ServiceNotifier(describe)

    def stopping() -> None:
        notifier.stopping("stopping: closing the listeners and the broker")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping)
    notifier.start()
    data_dir = Path(config.data_dir)
    await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
    creds = await asyncio.to_thread(open_credentials, config)
    store = await Store.open(config.store_url())
    broker: EmbeddedBroker | None = None
    web: WebServer | None = None
    webcalls: WebCalls | None = None
    home: HomeAssistant | None = None
    upkeep = Upkeep(config, creds)
    try:
        if config.broker.url is None:
            phase = "starting: the embedded broker"
            notifier.refresh()
            broker = EmbeddedBroker(config.broker, data_dir / "broker", tls=creds.broker_tls)
            await broker.start()
            upkeep.broker = broker
        senders = None
        if (tls := creds.mqtt_tls) is not None and tls.key_file and tls.cert_file:
            senders = Senders.load(tls.key_file, tls.cert_file, creds.pki.ca_path)
        turn_secret = None
        if config.turn.urls:
            if config.turn.secret_file is None:
                raise ConfigError("[turn] urls need secret_file (coturn's static-auth-secret)")
            turn_secret = await asyncio.to_thread(read_secret, Path(config.turn.secret_file))
        webhooks = None
        if config.webhooks:
            webhooks = Webhooks(config.webhooks, store, worker=config.mqtt.client_id)
            upkeep.webhooks = webhooks
        clip_key = await asyncio.to_thread(ClipKey.load, config.pki_directory(), create=True)
        events = EventBus()
        metrics = RelayMetrics() if config.metrics.enabled else None
        if config.home_assistant.enabled:
            home = upkeep.home_assistant = HomeAssistant(config, tls)
        addons = [o for o in (metrics, home) if o is not None]
        relay = Relay(config, store, tls=tls, senders=senders, turn_secret=turn_secret,
                      webhooks=webhooks, clip_key=clip_key,
                      observers=[RelayEvents(events), *addons])  # fmt: skip
        attempt = 0
        while not stop.is_set():
            try:
                if home is not None:  # first: it publishes what the relay takes in
                    await home.start(relay)
                await relay.start()
                break
            except ConnectFailed as exc:
                delay = min(config.mqtt.backoff_max, config.mqtt.backoff_min * 2.0**attempt)
                attempt += 1
                logger.warning("%s; retrying in %.1fs", exc, delay)
                phase = f"starting: broker unreachable ({exc.reason}), retrying in {delay:.0f} s"
                notifier.refresh()
                with _suppress_timeout():
                    async with asyncio.timeout(delay):
                        await stop.wait()
        if not stop.is_set():
            if home is not None:
                home.revoked(await asyncio.to_thread(creds.pki.revoked_devices))
            p = config.pairing
            limiter = AttemptLimiter(p.per_source, p.overall, p.window_s, p.lockout_after,
                                     p.lockout_s)  # fmt: skip
            turn = ({"urls": list(config.turn.urls)},) if config.turn.urls else ()
            pairing = Pairing(
                store,
                creds.pki,
                Enrollment(config.device_broker_url(), turn),
                limiter,
                on_repaired=upkeep.repaired,
            )
            if config.broker.secure:  # paired boards need a broker that checks them
                upkeep.https = tls_context(creds.https.cert, creds.https.key)
                fleet = FleetApi(
                    store, relay, events, creds.pki, pairing_url=config.pairing_url(),
                    fingerprint=lambda: upkeep.https_fingerprint, on_revoked=upkeep.schedule,
                    pairing_ttl_s=p.token_ttl_s,
                )  # fmt: skip
                webcalls = WebCalls(relay)
                api = Api(store, Authenticator(store), clip_key, sessions=Sessions(store),
                          fleet=fleet, webcalls=webcalls)  # fmt: skip
                if metrics is not None:
                    hooks = webhooks.stats if webhooks is not None else None
                    metrics.watch(relay, webhooks=hooks, refusals=api.refusals)
                web = WebServer(pairing, p.host, p.port, upkeep.https, api, metrics=metrics)
                await web.start()
            loop.add_signal_handler(signal.SIGHUP, upkeep.schedule)
            upkeep.start()
            write_atomic(data_dir / PID_FILE, f"{os.getpid()}\n".encode(), 0o644)
            # What start-up made (modules, SQLAlchemy, paho, the loaded devices) lives as
            # long as the process: out of the collector's reach, a full collection walks
            # only what routing made since, in a few ms instead of 30-50 ms that every
            # message in flight waited for.
            gc.freeze()
            logger.info("relay ready (data in %s)", data_dir)
            serving = relay
            notifier.ready()
            await stop.wait()
        logger.info("shutting down")
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        (data_dir / PID_FILE).unlink(missing_ok=True)
        await upkeep.close()
        if web is not None:
            await web.close()
        if webcalls is not None:
            webcalls.close()  # before the relay: the hang-ups go out through it
        if home is not None:
            await home.close()  # its presses wait for the relay's replies
        if relay is not None:
            await relay.close()
            logger.info("relay stopped: %s", relay.stats.summary())
        if broker is not None:
            await broker.close()
        await store.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await notifier.close()
    return 0


UPKEEP_S = 3600.0
"""How often ``serve`` renews what expires: the CRL (7 days; mosquitto refuses every
client once it is past its next update) and the relay's certificates."""


class Upkeep:
    """Keeps the broker and the HTTPS endpoint in step with the PKI, one job at a time:
    revocations (SIGHUP from ``device revoke``; a board paired again, whose old session
    is ended and which reconnects), dead letters sent again (SIGHUP from ``webhooks
    retry``), and hourly renewal of the CRL and the relay's
    certificates (the broker re-reads its files; the HTTPS endpoint takes a new
    certificate for new connections)."""

    def __init__(self, config: RelayConfig, creds: RelayCredentials) -> None:
        self._config = config
        self._pki = creds.pki
        self.broker: EmbeddedBroker | None = None
        self.https: ssl.SSLContext | None = None
        self._https_fingerprint = creds.https.fingerprint
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.Task[None] | None = None
        self._again = False
        self._renew_due = False
        self._applied: set[str] = set()
        self._repaired: set[str] = set()
        self.webhooks: Webhooks | None = None
        """Takes up the dead letters ``webhooks retry`` sent again (SIGHUP)."""
        self.home_assistant: HomeAssistant | None = None
        """Removes revoked devices from Home Assistant."""

    @property
    def https_fingerprint(self) -> str:
        """The HTTPS certificate's, which new pairing tokens pin."""
        return self._https_fingerprint

    def start(self) -> None:
        self._timer = asyncio.create_task(self._every_hour(), name="relay-upkeep")

    def schedule(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.create_task(self._run(), name="relay-revocations")

    async def repaired(self, device: str) -> None:
        logger.warning("device %s paired again: its earlier certificates are revoked", device)
        self._repaired.add(device)
        self.schedule()

    async def _every_hour(self) -> None:
        while True:
            await asyncio.sleep(UPKEEP_S)
            self._renew_due = True
            self.schedule()

    def renew(self) -> bool:
        """(In a thread.) Renew what is due; True if the broker must re-read its files."""
        crl = self._pki.refresh_crl()
        creds = open_credentials(self._config)
        if self.https is not None and creds.https.fingerprint != self._https_fingerprint:
            self.https.load_cert_chain(creds.https.cert, creds.https.key)
            self._https_fingerprint = creds.https.fingerprint
            logger.warning("HTTPS certificate renewed: tokens minted from now pin %s",
                           creds.https.fingerprint)  # fmt: skip
        if creds.renewed:
            logger.warning("the relay's certificates were renewed; restart the relay for its "
                           "own MQTT connection to use the new client certificate")  # fmt: skip
        return crl or creds.renewed

    async def _run(self) -> None:
        self._again = True
        while self._again:
            self._again = False
            if self.webhooks is not None:
                await self.webhooks.retry()
            reload = False
            if self._renew_due:
                self._renew_due = False
                try:
                    reload = await asyncio.to_thread(self.renew)
                except (OSError, ValueError, PkiError) as exc:
                    logger.error("renewing the relay's certificates or CRL failed: %s", exc)
            revoked = await asyncio.to_thread(self._pki.revoked_devices)
            if self.home_assistant is not None:  # before the broker ends their sessions
                self.home_assistant.revoked(revoked)
            targets = (revoked - self._applied) | self._repaired
            self._repaired.clear()
            if not targets and not reload:
                continue
            if self.broker is None:
                logger.warning("CRL updated: make the external broker re-read it and end "
                               "the sessions of %s", sorted(targets))  # fmt: skip
                continue
            try:
                await self.broker.apply_revocations(targets)
            except BrokerError as exc:
                logger.error("applying revocations at the broker failed: %s", exc)
                continue
            self._applied |= revoked
            if targets:
                logger.warning("cut off the broker: %s", ", ".join(sorted(targets)))

    async def close(self) -> None:
        for task in (self._timer, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


class _suppress_timeout:  # used like contextlib.suppress
    def __enter__(self) -> None:
        return None

    def __exit__(self, tp: type[BaseException] | None, *_: object) -> bool:
        return tp is TimeoutError


async def cmd(
    config: RelayConfig,
    device: str,
    name: str,
    args: dict[str, Any],
    timeout: float,  # noqa: ASYNC109
) -> int:
    host, port = config.broker.endpoint()
    tls = (await asyncio.to_thread(open_credentials, config)).mqtt_tls
    client = MqttClient(
        MqttConfig(
            client_id=f"relay-cmd-{secrets.token_hex(6)}",
            host=host,
            port=port,
            session_expiry=0,
            connect_timeout=min(timeout, config.mqtt.connect_timeout),
            publish_timeout=timeout,
            tls=tls,
        ),
        subscriptions=[reply_topic(device)],
    )
    try:
        await client.start()
    except ConnectFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        reply = await send_command(client, device, name, args, timeout)
    except (CommandError, PublishFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.close()
    print(json.dumps(reply, sort_keys=True))
    return 0 if reply.get("ok", True) is not False else 1


async def pair_new(config: RelayConfig, ns: argparse.Namespace) -> int:
    await asyncio.to_thread(Path(config.data_dir).mkdir, parents=True, exist_ok=True)
    creds = await asyncio.to_thread(open_credentials, config)
    store = await Store.open(config.store_url())
    ttl = ns.ttl or config.pairing.token_ttl_s
    try:
        token, device = await mint_token(
            store,
            config.pairing_url(),
            creds.https.fingerprint,
            device=ns.device_id,
            name=ns.name,
            site=ns.site,
            ttl_s=ttl,
        )
    finally:
        await store.close()
    text = token.text()
    logger.info("minted a pairing token for device %s, valid %.0f s", device, ttl)
    if ns.json:
        print(json.dumps({"token": text, "device_id": device, "ttl_s": ttl}))
        return 0
    qr = segno.make(text, error="m")
    qr.terminal(compact=True)
    print(f"\nPairing token for device {device} (valid {ttl / 60:.0f} min, once):\n\n{text}\n")
    print("On the board: tools/pair-device TOKEN")
    return 0


def device_revoke(config: RelayConfig, device: str) -> int:
    pki = RelayPki.open(config.pki_directory(), config.pki)
    try:
        serials = pki.revoke(device)
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"revoked {len(serials)} certificate(s) of {device}; CRL updated")
    if not _wake_relay(config):
        print("the relay is not running here: the broker reads the CRL when it starts")
        return 0
    print("the running relay is cutting the device off the broker")
    return 0


def _wake_relay(config: RelayConfig) -> bool:
    """SIGHUP to the ``serve`` running on this data directory; False if none runs."""
    try:
        pid = int((Path(config.data_dir) / PID_FILE).read_text())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        return False
    return True


async def _existing_store(config: RelayConfig) -> Store | None:
    """The relay's store, or None (said on stderr) if there is none to read."""
    db = Path(config.data_dir, "relay.db")
    if config.store.url is None and not await asyncio.to_thread(db.exists):
        print(f"error: no relay store in {config.data_dir}", file=sys.stderr)
        return None
    return await Store.open(config.store_url())


async def _store(config: RelayConfig, *, create: bool) -> Store | None:
    """The relay's store, made if ``create`` (what adds the first token or user may run
    before the relay ever did), else only an existing one (``_existing_store``)."""
    if not create:
        return await _existing_store(config)
    await asyncio.to_thread(Path(config.data_dir).mkdir, parents=True, exist_ok=True)
    return await Store.open(config.store_url())


async def list_alerts(config: RelayConfig, ns: argparse.Namespace) -> int:
    """Print the stored alerts: a table, or with ``--json`` one object per line."""
    if ns.limit < 1:
        raise ValueError("--limit must be >= 1")
    if (store := await _existing_store(config)) is None:
        return 1
    try:
        found = await store.run(
            lambda: store.alerts(device=ns.alert_device, since=ns.since, limit=ns.limit)
        )
    finally:
        await store.close()
    if ns.json:
        for a in found:
            line = {"id": a.id, "device": a.device, "received": a.received.isoformat(),
                    "alert": a.body, "clip": a.has_clip}  # fmt: skip
            print(json.dumps(line, sort_keys=True))
        return 0
    print(f"{'received (UTC)':<20} {'device':<20} {'kind':<16} {'severity':<9} "
          f"{'conf':>5} {'level':>7} {'clip':<4}  id")  # fmt: skip
    for a in found:
        received = a.received.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        clip = "yes" if a.has_clip else "-"
        print(f"{received:<20} {a.device:<20} {a.kind:<16} {a.severity:<9} "
              f"{a.confidence:>5.2f} {a.level:>7.1f} {clip:<4}  {a.id}")  # fmt: skip
    if not found:
        print("(no alerts)")
    return 0


async def alert_clip(config: RelayConfig, alert_id: str, out: Path) -> int:
    """``alerts clip``: decrypt the alert's clip with the relay's clip key into ``out``."""
    if (store := await _existing_store(config)) is None:
        return 1
    try:
        stored = await store.run(store.alert_clip, alert_id)
    finally:
        await store.close()
    if stored is None:
        print(f"error: no alert {alert_id} with a clip in the store", file=sys.stderr)
        return 1
    key = await asyncio.to_thread(ClipKey.load, config.pki_directory())
    try:
        audio = open_clip(stored[1], key, alert_id)
    except ClipError as exc:
        print(f"error: alert {alert_id}: {exc}", file=sys.stderr)
        return 1
    data = clip_file(audio, out)
    await asyncio.to_thread(write_atomic, out, data, 0o600)
    print(f"{out}: {audio.seconds:.2f} s from {stored[0]} ({audio.before_s:.2f} s before "
          f"the event), {len(data)} bytes")  # fmt: skip
    return 0


async def webhooks_command(config: RelayConfig, ns: argparse.Namespace) -> int:
    """``webhooks dead`` lists the dead letters; ``webhooks retry`` sends them again."""
    if ns.webhooks_command == "dead" and ns.limit < 1:
        raise ValueError("--limit must be >= 1")
    if (store := await _existing_store(config)) is None:
        return 1
    try:
        if ns.webhooks_command == "retry":
            count = await store.run(store.retry_dead_letters, () if ns.all else ns.ids)
        else:
            dead = await store.run(lambda: store.dead_letters(limit=ns.limit))
    finally:
        await store.close()
    if ns.webhooks_command == "retry":
        print(f"{count} dead letter(s) to send again")
        if count and not _wake_relay(config):
            print("the relay is not running here: they go out when it starts")
        return 0 if count or ns.all else 1
    for d in dead:
        if ns.json:
            line = {"id": d.id, "webhook": d.webhook, "device": d.device, "alert": d.alert,
                    "tries": d.tries, "reason": d.reason,
                    "dead_at": d.dead_at.isoformat() if d.dead_at else None}  # fmt: skip
            print(json.dumps(line, sort_keys=True))
        else:
            at = d.dead_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if d.dead_at else "?"
            print(f"{at}  {d.id}  {d.device}  alert {d.alert_id}  {d.webhook}  "
                  f"after {d.tries} tries: {d.reason}")  # fmt: skip
    if not dead and not ns.json:
        print("(no dead letters)")
    return 0


async def token_command(config: RelayConfig, ns: argparse.Namespace) -> int:
    """``token new``, ``token list`` and ``token revoke``."""
    if (store := await _store(config, create=ns.token_command == "new")) is None:
        return 1
    now = datetime.now(UTC)
    try:
        if ns.token_command == "new":
            text, record = await mint_api_token(store, ns.name, ttl_s=ns.expires, now=now)
        elif ns.token_command == "revoke":
            revoked = await store.run(store.revoke_api_token, ns.token_id, now)
        else:
            tokens = await store.run(store.api_tokens)
    finally:
        await store.close()
    if ns.token_command == "new":
        logger.info("minted API token %s (%s)", record.id, record.name)
        if ns.json:
            print(json.dumps({"token": text, **_token_json(record, now)}, sort_keys=True))
            return 0
        until = _when(record.expires) if record.expires else "until revoked"
        print(f"API token {record.id} ({record.name}), valid {until}. Shown once, keep it "
              f"now:\n\n{text}\n\nUse it as: Authorization: Bearer TOKEN")  # fmt: skip
        return 0
    if ns.token_command == "revoke":
        if not revoked:
            print(f"error: no API token {ns.token_id}", file=sys.stderr)
            return 1
        print(f"API token {ns.token_id} revoked")
        return 0
    if ns.json:
        for t in tokens:
            print(json.dumps(_token_json(t, now), sort_keys=True))
        return 0
    print(f"{'id':<12}  {'state':<7}  {'created (UTC)':<19}  {'expires':<19}  "
          f"{'last used':<19}  name")  # fmt: skip
    for t in tokens:
        print(f"{t.id:<12}  {_token_state(t, now):<7}  {_when(t.created):<19}  "
              f"{_when(t.expires):<19}  {_when(t.last_used):<19}  {t.name}")  # fmt: skip
    if not tokens:
        print("(no API tokens)")
    return 0


def _when(at: datetime | None) -> str:
    return "-" if at is None else at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _token_state(t: ApiTokenRecord, now: datetime) -> str:
    if t.revoked is not None:
        return "revoked"
    return "active" if t.usable(now) else "expired"


def _token_json(t: ApiTokenRecord, now: datetime) -> dict[str, Any]:
    times = {"created": t.created, "expires": t.expires, "last_used": t.last_used,
             "revoked": t.revoked}  # fmt: skip
    return {"id": t.id, "name": t.name, "state": _token_state(t, now),
            **{k: v.isoformat() if v else None for k, v in times.items()}}  # fmt: skip


def read_password(password_file: Path | None) -> str:
    """The new password: the file's first line, or typed twice at a terminal."""
    if password_file is not None:
        lines = password_file.read_text().splitlines()
        return check_password(lines[0] if lines else "")
    if not sys.stdin.isatty():
        raise PasswordError("no terminal to ask the password at: use --password-file")
    first = check_password(getpass.getpass("Password: "))
    if getpass.getpass("Again: ") != first:
        raise PasswordError("the passwords differ")
    return first


async def user_command(config: RelayConfig, ns: argparse.Namespace) -> int:
    """``user add``, ``user passwd``, ``user remove`` and ``user list``."""
    name = check_user_name(ns.user_name) if ns.user_command != "list" else ""
    hashed = None
    if ns.user_command in ("add", "passwd"):
        hashed = await asyncio.to_thread(hash_password, read_password(ns.password_file))
    if (store := await _store(config, create=ns.user_command == "add")) is None:
        return 1
    now = datetime.now(UTC)
    try:
        if ns.user_command == "add":
            done = await store.run(store.add_user, name, hashed, now)
        elif ns.user_command == "passwd":
            done = await store.run(store.set_password, name, hashed, now)
        elif ns.user_command == "remove":
            done = await store.run(store.remove_user, name)
        else:
            found = await store.run(store.users)
    finally:
        await store.close()
    if ns.user_command == "list":
        for u in found:
            print(f"{u.name}  created {_when(u.created)}  password set {_when(u.changed)}")
        if not found:
            print("(no users)")
        return 0
    if not done:
        problem = "exists already" if ns.user_command == "add" else "does not exist"
        print(f"error: user {name} {problem}", file=sys.stderr)
        return 1
    past = {"add": "added", "passwd": "has a new password", "remove": "removed"}
    logger.info("user %s %s", name, past[ns.user_command])
    print(f"user {name} {past[ns.user_command]}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    setup_logging(ns.log_level, ns.log_target)
    try:
        config = load_config(ns.config, data_dir=ns.data_dir, broker_url=ns.broker_url)
        if ns.command == "serve":
            return asyncio.run(serve(config))
        if ns.command == "pair":
            return asyncio.run(pair_new(config, ns))
        if ns.command == "device":
            return device_revoke(config, ns.device)
        if ns.command == "alerts" and ns.alerts_command == "clip":
            return asyncio.run(alert_clip(config, ns.alert_id, ns.out))
        if ns.command == "alerts":
            return asyncio.run(list_alerts(config, ns))
        if ns.command == "webhooks":
            return asyncio.run(webhooks_command(config, ns))
        if ns.command == "token":
            return asyncio.run(token_command(config, ns))
        if ns.command == "user":
            return asyncio.run(user_command(config, ns))
        args = parse_args_kv(ns.args)
        return asyncio.run(cmd(config, ns.device, ns.name, args, ns.timeout))
    except (ConfigError, ValueError, BrokerError, PkiError, OSError) as exc:
        print(f"edge-intercom-relay: {exc}", file=sys.stderr)
        return 2 if ns.command == "serve" else 1


if __name__ == "__main__":
    sys.exit(main())
