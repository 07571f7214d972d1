"""Attacks on a running fleet (relay, TLS broker, paired boards), each a real attempt.

Signaling: envelopes published on a paired device's ``out`` that are forged (another
``from``), tampered with, badly signed, unsigned, replayed or stale never reach the
callee, and the relay drops each with its reason; an honest envelope published after
them does reach it, carrying the sender's certificate. The callee checks signatures
itself too. Revocation: ``device revoke`` cuts a connected board off and keeps it off,
while the others stay. TURN: no board holds the secret; the relay mints credentials for
each call and a relay-only call connects through coturn with them.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from pathlib import Path
from typing import Any

from mqtt_env import SDP

from agent.pairing.client import new_key_and_csr
from agent.signaling.envelope import Envelope, InviteBody, new_id
from agent.signaling.signing import Verifier, certificate_field
from agent.signaling.topics import Kind, device_topic
from cloud_relay.pki import RelayPki
from cloud_relay.store import Store
from tools.lab.attacks import (
    invite,
    next_in,
    now_ms,
    publish_out,
    relay_dropped,
    session,
    wire,
)
from tools.lab.fleet import RELAY_CMD, REPO, WAIT, Fleet, fleet
from tools.lab.turn import Coturn

A, B = "door-a", "door-b"


async def test_forged_tampered_unsigned_replayed_and_stale_signaling_is_dropped(
    tmp_path: Path,
) -> None:
    async with fleet(tmp_path, devices=(A, B), client_id="attacks") as f:
        for device in (A, B):
            await f.pair(device)
        a = f.signing(A)
        async with session(
            f.mqtt_config("attacks", session_expiry=0), device_topic(B, Kind.IN)
        ) as raw:
            for device in (A, B):  # online as far as the relay knows: invites are routed
                await raw.publish(
                    device_topic(device, Kind.PRESENCE), b'{"state":"online"}', qos=1, retain=True
                )
            await f.until_online(A, B)

            attacks: list[tuple[str, str, bytes]] = []  # (expected reason, call, payload)

            call = new_id()  # signed by A, claiming to come from another device
            attacks.append(("forged-from", call, wire(a.sign(invite(call, sender="door-c", to=B)))))

            call = new_id()  # signed, then the SDP changed on the way
            tampered = json.loads(wire(a.sign(invite(call, sender=A, to=B))))
            tampered["body"]["sdp"] += "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\n"
            attacks.append(("bad-signature", call, json.dumps(tampered).encode()))

            call = new_id()  # a signature of the right shape by nobody
            junk = base64.urlsafe_b64encode(bytes(64)).rstrip(b"=").decode()
            attacks.append(
                (
                    "bad-signature",
                    call,
                    wire(dataclasses.replace(invite(call, sender=A, to=B), sig=junk)),
                )
            )

            call = new_id()
            attacks.append(("unsigned", call, wire(invite(call, sender=A, to=B))))

            call = new_id()
            attacks.append(
                ("stale", call, wire(a.sign(invite(call, sender=A, to=B, ts=now_ms() - 120_000))))
            )

            honest_call = new_id()
            honest = wire(a.sign(invite(honest_call, sender=A, to=B)))
            await publish_out(raw, A, honest)
            first = await next_in(raw)
            attacks.append(("duplicate", honest_call, honest))  # the same message again

            for _, _, payload in attacks:
                await publish_out(raw, A, payload)
            for reason, call, _ in attacks:
                if call != honest_call:
                    assert await relay_dropped(f.root / "relay.log", call) == [reason], reason

            marker_call = new_id()
            await publish_out(raw, A, wire(a.sign(invite(marker_call, sender=A, to=B))))
            marker = await next_in(raw)
            # Nothing of the attacks reached B: the next message after the honest one is
            # the marker.
            assert first.call == honest_call and marker.call == marker_call

            # What B got carries A's certificate, and B can check it against the CA.
            ca = (f.pki_dir / "ca.pem").read_bytes()
            Verifier(ca).check(marker)
        await f.stop_relay()
        summary = f.log("relay").rsplit("relay stopped: ", 1)[1]
        for reason in ("forged-from", "bad-signature", "unsigned", "stale"):
            assert f"dropped[{reason}]=" in summary, (reason, summary)


async def test_a_revoked_board_is_cut_off_and_stays_off(tmp_path: Path) -> None:
    async with fleet(tmp_path, devices=(A, B), client_id="revoke") as f:
        for device, tone in ((A, "700"), (B, "1100")):
            await f.agent(device, source=f"tone:{tone}", sink="null")
        await f.until_online(A, B)
        proc = await asyncio.create_subprocess_exec(
            *RELAY_CMD, "device", "revoke", B, "--config", str(tmp_path / "relay.toml"),
            "--data-dir", str(f.data_dir), cwd=REPO,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        assert proc.returncode == 0, out
        assert b"revoked 1 certificate" in out
        # B's session is ended and its reconnects fail: the relay records it offline.
        await until_presence(f, B, "offline")
        async with asyncio.timeout(WAIT):
            while "CERTIFICATE_REVOKED" not in f.log(B) and "certificate revoked" not in f.log(B):
                await asyncio.sleep(0.05)
        # A stays on and can still be commanded; a call to B is refused as unreachable.
        reply = await f.command(A, "call", peer=B)
        assert reply["ok"], reply
        status = await f.until_status(
            A, lambda s: s.get("last_call") is not None, "A's call to B ended"
        )
        assert status["last_call"]["reason"] == "unreachable", status
        assert "revoked" in f.log("relay") and "cut off the broker: door-b" in f.log("relay")


async def until_presence(f: Fleet, device: str, state: str) -> None:
    store = await Store.open(f"sqlite:///{f.db_path}")
    try:
        async with asyncio.timeout(WAIT):
            while True:
                states = {d.id: d.presence for d in await store.run(store.devices)}
                if states.get(device) == state:
                    return
                await asyncio.sleep(0.05)
    finally:
        await store.close()


async def test_the_callee_checks_the_callers_signature_itself(tmp_path: Path) -> None:
    """What arrives on a board's ``in`` (as if the relay or broker were subverted) must be
    signed by the device in its ``from``, with a certificate of the relay's CA."""
    async with fleet(tmp_path, devices=(A, B), client_id="callee-checks") as f:
        await f.pair(A)
        await f.agent(B, source="tone:1100", sink="null")
        await f.until_online(B)
        a = f.signing(A)
        a_cert = certificate_field((f.state_dir(A) / "identity" / "device.pem").read_bytes())
        b_cert = certificate_field((f.state_dir(B) / "identity" / "device.pem").read_bytes())
        other = RelayPki.open(tmp_path / "other-ca")
        stranger = other.issue_device(new_key_and_csr()[1], A)  # "door-a" by another CA
        bad: list[tuple[str, Envelope]] = []
        call = new_id()
        bad.append(("unsigned", invite(call, sender=A, to=B)))
        call = new_id()
        bad.append(("no-certificate", a.sign(invite(call, sender=A, to=B))))
        call = new_id()
        bad.append(
            ("wrong-signer", dataclasses.replace(a.sign(invite(call, sender=A, to=B)), cert=b_cert))
        )
        call = new_id()
        foreign = dataclasses.replace(
            a.sign(invite(call, sender=A, to=B)), cert=certificate_field(stranger)
        )
        bad.append(("bad-certificate", foreign))
        call = new_id()
        signed = dataclasses.replace(a.sign(invite(call, sender=A, to=B)), cert=a_cert)
        tampered = dataclasses.replace(signed, body=InviteBody(sdp=SDP + "a=x\r\n"))
        bad.append(("bad-signature", tampered))
        async with session(f.mqtt_config("callee-checks", session_expiry=0)) as raw:
            for _, env in bad:
                await raw.publish(device_topic(B, Kind.IN), wire(env), qos=1)
            honest = new_id()
            env = dataclasses.replace(a.sign(invite(honest, sender=A, to=B)), cert=a_cert)
            await raw.publish(device_topic(B, Kind.IN), wire(env), qos=1)
            # B rings for the honest invite only, having refused the others first.
            status = await f.until_status(
                B, lambda s: s.get("call_id") == honest, "B ringing for the honest invite"
            )
            assert status["phase"] == "ringing", status
            assert status["rejected"] == {reason: 1 for reason, _ in bad}, status
        await f.command(B, "decline")


async def test_calls_relay_through_turn_with_credentials_the_relay_minted(
    tmp_path: Path,
) -> None:
    """No board holds the TURN secret: the relay mints each party's credentials and sends
    them on its ``config``; a relay-only call connects through coturn with them."""
    with Coturn.running() as turn:
        secret = tmp_path / "turn-secret"
        secret.write_text(turn.secret)
        secret.chmod(0o600)
        url = f"turn:127.0.0.1:{turn.port}?transport=udp"
        extra = f'[turn]\nurls = ["{url}"]\nsecret_file = "{secret}"\nlifetime_s = 600\n'
        async with fleet(tmp_path, devices=(A, B), client_id="turn", relay_extra=extra) as f:
            await f.agent(A, source="tone:700", sink="null", ice='policy = "relay"')
            await f.agent(B, source="tone:1100", sink="null", auto_answer=[A],
                          ice='policy = "relay"')  # fmt: skip
            await f.until_online(A, B)
            reply = await f.command(A, "call", peer=B)
            assert reply["ok"], reply
            call = reply["call_id"]

            def hearing(status: dict[str, Any]) -> bool:
                media = status["media"] or {}
                return bool(status["call_id"] == call and media.get("packets_received", 0) > 50)

            for device in (A, B):
                await f.until_status(device, hearing, f"{device} receiving audio through TURN")
            await f.command(A, "hangup")
            for device in (A, B):
                lines = f.log(device).splitlines()
                connected = [line for line in lines if "ICE connected via" in line]
                assert connected and "relay" in connected[-1], f.log(device)
                assert "TURN server(s) from the relay" in f.log(device)
            for device in (A, B):
                config = (tmp_path / f"{device}.toml").read_text()
                assert turn.secret not in config
