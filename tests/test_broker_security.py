"""The secured broker listener against a real mosquitto: client certificates from the
relay's CA only, each device confined to its own topics by the ACL, revoked devices out.

Devices are real MQTT sessions with certificates issued by ``cloud_relay.pki`` from
their own CSRs. A refused publish is proven at a subscriber that must receive nothing
(mosquitto acknowledges a denied QoS 1 publish; to MQTT v5 clients with "not
authorized", which our client reports), with a marker message sent after it that must
arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mqtt_env import WAIT, fast_config

from agent.signaling.mqtt import ConnectFailed, Message, MqttClient, MqttTls, PublishFailed
from agent.signaling.topics import ROOT, Kind, device_topic
from cloud_relay.broker import BrokerTls, acl_text
from cloud_relay.pki import RelayPki, Role
from tools.lab.broker import Mosquitto

A, B = "door-a", "door-b"


def device_files(pki: RelayPki, root: Path, device: str) -> MqttTls:
    """A device's key (made here, as on the board), its certificate from a CSR, the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
        .sign(key, hashes.SHA256())
    )
    cert = pki.issue_device(csr.public_bytes(serialization.Encoding.PEM), device)
    key_path, cert_path = root / f"{device}-key.pem", root / f"{device}.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert)
    return MqttTls(ca_file=pki.ca_path, cert_file=cert_path, key_file=key_path)


@pytest.fixture
def pki(tmp_path: Path) -> RelayPki:
    return RelayPki.open(tmp_path / "pki")


@pytest.fixture
def secure_broker(pki: RelayPki, tmp_path: Path) -> Iterator[Mosquitto]:
    server = pki.server_certificate(Role.BROKER, ["127.0.0.1"])
    acl = tmp_path / "acl"
    acl.write_text(acl_text())
    tls = BrokerTls(pki.ca_path, server.cert, server.key, pki.crl_path, acl)
    with Mosquitto.running(root=tmp_path / "broker", tls=tls) as broker:
        yield broker


@contextlib.asynccontextmanager
async def connected(
    broker: Mosquitto, client_id: str, tls: MqttTls | None, *subscriptions: str
) -> AsyncIterator[MqttClient]:
    config = replace(fast_config(client_id, broker.port), tls=tls, connect_timeout=2.0)
    client = MqttClient(config, subscriptions=subscriptions)
    await client.start()
    try:
        yield client
    finally:
        await client.close()


async def until_marker(client: MqttClient, marker: bytes) -> list[Message]:
    """Every message up to and including ``marker``."""
    seen: list[Message] = []
    async with asyncio.timeout(WAIT):
        while not seen or seen[-1].payload != marker:
            seen.append(await client.recv())
    return seen


async def test_only_certificates_of_the_relay_ca_get_in(
    pki: RelayPki, secure_broker: Mosquitto, tmp_path: Path
) -> None:
    a = device_files(pki, tmp_path, A)
    async with connected(secure_broker, A, a):
        pass
    other = RelayPki.open(tmp_path / "other-ca")
    stranger = device_files(other, tmp_path / "other-ca", A)
    for tls in (None, MqttTls(ca_file=pki.ca_path), replace(stranger, ca_file=pki.ca_path)):
        with pytest.raises(ConnectFailed):
            async with connected(secure_broker, A, tls):
                pass


async def test_devices_are_confined_to_their_own_topics(
    pki: RelayPki, secure_broker: Mosquitto, tmp_path: Path
) -> None:
    a, b = device_files(pki, tmp_path, A), device_files(pki, tmp_path, B)
    relay = MqttTls(
        ca_file=pki.ca_path,
        cert_file=pki.relay_client_certificate().cert,
        key_file=pki.relay_client_certificate().key,
    )
    b_in = device_topic(B, Kind.IN)
    async with (
        connected(secure_broker, "relay-1", relay, f"{ROOT}/dev/+/#") as watcher,
        connected(secure_broker, B, b, b_in) as dev_b,
        # door-a asks for door-b's in, cmd and presence: the broker refuses these filters.
        connected(secure_broker, A, a, *(device_topic(B, k) for k in (Kind.IN, Kind.CMD))) as dev_a,
    ):
        # door-a writes into door-b's topics, then into its own out as a marker.
        for kind in (Kind.IN, Kind.CMD, Kind.PRESENCE, Kind.OUT):
            # MQTT v5: the PUBACK says why; the subscribers below prove nothing got through.
            with pytest.raises(PublishFailed, match="Not authorized"):
                await dev_a.publish(device_topic(B, kind), b"forged", qos=1)
        await dev_a.publish(device_topic(A, Kind.OUT), b"marker", qos=1)
        seen = await until_marker(watcher, b"marker")
        assert [m.topic for m in seen] == [device_topic(A, Kind.OUT)], seen
        # The relay publishes to door-b's in: door-b gets it, door-a (subscribed) does not.
        await watcher.publish(b_in, b"for-b", qos=1)
        await dev_a.publish(device_topic(A, Kind.OUT), b"marker-2", qos=1)
        await until_marker(watcher, b"marker-2")
        assert [m.payload for m in await until_marker(dev_b, b"for-b")] == [b"for-b"]
        assert dev_a.stats.received == 0
    # Nothing door-a forged reached door-b or the relay.
    assert dev_b.stats.received == 1


async def test_a_revoked_device_is_refused(
    pki: RelayPki, secure_broker: Mosquitto, tmp_path: Path
) -> None:
    b = device_files(pki, tmp_path, B)
    async with connected(secure_broker, B, b):
        pass
    pki.revoke(B)
    secure_broker.restart()  # mosquitto reads the CRL when it starts
    with pytest.raises(ConnectFailed):
        async with connected(secure_broker, B, b):
            pass
