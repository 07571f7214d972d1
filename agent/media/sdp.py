"""SDP for the WebRTC audio subset (RFC 8866, RFC 3264, RFC 8839/8840, RFC 8122, RFC 7587).

Pure functions over text and frozen dataclasses; signaling carries the text. ``parse``
copies session-level ICE, DTLS and direction attributes into every m-section, so each
``MediaSection`` says what applies to it, and ``serialize`` writes them at media level as
browsers do. Unknown attributes (extmap, rtcp-rsize, sctp-port, ...) are skipped; values of
the attributes modelled here are checked, and anything malformed is an ``SdpError`` with its
line number, never another exception: the text comes from the network. ICE candidates are
``agent.net.candidate.Candidate``; a malformed ``a=candidate`` line is an ``SdpError`` too.

Offer/answer: ``create_offer`` and ``negotiate`` build our side from ``LocalParameters``;
``negotiate`` and ``apply_answer`` yield the same ``NegotiatedMedia`` whichever side offered.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.net.candidate import Candidate, CandidateError, is_host

logger = logging.getLogger(__name__)

MAX_SDP_LENGTH = 1 << 20
"""Longer input is refused before it is split; a browser's offer is a few kilobytes."""
RTP_PROTOCOL = "UDP/TLS/RTP/SAVPF"
END_OF_CANDIDATES = "end-of-candidates"
SUPPORTED_FINGERPRINTS = ("sha-256", "sha-384", "sha-512")

_DIGEST_SIZES = {"md5": 16, "sha-1": 20, "sha-224": 28, "sha-256": 32, "sha-384": 48, "sha-512": 64}
_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+")
_HEX_PAIRS = re.compile(r"[0-9A-F]{2}(?::[0-9A-F]{2})*")
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
_PROTOCOL = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~/]+")
_DIGITS = re.compile(r"[0-9]{1,20}")


class SdpError(ValueError):
    """Text that is not an SDP we accept, or an offer/answer we cannot agree to."""

    def __init__(self, reason: str, line: int | None = None, text: str | None = None) -> None:
        where = f"line {line}: " if line is not None else ""
        shown = f" in {text[:80]!r}" if text is not None else ""
        super().__init__(f"SDP {where}{reason}{shown}")
        self.reason = reason
        self.line = line


class Direction(enum.StrEnum):
    SENDRECV = "sendrecv"
    SENDONLY = "sendonly"
    RECVONLY = "recvonly"
    INACTIVE = "inactive"

    @property
    def sends(self) -> bool:
        return self in (Direction.SENDRECV, Direction.SENDONLY)

    @property
    def receives(self) -> bool:
        return self in (Direction.SENDRECV, Direction.RECVONLY)

    @classmethod
    def of(cls, *, sends: bool, receives: bool) -> Direction:
        if sends:
            return cls.SENDRECV if receives else cls.SENDONLY
        return cls.RECVONLY if receives else cls.INACTIVE

    def reversed(self) -> Direction:
        """The same stream as the other end describes it."""
        return Direction.of(sends=self.receives, receives=self.sends)


_DIRECTIONS = frozenset(d.value for d in Direction)


class Setup(enum.StrEnum):
    """RFC 4145 a=setup: ``active`` is the DTLS client, ``passive`` the server."""

    ACTPASS = "actpass"
    ACTIVE = "active"
    PASSIVE = "passive"


@dataclass(frozen=True, slots=True)
class Fingerprint:
    algorithm: str  # lower case, e.g. "sha-256"
    value: str  # upper-case hex pairs joined by colons


@dataclass(frozen=True, slots=True)
class Codec:
    """An a=rtpmap with its a=fmtp and a=rtcp-fb lines."""

    payload_type: int
    name: str  # as written: compare case-insensitively
    clock_rate: int
    channels: int | None = None
    fmtp: str | None = None  # raw: "minptime=10;useinbandfec=1", RED's "111/111", "0-15"
    rtcp_fb: tuple[str, ...] = ()  # "transport-cc", "nack pli"; "*" lines copied to each codec

    @property
    def parameters(self) -> dict[str, str]:
        """The fmtp's key=value pairs, keys lower-cased; entries without '=' are left out."""
        pairs: dict[str, str] = {}
        for item in (self.fmtp or "").split(";"):
            key, sep, value = item.partition("=")
            if sep:
                pairs.setdefault(key.strip().lower(), value.strip())
        return pairs

    def matches(self, name: str, clock_rate: int, channels: int | None = None) -> bool:
        """Same encoding: ``name`` in lower case; ``channels`` None means any."""
        return (
            self.name.lower() == name
            and self.clock_rate == clock_rate
            and (channels is None or self.channels == channels)
        )


@dataclass(frozen=True, slots=True)
class Ssrc:
    ssrc: int
    cname: str


@dataclass(frozen=True, slots=True)
class Origin:
    session_id: int
    session_version: int
    username: str = "-"
    address: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class MediaSection:
    """One m-section with session-level defaults already applied."""

    kind: str  # "audio", "video", "application", ...
    port: int  # 0: rejected (RFC 3264 section 6)
    protocol: str
    formats: tuple[str, ...]  # the m-line's fmt list; payload types for RTP
    connection: str | None = None
    mid: str | None = None
    direction: Direction | None = None  # None: not stated, which means sendrecv for RTP
    rtcp_mux: bool = False
    ice_ufrag: str | None = None
    ice_pwd: str | None = None
    ice_options: tuple[str, ...] = ()
    fingerprints: tuple[Fingerprint, ...] = ()
    setup: Setup | None = None
    codecs: tuple[Codec, ...] = ()  # in m-line order; payload types with an a=rtpmap only
    ssrcs: tuple[Ssrc, ...] = ()
    msid: str | None = None
    candidates: tuple[Candidate, ...] = ()
    end_of_candidates: bool = False

    @property
    def rejected(self) -> bool:
        return self.port == 0


@dataclass(frozen=True, slots=True)
class SessionDescription:
    origin: Origin
    media: tuple[MediaSection, ...]
    bundle: tuple[str, ...] = ()  # mids of the first a=group:BUNDLE
    ice_lite: bool = False
    name: str = "-"


@dataclass(frozen=True, slots=True)
class LocalParameters:
    """What we put into our offer or answer."""

    ice_ufrag: str
    """4..256 ice-chars (RFC 8839); the ICE agent must use the same."""
    ice_pwd: str
    """22..256 ice-chars."""
    fingerprint: Fingerprint
    """Of our DTLS certificate: what binds the media keys to the device identity."""
    ssrc: int
    cname: str
    session_id: int
    """o= session id: random per session, at most 63 bits (RFC 8866 section 5.2)."""
    session_version: int = 1
    """Raise on each new offer of the same session."""
    direction: Direction = Direction.SENDRECV
    """What we want; an answer narrows it to what the offer allows."""
    candidates: tuple[Candidate, ...] = ()
    """Known now; the rest are trickled (the m-line then carries port 9, RFC 8840)."""
    end_of_candidates: bool = False
    ice_lite: bool = False
    opus_payload_type: int = 111
    """Used in our offers; an answer reuses the offer's payload types."""
    red_payload_type: int | None = 63
    """RED (RFC 2198) over opus; None: neither offer nor accept it."""
    telephone_event_payload_type: int | None = None
    """telephone-event/48000 (RFC 4733); None: neither offer nor accept it."""
    prefer_red: bool = False
    """List RED before opus: libwebrtc peers send RED only when it comes first."""
    fec: bool = True
    """Ask the peer for Opus in-band FEC (useinbandfec=1)."""
    answer_setup: Setup = Setup.ACTIVE
    """Our DTLS role when answering an actpass offer; browsers answer active."""
    msid: str | None = None
    """a=msid value, "<stream id> <track id>"; browsers use it to name the remote track."""

    def __post_init__(self) -> None:
        _ice_credential(self.ice_ufrag, 4, "ice-ufrag")
        _ice_credential(self.ice_pwd, 22, "ice-pwd")
        if self.fingerprint.algorithm not in SUPPORTED_FINGERPRINTS:
            raise ValueError(f"fingerprint algorithm {self.fingerprint.algorithm} unsupported")
        if self.answer_setup is Setup.ACTPASS:
            raise ValueError("answer_setup must be active or passive")
        if not 0 <= self.ssrc <= 0xFFFFFFFF:
            raise ValueError(f"ssrc {self.ssrc} out of range")
        pts = [self.opus_payload_type, self.red_payload_type, self.telephone_event_payload_type]
        chosen = [pt for pt in pts if pt is not None]
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"payload types {chosen} must differ")
        for pt in chosen:
            if not (96 <= pt <= 127 or 35 <= pt <= 63):
                raise ValueError(f"payload type {pt} is not a dynamic one")


@dataclass(frozen=True, slots=True)
class NegotiatedMedia:
    """What both ends agreed for the audio m-section; the same from either side."""

    mid: str | None
    mline_index: int  # with mid, matches trickled candidates' sdpMid/sdpMLineIndex
    opus_payload_type: int
    red_payload_type: int | None
    telephone_event_payload_type: int | None
    remote_fec: bool  # the peer asked for in-band FEC in what we send
    direction: Direction  # ours
    dtls_role: Setup  # ours: ACTIVE is the DTLS client
    ice_controlling: bool  # ours (RFC 8445 section 6.1.1)
    remote_ice_ufrag: str
    remote_ice_pwd: str
    remote_ice_lite: bool
    remote_fingerprints: tuple[Fingerprint, ...]  # supported algorithms only
    remote_candidates: tuple[Candidate, ...]
    remote_end_of_candidates: bool
    remote_ssrc: int | None

    @property
    def red(self) -> bool:
        return self.red_payload_type is not None


# -- small field parsers: each raises SdpError without a line; parse() adds it ---------------


def _number(text: str, low: int, high: int, what: str) -> int:
    if not _DIGITS.fullmatch(text):
        raise SdpError(f"{what} {text[:24]!r} is not a number")
    value = int(text)
    if not low <= value <= high:
        raise SdpError(f"{what} {value} out of range {low}..{high}")
    return value


def _token(text: str, what: str) -> str:
    if not _TOKEN.fullmatch(text):
        raise SdpError(f"{what} {text[:24]!r} is not a token")
    return text


def _addrtype(address: str) -> str:
    return "IP6" if ":" in address else "IP4"


def _ice_credential(text: str, minimum: int, what: str) -> str:
    if not minimum <= len(text) <= 256 or not _ICE_CHARS.fullmatch(text):
        raise SdpError(f"{what} must be {minimum}..256 characters of A-Z a-z 0-9 + /")
    return text


def _setup(text: str) -> Setup:
    try:
        return Setup(text)
    except ValueError:
        raise SdpError(f"setup {text[:24]!r} is not actpass, active or passive") from None


def _fingerprint(value: str) -> Fingerprint:
    parts = value.split()
    if len(parts) != 2:
        raise SdpError("fingerprint needs '<hash> <hex:hex:...>'")
    algorithm, digest = parts[0].lower(), parts[1].upper()
    _token(algorithm, "fingerprint hash")
    size = _DIGEST_SIZES.get(algorithm)
    if not _HEX_PAIRS.fullmatch(digest) or (size is not None and len(digest) != 3 * size - 1):
        raise SdpError(f"{algorithm} fingerprint is not {size or 'n'} colon-separated hex bytes")
    return Fingerprint(algorithm, digest)


# -- trickle and fingerprint helpers ---------------------------------------------------------


def is_end_of_candidates(text: str) -> bool:
    """True for ``end-of-candidates`` (with or without ``a=``) and for the empty candidate
    string browsers hand out when gathering completes."""
    return text.strip().removeprefix("a=") in ("", END_OF_CANDIDATES)


def fingerprint_of(der: bytes, algorithm: str = "sha-256") -> Fingerprint:
    """The a=fingerprint of a DER certificate: upper-case colon hex (RFC 8122)."""
    if algorithm not in SUPPORTED_FINGERPRINTS:
        raise ValueError(f"fingerprint algorithm {algorithm!r} unsupported")
    digest = hashlib.new(algorithm.replace("-", ""), der).hexdigest().upper()
    return Fingerprint(algorithm, ":".join(digest[i : i + 2] for i in range(0, len(digest), 2)))


def fingerprints_equal(a: Fingerprint, b: Fingerprint) -> bool:
    """Case-insensitive, and in constant time for equal-length values (RFC 8122 hex may be
    either case; the comparison guards the key binding, so it should not leak a prefix)."""
    same_value = hmac.compare_digest(a.value.upper().encode(), b.value.upper().encode())
    return same_value and a.algorithm.lower() == b.algorithm.lower()


def certificate_matches(der: bytes, fingerprints: Iterable[Fingerprint]) -> bool:
    """Whether the peer's DTLS certificate matches any supported fingerprint it signalled."""
    matched = False
    for expected in fingerprints:
        algorithm = expected.algorithm.lower()
        if algorithm in SUPPORTED_FINGERPRINTS:
            matched |= fingerprints_equal(fingerprint_of(der, algorithm), expected)
    return matched


# -- parse -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Block:
    """Session- or media-level attributes as parsed so far (the session uses a subset)."""

    line: int
    kind: str = ""
    port: int = 0
    protocol: str = ""
    formats: tuple[str, ...] = ()
    connection: str | None = None
    mid: str | None = None
    direction: Direction | None = None
    rtcp_mux: bool = False
    ice_ufrag: str | None = None
    ice_pwd: str | None = None
    ice_options: tuple[str, ...] | None = None
    fingerprints: list[Fingerprint] = field(default_factory=list)
    setup: Setup | None = None
    msid: str | None = None
    end_of_candidates: bool = False
    rtpmap: dict[int, tuple[str, int, int | None]] = field(default_factory=dict)
    fmtp: dict[int, str] = field(default_factory=dict)
    rtcp_fb: list[tuple[int | None, str]] = field(default_factory=list)
    ssrcs: dict[int, str] = field(default_factory=dict)
    candidates: list[Candidate] = field(default_factory=list)


def _is_rtp(protocol: str) -> bool:
    return "RTP/" in protocol.upper()


def _media_line(value: str, line: int) -> _Block:
    fields = value.split()
    if len(fields) < 4:
        raise SdpError("m= needs '<media> <port> <protocol> <format>...'")
    protocol = fields[2]
    if not _PROTOCOL.fullmatch(protocol):
        raise SdpError(f"protocol {protocol[:24]!r} is not a token")
    formats = fields[3:]
    if _is_rtp(protocol):
        formats = [str(_number(fmt, 0, 127, "payload type")) for fmt in formats]
        if len(set(formats)) != len(formats):
            raise SdpError("payload type listed twice")
    return _Block(
        line=line,
        kind=_token(fields[0], "media"),
        port=_number(fields[1].partition("/")[0], 0, 0xFFFF, "port"),
        protocol=protocol,
        formats=tuple(formats),
    )


def _connection(value: str) -> str:
    fields = value.split()
    if len(fields) != 3 or fields[0] != "IN" or fields[1] not in ("IP4", "IP6"):
        raise SdpError("c= needs 'IN IP4|IP6 <address>'")
    address = fields[2].partition("/")[0]
    if not is_host(address):
        raise SdpError(f"c= address {address[:40]!r} is neither an IP address nor a host name")
    return address


def _origin(value: str) -> Origin:
    fields = value.split()
    if len(fields) != 6 or fields[3] != "IN":
        raise SdpError("o= needs '<user> <session id> <version> IN <addrtype> <address>'")
    return Origin(
        session_id=_number(fields[1], 0, 10**20, "session id"),
        session_version=_number(fields[2], 0, 10**20, "session version"),
        username=fields[0],
        address=fields[5],
    )


def _attribute(block: _Block, name: str, value: str, *, media: bool) -> None:
    """Apply one a= line; at session level only the attributes media sections inherit."""
    value = value.strip()
    if name == "ice-ufrag":
        block.ice_ufrag = _ice_credential(value, 4, "ice-ufrag")
    elif name == "ice-pwd":
        block.ice_pwd = _ice_credential(value, 22, "ice-pwd")
    elif name == "ice-options":
        block.ice_options = tuple(value.split())
    elif name == "fingerprint":
        block.fingerprints.append(_fingerprint(value))
    elif name == "setup":
        block.setup = _setup(value)
    elif name in _DIRECTIONS:
        block.direction = Direction(name)
    elif name == END_OF_CANDIDATES:
        block.end_of_candidates = True
    elif media:
        _media_attribute(block, name, value)


def _media_attribute(block: _Block, name: str, value: str) -> None:
    head, _, rest = value.partition(" ")
    rest = rest.strip()
    if name == "candidate":
        try:
            block.candidates.append(Candidate.parse(value))
        except CandidateError as exc:
            raise SdpError(str(exc)) from None
    elif name == "rtcp-mux":
        block.rtcp_mux = True
    elif name == "mid":
        if block.mid is not None:
            raise SdpError("second a=mid in one m-section")
        if len(value.split()) != 1:
            raise SdpError("a=mid needs one identification tag")
        block.mid = value
    elif name == "msid":
        if not value:
            raise SdpError("empty a=msid")
        block.msid = block.msid or value
    elif name == "ssrc":
        ssrc = _number(head, 0, 0xFFFFFFFF, "ssrc")
        attribute, _, cname = rest.partition(":")
        if not attribute:
            raise SdpError("a=ssrc needs '<ssrc> <attribute>'")
        if attribute == "cname":
            if not cname.strip():
                raise SdpError("empty cname")
            block.ssrcs.setdefault(ssrc, cname.strip())
    elif name == "rtcp-fb":
        if not rest:
            raise SdpError("a=rtcp-fb needs '<payload type>|* <feedback>'")
        target = None if head == "*" else _number(head, 0, 127, "payload type")
        block.rtcp_fb.append((target, rest))
    elif name == "fmtp":
        pt = _number(head, 0, 127, "payload type")
        if pt in block.fmtp:
            raise SdpError(f"second a=fmtp for payload type {pt}")
        if rest:
            block.fmtp[pt] = rest
    elif name == "rtpmap":
        pt = _number(head, 0, 127, "payload type")
        if pt in block.rtpmap:
            raise SdpError(f"second a=rtpmap for payload type {pt}")
        parts = rest.split("/")
        if len(parts) not in (2, 3):
            raise SdpError("a=rtpmap needs '<pt> <name>/<clock rate>[/<channels>]'")
        channels = _number(parts[2], 1, 255, "channels") if len(parts) == 3 else None
        rate = _number(parts[1], 1, 0xFFFFFFFF, "clock rate")
        block.rtpmap[pt] = (_token(parts[0], "encoding name"), rate, channels)


def _section(block: _Block, session: _Block, index: int) -> MediaSection:
    """Apply session-level defaults, collect the codecs and check what a live section needs."""
    codecs = []
    for fmt in block.formats if _is_rtp(block.protocol) else ():
        pt = int(fmt)
        if pt in block.rtpmap:
            name, rate, channels = block.rtpmap[pt]
            feedback = tuple(fb for target, fb in block.rtcp_fb if target in (None, pt))
            codecs.append(Codec(pt, name, rate, channels, block.fmtp.get(pt), feedback))
    options = block.ice_options if block.ice_options is not None else session.ice_options
    section = MediaSection(
        kind=block.kind,
        port=block.port,
        protocol=block.protocol,
        formats=block.formats,
        connection=block.connection or session.connection,
        mid=block.mid,
        direction=block.direction or session.direction,
        rtcp_mux=block.rtcp_mux,
        ice_ufrag=block.ice_ufrag or session.ice_ufrag,
        ice_pwd=block.ice_pwd or session.ice_pwd,
        ice_options=options or (),
        fingerprints=tuple(block.fingerprints or session.fingerprints),
        setup=block.setup or session.setup,
        codecs=tuple(codecs),
        ssrcs=tuple(Ssrc(ssrc, cname) for ssrc, cname in block.ssrcs.items()),
        msid=block.msid,
        candidates=tuple(block.candidates),
        end_of_candidates=block.end_of_candidates or session.end_of_candidates,
    )
    if not section.rejected:
        what = f"m-section {index} ({section.kind})"
        if section.ice_ufrag is None or section.ice_pwd is None:
            raise SdpError(f"{what} has no a=ice-ufrag and a=ice-pwd", block.line)
        if not section.fingerprints:
            raise SdpError(f"{what} has no a=fingerprint", block.line)
        if section.kind == "audio" and _is_rtp(section.protocol) and _opus(section) is None:
            raise SdpError(f"{what} offers no opus/48000/2", block.line)
    return section


def parse(text: str) -> SessionDescription:
    """Parse an offer or answer; CRLF or LF line ends, blank lines skipped."""
    if len(text) > MAX_SDP_LENGTH:
        raise SdpError(f"description longer than {MAX_SDP_LENGTH} characters")
    session = _Block(line=0)
    blocks: list[_Block] = []
    origin: Origin | None = None
    name: str | None = None
    timed = started = ice_lite = False
    bundle: tuple[str, ...] | None = None
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r")
        if not line.strip():
            continue
        try:
            if "\r" in line or "\x00" in line:
                raise SdpError("CR or NUL inside a line")
            if len(line) < 2 or line[1] != "=" or not "a" <= line[0] <= "z":
                raise SdpError("not a '<type>=<value>' line")
            kind, value = line[0], line[2:]
            if not started:
                if kind != "v" or value.strip() != "0":
                    raise SdpError("a description starts with v=0")
                started = True
            elif kind == "v":
                raise SdpError("second v= line")
            elif kind in "ost" and blocks:
                raise SdpError(f"{kind}= inside a media section")
            elif kind == "o":
                if origin is not None:
                    raise SdpError("second o= line")
                origin = _origin(value)
            elif kind == "s":
                name = value
            elif kind == "t":
                timed = True
            elif kind == "m":
                if origin is None or name is None or not timed:
                    raise SdpError("m= before the o=, s= and t= lines")
                blocks.append(_media_line(value, number))
            elif kind == "c":
                (blocks[-1] if blocks else session).connection = _connection(value)
            elif kind == "a":
                attribute, _, rest = value.partition(":")
                if blocks:
                    _attribute(blocks[-1], attribute, rest, media=True)
                elif attribute == "ice-lite":
                    ice_lite = True
                elif attribute == "group" and rest.split()[:1] == ["BUNDLE"] and bundle is None:
                    bundle = tuple(rest.split()[1:])
                else:
                    _attribute(session, attribute, rest, media=False)
        except SdpError as exc:
            if exc.line is not None:
                raise
            raise SdpError(exc.reason, number, line) from None
    if not started:
        raise SdpError("empty description: no v=0 line")
    if origin is None or name is None or not timed:
        raise SdpError("description lacks an o=, s= or t= line")
    media = tuple(_section(block, session, index) for index, block in enumerate(blocks))
    mids = [section.mid for section in media if section.mid is not None]
    seen: set[str] = set()
    for mid in mids:
        if mid in seen:
            raise SdpError(f"two m-sections have mid {mid!r}")
        seen.add(mid)
    for mid in bundle or ():
        if mid not in seen:
            raise SdpError(f"BUNDLE group names mid {mid!r}, which no m-section has")
    return SessionDescription(origin, media, bundle or (), ice_lite, name)


# -- serialize -------------------------------------------------------------------------------


def _media_lines(m: MediaSection) -> list[str]:
    if not m.formats:
        raise SdpError(f"{m.kind} m-section has no formats")
    lines = [f"m={m.kind} {m.port} {m.protocol} {' '.join(m.formats)}"]
    if m.connection is not None:
        lines.append(f"c=IN {_addrtype(m.connection)} {m.connection}")
    if m.ice_ufrag is not None:
        lines.append(f"a=ice-ufrag:{m.ice_ufrag}")
    if m.ice_pwd is not None:
        lines.append(f"a=ice-pwd:{m.ice_pwd}")
    if m.ice_options:
        lines.append(f"a=ice-options:{' '.join(m.ice_options)}")
    lines += [f"a=fingerprint:{f.algorithm} {f.value}" for f in m.fingerprints]
    if m.setup is not None:
        lines.append(f"a=setup:{m.setup}")
    if m.mid is not None:
        lines.append(f"a=mid:{m.mid}")
    if m.direction is not None:
        lines.append(f"a={m.direction}")
    if m.msid is not None:
        lines.append(f"a=msid:{m.msid}")
    if m.rtcp_mux:
        lines.append("a=rtcp-mux")
    for c in m.codecs:
        channels = f"/{c.channels}" if c.channels is not None else ""
        lines.append(f"a=rtpmap:{c.payload_type} {c.name}/{c.clock_rate}{channels}")
        if c.fmtp is not None:
            lines.append(f"a=fmtp:{c.payload_type} {c.fmtp}")
        lines += [f"a=rtcp-fb:{c.payload_type} {fb}" for fb in c.rtcp_fb]
    lines += [f"a=ssrc:{s.ssrc} cname:{s.cname}" for s in m.ssrcs]
    lines += [f"a=candidate:{c.to_sdp()}" for c in m.candidates]
    if m.end_of_candidates:
        lines.append(f"a={END_OF_CANDIDATES}")
    return lines


def serialize(desc: SessionDescription) -> str:
    """CRLF text in RFC 8866 order: v, o, s, t, session a=, then m, c, a= per section."""
    o = desc.origin
    lines = [
        "v=0",
        f"o={o.username} {o.session_id} {o.session_version} IN {_addrtype(o.address)} {o.address}",
        f"s={desc.name}",
        "t=0 0",
    ]
    if desc.ice_lite:
        lines.append("a=ice-lite")
    if desc.bundle:
        lines.append(f"a=group:BUNDLE {' '.join(desc.bundle)}")
    for section in desc.media:
        lines += _media_lines(section)
    for line in lines:
        if "\r" in line or "\n" in line or "\x00" in line:
            raise SdpError("a field holds a line break or NUL", text=line)
    return "\r\n".join(lines) + "\r\n"


# -- offer/answer ----------------------------------------------------------------------------


def _opus(section: MediaSection) -> Codec | None:
    return next((c for c in section.codecs if c.matches("opus", 48000, 2)), None)


def _red_for(section: MediaSection, opus_pt: int) -> Codec | None:
    """A red/48000 whose fmtp names only the opus payload type ("111/111", RFC 2198 3.1)."""
    for codec in section.codecs:
        targets = (codec.fmtp or "").split("/")
        if codec.matches("red", 48000) and all(pt.strip() == str(opus_pt) for pt in targets):
            return codec
    return None


def _telephone_event(section: MediaSection) -> Codec | None:
    return next((c for c in section.codecs if c.matches("telephone-event", 48000)), None)


def _credentials(section: MediaSection) -> tuple[str, str, Codec]:
    """ICE ufrag, pwd and opus of a live audio section (parse() checked; built ones may not)."""
    opus = _opus(section)
    if section.ice_ufrag is None or section.ice_pwd is None or opus is None:
        raise SdpError("audio m-section lacks ICE credentials or opus/48000/2")
    return section.ice_ufrag, section.ice_pwd, opus


def _remote_fingerprints(section: MediaSection) -> tuple[Fingerprint, ...]:
    usable = tuple(f for f in section.fingerprints if f.algorithm in SUPPORTED_FINGERPRINTS)
    if not usable:
        raise SdpError(f"no a=fingerprint with {', '.join(SUPPORTED_FINGERPRINTS)}")
    return usable


def _agreement(
    remote: MediaSection,
    remote_lite: bool,
    *,
    index: int,
    mid: str | None,
    red: Codec | None,
    dtmf: Codec | None,
    direction: Direction,
    dtls_role: Setup,
    ice_controlling: bool,
) -> NegotiatedMedia:
    """What was agreed, read from the remote side's live audio section."""
    ufrag, pwd, opus = _credentials(remote)
    return NegotiatedMedia(
        mid=mid,
        mline_index=index,
        opus_payload_type=opus.payload_type,
        red_payload_type=red.payload_type if red else None,
        telephone_event_payload_type=dtmf.payload_type if dtmf else None,
        remote_fec=opus.parameters.get("useinbandfec") == "1",
        direction=direction,
        dtls_role=dtls_role,
        ice_controlling=ice_controlling,
        remote_ice_ufrag=ufrag,
        remote_ice_pwd=pwd,
        remote_ice_lite=remote_lite,
        remote_fingerprints=_remote_fingerprints(remote),
        remote_candidates=remote.candidates,
        remote_end_of_candidates=remote.end_of_candidates,
        remote_ssrc=remote.ssrcs[0].ssrc if remote.ssrcs else None,
    )


def _local_audio(
    local: LocalParameters,
    *,
    mid: str | None,
    protocol: str,
    setup: Setup,
    direction: Direction,
    opus_pt: int,
    red_pt: int | None,
    telephone_event_pt: int | None,
) -> MediaSection:
    fmtp = "minptime=10;useinbandfec=1" if local.fec else "minptime=10"
    codecs = [Codec(opus_pt, "opus", 48000, 2, fmtp)]
    if red_pt is not None:
        red = Codec(red_pt, "red", 48000, 2, f"{opus_pt}/{opus_pt}")
        codecs.insert(0 if local.prefer_red else 1, red)
    if telephone_event_pt is not None:
        codecs.append(Codec(telephone_event_pt, "telephone-event", 48000, None, "0-15"))
    return MediaSection(
        kind="audio",
        port=9,
        protocol=protocol,
        formats=tuple(str(c.payload_type) for c in codecs),
        connection="0.0.0.0",
        mid=mid,
        direction=direction,
        rtcp_mux=True,
        ice_ufrag=local.ice_ufrag,
        ice_pwd=local.ice_pwd,
        ice_options=("trickle",),
        fingerprints=(local.fingerprint,),
        setup=setup,
        codecs=tuple(codecs),
        ssrcs=(Ssrc(local.ssrc, local.cname),),
        msid=local.msid,
        candidates=local.candidates,
        end_of_candidates=local.end_of_candidates,
    )


def create_offer(local: LocalParameters) -> SessionDescription:
    """Our offer: one bundled audio m-section with mid "0" and setup actpass."""
    audio = _local_audio(
        local,
        mid="0",
        protocol=RTP_PROTOCOL,
        setup=Setup.ACTPASS,
        direction=local.direction,
        opus_pt=local.opus_payload_type,
        red_pt=local.red_payload_type,
        telephone_event_pt=local.telephone_event_payload_type,
    )
    origin = Origin(local.session_id, local.session_version)
    return SessionDescription(origin, (audio,), bundle=("0",), ice_lite=local.ice_lite)


def _rejected(section: MediaSection) -> MediaSection:
    """RFC 3264 section 6: port 0, same protocol and formats, mid kept for BUNDLE."""
    return MediaSection(
        kind=section.kind,
        port=0,
        protocol=section.protocol,
        formats=section.formats,
        connection="0.0.0.0",
        mid=section.mid,
        direction=Direction.INACTIVE if _is_rtp(section.protocol) else None,
    )


def _usable_audio(section: MediaSection) -> bool:
    protocol = section.protocol.upper()
    return section.kind == "audio" and not section.rejected and "TLS/RTP/SAVP" in protocol


def negotiate(
    offer: SessionDescription, local: LocalParameters
) -> tuple[SessionDescription, NegotiatedMedia]:
    """Answer a remote offer: accept its first DTLS-SRTP audio m-section, reject the rest."""
    index = next((i for i, m in enumerate(offer.media) if _usable_audio(m)), None)
    if index is None:
        raise SdpError("offer has no audio m-section with DTLS-SRTP that we could accept")
    remote = offer.media[index]
    if not remote.rtcp_mux:
        raise SdpError("offer's audio lacks a=rtcp-mux: RTP/RTCP multiplexing is required")
    _remote_fingerprints(remote)  # fail before building anything
    _, _, opus = _credentials(remote)
    red = _red_for(remote, opus.payload_type) if local.red_payload_type is not None else None
    wants_dtmf = local.telephone_event_payload_type is not None
    dtmf = _telephone_event(remote) if wants_dtmf else None
    offered = remote.direction or Direction.SENDRECV
    direction = Direction.of(
        sends=local.direction.sends and offered.receives,
        receives=local.direction.receives and offered.sends,
    )
    remote_setup = remote.setup or Setup.ACTIVE  # RFC 4145 section 4 default
    if remote_setup is Setup.ACTPASS:
        role = local.answer_setup
    else:
        role = Setup.PASSIVE if remote_setup is Setup.ACTIVE else Setup.ACTIVE
    audio = _local_audio(
        local,
        mid=remote.mid,
        protocol=remote.protocol,
        setup=role,
        direction=direction,
        opus_pt=opus.payload_type,
        red_pt=red.payload_type if red else None,
        telephone_event_pt=dtmf.payload_type if dtmf else None,
    )
    media = []
    for i, section in enumerate(offer.media):
        if i != index:
            logger.debug("rejecting offered m-section %d (%s mid=%s)", i, section.kind, section.mid)
        media.append(audio if i == index else _rejected(section))
    bundled = remote.mid is not None and remote.mid in offer.bundle
    answer = SessionDescription(
        Origin(local.session_id, local.session_version),
        tuple(media),
        bundle=(remote.mid,) if bundled and remote.mid is not None else (),
        ice_lite=local.ice_lite,
    )
    # RFC 8445 section 6.1.1: the offerer controls, unless only the answerer is a full agent.
    controlling = offer.ice_lite and not local.ice_lite
    negotiated = _agreement(
        remote,
        offer.ice_lite,
        index=index,
        mid=remote.mid,
        red=red,
        dtmf=dtmf,
        direction=direction,
        dtls_role=role,
        ice_controlling=controlling,
    )
    return answer, negotiated


def apply_answer(offer: SessionDescription, answer: SessionDescription) -> NegotiatedMedia:
    """Check the peer's answer against our offer and say what was agreed."""
    if [(m.kind, m.mid) for m in answer.media] != [(m.kind, m.mid) for m in offer.media]:
        raise SdpError("answer's m-sections (kind, mid) do not match the offer's")
    index = next((i for i, m in enumerate(offer.media) if _usable_audio(m)), None)
    if index is None:
        raise SdpError("our offer has no audio m-section")
    ours, theirs = offer.media[index], answer.media[index]
    if theirs.rejected:
        raise SdpError("the answer rejected the audio m-section")
    if not theirs.rtcp_mux:
        raise SdpError("answer's audio lacks a=rtcp-mux: RTP/RTCP multiplexing is required")
    if theirs.setup is Setup.ACTPASS:
        raise SdpError("answer has a=setup:actpass; an answer must pick active or passive")
    if theirs.protocol.upper() != ours.protocol.upper():
        raise SdpError(f"answer's audio protocol {theirs.protocol} is not {ours.protocol}")
    if not set(answer.bundle) <= set(offer.bundle):
        raise SdpError(f"answer BUNDLE {answer.bundle} is not a subset of {offer.bundle}")
    offered = {c.payload_type: c for c in ours.codecs}
    for fmt in theirs.formats:
        if fmt not in ours.formats:
            raise SdpError(f"answer uses payload type {fmt}, which the offer did not list")
    for codec in theirs.codecs:
        mine = offered.get(codec.payload_type)
        if mine is None or not codec.matches(mine.name.lower(), mine.clock_rate):
            raise SdpError(
                f"answer maps payload type {codec.payload_type} to {codec.name}/"
                f"{codec.clock_rate}, which is not what the offer gave it"
            )
    _, _, opus = _credentials(theirs)
    red = _red_for(theirs, opus.payload_type)
    dtmf = _telephone_event(theirs)
    ours_direction = ours.direction or Direction.SENDRECV
    answered = theirs.direction or Direction.SENDRECV
    if (answered.sends and not ours_direction.receives) or (
        answered.receives and not ours_direction.sends
    ):
        raise SdpError(f"answer direction {answered} does not fit offered {ours_direction}")
    role = Setup.ACTIVE if theirs.setup is Setup.PASSIVE else Setup.PASSIVE  # None: active
    return _agreement(
        theirs,
        answer.ice_lite,
        index=index,
        mid=ours.mid,
        red=red,
        dtmf=dtmf,
        direction=answered.reversed(),
        dtls_role=role,
        ice_controlling=not (offer.ice_lite and not answer.ice_lite),
    )
