"""What the relay's processes need from its PKI: TLS for its own MQTT connection, the
embedded broker's listener, and the HTTPS pairing endpoint.

``open_credentials`` opens (or, on first start, creates) the CA under the data
directory, issues or renews the relay's certificates for ``certificate_hosts``, and
writes the broker's ACL. Blocking file and key work: call it in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.service.files import write_atomic
from agent.signaling.mqtt import MqttTls
from cloud_relay.broker import BrokerTls, RelayListener, acl_text
from cloud_relay.config import RelayConfig
from cloud_relay.pki import CertFiles, RelayPki, Role

ACL_FILE = "broker-acl.conf"


@dataclass(frozen=True, slots=True)
class RelayCredentials:
    pki: RelayPki
    mqtt_tls: MqttTls | None
    """The relay's MQTT client certificate; None for a plain-TCP lab broker."""
    broker_tls: BrokerTls | None
    """The embedded broker's secured listener; None without one."""
    https: CertFiles
    """The pairing endpoint's certificate (tokens pin its fingerprint)."""
    renewed: bool = False
    """The broker's or the relay's client certificate was issued anew by this call."""


def open_credentials(config: RelayConfig) -> RelayCredentials:
    pki = RelayPki.open(config.pki_directory(), config.pki)
    hosts = config.certificate_hosts()
    https = pki.server_certificate(Role.HTTPS, hosts)
    if not config.broker.secure:
        return RelayCredentials(pki, None, None, https)
    client = pki.relay_client_certificate()
    mqtt_tls = MqttTls(ca_file=pki.ca_path, cert_file=client.cert, key_file=client.key)
    broker_tls = None
    renewed = client.renewed
    if config.broker.url is None:
        server = pki.server_certificate(Role.BROKER, hosts)
        renewed |= server.renewed
        acl = Path(config.data_dir) / ACL_FILE
        write_atomic(acl, acl_text(config.home_assistant).encode(), 0o644)
        relay = RelayListener(config.broker.relay_port, mqtt_tls)
        broker_tls = BrokerTls(pki.ca_path, server.cert, server.key, pki.crl_path, acl, relay)
    return RelayCredentials(pki, mqtt_tls, broker_tls, https, renewed)
