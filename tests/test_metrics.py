"""``GET /metrics`` on the relay's HTTPS listener, scraped as Prometheus does, after a real
call and a real alert went through the relay (``tools.lab.fleet``: the relay with its
broker, two ``edge-intercom-agent run`` boards; door-a's tamper switch is on the lab chip).
Without an API token the scrape is refused like any API request."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from test_gpio_e2e import fake_chip

from cloud_relay.store import Store
from cloud_relay.tokens import mint_api_token
from tools.lab.fleet import WAIT, Fleet, fleet

A, B = "door-a", "door-b"
TAMPER = 23
"""The tamper switch's line in ``firmware_configs/raspberry-pi-4-usb.toml``."""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


class Scraper:
    def __init__(self, f: Fleet, session: aiohttp.ClientSession, token: str) -> None:
        self.url = f"https://127.0.0.1:{f.pairing_port}/metrics"
        self.session = session
        self.token = token
        self.tls = ssl.create_default_context(cafile=f.pki_dir / "ca.pem")

    async def get(self, token: str | None) -> tuple[int, str, str]:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        async with self.session.get(self.url, headers=headers, ssl=self.tls) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), await resp.text()

    async def scrape(self) -> Samples:
        status, content_type, text = await self.get(self.token)
        assert status == 200, text
        assert content_type.startswith("text/plain"), content_type
        return parse(text)

    async def until(self, check: Callable[[Samples], bool], what: str) -> Samples:
        samples: Samples = {}
        try:
            async with asyncio.timeout(WAIT):
                while not check(samples := await self.scrape()):
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(f"metrics never showed {what}: {samples}") from None
        return samples


async def api_token(f: Fleet) -> str:
    store = await Store.open(f"sqlite:///{f.db_path}")
    try:
        token, _ = await mint_api_token(store, "prometheus")
    finally:
        await store.close()
    return token


async def test_metrics_count_a_routed_call_and_an_alert(tmp_path: Path) -> None:
    sock = tmp_path / "gpio.sock"
    async with fleet(tmp_path, devices=(A, B), client_id="metrics-test") as f:
        gpio = f'[gpio]\nchip = "fake:{sock}"\n'
        await f.agent(A, source="tone:700", sink="null", settings='board = "raspberry-pi-4-usb"',
                      extra=gpio)  # fmt: skip
        await f.agent(B, source="tone:1100", sink="null", auto_answer=[A])
        for device in (A, B):
            await f.until_status(device, lambda s: s["phase"] == "idle", f"{device} up")
        await f.until_online(A, B)
        async with aiohttp.ClientSession() as session:
            m = Scraper(f, session, await api_token(f))
            # Authenticated like the API: no token, or a wrong one, is a 401.
            assert (await m.get(None))[0] == 401
            assert (await m.get("eirt_" + "A" * 43))[0] == 401

            before = await m.until(
                lambda s: total(s, "edge_intercom_relay_devices", state="online") == 2,
                "both boards online",
            )
            assert total(before, "edge_intercom_relay_broker_connected") == 1
            assert total(before, "edge_intercom_relay_routing_seconds_count") == 0

            reply = await f.command(A, "call", peer=B)
            assert reply["ok"], reply
            call = reply["call_id"]
            await f.until_status(B, lambda s: s["phase"] == "active", f"{B} in the call")
            assert (await f.command(A, "hangup"))["ok"]
            await f.until_status(
                A, lambda s: (s["last_call"] or {}).get("call_id") == call, "the call ended"
            )
            async with fake_chip(f, sock) as chip:
                await chip.set(TAMPER, True)  # the enclosure opens: a tamper alert
                after = await m.until(
                    lambda s: (
                        total(s, "edge_intercom_relay_alerts_total", kind="tamper") == 1
                        and total(s, "edge_intercom_relay_calls_ended_total") == 1
                        and total(s, "edge_intercom_relay_calls_open") == 0
                    ),
                    "the alert, and the call ended",
                )
    tamper = total(after, "edge_intercom_relay_alerts_total", kind="tamper", severity="critical")
    assert tamper == 1
    # Every alert stored is counted once by kind (the tone boards may raise others).
    stored = total(after, "edge_intercom_relay_alerts_stored_total")
    assert total(after, "edge_intercom_relay_alerts_total") == stored
    assert total(after, "edge_intercom_relay_calls_started_total", mode="normal") == 1
    # Invite, answer, candidates, hangup: every forward was timed.
    forwarded = total(after, "edge_intercom_relay_forwarded_total")
    assert forwarded >= 3
    assert total(after, "edge_intercom_relay_routing_seconds_count") == forwarded
    assert total(after, "edge_intercom_relay_routing_seconds_sum") > 0
    assert total(after, "edge_intercom_relay_routing_seconds_bucket", le="+Inf") == forwarded
    # The relay recorded the operator's commands (this test's and until_status's polls).
    assert total(after, "edge_intercom_relay_commands_finished_total", outcome="ok") >= 2
    assert total(after, "edge_intercom_relay_api_refusals_total", reason="missing") == 1
    assert total(after, "edge_intercom_relay_api_refusals_total", reason="unknown") == 1
