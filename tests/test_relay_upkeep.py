"""The relay's upkeep renews what expires: a missing or stale CRL is published again (the
broker must re-read it), and a renewed HTTPS certificate is served to new connections."""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path

from cloud_relay.__main__ import Upkeep
from cloud_relay.config import RelayConfig
from cloud_relay.credentials import open_credentials
from cloud_relay.pki import fingerprint_sha256
from cloud_relay.web import tls_context


def test_renew_publishes_the_crl_and_serves_a_renewed_https_certificate(tmp_path: Path) -> None:
    config = RelayConfig(data_dir=str(tmp_path))
    creds = open_credentials(config)
    upkeep = Upkeep(config, creds)
    upkeep.https = tls_context(creds.https.cert, creds.https.key)
    assert upkeep.renew() is False  # nothing due

    creds.pki.crl_path.unlink()  # as good as past its next update
    assert upkeep.renew() is True
    assert creds.pki.crl_path.exists()

    old = creds.https.fingerprint
    creds.https.cert.unlink()  # renewed by someone (pair new) or expiring: issued anew
    assert upkeep.renew() is False  # the broker has nothing new to read
    new = fingerprint_sha256(creds.https.cert.read_bytes())
    assert new != old
    # The context now presents the new certificate.
    served = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    served.check_hostname = False
    served.verify_mode = ssl.CERT_NONE
    assert _fingerprint_served(upkeep.https, served) == new


def _fingerprint_served(server: ssl.SSLContext, client: ssl.SSLContext) -> str:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(incoming, outgoing)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(outgoing.read())
        incoming.write(s_out.read())
    der = c.getpeercert(binary_form=True)
    assert der is not None
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    return fingerprint_sha256(pem)
