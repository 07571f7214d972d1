"""TURN for calls: credentials minted per call, and the coturn config that checks them.

Why per call: coturn with ``use-auth-secret`` checks TURN REST credentials
(``<expiry>:<user>``, password HMAC-SHA1(secret, username)) without a user database,
so the relay gives every call party its own short-lived credentials and no device
holds a TURN password that outlives the call. The user part is a random opaque id,
never a device id: the username travels in clear in every TURN request and shows up
in coturn's log.

Why hardened: a TURN server relays to any address a client asks for, so left alone it
is an open proxy into the network it sits in (the cloud provider's metadata service,
the relay's own database). ``coturn_config`` denies relaying to private, loopback,
link-local, shared, documentation, benchmarking, multicast and reserved ranges, IPv4
and IPv6 (IPv4-mapped, NAT64 and 6to4 addresses too, which embed an IPv4 address),
lets through only networks passed explicitly (a test lab), caps allocations per user
and in total, and turns off the CLI, TCP relays, TLS 1.0/1.1 and the extras that make
STUN answers bigger (amplification). coturn 4.6.1 warns about an unknown option
("Bad configuration format") and runs on without it, so only options it accepts are
written (``no-loopback-peers`` is not one: loopback peers are refused by default and
``allow-loopback-peers`` lets them be checked against the allow list).

coturn checks the expiry in the username when a session authenticates (the Allocate);
refreshes of that allocation reuse the session's key, so a call may outlast its
credentials but a new allocation (an ICE restart) needs fresh ones.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.net.ice import mint_turn_credentials, parse_turn_url

logger = logging.getLogger(__name__)

MIN_LIFETIME_S = 60
MAX_LIFETIME_S = 3600

DENIED_PEER_NETWORKS: tuple[str, ...] = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # private
    "100.64.0.0/10",  # carrier-grade NAT (shared address space)
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local, cloud metadata services
    "172.16.0.0/12",  # private
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24",  # TEST-NET-1
    "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
    "192.168.0.0/16",  # private
    "198.18.0.0/15",  # benchmarking
    "198.51.100.0/24",  # TEST-NET-2
    "203.0.113.0/24",  # TEST-NET-3
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, broadcast
    "::1/128",  # loopback
    "::ffff:0:0/96",  # IPv4-mapped
    "64:ff9b::/96",  # NAT64, well-known prefix
    "64:ff9b:1::/48",  # NAT64, local use
    "100::/64",  # discard-only
    "2001:db8::/32",  # documentation
    "2002::/16",  # 6to4
    "fc00::/7",  # unique local
    "fe80::/10",  # link-local
    "ff00::/8",  # multicast
)
"""Peers coturn never relays to unless a network is passed as allowed. Not ``::/128``:
coturn 4.6.1 reads a lone ``::`` as a range that matches every address, IPv4 too (it
refuses the unspecified address by itself)."""

_REALM = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,126}[A-Za-z0-9])?")
_SECRET = re.compile(r"[A-Za-z0-9_\-+/=.]{16,256}")
_USER_ID_BYTES = 12


def check_secret(secret: str) -> None:
    """Raise ValueError unless ``secret`` can be coturn's ``static-auth-secret``.

    16 to 256 characters of base64/URL-safe base64; nothing that could end the config
    line or start a comment there.
    """
    if not _SECRET.fullmatch(secret):
        raise ValueError("TURN shared secret must be 16..256 characters of A-Z a-z 0-9 _ - + / = .")


def new_secret() -> str:
    """A fresh random shared secret for coturn and the relay."""
    return secrets.token_urlsafe(32)


def read_secret(path: Path) -> str:
    """The shared secret from ``path`` (one line); refused if everyone may read the file."""
    mode = path.stat().st_mode
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ValueError(f"TURN secret file {path} is accessible to everyone (chmod o-rw)")
    secret = path.read_text().strip()
    check_secret(secret)
    return secret


@dataclass(frozen=True, slots=True)
class TurnSettings:
    """The TURN servers agents get with a call, and how the relay and coturn use them."""

    urls: tuple[str, ...] = ()
    """TURN URLs sent to agents (RFC 7065), e.g. ``turn:turn.example.com:3478?transport=udp``;
    empty: calls get no TURN server."""
    secret_file: str | None = None
    """File with the shared secret (coturn ``static-auth-secret``); see ``read_secret``."""
    realm: str = "edge-intercom"
    """coturn realm; part of the key agents derive from the credentials."""
    lifetime_s: int = 600
    """How long minted credentials can open an allocation, seconds (60..3600). An allocation
    made in time lives on through refreshes; a new one (ICE restart) needs new credentials."""
    user_quota: int = 4
    """Concurrent allocations per minted credential (one call party): one per ICE
    generation, and the old one lives on while an ICE restart makes the new one."""
    total_quota: int = 1000
    """Concurrent allocations on the whole server."""
    max_bps: int | None = None
    """Bandwidth cap per TURN session, bytes per second; None: no cap (an Opus call with
    RED needs about 10 kB/s each way)."""
    stale_nonce_s: int = 600
    """coturn's nonce lifetime; a client with an older nonce is asked to authenticate again."""

    def __post_init__(self) -> None:
        for url in self.urls:
            parse_turn_url(url)
        if not _REALM.fullmatch(self.realm):
            raise ValueError(f"TURN realm {self.realm!r} is not a DNS-like name")
        if not MIN_LIFETIME_S <= self.lifetime_s <= MAX_LIFETIME_S:
            raise ValueError(
                f"TURN lifetime_s {self.lifetime_s} is not in {MIN_LIFETIME_S}..{MAX_LIFETIME_S}"
            )
        if not 1 <= self.user_quota <= self.total_quota:
            raise ValueError("TURN quotas need 1 <= user_quota <= total_quota")
        if self.max_bps is not None and self.max_bps < 1:
            raise ValueError("TURN max_bps must be >= 1 (or None for no cap)")
        if self.stale_nonce_s < 1:
            raise ValueError("TURN stale_nonce_s must be >= 1")


@dataclass(frozen=True, slots=True)
class CallTurnCredentials:
    """TURN credentials for one call party, sent with the call (WebRTC ``RTCIceServer``)."""

    urls: tuple[str, ...]
    username: str
    """``<expiry unix time>:<opaque user id>``."""
    credential: str = field(repr=False)
    """base64(HMAC-SHA1(secret, username))."""

    @property
    def expires_at(self) -> int:
        """Unix time after which coturn refuses new allocations with these credentials."""
        return int(self.username.partition(":")[0])

    def to_json(self) -> dict[str, Any]:
        return {"urls": list(self.urls), "username": self.username, "credential": self.credential}


def call_credentials(
    settings: TurnSettings, secret: str, now: float | None = None
) -> CallTurnCredentials:
    """Fresh credentials for one call party, valid for ``settings.lifetime_s`` from ``now``.

    The user part is random (the device stays anonymous to coturn and its log) and new
    for every call, so ``user_quota`` bounds the allocations of each call party.
    """
    if not settings.urls:
        raise ValueError("no TURN URLs configured")
    check_secret(secret)
    user = secrets.token_urlsafe(_USER_ID_BYTES)  # A-Z a-z 0-9 - _: never ':'
    creds = mint_turn_credentials(secret, user, settings.lifetime_s, now)
    return CallTurnCredentials(settings.urls, creds.username, creds.password)


def _network(value: str, what: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value)
    except ValueError as exc:
        raise ValueError(f"{what} {value!r}: {exc}") from None


def coturn_range(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """A network as coturn writes peer ranges: ``first-last``, or one address."""
    if network.num_addresses == 1:
        if network.network_address.is_unspecified:
            raise ValueError(f"coturn would read {network} as every address")
        return str(network.network_address)
    return f"{network.network_address}-{network.broadcast_address}"


def _ip(value: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def _port(value: int, what: str) -> None:
    if not 0 < value < 65536:
        raise ValueError(f"{what} {value} is not in 1..65535")


def coturn_config(
    settings: TurnSettings,
    secret: str,
    *,
    listen: Sequence[str],
    port: int = 3478,
    relay_ip: str | None = None,
    relay_ports: tuple[int, int] = (49152, 65535),
    external_ip: str | None = None,
    allowed_peers: Sequence[str] = (),
    denied_peers: Sequence[str] = (),
    tls: tuple[Path, Path] | None = None,
    tls_port: int = 5349,
) -> str:
    """The text of a hardened ``turnserver.conf``.

    ``listen`` are the addresses coturn listens on (UDP and TCP, ``port``); relays are
    opened on ``relay_ip`` (default: the first listening address), ports in
    ``relay_ports``; ``external_ip`` is the public address when coturn is behind a NAT.
    ``allowed_peers`` are networks (``10.0.1.0/24``, ``127.0.0.1``) coturn may relay to
    although ``DENIED_PEER_NETWORKS`` covers them: a test lab's, or this server's own
    private relay address when two agents relaying through it must reach each other
    behind a NAT. ``denied_peers`` are denied on top. ``tls`` is (certificate, key) for
    TURN over TLS (``turns:``) on ``tls_port``; without it TLS is off. DTLS is always off.
    Logging, pid file and process user are left to the caller (append lines).
    """
    check_secret(secret)
    if not listen:
        raise ValueError("coturn needs a listening address")
    listening = [_ip(ip, "coturn listening address") for ip in listen]
    relay = _ip(relay_ip if relay_ip is not None else listening[0], "coturn relay address")
    _port(port, "coturn port")
    low, high = relay_ports
    _port(low, "coturn relay port")
    _port(high, "coturn relay port")
    if low > high:
        raise ValueError(f"coturn relay ports {low}..{high} are empty")
    allowed = [_network(n, "allowed TURN peer") for n in allowed_peers]
    for network in allowed:
        if network.prefixlen < (8 if network.version == 4 else 32):
            raise ValueError(f"allowed TURN peer {network} is too broad: it undoes the denylist")
    denied = [_network(n, "denied TURN peer") for n in (*DENIED_PEER_NETWORKS, *denied_peers)]

    lines = [f"listening-ip={ip}" for ip in listening]
    lines += [
        f"listening-port={port}",
        f"relay-ip={relay}",
        f"min-port={low}",
        f"max-port={high}",
    ]
    if external_ip is not None:
        public, slash, private = external_ip.partition("/")
        mapped = _ip(public, "coturn external address")
        if slash:
            mapped += "/" + _ip(private, "coturn external address (private part)")
        lines.append(f"external-ip={mapped}")
    lines += [
        # Authentication: TURN REST credentials only, no static users.
        "use-auth-secret",
        f"static-auth-secret={secret}",
        f"realm={settings.realm}",
        f"stale-nonce={settings.stale_nonce_s}",
        "fingerprint",
        # Quotas.
        f"user-quota={settings.user_quota}",
        f"total-quota={settings.total_quota}",
    ]
    if settings.max_bps is not None:
        lines.append(f"max-bps={settings.max_bps}")
    lines += [
        # What the server offers: UDP relays for ICE, STUN without extras, no admin.
        "no-tcp-relay",
        "no-cli",
        "no-rfc5780",
        "no-stun-backward-compatibility",
        "response-origin-only-with-rfc5780",
        "no-software-attribute",
        "no-multicast-peers",
    ]
    if any(n.is_loopback for n in allowed):
        # Loopback peers are refused before the allow list is looked at.
        lines.append("allow-loopback-peers")
    lines += [f"allowed-peer-ip={coturn_range(n)}" for n in allowed]
    lines += [f"denied-peer-ip={coturn_range(n)}" for n in denied]
    if tls is None:
        lines += ["no-tls", "no-dtls"]
    else:
        cert, key = (str(p) for p in tls)
        if any(c in s for s in (cert, key) for c in "\r\n"):
            raise ValueError("coturn TLS file names must not contain line breaks")
        _port(tls_port, "coturn TLS port")
        lines += [
            f"cert={cert}",
            f"pkey={key}",
            f"tls-listening-port={tls_port}",
            "no-tlsv1",
            "no-tlsv1_1",
            "no-dtls",
        ]
    return "\n".join(lines) + "\n"
