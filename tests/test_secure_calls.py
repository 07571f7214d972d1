"""Calls between paired boards: the callee checks signatures itself, and TURN
credentials come from the relay, minted for the call, never from a shared secret on
the board."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from mqtt_env import SDP, now_ms

from agent.pairing.client import new_key_and_csr
from agent.signaling.envelope import Envelope, InviteBody, make, new_id, to_json
from agent.signaling.mqtt import MqttClient
from agent.signaling.signing import certificate_field
from agent.signaling.topics import Kind, device_topic
from cloud_relay.pki import RelayPki
from tools.lab.fleet import Fleet, fleet
from tools.lab.turn import Coturn

A, B = "door-a", "door-b"


@contextlib.asynccontextmanager
async def relay_client(f: Fleet) -> AsyncIterator[MqttClient]:
    """A client with the relay's credentials: it may publish on any device's topics."""
    client = MqttClient(f.mqtt_config(f"trust-{new_id()[:8]}", session_expiry=0))
    await client.start()
    try:
        yield client
    finally:
        await client.close()


def invite(call: str) -> Envelope:
    return make(InviteBody(sdp=SDP), call=call, from_=A, to=B, ts=now_ms())


def wire(env: Envelope) -> bytes:
    return to_json(env).encode()


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
        bad.append(("unsigned", invite(call)))
        call = new_id()
        bad.append(("no-certificate", a.sign(invite(call))))
        call = new_id()
        bad.append(("wrong-signer", dataclasses.replace(a.sign(invite(call)), cert=b_cert)))
        call = new_id()
        foreign = dataclasses.replace(a.sign(invite(call)), cert=certificate_field(stranger))
        bad.append(("bad-certificate", foreign))
        call = new_id()
        signed = dataclasses.replace(a.sign(invite(call)), cert=a_cert)
        tampered = dataclasses.replace(signed, body=InviteBody(sdp=SDP + "a=x\r\n"))
        bad.append(("bad-signature", tampered))
        async with relay_client(f) as raw:
            for _, env in bad:
                await raw.publish(device_topic(B, Kind.IN), wire(env), qos=1)
            honest = new_id()
            env = dataclasses.replace(a.sign(invite(honest)), cert=a_cert)
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
