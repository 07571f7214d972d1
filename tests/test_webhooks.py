"""Webhook forwarding of alerts against a real aiohttp receiver on loopback, the store on
disk; and the ``alerts`` CLI as a subprocess.

Backoffs are shrunk through the settings; every wait is bounded; no wall-clock asserts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from mqtt_env import FAST_TIMERS, fast_config, until

from agent.edge.alerts import Alert, Severity, new_alert_id
from agent.signaling import topics
from agent.signaling.mqtt import MqttClient
from agent.signaling.topics import Kind
from cloud_relay.__main__ import Upkeep
from cloud_relay.config import BrokerSettings, MqttSettings, RelayConfig, StoreSettings
from cloud_relay.credentials import open_credentials
from cloud_relay.service import Relay
from cloud_relay.store import Store
from cloud_relay.webhooks import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Webhooks,
    WebhookSettings,
    read_webhook_secret,
)
from tools.lab.broker import Mosquitto
from tools.lab.webhooks import receiver

T0 = 1_760_000_000_000
SECRET = b"0123456789abcdef-test-secret"
RELAY_CLI = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "edge-intercom-relay"


def alert(kind: str = "smoke", severity: Severity = Severity.CRITICAL, n: int = 0) -> Alert:
    at = T0 + n * 1000
    return Alert(new_alert_id(), "alarm", kind, severity, at, at + 4000, 0.97, -12.5, at + 4100)


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "webhook.secret"
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o600)
    return path


def hook(url: str, secret_file: Path, **kw: Any) -> WebhookSettings:
    fast: dict[str, Any] = {"backoff_min_s": 0.001, "backoff_max_s": 0.004, "timeout_s": 5.0}
    return WebhookSettings(url=url, secret_file=str(secret_file), **(fast | kw))


@contextlib.asynccontextmanager
async def webhooks(
    tmp_path: Path, settings: list[WebhookSettings], worker: str = "relay-test"
) -> AsyncIterator[tuple[Webhooks, Store]]:
    store = await Store.open(f"sqlite:///{tmp_path / 'relay.db'}")
    w = Webhooks(settings, store, worker=worker)
    try:
        await w.start()
        yield w, store
    finally:
        await w.close()
        await store.close()


async def test_body_is_signed_with_the_secret(tmp_path: Path, secret_file: Path) -> None:
    a = alert()
    async with receiver() as r, webhooks(tmp_path, [hook(f"{r.url}/a", secret_file)]) as (w, s):
        assert w.submit("door-1", a.to_dict()) == 1
        await until(lambda: w.stats.delivered == 1, "the delivery")
        [got] = r.got
        expected = hmac.new(SECRET, got.body, hashlib.sha256).hexdigest()
        assert got.headers[SIGNATURE_HEADER] == f"sha256={expected}"
        wrong = hmac.new(b"another-secret-0123", got.body, hashlib.sha256).hexdigest()
        assert got.headers[SIGNATURE_HEADER] != f"sha256={wrong}"
        assert json.loads(got.body) == {"device": "door-1", "alert": a.to_dict()}
        assert got.headers["Content-Type"] == "application/json"
        assert int(got.headers[TIMESTAMP_HEADER]) > 0
        assert len(got.headers[DELIVERY_HEADER]) == 32
        # Delivered: the row is gone (the store thread runs the writes in order, and a
        # read takes the queued writes along), nothing is pending or dead.
        assert await s.run(s.webhook_pending, "relay-test") == []
        assert await s.run(s.dead_letters) == []


async def test_server_errors_are_retried_until_delivered(tmp_path: Path, secret_file: Path) -> None:
    a = alert()
    async with receiver() as r, webhooks(tmp_path, [hook(f"{r.url}/a", secret_file)]) as (w, _):
        r.statuses = [500, 500, 200]
        w.submit("door-1", a.to_dict())
        await until(lambda: w.stats.delivered == 1, "the delivery")
        assert len(r.got) == 3
        # The same delivery each time, byte for byte; it was accepted once.
        assert len({g.headers[DELIVERY_HEADER] for g in r.got}) == 1
        assert len({g.body for g in r.got}) == 1
        assert w.stats.retried == 2
        assert w.stats.dead == 0


async def test_always_failing_receiver_gives_a_dead_letter(
    tmp_path: Path, secret_file: Path
) -> None:
    a = alert()
    async with receiver() as r:
        r.default = 503
        async with webhooks(tmp_path, [hook(f"{r.url}/a", secret_file, max_tries=3)]) as (w, s):
            w.submit("door-1", a.to_dict())
            await until(lambda: w.stats.dead == 1, "the dead letter")

            async def dead() -> list[Any]:
                return await s.run(s.dead_letters)

            [letter] = await dead()
            assert len(r.got) == 3
            assert letter.tries == 3
            assert letter.reason == "HTTP 503"
            assert letter.alert_id == a.id
            assert letter.alert == a.to_dict()
            assert letter.device == "door-1"
            assert letter.dead_at is not None
            assert await s.run(s.webhook_pending, "relay-test") == []


async def test_dead_letters_listed_and_sent_again(tmp_path: Path, secret_file: Path) -> None:
    """``webhooks dead`` lists them; ``webhooks retry`` requeues them and wakes the relay
    (SIGHUP to the pid in its data directory), whose worker sends them from the first try."""
    data = tmp_path / "relay"
    data.mkdir()
    a = alert()
    async with receiver() as r:
        r.default = 503
        url = f"{r.url}/a"
        async with webhooks(data, [hook(url, secret_file, max_tries=2)]) as (w, s):
            w.submit("door-1", a.to_dict())
            await until(lambda: w.stats.dead == 1, "the dead letter")

            done = await asyncio.to_thread(cli, "webhooks", "dead", "--json", data=data)
            assert done.returncode == 0, done.stderr
            [listed] = [json.loads(line) for line in done.stdout.splitlines()]
            assert (listed["webhook"], listed["alert"], listed["tries"]) == (url, a.to_dict(), 2)
            assert listed["reason"] == "HTTP 503"

            # A relay that listens for SIGHUP: a stand-in process, its pid where serve's is.
            woke = tmp_path / "woke"
            hup = (f"import signal, sys, time; signal.signal(signal.SIGHUP, lambda *_: "
                   f"(open({str(woke)!r}, 'w').close(), sys.exit(0))); print(flush=True); "
                   "time.sleep(60)")  # fmt: skip
            stand_in = await asyncio.create_subprocess_exec(
                sys.executable, "-c", hup, stdout=asyncio.subprocess.PIPE
            )
            try:
                assert stand_in.stdout is not None
                await asyncio.wait_for(stand_in.stdout.readline(), 30)  # handler installed
                (data / "relay.pid").write_text(f"{stand_in.pid}\n")
                r.default = 200
                done = await asyncio.to_thread(cli, "webhooks", "retry", listed["id"], data=data)
                assert done.returncode == 0, done.stderr
                assert "1 dead letter(s)" in done.stdout
                assert await asyncio.wait_for(stand_in.wait(), 30) == 0 and woke.exists()
            finally:
                with contextlib.suppress(ProcessLookupError):
                    stand_in.kill()
                await stand_in.wait()
            # What the woken relay does: its upkeep takes the dead letter up again.
            config = RelayConfig(data_dir=str(tmp_path / "upkeep"))
            upkeep = Upkeep(config, await asyncio.to_thread(open_credentials, config))
            upkeep.webhooks = w
            upkeep.schedule()
            try:
                await until(lambda: w.stats.delivered == 1, "the delivery")
            finally:
                await upkeep.close()
            assert w.stats.resumed == 1
            assert await s.run(s.dead_letters) == []
            assert json.loads(r.got[-1].body)["alert"]["id"] == a.id

            done = await asyncio.to_thread(cli, "webhooks", "retry", "no-such-id", data=data)
            assert done.returncode == 1 and "0 dead letter(s)" in done.stdout


def cli(*args: str, data: Path) -> subprocess.CompletedProcess[str]:
    argv = [str(RELAY_CLI), *args, "--data-dir", str(data)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("status", "tries"), [(400, 1), (404, 1), (301, 1)])
async def test_client_errors_are_not_retried(
    tmp_path: Path, secret_file: Path, status: int, tries: int
) -> None:
    async with receiver() as r, webhooks(tmp_path, [hook(f"{r.url}/a", secret_file)]) as (w, s):
        r.default = status
        w.submit("door-1", alert().to_dict())
        await until(lambda: w.stats.dead == 1, "the dead letter")
        assert len(r.got) == tries
        [letter] = await s.run(s.dead_letters)
        assert letter.reason == f"HTTP {status}"


@pytest.mark.parametrize("status", [408, 429])
async def test_busy_receiver_is_retried(tmp_path: Path, secret_file: Path, status: int) -> None:
    async with receiver() as r, webhooks(tmp_path, [hook(f"{r.url}/a", secret_file)]) as (w, _):
        r.statuses = [status]
        w.submit("door-1", alert().to_dict())
        await until(lambda: w.stats.delivered == 1, "the delivery")
        assert len(r.got) == 2


async def test_timeout_is_retried(tmp_path: Path, secret_file: Path) -> None:
    async with receiver() as r:
        quick = hook(f"{r.url}/a", secret_file, timeout_s=0.2)
        async with webhooks(tmp_path, [quick]) as (w, _):
            r.hang = True
            w.submit("door-1", alert().to_dict())
            await until(lambda: len(r.got) == 1, "the first attempt")
            r.hang = False
            await until(lambda: w.stats.delivered == 1, "the delivery")
            assert w.stats.retried >= 1


async def test_filters_by_kind_and_severity(tmp_path: Path, secret_file: Path) -> None:
    async with receiver() as r:
        settings = [
            hook(f"{r.url}/smoke", secret_file, kinds=("smoke",)),
            hook(f"{r.url}/urgent", secret_file, min_severity="critical"),
            hook(f"{r.url}/all", secret_file),
        ]
        async with webhooks(tmp_path, settings) as (w, _):
            smoke = alert("smoke", Severity.WARNING)
            co = alert("co", Severity.CRITICAL)
            voice = alert("voice", Severity.INFO)
            assert w.submit("door-1", smoke.to_dict()) == 2
            assert w.submit("door-1", co.to_dict()) == 2
            assert w.submit("door-1", voice.to_dict()) == 1
            await until(lambda: w.stats.delivered == 5, "the deliveries")

    def ids(path: str) -> list[str]:
        return [json.loads(g.body)["alert"]["id"] for g in r.got if g.path == path]

    assert ids("/smoke") == [smoke.id]
    assert ids("/urgent") == [co.id]
    assert ids("/all") == [smoke.id, co.id, voice.id]  # in order


async def test_pending_deliveries_survive_close(tmp_path: Path, secret_file: Path) -> None:
    """Closing keeps what is not delivered pending in the store; the next start sends it."""
    a, b = alert(n=1), alert(n=2)
    async with receiver() as r:
        r.default = 503
        slow = hook(f"{r.url}/a", secret_file, backoff_min_s=600.0, backoff_max_s=600.0)
        async with webhooks(tmp_path, [slow]) as (w, s):
            w.submit("door-1", a.to_dict())
            w.submit("door-1", b.to_dict())
            await until(lambda: w.stats.retried == 1, "the first failure")
        r.default = 200
        async with webhooks(tmp_path, [hook(f"{r.url}/a", secret_file)]) as (w, s):
            assert w.stats.resumed == 2
            await until(lambda: w.stats.delivered == 2, "the resumed deliveries")
            assert await s.run(s.dead_letters) == []
        delivered = [json.loads(g.body)["alert"]["id"] for g in r.got]
        assert delivered[-2:] == [a.id, b.id]
        # Another worker's pending deliveries are not taken.
        async with webhooks(tmp_path, [hook(f"{r.url}/a", secret_file)], "relay-2") as (w, _):
            assert w.stats.resumed == 0


async def test_delivery_for_a_removed_webhook_becomes_a_dead_letter(
    tmp_path: Path, secret_file: Path
) -> None:
    async with receiver() as r:
        r.default = 503
        slow = hook(f"{r.url}/old", secret_file, backoff_min_s=600.0, backoff_max_s=600.0)
        async with webhooks(tmp_path, [slow]) as (w, _):
            w.submit("door-1", alert().to_dict())
            await until(lambda: w.stats.retried == 1, "the first failure")
        async with webhooks(tmp_path, [hook(f"{r.url}/new", secret_file)]) as (w, s):
            [letter] = await s.run(s.dead_letters)
            assert letter.reason == "unconfigured"
            assert letter.tries == 1


def test_settings_are_checked(tmp_path: Path, secret_file: Path) -> None:
    with pytest.raises(ValueError, match="https"):
        WebhookSettings(url="http://example.com/hook", secret_file=str(secret_file))
    WebhookSettings(url="http://[::1]:8080/hook", secret_file=str(secret_file))
    WebhookSettings(url="https://example.com/hook", secret_file=str(secret_file))
    with pytest.raises(ValueError, match="max_tries"):
        WebhookSettings(url="https://x.example/", secret_file="s", max_tries=0)
    with pytest.raises(ValueError, match="backoff"):
        WebhookSettings(url="https://x.example/", secret_file="s", backoff_min_s=2,
                        backoff_max_s=1)  # fmt: skip
    assert read_webhook_secret(secret_file) == SECRET
    secret_file.chmod(0o640)
    with pytest.raises(ValueError, match="accessible"):
        read_webhook_secret(secret_file)
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    short.chmod(0o600)
    with pytest.raises(ValueError, match="shorter"):
        read_webhook_secret(short)


async def test_cli_lists_stored_alerts(tmp_path: Path) -> None:
    data = tmp_path / "relay"
    data.mkdir()
    store = await Store.open(f"sqlite:///{data / 'relay.db'}")
    a, b = alert("smoke", n=1), alert("co", n=2)
    c = alert("glass", Severity.WARNING, n=3)
    try:
        for device, x, sec in (("door-1", a, 1), ("door-2", b, 2), ("door-1", c, 3)):
            received = datetime(2026, 11, 27, 12, 0, sec, tzinfo=UTC)
            assert await store.write(store.record_alert, device, x, received)
    finally:
        await store.close()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(RELAY_CLI), "alerts", "--data-dir", str(data), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    done = await asyncio.to_thread(run, "--json")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [x["id"] for x in lines] == [c.id, b.id, a.id]  # newest first
    assert lines[0]["device"] == "door-1"
    assert lines[0]["alert"] == c.to_dict()
    assert lines[0]["received"] == "2026-11-27T12:00:03+00:00"

    done = await asyncio.to_thread(
        run, "--json", "--device", "door-1", "--since", "2026-11-27T12:00:02", "--limit", "5"
    )
    assert [json.loads(line)["id"] for line in done.stdout.splitlines()] == [c.id]

    done = await asyncio.to_thread(run)
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()
    assert rows[0].startswith("received (UTC)")
    assert len(rows) == 4
    assert "glass" in rows[1] and c.id in rows[1]

    done = await asyncio.to_thread(
        lambda: subprocess.run(
            [str(RELAY_CLI), "alerts", "--data-dir", str(tmp_path / "none")],
            capture_output=True, text=True, timeout=60, check=False,
        )
    )  # fmt: skip
    assert done.returncode == 1
    assert "no relay store" in done.stderr


async def test_relay_forwards_each_new_alert_once(
    broker: Mosquitto, tmp_path: Path, secret_file: Path
) -> None:
    """Through the relay: an alert published twice (a resend) is stored once and reaches
    the webhook once; one the filter drops is stored but not sent."""
    data = tmp_path / "relay"
    data.mkdir()
    async with receiver() as r:
        config = RelayConfig(
            data_dir=str(data),
            store=StoreSettings(url=f"sqlite:///{data / 'relay.db'}"),
            broker=BrokerSettings(url=f"mqtt://{broker.host}:{broker.port}"),
            mqtt=MqttSettings(client_id="relay-test", **FAST_TIMERS),
            webhooks=(hook(f"{r.url}/a", secret_file, kinds=("smoke",)),),
        )
        store = await Store.open(config.store_url())
        webhooks = Webhooks(config.webhooks, store, worker=config.mqtt.client_id)
        relay = Relay(config, store, webhooks=webhooks)
        device = MqttClient(fast_config("lab-device", broker.port, broker.host))
        smoke, voice = alert("smoke"), alert("voice", Severity.INFO)
        try:
            await relay.start()
            await device.start()
            topic = topics.device_topic("door-1", Kind.ALERT)
            for a in (smoke, smoke, voice):
                await device.publish(topic, a.to_json())
            stats = relay.stats
            await until(lambda: stats.alerts_stored + stats.alerts_duplicate == 3, "the alerts")
            await until(lambda: webhooks.stats.delivered == 1, "the delivery")
            assert relay.stats.alerts_stored == 2
            assert relay.stats.alerts_duplicate == 1
        finally:
            await device.close()
            await relay.close()
            await store.close()
    [got] = r.got
    assert json.loads(got.body) == {"device": "door-1", "alert": smoke.to_dict()}
