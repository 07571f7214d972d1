"""The dashboard's pages as served (``cloud_relay.pages``, over plain HTTP on loopback with
a stand-in for the API's authentication), and the per-day alert counts (pure)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cloud_relay import pages
from cloud_relay.alert_counts import day_counts

COOKIE = "let-me-in"


@pytest.fixture
async def http() -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """The pages behind a middleware that, like the API's, refuses what is not open."""
    app = web.Application()
    open_paths = pages.install(app)

    @web.middleware
    async def authenticate(request: web.Request, handler: pages.Handler) -> web.StreamResponse:
        if request.path not in open_paths and request.cookies.get("s") != COOKIE:
            return web.json_response({"error": "unauthorized"}, status=401)
        return await handler(request)

    app.middlewares.append(authenticate)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield session, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def test_pages_need_a_session_and_assets_are_cached(
    http: tuple[aiohttp.ClientSession, str],
) -> None:
    session, url = http
    async with session.get(url + "/calls?x=1", allow_redirects=False) as r:
        assert (r.status, r.headers["Location"]) == (302, "/login?next=/calls%3Fx%3D1")
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    async with session.get(url + "/login") as r:
        html = await r.text()
        assert r.status == 200 and r.headers["Cache-Control"] == pages.PAGE_CACHE
        etag = r.headers["ETag"]
    assert "{{static}}" not in html
    asset = re.search(r'src="(/static/[0-9a-f]{16}/login\.js)"', html)
    assert asset is not None
    async with session.get(url + "/login", headers={"If-None-Match": etag}) as r:
        assert r.status == 304
    async with session.get(url + asset[1]) as r:
        assert r.status == 200 and r.content_type == "text/javascript"
        assert r.headers["Cache-Control"] == pages.ASSET_CACHE
    async with session.get(url + "/static/0000000000000000/login.js") as r:
        assert r.status == 401  # an old version's asset: not open, like any unknown path
        assert r.headers["X-Frame-Options"] == "DENY"

    cookies = {"s": COOKIE}
    async with session.get(url + "/", cookies=cookies, allow_redirects=False) as r:
        assert (r.status, r.headers["Location"]) == (302, pages.HOME)
    async with session.get(url + "/devices/door-1", cookies=cookies) as r:
        assert r.status == 200 and "device.js" in await r.text()
    async with session.get(url + "/devices/Not_A_Device", cookies=cookies) as r:
        assert r.status == 404


def test_day_counts_fill_every_day_of_the_window() -> None:
    first = datetime(2026, 1, 30, tzinfo=UTC)
    rows = [("2026-01-30", "smoke_alarm", 2), ("2026-02-01", "glass_break", 1),
            ("2026-02-01", "smoke_alarm", 3), ("2026-01-29", "smoke_alarm", 9)]  # fmt: skip
    assert day_counts(rows, first, 3) == {
        "days": ["2026-01-30", "2026-01-31", "2026-02-01"],
        "counts": {"glass_break": [0, 0, 1], "smoke_alarm": [2, 0, 3]},
    }
    assert day_counts([], first, 1) == {"days": ["2026-01-30"], "counts": {}}
