"""Web peers (a browser the relay speaks for) without I/O: ids, signatures, the board's
policy, routing and the answer the page gets. The calls themselves: ``test_webcall_e2e``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.calls.policy import CallPolicy, Refusal, Verdict, decide
from agent.media import sdp
from agent.net.candidate import Candidate
from agent.signaling.envelope import (
    AcceptBody,
    CallMode,
    Envelope,
    InviteBody,
    from_json,
    make,
    new_id,
    respond,
    to_json,
)
from agent.signaling.signing import SignatureError, Verifier, certificate_field, sign
from agent.signaling.topics import TopicError, check_device_id, check_peer_id, is_web_peer
from cloud_relay.apibase import BadRequest
from cloud_relay.pki import RelayPki
from cloud_relay.presence import PresenceTable
from cloud_relay.routing import Action, CallStarted, Router
from cloud_relay.sync import decode, encode
from cloud_relay.webcall import web_peer_id, with_candidates

TS = 1_800_000_000_000
OFFER = "v=0\r\n"


def test_web_peer_ids_never_meet_device_ids() -> None:
    assert is_web_peer("web.ops") and is_web_peer("web.jane.doe_2")
    for bad in ("web.", "web-ops", "web.Ops", "web./x", "web." + "a" * 60, "ops"):
        assert not is_web_peer(bad), bad
    with pytest.raises(TopicError):
        check_device_id("web.ops")  # pairing issues device ids: never a web peer's
    assert check_peer_id("web.ops") == "web.ops" and check_peer_id("door-a") == "door-a"
    assert web_peer_id("ops") == "web.ops"
    with pytest.raises(BadRequest):
        web_peer_id("a" * 64)  # a long user name: no id, no call
    env = make(InviteBody(OFFER), call=new_id(), from_="web.ops", to="door-a", ts=TS)
    assert from_json(to_json(env)) == env


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> RelayPki:
    return RelayPki.open(tmp_path_factory.mktemp("pki"))


def _signer(pki: RelayPki, device: str | None) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A device's key and certificate field (the relay's client ones for None)."""
    if device is None:
        files = pki.relay_client_certificate()
        key = serialization.load_pem_private_key(Path(files.key).read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key, certificate_field(Path(files.cert).read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
        .sign(key, hashes.SHA256())
    )
    cert = pki.issue_device(csr.public_bytes(serialization.Encoding.PEM), device)
    return key, certificate_field(cert)


def _signed(env: Envelope, signer: tuple[ec.EllipticCurvePrivateKey, str]) -> Envelope:
    return replace(sign(env, signer[0]), cert=signer[1])


def test_only_the_relay_signs_for_a_web_peer_and_never_for_a_device(pki: RelayPki) -> None:
    verifier = Verifier(pki.ca_path.read_bytes())
    relay, device = _signer(pki, None), _signer(pki, "door-b")
    web = make(InviteBody(OFFER), call=new_id(), from_="web.ops", to="door-a", ts=TS)
    verifier.check(_signed(web, relay))
    # A device's key cannot pass for a web peer...
    with pytest.raises(SignatureError) as refused:
        verifier.check(_signed(web, device))
    assert refused.value.reason == "wrong-signer"
    # ...nor the relay's key for a device.
    as_device = replace(web, from_="door-b")
    with pytest.raises(SignatureError) as refused:
        verifier.check(_signed(as_device, relay))
    assert refused.value.reason == "wrong-signer"
    verifier.check(_signed(as_device, device))
    with pytest.raises(ValueError):
        pki.issue_device(b"", "web.ops")  # no device certificate can name a web peer


def test_the_boards_policy_for_web_peers() -> None:
    default = CallPolicy()
    assert decide(default, "web.ops", CallMode.NORMAL).verdict is Verdict.RING
    listen = decide(default, "web.ops", CallMode.LISTEN)
    assert listen.refusal is Refusal.LISTEN_NOT_ALLOWED
    open_ = CallPolicy(listen_allowed=frozenset({"web.*"}), auto_answer=frozenset({"web.*"}))
    assert decide(open_, "web.ops", CallMode.LISTEN).verdict is Verdict.AUTO_ANSWER
    assert decide(open_, "web.ops", CallMode.NORMAL).verdict is Verdict.AUTO_ANSWER
    # ``web.*`` names web peers only, never a device.
    assert decide(open_, "door-b", CallMode.LISTEN).refusal is Refusal.LISTEN_NOT_ALLOWED
    assert decide(open_, "door-b", CallMode.NORMAL).verdict is Verdict.RING
    one = CallPolicy(listen_allowed=frozenset({"web.ops"}))
    assert decide(one, "web.ops", CallMode.LISTEN).verdict is Verdict.AUTO_ANSWER
    assert decide(one, "web.guest", CallMode.LISTEN).refusal is Refusal.LISTEN_NOT_ALLOWED
    closed = replace(open_, web_allowed=frozenset())
    for mode in CallMode:
        assert decide(closed, "web.ops", mode).refusal is Refusal.WEB_NOT_ALLOWED
    assert decide(closed, "door-b", CallMode.NORMAL).verdict is Verdict.RING


def test_the_router_takes_web_peers_only_through_originate() -> None:
    router = Router(PresenceTable({"door-a": "online"}))
    invite = make(InviteBody(OFFER, CallMode.LISTEN), call=new_id(), from_="web.ops",
                  to="door-a", ts=TS)  # fmt: skip
    route = router.originate(invite, TS)
    assert route.action is Action.FORWARD and route.recipient == "door-a"
    assert route.events == (CallStarted(invite.call, "web.ops", "door-a", "listen"),)
    accept = respond(invite, AcceptBody(OFFER), ts=TS + 1)
    route = router.route_envelope("door-a", accept, TS + 1)
    assert route.action is Action.FORWARD and route.recipient == "web.ops"
    # A device's message cannot come in as the relay's own...
    device = make(InviteBody(OFFER), call=new_id(), from_="door-a", to="door-b", ts=TS)
    assert router.originate(device, TS).reason == "not-web-peer"
    # ...and a device's claim to be a web peer is overwritten with its topic's id.
    forged = make(InviteBody(OFFER), call=new_id(), from_="web.ops", to="door-a", ts=TS)
    route = router.route_envelope("door-b", forged, TS)
    assert route.forged and route.envelope is not None and route.envelope.from_ == "door-b"
    # Nobody can call a web peer: it is never present.
    to_web = make(InviteBody(OFFER), call=new_id(), from_="door-a", to="web.ops", ts=TS)
    route = router.route_envelope("door-a", to_web, TS)
    assert route.action is Action.REJECT and route.reason == "unreachable-unknown"
    # The other workers learn of a web call like of any other.
    started = CallStarted(invite.call, "web.ops", "door-a", "listen")
    assert decode(encode("relay-1", [started])) == ("relay-1", (started,))


def test_the_page_gets_the_boards_answer_with_its_candidates() -> None:
    local = sdp.LocalParameters(
        ice_ufrag="abcd",
        ice_pwd="a" * 22,
        fingerprint=sdp.fingerprint_of(b"certificate"),
        ssrc=1234,
        cname="edge-intercom",
        session_id=1,
    )
    answer = sdp.serialize(sdp.create_offer(local))
    host = Candidate.parse("candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host")
    merged = sdp.parse(with_candidates(answer, [host], complete=True))
    assert merged.media[0].candidates == (host,) and merged.media[0].end_of_candidates
    partial = sdp.parse(with_candidates(answer, [], complete=False))
    assert partial.media[0].candidates == () and not partial.media[0].end_of_candidates
    with pytest.raises(sdp.SdpError):
        with_candidates("v=0\r\nbogus", [host], complete=True)
