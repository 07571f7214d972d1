"""SDP parsing/serialisation, offer/answer and trickle helpers, against browser and aiortc SDP."""

from __future__ import annotations

import contextlib
import hashlib
import string
from dataclasses import replace
from typing import Any

import aiortc.sdp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from hypothesis import given
from hypothesis import strategies as st
from test_candidate import candidates, hosts

from agent.media.sdp import (
    MAX_SDP_LENGTH,
    SUPPORTED_FINGERPRINTS,
    Codec,
    Direction,
    Fingerprint,
    LocalParameters,
    MediaSection,
    NegotiatedMedia,
    Origin,
    SdpError,
    SessionDescription,
    Setup,
    Ssrc,
    apply_answer,
    certificate_matches,
    create_offer,
    fingerprint_of,
    fingerprints_equal,
    is_end_of_candidates,
    negotiate,
    parse,
    serialize,
)
from agent.net.candidate import Candidate, CandidateType


def _crlf(text: str) -> str:
    return text.lstrip("\n").replace("\n", "\r\n")


CHROME_FP = (
    "A5:4D:CA:18:25:30:BB:1D:6D:13:2C:DE:D6:23:7B:2E:"
    "D9:1E:3F:72:1F:CB:19:71:17:44:94:D6:49:3C:9D:5C"
)
FIREFOX_FP = (
    "34:60:BE:31:20:1E:69:FE:DA:A0:EE:E8:B9:99:7F:5C:"
    "7C:29:99:FD:AF:E5:93:25:3C:D6:54:AF:4D:FA:D7:14"
)
SAFARI_FP = (
    "27:A0:AE:B3:FE:E9:23:2F:8A:F2:21:1F:9E:E4:91:C5:"
    "B1:0B:EC:B5:56:3B:FC:1E:6F:93:42:7E:CB:C8:FE:29"
)
CHROME_MDNS = "a91c2439-d5ab-4b4d-95b4-0aeba4a45eff.local"
FIREFOX_MDNS = "cd02c5e1-1635-4d03-951f-d8f9a2c68e45.local"

# Chrome: audio + video + data channel, one BUNDLE group, mDNS host candidates, trickle.
CHROME_OFFER = _crlf(f"""
v=0
o=- 2146065999146017545 2 IN IP4 127.0.0.1
s=-
t=0 0
a=group:BUNDLE 0 1 2
a=extmap-allow-mixed
a=msid-semantic: WMS ccb573d9-5810-460e-a729-91b9e8c14743
m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126
c=IN IP4 0.0.0.0
a=rtcp:9 IN IP4 0.0.0.0
a=candidate:2537519494 1 udp 2113937151 {CHROME_MDNS} 54122 typ host generation 0 network-cost 999
a=candidate:3463899636 1 udp 1677729535 198.51.100.23 54122 typ srflx raddr 0.0.0.0 rport 0 generation 0 network-cost 999
a=candidate:2626687471 1 tcp 1518280447 {CHROME_MDNS} 9 typ host tcptype active generation 0 network-cost 999
a=ice-ufrag:V5zj
a=ice-pwd:R3j1twdTKWTddB+XhkAS1voQ
a=ice-options:trickle
a=fingerprint:sha-256 {CHROME_FP}
a=setup:actpass
a=mid:0
a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level
a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time
a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01
a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid
a=sendrecv
a=msid:ccb573d9-5810-460e-a729-91b9e8c14743 c8450070-6377-4407-a8e7-27891eb20109
a=rtcp-mux
a=rtcp-rsize
a=rtpmap:111 opus/48000/2
a=rtcp-fb:111 transport-cc
a=fmtp:111 minptime=10;useinbandfec=1
a=rtpmap:63 red/48000/2
a=fmtp:63 111/111
a=rtpmap:9 G722/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:13 CN/8000
a=rtpmap:110 telephone-event/48000
a=rtpmap:126 telephone-event/8000
a=ssrc:4210381974 cname:tcqcYezdZ/tDDj8h
a=ssrc:4210381974 msid:ccb573d9-5810-460e-a729-91b9e8c14743 c8450070-6377-4407-a8e7-27891eb20109
m=video 9 UDP/TLS/RTP/SAVPF 96 97 102 103 45 46
c=IN IP4 0.0.0.0
a=rtcp:9 IN IP4 0.0.0.0
a=ice-ufrag:V5zj
a=ice-pwd:R3j1twdTKWTddB+XhkAS1voQ
a=ice-options:trickle
a=fingerprint:sha-256 {CHROME_FP}
a=setup:actpass
a=mid:1
a=extmap:14 urn:ietf:params:rtp-hdrext:toffset
a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time
a=extmap:13 urn:3gpp:video-orientation
a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01
a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid
a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id
a=extmap:11 urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id
a=sendrecv
a=msid:ccb573d9-5810-460e-a729-91b9e8c14743 7a605a91-3306-48a1-8009-3492b6246771
a=rtcp-mux
a=rtcp-rsize
a=rtpmap:96 VP8/90000
a=rtcp-fb:96 goog-remb
a=rtcp-fb:96 transport-cc
a=rtcp-fb:96 ccm fir
a=rtcp-fb:96 nack
a=rtcp-fb:96 nack pli
a=rtpmap:97 rtx/90000
a=fmtp:97 apt=96
a=rtpmap:102 H264/90000
a=rtcp-fb:102 goog-remb
a=rtcp-fb:102 transport-cc
a=rtcp-fb:102 ccm fir
a=rtcp-fb:102 nack
a=rtcp-fb:102 nack pli
a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f
a=rtpmap:103 rtx/90000
a=fmtp:103 apt=102
a=rtpmap:45 AV1/90000
a=rtcp-fb:45 goog-remb
a=rtcp-fb:45 transport-cc
a=rtcp-fb:45 ccm fir
a=rtcp-fb:45 nack
a=rtcp-fb:45 nack pli
a=fmtp:45 level-idx=5;profile=0;tier=0
a=rtpmap:46 rtx/90000
a=fmtp:46 apt=45
a=ssrc-group:FID 4026392298 2356476958
a=ssrc:4026392298 cname:tcqcYezdZ/tDDj8h
a=ssrc:4026392298 msid:ccb573d9-5810-460e-a729-91b9e8c14743 7a605a91-3306-48a1-8009-3492b6246771
a=ssrc:2356476958 cname:tcqcYezdZ/tDDj8h
a=ssrc:2356476958 msid:ccb573d9-5810-460e-a729-91b9e8c14743 7a605a91-3306-48a1-8009-3492b6246771
m=application 9 UDP/DTLS/SCTP webrtc-datachannel
c=IN IP4 0.0.0.0
a=ice-ufrag:V5zj
a=ice-pwd:R3j1twdTKWTddB+XhkAS1voQ
a=ice-options:trickle
a=fingerprint:sha-256 {CHROME_FP}
a=setup:actpass
a=mid:2
a=sctp-port:5000
a=max-message-size:262144
""")  # noqa: E501

# Firefox: fingerprint, ice-options and direction at session level, fmtp before rtpmap,
# upper-case transports, an IPv6 host, a TURN relay, end-of-candidates, no RED, DTMF at 8 kHz.
FIREFOX_OFFER = _crlf(f"""
v=0
o=mozilla...THIS_IS_SDPARTA-99.0 674110023460606619 0 IN IP4 0.0.0.0
s=-
t=0 0
a=sendrecv
a=fingerprint:sha-256 {FIREFOX_FP}
a=group:BUNDLE 0 1
a=ice-options:trickle
a=msid-semantic:WMS *
m=audio 51234 UDP/TLS/RTP/SAVPF 109 9 0 8 101
c=IN IP4 198.51.100.40
a=candidate:0 1 UDP 2122252543 2001:db8:85a3::8a2e:370:7334 51234 typ host
a=candidate:1 1 UDP 2122187007 {FIREFOX_MDNS} 60012 typ host
a=candidate:2 1 TCP 2105524479 {FIREFOX_MDNS} 9 typ host tcptype active
a=candidate:3 1 UDP 1686052863 198.51.100.40 51234 typ srflx raddr 0.0.0.0 rport 0
a=candidate:4 1 UDP 92217343 203.0.113.9 61441 typ relay raddr 198.51.100.40 rport 51234
a=sendrecv
a=end-of-candidates
a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level
a=extmap:2/recvonly urn:ietf:params:rtp-hdrext:csrc-audio-level
a=extmap:3 urn:ietf:params:rtp-hdrext:sdes:mid
a=fmtp:109 maxplaybackrate=48000;stereo=1;useinbandfec=1
a=fmtp:101 0-15
a=ice-pwd:8e9b2f6d41a7c3e05f1d2b8a6c4e7f90
a=ice-ufrag:3fa1c0d2
a=mid:0
a=msid:{{6555abfe-b8c9-417a-b8be-8831f237e45a}} {{f26149ed-be4c-4ce6-a6c1-494e7691b06f}}
a=rtcp-mux
a=rtpmap:109 opus/48000/2
a=rtpmap:9 G722/8000/1
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000/1
a=setup:actpass
a=ssrc:2626687471 cname:{{2b855c1f-28aa-4a51-b98c-67c215bd448f}}
m=application 9 UDP/DTLS/SCTP webrtc-datachannel
c=IN IP4 0.0.0.0
a=sendrecv
a=ice-pwd:8e9b2f6d41a7c3e05f1d2b8a6c4e7f90
a=ice-ufrag:3fa1c0d2
a=mid:1
a=setup:actpass
a=sctp-port:5000
a=max-message-size:1073741823
""")

# Safari (libwebrtc) answering OUR_OFFER below; its candidates arrive by trickle.
SAFARI_ANSWER = _crlf(f"""
v=0
o=- 3031114991562355885 2 IN IP4 127.0.0.1
s=-
t=0 0
a=group:BUNDLE 0
a=extmap-allow-mixed
a=msid-semantic: WMS 26b1cffc-070d-4109-a085-9634fe3c9c8f
m=audio 9 UDP/TLS/RTP/SAVPF 111 63 126
c=IN IP4 0.0.0.0
a=rtcp:9 IN IP4 0.0.0.0
a=ice-ufrag:gsu8
a=ice-pwd:PO+799nKSNrh9UCauSDmLhuV
a=ice-options:trickle
a=fingerprint:sha-256 {SAFARI_FP}
a=setup:active
a=mid:0
a=sendrecv
a=msid:26b1cffc-070d-4109-a085-9634fe3c9c8f 2b855c1f-28aa-4a51-b98c-67c215bd448f
a=rtcp-mux
a=rtpmap:111 opus/48000/2
a=fmtp:111 minptime=10;useinbandfec=1
a=rtpmap:63 red/48000/2
a=fmtp:63 111/111
a=rtpmap:126 telephone-event/48000
a=ssrc:2537519494 cname:Ys5suKcNd8Zra9A9
""")
SAFARI_TRICKLE = (
    "candidate:1467250027 1 udp 2122260223 192.168.1.34 58462 typ host "
    "generation 0 ufrag gsu8 network-id 1 network-cost 10"
)

LOCAL = LocalParameters(
    ice_ufrag="tcqc",
    ice_pwd="Ys5suKcNd8Zra9A9aXbYcZ",
    fingerprint=fingerprint_of(b"edge-intercom test certificate"),
    ssrc=0x1234ABCD,
    cname="intercom-test",
    session_id=604056430636200287,
    telephone_event_payload_type=126,
)
OUR_OFFER = create_offer(LOCAL)


def _with_audio(desc: SessionDescription, **changes: object) -> SessionDescription:
    """The description with its first m-section changed."""
    first = replace(desc.media[0], **changes)  # type: ignore[arg-type]
    return replace(desc, media=(first, *desc.media[1:]))


# -- parsing saved browser SDP --------------------------------------------------------------


def test_chrome_offer_parses_all_sections() -> None:
    desc = parse(CHROME_OFFER)
    assert desc.origin == Origin(2146065999146017545, 2, "-", "127.0.0.1")
    assert desc.bundle == ("0", "1", "2")
    assert [(m.kind, m.mid, m.port) for m in desc.media] == [
        ("audio", "0", 9),
        ("video", "1", 9),
        ("application", "2", 9),
    ]
    audio = desc.media[0]
    assert audio.formats == ("111", "63", "9", "0", "8", "13", "110", "126")
    assert audio.codecs[0] == Codec(
        111, "opus", 48000, 2, "minptime=10;useinbandfec=1", ("transport-cc",)
    )
    assert audio.codecs[0].parameters == {"minptime": "10", "useinbandfec": "1"}
    assert audio.codecs[1] == Codec(63, "red", 48000, 2, "111/111")
    assert audio.codecs[1].parameters == {}
    assert [c.payload_type for c in audio.codecs if c.name == "telephone-event"] == [110, 126]
    assert (audio.ice_ufrag, audio.ice_pwd) == ("V5zj", "R3j1twdTKWTddB+XhkAS1voQ")
    assert audio.ice_options == ("trickle",)
    assert audio.fingerprints == (Fingerprint("sha-256", CHROME_FP),)
    assert audio.setup is Setup.ACTPASS
    assert audio.direction is Direction.SENDRECV
    assert audio.rtcp_mux
    assert audio.ssrcs == (Ssrc(4210381974, "tcqcYezdZ/tDDj8h"),)
    assert audio.msid is not None and audio.msid.endswith("c8450070-6377-4407-a8e7-27891eb20109")
    assert audio.candidates == (
        Candidate("2537519494", 1, "udp", 2113937151, CHROME_MDNS, 54122, CandidateType.HOST),
        Candidate(
            "3463899636", 1, "udp", 1677729535, "198.51.100.23", 54122, CandidateType.SRFLX,
            related_address="0.0.0.0", related_port=0,
        ),
        Candidate(
            "2626687471", 1, "tcp", 1518280447, CHROME_MDNS, 9, CandidateType.HOST,
            tcptype="active",
        ),
    )  # fmt: skip
    assert not audio.end_of_candidates
    video = desc.media[1]
    assert [c.name for c in video.codecs] == ["VP8", "rtx", "H264", "rtx", "AV1", "rtx"]
    assert video.codecs[0].rtcp_fb == ("goog-remb", "transport-cc", "ccm fir", "nack", "nack pli")
    assert [s.ssrc for s in video.ssrcs] == [4026392298, 2356476958]
    data = desc.media[2]
    assert (data.protocol, data.formats, data.codecs) == (
        "UDP/DTLS/SCTP",
        ("webrtc-datachannel",),
        (),
    )
    assert data.direction is None


def test_firefox_offer_inherits_session_level_attributes() -> None:
    desc = parse(FIREFOX_OFFER)
    assert desc.origin.username == "mozilla...THIS_IS_SDPARTA-99.0"
    audio, data = desc.media
    for section in (audio, data):
        assert section.fingerprints == (Fingerprint("sha-256", FIREFOX_FP),)
        assert section.ice_options == ("trickle",)
        assert section.direction is Direction.SENDRECV
        assert (section.ice_ufrag, section.ice_pwd) == (
            "3fa1c0d2",
            "8e9b2f6d41a7c3e05f1d2b8a6c4e7f90",
        )
    assert audio.port == 51234 and audio.connection == "198.51.100.40"
    assert audio.codecs[0] == Codec(
        109, "opus", 48000, 2, "maxplaybackrate=48000;stereo=1;useinbandfec=1"
    )
    assert audio.codecs[-1] == Codec(101, "telephone-event", 8000, 1, "0-15")
    assert [c.host for c in audio.candidates] == [
        "2001:db8:85a3::8a2e:370:7334",
        FIREFOX_MDNS,
        FIREFOX_MDNS,
        "198.51.100.40",
        "203.0.113.9",
    ]
    assert {c.transport for c in audio.candidates} == {"udp", "tcp"}
    relay = audio.candidates[-1]
    assert (relay.type, relay.related_address, relay.related_port) == (
        CandidateType.RELAY,
        "198.51.100.40",
        51234,
    )
    assert audio.end_of_candidates
    assert audio.ssrcs == (Ssrc(2626687471, "{2b855c1f-28aa-4a51-b98c-67c215bd448f}"),)


def test_line_feed_only_and_blank_lines_parse_the_same() -> None:
    expected = parse(CHROME_OFFER)
    assert parse(CHROME_OFFER.replace("\r\n", "\n")) == expected
    assert parse(CHROME_OFFER.replace("\r\n", "\r\n\r\n")) == expected


@pytest.mark.parametrize("text", [CHROME_OFFER, FIREFOX_OFFER, SAFARI_ANSWER])
def test_saved_descriptions_round_trip(text: str) -> None:
    desc = parse(text)
    again = serialize(desc)
    assert parse(again) == desc
    assert serialize(parse(again)) == again


def test_serialize_uses_crlf_and_rfc_8866_line_order() -> None:
    text = serialize(parse(CHROME_OFFER))
    assert text.endswith("\r\n") and "\n" not in text.replace("\r\n", "")
    lines = text.split("\r\n")[:-1]
    assert [line[0] for line in lines[:4]] == ["v", "o", "s", "t"]
    first_m = next(i for i, line in enumerate(lines) if line.startswith("m="))
    assert all(line.startswith("a=") for line in lines[4:first_m])
    for i, line in enumerate(lines):
        if line.startswith("m="):
            assert lines[i + 1].startswith("c=")
            section_end = next(
                (j for j in range(i + 1, len(lines)) if lines[j].startswith("m=")), len(lines)
            )
            assert all(rest.startswith("a=") for rest in lines[i + 2 : section_end])


# -- parse errors -----------------------------------------------------------------------------

OUR_TEXT = serialize(OUR_OFFER)


def _line_of(text: str, part: str) -> int:
    return next(i for i, line in enumerate(text.split("\r\n"), 1) if part in line)


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ("v=0", "v=1", "starts with v=0"),
        ("m=audio 9 ", "m=audio nine ", "port 'nine' is not a number"),
        ("m=audio 9 ", "m=audio 70000 ", "port 70000 out of range"),
        ("m=audio 9 UDP/TLS/RTP/SAVPF 111 63 126", "m=audio 9 UDP/TLS/RTP/SAVPF", "m= needs"),
        ("UDP/TLS/RTP/SAVPF 111", "UDP/TLS/RTP/SAVPF x111", "payload type 'x111'"),
        ("a=rtpmap:111 opus/48000/2", "a=rtpmap:111 opus", "a=rtpmap needs"),
        ("a=rtpmap:111 opus/48000/2", "a=rtpmap:abc opus/48000/2", "payload type 'abc'"),
        (f"a=ice-pwd:{LOCAL.ice_pwd}", "a=ice-pwd:short", "ice-pwd must be 22..256"),
        ("a=ice-ufrag:tcqc", "a=ice-ufrag:t!", "ice-ufrag must be 4..256"),
        ("a=fingerprint:sha-256 ", "a=fingerprint:sha-256 AB:", "colon-separated hex"),
        ("a=setup:actpass", "a=setup:holdconn", "setup 'holdconn'"),
        ("a=ssrc:", "a=ssrc:x", "ssrc 'x"),
        ("a=mid:0", "a=mid:0 1", "one identification tag"),
        ("c=IN IP4 0.0.0.0", "c=IN IP4", "c= needs"),
        ("a=rtcp-mux", "rtcp-mux", "not a '<type>=<value>' line"),
        ("IN IP4 127.0.0.1", "IN", "o= needs"),
        ("o=- ", "o=- x", "session id 'x"),
    ],
)
def test_garbage_lines_name_their_line(old: str, new: str, reason: str) -> None:
    assert old in OUR_TEXT
    line = _line_of(OUR_TEXT, old)
    with pytest.raises(SdpError, match=reason) as info:
        parse(OUR_TEXT.replace(old, new, 1))
    assert info.value.line == line
    assert f"line {line}:" in str(info.value)


@pytest.mark.parametrize(
    ("candidate", "reason"),
    [
        ("1 1 udp 1 host 9 typ", "candidate needs 8 fields"),
        ("1 1 udp 4294967295 10.0.0.1 9 typ host", "candidate priority 4294967295 out of range"),
        ("1 1 udp 1 10.0.0.1 9 typ srflx raddr 10.0.0.2 raddr 10.0.0.3", "raddr twice"),
    ],
)
def test_bad_candidate_line_is_an_error(candidate: str, reason: str) -> None:
    text = OUR_TEXT.replace("a=rtcp-mux\r\n", f"a=rtcp-mux\r\na=candidate:{candidate}\r\n")
    with pytest.raises(SdpError, match=reason) as info:
        parse(text)
    assert info.value.line == _line_of(OUR_TEXT, "a=rtcp-mux") + 1


def _without(text: str, prefix: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith(prefix))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no v=0 line"),
        ("\r\n\r\n", "no v=0 line"),
        ("hello", "not a '<type>=<value>' line"),
        ("v=0\r\n", "lacks an o=, s= or t= line"),
        (_without(OUR_TEXT, "a=ice-ufrag"), "has no a=ice-ufrag and a=ice-pwd"),
        (_without(OUR_TEXT, "a=ice-pwd"), "has no a=ice-ufrag and a=ice-pwd"),
        (_without(OUR_TEXT, "a=fingerprint"), "has no a=fingerprint"),
        (_without(OUR_TEXT, "a=rtpmap:111"), "offers no opus/48000/2"),
        (_without(OUR_TEXT, "t="), "m= before the o=, s= and t= lines"),
        (OUR_TEXT.replace("BUNDLE 0", "BUNDLE 0 7"), "names mid '7'"),
        (OUR_TEXT + OUR_TEXT[OUR_TEXT.index("m=") :], "two m-sections have mid '0'"),
        (OUR_TEXT + "v=0\r\n", "second v= line"),
        (OUR_TEXT + "o=- 1 1 IN IP4 0.0.0.0\r\n", "o= inside a media section"),
        (OUR_TEXT.replace("s=-", "s=-\rx"), "CR or NUL"),
        (OUR_TEXT.replace("a=mid:0", "a=mid:0\r\na=mid:1"), "second a=mid"),
        (OUR_TEXT.replace("a=fmtp:111", "a=fmtp:111 x=1\r\na=fmtp:111"), "second a=fmtp"),
        ("x" * (MAX_SDP_LENGTH + 1), "longer than"),
        (OUR_TEXT.replace("111 63 126", "111 63 111"), "payload type listed twice"),
        (OUR_TEXT.replace("m=audio", "m=au(dio"), "media 'au\\(dio' is not a token"),
        (OUR_TEXT.replace("UDP/TLS/RTP/SAVPF", "UDP/TLS/RTP/SAVPF,"), "protocol"),
        (OUR_TEXT.replace("cname:intercom-test", "cname: "), "empty cname"),
        (OUR_TEXT.replace("cname:intercom-test", ""), "a=ssrc needs"),
        (OUR_TEXT + "a=rtcp-fb:111\r\n", "a=rtcp-fb needs"),
        (OUR_TEXT + "a=msid:\r\n", "empty a=msid"),
        (OUR_TEXT + "a=rtpmap:111 opus/48000/2\r\n", "second a=rtpmap"),
        (OUR_TEXT + "a=rtpmap:1 x/0\r\n", "clock rate 0 out of range"),
        (OUR_TEXT.replace("sha-256 ", "sha-256:"), "fingerprint needs"),
    ],
)
def test_invalid_descriptions_are_rejected_clearly(text: str, reason: str) -> None:
    with pytest.raises(SdpError, match=reason):
        parse(text)


def test_serialize_refuses_fields_that_would_break_lines() -> None:
    with pytest.raises(SdpError, match="line break"):
        serialize(_with_audio(OUR_OFFER, msid="a\r\na=setup:active"))
    with pytest.raises(SdpError, match="no formats"):
        serialize(_with_audio(OUR_OFFER, formats=()))


def test_sdp_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="SDP line 1"):
        parse("v=9")


def test_rejected_sections_need_no_credentials() -> None:
    text = _crlf("""
v=0
o=- 1 1 IN IP4 0.0.0.0
s=-
t=0 0
m=video 0 UDP/TLS/RTP/SAVPF 96
c=IN IP4 0.0.0.0
a=mid:1
""")
    (video,) = parse(text).media
    assert video.rejected and video.ice_ufrag is None and video.fingerprints == ()
    assert video.codecs == () and video.formats == ("96",)


def test_unknown_attributes_and_lines_are_ignored() -> None:
    extra = (
        "a=x-google-flag:conference\r\nb=AS:30\r\na=ptime:20\r\na=rtcp-rsize\r\na=fmtp:99 x=1\r\n"
    )
    text = OUR_TEXT.replace("a=rtcp-mux\r\n", "a=rtcp-mux\r\n" + extra)
    assert parse(text) == parse(OUR_TEXT)


def test_session_level_connection_and_end_of_candidates_are_inherited() -> None:
    text = OUR_TEXT.replace("t=0 0\r\n", "c=IN IP6 ::1\r\nt=0 0\r\na=end-of-candidates\r\n")
    (audio,) = parse(_without(text, "c=IN IP4")).media
    assert audio.connection == "::1"
    assert audio.end_of_candidates
    assert "c=IN IP6 ::1" in serialize(parse(_without(text, "c=IN IP4")))


def test_media_level_fingerprints_override_session_level() -> None:
    session_fp = f"a=fingerprint:sha-256 {FIREFOX_FP}\r\n"
    (audio,) = parse(OUR_TEXT.replace("t=0 0\r\n", "t=0 0\r\n" + session_fp)).media
    assert audio.fingerprints == (LOCAL.fingerprint,)


# -- hypothesis: round trip and garbage --------------------------------------------------------

ICE_CHARS = string.ascii_letters + string.digits + "+/"
TOKEN_CHARS = string.ascii_letters + string.digits + "-_."
tokens = st.text(TOKEN_CHARS, min_size=1, max_size=10)
fingerprints = st.builds(
    fingerprint_of, st.binary(max_size=64), st.sampled_from(SUPPORTED_FINGERPRINTS)
)
fmtps = st.text(string.ascii_letters + string.digits + "=;/-. ", min_size=1, max_size=30).map(
    str.strip
)


@st.composite
def codecs(draw: st.DrawFn, payload_type: int) -> Codec:
    return Codec(
        payload_type,
        draw(st.sampled_from(["opus", "red", "telephone-event", "PCMU", "VP8"]) | tokens),
        draw(st.sampled_from([8000, 16000, 48000, 90000])),
        draw(st.none() | st.integers(1, 8)),
        draw(st.none() | fmtps.filter(bool)),
        tuple(draw(st.lists(st.lists(tokens, min_size=1, max_size=3).map(" ".join), max_size=3))),
    )


@st.composite
def media_sections(draw: st.DrawFn, mid: str | None) -> MediaSection:
    kind = draw(st.sampled_from(["audio", "video", "application"]))
    live = draw(st.booleans())
    formats: tuple[str, ...] = ("webrtc-datachannel",)
    section_codecs: tuple[Codec, ...] = ()
    protocol = "UDP/DTLS/SCTP"
    if kind != "application":
        protocol = "UDP/TLS/RTP/SAVPF"
        pts = draw(st.lists(st.integers(0, 127), min_size=1, max_size=6, unique=True))
        mapped = [draw(codecs(pt)) for pt in pts]
        if kind == "audio":
            mapped[0] = Codec(pts[0], "opus", 48000, 2, draw(st.none() | fmtps.filter(bool)))
        flags = draw(st.lists(st.booleans(), min_size=len(pts) - 1, max_size=len(pts) - 1))
        formats = tuple(str(pt) for pt in pts)
        section_codecs = tuple(c for c, keep in zip(mapped, [True, *flags], strict=True) if keep)
    credentials = live or draw(st.booleans())
    return MediaSection(
        kind=kind,
        port=draw(st.integers(1, 65535)) if live else 0,
        protocol=protocol,
        formats=formats,
        connection=draw(st.none() | hosts),
        mid=mid,
        direction=draw(st.none() | st.sampled_from(Direction)),
        rtcp_mux=draw(st.booleans()),
        ice_ufrag=draw(st.text(ICE_CHARS, min_size=4, max_size=40)) if credentials else None,
        ice_pwd=draw(st.text(ICE_CHARS, min_size=22, max_size=60)) if credentials else None,
        ice_options=tuple(draw(st.lists(st.sampled_from(["trickle", "ice2", "renomination"])))),
        fingerprints=tuple(draw(st.lists(fingerprints, min_size=int(live), max_size=3))),
        setup=draw(st.none() | st.sampled_from(Setup)),
        codecs=section_codecs,
        ssrcs=tuple(
            draw(
                st.lists(
                    st.builds(Ssrc, st.integers(0, 2**32 - 1), tokens),
                    max_size=3,
                    unique_by=lambda s: s.ssrc,
                )
            )
        ),
        msid=draw(st.none() | st.lists(tokens, min_size=1, max_size=2).map(" ".join)),
        candidates=tuple(draw(st.lists(candidates(), max_size=4))),
        end_of_candidates=draw(st.booleans()),
    )


@st.composite
def descriptions(draw: st.DrawFn) -> SessionDescription:
    mids = draw(st.lists(st.none() | tokens, max_size=4, unique_by=lambda m: m or object()))
    named = [mid for mid in mids if mid is not None]
    bundle = draw(st.lists(st.sampled_from(named), unique=True)) if named else []
    return SessionDescription(
        origin=Origin(
            draw(st.integers(0, 2**63)),
            draw(st.integers(0, 2**63)),
            draw(tokens),
            draw(st.ip_addresses().map(str)),
        ),
        media=tuple(draw(media_sections(mid)) for mid in mids),
        bundle=tuple(bundle),
        ice_lite=draw(st.booleans()),
        name=draw(tokens),
    )


@given(descriptions())
def test_any_description_round_trips(desc: SessionDescription) -> None:
    assert parse(serialize(desc)) == desc


@given(descriptions())
def test_negotiation_of_any_description_only_raises_sdp_error(desc: SessionDescription) -> None:
    for step in (lambda: negotiate(desc, LOCAL), lambda: apply_answer(OUR_OFFER, desc)):
        with contextlib.suppress(SdpError):
            step()


def _parse_is_safe(text: str) -> None:
    """parse() either refuses with SdpError or gives a description that round-trips."""
    try:
        desc = parse(text)
    except SdpError:
        return
    assert parse(serialize(desc)) == desc


@given(st.text(max_size=3000))
def test_random_text_only_raises_sdp_error(text: str) -> None:
    _parse_is_safe(text)


FRAGMENTS = [
    "v=0",
    "o=- 1 2 IN IP4 127.0.0.1",
    "s=-",
    "t=0 0",
    "c=IN IP6 ::1",
    "a=group:BUNDLE 0 1",
    "a=ice-lite",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 63",
    "m=video 0 UDP/TLS/RTP/SAVPF 96",
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
    "a=rtpmap:111 opus/48000/2",
    "a=rtpmap:63 red/48000/2",
    "a=fmtp:63 111/111",
    "a=rtcp-fb:* nack",
    "a=ice-ufrag:abcd",
    "a=ice-pwd:abcdefghijklmnopqrstuv",
    f"a=fingerprint:sha-256 {CHROME_FP}",
    "a=setup:active",
    "a=mid:0",
    "a=mid:1",
    "a=sendonly",
    "a=rtcp-mux",
    "a=ssrc:1 cname:x",
    "a=msid:- t",
    f"a=candidate:1 1 udp 5 {CHROME_MDNS} 9 typ host tcptype so",
    "a=end-of-candidates",
]


@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40), st.booleans())
def test_sdp_like_line_soup_only_raises_sdp_error(lines: list[str], crlf: bool) -> None:
    _parse_is_safe(("\r\n" if crlf else "\n").join(["v=0", *FRAGMENTS[1:4], *lines]))


mutations = st.tuples(
    st.sampled_from(["delete", "duplicate", "swap", "char", "insert", "truncate"]),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.text(max_size=12),
)


@given(
    st.sampled_from([CHROME_OFFER, FIREFOX_OFFER, SAFARI_ANSWER]),
    st.lists(mutations, min_size=1, max_size=4),
)
def test_mutated_browser_sdp_only_raises_sdp_error(
    text: str, ops: list[tuple[str, int, int, str]]
) -> None:
    lines = text.split("\r\n")
    for op, at, other, junk in ops:
        i, j = at % len(lines), other % len(lines)
        if op == "delete" and len(lines) > 1:
            del lines[i]
        elif op == "duplicate":
            lines.insert(j, lines[i])
        elif op == "swap":
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "char" and lines[i]:
            k = j % len(lines[i])
            lines[i] = lines[i][:k] + junk + lines[i][k + 1 :]
        elif op == "insert":
            lines.insert(i, junk)
        elif op == "truncate":
            lines[i] = lines[i][: j % (len(lines[i]) + 1)]
    _parse_is_safe("\r\n".join(lines))


def test_huge_inputs_finish() -> None:
    head = OUR_TEXT
    for text in (
        head + "a=candidate:" + "1 " * 200_000 + "\r\n",
        head + "a=fmtp:111 " + "x=1;" * 100_000 + "\r\n",
        head + "m=video 0 RTP/AVP 0\r\n" * 20_000,
        "v=0\r\n" + "a=" * 400_000,
    ):
        _parse_is_safe(text)


# -- trickle -----------------------------------------------------------------------------------


def test_end_of_candidates_markers() -> None:
    for text in ("", "end-of-candidates", "a=end-of-candidates", " end-of-candidates\r\n"):
        assert is_end_of_candidates(text)
    assert not is_end_of_candidates(SAFARI_TRICKLE)


# -- fingerprints ---------------------------------------------------------------------------------


def test_fingerprint_of_certificate_is_upper_colon_hex() -> None:
    der = b"\x30\x82\x01\x0a certificate bytes"
    fp = fingerprint_of(der)
    digest = hashlib.sha256(der).hexdigest().upper()
    assert fp == Fingerprint("sha-256", ":".join(digest[i : i + 2] for i in range(0, 64, 2)))
    assert len(fingerprint_of(der, "sha-512").value) == 64 * 3 - 1
    with pytest.raises(ValueError, match="unsupported"):
        fingerprint_of(der, "md5")


def test_fingerprint_comparison_ignores_case_only() -> None:
    fp = fingerprint_of(b"cert")
    assert fingerprints_equal(fp, Fingerprint("SHA-256", fp.value.lower()))
    assert not fingerprints_equal(fp, fingerprint_of(b"other cert"))
    assert not fingerprints_equal(fp, Fingerprint("sha-384", fp.value))
    assert not fingerprints_equal(fp, Fingerprint("sha-256", fp.value[:-3]))


def test_certificate_matches_any_supported_signalled_fingerprint() -> None:
    der = b"peer certificate"
    assert certificate_matches(der, [fingerprint_of(b"x"), fingerprint_of(der, "sha-384")])
    assert not certificate_matches(der, [fingerprint_of(b"x")])
    sha1 = ":".join(f"{b:02X}" for b in hashlib.sha1(der).digest())
    assert not certificate_matches(der, [Fingerprint("sha-1", sha1)])
    assert not certificate_matches(der, [])


def test_fingerprint_lengths_are_checked_and_case_normalised() -> None:
    short = OUR_TEXT.replace(LOCAL.fingerprint.value, LOCAL.fingerprint.value[:-3])
    with pytest.raises(SdpError, match="sha-256 fingerprint is not 32"):
        parse(short)
    lower = OUR_TEXT.replace(LOCAL.fingerprint.value, LOCAL.fingerprint.value.lower())
    assert parse(lower.replace("sha-256", "SHA-256")) == OUR_OFFER


# -- our offer ------------------------------------------------------------------------------------


def test_our_offer() -> None:
    (audio,) = OUR_OFFER.media
    assert OUR_OFFER.bundle == ("0",)
    assert (audio.mid, audio.setup, audio.direction) == ("0", Setup.ACTPASS, Direction.SENDRECV)
    assert (audio.port, audio.connection, audio.rtcp_mux) == (9, "0.0.0.0", True)
    assert audio.formats == ("111", "63", "126")
    assert audio.codecs == (
        Codec(111, "opus", 48000, 2, "minptime=10;useinbandfec=1"),
        Codec(63, "red", 48000, 2, "111/111"),
        Codec(126, "telephone-event", 48000, None, "0-15"),
    )
    assert audio.ice_options == ("trickle",)
    assert audio.fingerprints == (LOCAL.fingerprint,)
    assert audio.ssrcs == (Ssrc(LOCAL.ssrc, LOCAL.cname),)
    assert audio.candidates == () and not audio.end_of_candidates
    assert parse(OUR_TEXT) == OUR_OFFER


def test_offer_options() -> None:
    host = Candidate.parse(SAFARI_TRICKLE)
    local = replace(
        LOCAL,
        opus_payload_type=100,
        red_payload_type=101,
        telephone_event_payload_type=None,
        prefer_red=True,
        fec=False,
        direction=Direction.RECVONLY,
        candidates=(host,),
        end_of_candidates=True,
        ice_lite=True,
        msid="- track",
    )
    offer = create_offer(local)
    (audio,) = offer.media
    assert audio.formats == ("101", "100")
    assert audio.codecs[0].fmtp == "100/100"
    assert audio.codecs[1].parameters == {"minptime": "10"}
    assert audio.direction is Direction.RECVONLY
    assert (audio.candidates, audio.end_of_candidates) == ((host,), True)
    assert offer.ice_lite and audio.msid == "- track"
    assert parse(serialize(offer)) == offer
    no_red = create_offer(replace(LOCAL, red_payload_type=None, telephone_event_payload_type=None))
    assert no_red.media[0].formats == ("111",)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"ice_ufrag": "abc"}, "ice-ufrag"),
        ({"ice_pwd": "x" * 21}, "ice-pwd"),
        ({"red_payload_type": 111}, "must differ"),
        ({"opus_payload_type": 72}, "not a dynamic"),
        ({"answer_setup": Setup.ACTPASS}, "active or passive"),
        ({"ssrc": 2**32}, "ssrc"),
        ({"fingerprint": Fingerprint("sha-1", "AA")}, "unsupported"),
    ],
)
def test_local_parameters_are_validated(changes: dict[str, object], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        replace(LOCAL, **changes)  # type: ignore[arg-type]


# -- answering a remote offer ---------------------------------------------------------------------


def _browser_media(**fields: Any) -> NegotiatedMedia:
    """What a browser's audio section negotiates to: opus 111 with in-band FEC, RED 63, sendrecv,
    first m-line, full ICE, candidates still trickling; ``fields`` are the rest."""
    return NegotiatedMedia(
        mid="0",
        mline_index=0,
        opus_payload_type=111,
        red_payload_type=63,
        remote_fec=True,
        direction=Direction.SENDRECV,
        remote_ice_lite=False,
        remote_end_of_candidates=False,
        **fields,
    )


def test_answer_to_chrome_offer() -> None:
    offer = parse(CHROME_OFFER)
    answer, media = negotiate(offer, LOCAL)
    assert [(m.kind, m.mid, m.port) for m in answer.media] == [
        ("audio", "0", 9),
        ("video", "1", 0),
        ("application", "2", 0),
    ]
    video, data = answer.media[1:]
    assert video.formats == offer.media[1].formats and video.direction is Direction.INACTIVE
    assert data.formats == ("webrtc-datachannel",) and data.direction is None
    assert video.ice_ufrag is None and video.candidates == ()
    assert answer.bundle == ("0",)
    audio = answer.media[0]
    assert audio.formats == ("111", "63", "110")
    assert audio.setup is Setup.ACTIVE and audio.direction is Direction.SENDRECV
    assert (audio.ice_ufrag, audio.ice_pwd) == (LOCAL.ice_ufrag, LOCAL.ice_pwd)
    assert media == _browser_media(
        telephone_event_payload_type=110,
        dtls_role=Setup.ACTIVE,
        ice_controlling=False,
        remote_ice_ufrag="V5zj",
        remote_ice_pwd="R3j1twdTKWTddB+XhkAS1voQ",
        remote_fingerprints=(Fingerprint("sha-256", CHROME_FP),),
        remote_candidates=offer.media[0].candidates,
        remote_ssrc=4210381974,
    )
    assert media.red
    assert parse(serialize(answer)) == answer


def test_answer_to_firefox_offer_uses_its_payload_types() -> None:
    answer, media = negotiate(parse(FIREFOX_OFFER), LOCAL)
    assert (media.opus_payload_type, media.red_payload_type) == (109, None)
    assert not media.red
    assert media.telephone_event_payload_type is None  # only telephone-event/8000 offered
    assert media.remote_fec
    assert answer.media[0].formats == ("109",)
    assert answer.media[0].codecs[0].payload_type == 109
    assert [(m.mid, m.port) for m in answer.media] == [("0", 9), ("1", 0)]
    assert media.remote_end_of_candidates and len(media.remote_candidates) == 5
    assert media.remote_ssrc == 2626687471


def test_dynamic_payload_types_are_followed() -> None:
    offer = parse(CHROME_OFFER)
    renumbered = (
        Codec(100, "OPUS", 48000, 2, "useinbandfec=0"),
        Codec(101, "red", 48000, 2, "100/100/100"),
        Codec(102, "telephone-event", 48000),
    )
    offer = _with_audio(offer, formats=("101", "100", "102"), codecs=renumbered)
    answer, media = negotiate(offer, LOCAL)
    assert (media.opus_payload_type, media.red_payload_type) == (100, 101)
    assert media.telephone_event_payload_type == 102
    assert not media.remote_fec
    assert answer.media[0].codecs[1] == Codec(101, "red", 48000, 2, "100/100")


@pytest.mark.parametrize(
    ("fmtp", "red"), [(None, None), ("111/111", None), ("96/0", None), ("", None), ("96/96", 63)]
)
def test_red_needs_an_fmtp_naming_the_negotiated_opus(fmtp: str | None, red: int | None) -> None:
    offer = parse(CHROME_OFFER)
    codecs = tuple(
        replace(c, payload_type=96) if c.name == "opus" else c for c in offer.media[0].codecs
    )
    codecs = tuple(replace(c, fmtp=fmtp) if c.name == "red" else c for c in codecs)
    formats = tuple("96" if f == "111" else f for f in offer.media[0].formats)
    _, media = negotiate(_with_audio(offer, codecs=codecs, formats=formats), LOCAL)
    assert media.opus_payload_type == 96
    assert media.red_payload_type == red


def test_red_and_dtmf_only_when_both_sides_want_them() -> None:
    local = replace(LOCAL, red_payload_type=None, telephone_event_payload_type=None)
    answer, media = negotiate(parse(CHROME_OFFER), local)
    assert (media.red_payload_type, media.telephone_event_payload_type) == (None, None)
    assert answer.media[0].formats == ("111",)


def test_prefer_red_lists_red_first_in_the_answer() -> None:
    answer, _ = negotiate(parse(CHROME_OFFER), replace(LOCAL, prefer_red=True))
    assert answer.media[0].formats == ("63", "111", "110")


@pytest.mark.parametrize(
    ("offered", "wanted", "answered"),
    [
        (Direction.SENDRECV, Direction.SENDRECV, Direction.SENDRECV),
        (Direction.SENDONLY, Direction.SENDRECV, Direction.RECVONLY),
        (Direction.RECVONLY, Direction.SENDRECV, Direction.SENDONLY),
        (Direction.INACTIVE, Direction.SENDRECV, Direction.INACTIVE),
        (Direction.SENDRECV, Direction.RECVONLY, Direction.RECVONLY),
        (Direction.SENDRECV, Direction.SENDONLY, Direction.SENDONLY),
        (Direction.SENDONLY, Direction.SENDONLY, Direction.INACTIVE),
        (Direction.RECVONLY, Direction.RECVONLY, Direction.INACTIVE),
        (None, Direction.SENDRECV, Direction.SENDRECV),
    ],
)
def test_answer_direction_follows_rfc_3264(
    offered: Direction | None, wanted: Direction, answered: Direction
) -> None:
    offer = _with_audio(parse(CHROME_OFFER), direction=offered)
    answer, media = negotiate(offer, replace(LOCAL, direction=wanted))
    assert answer.media[0].direction is answered
    assert media.direction is answered


@pytest.mark.parametrize(
    ("offered", "preferred", "ours"),
    [
        (Setup.ACTPASS, Setup.ACTIVE, Setup.ACTIVE),
        (Setup.ACTPASS, Setup.PASSIVE, Setup.PASSIVE),
        (Setup.ACTIVE, Setup.ACTIVE, Setup.PASSIVE),
        (Setup.PASSIVE, Setup.PASSIVE, Setup.ACTIVE),
        (None, Setup.ACTIVE, Setup.PASSIVE),  # RFC 4145: no a=setup means active
    ],
)
def test_answer_dtls_role(offered: Setup | None, preferred: Setup, ours: Setup) -> None:
    offer = _with_audio(parse(CHROME_OFFER), setup=offered)
    answer, media = negotiate(offer, replace(LOCAL, answer_setup=preferred))
    assert answer.media[0].setup is ours
    assert media.dtls_role is ours


def test_ice_roles() -> None:
    lite_offer = replace(parse(CHROME_OFFER), ice_lite=True)
    assert negotiate(lite_offer, LOCAL)[1].ice_controlling
    assert negotiate(lite_offer, LOCAL)[1].remote_ice_lite
    assert not negotiate(lite_offer, replace(LOCAL, ice_lite=True))[1].ice_controlling
    answer, media = negotiate(parse(CHROME_OFFER), replace(LOCAL, ice_lite=True))
    assert answer.ice_lite and not media.ice_controlling


def test_second_audio_section_is_rejected_and_unbundled_offer_stays_unbundled() -> None:
    offer = parse(CHROME_OFFER)
    second = replace(offer.media[0], mid="9")
    offer = replace(offer, media=(*offer.media, second), bundle=())
    answer, media = negotiate(offer, LOCAL)
    assert [m.port for m in answer.media] == [9, 0, 0, 0]
    assert answer.media[3].mid == "9"
    assert answer.bundle == ()
    assert media.mline_index == 0


def test_first_usable_audio_section_is_chosen() -> None:
    offer = parse(CHROME_OFFER)
    offer = replace(offer, media=(offer.media[1], replace(offer.media[0], port=0), offer.media[0]))
    offer = replace(
        offer, media=(*offer.media[:2], replace(offer.media[2], mid="5")), bundle=("1", "5")
    )
    answer, media = negotiate(offer, LOCAL)
    assert [m.port for m in answer.media] == [0, 0, 9]
    assert (media.mid, media.mline_index) == ("5", 2)
    assert answer.bundle == ("5",)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"rtcp_mux": False}, "rtcp-mux"),
        ({"port": 0}, "no audio m-section"),
        ({"kind": "video"}, "no audio m-section"),
        ({"protocol": "RTP/AVP"}, "no audio m-section"),
        ({"fingerprints": (Fingerprint("sha-1", "AA:BB"),)}, "no a=fingerprint with sha-256"),
        ({"codecs": ()}, "opus"),
        ({"ice_pwd": None}, "ICE credentials"),
    ],
)
def test_unacceptable_offers_are_rejected(changes: dict[str, object], reason: str) -> None:
    offer = _with_audio(parse(CHROME_OFFER), **changes)
    with pytest.raises(SdpError, match=reason):
        negotiate(offer, LOCAL)


def test_offer_without_rtcp_mux_text_is_rejected() -> None:
    offer = parse(_without(CHROME_OFFER, "a=rtcp-mux"))
    with pytest.raises(SdpError, match="RTP/RTCP multiplexing is required"):
        negotiate(offer, LOCAL)


# -- applying a remote answer to our offer -------------------------------------------------------


def test_safari_answer_to_our_offer() -> None:
    answer = parse(SAFARI_ANSWER)
    media = apply_answer(OUR_OFFER, answer)
    assert media == _browser_media(
        telephone_event_payload_type=126,
        dtls_role=Setup.PASSIVE,
        ice_controlling=True,
        remote_ice_ufrag="gsu8",
        remote_ice_pwd="PO+799nKSNrh9UCauSDmLhuV",
        remote_fingerprints=(Fingerprint("sha-256", SAFARI_FP),),
        remote_candidates=(),
        remote_ssrc=2537519494,
    )


def test_our_answer_applies_back_to_the_same_agreement() -> None:
    """negotiate() on one side and apply_answer() on the other agree (two of our agents)."""
    offerer = replace(LOCAL, ice_ufrag="OFFR", fingerprint=fingerprint_of(b"offerer"))
    offer = parse(serialize(create_offer(offerer)))
    answer, theirs = negotiate(offer, LOCAL)
    ours = apply_answer(create_offer(offerer), parse(serialize(answer)))
    for name in ("opus_payload_type", "red_payload_type", "telephone_event_payload_type", "mid"):
        assert getattr(ours, name) == getattr(theirs, name)
    assert {ours.dtls_role, theirs.dtls_role} == {Setup.ACTIVE, Setup.PASSIVE}
    assert ours.ice_controlling and not theirs.ice_controlling
    assert ours.remote_fingerprints == (LOCAL.fingerprint,)
    assert theirs.remote_fingerprints == (offerer.fingerprint,)


@pytest.mark.parametrize(
    ("ours", "answered", "result"),
    [
        (Direction.SENDRECV, Direction.SENDONLY, Direction.RECVONLY),
        (Direction.SENDRECV, Direction.RECVONLY, Direction.SENDONLY),
        (Direction.SENDRECV, Direction.INACTIVE, Direction.INACTIVE),
        (Direction.SENDONLY, Direction.RECVONLY, Direction.SENDONLY),
        (Direction.RECVONLY, Direction.SENDONLY, Direction.RECVONLY),
        (Direction.SENDRECV, None, Direction.SENDRECV),
        (Direction.SENDONLY, Direction.SENDONLY, None),
        (Direction.RECVONLY, Direction.RECVONLY, None),
        (Direction.SENDONLY, Direction.SENDRECV, None),
        (Direction.INACTIVE, Direction.RECVONLY, None),
    ],
)
def test_answer_direction_must_fit_the_offer(
    ours: Direction, answered: Direction | None, result: Direction | None
) -> None:
    offer = create_offer(replace(LOCAL, direction=ours))
    answer = _with_audio(parse(SAFARI_ANSWER), direction=answered)
    if result is None:
        with pytest.raises(SdpError, match="does not fit offered"):
            apply_answer(offer, answer)
    else:
        assert apply_answer(offer, answer).direction is result


@pytest.mark.parametrize(
    ("setup", "role"),
    [(Setup.ACTIVE, Setup.PASSIVE), (Setup.PASSIVE, Setup.ACTIVE), (None, Setup.PASSIVE)],
)
def test_our_dtls_role_from_the_answer(setup: Setup | None, role: Setup) -> None:
    answer = _with_audio(parse(SAFARI_ANSWER), setup=setup)
    assert apply_answer(OUR_OFFER, answer).dtls_role is role


def test_answer_red_needs_the_opus_fmtp_and_our_offer() -> None:
    answer = parse(SAFARI_ANSWER)
    no_fmtp = tuple(replace(c, fmtp=None) if c.name == "red" else c for c in answer.media[0].codecs)
    assert apply_answer(OUR_OFFER, _with_audio(answer, codecs=no_fmtp)).red_payload_type is None
    only_opus = _with_audio(answer, formats=("111",), codecs=answer.media[0].codecs[:1])
    media = apply_answer(OUR_OFFER, only_opus)
    assert (media.red_payload_type, media.telephone_event_payload_type) == (None, None)
    no_red_offered = create_offer(replace(LOCAL, red_payload_type=None))
    with pytest.raises(SdpError, match="payload type 63, which the offer did not list"):
        apply_answer(no_red_offered, answer)


def _answer_with(**changes: object) -> SessionDescription:
    return _with_audio(parse(SAFARI_ANSWER), **changes)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (_answer_with(setup=Setup.ACTPASS), "actpass"),
        (_answer_with(port=0), "rejected the audio"),
        (_answer_with(rtcp_mux=False), "rtcp-mux"),
        (_answer_with(mid="1"), "do not match"),
        (replace(parse(SAFARI_ANSWER), media=()), "do not match"),
        (replace(parse(SAFARI_ANSWER), bundle=("0", "1")), "not a subset"),
        (
            _answer_with(formats=("96",), codecs=(Codec(96, "opus", 48000, 2),)),
            "payload type 96, which the offer did not list",
        ),
        (
            _answer_with(
                formats=("111", "63"),
                codecs=(Codec(111, "opus", 48000, 2), Codec(63, "PCMU", 8000)),
            ),
            "maps payload type 63 to PCMU/8000",
        ),
        (_answer_with(fingerprints=(Fingerprint("sha-1", "AA"),)), "no a=fingerprint"),
        (_answer_with(codecs=()), "opus"),
        (_answer_with(protocol="UDP/TLS/RTP/SAVP"), "protocol UDP/TLS/RTP/SAVP is not"),
    ],
)
def test_bad_answers_are_rejected(answer: SessionDescription, reason: str) -> None:
    with pytest.raises(SdpError, match=reason):
        apply_answer(OUR_OFFER, answer)


def test_answer_to_an_offer_without_audio_is_refused() -> None:
    video_only = replace(parse(CHROME_OFFER), media=(parse(CHROME_OFFER).media[1],), bundle=())
    with pytest.raises(SdpError, match="our offer has no audio"):
        apply_answer(video_only, video_only)


# -- aiortc interop -----------------------------------------------------------------------------


def _peer() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))  # host candidates only


async def test_aiortc_offer_is_answered_and_aiortc_accepts_the_answer() -> None:
    pc = _peer()
    try:
        pc.addTransceiver("audio", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        offer = parse(pc.localDescription.sdp)
        (audio,) = offer.media
        assert audio.setup is Setup.ACTPASS and audio.rtcp_mux and audio.candidates
        assert {f.algorithm for f in audio.fingerprints} == set(SUPPORTED_FINGERPRINTS)
        answer, media = negotiate(offer, LOCAL)
        opus = next(c for c in audio.codecs if c.name == "opus")
        assert media.opus_payload_type == opus.payload_type
        assert (media.red_payload_type, media.telephone_event_payload_type) == (None, None)
        assert not media.remote_fec
        assert media.remote_candidates == audio.candidates and media.remote_end_of_candidates
        assert media.remote_ssrc == audio.ssrcs[0].ssrc
        await pc.setRemoteDescription(RTCSessionDescription(serialize(answer), "answer"))
        assert pc.signalingState == "stable"
        (transceiver,) = pc.getTransceivers()
        assert transceiver.currentDirection == "sendrecv"
    finally:
        await pc.close()


async def test_aiortc_parses_and_answers_our_offer() -> None:
    host = Candidate.parse("candidate:1 1 udp 2130706431 127.0.0.1 9 typ host")
    local = replace(LOCAL, candidates=(host,), end_of_candidates=True, msid="s t")
    offer = create_offer(local)
    text = serialize(offer)
    parsed = aiortc.sdp.SessionDescription.parse(text)
    (audio,) = parsed.media
    assert audio.rtp.muxId == "0" and audio.rtcp_mux and audio.direction == "sendrecv"
    assert [(c.payloadType, c.mimeType) for c in audio.rtp.codecs] == [
        (111, "audio/opus"),
        (63, "audio/red"),
        (126, "audio/telephone-event"),
    ]
    assert audio.rtp.codecs[0].parameters == {"minptime": 10, "useinbandfec": 1}
    assert audio.ice is not None and audio.ice.usernameFragment == LOCAL.ice_ufrag
    assert audio.dtls is not None and audio.dtls.role == "auto"
    assert audio.dtls.fingerprints[0].value == LOCAL.fingerprint.value
    assert [c.ip for c in audio.ice_candidates] == ["127.0.0.1"]
    assert audio.ssrc[0].ssrc == LOCAL.ssrc and audio.ssrc[0].cname == LOCAL.cname

    pc = _peer()
    try:
        await pc.setRemoteDescription(RTCSessionDescription(text, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        media = apply_answer(offer, parse(pc.localDescription.sdp))
    finally:
        await pc.close()
    assert media.opus_payload_type == 111
    assert (media.red_payload_type, media.telephone_event_payload_type) == (None, None)
    assert media.dtls_role is Setup.PASSIVE  # aiortc answers active, like browsers
    assert media.direction is Direction.SENDRECV or media.direction is Direction.SENDONLY
    assert {f.algorithm for f in media.remote_fingerprints} == set(SUPPORTED_FINGERPRINTS)
    assert media.remote_candidates and media.ice_controlling
