"""The secured broker listener against a real mosquitto: client certificates from the
relay's CA only, each device confined to its own topics by the ACL and to its own session
(client id = certificate CN), revoked devices cut off at once while the others stay on.

Devices are real MQTT sessions with certificates issued by ``cloud_relay.pki`` from
their own CSRs. A refused publish is proven at a subscriber that must receive nothing
(mosquitto acknowledges a denied QoS 1 publish; to MQTT v5 clients with "not
authorized", which our client reports), with a marker message sent after it that must
arrive.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from mqtt_env import fast_config, until

from agent.signaling.mqtt import (
    OFFLINE_PRESENCE,
    ConnectFailed,
    MqttClient,
    MqttTls,
    PublishFailed,
)
from agent.signaling.topics import ROOT, Kind, device_topic
from cloud_relay.broker import BrokerTls, RelayListener, acl_text
from cloud_relay.pki import RelayPki, Role
from tools.lab.attacks import device_files, until_marker
from tools.lab.attacks import session as attack_session
from tools.lab.broker import Mosquitto

A, B = "door-a", "door-b"


@pytest.fixture
def pki(tmp_path: Path) -> RelayPki:
    return RelayPki.open(tmp_path / "pki")


def relay_files(pki: RelayPki) -> MqttTls:
    cert = pki.relay_client_certificate()
    return MqttTls(ca_file=pki.ca_path, cert_file=cert.cert, key_file=cert.key)


def broker_tls(pki: RelayPki, tmp_path: Path, *, relay_listener: bool) -> BrokerTls:
    server = pki.server_certificate(Role.BROKER, ["127.0.0.1"])
    acl = tmp_path / "acl"
    acl.write_text(acl_text())
    relay = RelayListener(0, relay_files(pki)) if relay_listener else None
    return BrokerTls(pki.ca_path, server.cert, server.key, pki.crl_path, acl, relay)


@pytest.fixture
def secure_broker(pki: RelayPki, tmp_path: Path) -> Iterator[Mosquitto]:
    """The device listener and, on its own port, the relay's."""
    tls = broker_tls(pki, tmp_path, relay_listener=True)
    with Mosquitto.running(root=tmp_path / "broker", tls=tls) as broker:
        yield broker


@contextlib.asynccontextmanager
async def connected(
    broker: Mosquitto, client_id: str, tls: MqttTls | None, *subscriptions: str
) -> AsyncIterator[MqttClient]:
    """A session on the device listener."""
    async with session(broker.port, client_id, tls, *subscriptions) as client:
        yield client


@contextlib.asynccontextmanager
async def relay_session(
    broker: Mosquitto, pki: RelayPki, client_id: str, *subscriptions: str
) -> AsyncIterator[MqttClient]:
    """A session of the relay on its own listener."""
    assert broker.tls is not None and broker.tls.relay is not None
    async with session(broker.tls.relay.port, client_id, relay_files(pki), *subscriptions) as c:
        yield c


@contextlib.asynccontextmanager
async def session(
    port: int, client_id: str, tls: MqttTls | None, *subscriptions: str
) -> AsyncIterator[MqttClient]:
    config = replace(fast_config(client_id, port), tls=tls, connect_timeout=2.0)
    async with attack_session(config, *subscriptions) as client:
        yield client


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
    b_in = device_topic(B, Kind.IN)
    async with (
        relay_session(secure_broker, pki, "relay-1", f"{ROOT}/dev/+/#") as watcher,
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


async def test_a_device_cannot_take_over_another_devices_session(
    pki: RelayPki, secure_broker: Mosquitto, tmp_path: Path
) -> None:
    a, b = device_files(pki, tmp_path, A), device_files(pki, tmp_path, B)
    async with (
        relay_session(secure_broker, pki, "relay-1", f"{ROOT}/dev/+/#") as watcher,
        connected(secure_broker, B, b, device_topic(B, Kind.IN)) as dev_b,
        # door-a asks for door-b's client id: mosquitto gives it its own (its CN).
        connected(secure_broker, B, a) as impostor,
    ):
        await impostor.publish(device_topic(A, Kind.OUT), b"as door-a", qos=1)
        assert [m.topic for m in await until_marker(watcher, b"as door-a")] == [
            device_topic(A, Kind.OUT)
        ]
        # door-b's session was not taken over: still connected, and it still gets its mail.
        await watcher.publish(device_topic(B, Kind.IN), b"for-b", qos=1)
        assert [m.payload for m in await until_marker(dev_b, b"for-b")] == [b"for-b"]
        assert dev_b.stats.disconnects == 0 and impostor.stats.disconnects == 0


async def test_a_revoked_device_is_cut_off_and_the_others_stay_on(
    pki: RelayPki, secure_broker: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.signaling.mqtt")
    a, b = device_files(pki, tmp_path, A), device_files(pki, tmp_path, B)
    async with (
        relay_session(secure_broker, pki, "relay-1", f"{ROOT}/dev/+/#") as watcher,
        connected(secure_broker, A, a, device_topic(A, Kind.IN)) as dev_a,
        connected(secure_broker, B, b, device_topic(B, Kind.IN)) as dev_b,
    ):
        assert pki.revoke(B)
        pki.refresh_crl()
        await secure_broker.apply_revocations([B])
        # door-b's connection is closed (its session taken over, then deleted) ...
        await until(lambda: not dev_b.connected, "door-b's session to be cut off")
        offline = json.dumps(OFFLINE_PRESENCE, separators=(",", ":")).encode()
        presence = await until_marker(watcher, offline)
        assert [m.topic for m in presence] == [device_topic(B, Kind.PRESENCE)]
        # ... and its reconnect attempts fail in the TLS handshake: certificate revoked.
        await until(lambda: revoked_alerts(caplog) >= 2, "door-b's reconnects to be refused")
        assert not dev_b.connected and dev_b.stats.connects == 1
        with pytest.raises(ConnectFailed):
            async with connected(secure_broker, B, b):
                pass
        # door-a and the relay were never disconnected, and still talk to each other.
        await watcher.publish(device_topic(A, Kind.IN), b"for-a", qos=1)
        assert [m.payload for m in await until_marker(dev_a, b"for-a")] == [b"for-a"]
        await dev_a.publish(device_topic(A, Kind.OUT), b"from-a", qos=1)
        assert [m.topic for m in await until_marker(watcher, b"from-a")] == [
            device_topic(A, k)
            for k in (Kind.IN, Kind.OUT)  # the relay sees its own too
        ]
        assert dev_a.stats.disconnects == 0 and watcher.stats.disconnects == 0


async def test_without_a_relay_listener_revocation_restarts_the_broker(
    pki: RelayPki, tmp_path: Path
) -> None:
    a, b = device_files(pki, tmp_path, A), device_files(pki, tmp_path, B)
    tls = broker_tls(pki, tmp_path, relay_listener=False)
    with Mosquitto.running(root=tmp_path / "broker", tls=tls) as broker:
        async with (
            connected(broker, A, a, device_topic(A, Kind.IN)) as dev_a,
            connected(broker, B, b, device_topic(B, Kind.IN)) as dev_b,
        ):
            pki.revoke(B)
            await broker.apply_revocations([B])
            # Everyone was cut off; door-a is back (agents reconnect), door-b is not.
            await until(lambda: dev_a.stats.connects == 2, "door-a to reconnect")
            await until(lambda: dev_b.stats.disconnects == 1, "door-b to be cut off")
            with pytest.raises(ConnectFailed):
                async with connected(broker, B, b):
                    pass
            assert not dev_b.connected and dev_b.stats.connects == 1
            await dev_a.publish(device_topic(A, Kind.OUT), b"still here", qos=1)


def revoked_alerts(caplog: pytest.LogCaptureFixture) -> int:
    """TLS handshakes our MQTT clients saw refused because their certificate is revoked."""
    return sum("CERTIFICATE_REVOKED" in r.getMessage() for r in caplog.records)
