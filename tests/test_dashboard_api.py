"""The dashboard's JSON API on the real relay (``edge-intercom-relay serve``, its mosquitto,
HTTPS trusted through its CA) with a real agent: users made with the CLI, login,
sessions and CSRF, the login limit, API tokens beside sessions, a pairing token minted
over the API and redeemed by ``tools/pair-device``, live events (the agent coming
online, an alert), devices, a command answered by the agent, and revocation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from test_api import make_alert
from test_edge_clip_e2e import relay_cli

from agent.signaling import topics
from agent.signaling.topics import Kind
from cloud_relay.sessions import COOKIE, CSRF_HEADER
from tools.lab.fleet import RELAY_CMD, Fleet, fleet
from tools.lab.sse import sse_events

DEVICE = "porch-1"
PASSWORD = "correct horse battery"
WAIT = 20.0


@dataclass
class Browser:
    """What a page does: a session cookie and its CSRF token, or a bearer token."""

    url: str
    http: aiohttp.ClientSession
    cookie: str | None = None
    csrf: str | None = None
    bearer: str | None = None

    async def call(
        self, method: str, path: str, body: Any = None, *, csrf: str | None = None
    ) -> tuple[int, Any, Any]:
        headers = {}
        if self.cookie is not None:
            headers["Cookie"] = f"{COOKIE}={self.cookie}"
        if self.bearer is not None:
            headers["Authorization"] = f"Bearer {self.bearer}"
        if csrf is not None:
            headers[CSRF_HEADER] = csrf
        async with self.http.request(
            method, self.url + path, json=body, headers=headers
        ) as response:
            data: Any = await response.read()
            if response.content_type == "application/json":
                data = json.loads(data)
            return response.status, data, response

    async def login(self, name: str, password: str) -> tuple[int, Any]:
        status, body, response = await self.call(
            "POST", "/api/v1/login", {"name": name, "password": password}
        )
        if status == 200:
            morsel = response.cookies[COOKIE]
            assert morsel["httponly"] and morsel["secure"] and morsel["path"] == "/"
            assert morsel["samesite"] == "Strict"
            self.cookie, self.csrf = morsel.value, body["csrf"]
        return status, body


@contextlib.asynccontextmanager
async def browser(f: Fleet) -> AsyncIterator[Browser]:
    ctx = ssl.create_default_context(cafile=str(f.pki_dir / "ca.pem"))
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx), timeout=aiohttp.ClientTimeout(total=WAIT)
    ) as http:
        yield Browser(f"https://127.0.0.1:{f.pairing_port}", http)


class EventStream:
    """``GET /api/v1/events`` read in a task into a queue of (kind, data)."""

    def __init__(self, b: Browser) -> None:
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._browser = b
        self._task = asyncio.create_task(self._read(), name="sse-reader")
        self.connected = asyncio.Event()

    async def _read(self) -> None:
        headers = {"Cookie": f"{COOKIE}={self._browser.cookie}"}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=WAIT)
        async with self._browser.http.get(
            self._browser.url + "/api/v1/events", headers=headers, timeout=timeout
        ) as response:
            assert response.status == 200
            assert response.content_type == "text/event-stream"
            async for event in sse_events(response, self.connected):
                await self.events.put(event)

    async def until(self, kind: str, match: dict[str, Any]) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            while True:
                got, data = await self.events.get()
                if got == kind and all(data.get(k) == v for k, v in match.items()):
                    return dict(data)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def user_cli(f: Fleet, *args: str) -> tuple[int, str]:
    argv = [*RELAY_CMD, "user", *args, "--config", str(f.root / "relay.toml"),
            "--data-dir", str(f.data_dir)]  # fmt: skip
    code, out, err = await f._run(argv, f"user {args[0]}")
    return code, (out + err).decode()


async def test_the_dashboard_api_with_a_real_relay_and_agent(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    async with fleet(tmp_path, devices=(DEVICE,), client_id="dash") as f:
        assert (await user_cli(f, "add", "ops", "--password-file", str(secret)))[0] == 0
        assert (await user_cli(f, "add", "eve", "--password-file", str(secret)))[0] == 0
        code, out = await user_cli(f, "add", "ops", "--password-file", str(secret))
        assert code == 1 and "exists already" in out
        code, out = await user_cli(f, "list")
        assert code == 0 and "ops" in out and "eve" in out and PASSWORD not in out
        stored = await asyncio.to_thread(f.db_path.read_bytes)
        assert PASSWORD.encode() not in stored

        async with browser(f) as page, browser(f) as other, browser(f) as script:
            # Nothing without a session or a token.
            assert (await page.call("GET", "/api/v1/devices"))[0] == 401
            assert (await page.login("ops", "wrong password!"))[0] == 401
            status, session = await page.login("ops", PASSWORD)
            assert status == 200 and session["user"] == "ops" and session["kind"] == "session"
            status, me, _ = await page.call("GET", "/api/v1/session")
            assert (status, me["csrf"]) == (200, page.csrf)

            # CSRF: a change by cookie needs the session's token.
            change = {"name": "Front porch"}
            path = f"/api/v1/devices/{DEVICE}"
            assert (await page.call("PATCH", path, change))[0] == 403
            assert (await page.call("PATCH", path, change, csrf="x" * 43))[0] == 403
            assert (await page.call("PATCH", path, change, csrf=page.csrf))[0] == 404  # unpaired

            # Pairing over the API, redeemed by tools/pair-device; the page sees it live.
            events = EventStream(page)
            await asyncio.wait_for(events.connected.wait(), WAIT)
            status, minted, _ = await page.call(
                "POST", "/api/v1/pairing-tokens",
                {"name": "Porch", "site": "Home", "device": DEVICE, "expires_in": 600},
                csrf=page.csrf,
            )  # fmt: skip
            assert status == 201, minted
            assert minted["qr_svg"].startswith("<svg") and minted["token"].startswith("ei")
            status, pending, _ = await page.call("GET", "/api/v1/pairing-tokens")
            assert [t["id"] for t in pending["tokens"]] == [minted["id"]]
            await f.pair(DEVICE, minted["token"])
            assert (await page.call("GET", "/api/v1/pairing-tokens"))[1]["tokens"] == []
            await f.agent(DEVICE, source="tone:440", sink="null")
            await events.until("presence", {"device": DEVICE, "state": "online"})

            # A new alert arrives live.
            alert = make_alert(0)
            assert f.client is not None
            await f.client.publish(topics.device_topic(DEVICE, Kind.ALERT), alert.to_json())
            got = await events.until("alert", {"device": DEVICE})
            assert got["alert"]["id"] == alert.id

            # Devices: listed, renamed and moved.
            status, found, _ = await page.call("GET", "/api/v1/devices")
            [dev] = [d for d in found["devices"] if d["id"] == DEVICE]
            assert (dev["name"], dev["site"], dev["presence"]) == ("Porch", "Home", "online")
            status, dev, _ = await page.call(
                "PATCH", path, {"name": "Front porch", "group": "doors"}, csrf=page.csrf
            )
            assert (status, dev["name"], dev["group"], dev["site"]) == (
                200, "Front porch", "doors", "Home",
            )  # fmt: skip
            status, detail, _ = await page.call("GET", path)
            assert status == 200 and isinstance(detail["telemetry"], list)

            # A command answered by the agent, and its reply pushed to the page too.
            status, replied, _ = await page.call(
                "POST", path + "/commands", {"name": "status"}, csrf=page.csrf
            )
            assert status == 200 and replied["reply"]["ok"] is True, replied
            await events.until("command-reply", {"device": DEVICE, "status": "ok"})
            status, bad, _ = await page.call(
                "POST", path + "/commands", {"name": "rm -rf"}, csrf=page.csrf
            )
            assert (status, bad["error"]) == (400, "bad-request")
            assert (await page.call("GET", "/api/v1/calls?live=1"))[1] == {"calls": []}

            # A second token, cancelled.
            status, second, _ = await page.call(
                "POST", "/api/v1/pairing-tokens", {}, csrf=page.csrf
            )
            assert status == 201
            status, _, _ = await page.call(
                "DELETE", f"/api/v1/pairing-tokens/{second['id']}", csrf=page.csrf
            )
            assert status == 200
            assert (await page.call("GET", "/api/v1/pairing-tokens"))[1]["tokens"] == []

            # API tokens work beside sessions, with no CSRF token (nothing is ambient).
            made = json.loads(await relay_cli(f, "token", "new", "--name", "ha", "--json"))
            script.bearer = made["token"]
            status, me, _ = await script.call("GET", "/api/v1/session")
            assert (status, me["kind"], me["user"]) == (200, "token", "ha")
            status, _, _ = await script.call("PATCH", path, {"site": "Garden"})
            assert status == 200

            # Revoked over the API: the agent is cut off the broker.
            status, revoked, _ = await page.call("POST", path + "/revoke", csrf=page.csrf)
            assert status == 200 and revoked["revoked_certificates"] >= 1
            await events.until("presence", {"device": DEVICE, "state": "offline"})
            await events.close()

            # Logout ends the session; removing a user ends theirs.
            assert (await page.call("POST", "/api/v1/logout", csrf=page.csrf))[0] == 200
            assert (await page.call("GET", "/api/v1/session"))[0] == 401
            assert (await page.login("ops", PASSWORD))[0] == 200
            assert (await user_cli(f, "remove", "ops"))[0] == 0
            assert (await page.call("GET", "/api/v1/session"))[0] == 401
            assert (await page.login("ops", PASSWORD))[0] == 401

            # Login limit: five failures from a source (two were ops' above), then 429
            # even with the right password.
            for _ in range(3):
                assert (await other.login("eve", "not her password"))[0] == 401
            status, body = await other.login("eve", PASSWORD)
            assert status == 429 and body["error"] == "rate-limited"

        log = f.log("relay")
        assert "login as 'eve' from 127.0.0.1 refused (rate-limited)" in log
        assert PASSWORD not in log and page.csrf is not None and page.csrf not in log
