"""Security benchmark: every attack on the control and media planes, made for real, counted.

One fleet on loopback (``tools.lab.fleet``: ``edge-intercom-relay serve`` with its TLS
mosquitto and HTTPS pairing endpoint; boards paired with ``tools/pair-device``), a real
coturn (``tools.lab.turn``) and real libsrtp. Each attack class makes ``attempts`` and
counts as ``rejected`` those that did not get through, judged where it matters (a
subscriber that must receive nothing up to a marker, the relay's drop log, the HTTP
status and the relay's log, coturn's error code, libsrtp's verdict); each class also
runs an honest control in the same run (``control_ok``), so a rejection cannot come
from a broken setup. Classes:

- unpaired_connect: no TLS, no client certificate, a self-signed one, one of another
  CA (also as ``relay``, and on the relay's listener): the broker refuses the session.
- cross_device_topics: ``--topic-attempts`` randomised (``--seed``) subscribes and
  publishes by door-a on door-b's topics, QoS 0/1, retained or not, exact filters and
  wildcards and shared subscriptions. A publish is rejected if the relay's watcher (which
  sees every topic) never got it before door-a's marker; a subscribe if the probe the
  relay then published on a matching door-b topic never reached door-a before its marker.
- relay_topics: door-a writes the relay's sync topic and its own ``in``/``cmd``/``config``
  /``alert/ack`` (only the relay writes those), and subscribes to the sync topic.
- forged_from, tampered_sdp, bad_signature, unsigned, replayed, stale: envelopes door-a
  publishes on its ``out``; rejected if none reached door-b's ``in`` before an honest
  invite (the control) and the relay logged each as dropped.
- token_reuse, token_expired, token_guessed (``--guesses`` raw POSTs; 403 and 429 count),
  pairing_oversize, csr_claims_relay, relay_device_id, wrong_fingerprint (``pair-device``
  with another pin, or the right pin and an impostor server at the token's URL).
- revoked_device: ``device revoke`` on a running agent: its session must end within 5 s
  (``revoke_cutoff_ms``: from launching the command to its offline will at a watcher),
  and its certificate must not get back in; another agent stays on (control).
- turn_expired, turn_forged: coturn answers 401; fresh credentials allocate (control).
- srtp_replay, srtp_tamper: libsrtp refuses replayed and altered packets.

``crashes``: relay, broker and agent processes that died on their own or did not exit 0
on SIGTERM. ``pair_ms``: ``tools/pair-device TOKEN`` against an agent already running
unpaired, from launching pair-device to the relay's store saying the device is online
(p50/p95 over ``--pair-runs``; target p50 <= 2000 ms).

The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import secrets
import ssl
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.media.srtp import KeyPair, SrtpContext, SrtpError, SrtpKeys, SrtpProfile
from agent.pairing.client import new_key_and_csr
from agent.pairing.token import PairingToken
from agent.service.identity import load_identity
from agent.signaling.envelope import Envelope, EnvelopeError, from_json, new_id, with_sig
from agent.signaling.mqtt import ConnectFailed, MqttConfig, MqttTls, PublishFailed
from agent.signaling.signing import SignatureError, Verifier
from agent.signaling.topics import (
    ROOT,
    Kind,
    all_devices,
    device_topic,
    device_tree,
)
from cloud_relay.pki import RelayPki, Role
from cloud_relay.store import Store
from cloud_relay.sync import RELAY_SYNC_TOPIC
from cloud_relay.turn import TurnSettings, call_credentials
from cloud_relay.web import PAIR_PATH
from tools.bench.args import machine, positive_int
from tools.bench.setup import percentiles
from tools.lab.attacks import (
    device_files,
    drop_reasons,
    invite,
    now_ms,
    post_pair,
    publish_out,
    repin,
    self_signed_files,
    session,
    tamper_sdp,
    turn_client,
    turn_refusal,
    until_marker,
    wire,
)
from tools.lab.fleet import AGENT_CMD, PAIR_DEVICE, RELAY_CMD, REPO, WAIT, Fleet, FleetError, fleet
from tools.lab.procs import alive
from tools.lab.turn import Coturn

logger = logging.getLogger(__name__)

A, B, C, D = "door-a", "door-b", "door-c", "door-d"
"""door-a attacks door-b (neither runs an agent: the attacker holds door-a's key);
door-c is revoked while its agent runs, door-d is the agent that must stay on."""
PAIR_TARGET_P50_MS = 2000.0
REVOKE_TARGET_MS = 5000.0
MAX_PAIRING_FAILURES = 16
"""The relay locks pairing after 20 failed attempts a minute: the classes before the
guesses stay below that, so their controls (fresh tokens pairing) still mean something."""


@dataclass(slots=True)
class Tally:
    """One attack class: attempts, how many did not get through, and the same-run control."""

    attempts: int = 0
    rejected: int = 0
    control_ok: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def count(self, refused: bool) -> None:
        self.attempts += 1
        self.rejected += int(refused)

    def to_json(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "rejected": self.rejected,
            "control_ok": self.control_ok,
            **self.extra,
        }


class Bench:
    """The fleet under attack and what the attacks found; one per run."""

    def __init__(self, f: Fleet, args: argparse.Namespace) -> None:
        self.f = f
        self.args = args
        self.rng = random.Random(args.seed)
        self.tallies: dict[str, Tally] = {}
        self.stopped: set[str] = set()
        """Agents this bench stopped on purpose."""
        self.crashed: list[str] = []
        self.pair_ms: list[float] = []
        self.revoke_cutoff_ms: float | None = None
        self.errors: list[str] = []
        self.scratch = f.root / "attacker"
        self.scratch.mkdir(exist_ok=True)
        self.csr = new_key_and_csr()[1].decode()

    def tally(self, name: str) -> Tally:
        return self.tallies.setdefault(name, Tally())

    @property
    def relay_log(self) -> Path:
        return self.f.root / "relay.log"

    @property
    def ca(self) -> Path:
        return self.f.pki_dir / "ca.pem"

    @property
    def pair_url(self) -> str:
        return f"https://127.0.0.1:{self.f.pairing_port}{PAIR_PATH}"

    def device_config(self, device: str, **changes: Any) -> MqttConfig:
        """A session on the device listener with ``device``'s certificate (the attacker
        holds door-a's key: a stolen or rogue board)."""
        identity = load_identity(self.f.state_dir(device))
        assert identity is not None, f"{device} is not paired"
        base = MqttConfig(
            client_id=device, host="127.0.0.1", port=self.f.port, tls=identity.mqtt_tls(),
            keepalive=5, session_expiry=0, backoff_min=0.05, backoff_max=0.3,
            connect_timeout=5.0, publish_timeout=5.0, misc_interval=0.2, max_incoming=20_000,
        )  # fmt: skip
        return dataclasses.replace(base, **changes)

    def watcher_config(self, name: str) -> MqttConfig:
        return self.f.mqtt_config(
            f"relay-bench-{name}-{secrets.token_hex(3)}", session_expiry=0, max_incoming=50_000
        )

    def relay_log_lines(self, needle: str) -> int:
        text = self.relay_log.read_text(errors="replace") if self.relay_log.exists() else ""
        return text.count(needle)

    async def mint(self, device: str | None = None, *, ago_s: float = 0.0) -> tuple[str, str]:
        return await self.f.mint(device, ago_s=ago_s)

    async def post_secret(self, token: str, csr: str | None = None) -> tuple[int, dict[str, Any]]:
        body = {"secret": PairingToken.parse(token).secret, "csr": csr or self.csr}
        return await post_pair(self.pair_url, json.dumps(body).encode())


# --- phases -----------------------------------------------------------------------------------


async def run_cli(argv: Sequence[str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(WAIT):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise FleetError(f"{argv[:4]}: no exit within {WAIT:g} s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def relay_cli(f: Fleet, *args: str) -> list[str]:
    """``edge-intercom-relay ARGS`` on the fleet's config and data, as the operator runs it."""
    return [
        *RELAY_CMD, *args, "--config", str(f.root / "relay.toml"), "--data-dir", str(f.data_dir),
    ]  # fmt: skip


async def until_online(f: Fleet, store: Store, device: str) -> None:
    """Poll the relay's store (every 10 ms) until it says ``device`` is online."""

    def online(store: Store) -> bool:
        return any(d.id == device and d.presence == "online" for d in store.devices())

    try:
        async with asyncio.timeout(WAIT):
            while True:
                if await store.run(online, store):
                    return
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise f.fail(f"{device} not online within {WAIT:g} s of pairing") from None


def unpaired_agent_config(f: Fleet, device: str) -> Path:
    """An agent config with nothing but a state directory and MQTT timers: the board as
    installed, before pairing tells it who it is and where the broker is."""
    config = f.root / f"{device}.toml"
    config.write_text(
        f'state_dir = "{f.state_dir(device)}"\n'
        "[mqtt]\nkeepalive = 5\nbackoff_min = 0.05\nbackoff_max = 0.5\n"
        "connect_timeout = 5.0\npublish_timeout = 5.0\nmisc_interval = 0.2\n"
    )
    return config


async def measure_pairing(bench: Bench) -> None:
    """``pair_ms`` runs; each is also the control that a fresh token pairs a waiting agent."""
    f = bench.f
    store = await Store.open(f"sqlite:///{f.db_path}")
    try:
        for n in range(bench.args.pair_runs):
            device = f"pair-{n}"
            config = unpaired_agent_config(f, device)
            argv = [*AGENT_CMD, "--config", str(config), "run", "--source", "tone:700",
                    "--sink", "null"]  # fmt: skip
            f.procs[device] = await f.spawn(device, argv)
            pid_file = f.state_dir(device) / "agent.pid"
            async with asyncio.timeout(WAIT):  # waiting for pairing
                while True:
                    if "not paired" in f.log(device) and pid_file.exists():
                        break
                    await asyncio.sleep(0.02)
            token = await f.token(device)
            t0 = time.perf_counter()
            argv = [PAIR_DEVICE, token, "--state-dir", str(f.state_dir(device))]
            pairing = await f.spawn(f"pair-{device}", argv)
            await until_online(f, store, device)
            bench.pair_ms.append((time.perf_counter() - t0) * 1000)
            async with asyncio.timeout(WAIT):
                code = await pairing.wait()
            if code != 0:
                raise f.fail(f"pair-device {device} exited {code}")
            await stop_agent(bench, device)
    finally:
        await store.close()


async def stop_agent(bench: Bench, device: str) -> None:
    bench.stopped.add(device)
    try:
        await bench.f.stop_agent(device)
    except FleetError:
        bench.crashed.append(f"agent {device} (exit on SIGTERM)")


async def unpaired_connect(bench: Bench) -> None:
    f, root = bench.f, bench.scratch
    other = await asyncio.to_thread(RelayPki.open, root / "other-ca")
    other_a = dataclasses.replace(device_files(other, root, A), ca_file=bench.ca)
    other_d = dataclasses.replace(device_files(other, root, D), ca_file=bench.ca)
    assert f.relay_port is not None
    intruders: list[tuple[str, MqttTls | None, int]] = [
        ("plain-tcp", None, f.port),
        ("no-client-cert", MqttTls(ca_file=bench.ca), f.port),
        ("self-signed", self_signed_files(root, A, bench.ca), f.port),
        ("other-ca", other_a, f.port),
        ("other-ca-on-relay-listener", other_d, f.relay_port),
        ("self-signed-relay-on-relay-listener", self_signed_files(root, "relay", bench.ca),
         f.relay_port),
        ("no-client-cert-on-relay-listener", MqttTls(ca_file=bench.ca), f.relay_port),
    ]  # fmt: skip
    tally = bench.tally("unpaired_connect")
    let_in: list[str] = []
    for _ in range(bench.args.connect_rounds):
        for name, tls, port in intruders:
            config = MqttConfig(
                client_id=f"intruder-{secrets.token_hex(3)}", host="127.0.0.1", port=port,
                tls=tls, session_expiry=0, connect_timeout=1.0, backoff_min=0.05,
                backoff_max=0.2,
            )  # fmt: skip
            try:
                async with session(config):
                    let_in.append(name)
                    tally.count(False)
            except ConnectFailed:
                tally.count(True)
    async with session(bench.device_config(A)) as client:
        tally.control_ok = client.connected
    tally.extra["let_in"] = sorted(set(let_in))


@dataclass(frozen=True, slots=True)
class TopicAttempt:
    """door-a publishing on ``topic``, or subscribing to ``topic`` (a filter) after which the
    relay publishes a probe on ``probe`` (a topic the filter matches)."""

    n: int
    subscribe: bool
    topic: str
    probe: str = ""
    qos: int = 1
    retain: bool = False

    @property
    def payload(self) -> bytes:
        return f"attack-{self.n}".encode()


KINDS = tuple(Kind)
ONE_LEVEL_KINDS = tuple(k for k in Kind if "/" not in k.value)


def cross_device_attempt(rng: random.Random, n: int, victim: str) -> TopicAttempt:
    """One randomised attempt by door-a on ``victim``'s topics."""
    if rng.random() < 0.5:
        topic = device_topic(victim, rng.choice(KINDS))
        return TopicAttempt(n, False, topic, qos=rng.choice((0, 1)), retain=rng.random() < 0.25)
    kind = rng.choice(ONE_LEVEL_KINDS)
    probe = device_topic(victim, kind)
    filters = (
        probe,
        device_tree(victim),
        all_devices(kind),
        f"{ROOT}/dev/+/+",
        f"{ROOT}/dev/#",
        f"{ROOT}/#",
        "#",
        f"+/+/dev/{victim}/{kind.value}",
        f"+/+/+/+/{kind.value}",
        f"$share/g{n}/{probe}",
        f"$share/relay/{all_devices(kind)}",
    )
    return TopicAttempt(n, True, rng.choice(filters), probe, qos=rng.choice((0, 1)))


async def topic_batches(
    bench: Bench, tally: Tally, attempts: list[TopicAttempt], batch: int
) -> None:
    """Run ``attempts`` by door-a in batches, one door-a session each, judged at the relay's
    watcher (publishes) and at door-a itself (probes after its subscribes)."""
    got_through: list[str] = []
    control = True
    async with session(bench.watcher_config("watch"), f"{ROOT}/#") as watcher:
        for start in range(0, len(attempts), batch):
            plan = attempts[start : start + batch]
            subs = [p for p in plan if p.subscribe]
            own_in = device_topic(A, Kind.IN)
            async with session(bench.device_config(A), own_in, *(p.topic for p in subs)) as a:
                for p in plan:
                    if not p.subscribe:
                        with contextlib.suppress(PublishFailed):  # refused: still judged below
                            await a.publish(p.topic, p.payload, qos=p.qos, retain=p.retain)
                marker = f"marker-{start}".encode()
                await a.publish(device_topic(A, Kind.TELEMETRY), marker, qos=1)
                seen = await until_marker(watcher, marker)
                leaked = {m.payload for m in seen}
                for p in subs:
                    await watcher.publish(p.probe, p.payload, qos=1)
                await watcher.publish(own_in, marker, qos=1)
                heard = {m.payload for m in await until_marker(a, marker)}
                probes_seen = {m.payload for m in await until_marker(watcher, marker)}
                control &= all(p.payload in probes_seen for p in subs)
            for p in plan:
                through = p.payload in (heard if p.subscribe else leaked)
                tally.count(not through)
                if through:
                    got_through.append(f"{'sub' if p.subscribe else 'pub'} {p.topic}")
    tally.control_ok = control
    tally.extra["subscribes"] = sum(p.subscribe for p in attempts)
    tally.extra["got_through"] = got_through[:20]


async def cross_device_topics(bench: Bench) -> None:
    tally = bench.tally("cross_device_topics")
    attempts = [cross_device_attempt(bench.rng, n, B) for n in range(bench.args.topic_attempts)]
    await topic_batches(bench, tally, attempts, bench.args.batch)
    # Control: what door-a was refused, door-b gets on its own topics.
    b_in = device_topic(B, Kind.IN)
    async with (
        session(bench.watcher_config("to-b")) as relay,
        session(bench.device_config(B), b_in) as b,
    ):
        await relay.publish(b_in, b"for-b", qos=1)
        tally.control_ok &= [m.payload for m in await until_marker(b, b"for-b")] == [b"for-b"]


async def relay_topics(bench: Bench) -> None:
    tally = bench.tally("relay_topics")
    own = [device_topic(A, k) for k in (Kind.IN, Kind.CMD, Kind.CONFIG, Kind.ALERT_ACK)]
    plan: list[TopicAttempt] = []
    for topic in (RELAY_SYNC_TOPIC, *own, f"{ROOT}/relay/anything"):
        for qos in (0, 1):
            plan.append(TopicAttempt(len(plan), False, topic, qos=qos))
    for topic in (RELAY_SYNC_TOPIC, f"{ROOT}/relay/#", f"$share/relay/{RELAY_SYNC_TOPIC}"):
        plan.append(TopicAttempt(len(plan), True, topic, RELAY_SYNC_TOPIC))
    plan = [dataclasses.replace(p, n=10_000 + p.n) for p in plan]
    await topic_batches(bench, tally, plan, len(plan))


async def signaling(bench: Bench) -> None:
    """Envelopes door-a publishes on its ``out`` that the relay must drop."""
    f, k = bench.f, bench.args.signaling_attempts
    a, b = f.signing(A), f.signing(B)
    verifier = Verifier(bench.ca.read_bytes())
    b_in = device_topic(B, Kind.IN)
    async with session(bench.watcher_config("inbox"), b_in) as inbox:
        for device in (A, B):  # online as far as the relay knows: invites are routed
            presence = device_topic(device, Kind.PRESENCE)
            await inbox.publish(presence, b'{"state":"online"}', qos=1, retain=True)
        await f.until_online(A, B)
        async with session(bench.device_config(A)) as dev_a:
            breaches: list[str] = []
            """Calls of what reached door-b's ``in`` before the honest invite."""

            async def honest() -> bool:
                """An honest invite gets through, verifiable by door-b: the control."""
                call = new_id()
                await publish_out(dev_a, A, wire(a.sign(invite(call, sender=A, to=B))))
                try:
                    async with asyncio.timeout(WAIT):
                        while True:
                            env = from_json((await inbox.recv()).payload)
                            if env.call == call:
                                verifier.check(env)
                                return True
                            breaches.append(env.call)
                except (TimeoutError, EnvelopeError, SignatureError):
                    return False

            async def attack(name: str, payloads: list[tuple[str, bytes]]) -> None:
                """Publish (call, payload) pairs, then an honest invite; a payload is rejected
                if it did not reach door-b before that and the relay logged it dropped."""
                tally = bench.tally(name)
                for _, payload in payloads:
                    await publish_out(dev_a, A, payload)
                breaches.clear()
                tally.control_ok = await honest()
                reasons: Counter[str] = Counter()
                for call, sent in Counter(call for call, _ in payloads).items():
                    try:
                        logged = await _dropped(bench.relay_log, call, sent)
                    except TimeoutError:
                        logged = drop_reasons(bench.relay_log).get(call, [])
                    reasons.update(logged)
                    stopped = max(0, min(sent - breaches.count(call), len(logged)))
                    for i in range(sent):
                        tally.count(i < stopped)
                tally.extra["reasons"] = dict(reasons)

            def signed(call: str, **kw: Any) -> Envelope:
                return a.sign(invite(call, sender=kw.pop("sender", A), to=B, **kw))

            forged = []
            for i in range(k):
                call = new_id()
                if i % 4 == 3:  # door-b's own signature, on door-a's out
                    forged.append((call, wire(b.sign(invite(call, sender=B, to=C)))))
                else:
                    sender = (C, "relay", f"nobody-{i}")[i % 4]
                    forged.append((call, wire(signed(call, sender=sender))))
            await attack("forged_from", forged)

            tampered = []
            for i in range(k):
                call = new_id()
                tampered.append((call, tamper_sdp(wire(signed(call)), i)))
            await attack("tampered_sdp", tampered)

            bad = []
            for i in range(k):
                call = new_id()
                env = invite(call, sender=A, to=B)
                sig = (
                    bytes(64),
                    secrets.token_bytes(64),
                    secrets.token_bytes(32),
                )
                if i % 5 < 3:
                    bad.append((call, wire(with_sig(env, sig[i % 5]))))
                elif i % 5 == 3:  # door-b's valid signature over door-a's envelope
                    bad.append((call, wire(dataclasses.replace(env, sig=b.sign(env).sig))))
                else:  # door-a's signature of another message
                    other = signed(new_id())
                    bad.append((call, wire(dataclasses.replace(env, sig=other.sig))))
            await attack("bad_signature", bad)

            unsigned = []
            for _ in range(k):
                call = new_id()
                unsigned.append((call, wire(invite(call, sender=A, to=B))))
            await attack("unsigned", unsigned)

            stale = []
            for i in range(k):
                call = new_id()
                ts = now_ms() + 120_000 + i if i % 3 == 2 else now_ms() - 61_000 - i * 60_000
                stale.append((call, wire(signed(call, ts=ts))))
            await attack("stale", stale)

            original = new_id()
            captured = wire(signed(original))
            await publish_out(dev_a, A, captured)
            breaches.clear()
            first_ok = await honest()
            routed = breaches.count(original) == 1
            await attack("replayed", [(original, captured)] * k)
            replayed = bench.tally("replayed")
            replayed.control_ok &= first_ok and routed
    # The relay's counters agree (checked once it stops: ``relay stopped: ...``).


async def _dropped(relay_log: Path, call: str, count: int) -> list[str]:
    async with asyncio.timeout(5.0):
        while True:
            reasons = drop_reasons(relay_log).get(call, [])
            if len(reasons) >= count:
                return reasons
            await asyncio.sleep(0.05)


async def pairing_attacks(bench: Bench) -> None:
    """Everything but the guesses, which lock pairing: those come last."""
    f, k = bench.f, bench.args.pairing_attempts
    refused = "pairing from 127.0.0.1 refused"

    # token_reuse: the token paired once (control); each further use is refused.
    tally = bench.tally("token_reuse")
    token, _ = await bench.mint()
    status, _reply = await bench.post_secret(token)
    tally.control_ok = status == 200
    before = bench.relay_log_lines(refused)
    statuses = Counter[int]()
    for _ in range(k):
        status, _reply = await bench.post_secret(token, new_key_and_csr()[1].decode())
        statuses[status] += 1
        tally.count(status in (403, 429))
    logged = bench.relay_log_lines(refused) - before
    tally.rejected = min(tally.rejected, logged)
    tally.extra.update(statuses={str(s): n for s, n in statuses.items()}, logged=logged)

    # token_expired: minted an hour ago with a minute to live.
    tally = bench.tally("token_expired")
    before = bench.relay_log_lines(refused)
    statuses = Counter[int]()
    for _ in range(k):
        old, _ = await bench.mint(ago_s=3600)
        status, _reply = await bench.post_secret(old)
        statuses[status] += 1
        tally.count(status in (403, 429))
    logged = bench.relay_log_lines(refused) - before
    tally.rejected = min(tally.rejected, logged)
    tally.extra.update(statuses={str(s): n for s, n in statuses.items()}, logged=logged)
    fresh, _ = await bench.mint()
    tally.control_ok = (await bench.post_secret(fresh))[0] == 200

    # pairing_oversize: bodies over the limit never reach the handler's parser.
    tally = bench.tally("pairing_oversize")
    token, _ = await bench.mint()
    secret = PairingToken.parse(token).secret
    for size in (40_000, 1_000_000):
        body = json.dumps({"secret": secret, "csr": bench.csr + " " * size}).encode()
        status, _reply = await post_pair(bench.pair_url, body)
        tally.count(status in (400, 413))
    tally.control_ok = (await bench.post_secret(token))[0] == 200  # the token is still good

    # csr_claims_relay: the CSR's subject is ignored; the certificate names the token's device.
    tally = bench.tally("csr_claims_relay")
    for name in ("relay", "relay-1"):
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
            .decode()
        )
        token, device = await bench.mint()
        status, reply = await bench.post_secret(token, csr)
        cn = ""
        if status == 200:
            cert = x509.load_pem_x509_certificate(str(reply["certificate"]).encode())
            cn = str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
        tally.count(status != 200 or cn == device)
        tally.control_ok = status == 200 and cn == device

    # relay_device_id: the operator's command refuses to mint a token for a relay name.
    tally = bench.tally("relay_device_id")
    for name in ("relay", "relay-1", "relay-cmd-0"):
        code, out = await run_cli(relay_cli(f, "pair", "new", "--id", name, "--json"))
        tally.count(code != 0 and "eipair" not in out)
    code, out = await run_cli(relay_cli(f, "pair", "new", "--id", "door-x", "--json"))
    tally.control_ok = code == 0 and "eipair" in out

    await wrong_fingerprint(bench)


async def wrong_fingerprint(bench: Bench) -> None:
    """``pair-device`` with a token pinned to another certificate, or with the right pin
    and an impostor at the token's URL: it must refuse before sending anything."""
    f = bench.f
    tally = bench.tally("wrong_fingerprint")
    other = await asyncio.to_thread(RelayPki.open, bench.scratch / "mitm")
    impostor_cert = other.server_certificate(Role.HTTPS, ["127.0.0.1"])
    received = bytearray()

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            received.extend(await reader.read(65536))
        writer.close()

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(impostor_cert.cert, impostor_cert.key)
    server = await asyncio.start_server(impostor, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        for i in range(bench.args.pairing_attempts):
            device = f"pin-{i}"
            token, _ = await bench.mint(device)
            genuine = PairingToken.parse(token).fingerprint
            flipped = ("00" if genuine[:2] != "00" else "11") + genuine[2:]
            variant = i % 3
            if variant == 0:
                mitm = repin(token, fingerprint=impostor_cert.fingerprint)
            elif variant == 1:
                mitm = repin(token, fingerprint=flipped)
            else:
                mitm = repin(token, url=f"https://127.0.0.1:{port}")
            seen_before = bench.relay_log_lines("pairing from 127.0.0.1")
            code, out = await run_cli([PAIR_DEVICE, mitm, "--state-dir", str(f.state_dir(device))])
            nothing_sent = (
                bench.relay_log_lines("pairing from 127.0.0.1") == seen_before and not received
            )
            tally.count(
                code != 0
                and "WRONG FINGERPRINT" in out
                and nothing_sent
                and load_identity(f.state_dir(device)) is None
            )
            if i == 0:  # the genuine token was not spent: it still pairs
                code, _ = await run_cli(
                    [PAIR_DEVICE, token, "--state-dir", str(f.state_dir(device))]
                )
                tally.control_ok = code == 0 and load_identity(f.state_dir(device)) is not None
    finally:
        server.close()
        await server.wait_closed()


async def token_guessed(bench: Bench) -> None:
    tally = bench.tally("token_guessed")
    token, _ = await bench.mint()
    tally.control_ok = (await bench.post_secret(token))[0] == 200
    refused = "pairing from 127.0.0.1 refused"
    before = bench.relay_log_lines(refused)
    statuses = Counter[int]()
    parsed = PairingToken.parse(token)
    for _ in range(bench.args.guesses):
        guess = PairingToken.new(parsed.url, parsed.fingerprint).secret
        body = json.dumps({"secret": guess, "csr": bench.csr}).encode()
        status, _reply = await post_pair(bench.pair_url, body)
        statuses[status] += 1
        tally.count(status in (403, 429))
    logged = bench.relay_log_lines(refused) - before
    tally.rejected = min(tally.rejected, logged)
    genuine, _ = await bench.mint()
    status, _reply = await bench.post_secret(genuine)
    tally.extra.update(
        statuses={str(s): n for s, n in sorted(statuses.items())},
        logged=logged,
        locked_after=status == 429,
    )


async def revoked_device(bench: Bench) -> None:
    f = bench.f
    tally = bench.tally("revoked_device")
    for device, tone in ((C, "700"), (D, "1100")):
        await f.agent(device, source=f"tone:{tone}", sink="null")
    await f.until_online(C, D)
    presence = {device_topic(d, Kind.PRESENCE): d for d in (C, D)}
    c_config = bench.device_config(C, connect_timeout=1.0)
    async with session(bench.watcher_config("revoke"), *presence) as watch:
        t0 = time.perf_counter()
        code, out = await run_cli(relay_cli(f, "device", "revoke", C))
        offline: set[str] = set()
        cutoff: float | None = None
        try:
            async with asyncio.timeout(WAIT):
                while cutoff is None:
                    msg = await watch.recv()
                    state = _state(msg.payload)
                    if state == "offline" and not msg.retained:
                        offline.add(presence[msg.topic])
                        if presence[msg.topic] == C:
                            cutoff = (time.perf_counter() - t0) * 1000
        except TimeoutError:
            pass
        bench.revoke_cutoff_ms = None if cutoff is None else round(cutoff, 1)
        tally.count(code == 0 and cutoff is not None and cutoff < REVOKE_TARGET_MS)
        tally.extra["revoke_output"] = out.strip().splitlines()[-1:] if out else []
        for _ in range(bench.args.pairing_attempts):  # its certificate does not get back in
            try:
                async with session(c_config):
                    tally.count(False)
            except ConnectFailed:
                tally.count(True)
        try:  # nor does its agent, which keeps trying
            async with asyncio.timeout(WAIT):
                while True:
                    if "CERTIFICATE_REVOKED" in f.log(C) or "certificate revoked" in f.log(C):
                        break
                    await asyncio.sleep(0.05)
            tally.count(True)
        except TimeoutError:
            tally.count(False)
        # Control: door-d stayed on all along and still answers.
        reply = await f.command(D, "status")
        with contextlib.suppress(TimeoutError):
            while True:
                async with asyncio.timeout(0.2):
                    msg = await watch.recv()
                if _state(msg.payload) == "offline":
                    offline.add(presence[msg.topic])
        tally.control_ok = bool(reply.get("ok", True)) and D not in offline


def _state(presence: bytes) -> object:
    try:
        return dict(json.loads(presence)).get("state")
    except (ValueError, TypeError):
        return None


async def turn_attacks(bench: Bench) -> None:
    k = bench.args.pairing_attempts
    with Coturn.running() as server:
        settings = TurnSettings(
            urls=(f"turn:{server.host}:{server.port}?transport=udp",), realm=server.realm
        )
        address = (server.host, server.port)

        async def allocates(creds: Any) -> int | None:
            async with turn_client(address, creds) as client:
                return await turn_refusal(client.allocate())

        expired = bench.tally("turn_expired")
        for i in range(k):
            past = time.time() - settings.lifetime_s - (1, 3600, 86_400)[i % 3]
            expired.count(
                await allocates(call_credentials(settings, server.secret, now=past)) == 401
            )
        expired.control_ok = await allocates(call_credentials(settings, server.secret)) is None

        forged = bench.tally("turn_forged")
        for i in range(k):
            creds = call_credentials(settings, server.secret)
            if i % 2 == 0:  # a later expiry on the same password
                creds = dataclasses.replace(creds, username=creds.username.replace(":", "0:", 1))
            else:  # minted with a guessed secret
                creds = call_credentials(settings, secrets.token_urlsafe(24))
            forged.count(await allocates(creds) == 401)
        forged.control_ok = await allocates(call_credentials(settings, server.secret)) is None


def srtp_attacks(bench: Bench) -> None:
    n = bench.args.srtp_packets
    replay, tamper = bench.tally("srtp_replay"), bench.tally("srtp_tamper")
    control = True
    for profile in SrtpProfile:
        keys = KeyPair(SrtpKeys.generate(profile), SrtpKeys.generate(profile))
        sender, receiver = SrtpContext(keys), SrtpContext(KeyPair(tx=keys.rx, rx=keys.tx))
        sealed = [sender.protect(_rtp(seq)) for seq in range(n)]
        for seq, packet in enumerate(sealed):
            control &= receiver.unprotect(packet) == _rtp(seq)
        for packet in bench.rng.sample(sealed, len(sealed)):
            try:
                receiver.unprotect(packet)
                replay.count(False)
            except SrtpError as exc:
                replay.count(exc.replay)
        for seq in range(n, 2 * n):
            altered = bytearray(sender.protect(_rtp(seq)))
            altered[bench.rng.randrange(12, len(altered))] ^= 1 << bench.rng.randrange(8)
            try:
                receiver.unprotect(bytes(altered))
                tamper.count(False)
            except SrtpError:
                tamper.count(True)
        fresh = sender.protect(_rtp(2 * n))
        control &= receiver.unprotect(fresh) == _rtp(2 * n)
    replay.control_ok = tamper.control_ok = control


def _rtp(seq: int) -> bytes:
    header = bytes([0x80, 111]) + seq.to_bytes(2, "big") + (seq * 960).to_bytes(4, "big")
    return header + (0x1234).to_bytes(4, "big") + bytes(range(80))


# --- the run ----------------------------------------------------------------------------------


async def guarded(bench: Bench, names: Sequence[str], phase: Callable[[], Awaitable[None]]) -> None:
    """Run a phase; if it fails, its classes say so (and fail their control) rather than
    stopping the others."""
    try:
        await phase()
    except Exception as exc:  # reported in the JSON; the run goes on
        logger.exception("phase %s failed", names)
        for name in names:
            tally = bench.tally(name)
            tally.control_ok = False
            tally.extra["error"] = f"{type(exc).__name__}: {exc}"[:300]
    for name in names:
        t = bench.tally(name)
        print(
            f"{name}: {t.rejected}/{t.attempts} rejected, control "
            f"{'ok' if t.control_ok else 'FAILED'}",
            flush=True,
        )


SIGNALING = ("forged_from", "tampered_sdp", "bad_signature", "unsigned", "stale", "replayed")
PAIRING = ("token_reuse", "token_expired", "pairing_oversize", "csr_claims_relay",
           "relay_device_id", "wrong_fingerprint")  # fmt: skip


async def attack_fleet(root: Path, args: argparse.Namespace) -> Bench:
    async with fleet(root, devices=(A, B, C, D), client_id="bench-security") as f:
        bench = Bench(f, args)
        broker = f.broker_pid()
        try:
            await measure_pairing(bench)
        except Exception as exc:  # reported in the JSON; the run goes on
            logger.exception("pair_ms failed")
            bench.errors.append(f"pair_ms: {type(exc).__name__}: {exc}"[:300])
        for device in (A, B):
            await f.pair(device)
        await guarded(bench, ("unpaired_connect",), lambda: unpaired_connect(bench))
        await guarded(bench, ("cross_device_topics",), lambda: cross_device_topics(bench))
        await guarded(bench, ("relay_topics",), lambda: relay_topics(bench))
        await guarded(bench, SIGNALING, lambda: signaling(bench))
        await guarded(bench, PAIRING, lambda: pairing_attacks(bench))
        await guarded(bench, ("revoked_device",), lambda: revoked_device(bench))
        await guarded(bench, ("token_guessed",), lambda: token_guessed(bench))
        # Crashes: anything that died on its own, or does not stop cleanly now.
        for name, proc in f.procs.items():
            if name not in bench.stopped and proc.returncode is not None:
                bench.crashed.append(f"agent {name} (exit {proc.returncode})")
        if f.broker_pid() != broker or not alive(f.broker_pid()):
            bench.crashed.append("broker")
        assert f.relay is not None
        if f.relay.returncode is not None:
            bench.crashed.append(f"relay (exit {f.relay.returncode})")
        else:
            for name, proc in f.procs.items():
                if proc.returncode is None:
                    await stop_agent(bench, name)
            try:
                await f.stop_relay()
            except FleetError:
                bench.crashed.append("relay (exit on SIGTERM)")
    return bench


def relay_drops(relay_log: Path) -> dict[str, int]:
    """``dropped[reason]=N`` of the relay's ``relay stopped:`` line."""
    text = relay_log.read_text(errors="replace") if relay_log.exists() else ""
    if "relay stopped: " not in text:
        return {}
    summary = text.rsplit("relay stopped: ", 1)[1].splitlines()[0]
    drops = {}
    for part in summary.split():
        if part.startswith("dropped[") and "]=" in part:
            reason, count = part[len("dropped[") :].split("]=", 1)
            drops[reason] = int(count)
    return drops


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        root = args.dir
        bench = await _run(root, args)
    else:
        with tempfile.TemporaryDirectory(prefix="edge-bench-security-") as tmp:
            root = Path(tmp)
            bench = await _run(root, args)
            drops = relay_drops(root / "relay.log")
    if args.dir is not None:
        drops = relay_drops(root / "relay.log")
    classes = {name: t.to_json() for name, t in sorted(bench.tallies.items())}
    attempts = sum(t.attempts for t in bench.tallies.values())
    rejected = sum(t.rejected for t in bench.tallies.values())
    pair = percentiles(bench.pair_ms) if bench.pair_ms else {"p50": None, "p95": None}
    print(
        f"security: {rejected}/{attempts} attacks rejected in {len(classes)} classes, "
        f"{len(bench.crashed)} crashes; pair p50 {pair['p50']} ms; "
        f"revoke cut-off {bench.revoke_cutoff_ms} ms",
        flush=True,
    )
    return {
        "benchmark": "security",
        "machine": machine(),
        "classes": classes,
        "attempts": attempts,
        "rejected": rejected,
        "all_rejected": rejected == attempts,
        "all_controls_ok": all(t.control_ok for t in bench.tallies.values()),
        "crashes": len(bench.crashed),
        "crashed": bench.crashed,
        "pair_ms": {**pair, "runs": len(bench.pair_ms)},
        "pair_target_p50_ms": PAIR_TARGET_P50_MS,
        "pair_meets_target": pair["p50"] is not None and pair["p50"] <= PAIR_TARGET_P50_MS,
        "revoke_cutoff_ms": bench.revoke_cutoff_ms,
        "revoke_target_ms": REVOKE_TARGET_MS,
        "relay_dropped": drops,
        "errors": bench.errors,
        "seconds": round(time.perf_counter() - started, 1),
    }


async def _run(root: Path, args: argparse.Namespace) -> Bench:
    handler = logging.FileHandler(root / "bench.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    top = logging.getLogger()
    top.addHandler(handler)
    top.setLevel(logging.INFO)
    try:
        bench = await attack_fleet(root, args)
        await guarded(bench, ("turn_expired", "turn_forged"), lambda: turn_attacks(bench))

        async def srtp() -> None:
            srtp_attacks(bench)

        await guarded(bench, ("srtp_replay", "srtp_tamper"), srtp)
        return bench
    finally:
        top.removeHandler(handler)
        handler.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--topic-attempts",
        type=positive_int,
        default=1000,
        help="randomised cross-device subscribe/publish attempts",
    )
    add("--batch", type=positive_int, default=50, help="topic attempts per door-a session")
    add("--guesses", type=positive_int, default=1000, help="guessed pairing tokens")
    add(
        "--signaling-attempts",
        type=positive_int,
        default=20,
        help="envelopes per signaling attack class",
    )
    add(
        "--pairing-attempts",
        type=_pairing_attempts,
        default=5,
        help=f"attempts per token, fingerprint, revocation and TURN class (at most "
        f"{MAX_PAIRING_FAILURES // 2}: pairing locks after 20 failures)",
    )
    add(
        "--connect-rounds",
        type=positive_int,
        default=1,
        help="rounds of the unpaired connection attempts",
    )
    add("--srtp-packets", type=positive_int, default=200, help="SRTP packets per profile")
    add("--pair-runs", type=positive_int, default=5, help="pair-device runs timed")
    add("--seed", type=int, default=5, help="seed of the randomised attempts")
    add(
        "--dir",
        type=Path,
        default=None,
        help="keep the fleet's configs and logs here (default: a temporary directory)",
    )
    return parser


def _pairing_attempts(text: str) -> int:
    value = positive_int(text)
    if value > MAX_PAIRING_FAILURES // 2:
        raise argparse.ArgumentTypeError(f"{value} > {MAX_PAIRING_FAILURES // 2}")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    print(json.dumps(asyncio.run(main_async(args))))


if __name__ == "__main__":
    main()
