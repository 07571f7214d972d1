"""The relay's JSON API over real HTTPS (``WebServer`` in-process, trusted through the relay's
CA as a client of the relay would), on SQLite and PostgreSQL.

Alerts reach the store the real way: published on a device's ``alert`` topic to a real
mosquitto and taken by the relay. Refusals, limits and bad parameters are real requests;
schemathesis fuzzes the whole OpenAPI document and no reply may be a 5xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import shutil
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from mqtt_env import fast_config, now_ms, until
from multidict import CIMultiDictProxy
from sqlalchemy import create_engine
from test_edge_clip_e2e import peak_hz

from agent.audio.format import FRAME_SAMPLES, SAMPLE_RATE
from agent.codec.opus import OpusConfig, OpusEncoder
from agent.edge.alerts import Alert, Severity, new_alert_id
from agent.edge.clip import ClipAudio, seal
from agent.net.ice import mint_turn_credentials
from agent.signaling import topics
from agent.signaling.mqtt import MqttClient
from agent.signaling.topics import Kind
from cloud_relay.api import OPENAPI, Api
from cloud_relay.clips import ClipKey, check_clip
from cloud_relay.config import BrokerSettings, MqttSettings, RelayConfig, StoreSettings
from cloud_relay.events import EventBus
from cloud_relay.fleet_api import FleetApi
from cloud_relay.pairing import AttemptLimiter, Enrollment, Pairing
from cloud_relay.pki import RelayPki, Role
from cloud_relay.schema import metadata
from cloud_relay.service import Relay
from cloud_relay.sessions import Sessions
from cloud_relay.store import Store, utc_from_ms
from cloud_relay.tokens import Authenticator, FailureLimiter, Refusal, mint_api_token, new_token
from cloud_relay.turn import TurnSettings, new_secret
from cloud_relay.web import PAIR_PATH, WebServer, tls_context
from cloud_relay.webcall import WebCalls
from tools.lab.broker import Mosquitto

WAIT = 15.0
TURN_URL = "turn:127.0.0.1:3478?transport=udp"
TONE_HZ = 1000.0


def tone_clip(seconds: float = 1.0, hz: float = TONE_HZ) -> ClipAudio:
    """``seconds`` of a sine at ``hz``, Opus-encoded as a board records a clip."""
    encoder = OpusEncoder(OpusConfig())
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()
    frame = FRAME_SAMPLES * 2
    packets = tuple(encoder.encode(pcm[i : i + frame]) for i in range(0, len(pcm), frame))
    return ClipAudio(len(packets) // 2, packets)


def ogg_peak_hz(data: bytes) -> float:
    """The strongest frequency of an Ogg Opus file, decoded by FFmpeg."""
    with av.open(io.BytesIO(data), mode="r") as container:
        frames = [fr.to_ndarray().ravel() for fr in container.decode(audio=0)]
    return peak_hz(np.concatenate(frames))


def make_alert(n: int, kind: str = "smoke_alarm", severity: Severity = Severity.CRITICAL) -> Alert:
    at = now_ms() - 60_000 + n
    return Alert(new_alert_id(), "alarm", kind, severity, at, at + 4000, 0.9, -12.0, at + 4100)


@dataclass
class Client:
    """An API client over HTTPS that trusts the relay's CA."""

    url: str
    http: aiohttp.ClientSession
    token: str | None = None

    async def call(
        self, method: str, path: str, token: str | None = None, **params: str
    ) -> tuple[int, Any, CIMultiDictProxy[str]]:
        """Status, the JSON reply (bytes if not JSON) and the headers."""
        bearer = token or self.token
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        async with self.http.request(
            method, self.url + path, params=params or None, headers=headers
        ) as response:
            body: Any = await response.read()
            if response.content_type == "application/json":
                body = await response.json()
            return response.status, body, response.headers

    async def ok(self, path: str, **params: str) -> Any:
        status, body, _ = await self.call("GET", path, **params)
        assert status == 200, body
        return body


@contextlib.asynccontextmanager
async def client(url: str, ca: Path, token: str | None = None) -> AsyncIterator[Client]:
    ctx = ssl.create_default_context(cafile=str(ca))
    timeout = aiohttp.ClientTimeout(total=WAIT)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx), timeout=timeout
    ) as http:
        yield Client(url, http, token)


@dataclass
class Server:
    store: Store
    api: Api
    key: ClipKey
    url: str
    ca: Path
    clock: list[float] = field(default_factory=lambda: [0.0])


@contextlib.asynccontextmanager
async def api_server(
    store: Store, root: Path, max_failures: int = 5, relay: Relay | None = None
) -> AsyncIterator[Server]:
    """The relay's HTTPS endpoint on ``store``: pairing and the API, a limiter on a clock
    the test moves; with ``relay`` (started) also sessions, the fleet's endpoints and web
    calls."""
    pki = await asyncio.to_thread(RelayPki.open, root / "pki")
    key = await asyncio.to_thread(ClipKey.load, root / "pki", create=True)
    https = await asyncio.to_thread(pki.server_certificate, Role.HTTPS, ["127.0.0.1"])
    pairing = Pairing(store, pki, Enrollment("mqtts://127.0.0.1:8883"), AttemptLimiter())
    clock = [0.0]
    auth = Authenticator(store, FailureLimiter(max_failures, 60.0), clock=lambda: clock[0])
    fleet = None
    if relay is not None:
        fleet = FleetApi(
            store, relay, EventBus(), pki, pairing_url="https://127.0.0.1:1",
            fingerprint=lambda: "00" * 32, on_revoked=lambda: None, heartbeat_s=0.5,
        )  # fmt: skip
    webcalls = WebCalls(relay) if relay is not None else None
    api = Api(store, auth, key, sessions=Sessions(store), fleet=fleet, webcalls=webcalls)
    web = WebServer(pairing, "127.0.0.1", 0, tls_context(https.cert, https.key), api)
    await web.start()
    try:
        yield Server(store, api, key, f"https://127.0.0.1:{web.port}", pki.ca_path, clock)
    finally:
        await web.close()


@contextlib.asynccontextmanager
async def relay_with_api(
    store_url: str, broker: Mosquitto, root: Path
) -> AsyncIterator[tuple[Server, Relay]]:
    """A relay on the lab broker that takes alerts (with clips) into the store, and its
    HTTPS endpoint."""
    config = RelayConfig(
        data_dir=str(root),
        store=StoreSettings(url=store_url),
        broker=BrokerSettings(url=f"mqtt://{broker.host}:{broker.port}"),
        mqtt=MqttSettings(client_id="relay-api-test", connect_timeout=3.0, publish_timeout=5.0),
    )
    store = await Store.open(store_url)
    try:
        async with api_server(store, root) as server:
            relay = Relay(config, store, clip_key=server.key)
            await relay.start()
            try:
                yield server, relay
            finally:
                await relay.close()
    finally:
        await store.close()


async def publish_alerts(broker: Mosquitto, sent: list[tuple[str, Alert]]) -> None:
    """Publish each (device, alert) on the device's ``alert`` topic, one at a time in
    order, so that the relay receives them in that order."""
    board = MqttClient(fast_config("lab-boards", broker.port, broker.host))
    await board.start()
    try:
        for device, alert in sent:
            await board.publish(topics.device_topic(device, Kind.ALERT), alert.to_json())
            await asyncio.sleep(0.002)  # distinct receive times, in order
    finally:
        await board.close()


async def test_alerts_listed_filtered_paged_fetched_and_acked(
    store_url: str, broker: Mosquitto, tmp_path: Path
) -> None:
    async with relay_with_api(store_url, broker, tmp_path / "relay") as (server, relay):
        token, record = await mint_api_token(server.store, "ops-console")
        kinds = [
            ("smoke_alarm", Severity.CRITICAL),
            ("glass_break", Severity.WARNING),
            ("voice", Severity.INFO),
        ]
        sent = [(f"door-{n % 2 + 1}", make_alert(n, *kinds[n % 3])) for n in range(12)]
        clipped = dataclasses.replace(
            sent[4][1], clip=seal(tone_clip(), server.key.public, sent[4][1].id).to_text()
        )
        sent[4] = (sent[4][0], clipped)
        await publish_alerts(broker, sent)
        await until(lambda: relay.stats.alerts_stored == 12, "12 alerts stored", wait=WAIT)
        assert relay.stats.alerts_with_clip == 1

        async with client(server.url, server.ca, token) as api:
            # Every alert, newest first, in pages of 5 chained by the cursor.
            pages: list[list[dict[str, Any]]] = []
            params: dict[str, str] = {"limit": "5"}
            while True:
                reply = await api.ok("/api/v1/alerts", **params)
                pages.append(reply["alerts"])
                if reply["next"] is None:
                    break
                params["before"] = reply["next"]
            assert [len(p) for p in pages] == [5, 5, 2]
            listed = [a for page in pages for a in page]
            newest_first = [a.id for _, a in reversed(sent)]
            assert [a["id"] for a in listed] == newest_first
            assert listed == (await api.ok("/api/v1/alerts"))["alerts"]
            first = listed[-1]
            assert (first["device"], first["kind"], first["severity"]) == (
                "door-1", "smoke_alarm", "critical"
            )  # fmt: skip
            assert first["start"] == utc_from_ms(sent[0][1].start).isoformat()
            assert (first["clip"], first["acked"], first["acked_by"]) == (None, None, None)

            # Filters, alone and together, still paged.
            door2 = await api.ok("/api/v1/alerts", device="door-2")
            assert [a["id"] for a in door2["alerts"]] == [
                a.id for d, a in reversed(sent) if d == "door-2"
            ]
            both = await api.ok("/api/v1/alerts", kind="glass_break", severity="warning", limit="2")
            want = [a.id for _, a in reversed(sent) if a.kind == "glass_break"]
            assert [a["id"] for a in both["alerts"]] == want[:2] and both["next"]
            rest = await api.ok(
                "/api/v1/alerts", kind="glass_break", severity="warning", before=both["next"]
            )
            assert [a["id"] for a in rest["alerts"]] == want[2:] and rest["next"] is None
            window = await api.ok(
                "/api/v1/alerts", since=listed[8]["received"], until=listed[2]["received"]
            )
            assert [a["id"] for a in window["alerts"]] == [a["id"] for a in listed[3:9]]
            none = await api.ok("/api/v1/alerts", device="door-9")
            assert none == {"alerts": [], "next": None}

            # One alert; its clip decrypted on request and played by FFmpeg.
            one = await api.ok(f"/api/v1/alerts/{clipped.id}")
            assert one == next(a for a in listed if a["id"] == clipped.id)
            assert one["clip"] == {"bytes": one["clip"]["bytes"], "seconds": 1.0, "before_s": 0.5}
            status, ogg, headers = await api.call("GET", f"/api/v1/alerts/{clipped.id}/clip")
            assert (status, headers["Content-Type"]) == (200, "audio/ogg")
            assert headers["Cache-Control"] == "no-store"
            assert abs(ogg_peak_hz(ogg) - TONE_HZ) < 0.02 * TONE_HZ
            status, body, _ = await api.call("GET", f"/api/v1/alerts/{sent[0][1].id}/clip")
            assert (status, body["error"]) == (404, "not-found")
            unknown = new_alert_id()
            for path in (f"/api/v1/alerts/{unknown}", f"/api/v1/alerts/{unknown}/clip"):
                assert (await api.call("GET", path))[0] == 404

            # Acknowledged once, by the token's name; again changes nothing.
            status, acked, _ = await api.call("POST", f"/api/v1/alerts/{clipped.id}/ack")
            assert status == 200 and acked["acked_by"] == record.name
            assert datetime.fromisoformat(acked["acked"]) <= datetime.now(UTC)
            other, _ = await mint_api_token(server.store, "night-shift")
            status, again, _ = await api.call("POST", f"/api/v1/alerts/{clipped.id}/ack", other)
            assert status == 200 and again == acked
            assert await api.ok(f"/api/v1/alerts/{clipped.id}") == acked
            assert (await api.call("POST", f"/api/v1/alerts/{unknown}/ack"))[0] == 404
        tokens = await server.store.run(server.store.api_tokens)
        assert [t.last_used is not None for t in tokens] == [True, True]


async def test_refusals_say_nothing_are_counted_logged_and_rate_limited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cloud_relay.tokens")
    store = await Store.open(f"sqlite:///{tmp_path / 'relay.db'}")
    try:
        async with api_server(store, tmp_path, max_failures=5) as server:
            good, _ = await mint_api_token(store, "dashboard")
            revoked, rec = await mint_api_token(store, "old laptop")
            await store.run(store.revoke_api_token, rec.id, datetime.now(UTC))
            past = datetime.now(UTC) - timedelta(days=2)
            expired, _ = await mint_api_token(store, "trial", ttl_s=86_400, now=past)
            async with client(server.url, server.ca) as api:
                assert (await api.call("GET", "/api/v1/alerts", good))[0] == 200
                tries = {
                    Refusal.MISSING: None,
                    Refusal.MALFORMED: "not-a-token",
                    Refusal.UNKNOWN: new_token(),
                    Refusal.REVOKED: revoked,
                    Refusal.EXPIRED: expired,
                }
                replies = []
                for bearer in tries.values():
                    status, body, headers = await api.call("GET", "/api/v1/alerts", bearer)
                    assert status == 401
                    assert headers["WWW-Authenticate"].startswith("Bearer")
                    replies.append(body)
                # The same reply whatever was wrong.
                assert all(r == replies[0] for r in replies)
                assert server.api.refusals == dict.fromkeys(tries, 1)
                # The document is behind the token too; pairing is not (its own secrets).
                assert (await api.call("GET", "/api/v1/openapi.json"))[0] == 401
                assert (await api.call("POST", PAIR_PATH))[0] == 400
                # Four bad tokens so far (a missing one guesses nothing): one more, then
                # this source is refused, even with a good token, until the window passes.
                assert (await api.call("GET", "/api/v1/alerts", new_token()))[0] == 401
                status, body, headers = await api.call("GET", "/api/v1/alerts", good)
                assert (status, body["error"]) == (429, "rate-limited")
                assert int(headers["Retry-After"]) == 60
                server.clock[0] += 61
                assert (await api.call("GET", "/api/v1/alerts", good))[0] == 200
        assert server.api.refusals[Refusal.RATE_LIMITED] == 1
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert (
            logged.count("API request from 127.0.0.1 refused")
            == sum(server.api.refusals.values())
            == 8
        )
        for secret in (good, revoked, expired):
            assert secret not in logged
    finally:
        await store.close()


BAD_QUERIES: list[tuple[dict[str, str], str]] = [
    ({"limit": "0"}, "limit"),
    ({"limit": "501"}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"limit": "-1"}, "limit"),
    ({"severity": "fatal"}, "severity"),
    ({"device": "Door 1"}, "device"),
    ({"kind": "Smoke!"}, "kind"),
    ({"since": "yesterday"}, "since"),
    ({"until": "2026-13-01T00:00:00Z"}, "until"),
    ({"since": "0001-01-01T00:00:00+05:00"}, "since"),
    ({"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "until"),
    ({"before": "not a cursor"}, "before"),
    ({"before": "OTk5OTk5OTk5OTk5OTk5OTk5OTpub3QtYW4taWQ"}, "before"),
    ({"colour": "red"}, "unknown"),
]


async def test_bad_parameters_are_400_with_a_message_never_500(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite:///{tmp_path / 'relay.db'}")
    try:
        async with api_server(store, tmp_path) as server:
            token, _ = await mint_api_token(store, "tests")
            async with client(server.url, server.ca, token) as api:
                for query, label in BAD_QUERIES:
                    status, body, _ = await api.call("GET", "/api/v1/alerts", **query)
                    assert status == 400, (query, body)
                    assert body["error"] == "bad-request" and label in body["message"], body
                status, body, _ = await api.call("GET", "/api/v1/alerts?limit=1&limit=2")
                assert (status, body["message"]) == (400, "limit given more than once")
                for path in ("/api/v1/alerts/XYZ", "/api/v1/alerts/XYZ/clip"):
                    assert (await api.call("GET", path))[0] == 400
                assert (await api.call("POST", "/api/v1/alerts/x/ack"))[0] == 400
        assert sum(server.api.bad_requests.values()) == len(BAD_QUERIES) + 4
    finally:
        await store.close()


async def test_schemathesis_finds_no_server_error(tmp_path: Path, broker: Mosquitto) -> None:
    """Schemathesis (a tool nobody here wrote) generates requests from the OpenAPI document,
    valid and not, against the running endpoint (a relay on the lab broker behind it) with
    a few stored alerts, a device and a call; links are followed (a minted pairing token
    is cancelled). No device is online: a command or a web call is a 409, never a wait.
    The relay has a TURN server: the page's ICE servers come with minted credentials."""
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is missing: pip install -e '.[test]' (tools/setup-env)"
    store = await Store.open(f"sqlite:///{tmp_path / 'relay.db'}")
    config = RelayConfig(
        data_dir=str(tmp_path),
        broker=BrokerSettings(url=f"mqtt://{broker.host}:{broker.port}"),
        mqtt=MqttSettings(client_id="relay-fuzz", connect_timeout=3.0, publish_timeout=5.0),
        turn=TurnSettings(urls=(TURN_URL,)),
    )
    turn_secret = new_secret()
    relay = Relay(config, store, turn_secret=turn_secret)
    await relay.start()
    try:
        now = datetime.now(UTC)
        await store.run(store.record_presence, "door-1", "offline", now)
        await store.run(store.call_started, "c1", "door-1", "door-2", "talk", now)
        stats = {"loss_fraction": 0.01, "jitter_ms": 3.0, "rtt_ms": 20}
        await store.run(store.call_quality, "c1", "door-1", stats)
        async with api_server(store, tmp_path, 1_000_000, relay) as server:
            token, _ = await mint_api_token(store, "schemathesis")
            key = server.key
            for n in range(3):
                a = make_alert(n)
                if n == 0:
                    a = dataclasses.replace(
                        a, clip=seal(tone_clip(0.2), key.public, a.id).to_text()
                    )
                clip = check_clip(a.clip, key, a.id) if a.clip else None
                await store.run(store.record_alert, "door-1", a, datetime.now(UTC), clip)
            async with client(server.url, server.ca, token) as api:
                assert await api.ok("/api/v1/openapi.json") == OPENAPI
                # TURN REST credentials coturn checks with the shared secret alone.
                [ice] = (await api.ok("/api/v1/ice-servers"))["iceServers"]
                assert ice["urls"] == [TURN_URL] and turn_secret not in json.dumps(ice)
                expiry, _, user = ice["username"].partition(":")
                minted = mint_turn_credentials(turn_secret, user, 0, now=int(expiry))
                assert (ice["username"], ice["credential"]) == (minted.username, minted.password)
                assert relay.stats.turn_minted == 1
            schema = tmp_path / "openapi.json"
            schema.write_text(json.dumps(OPENAPI))
            proc = await asyncio.create_subprocess_exec(
                st, "run", str(schema), "--url", server.url,
                "--header", f"Authorization: Bearer {token}",
                "--tls-verify", str(server.ca),
                "--checks", "not_a_server_error,response_schema_conformance",
                "--exclude-path", "/api/v1/events",
                "--phases", "examples,coverage,fuzzing,stateful",
                "--max-examples", "60", "--seed", "1", "--workers", "1",
                "--no-color", "--generation-database", "none",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            try:
                async with asyncio.timeout(240):
                    out, _ = await proc.communicate()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            text = out.decode(errors="replace")
            (tmp_path / "schemathesis.log").write_text(text)
            assert proc.returncode == 0, text[-6000:]
            # The stream schemathesis skips: its first lines, then a heartbeat.
            bearer = {"Authorization": f"Bearer {token}"}
            async with (
                client(server.url, server.ca, token) as api,
                api.http.get(server.url + "/api/v1/events", headers=bearer) as events,
            ):
                assert events.content_type == "text/event-stream"
                assert await events.content.readline() == b"retry: 3000\n"
                assert await events.content.readline() == b": connected\n"
                await events.content.readline()
                assert await events.content.readline() == b": heartbeat\n"
    finally:
        await relay.close()
        await store.close()


async def test_migrations_build_the_tables_schema_py_describes(store_url: str) -> None:
    """The API's tables and columns came with new migrations: nothing of ``schema.py`` is
    missing from, or different in, a database the migrations made."""
    store = await Store.open(store_url)  # migrates to the newest revision
    await store.close()

    def differences() -> list[Any]:
        engine = create_engine(store_url)
        try:
            with engine.connect() as conn:
                return list(compare_metadata(MigrationContext.configure(conn), metadata))
        finally:
            engine.dispose()

    assert await asyncio.to_thread(differences) == []
