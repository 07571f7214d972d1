"""ICE (RFC 8445) on aioice: the media path to a peer, direct or through a TURN relay.

``IceTransport`` implements ``PushTransport`` once ``connect()`` has selected a
candidate pair. Every aioice type stays in this module: the rest of the code sees
``Candidate`` (``agent.net.candidate``), ``IceConfig`` and friends. One component only
(RTP and RTCP are muxed, RFC 5761).

What aioice 0.13 does, and what this module adds. ``_Connection`` and ``_Protocol``
below are the only places that reach into aioice: they override the methods
``get_component_candidates``, ``connect``, ``build_request``, ``check_incoming``,
``check_state``, ``_check_list_maybe_complete``, ``query_consent``, ``protocol_lost``
and ``StunProtocol.datagram_received``, and read the private ``_protocols``,
``_nominated``, ``_remote_candidates``, ``_check_list``, ``_check_list_done`` and
``aioice.Candidate._network_host`` (written against aioice 0.13.0):

* Gathering: ``Connection.gather_candidates()`` returns only when every candidate
  is known. We override its per-component step so that host candidates are
  announced at once and server-reflexive and relay candidates as each arrives
  (trickle ICE, RFC 8838), within our own gather timeout, and so that a failed
  STUN or TURN request keeps its reason (aioice drops it), e.g. "TURN allocation
  failed: 401 Unauthorized". A server-reflexive candidate equal to its host base
  is redundant (RFC 8445 section 5.1.3) and dropped.
* Servers: aioice takes one STUN and one TURN server per connection; we use the
  first of each in the configuration and log the others as ignored.
* Remote candidates may be trickled before and during ``connect()``;
  ``add_remote_candidate(None)`` is end-of-candidates, after which a failed check
  list is reported at once instead of at the timeout. (Given to aioice before
  gathering ends, it would drop our only component and gather nothing, so it is
  held back until then.)
* Consent freshness (RFC 7675): aioice checks every 5 s and gives up after 6 missed
  answers, with both numbers fixed at module level and no reason reported. We turn
  its loop off and run our own with configurable interval and timeout; expiry
  makes ``recv`` raise ``TransportClosed`` with the reason. The same task sends a
  STUN Binding indication as keep-alive (RFC 8445 section 11) when nothing else was
  sent for ``keepalive_interval``.
* Check pacing and STUN retransmissions (RTO 500 ms, 7 transmissions) are fixed in
  aioice; we bound the whole check list with ``connect_timeout`` instead.
* aioice's ``connect()`` starts a check every 20 ms and only looks at the check
  list's state after each pause, so it returns up to 20 ms after a pair was
  nominated. Ours returns at the nomination; aioice's loop finishes in a task of
  its own (it only cancels checks left over), which ``shutdown()`` stops.
* A check from the peer on a pair whose own check is still in progress sends that
  check's request again at once (once per check). RFC 8445 section 7.3.1.4 wants a
  new check there; aioice starts none and waits for the retransmission timer, which
  costs 500 ms whenever our first request was dropped because the way back was not
  open yet: the peer's TURN permission, or its NAT's mapping, came a moment after.
* ICE restart: aioice has none (the ufrag/pwd of a ``Connection`` are fixed), so
  ``restart()`` starts a new aioice connection (a new generation) with new
  credentials while the old pair keeps carrying media; once the new one connects it
  takes over and the old one is closed (make before break).
* Incoming datagrams are demultiplexed by first byte (RFC 7983): 0-3 is STUN,
  anything else is data. Garbled STUN is dropped and counted (aioice would pass
  some of it up as data, and a few malformed attributes make its parser raise
  ``struct.error``); data from an address that is not one of the peer's candidates
  is dropped and counted, like ``UdpTransport`` does.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import logging
import random
import re
import struct
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import aioice
import aioice.ice
import aioice.stun
from aioice.candidate import candidate_foundation, candidate_priority

from agent.net.candidate import MAX_PRIORITY, Candidate, CandidateType
from agent.net.transport import Address, DatagramQueue, DatagramReceiver, TransportClosed

logger = logging.getLogger(__name__)

COMPONENT = 1
"""The only ICE component: RTP and RTCP share it (RFC 5761)."""

_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+")


class IceError(ConnectionError):
    """ICE could not produce a working candidate pair; the message says why."""


def _check_port(value: int, what: str) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"{what} {value} is not in 0..65535")


# --- candidates: aioice's and ours ---------------------------------------------------------


def _from_aioice(c: aioice.Candidate) -> Candidate:
    # A peer-reflexive candidate's priority comes from the peer's PRIORITY attribute,
    # which may be any 32-bit number.
    return Candidate(
        foundation=c.foundation,
        component=c.component,
        transport=c.transport.lower(),
        priority=min(max(c.priority, 1), MAX_PRIORITY),
        host=c.host,
        port=c.port,
        type=CandidateType(c.type),
        related_address=c.related_address,
        related_port=c.related_port,
        tcptype=c.tcptype,
    )


def _to_aioice(c: Candidate) -> aioice.Candidate:
    return aioice.Candidate(
        foundation=c.foundation,
        component=c.component,
        transport=c.transport,
        priority=c.priority,
        host=c.host,
        port=c.port,
        type=c.type.value,
        related_address=c.related_address,
        related_port=c.related_port,
        tcptype=c.tcptype,
    )


# --- configuration ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TurnCredentials:
    """A TURN username and password (long-term credential mechanism, RFC 8489)."""

    username: str
    password: str

    @property
    def expires_at(self) -> int | None:
        """Unix time from a TURN REST username (``expiry:user``), else None."""
        expiry, colon, _ = self.username.partition(":")
        return int(expiry) if colon and expiry.isascii() and expiry.isdigit() else None


def mint_turn_credentials(
    secret: str, user: str, ttl: float, now: float | None = None
) -> TurnCredentials:
    """Short-lived TURN credentials for coturn's ``use-auth-secret`` (the TURN REST scheme).

    The username is ``<expiry unix time>:<user>`` and the password is
    base64(HMAC-SHA1(secret, username)); anyone holding ``secret`` (the relay, coturn)
    can check them without a user database.
    """
    if not secret:
        raise ValueError("TURN shared secret is empty")
    if ":" in user:
        raise ValueError("TURN REST user must not contain ':'")
    expiry = int((time.time() if now is None else now) + ttl)
    username = f"{expiry}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return TurnCredentials(username, base64.b64encode(digest).decode("ascii"))


@dataclass(frozen=True, slots=True)
class IceServer:
    """A STUN server, asked for our server-reflexive (public) address."""

    host: str
    """IP address or DNS name."""
    port: int = 3478

    def __post_init__(self) -> None:
        _check_port(self.port, "STUN server port")


@dataclass(frozen=True, slots=True)
class TurnServer:
    """A TURN server (RFC 8656) that relays media when no direct path works.

    Credentials are either given (``username``/``password``, e.g. minted by the
    relay and handed out with a call) or minted here from ``shared_secret``
    (coturn ``static-auth-secret``) whenever candidates are gathered.
    """

    host: str
    """IP address or DNS name."""
    port: int = 3478
    transport: Literal["udp", "tcp"] = "udp"
    """How we reach the server; the relayed address is UDP either way."""
    username: str | None = None
    password: str | None = None
    shared_secret: str | None = None
    """TURN REST shared secret; set this or ``username``/``password``."""
    credential_ttl: float = 86400.0
    """Lifetime of minted credentials, seconds. coturn may check them again when the
    allocation is refreshed, so this must outlast the longest call."""
    rest_user: str = "edge-intercom"
    """The ``user`` part of minted usernames."""

    def __post_init__(self) -> None:
        _check_port(self.port, "TURN server port")
        if self.transport not in ("udp", "tcp"):
            raise ValueError(f"TURN transport {self.transport!r} is not udp or tcp")
        given = self.username is not None or self.password is not None
        if given == (self.shared_secret is not None):
            raise ValueError("TURN server needs username/password or shared_secret (one of)")
        if given and (self.username is None or self.password is None):
            raise ValueError("TURN server needs both username and password")
        if self.credential_ttl <= 0:
            raise ValueError("TURN credential_ttl must be > 0")

    def credentials(self, now: float | None = None) -> TurnCredentials:
        if self.shared_secret is not None:
            return mint_turn_credentials(
                self.shared_secret, self.rest_user, self.credential_ttl, now
            )
        assert self.username is not None and self.password is not None
        return TurnCredentials(self.username, self.password)

    def __repr__(self) -> str:  # no secrets in logs
        return f"TurnServer({self.host}:{self.port}/{self.transport})"


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = rf"(?P<host>{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])"  # DNS name, IPv4, [IPv6]
_TURN_URL = re.compile(
    rf"(?P<scheme>turns?):{_HOST}(?::(?P<port>[0-9]{{1,5}}))?(?:\?transport=(?P<tr>udp|tcp))?"
)


def parse_turn_url(url: str) -> tuple[str, str, int, Literal["udp", "tcp"]]:
    """``turn[s]:HOST[:PORT][?transport=udp|tcp]`` (RFC 7065) to (scheme, host, port,
    transport); ``ValueError`` for anything else."""
    match = _TURN_URL.fullmatch(url)
    if match is None:
        raise ValueError(f"TURN URL {url[:200]!r} is not turn:HOST[:PORT][?transport=udp|tcp]")
    scheme = match.group("scheme")
    port = int(match.group("port") or (5349 if scheme == "turns" else 3478))
    _check_port(port, f"TURN URL {url!r}")
    transport: Literal["udp", "tcp"] = "tcp" if match.group("tr") == "tcp" else "udp"
    return scheme, match.group("host").strip("[]"), port, transport


def turn_servers_from_json(raw: object) -> tuple[TurnServer, ...]:
    """TURN servers from WebRTC ``RTCIceServer`` objects (``urls``, ``username``,
    ``credential``), as the relay sends them; ``ValueError`` if malformed. ``turns:``
    URLs are left out: aioice has no TLS to TURN servers."""
    if not isinstance(raw, list) or len(raw) > 8:
        raise ValueError("TURN servers must be a list of at most 8 RTCIceServer objects")
    servers: list[TurnServer] = []
    for entry in raw:
        if not isinstance(entry, dict):
            raise ValueError("an RTCIceServer must be an object")
        urls, user, password = entry.get("urls"), entry.get("username"), entry.get("credential")
        if isinstance(urls, str):
            urls = [urls]
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ValueError("RTCIceServer urls must be a string or a list of strings")
        if not isinstance(user, str) or not isinstance(password, str):
            raise ValueError("RTCIceServer needs a username and a credential")
        for url in urls:
            scheme, host, port, transport = parse_turn_url(url)
            if scheme == "turn":
                servers.append(TurnServer(host, port, transport, user, password))
    return tuple(servers)


@dataclass(frozen=True, slots=True)
class IceTimers:
    """ICE timers, in seconds; tests shrink them."""

    gather_timeout: float = 5.0
    """Longest wait for server-reflexive and relay candidates (host ones are immediate)."""
    connect_timeout: float = 30.0
    """Longest time ``connect()`` runs connectivity checks before giving up."""
    consent_interval: float = 5.0
    """Mean time between consent checks on the selected pair (RFC 7675: 5 s, +-20 %)."""
    consent_timeout: float = 30.0
    """Consent is lost when no check was answered for this long (RFC 7675: 30 s)."""
    keepalive_interval: float = 15.0
    """A STUN Binding indication goes out when nothing else was sent for this long
    (RFC 8445 section 11: 15 s); consent checks and media count as traffic."""
    close_timeout: float = 5.0
    """Longest wait in ``close()`` for TURN allocations to be deleted."""

    def __post_init__(self) -> None:
        for timer in fields(self):
            if getattr(self, timer.name) <= 0:
                raise ValueError(f"ICE timer {timer.name} must be > 0")


Policy = Literal["all", "relay"]


@dataclass(frozen=True, slots=True)
class IceConfig:
    """How ICE gathers candidates and how long it waits."""

    stun_servers: tuple[IceServer, ...] = ()
    """Only the first is used (aioice takes one)."""
    turn_servers: tuple[TurnServer, ...] = ()
    """Only the first is used (aioice takes one)."""
    policy: Policy = "all"
    """``relay``: gather and use relay candidates only (hides our addresses from the peer);
    needs a TURN server, configured here or sent by the relay with the call."""
    host_addresses: tuple[str, ...] | None = None
    """Local addresses for host candidates; None means every interface but loopback."""
    ipv6: bool = True
    """Gather IPv6 host candidates too (with ``host_addresses`` None)."""
    timers: IceTimers = field(default_factory=IceTimers)
    queue_size: int = 256
    """Received datagrams kept for ``recv``; when full the oldest is dropped."""

    def __post_init__(self) -> None:
        if self.policy not in ("all", "relay"):
            raise ValueError(f"ICE policy {self.policy!r} is not 'all' or 'relay'")
        if self.queue_size < 1:
            raise ValueError("ICE queue_size must be >= 1")
        for address in self.host_addresses or ():
            ipaddress.ip_address(address)


# --- results -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IceParameters:
    """Our (or the peer's) ``ice-ufrag``/``ice-pwd`` for the SDP."""

    ufrag: str
    pwd: str
    ice_lite: bool = False


@dataclass(frozen=True, slots=True)
class SelectedPair:
    """The candidate pair media flows over."""

    local: Candidate
    remote: Candidate

    @property
    def relayed(self) -> bool:
        """True when either side goes through a TURN relay."""
        return CandidateType.RELAY in (self.local.type, self.remote.type)

    def __str__(self) -> str:
        return (
            f"{self.local.type} {self.local.host}:{self.local.port} -> "
            f"{self.remote.type} {self.remote.host}:{self.remote.port}"
        )


@dataclass(frozen=True, slots=True)
class IceStats:
    bytes_sent: int
    packets_sent: int
    bytes_received: int
    packets_received: int
    dropped_overflow: int
    """Datagrams dropped because the reader fell behind (oldest first)."""
    dropped_foreign: int
    """Data datagrams from an address that is not one of the peer's candidates."""
    dropped_stun: int
    """Garbled STUN messages."""
    send_errors: int
    checks: int
    """Connectivity checks started, all generations."""
    checks_failed: int
    checks_resent: int
    """Checks whose request went again at once because the peer's check on the same pair
    came in while ours was unanswered (its way back had not been open yet)."""
    consent_checks: int
    """Consent checks sent on the selected pair (RFC 7675)."""
    consent_failures: int
    """Consent checks that got no answer (consent is lost after ``consent_timeout``)."""
    keepalives: int
    """STUN Binding indications sent because the pair was otherwise idle."""
    restarts: int
    local_type: str | None
    """Candidate type on our side of the selected pair (``relay`` when via TURN)."""
    remote_type: str | None
    failures: tuple[str, ...]
    """Why gathering or a generation's connect() failed, oldest first."""


@dataclass(slots=True)
class _Counters:
    bytes_sent: int = 0
    packets_sent: int = 0
    bytes_received: int = 0
    dropped_foreign: int = 0
    dropped_stun: int = 0
    send_errors: int = 0
    checks: int = 0
    checks_failed: int = 0
    checks_resent: int = 0
    consent_checks: int = 0
    consent_failures: int = 0
    keepalives: int = 0
    restarts: int = 0
    failures: list[str] = field(default_factory=list)


class _Inbox(DatagramQueue):
    """Received datagrams for ``recv``, shared by every generation; counts bytes too."""

    def __init__(self, size: int, counters: _Counters) -> None:
        super().__init__(size)
        self._counters = counters

    def put(self, data: bytes) -> bool:
        if not super().put(data):
            return False
        self._counters.bytes_received += len(data)
        return True


# --- the aioice edge -----------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aioice.stun.TransactionFailed):
        code = exc.response.attributes.get("ERROR-CODE")
        return f"{code[0]} {code[1]}" if code else "error response"
    if isinstance(exc, aioice.stun.TransactionTimeout):
        return "no response"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


_Found = tuple[aioice.Candidate, aioice.ice.StunProtocol | None]
"""A gathered candidate, and the protocol of its relay allocation (None for srflx)."""


class _Protocol(aioice.ice.StunProtocol):
    """aioice's per-socket protocol with RFC 7983 demultiplexing and a peer filter."""

    def __init__(self, owner: _Connection) -> None:
        super().__init__(owner)
        self._owner = owner

    def datagram_received(self, data: bytes | str, addr: tuple[Any, ...]) -> None:
        if not isinstance(data, bytes) or not data:
            return
        source: Address = (addr[0], addr[1])
        if data[0] > 3:  # RFC 7983: 0..3 is STUN; DTLS, RTP and RTCP are above
            self._owner.data_from(data, source)
            return
        try:
            message = aioice.stun.parse_message(data)
        except (ValueError, struct.error):
            self._owner.garbled(source)
            return
        try:
            if message.message_class in (aioice.stun.Class.RESPONSE, aioice.stun.Class.ERROR):
                transaction = self.transactions.get(message.transaction_id)
                if transaction is not None:
                    transaction.response_received(message, source)
            elif message.message_class == aioice.stun.Class.REQUEST:
                self._owner.request_received(message, source, self)
            # Indications (keep-alives) need no answer.
        except (ValueError, KeyError, TypeError, struct.error):
            # A well-formed message with unexpected contents; aioice trusts authenticated
            # requests to carry what ICE needs.
            logger.debug("STUN message from %s not handled", source, exc_info=True)
            self._owner.garbled(source)

    def error_received(self, exc: Exception) -> None:
        self._owner.send_error(exc)


class _Connection(aioice.Connection):
    """One ICE generation: an aioice Connection with our gathering, counters and hooks."""

    def __init__(
        self,
        config: IceConfig,
        *,
        controlling: bool,
        counters: _Counters,
        inbox: _Inbox,
        on_lost: Callable[[str], None],
        name: str,
    ) -> None:
        stun = config.stun_servers[0] if config.stun_servers else None
        turn = config.turn_servers[0] if config.turn_servers else None
        credentials = turn.credentials() if turn is not None else None
        super().__init__(
            ice_controlling=controlling,
            components=1,
            stun_server=(stun.host, stun.port) if stun is not None else None,
            turn_server=(turn.host, turn.port) if turn is not None else None,
            turn_username=credentials.username if credentials is not None else None,
            turn_password=credentials.password if credentials is not None else None,
            turn_transport=turn.transport if turn is not None else "udp",
            use_ipv6=config.ipv6,
            transport_policy=(
                aioice.TransportPolicy.RELAY
                if config.policy == "relay"
                else aioice.TransportPolicy.ALL
            ),
        )
        self.name = name
        self._config = config
        self._counters = counters
        self._inbox = inbox
        self._on_lost = on_lost
        self._turn = turn
        self.candidates: asyncio.Queue[Candidate | None] = asyncio.Queue()
        """Local candidates as they are gathered, then None."""
        self.gathered: list[Candidate] = []
        self.gather_failures: list[str] = []
        self.gather_task: asyncio.Task[None] | None = None
        self.gather_consumed = False
        self.gather_done = False
        self.remote_ended = False
        self.checks = 0
        self.checks_failed = 0
        self.checks_task: asyncio.Task[None] | None = None
        """aioice's ``connect()``, which may outlive ours by one 20 ms pause."""
        self._completed: asyncio.Future[None] | None = None
        self._requests: dict[aioice.ice.CandidatePair, aioice.stun.Message] = {}
        """Each in-progress check's request, until it is sent early once."""

    # Gathering (replaces aioice's per-component step; see the module docstring).

    def start_gathering(self) -> asyncio.Task[None]:
        if self.gather_task is None:
            self.gather_task = asyncio.create_task(
                self._gather(), name=f"ice-gather-{self.name}-{self.local_username}"
            )
        return self.gather_task

    async def _gather(self) -> None:
        try:
            await self.gather_candidates()
            self.gather_done = True
            if self.remote_ended:
                await self.add_remote_candidate(None)
        finally:
            self.candidates.put_nowait(None)

    async def end_of_candidates(self) -> None:
        """The peer has no more candidates.

        aioice drops the components without remote candidates at that moment, which
        before gathering would be all of them (and nothing would be gathered), so
        until gathering is done this is only noted, and passed on at its end.
        """
        if self.remote_ended:
            raise ValueError("end-of-candidates was already signalled")
        self.remote_ended = True
        if self.gather_done:
            await self.add_remote_candidate(None)

    def _emit(self, candidate: aioice.Candidate) -> None:
        ours = _from_aioice(candidate)
        self.gathered.append(ours)
        self.candidates.put_nowait(ours)
        logger.debug("%s: local candidate %s", self.name, ours.to_sdp())

    async def get_component_candidates(
        self,
        component: int,
        addresses: list[str],
        timeout: int = 5,  # noqa: ASYNC109 (aioice's signature; gather_timeout is used)
    ) -> list[aioice.Candidate]:
        if self._config.policy == "all" and self._config.host_addresses is not None:
            addresses = list(self._config.host_addresses)
        loop = asyncio.get_running_loop()
        found: list[aioice.Candidate] = []
        hosts: list[_Protocol] = []
        for address in addresses:
            try:
                transport, protocol = await loop.create_datagram_endpoint(
                    lambda: _Protocol(self), local_addr=(address, 0)
                )
            except OSError as exc:
                logger.info("%s: no host candidate on %s: %s", self.name, address, exc)
                continue
            host, port = transport.get_extra_info("sockname")[:2]
            protocol.local_candidate = aioice.Candidate(
                foundation=candidate_foundation("host", "udp", host),
                component=component,
                transport="udp",
                priority=candidate_priority(component, "host"),
                host=host,
                port=port,
                type="host",
            )
            self._protocols.append(protocol)
            hosts.append(protocol)
            found.append(protocol.local_candidate)
            self._emit(protocol.local_candidate)

        jobs: dict[asyncio.Task[_Found], str] = {}
        if self.stun_server is not None:
            where = f"{self.stun_server[0]}:{self.stun_server[1]}"
            for protocol in hosts:
                if ipaddress.ip_address(protocol.local_candidate.host).version == 4:
                    srflx: asyncio.Task[_Found] = asyncio.create_task(
                        aioice.ice.server_reflexive_candidate(protocol, self.stun_server)
                    )
                    jobs[srflx] = f"STUN binding to {where} from {protocol.local_candidate.host}"
        if self.turn_server is not None:
            assert self._turn is not None
            relay: asyncio.Task[_Found] = asyncio.create_task(
                aioice.ice.relayed_candidate(
                    component=component,
                    hide_related_address=self._config.policy == "relay",
                    protocol_factory=lambda: _Protocol(self),
                    turn_server=self.turn_server,
                    turn_username=self.turn_username,
                    turn_password=self.turn_password,
                    turn_ssl=False,
                    turn_transport=self.turn_transport,
                )
            )
            jobs[relay] = (
                f"TURN allocation at {self._turn.host}:{self._turn.port}/{self._turn.transport}"
            )
        if not jobs:
            return found

        pending = set(jobs)
        deadline = loop.time() + self._config.timers.gather_timeout
        try:
            while pending:
                done, pending = await asyncio.wait(
                    pending,
                    timeout=max(0.0, deadline - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not done:
                    break
                for task in done:
                    self._gathered_one(task, jobs[task], found)
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for task in pending:  # finished just before being cancelled, or timed out
            if task.cancelled():
                self._gather_failed(f"{jobs[task]} timed out")
            else:
                self._gathered_one(task, jobs[task], found)
        return found

    def _gathered_one(
        self,
        task: asyncio.Task[_Found],
        what: str,
        found: list[aioice.Candidate],
    ) -> None:
        exc = task.exception()
        if exc is not None:
            prefix = "TURN allocation failed" if what.startswith("TURN") else "STUN failed"
            self._gather_failed(f"{prefix}: {_describe(exc)} ({what})")
            return
        candidate, protocol = task.result()
        if protocol is not None:
            self._protocols.append(protocol)
        elif (candidate.host, candidate.port) == (
            candidate.related_address,
            candidate.related_port,
        ):
            logger.debug("%s: srflx candidate equals its base, dropped", self.name)
            return
        found.append(candidate)
        self._emit(candidate)

    def _gather_failed(self, reason: str) -> None:
        logger.warning("%s: %s", self.name, reason)
        self.gather_failures.append(reason)

    # Checks and consent.

    async def connect(self) -> None:
        """aioice's ``connect()``, returning as soon as every component has a nominated pair."""
        loop = asyncio.get_running_loop()
        completed = self._completed = loop.create_future()
        checks = self.checks_task = loop.create_task(
            super().connect(), name=f"ice-checks-{self.name}-{self.local_username}"
        )
        try:
            await asyncio.wait([checks, completed], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            checks.cancel()
            await asyncio.wait([checks])
            raise
        if checks.done():
            checks.result()  # ConnectionError when the check list failed

    def _check_list_maybe_complete(self) -> bool:
        # aioice reports ICE_COMPLETED exactly when this is True and the list was not done.
        was_done = self._check_list_done
        complete: bool = super()._check_list_maybe_complete()
        completed = self._completed
        if complete and not was_done and completed is not None and not completed.done():
            completed.set_result(None)
        return complete

    def build_request(self, pair: aioice.ice.CandidatePair, nominate: bool) -> aioice.stun.Message:
        request: aioice.stun.Message = super().build_request(pair, nominate)
        if pair.state == aioice.ice.CandidatePair.State.IN_PROGRESS:  # a check, not consent
            self._requests[pair] = request
        return request

    def check_incoming(
        self,
        message: aioice.stun.Message,
        addr: tuple[str, int],
        protocol: aioice.ice.StunProtocol,
    ) -> None:
        super().check_incoming(message, addr, protocol)
        pair = next(
            (p for p in self._check_list if p.protocol is protocol and p.remote_addr == addr),
            None,
        )
        if pair is None or pair.state != aioice.ice.CandidatePair.State.IN_PROGRESS:
            return
        request = self._requests.pop(pair, None)
        if request is not None:
            # The same transaction: a response to either copy completes the check.
            pair.protocol.send_stun(request, pair.remote_addr)
            self._counters.checks_resent += 1
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s: check %s sent again early, the peer's came in", self.name, pair)

    def check_state(
        self, pair: aioice.ice.CandidatePair, state: aioice.ice.CandidatePair.State
    ) -> None:
        super().check_state(pair, state)
        if state == aioice.ice.CandidatePair.State.IN_PROGRESS:
            self.checks += 1
            self._counters.checks += 1
        else:
            self._requests.pop(pair, None)
            if state == aioice.ice.CandidatePair.State.FAILED:
                self.checks_failed += 1
                self._counters.checks_failed += 1

    async def query_consent(self) -> None:
        """Turned off: ``IceTransport`` runs consent checks with its own timers."""

    def _selected(self) -> aioice.ice.CandidatePair | None:
        return self._nominated.get(COMPONENT)

    @property
    def selected_pair(self) -> SelectedPair | None:
        pair = self._selected()
        if pair is None:
            return None
        return SelectedPair(_from_aioice(pair.local_candidate), _from_aioice(pair.remote_candidate))

    async def consent_check(self) -> bool:
        """One consent check (RFC 7675) on the selected pair: True if answered."""
        pair = self._selected()
        if pair is None or self.remote_password is None:
            return False
        request = self.build_request(pair, nominate=False)
        try:
            await pair.protocol.request(
                request,
                pair.remote_addr,
                integrity_key=self.remote_password.encode("utf8"),
                retransmissions=0,
            )
        except aioice.stun.TransactionError:
            return False
        return True

    def keepalive(self) -> None:
        pair = self._selected()
        if pair is not None:
            indication = aioice.stun.Message(
                message_method=aioice.stun.Method.BINDING,
                message_class=aioice.stun.Class.INDICATION,
            )
            indication.add_fingerprint()
            pair.protocol.send_stun(indication, pair.remote_addr)

    # Data path.

    def data_from(self, data: bytes, source: Address) -> None:
        pair = self._selected()
        if (pair is not None and pair.remote_addr == source) or self._is_peer(source):
            self._inbox.put(data)
        else:
            self._counters.dropped_foreign += 1

    def _is_peer(self, source: Address) -> bool:
        return any((c._network_host, c.port) == source for c in self._remote_candidates)

    def garbled(self, source: Address) -> None:
        self._counters.dropped_stun += 1
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: garbled STUN from %s dropped", self.name, source)

    def send_error(self, exc: Exception) -> None:
        self._counters.send_errors += 1
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: socket error: %s", self.name, exc)

    def protocol_lost(self, protocol: aioice.ice.StunProtocol) -> None:
        super().protocol_lost(protocol)
        pair = self._selected()
        if pair is not None and pair.protocol is protocol:
            kind = protocol.local_candidate.type
            self._on_lost(f"the selected pair's {kind} socket closed")

    async def shutdown(self, grace: float) -> None:
        """Stop gathering and close; give up waiting for TURN deletions after ``grace`` s."""
        if self.gather_task is not None and not self.gather_task.done():
            self.gather_task.cancel()
            await asyncio.wait([self.gather_task])
        checks = self.checks_task
        if checks is not None:
            checks.cancel()
            await asyncio.wait([checks])
            if not checks.cancelled():
                checks.exception()  # connect() reported it already, or ICE completed first
        try:
            async with asyncio.timeout(grace):
                await self.close()
        except TimeoutError:
            logger.warning("%s: ICE close timed out, closing sockets", self.name)
            for protocol in self._protocols:
                protocol.transport.close()


# --- the transport ------------------------------------------------------------------


def _valid_ice_chars(value: str, low: int, what: str) -> None:
    if not (low <= len(value) <= 256 and _ICE_CHARS.fullmatch(value)):
        raise ValueError(f"{what} must be {low}..256 ice-chars (RFC 8839)")


class IceTransport:
    """A DatagramTransport over ICE; ``gather``, exchange parameters and candidates, ``connect``.

    ::

        ice = IceTransport(config, controlling=True)
        async for candidate in ice.gather():   # trickle each one to the peer
            ...
        ice.set_remote_parameters(ufrag, pwd)  # from the peer's SDP
        await ice.add_remote_candidate(c)      # as they arrive; None at the end
        await ice.connect()                    # IceError says why if no pair works
        await ice.send(b"...")
    """

    def __init__(self, config: IceConfig, *, controlling: bool, name: str = "ice") -> None:
        self._config = config
        self._name = name
        self._counters = _Counters()
        self._inbox = _Inbox(config.queue_size, self._counters)
        self._active: _Connection | None = None
        self._retired: list[_Connection] = []
        self._supervisor: asyncio.Task[None] | None = None
        self._last_sent = 0.0
        self._conn = self._new_connection(controlling)
        if len(config.stun_servers) > 1 or len(config.turn_servers) > 1:
            logger.info(
                "%s: aioice uses one STUN and one TURN server; the others are ignored", name
            )

    def _new_connection(self, controlling: bool) -> _Connection:
        return _Connection(
            self._config,
            controlling=controlling,
            counters=self._counters,
            inbox=self._inbox,
            on_lost=self._lost,
            name=self._name,
        )

    # Parameters and candidates.

    @property
    def local_parameters(self) -> IceParameters:
        """This generation's ufrag/pwd (new after ``restart()``); we are never ICE-lite."""
        return IceParameters(self._conn.local_username, self._conn.local_password, False)

    @property
    def role(self) -> Literal["controlling", "controlled"]:
        """The ICE role; a role conflict (RFC 8445 section 7.3.1.1) may change it."""
        return "controlling" if self._conn.ice_controlling else "controlled"

    @property
    def local_candidates(self) -> tuple[Candidate, ...]:
        """This generation's candidates gathered so far."""
        return tuple(self._conn.gathered)

    async def gather(self) -> AsyncGenerator[Candidate, None]:
        """Gather this generation's local candidates, yielding each as it is found.

        Host candidates come at once, then server-reflexive and relay ones as their
        servers answer (within ``gather_timeout``). Once per generation; raises
        IceError if no candidate at all could be gathered.
        """
        conn = self._conn
        if conn.gather_consumed:
            raise RuntimeError("gather() already ran for this ICE generation")
        conn.gather_consumed = True
        self._check_open()
        if self._config.policy == "relay" and not self._config.turn_servers:
            # The relay sends TURN servers with calls; configured ones are optional.
            raise IceError("ICE policy 'relay' and no TURN server (configured or from the relay)")
        task = conn.start_gathering()
        while (candidate := await conn.candidates.get()) is not None:
            yield candidate
        await self._gathered(conn, task)

    async def _gathered(self, conn: _Connection, task: asyncio.Task[None]) -> None:
        await asyncio.wait([task])
        if task.cancelled():
            raise IceError("ICE gathering was cancelled (transport closed or restarted)")
        exc = task.exception()
        if exc is not None:
            raise exc
        if not conn.gathered:
            reason = "no local candidates"
            if conn.gather_failures:
                reason += ": " + "; ".join(conn.gather_failures)
            self._counters.failures.append(reason)
            raise IceError(reason)

    def set_remote_parameters(self, ufrag: str, pwd: str, *, ice_lite: bool = False) -> None:
        """The peer's ``ice-ufrag``/``ice-pwd`` for this generation (ValueError if malformed)."""
        _valid_ice_chars(ufrag, 4, "ice-ufrag")
        _valid_ice_chars(pwd, 22, "ice-pwd")
        self._conn.remote_username = ufrag
        self._conn.remote_password = pwd
        self._conn.remote_is_lite = ice_lite

    async def add_remote_candidate(self, candidate: Candidate | None) -> None:
        """Add a peer candidate (trickled any time before or during connect); None ends them.

        Candidates we cannot pair with (TCP, another component) are ignored; after
        end-of-candidates a ValueError is raised.
        """
        conn = self._conn
        if candidate is None:
            await conn.end_of_candidates()
        elif conn.remote_ended:
            raise ValueError("remote candidate after end-of-candidates")
        elif candidate.component != COMPONENT or candidate.transport != "udp":
            logger.debug("%s: remote candidate ignored: %s", self._name, candidate.to_sdp())
        else:
            await conn.add_remote_candidate(_to_aioice(candidate))

    # Connecting.

    async def connect(self) -> None:
        """Run connectivity checks for this generation until a pair is selected.

        Gathers first if ``gather()`` was not used. Raises IceError with the reason
        when no pair works: at once after end-of-candidates, else at
        ``connect_timeout``. After a restart, media keeps flowing over the old pair
        until this succeeds; if it fails, the old pair stays.
        """
        self._check_open()
        conn = self._conn
        if conn is self._active:
            return
        if conn.remote_username is None or conn.remote_password is None:
            raise IceError("remote ICE parameters (ufrag/pwd) are not set")
        try:
            await self._gathered(conn, conn.start_gathering())
            timeout = self._config.timers.connect_timeout
            try:
                async with asyncio.timeout(timeout):
                    await conn.connect()
            except TimeoutError:
                raise IceError(self._failure(conn, f"timed out after {timeout:g} s")) from None
            except ConnectionError:
                if self._inbox.closed_reason is not None:
                    raise TransportClosed(self._inbox.closed_reason) from None
                if conn is not self._conn:
                    raise IceError("ICE restarted while connecting") from None
                raise IceError(self._failure(conn, "end-of-candidates received")) from None
        except BaseException:
            if conn is not self._active:
                await self._retire(conn)
            raise
        old, self._active = self._active, conn
        self._last_sent = asyncio.get_running_loop().time()
        logger.info("%s: ICE connected via %s", self._name, conn.selected_pair)
        if old is not None:
            await self._retire(old)
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(
                self._supervise(), name=f"ice-consent-{self._name}"
            )

    def _failure(self, conn: _Connection, how: str) -> str:
        if not conn.remote_candidates:
            reason = f"no remote candidates ({how})"
        elif conn.checks == 0:
            reason = (
                f"no candidate pair could be formed with {len(conn.remote_candidates)} "
                f"remote candidates ({how})"
            )
        else:
            reason = f"no candidate pair succeeded after {conn.checks} checks ({how})"
        if conn.gather_failures:
            reason += "; " + "; ".join(conn.gather_failures)
        logger.warning("%s: ICE failed: %s", self._name, reason)
        self._counters.failures.append(reason)
        return reason

    async def restart(self) -> None:
        """Start an ICE restart (RFC 8445 section 9): a new generation with new ufrag/pwd.

        Then, as for the first connection: ``gather()``, send ``local_parameters``
        and the candidates to the peer, ``set_remote_parameters``,
        ``add_remote_candidate``, ``connect()``. Media keeps flowing over the
        current pair meanwhile. A negotiation still in progress is abandoned.
        """
        self._check_open()
        old = self._conn
        controlling = old.ice_controlling
        self._conn = self._new_connection(controlling)
        self._counters.restarts += 1
        if old is not self._active:
            await self._retire(old)

    @property
    def selected_pair(self) -> SelectedPair | None:
        """The pair media flows over, once connected."""
        return self._active.selected_pair if self._active is not None else None

    @property
    def stats(self) -> IceStats:
        c = self._counters
        pair = self.selected_pair
        return IceStats(
            bytes_sent=c.bytes_sent,
            packets_sent=c.packets_sent,
            bytes_received=c.bytes_received,
            packets_received=self._inbox.queued,
            dropped_overflow=self._inbox.dropped,
            dropped_foreign=c.dropped_foreign,
            dropped_stun=c.dropped_stun,
            send_errors=c.send_errors,
            checks=c.checks,
            checks_failed=c.checks_failed,
            checks_resent=c.checks_resent,
            consent_checks=c.consent_checks,
            consent_failures=c.consent_failures,
            keepalives=c.keepalives,
            restarts=c.restarts,
            local_type=pair.local.type if pair is not None else None,
            remote_type=pair.remote.type if pair is not None else None,
            failures=tuple(c.failures),
        )

    # DatagramTransport.

    async def send(self, data: bytes) -> None:
        if self._inbox.closed_reason is not None:
            raise TransportClosed(self._inbox.closed_reason)
        conn = self._active
        if conn is None:
            raise TransportClosed("ICE is not connected yet")
        try:
            await conn.send(data)
        except ConnectionError as exc:
            self._lost(f"ICE connection lost: {exc}")
            raise TransportClosed(self._inbox.closed_reason or "ICE connection lost") from None
        self._counters.packets_sent += 1
        self._counters.bytes_sent += len(data)
        self._last_sent = asyncio.get_running_loop().time()

    async def recv(self) -> bytes:
        """Next datagram from the peer; TransportClosed (with the reason) once closed."""
        return await self._inbox.get()

    def attach(self, receiver: DatagramReceiver) -> None:
        """Hand each datagram to ``receiver`` as it arrives (see ``PushTransport``)."""
        self._inbox.attach(receiver)

    def detach(self) -> None:
        self._inbox.detach()

    async def close(self) -> None:
        """Stop consent checks, close every generation and delete TURN allocations."""
        self._inbox.close("ICE transport closed", discard=True)
        supervisor = self._supervisor
        if supervisor is not None:
            supervisor.cancel()
            await asyncio.wait([supervisor])
            if not supervisor.cancelled() and supervisor.exception() is not None:
                logger.error("%s: consent task failed", self._name, exc_info=supervisor.exception())
        conns = [self._conn, self._active, *self._retired]
        unique = [c for i, c in enumerate(conns) if c is not None and c not in conns[:i]]
        for conn in unique:
            await conn.shutdown(self._config.timers.close_timeout)

    # Internals.

    async def _retire(self, conn: _Connection) -> None:
        """Close a generation that is no longer needed (kept listed until it is closed)."""
        self._retired.append(conn)
        await conn.shutdown(self._config.timers.close_timeout)
        self._retired.remove(conn)

    def _check_open(self) -> None:
        if self._inbox.closed_reason is not None:
            raise TransportClosed(self._inbox.closed_reason)

    def _lost(self, reason: str) -> None:
        if self._inbox.closed_reason is None:
            logger.warning("%s: %s", self._name, reason)
        self._inbox.close(reason)

    async def _supervise(self) -> None:
        """Consent freshness (RFC 7675) and keep-alives on the selected pair."""
        timers = self._config.timers
        loop = asyncio.get_running_loop()

        def jittered() -> float:
            return timers.consent_interval * (0.8 + 0.4 * random.random())

        conn = self._active
        last_answer = loop.time()
        next_check = last_answer + jittered()
        while self._inbox.closed_reason is None:
            if self._active is not conn:  # a restart took over: fresh consent
                conn, last_answer = self._active, loop.time()
            assert conn is not None
            now = loop.time()
            if now - last_answer >= timers.consent_timeout:
                self._lost(
                    f"ICE consent expired: the peer did not answer for {now - last_answer:.1f} s"
                )
                return
            if now - self._last_sent >= timers.keepalive_interval:
                conn.keepalive()
                self._counters.keepalives += 1
                self._last_sent = now
            wake = min(
                next_check,
                self._last_sent + timers.keepalive_interval,
                last_answer + timers.consent_timeout,
            )
            await asyncio.sleep(max(0.0, wake - now))
            if loop.time() >= next_check:
                self._counters.consent_checks += 1
                answered = await conn.consent_check()
                self._last_sent = loop.time()
                if self._active is conn:
                    if answered:
                        last_answer = loop.time()
                    else:
                        self._counters.consent_failures += 1
                next_check = loop.time() + jittered()
