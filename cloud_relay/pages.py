"""The dashboard's pages: plain HTML, one CSS file and vanilla JS modules from ``static/``.

No build step and nothing from elsewhere (relays run on closed networks). The files are
read once at start-up and served from memory:

- pages (``PAGES``, and ``/devices/{id}``) need a session like the API does: a browser
  without one is sent to ``/login`` (a 302 instead of the API's 401); their HTML names
  the assets under ``/static/<version>/``, ``version`` being a digest of every asset, so
  that assets are cached for good (``immutable``) and a relay upgrade changes their URL;
  pages themselves are revalidated (``no-cache`` with an ETag);
- the login page and the assets are open (nothing in them is a secret);
- every reply, the API's too, carries a strict Content-Security-Policy (``'self'`` only,
  no inline script or style) and the usual hardening headers.

``install(app)`` adds the routes and the middleware (before the API's, so that it sees
the API's refusals) and returns the paths to leave open.
"""

from __future__ import annotations

import hashlib
import mimetypes
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote

from aiohttp import web

from cloud_relay.apibase import DEVICE_ID

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
LOGIN_PATH: Final = "/login"
PAGES: Final = {
    LOGIN_PATH: "login.html",
    "/devices": "devices.html",
    "/calls": "calls.html",
    "/alerts": "alerts.html",
    "/pairing": "pairing.html",
}
DEVICE_PAGE: Final = "device.html"
HOME: Final = "/devices"
_DEVICE_ID: Final = re.compile(DEVICE_ID)
STATIC_MARK: Final = "{{static}}"
"""Where an HTML file names the assets' versioned prefix."""
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Talk needs the microphone, on the relay's own pages only.
    "Permissions-Policy": "microphone=(self), camera=(), geolocation=()",
    "Strict-Transport-Security": "max-age=31536000",
}
PAGE_CACHE: Final = "private, no-cache"
ASSET_CACHE: Final = "public, max-age=31536000, immutable"
_PAGE: Final = "page"
_ASSET: Final = "asset"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class File:
    body: bytes
    content_type: str
    etag: str


def _file(body: bytes, name: str) -> File:
    content_type = "text/javascript" if name.endswith(".js") else mimetypes.guess_type(name)[0]
    return File(body, content_type or "application/octet-stream",
                f'"{hashlib.sha256(body).hexdigest()[:32]}"')  # fmt: skip


def load(directory: Path = STATIC_DIR) -> tuple[str, dict[str, File], dict[str, File]]:
    """(assets' version, assets by name, HTML pages by file name) of ``directory``."""
    assets = {p.name: p.read_bytes() for p in sorted(directory.iterdir())
              if p.is_file() and p.suffix != ".html"}  # fmt: skip
    digest = hashlib.sha256()
    for name, body in assets.items():
        digest.update(name.encode() + b"\0" + hashlib.sha256(body).digest())
    version = digest.hexdigest()[:16]
    prefix = f"/static/{version}"
    pages = {
        p.name: _file(p.read_bytes().replace(STATIC_MARK.encode(), prefix.encode()), p.name)
        for p in directory.glob("*.html")
    }
    return version, {name: _file(body, name) for name, body in assets.items()}, pages


def _reply(request: web.Request, f: File) -> web.Response:
    if request.headers.get("If-None-Match") == f.etag:
        return web.Response(status=304, headers={"ETag": f.etag})
    return web.Response(body=f.body, content_type=f.content_type, headers={"ETag": f.etag})


def _redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location})


def install(app: web.Application, directory: Path = STATIC_DIR) -> frozenset[str]:
    """Add the pages' routes and middleware to ``app``; the paths that need no session."""
    version, assets, pages = load(directory)

    def page(name: str) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            return _reply(request, pages[name])

        return handle

    async def device_page(request: web.Request) -> web.Response:
        if _DEVICE_ID.fullmatch(request.match_info["id"]) is None:
            return web.Response(status=404, text="no such page")
        return _reply(request, pages[DEVICE_PAGE])

    async def home(_request: web.Request) -> web.Response:
        return _redirect(HOME)

    router = app.router
    router.add_get("/", home, name=f"{_PAGE}:home")
    for path, name in PAGES.items():
        router.add_get(path, page(name), name=f"{_PAGE}:{name}")
    router.add_get("/devices/{id}", device_page, name=f"{_PAGE}:{DEVICE_PAGE}")
    open_paths = {LOGIN_PATH}
    for name, f in assets.items():
        path = f"/static/{version}/{name}"

        async def asset(request: web.Request, f: File = f) -> web.Response:
            return _reply(request, f)

        router.add_get(path, asset, name=f"{_ASSET}:{name}")
        open_paths.add(path)
    app.middlewares.insert(0, _middleware)
    return frozenset(open_paths)


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A page refused for want of a session becomes a redirect to the login page; every
    reply gets the security headers, pages and assets their caching."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # aiohttp's own 404s and 405s
        exc.headers.update(SECURITY_HEADERS)
        raise
    route = request.match_info.route.name or ""
    kind = route.partition(":")[0]
    if kind == _PAGE and response.status == 401:
        response = _redirect(f"{LOGIN_PATH}?next={quote(request.path_qs, safe='/')}")
    if response.prepared:  # an event stream sent its headers already
        return response
    response.headers.update(SECURITY_HEADERS)
    if kind == _PAGE and response.status in (200, 304):
        response.headers["Cache-Control"] = PAGE_CACHE
    elif kind == _ASSET:
        response.headers["Cache-Control"] = ASSET_CACHE
    return response
