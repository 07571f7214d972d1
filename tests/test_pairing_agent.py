"""A board's agent and pairing: an unpaired agent waits, ``tools/pair-device`` wakes it
and it comes online with its new identity; paired again (``--force``) while running, it
starts over with the new identity and the relay revokes the old one."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from agent.pairing.token import PairingToken
from agent.service.identity import load_identity
from cloud_relay.pki import RelayPki, fingerprint_sha256
from tools.lab.fleet import PAIR_DEVICE, RELAY_CMD, WAIT, Fleet, fleet

A = "door-a"


async def until_logged(f: Fleet, name: str, text: str, count: int = 1) -> None:
    async with asyncio.timeout(WAIT):
        while f.log(name).count(text) < count:
            await asyncio.sleep(0.05)


async def test_an_unpaired_agent_waits_then_comes_online_and_takes_a_new_identity(
    tmp_path: Path,
) -> None:
    async with fleet(tmp_path, devices=(A,), client_id="pairing-agent") as f:
        await f.agent(A, source="tone:700", sink="null", pair=False)
        await until_logged(f, A, "not paired: run tools/pair-device")
        await f.pair(A)
        await f.until_online(A)
        await until_logged(f, A, f"device {A}: online")
        first = load_identity(f.state_dir(A))
        assert first is not None
        old_cert = first.cert_path.read_bytes()
        assert "signalled" not in f.log(f"pair-{A}")  # the CLI says it in words
        assert "picking it up" in f.log(f"pair-{A}")

        # Paired again while running: without --force pair-device refuses (no terminal to
        # ask on), with it the agent starts over on the new identity.
        token = await f.token(A)
        refused = await asyncio.create_subprocess_exec(
            PAIR_DEVICE, token, "--state-dir", str(f.state_dir(A)),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await refused.communicate()
        assert refused.returncode == 1 and b"--force" in out, out
        argv = [*f.pair_device_argv(A, token), "--force"]
        again = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await again.communicate()
        assert again.returncode == 0, out
        await until_logged(f, A, "reloading: starting over with the identity on disk")
        await until_logged(f, A, f"device {A}: online", count=2)
        second = load_identity(f.state_dir(A))
        assert second is not None and second.cert_path.read_bytes() != old_cert
        pki = RelayPki.open(f.pki_dir)
        assert pki.is_revoked(old_cert)
        assert not pki.is_revoked(second.cert_path.read_bytes())
        assert f.procs[A].returncode is None
        await f.until_status(A, lambda s: s["phase"] == "idle", "A answers on its new identity")


def test_pair_new_prints_the_token_and_its_qr_code(tmp_path: Path) -> None:
    """The operator's side, without a running relay: the token names the relay's pairing
    URL and pins its HTTPS certificate; the QR code carries the same text."""
    argv = [*RELAY_CMD, "pair", "new", "--data-dir", str(tmp_path), "--name", "Hall",
            "--site", "home", "--ttl", "15m"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    tokens = [w for w in done.stdout.split() if w.startswith("eipair1.")]
    assert len(tokens) == 1, done.stdout
    token = PairingToken.parse(tokens[0])
    https = (tmp_path / "pki" / "https.pem").read_bytes()
    assert token.fingerprint == fingerprint_sha256(https)
    assert token.url.startswith("https://") and token.url.endswith(":8443")
    assert "valid 15 min" in done.stdout
    assert "\u2588" in done.stdout or "\u2580" in done.stdout  # the QR code's blocks
    assert token.secret not in (tmp_path / "relay.db").read_bytes().decode(errors="replace")

    unknown = [*RELAY_CMD, "device", "revoke", "door-nobody", "--data-dir", str(tmp_path)]
    done = subprocess.run(unknown, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and "no certificate issued" in done.stderr, done
