"""Operator commands to devices over ``dev/{id}/cmd``, answered on ``dev/{id}/reply``.

The request is ``{"name": ..., "args": {...}}`` (JSON), published at QoS 1 with the
MQTT v5 response topic set to the device's ``reply`` topic (the only place the
broker ACL lets the device answer) and fresh random correlation data; its message
expiry is the timeout, so a device that comes back later does not act on a
request nobody waits for any more. The device answers with a JSON object carrying
the same correlation data; by convention ``{"ok": true|false, "message": ..., ...}``.

``send_command`` works on a dedicated ``MqttClient`` that is subscribed to the
device's reply topic and read by nobody else (the CLI). Inside the relay, where
one task reads every message, ``Requester`` matches replies to waiting requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import secrets
from collections.abc import Mapping
from typing import Any

from agent.signaling.mqtt import Message, MqttClient
from agent.signaling.topics import Kind, check_device_id, device_topic

logger = logging.getLogger(__name__)

MAX_REPLY_BYTES = 64 * 1024
_NAME = re.compile(r"[a-z][a-z0-9_/-]{0,63}")


class CommandError(RuntimeError):
    """The command was not answered usefully; the text says why."""


class CommandTimeout(CommandError):
    """No reply within the timeout."""


def encode_command(name: str, args: Mapping[str, Any]) -> bytes:
    if _NAME.fullmatch(name) is None:
        raise ValueError(f"bad command name {name!r}")
    return json.dumps({"name": name, "args": dict(args)}, separators=(",", ":")).encode()


def command_summary(payload: bytes) -> tuple[str, dict[str, Any]]:
    """(name, args) of a request as the store records it, whatever the payload held: what
    the device makes of a malformed one is in its reply."""
    try:
        raw = json.loads(payload.decode("utf-8")) if len(payload) <= MAX_REPLY_BYTES else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raw = None
    if not isinstance(raw, dict):
        return "(malformed)", {}
    name = raw.get("name")
    args = raw.get("args")
    return (
        name if isinstance(name, str) and _NAME.fullmatch(name) else "(malformed)",
        args if isinstance(args, dict) else {},
    )


def decode_reply(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_REPLY_BYTES:
        raise CommandError(f"reply larger than {MAX_REPLY_BYTES} bytes")
    try:
        reply = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CommandError(f"reply is not JSON: {exc}") from None
    if not isinstance(reply, dict):
        raise CommandError("reply is not a JSON object")
    return reply


def reply_topic(device: str) -> str:
    return device_topic(device, Kind.REPLY)


async def _publish_request(
    client: MqttClient,
    device: str,
    request: tuple[str, Mapping[str, Any]],
    correlation: bytes,
    expiry: float,
) -> None:
    name, args = request
    await client.publish(
        device_topic(device, Kind.CMD),
        encode_command(name, args),
        qos=1,
        response_topic=reply_topic(device),
        correlation_data=correlation,
        message_expiry=max(1, math.ceil(expiry)),
    )


async def send_command(
    client: MqttClient,
    device: str,
    name: str,
    args: Mapping[str, Any] | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109 (it is also the request's MQTT expiry)
) -> dict[str, Any]:
    """Send one command and return the device's reply; ``CommandTimeout`` if none in time.

    ``client`` must be started, subscribed to ``reply_topic(device)`` (or all replies),
    and not read by anyone else meanwhile: other messages it receives are discarded.
    """
    check_device_id(device)
    correlation = secrets.token_bytes(16)
    expected = reply_topic(device)
    try:
        async with asyncio.timeout(timeout):
            await _publish_request(client, device, (name, args or {}), correlation, timeout)
            while True:
                msg = await client.recv()
                if msg.topic == expected and msg.correlation_data == correlation:
                    return decode_reply(msg.payload)
                logger.debug("ignored a message on %s while waiting", msg.topic[:120])
    except TimeoutError:
        raise CommandTimeout(f"no reply from {device} to {name!r} within {timeout:g}s") from None


class Requester:
    """Requests waiting for replies, for a client whose messages someone else reads."""

    def __init__(self, client: MqttClient) -> None:
        self._client = client
        self._waiting: dict[bytes, tuple[str, asyncio.Future[dict[str, Any]]]] = {}

    async def request(
        self,
        device: str,
        name: str,
        args: Mapping[str, Any] | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109 (also the request's MQTT expiry)
        correlation: bytes | None = None,
    ) -> dict[str, Any]:
        """Like ``send_command``; replies arrive through ``deliver``."""
        check_device_id(device)
        correlation = correlation or secrets.token_bytes(16)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = (device, fut)
        try:
            async with asyncio.timeout(timeout):
                await _publish_request(
                    self._client, device, (name, args or {}), correlation, timeout
                )
                return await fut
        except TimeoutError:
            raise CommandTimeout(
                f"no reply from {device} to {name!r} within {timeout:g}s"
            ) from None
        finally:
            self._waiting.pop(correlation, None)

    def deliver(self, msg: Message) -> bool:
        """Hand a reply to its request; False if nobody waits for it (late, or another relay's)."""
        if msg.correlation_data is None:
            return False
        waiting = self._waiting.get(msg.correlation_data)
        if waiting is None or msg.topic != reply_topic(waiting[0]):
            return False
        fut = waiting[1]
        if not fut.done():
            try:
                fut.set_result(decode_reply(msg.payload))
            except CommandError as exc:
                fut.set_exception(exc)
        return True

    def cancel_all(self) -> None:
        for _, fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(CommandError("relay closing"))
