"""The board's side of pairing (``tools/pair-device``, ``edge-intercom-agent pair``).

The key pair is made here and only the CSR leaves the board. The request goes over
HTTPS to the URL in the token, and before anything is sent the server's certificate
must have the token's SHA-256 fingerprint: the board trusts that pin, not any CA,
so a man in the middle (or the wrong relay) learns nothing, not even the secret.
Standard library only (``http.client``, ``ssl``): a Pi Zero installs nothing more.

Every failure is a ``PairingFailed`` whose text says what happened and what to do.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import signal
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.media.sdp import fingerprint_of
from agent.pairing.token import PairingToken, TokenError
from agent.service.identity import Identity, IdentityError, load_identity, save_identity

logger = logging.getLogger(__name__)

PAIR_PATH = "/api/v1/pair"
PID_FILE = "agent.pid"
"""Under the state directory: the running agent, which SIGHUP makes reload its identity."""
MAX_REPLY_BYTES = 65_536

_TOKEN_ERRORS = {
    "unknown-token": "the relay does not know this token (mistyped, or minted by another relay)",
    "used-token": "this token was already used: mint a new one on the relay",
    "expired-token": "this token has expired: mint a new one on the relay",
}


class PairingFailed(Exception):
    """Pairing did not happen; the text is for the person at the board."""


class AlreadyPaired(PairingFailed):
    """The board has an identity and replacing it was not confirmed."""


@dataclass(frozen=True, slots=True)
class Paired:
    identity: Identity
    agent_told: str
    """How the agent learnt of it: ``signalled``, ``restarted`` or ``not-running``."""


def new_key_and_csr() -> tuple[bytes, bytes]:
    """A fresh P-256 device key (PEM, unencrypted: the file is 0600) and its CSR."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-intercom")]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def post_pinned(token: PairingToken, body: bytes, timeout: float) -> tuple[int, dict[str, Any]]:
    """POST ``body`` to the token's relay, after checking its certificate's fingerprint."""
    parts = urlsplit(token.url)
    host, port = parts.hostname or "", parts.port or 443
    # The pin replaces CA and host name checks: only that exact certificate will do.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    try:
        try:
            conn.connect()
        except (OSError, ssl.SSLError) as exc:
            raise PairingFailed(f"relay unreachable at {token.url}: {_why(exc)}") from None
        assert isinstance(conn.sock, ssl.SSLSocket)
        seen = fingerprint_of(conn.sock.getpeercert(binary_form=True) or b"", "sha-256").value
        if seen != token.fingerprint:
            raise PairingFailed(
                f"WRONG FINGERPRINT: the server at {token.url} is not the relay that minted "
                f"this token (possible man in the middle). Nothing was sent. "
                f"Expected {token.fingerprint}, got {seen}."
            )
        try:
            conn.request("POST", PAIR_PATH, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            raw = response.read(MAX_REPLY_BYTES + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise PairingFailed(f"relay at {token.url} failed mid-request: {_why(exc)}") from None
    finally:
        conn.close()
    try:
        reply = json.loads(raw) if len(raw) <= MAX_REPLY_BYTES else None
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise PairingFailed(f"relay at {token.url} answered HTTP {response.status} without JSON")
    return response.status, reply


def _why(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _check_reply(status: int, reply: dict[str, Any]) -> None:
    if status == 200:
        return
    error = str(reply.get("error", ""))
    if error in _TOKEN_ERRORS:
        raise PairingFailed(_TOKEN_ERRORS[error])
    if status == 429:
        raise PairingFailed(
            "the relay is refusing pairing attempts for now (too many): retry later"
        )
    raise PairingFailed(f"the relay refused (HTTP {status}): {reply.get('message', error)}")


def pair(
    token_text: str,
    state_dir: Path,
    *,
    force: bool = False,
    timeout: float = 10.0,
    owner: tuple[int, int] | None = None,
) -> Paired:
    """Pair this board with the token's relay and tell the agent; ``PairingFailed`` if not."""
    try:
        token = PairingToken.parse(token_text)
    except TokenError as exc:
        raise PairingFailed(f"bad token: {exc}") from None
    try:
        current = load_identity(state_dir)
    except IdentityError:
        current = None  # damaged: replacing it is the repair
    if current is not None and not force:
        raise AlreadyPaired(
            f"this board is already paired as {current.device_id!r}; "
            "pairing again replaces its identity (the relay revokes the old one)"
        )
    key_pem, csr_pem = new_key_and_csr()
    body = json.dumps({"secret": token.secret, "csr": csr_pem.decode()}).encode()
    status, reply = post_pinned(token, body, timeout)
    _check_reply(status, reply)
    try:
        enrollment = {
            "device_id": reply["device_id"],
            "broker": reply["broker"],
            "turn": reply.get("turn", []),
            "name": reply.get("name"),
            "site": reply.get("site"),
            "relay": token.url,
        }
        identity = save_identity(
            state_dir,
            key_pem,
            reply["certificate"].encode(),
            reply["ca"].encode(),
            enrollment,
            owner=owner,
        )
    except (KeyError, AttributeError, IdentityError) as exc:
        raise PairingFailed(f"the relay's answer is incomplete: {exc}") from None
    return Paired(identity, tell_agent(state_dir))


def tell_agent(state_dir: Path) -> str:
    """SIGHUP the running agent (it reloads its identity); else start the systemd unit if
    there is one; else say it is not running."""
    with contextlib.suppress(OSError, ValueError):
        pid = int((state_dir / PID_FILE).read_text().strip())
        os.kill(pid, signal.SIGHUP)
        return "signalled"
    if Path("/run/systemd/system").is_dir():
        import subprocess  # noqa: PLC0415 - only on boards with systemd

        done = subprocess.run(
            ["systemctl", "restart", "edge-intercom-agent.service"],
            check=False,
            capture_output=True,
            timeout=30,
        )
        if done.returncode == 0:
            return "restarted"
    return "not-running"
