"""Pairing end to end over real HTTPS: the relay's endpoint (store, PKI, limits) and the
board's client (key made on the board, fingerprint pinned, identity written 0600).

Every refusal is a real request: reused, expired, unknown and guessed tokens, a wrong
pin (a server with another certificate), a relay that is not there, a bad CSR.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from agent.pairing.client import (
    PID_FILE,
    AlreadyPaired,
    Paired,
    PairingFailed,
    new_key_and_csr,
    pair,
)
from agent.pairing.token import PairingToken
from agent.service.identity import load_identity
from cloud_relay.pairing import AttemptLimiter, Enrollment, Outcome, Pairing, mint_token
from cloud_relay.pki import RelayPki, Role
from cloud_relay.store import Store
from cloud_relay.web import PAIR_PATH, WebServer, tls_context
from tools.lab.attacks import post_pair, repin

BROKER = "mqtts://127.0.0.1:8883"


@dataclass
class Relay:
    store: Store
    pki: RelayPki
    pairing: Pairing
    url: str
    fingerprint: str
    repaired: list[str] = field(default_factory=list)

    async def token(self, **kwargs: object) -> tuple[str, str]:
        token, device = await mint_token(self.store, self.url, self.fingerprint, **kwargs)  # type: ignore[arg-type]
        return token.text(), device


@contextlib.asynccontextmanager
async def relay_running(root: Path, limiter: AttemptLimiter | None = None) -> AsyncIterator[Relay]:
    await asyncio.to_thread(root.mkdir)
    store = await Store.open(f"sqlite:///{root / 'relay.db'}")
    pki = await asyncio.to_thread(RelayPki.open, root / "pki")
    https = pki.server_certificate(Role.HTTPS, ["127.0.0.1"])
    repaired: list[str] = []

    async def on_repaired(device: str) -> None:
        repaired.append(device)

    pairing = Pairing(
        store,
        pki,
        Enrollment(BROKER, ({"urls": ["turn:127.0.0.1:3478"]},)),
        limiter or AttemptLimiter(),
        on_repaired=on_repaired,
    )
    web = WebServer(pairing, "127.0.0.1", 0, tls_context(https.cert, https.key))
    await web.start()
    try:
        url = f"https://127.0.0.1:{web.port}"
        yield Relay(store, pki, pairing, url, https.fingerprint, repaired)
    finally:
        await web.close()
        await store.close()


async def board_pairs(token: str, state_dir: Path, **kwargs: object) -> Paired:
    return await asyncio.to_thread(pair, token, state_dir, timeout=5.0, **kwargs)  # type: ignore[arg-type]


async def refused(token: str, state_dir: Path, **kwargs: object) -> str:
    with pytest.raises(PairingFailed) as info:
        await board_pairs(token, state_dir, **kwargs)
    return str(info.value)


async def test_a_board_pairs_and_keeps_its_key(tmp_path: Path) -> None:
    async with relay_running(tmp_path / "relay") as relay:
        token, device = await relay.token(name="Front door", site="home")
        await board_pairs(token, tmp_path / "board")
        identity = load_identity(tmp_path / "board")
        assert identity is not None
        assert identity.device_id == device
        assert (identity.broker_host, identity.broker_port) == ("127.0.0.1", 8883)
        assert identity.turn == ({"urls": ["turn:127.0.0.1:3478"]},)
        assert identity.key_path.stat().st_mode & 0o777 == 0o600
        cert = identity.cert_path.read_bytes()
        # The relay's CA vouches for it, and it certifies the key made on the board.
        assert relay.pki.verify_device_certificate(cert) == device
        ctx = ssl.create_default_context()
        ctx.load_cert_chain(identity.cert_path, identity.key_path)  # raises unless they match
        assert x509.load_pem_x509_certificate(cert).subject.rfc4514_string() == f"CN={device}"
        stored = await relay.store.run(relay.store.device_certificate, device)
        assert stored == cert.decode()
        [record] = [d for d in await relay.store.run(relay.store.devices) if d.id == device]
        assert (record.name, record.site) == ("Front door", "home")
        assert relay.pairing.outcomes == {Outcome.PAIRED: 1}


async def test_used_expired_and_unknown_tokens_are_refused(tmp_path: Path) -> None:
    async with relay_running(tmp_path / "relay") as relay:
        token, _ = await relay.token()
        await board_pairs(token, tmp_path / "first")
        assert "already used" in await refused(token, tmp_path / "second")

        past = datetime.now(UTC) - timedelta(hours=1)
        old, _ = await relay.token(ttl_s=60, now=past)
        assert "expired" in await refused(old, tmp_path / "third")

        forged = PairingToken.new(relay.url, relay.fingerprint).text()
        assert "does not know this token" in await refused(forged, tmp_path / "fourth")
        assert "bad token" in await refused("eipair1.garbage!", tmp_path / "fifth")
        assert relay.pairing.outcomes == {
            Outcome.PAIRED: 1,
            Outcome.USED_TOKEN: 1,
            Outcome.EXPIRED_TOKEN: 1,
            Outcome.UNKNOWN_TOKEN: 1,
        }
        for name in ("second", "third", "fourth", "fifth"):
            assert load_identity(tmp_path / name) is None


async def test_a_wrong_fingerprint_sends_nothing(tmp_path: Path) -> None:
    async with relay_running(tmp_path / "relay") as relay:
        token, _ = await relay.token()
        # The same secret and URL, pinned to another certificate: a man in the middle.
        other = RelayPki.open(tmp_path / "other").server_certificate(Role.HTTPS, ["127.0.0.1"])
        mitm = repin(token, fingerprint=other.fingerprint)
        message = await refused(mitm, tmp_path / "board")
        assert "WRONG FINGERPRINT" in message and "Nothing was sent" in message
        assert relay.pairing.outcomes == {}  # the relay never saw the request
        await board_pairs(token, tmp_path / "board")  # the token is still good


async def test_an_unreachable_relay_is_said_so(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    token = PairingToken.new(f"https://127.0.0.1:{port}", ":".join(["AB"] * 32)).text()
    assert "relay unreachable" in await refused(token, tmp_path / "board")


async def test_pairing_again_asks_first_then_revokes_the_old_identity(tmp_path: Path) -> None:
    board = tmp_path / "board"
    async with relay_running(tmp_path / "relay") as relay:
        token, device = await relay.token()
        await board_pairs(token, board)
        first = load_identity(board)
        assert first is not None
        old_cert = first.cert_path.read_bytes()

        again, _ = await relay.token(device=device)
        with pytest.raises(AlreadyPaired):
            await board_pairs(again, board)
        assert relay.pairing.outcomes == {Outcome.PAIRED: 1}  # nothing was sent

        await board_pairs(again, board, force=True)
        second = load_identity(board)
        assert second is not None and second.device_id == device
        assert second.cert_path.read_bytes() != old_cert
        assert not first.directory.exists()  # the old key is gone from the board
        assert relay.pki.is_revoked(old_cert)
        assert not relay.pki.is_revoked(second.cert_path.read_bytes())
        assert relay.repaired == [device]


async def test_a_bad_csr_is_refused_without_spending_the_token(tmp_path: Path) -> None:
    async with relay_running(tmp_path / "relay") as relay:
        token, _ = await relay.token()
        parsed = PairingToken.parse(token)
        status, reply = await post(relay, {"secret": parsed.secret, "csr": "not a csr"})
        assert (status, reply["error"]) == (400, "bad-csr")
        status, reply = await post(relay, {"nothing": 1})
        assert (status, reply["error"]) == (400, "bad-request")
        await board_pairs(token, tmp_path / "board")


async def post(relay: Relay, body: object) -> tuple[int, dict[str, object]]:
    """A raw POST to the pairing endpoint (an attacker's client: no pin, no checks)."""
    return await post_pair(relay.url + PAIR_PATH, json.dumps(body).encode())


async def test_guessed_tokens_are_refused_rate_limited_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cloud_relay.pairing")
    async with relay_running(tmp_path / "relay") as relay:
        token, _ = await relay.token()
        tries = 1000
        statuses: dict[int, int] = {}
        for _ in range(tries):
            guess = PairingToken.new(relay.url, relay.fingerprint)
            status, _reply = await post(relay, {"secret": guess.secret, "csr": CSR})
            statuses[status] = statuses.get(status, 0) + 1
        # A few guesses are tried (and fail) before the limits and then the lockout close
        # pairing; none gets through.
        assert set(statuses) == {403, 429}, statuses
        assert statuses[403] <= 20
        assert Outcome.PAIRED not in relay.pairing.outcomes
        refusals = [r for r in caplog.records if "pairing from 127.0.0.1 refused" in r.message]
        assert len(refusals) == tries
        # Locked: even the genuine token waits (the operator sees why in the log).
        assert "refusing pairing attempts" in await refused(token, tmp_path / "board")


async def test_the_running_agent_is_told(tmp_path: Path) -> None:
    board = tmp_path / "board"
    board.mkdir()
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HUP_EXITS_7, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert agent.stdout is not None
        assert await asyncio.wait_for(agent.stdout.readline(), 10) == b"ready\n"
        (board / PID_FILE).write_text(f"{agent.pid}\n")
        async with relay_running(tmp_path / "relay") as relay:
            token, _ = await relay.token()
            done = await board_pairs(token, board)
        assert done.agent_told == "signalled"
        assert await asyncio.wait_for(agent.wait(), 10) == 7
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()


HUP_EXITS_7 = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGHUP, lambda *_: sys.exit(7))\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)

CSR = new_key_and_csr()[1].decode()
"""A well-formed CSR: guesses are refused for their token, not their request."""
