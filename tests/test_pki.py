"""The relay PKI on a temporary directory: CA life cycle, device certificates from CSRs,
the relay's own certificates, revocation and the CRL, checked with ``cryptography`` and
with the ``openssl`` CLI. Time comes from an injected clock; nothing sleeps."""

from __future__ import annotations

import hashlib
import re
import shutil
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.signaling.topics import TopicError
from cloud_relay.pki import (
    CA_CERT,
    CA_KEY,
    DEVICE_URI_PREFIX,
    LEDGER_FILE,
    CertificateRejected,
    CsrError,
    PkiError,
    PkiSettings,
    RelayPki,
    Role,
    fingerprint_sha256,
)

T0 = datetime(2030, 1, 1, tzinfo=UTC)
HOSTS = ["broker.example.net", "127.0.0.1", "::1"]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    return tmp_path / "pki"


@pytest.fixture
def pki(pki_dir: Path, clock: Clock) -> RelayPki:
    return RelayPki.open(pki_dir, clock=clock)


def make_csr(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | None = None,
    common_name: str = "whatever",
    extensions: tuple[x509.ExtensionType, ...] = (),
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "somebody else"),
            ]
        )
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- the CA ----------------------------------------------------------------------------------


def test_ca_created_on_first_start_and_reused(pki_dir: Path, clock: Clock) -> None:
    first = RelayPki.open(pki_dir, clock=clock)
    ca_pem = first.ca_path.read_bytes()
    key_pem = (pki_dir / CA_KEY).read_bytes()
    clock.now += timedelta(days=100)
    second = RelayPki.open(pki_dir, clock=clock)
    assert second.ca_path.read_bytes() == ca_pem
    assert (pki_dir / CA_KEY).read_bytes() == key_pem

    ca = load(ca_pem)
    (cn,) = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert re.fullmatch(r"edge-intercom relay CA [0-9a-f]{8}", str(cn.value))
    assert ca.issuer == ca.subject
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    public_key = ca.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)
    validity = ca.not_valid_after_utc - T0
    assert timedelta(days=3649) < validity <= timedelta(days=3650)
    assert ca.not_valid_before_utc < T0


def test_key_files_are_owner_only(pki: RelayPki, pki_dir: Path) -> None:
    pki.server_certificate(Role.HTTPS, ["relay.example.net"])
    pki.server_certificate(Role.BROKER, HOSTS)
    pki.relay_client_certificate()
    keys = sorted(pki_dir.glob("*key.pem"))
    assert [k.name for k in keys] == [
        "broker-key.pem",
        "ca-key.pem",
        "https-key.pem",
        "relay-client-key.pem",
    ]
    assert all(mode(k) == 0o600 for k in keys)
    assert mode(pki_dir) == 0o700
    assert not list(pki_dir.glob(".*.pem.*")), "write_atomic left a temporary file"


@pytest.mark.parametrize("bits", [0o640, 0o604, 0o644])
def test_ca_key_readable_by_others_is_refused(pki: RelayPki, pki_dir: Path, bits: int) -> None:
    (pki_dir / CA_KEY).chmod(bits)
    with pytest.raises(PkiError, match="group or others can read it"):
        RelayPki.open(pki_dir)


def test_server_key_readable_by_others_is_refused(pki: RelayPki, pki_dir: Path) -> None:
    files = pki.server_certificate(Role.BROKER, HOSTS)
    files.key.chmod(0o640)
    with pytest.raises(PkiError, match="group or others can read it"):
        pki.server_certificate(Role.BROKER, HOSTS)


def test_ca_key_not_matching_its_certificate_is_refused(pki: RelayPki, pki_dir: Path) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (pki_dir / CA_KEY).write_bytes(pem)
    with pytest.raises(PkiError, match="does not match"):
        RelayPki.open(pki_dir)


def test_corrupt_or_wrong_type_ca_key_is_refused(pki: RelayPki, pki_dir: Path) -> None:
    key_path = pki_dir / CA_KEY
    key_path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(PkiError, match="unusable"):
        RelayPki.open(pki_dir)
    key_path.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(PkiError, match="not an ECDSA P-256 key"):
        RelayPki.open(pki_dir)


def test_ca_certificate_without_its_key_is_refused(pki: RelayPki, pki_dir: Path) -> None:
    (pki_dir / CA_KEY).unlink()
    with pytest.raises(PkiError, match="restore the key from a backup"):
        RelayPki.open(pki_dir)


def test_lost_ca_certificate_is_made_again_from_its_key(
    pki: RelayPki, pki_dir: Path, clock: Clock
) -> None:
    device = pki.issue_device(make_csr(), "door-1")
    old = load(pki.ca_path.read_bytes())
    (pki_dir / CA_CERT).unlink()
    again = RelayPki.open(pki_dir, clock=clock)
    assert load(again.ca_path.read_bytes()).subject == old.subject
    assert again.verify_device_certificate(device) == "door-1"


def test_corrupt_ledger_is_refused(pki: RelayPki, pki_dir: Path) -> None:
    device = pki.issue_device(make_csr(), "door-1")
    (pki_dir / LEDGER_FILE).write_text("{}")
    with pytest.raises(PkiError, match="corrupt"):
        pki.is_revoked(device)


# -- device certificates ---------------------------------------------------------------------


def test_device_certificate_names_the_device_not_what_the_csr_asked(
    pki: RelayPki, clock: Clock
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = make_csr(
        key,
        common_name="relay",
        extensions=(
            x509.BasicConstraints(ca=True, path_length=None),
            x509.SubjectAlternativeName([x509.DNSName("relay.example.net")]),
        ),
    )
    cert = load(pki.issue_device(csr, "door-1"))
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "door-1")])
    assert cert.issuer == load(pki.ca_path.read_bytes()).subject
    assert cert.public_key() == key.public_key()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(f"{DEVICE_URI_PREFIX}door-1")]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.not_valid_after_utc == T0 + timedelta(days=730)
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == "sha256"
    again = load(pki.issue_device(csr, "door-1", validity_days=30))
    assert again.serial_number != cert.serial_number
    assert again.not_valid_after_utc == T0 + timedelta(days=30)


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP384R1()),
        ec.generate_private_key(ec.SECP256K1()),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ed25519.Ed25519PrivateKey.generate(),
    ],
    ids=["p384", "secp256k1", "rsa", "ed25519"],
)
def test_csr_with_another_key_type_is_refused(
    pki: RelayPki, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
) -> None:
    with pytest.raises(CsrError, match="must be ECDSA P-256"):
        pki.issue_device(make_csr(key), "door-1")


def test_csr_with_a_bad_signature_is_refused(pki: RelayPki) -> None:
    der = bytearray(x509.load_pem_x509_csr(make_csr()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the signature's s
    pem = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrError, match="signature does not verify"):
        pki.issue_device(pem, "door-1")


@pytest.mark.parametrize("csr", [b"", b"garbage", make_csr()[:-40], b"A" * 20_000])
def test_malformed_csr_is_refused(pki: RelayPki, csr: bytes) -> None:
    with pytest.raises(CsrError):
        pki.issue_device(csr, "door-1")


def test_bad_lifetimes_are_refused(pki: RelayPki) -> None:
    with pytest.raises(ValueError, match="validity_days"):
        pki.issue_device(make_csr(), "door-1", validity_days=0)
    with pytest.raises(ValueError, match="crl_validity_days"):
        PkiSettings(crl_validity_days=0)
    with pytest.raises(ValueError, match="renew_before_days"):
        PkiSettings(server_validity_days=30, renew_before_days=30)


@pytest.mark.parametrize("device_id", ["relay", "Door-1", "door/1", "+", ""])
def test_bad_device_id_is_refused(pki: RelayPki, device_id: str) -> None:
    with pytest.raises(ValueError) as info:
        pki.issue_device(make_csr(), device_id)
    assert device_id == "relay" or isinstance(info.value, TopicError)


# -- verification and revocation -------------------------------------------------------------


def test_device_certificate_verifies_until_revoked(pki: RelayPki, pki_dir: Path) -> None:
    door = pki.issue_device(make_csr(), "door-1")
    hall = pki.issue_device(make_csr(), "hall")
    assert pki.verify_device_certificate(door) == "door-1"
    assert not pki.is_revoked(door)

    assert pki.revoke("door-1") == (load(door).serial_number,)
    assert pki.is_revoked(door)
    with pytest.raises(CertificateRejected, match="revoked"):
        pki.verify_device_certificate(door)
    assert pki.verify_device_certificate(hall) == "hall"
    assert pki.revoke("door-1") == ()  # already revoked

    # Another process (the CLI, another relay worker) sees revocations made here and back.
    other = RelayPki.open(pki_dir)
    assert other.is_revoked(door)
    assert other.revoke(load(hall).serial_number) == (load(hall).serial_number,)
    with pytest.raises(CertificateRejected, match="revoked"):
        pki.verify_device_certificate(hall)


def test_revoking_what_was_never_issued_fails(pki: RelayPki) -> None:
    pki.issue_device(make_csr(), "door-1")
    with pytest.raises(LookupError):
        pki.revoke("hall")
    with pytest.raises(LookupError):
        pki.revoke(12345)


def test_revoking_a_device_revokes_every_certificate_it_got(pki: RelayPki) -> None:
    certs = [pki.issue_device(make_csr(), "door-1") for _ in range(3)]
    assert sorted(pki.revoke("door-1")) == sorted(load(c).serial_number for c in certs)
    assert all(pki.is_revoked(c) for c in certs)


def test_verification_rejects_what_is_not_a_valid_device_certificate(
    pki: RelayPki, tmp_path: Path, clock: Clock
) -> None:
    door = pki.issue_device(make_csr(), "door-1")
    stranger = RelayPki.open(tmp_path / "other", clock=clock).issue_device(make_csr(), "door-1")
    with pytest.raises(CertificateRejected, match="does not verify"):
        pki.verify_device_certificate(stranger)
    with pytest.raises(CertificateRejected, match="does not verify"):  # no clientAuth
        pki.verify_device_certificate(pki.server_certificate(Role.HTTPS, HOSTS).cert.read_bytes())
    with pytest.raises(CertificateRejected, match="not a device certificate"):
        pki.verify_device_certificate(pki.relay_client_certificate().cert.read_bytes())
    with pytest.raises(CertificateRejected, match="not a PEM certificate"):
        pki.verify_device_certificate(b"nonsense")
    clock.now = load(door).not_valid_after_utc + timedelta(seconds=1)
    with pytest.raises(CertificateRejected, match="does not verify"):
        pki.verify_device_certificate(door)


def test_crl_lists_revoked_serials_signed_by_the_ca(pki: RelayPki, clock: Clock) -> None:
    door = load(pki.issue_device(make_csr(), "door-1"))
    hall = load(pki.issue_device(make_csr(), "hall"))
    ca_key = load(pki.ca_path.read_bytes()).public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)

    empty = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert empty.is_signature_valid(ca_key)
    assert len(empty) == 0
    assert mode(pki.crl_path) == 0o644

    clock.now += timedelta(hours=1)
    pki.revoke("door-1")
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert crl.is_signature_valid(ca_key)
    assert crl.issuer == load(pki.ca_path.read_bytes()).subject
    assert [r.serial_number for r in crl] == [door.serial_number]
    entry = crl.get_revoked_certificate_by_serial_number(door.serial_number)
    assert entry is not None and entry.revocation_date_utc == clock.now
    assert crl.get_revoked_certificate_by_serial_number(hall.serial_number) is None
    assert crl.last_update_utc == clock.now
    assert crl.next_update_utc == clock.now + timedelta(days=7)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    previous = empty.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number > previous


def test_crl_is_refreshed_past_half_its_lifetime(pki_dir: Path, clock: Clock) -> None:
    pki = RelayPki.open(pki_dir, PkiSettings(crl_validity_days=2), clock=clock)
    first = pki.crl_path.read_bytes()
    clock.now += timedelta(hours=23)
    assert not pki.refresh_crl()
    assert pki.crl_path.read_bytes() == first
    clock.now += timedelta(hours=2)
    assert pki.refresh_crl()
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert crl.next_update_utc == clock.now + timedelta(days=2)
    pki.crl_path.write_bytes(b"broken")
    assert pki.refresh_crl()
    assert not pki.refresh_crl()


# -- the relay's own certificates ------------------------------------------------------------


def test_server_certificates_have_the_hosts_asked_for(pki: RelayPki, clock: Clock) -> None:
    files = pki.server_certificate(Role.BROKER, HOSTS)
    assert files.renewed
    cert = load(files.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example.net"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.not_valid_after_utc == files.not_after == T0 + timedelta(days=397)
    assert files.fingerprint == fingerprint_sha256(files.cert.read_bytes())
    key = serialization.load_pem_private_key(files.key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert cert.public_key() == key.public_key()

    client = load(pki.relay_client_certificate().cert.read_bytes())
    assert client.subject.rfc4514_string() == "CN=relay"
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    with pytest.raises(ValueError):
        pki.server_certificate(Role.HTTPS, [])
    with pytest.raises(ValueError):
        pki.server_certificate(Role.HTTPS, ["*.example.net"])
    with pytest.raises(ValueError):
        pki.server_certificate(Role.RELAY_CLIENT, HOSTS)


def test_server_certificate_kept_then_renewed_near_expiry(pki: RelayPki, clock: Clock) -> None:
    first = pki.server_certificate(Role.HTTPS, ["relay.example.net"])
    clock.now = first.not_after - timedelta(days=31)
    kept = pki.server_certificate(Role.HTTPS, ["relay.example.net"])
    assert not kept.renewed
    assert kept.fingerprint == first.fingerprint

    clock.now = first.not_after - timedelta(days=29)
    renewed = pki.server_certificate(Role.HTTPS, ["relay.example.net"])
    assert renewed.renewed
    assert renewed.fingerprint != first.fingerprint
    assert renewed.not_after == clock.now + timedelta(days=397)

    moved = pki.server_certificate(Role.HTTPS, ["relay.example.org"])
    assert moved.renewed  # other host names


def test_server_certificate_from_another_ca_or_mismatched_is_replaced(
    pki: RelayPki, tmp_path: Path, clock: Clock
) -> None:
    other = RelayPki.open(tmp_path / "other", clock=clock).server_certificate(Role.BROKER, HOSTS)
    files = pki.server_certificate(Role.BROKER, HOSTS)
    shutil.copy(other.cert, files.cert)
    assert pki.server_certificate(Role.BROKER, HOSTS).renewed
    files.key.write_bytes(other.key.read_bytes())
    assert pki.server_certificate(Role.BROKER, HOSTS).renewed


def test_fingerprint_is_colon_separated_upper_case_sha256(pki: RelayPki) -> None:
    pem = pki.server_certificate(Role.HTTPS, ["relay.example.net"]).cert.read_bytes()
    fingerprint = fingerprint_sha256(pem)
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", fingerprint)
    der = load(pem).public_bytes(serialization.Encoding.DER)
    assert fingerprint.replace(":", "").lower() == hashlib.sha256(der).hexdigest()


# -- interoperability: the openssl CLI ------------------------------------------------------


def openssl_verify(*args: str | Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("openssl")
    assert binary is not None, "no openssl CLI: apt-get install openssl (tools/setup-env does)"
    return subprocess.run(
        [binary, "verify", *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )


def test_openssl_verifies_device_certificate_and_honours_the_crl(
    tmp_path: Path,
) -> None:
    pki = RelayPki.open(tmp_path / "pki")  # the real clock: openssl checks against it
    device = tmp_path / "device.pem"
    device.write_bytes(pki.issue_device(make_csr(), "door-1"))
    check = ("-CAfile", pki.ca_path, "-crl_check", "-CRLfile", pki.crl_path)

    ok = openssl_verify(*check, "-purpose", "sslclient", device)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"{device}: OK" in ok.stdout

    pki.revoke("door-1")
    revoked = openssl_verify(*check, "-purpose", "sslclient", device)
    assert revoked.returncode != 0
    assert "certificate revoked" in revoked.stdout + revoked.stderr


def test_openssl_accepts_server_certificates_for_their_hosts(tmp_path: Path) -> None:
    pki = RelayPki.open(tmp_path / "pki")
    broker = pki.server_certificate(Role.BROKER, HOSTS).cert
    for flag, host in [("-verify_hostname", "broker.example.net"), ("-verify_ip", "::1")]:
        ok = openssl_verify("-CAfile", pki.ca_path, "-purpose", "sslserver", flag, host, broker)
        assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = openssl_verify(
        "-CAfile", pki.ca_path, "-purpose", "sslserver", "-verify_hostname", "evil.net", broker
    )
    assert wrong.returncode != 0
    client = pki.relay_client_certificate().cert
    as_server = openssl_verify("-CAfile", pki.ca_path, "-purpose", "sslserver", client)
    assert as_server.returncode != 0
