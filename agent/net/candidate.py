"""ICE candidates (RFC 8445) and their SDP form, the ``candidate`` attribute (RFC 8839 5.1).

Pure: a frozen dataclass that checks itself, its parser and its formatter. SDP
descriptions, trickled candidates and the ICE transport all use this one type. The text
comes from the network, so anything malformed is a ``CandidateError`` saying what is
wrong, never another exception.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass

MAX_PRIORITY = 2**31 - 1
"""RFC 8445 section 5.1.2: priorities are 1..2**31-1."""

_FOUNDATION = re.compile(r"[A-Za-z0-9+/]{1,32}")  # 1..32 ice-chars
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_DIGITS = re.compile(r"[0-9]+")
_TRANSPORTS = ("udp", "tcp")
_TCP_TYPES = ("active", "passive", "so")
_KEPT_EXTENSIONS = ("raddr", "rport", "tcptype")


class CandidateError(ValueError):
    """A candidate that is malformed or out of range; the message says what is wrong."""


class CandidateType(enum.StrEnum):
    HOST = "host"
    SRFLX = "srflx"
    PRFLX = "prflx"
    RELAY = "relay"


def is_host(text: str) -> bool:
    """An IP address (IPv6 with or without a zone id, ``fe80::1%eth0``) or a DNS name: an
    mDNS ``<uuid>.local`` from a browser, a TURN server's name (RFC 1123 labels)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return len(text) <= 253 and _HOSTNAME.fullmatch(text) is not None
    return True


def _check_host(value: object, what: str) -> None:
    if not (isinstance(value, str) and is_host(value)):
        raise CandidateError(
            f"candidate {what} {str(value)[:40]!r} is neither an IP address nor a host name"
        )


def _check_range(value: object, low: int, high: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CandidateError(f"candidate {what} {str(value)[:24]!r} is not an integer")
    if not low <= value <= high:
        raise CandidateError(f"candidate {what} {value} out of range {low}..{high}")


def _kind(value: str) -> CandidateType:
    try:
        return CandidateType(value)
    except ValueError:
        names = ", ".join(CandidateType)
        raise CandidateError(f"candidate type {str(value)[:24]!r} is not one of {names}") from None


def _number(token: str, what: str) -> int:
    if not _DIGITS.fullmatch(token):
        raise CandidateError(f"candidate {what} {token[:24]!r} is not a number")
    if len(token.lstrip("0")) > 10:  # more than any field allows; int() of it may be slow
        raise CandidateError(f"candidate {what} {token[:24]!r} out of range")
    return int(token)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One ICE candidate, as the SDP ``candidate`` attribute carries it (RFC 8839 5.1)."""

    foundation: str
    """1..32 ice-chars; candidates with the same foundation share a base and a server."""
    component: int
    """1..256; ours are always 1 (RTP and RTCP muxed, RFC 5761)."""
    transport: str
    """``udp`` or ``tcp``, lower case."""
    priority: int
    """1..2**31-1 (RFC 8445 section 5.1.2)."""
    host: str
    """An IP address or a host name (see ``is_host``), as the peer wrote it."""
    port: int
    """0..65535 (TCP active candidates use 9, the discard port)."""
    type: CandidateType
    related_address: str | None = None
    """``raddr``: the base or mapped address behind a srflx, prflx or relay candidate."""
    related_port: int | None = None
    """``rport``, 0..65535."""
    tcptype: str | None = None
    """``active``, ``passive`` or ``so``; TCP candidates only (RFC 6544)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.foundation, str) and _FOUNDATION.fullmatch(self.foundation)):
            raise CandidateError(
                f"candidate foundation {str(self.foundation)[:40]!r} is not 1..32 ice-chars"
            )
        _check_range(self.component, 1, 256, "component")
        if self.transport not in _TRANSPORTS:
            raise CandidateError(
                f"candidate transport {str(self.transport)[:24]!r} is not udp or tcp"
            )
        _check_range(self.priority, 1, MAX_PRIORITY, "priority")
        _check_host(self.host, "address")
        _check_range(self.port, 0, 0xFFFF, "port")
        object.__setattr__(self, "type", _kind(self.type))  # "host" becomes CandidateType.HOST
        if self.related_address is not None:
            _check_host(self.related_address, "raddr")
        if self.related_port is not None:
            _check_range(self.related_port, 0, 0xFFFF, "rport")
        if self.tcptype is not None:
            if self.transport != "tcp":
                raise CandidateError("candidate tcptype is only for tcp candidates")
            if self.tcptype not in _TCP_TYPES:
                raise CandidateError(
                    f"candidate tcptype {str(self.tcptype)[:24]!r} is not one of "
                    f"{', '.join(_TCP_TYPES)}"
                )

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @classmethod
    def parse(cls, text: str) -> Candidate:
        """Parse a ``candidate`` attribute value; the ``candidate:`` prefix is optional.

        Extensions other than raddr, rport and tcptype (``generation``, ``ufrag``,
        ``network-id``, ``network-cost``, ...) are dropped. Raises CandidateError; a
        trickled candidate that cannot be used should be skipped, not end the call.
        """
        fields = text.strip().removeprefix("candidate:").split()
        if len(fields) < 8:
            raise CandidateError(
                "candidate needs 8 fields: '<foundation> <component> <transport> "
                "<priority> <address> <port> typ <type>'"
            )
        if fields[6] != "typ":
            raise CandidateError(f"candidate field 7 is {fields[6][:24]!r}, expected 'typ'")
        extensions = fields[8:]
        if len(extensions) % 2:
            raise CandidateError("candidate extensions must be name/value pairs")
        kept: dict[str, str] = {}
        for name, value in zip(extensions[::2], extensions[1::2], strict=True):
            if name in _KEPT_EXTENSIONS:
                if name in kept:
                    raise CandidateError(f"candidate has {name} twice")
                kept[name] = value
        rport = kept.get("rport")
        return cls(
            foundation=fields[0],
            component=_number(fields[1], "component"),
            transport=fields[2].lower(),
            priority=_number(fields[3], "priority"),
            host=fields[4],
            port=_number(fields[5], "port"),
            type=_kind(fields[7]),
            related_address=kept.get("raddr"),
            related_port=None if rport is None else _number(rport, "rport"),
            tcptype=kept.get("tcptype"),
        )

    def to_sdp(self) -> str:
        """The attribute value, without the ``candidate:`` prefix (and without ``a=``)."""
        text = (
            f"{self.foundation} {self.component} {self.transport} {self.priority} "
            f"{self.host} {self.port} typ {self.type}"
        )
        if self.related_address is not None:
            text += f" raddr {self.related_address}"
        if self.related_port is not None:
            text += f" rport {self.related_port}"
        if self.tcptype is not None:
            text += f" tcptype {self.tcptype}"
        return text
