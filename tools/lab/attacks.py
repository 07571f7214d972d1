"""Attackers' tools, shared by the security tests and ``tools/bench/security.py``.

Each helper makes one real attempt the way an attacker would (a client certificate of
another CA, a message signed and then altered, a raw POST with no pin, a TURN request
with expired credentials) or reads what the defenders did about it (the relay's drop
lines, the messages a subscriber got up to a marker). Nothing here decides whether an
attack failed: the callers assert or count.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import re
import ssl
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

from aioice import stun, turn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.pairing.token import PairingToken
from agent.signaling.envelope import Envelope, InviteBody, from_json, make, to_json
from agent.signaling.mqtt import Message, MqttClient, MqttConfig, MqttTls
from agent.signaling.topics import Kind, device_topic
from cloud_relay.pki import RelayPki
from cloud_relay.turn import CallTurnCredentials

WAIT = 20.0
"""Upper bound of any single wait here; never a measurement."""

SDP = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
"""The smallest offer envelopes accept: attacks on signaling need no real media."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- certificates and MQTT sessions --------------------------------------------------------


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def device_files(pki: RelayPki, root: Path, device: str) -> MqttTls:
    """A device's key (made here, as on the board), its certificate from ``pki`` for a CSR,
    and ``pki``'s CA: a genuine device of ``pki``'s fleet (or of another CA's)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
        .sign(key, hashes.SHA256())
    )
    cert = pki.issue_device(csr.public_bytes(serialization.Encoding.PEM), device)
    key_path, cert_path = root / f"{device}-key.pem", root / f"{device}.pem"
    _write_key(key, key_path)
    cert_path.write_bytes(cert)
    return MqttTls(ca_file=pki.ca_path, cert_file=cert_path, key_file=key_path)


def self_signed_files(root: Path, name: str, ca_file: Path) -> MqttTls:
    """A certificate with CN ``name`` that vouches for itself, and the real CA to check the
    broker with: what someone who knows a device id but holds no certificate can do."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    root.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = root / f"{name}-self-key.pem", root / f"{name}-self.pem"
    _write_key(key, key_path)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return MqttTls(ca_file=ca_file, cert_file=cert_path, key_file=key_path)


@contextlib.asynccontextmanager
async def session(config: MqttConfig, *subscriptions: str) -> AsyncIterator[MqttClient]:
    """A started MQTT session, closed on exit; ``ConnectFailed`` if the broker refuses."""
    client = MqttClient(config, subscriptions=subscriptions)
    await client.start()
    try:
        yield client
    finally:
        await client.close()


async def until_marker(client: MqttClient, marker: bytes, wait: float = WAIT) -> list[Message]:
    """Every message up to and including ``marker``: the broker delivers in order, so once
    the marker is in, so is anything sent before it that was going to arrive."""
    seen: list[Message] = []
    async with asyncio.timeout(wait):
        while not seen or seen[-1].payload != marker:
            seen.append(await client.recv())
    return seen


# --- signaling -------------------------------------------------------------------------------


def invite(call: str, *, sender: str, to: str, ts: int | None = None) -> Envelope:
    """An unsigned invite from ``sender`` to ``to``, dated now unless ``ts``."""
    return make(
        InviteBody(sdp=SDP), call=call, from_=sender, to=to, ts=now_ms() if ts is None else ts
    )


def wire(env: Envelope) -> bytes:
    return to_json(env).encode()


TAMPERINGS = (
    "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\n",  # the attacker's DTLS key
    "a=ice-ufrag:evil\r\na=ice-pwd:" + "x" * 22 + "\r\n",  # the attacker's ICE
    "c=IN IP4 203.0.113.66\r\n",  # media elsewhere
)


def tamper_sdp(signed: bytes, n: int) -> bytes:
    """A signed invite whose SDP was changed on the way (the ``n``-th way of a few)."""
    envelope = json.loads(signed)
    sdp = envelope["body"]["sdp"]
    if n % (len(TAMPERINGS) + 1) == len(TAMPERINGS):
        envelope["body"]["sdp"] = sdp.replace("s=-", "s=x", 1)  # one byte
    else:
        envelope["body"]["sdp"] = sdp + TAMPERINGS[n % (len(TAMPERINGS) + 1)]
    return json.dumps(envelope).encode()


_DROPPED = re.compile(r": (\S+): dropped (\S+) \(call ([^)]+)\): (\S+)\s*$")


def drop_reasons(relay_log: Path) -> dict[str, list[str]]:
    """The relay's drop lines (``DEVICE: dropped TYPE (call ID): REASON``) by call id."""
    reasons: defaultdict[str, list[str]] = defaultdict(list)
    if relay_log.exists():
        for line in relay_log.read_text(errors="replace").splitlines():
            if (m := _DROPPED.search(line)) is not None:
                reasons[m.group(3)].append(m.group(4))
    return dict(reasons)


async def relay_dropped(relay_log: Path, call: str, count: int = 1) -> list[str]:
    """The reasons the relay logged for dropping ``call``'s messages, once it logged
    ``count`` of them."""
    async with asyncio.timeout(WAIT):
        while True:
            reasons = drop_reasons(relay_log).get(call, [])
            if len(reasons) >= count:
                return reasons
            await asyncio.sleep(0.05)


async def next_in(client: MqttClient, wait: float = WAIT) -> Envelope:
    """The next envelope on ``client``'s subscriptions."""
    async with asyncio.timeout(wait):
        msg = await client.recv()
    return from_json(msg.payload)


async def publish_out(client: MqttClient, device: str, payload: bytes) -> None:
    """``payload`` on ``device``'s ``out``: what a board sends the relay."""
    await client.publish(device_topic(device, Kind.OUT), payload, qos=1)


# --- pairing ---------------------------------------------------------------------------------


async def post_pair(url: str, body: bytes, wait_s: float = 5.0) -> tuple[int, dict[str, object]]:
    """A raw POST to a pairing endpoint: an attacker's client (no pin, no checks). The
    status and the JSON reply (``{}`` if the reply is not JSON)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    def go() -> tuple[int, bytes]:
        request = urllib.request.Request(url, body, method="POST")
        try:
            with urllib.request.urlopen(request, context=ctx, timeout=wait_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    status, raw = await asyncio.to_thread(go)
    try:
        reply = json.loads(raw)
    except ValueError:
        reply = {}
    return status, reply if isinstance(reply, dict) else {}


def repin(token: str, fingerprint: str | None = None, url: str | None = None) -> str:
    """``token`` with another pinned fingerprint or URL: what a man in the middle hands out."""
    parsed = PairingToken.parse(token)
    changes: dict[str, str] = {}
    if fingerprint is not None:
        changes["fingerprint"] = fingerprint
    if url is not None:
        changes["url"] = url
    return dataclasses.replace(parsed, **changes).text()


# --- TURN ------------------------------------------------------------------------------------


def turn_request(method: stun.Method, **attributes: object) -> stun.Message:
    """A STUN request; ``REQUESTED_TRANSPORT`` for the attribute ``REQUESTED-TRANSPORT``."""
    message = stun.Message(message_method=method, message_class=stun.Class.REQUEST)
    for name, value in attributes.items():
        message.attributes[name.replace("_", "-")] = value
    return message


def allocate_request() -> stun.Message:
    return turn_request(stun.Method.ALLOCATE, LIFETIME=600, REQUESTED_TRANSPORT=turn.UDP_TRANSPORT)


class TurnClient:
    """A TURN client over UDP with the long-term credential flow (aioice's): a request
    that gets 401 with REALM and NONCE is sent again with MESSAGE-INTEGRITY."""

    def __init__(self, protocol: turn.TurnClientUdpProtocol) -> None:
        self.protocol = protocol

    @property
    def authenticated(self) -> bool:
        """True once a request went out with MESSAGE-INTEGRITY (after a 401 challenge)."""
        return self.protocol.integrity_key is not None

    async def _send(self, request: stun.Message) -> stun.Message:
        async with asyncio.timeout(WAIT):
            response, _ = await self.protocol.request_with_retry(request)
        return response

    async def allocate(self) -> tuple[str, int]:
        response = await self._send(allocate_request())
        relayed: tuple[str, int] = response.attributes["XOR-RELAYED-ADDRESS"]
        return relayed

    async def permit(self, peer: tuple[str, int]) -> None:
        await self._send(turn_request(stun.Method.CREATE_PERMISSION, XOR_PEER_ADDRESS=peer))

    async def send_data(self, data: bytes, peer: tuple[str, int]) -> None:
        """Over a channel (ChannelBind also installs the permission)."""
        async with asyncio.timeout(WAIT):
            await self.protocol.send_data(data, peer)


@contextlib.asynccontextmanager
async def turn_client(
    address: tuple[str, int], creds: CallTurnCredentials
) -> AsyncIterator[TurnClient]:
    """A ``TurnClient`` towards the TURN server at ``address`` with ``creds``."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: turn.TurnClientUdpProtocol(
            address, creds.username, creds.credential, lifetime=600, channel_refresh_time=500
        ),
        remote_addr=address,
    )
    try:
        yield TurnClient(protocol)
    finally:
        transport.close()


async def turn_refusal(request: Awaitable[object]) -> int | None:
    """The TURN error code the request was refused with; None if it succeeded."""
    try:
        await request
    except stun.TransactionFailed as exc:
        code = exc.response.error_code
        assert code is not None, exc.response
        return code
    return None
