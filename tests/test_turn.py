"""Per-call TURN credentials and the hardened coturn config.

Pure tests check the minting (lifetime, opaque user, coturn's HMAC scheme) and the
config text; the rest run a real coturn with that config and a real TURN client
(aioice's, over UDP on loopback) to see it refuse expired credentials, denied peers
and allocations over the user quota, and still serve fresh credentials and allowed
peers.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import socket
import time
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import replace
from pathlib import Path

import pytest
from aioice import stun

from cloud_relay.turn import (
    DENIED_PEER_NETWORKS,
    CallTurnCredentials,
    TurnSettings,
    call_credentials,
    coturn_config,
    new_secret,
    read_secret,
)
from tools.lab.attacks import TurnClient, allocate_request, turn_client, turn_refusal
from tools.lab.turn import Coturn, CoturnError

SECRET = "s3cret-s3cret-s3cret"
NOW = 1_700_000_000.0
WAIT = 20.0  # outer bound for anything that should happen "soon"; never a measurement
USER_QUOTA = 2

# --- pure: settings and minting --------------------------------------------------------------


def test_settings_validate_lifetime_urls_realm_and_quotas() -> None:
    assert TurnSettings().lifetime_s == 600
    assert TurnSettings(lifetime_s=60).lifetime_s == 60
    assert TurnSettings(lifetime_s=3600).lifetime_s == 3600
    for lifetime in (0, 59, 3601, 86400):
        with pytest.raises(ValueError, match="lifetime_s"):
            TurnSettings(lifetime_s=lifetime)
    good = (
        "turn:turn.example.com",
        "turn:turn.example.com:3478?transport=udp",
        "turns:turn.example.com:5349?transport=tcp",
        "turn:203.0.113.10:3478",
        "turn:[2001:db8::1]:3478",
    )
    assert TurnSettings(urls=good).urls == good
    for url in (
        "stun:turn.example.com",
        "turn:turn.example.com:99999",
        "turn:turn.example.com?transport=sctp",
        "turn:turn.example.com\nno-auth",
        "https://turn.example.com",
    ):
        with pytest.raises(ValueError, match="TURN URL"):
            TurnSettings(urls=(url,))
    with pytest.raises(ValueError, match="realm"):
        TurnSettings(realm="edge\nno-auth")
    with pytest.raises(ValueError, match="quota"):
        TurnSettings(user_quota=0)
    with pytest.raises(ValueError, match="quota"):
        TurnSettings(user_quota=10, total_quota=5)
    with pytest.raises(ValueError, match="max_bps"):
        TurnSettings(max_bps=0)


def _coturn_password(secret: str, username: str) -> str:
    """coturn's check for ``use-auth-secret``: base64(HMAC-SHA1(secret, username))."""
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def test_call_credentials_expire_after_the_lifetime_with_an_opaque_user() -> None:
    settings = TurnSettings(urls=("turn:turn.example.com:3478?transport=udp",), lifetime_s=900)
    creds = call_credentials(settings, SECRET, now=NOW)
    expiry, colon, user = creds.username.partition(":")
    assert colon and expiry == str(int(NOW) + 900) and creds.expires_at == int(NOW) + 900
    assert re.fullmatch(r"[A-Za-z0-9_-]{16,}", user)  # URL-safe random, never ':'
    assert creds.credential == _coturn_password(SECRET, creds.username)
    # A new user for every call: nothing links two calls of one device.
    others = {call_credentials(settings, SECRET, now=NOW).username for _ in range(20)}
    assert creds.username not in others and len(others) == 20


def test_call_credentials_travel_as_an_rtc_ice_server_and_hide_the_password() -> None:
    urls = ("turn:turn.example.com:3478?transport=udp", "turn:turn.example.com:3478?transport=tcp")
    creds = call_credentials(TurnSettings(urls=urls), SECRET, now=NOW)
    wire = json.loads(json.dumps(creds.to_json()))
    assert wire == {"urls": list(urls), "username": creds.username, "credential": creds.credential}
    assert creds.credential not in repr(creds)


def test_call_credentials_need_urls_and_a_usable_secret() -> None:
    settings = TurnSettings(urls=("turn:turn.example.com",))
    with pytest.raises(ValueError, match="no TURN URLs"):
        call_credentials(TurnSettings(), SECRET)
    for secret in ("", "short", SECRET + "\nno-auth", SECRET + " #"):
        with pytest.raises(ValueError, match="shared secret"):
            call_credentials(settings, secret)
    call_credentials(settings, new_secret())


def test_secret_file_must_not_be_world_readable(tmp_path: Path) -> None:
    path = tmp_path / "turn-secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o644)
    with pytest.raises(ValueError, match="accessible to everyone"):
        read_secret(path)
    path.chmod(0o640)
    assert read_secret(path) == SECRET


# --- pure: the config text --------------------------------------------------------------


def _lines(text: str) -> list[str]:
    return text.splitlines()


def test_config_is_hardened() -> None:
    settings = TurnSettings(realm="edge.example", user_quota=3, total_quota=50, max_bps=64000)
    lines = _lines(coturn_config(settings, SECRET, listen=("203.0.113.10",)))
    for line in (
        "use-auth-secret",
        f"static-auth-secret={SECRET}",
        "realm=edge.example",
        "fingerprint",
        "stale-nonce=600",
        "user-quota=3",
        "total-quota=50",
        "max-bps=64000",
        "no-cli",
        "no-tcp-relay",
        "no-multicast-peers",
        "no-rfc5780",
        "no-software-attribute",
        "no-tls",
        "no-dtls",
        "listening-ip=203.0.113.10",
        "relay-ip=203.0.113.10",
        "denied-peer-ip=10.0.0.0-10.255.255.255",
        "denied-peer-ip=127.0.0.0-127.255.255.255",
        "denied-peer-ip=169.254.0.0-169.254.255.255",
        "denied-peer-ip=172.16.0.0-172.31.255.255",
        "denied-peer-ip=192.168.0.0-192.168.255.255",
        "denied-peer-ip=100.64.0.0-100.127.255.255",
        "denied-peer-ip=::1",
        "denied-peer-ip=::ffff:0:0-::ffff:ffff:ffff",
        "denied-peer-ip=fc00::-fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        "denied-peer-ip=fe80::-febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    ):
        assert line in lines, line
    assert len([x for x in lines if x.startswith("denied-peer-ip=")]) == len(DENIED_PEER_NETWORKS)
    # No static users, no CLI password, nothing let through that was not asked for.
    for option in ("lt-cred-mech", "user=", "cli-password", "allowed-peer-ip", "allow-loopback"):
        assert not any(x.startswith(option) for x in lines), option
    assert "max-bps" not in coturn_config(TurnSettings(), SECRET, listen=("127.0.0.1",))


def test_config_lets_through_only_the_networks_passed() -> None:
    text = coturn_config(
        TurnSettings(), SECRET, listen=("127.0.0.1",), allowed_peers=("127.0.0.1", "10.0.1.0/24")
    )
    allowed = [x for x in _lines(text) if x.startswith("allow")]
    assert allowed == [
        "allow-loopback-peers",  # coturn drops loopback peers before its allow list
        "allowed-peer-ip=127.0.0.1",
        "allowed-peer-ip=10.0.1.0-10.0.1.255",
    ]
    text = coturn_config(TurnSettings(), SECRET, listen=("::1",), allowed_peers=("10.0.1.0/24",))
    assert "allow-loopback-peers" not in _lines(text)


def test_config_with_tls_refuses_old_tls_versions(tmp_path: Path) -> None:
    tls = (tmp_path / "cert.pem", tmp_path / "key.pem")
    lines = _lines(coturn_config(TurnSettings(), SECRET, listen=("::",), tls=tls, tls_port=5349))
    for line in (f"cert={tls[0]}", f"pkey={tls[1]}", "tls-listening-port=5349", "no-tlsv1"):
        assert line in lines
    assert "no-tlsv1_1" in lines and "no-dtls" in lines and "no-tls" not in lines


def test_config_refuses_what_would_weaken_or_break_it() -> None:
    settings = TurnSettings()
    with pytest.raises(ValueError, match="shared secret"):
        coturn_config(settings, SECRET + "\nallow-loopback-peers", listen=("127.0.0.1",))
    with pytest.raises(ValueError, match="too broad"):
        coturn_config(settings, SECRET, listen=("127.0.0.1",), allowed_peers=("0.0.0.0/0",))
    with pytest.raises(ValueError, match="too broad"):
        coturn_config(settings, SECRET, listen=("127.0.0.1",), allowed_peers=("::/8",))
    with pytest.raises(ValueError, match="every address"):
        coturn_config(settings, SECRET, listen=("127.0.0.1",), denied_peers=("::/128",))
    with pytest.raises(ValueError, match="allowed TURN peer"):
        coturn_config(settings, SECRET, listen=("127.0.0.1",), allowed_peers=("10.0.1.1/24",))
    with pytest.raises(ValueError, match="listening address"):
        coturn_config(settings, SECRET, listen=("turn.example.com",))
    with pytest.raises(ValueError, match="listening address"):
        coturn_config(settings, SECRET, listen=())
    with pytest.raises(ValueError, match="relay ports"):
        coturn_config(settings, SECRET, listen=("127.0.0.1",), relay_ports=(50000, 40000))
    with pytest.raises(ValueError, match="external"):
        coturn_config(settings, SECRET, listen=("127.0.0.1",), external_ip="1.2.3.4\nverbose")


# --- a real coturn -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def coturn() -> Iterator[Coturn]:
    """The hardened config; only 127.0.0.1 let through (the lab's default for loopback)."""
    with Coturn.running(user_quota=USER_QUOTA) as server:
        yield server


def _settings(server: Coturn) -> TurnSettings:
    return TurnSettings(
        urls=(f"turn:{server.host}:{server.port}?transport=udp",), realm=server.realm
    )


def _client(server: Coturn, creds: CallTurnCredentials) -> AbstractAsyncContextManager[TurnClient]:
    """A TURN client of ``server`` with ``creds``."""
    return turn_client((server.host, server.port), creds)


async def test_expired_credentials_are_refused_by_coturn(coturn: Coturn) -> None:
    settings = _settings(coturn)
    # Minted by the relay's own code, one second past their lifetime by coturn's clock.
    expired = call_credentials(settings, coturn.secret, now=time.time() - settings.lifetime_s - 1)
    async with _client(coturn, expired) as client:
        # The first Allocate has no credentials: 401 with the realm and a nonce.
        with pytest.raises(stun.TransactionFailed) as challenge:
            await client.protocol.request(allocate_request())
        assert challenge.value.response.error_code == 401
        assert challenge.value.response.attributes["REALM"] == coturn.realm
        assert challenge.value.response.attributes["NONCE"]
        # Then with MESSAGE-INTEGRITY from the expired username and its (correct) password.
        assert await turn_refusal(client.allocate()) == 401
        assert client.authenticated and client.protocol.realm == coturn.realm

    fresh = call_credentials(settings, coturn.secret)
    async with _client(coturn, fresh) as client:
        host, _ = await client.allocate()
        assert client.authenticated and host == coturn.host


async def test_wrong_password_is_refused_by_coturn(coturn: Coturn) -> None:
    creds = call_credentials(_settings(coturn), coturn.secret)
    forged = replace(creds, username=creds.username.replace(":", "0:", 1))  # later expiry
    async with _client(coturn, forged) as client:
        assert await turn_refusal(client.allocate()) == 401
        assert client.authenticated


DENIED_SAMPLES = (
    "0.1.2.3",
    "10.0.0.1",
    "10.255.255.254",
    "100.64.0.1",
    "127.0.0.2",
    "127.255.255.254",
    "169.254.169.254",  # cloud metadata
    "172.16.0.1",
    "172.31.255.254",
    "192.0.0.8",
    "192.0.2.1",
    "192.168.1.1",
    "198.18.0.1",
    "198.51.100.7",
    "203.0.113.9",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
)


async def test_hardened_coturn_refuses_denied_peers_and_relays_to_allowed_ones(
    coturn: Coturn,
) -> None:
    async with _client(coturn, call_credentials(_settings(coturn), coturn.secret)) as client:
        await client.allocate()
        codes = {}
        for host in DENIED_SAMPLES:
            codes[host] = await turn_refusal(client.permit((host, 9)))
        assert codes == dict.fromkeys(DENIED_SAMPLES, 403)
        # Public addresses are fine (a permission sends nothing).
        for host in ("8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "11.0.0.1"):
            await client.permit((host, 9))

        # The allowed test peer gets data through the relay.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.bind(("127.0.0.1", 0))
            peer.setblocking(False)
            await client.send_data(b"through the relay", peer.getsockname())
            async with asyncio.timeout(WAIT):
                data = await asyncio.get_running_loop().sock_recv(peer, 2048)
            assert data == b"through the relay"
            # Only that address: 127.0.0.2, loopback too, stays denied.
            assert await turn_refusal(client.send_data(b"x", ("127.0.0.2", 9))) == 403


async def test_allowed_network_lifts_the_denial_for_that_network_only() -> None:
    with Coturn.running(allowed_peers=("127.0.0.1", "10.1.2.0/24")) as server:
        creds = call_credentials(_settings(server), server.secret)
        async with _client(server, creds) as client:
            await client.allocate()
            await client.permit(("10.1.2.3", 9))
            assert await turn_refusal(client.permit(("10.1.3.3", 9))) == 403


async def test_ipv6_denied_peers_are_refused() -> None:
    # aioice asks for no address family, so coturn would relay over IPv4 by default.
    with Coturn.running(
        listen=("::1",), extra=("allocation-default-address-family=keep",)
    ) as server:
        settings = TurnSettings(urls=(f"turn:[::1]:{server.port}",), realm=server.realm)
        async with _client(server, call_credentials(settings, server.secret)) as client:
            host, _ = await client.allocate()
            assert host == "::1"
            samples = (
                "fe80::1",
                "fd00::1",
                "::ffff:10.0.0.1",
                "64:ff9b::a00:1",
                "2002:a00:1::1",
                "2001:db8::1",
                "ff02::1",
            )
            codes = {}
            for peer in samples:
                codes[peer] = await turn_refusal(client.permit((peer, 9)))
            assert codes == dict.fromkeys(samples, 403)
            await client.permit(("2001:4860:4860::8888", 9))
            await client.permit(("::1", 9))  # the lab lets its loopback test network through


async def test_allocations_beyond_the_user_quota_are_refused(coturn: Coturn) -> None:
    settings = _settings(coturn)
    one_call = call_credentials(settings, coturn.secret)
    async with AsyncExitStack() as stack:
        for _ in range(USER_QUOTA):
            client = await stack.enter_async_context(_client(coturn, one_call))
            await client.allocate()
        extra = await stack.enter_async_context(_client(coturn, one_call))
        assert await turn_refusal(extra.allocate()) == 486
        # The quota is per call party: another call's credentials still get one.
        other = await stack.enter_async_context(
            _client(coturn, call_credentials(settings, coturn.secret))
        )
        await other.allocate()


def test_coturn_refuses_to_run_with_an_option_it_would_ignore() -> None:
    with (
        pytest.raises(CoturnError, match="ignored config lines"),
        Coturn.running(extra=("no-loopback-peers",)),
    ):
        pass
