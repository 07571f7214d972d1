"""``edge-intercom-relay``: the cloud relay.

``serve``: presence, call routing and commands over MQTT, with the store; runs and
supervises its own mosquitto unless given a broker URL. ``cmd``: send one command
to a device and print its reply (exit 1 on timeout, error reply or no broker).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import secrets
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.signaling.mqtt import ConnectFailed, MqttClient, MqttConfig, PublishFailed
from cloud_relay.broker import BrokerError, EmbeddedBroker
from cloud_relay.commands import CommandError, reply_topic, send_command
from cloud_relay.config import ConfigError, RelayConfig, load_config
from cloud_relay.service import Relay
from cloud_relay.store import Store

logger = logging.getLogger("cloud_relay")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--broker-url", help="external broker, mqtt://host:port")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-intercom-relay", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the relay")
    _common(serve)
    serve.add_argument("--data-dir", help="database, embedded broker files (overrides config)")
    cmd = sub.add_parser("cmd", help="send a command to a device and print its reply")
    _common(cmd)
    cmd.add_argument("device", help="device id")
    cmd.add_argument("name", help="command name (call, hangup, status, ...)")
    cmd.add_argument("args", nargs="*", metavar="KEY=VALUE", help="arguments; values JSON or text")
    cmd.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the reply")
    return parser


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


async def serve(config: RelayConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    data_dir = Path(config.data_dir)
    await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
    store = await Store.open(config.store_url())
    broker: EmbeddedBroker | None = None
    relay: Relay | None = None
    try:
        if config.broker.url is None:
            broker = EmbeddedBroker(config.broker, data_dir / "broker")
            await broker.start()
        relay = Relay(config, store)
        attempt = 0
        while not stop.is_set():
            try:
                await relay.start()
                break
            except ConnectFailed as exc:
                delay = min(config.mqtt.backoff_max, config.mqtt.backoff_min * 2.0**attempt)
                attempt += 1
                logger.warning("%s; retrying in %.1fs", exc, delay)
                with _suppress_timeout():
                    async with asyncio.timeout(delay):
                        await stop.wait()
        if not stop.is_set():
            # What start-up made (modules, SQLAlchemy, paho, the loaded devices) lives as
            # long as the process: out of the collector's reach, a full collection walks
            # only what routing made since, in a few ms instead of 30-50 ms that every
            # message in flight waited for.
            gc.freeze()
            logger.info("relay ready (data in %s)", data_dir)
            await stop.wait()
        logger.info("shutting down")
    finally:
        if relay is not None:
            await relay.close()
            logger.info("relay stopped: %s", relay.stats.summary())
        if broker is not None:
            await broker.close()
        await store.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0


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
    client = MqttClient(
        MqttConfig(
            client_id=f"relay-cmd-{secrets.token_hex(6)}",
            host=host,
            port=port,
            session_expiry=0,
            connect_timeout=min(timeout, config.mqtt.connect_timeout),
            publish_timeout=timeout,
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=ns.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(
            ns.config, data_dir=getattr(ns, "data_dir", None), broker_url=ns.broker_url
        )
        if ns.command == "serve":
            return asyncio.run(serve(config))
        args = parse_args_kv(ns.args)
        return asyncio.run(cmd(config, ns.device, ns.name, args, ns.timeout))
    except (ConfigError, ValueError, BrokerError) as exc:
        print(f"edge-intercom-relay: {exc}", file=sys.stderr)
        return 2 if ns.command == "serve" else 1


if __name__ == "__main__":
    sys.exit(main())
