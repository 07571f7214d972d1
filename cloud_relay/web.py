"""The relay's HTTPS endpoint (aiohttp): pairing, and the JSON API (``cloud_relay.api``).

HTTPS only, with the relay's own certificate (``pki.Role.HTTPS``), whose fingerprint
pairing tokens pin, so boards need no public CA. ``POST /api/v1/pair`` takes
``{"secret", "csr"}`` and answers with ``Pairing.redeem``'s outcome: 200 and the
enrollment, 400 for a bad request or CSR, 403 for an unknown, used or expired token,
429 (with ``Retry-After``) when rate-limited or locked. Bodies over
``MAX_REQUEST_BYTES`` are refused by aiohttp before any handler runs.

Given an ``Api``, the server also serves its routes, and every request but pairing and
login must then carry an API token or a session cookie (``Api.middleware``); at close
its event streams end first (``Api.shutdown``), so that closing waits for none.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from aiohttp import web

from cloud_relay import pages
from cloud_relay.api import Api
from cloud_relay.metrics import METRICS_PATH, RelayMetrics
from cloud_relay.pairing import MAX_REQUEST_BYTES, Pairing

logger = logging.getLogger(__name__)

PAIR_PATH = "/api/v1/pair"
RETRY_AFTER_S = 60


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class WebServer:
    """The HTTPS listener; ``start()`` binds, ``close()`` stops it and its connections."""

    def __init__(
        self,
        pairing: Pairing,
        host: str,
        port: int,
        tls: ssl.SSLContext,
        api: Api | None = None,
        *,
        metrics: RelayMetrics | None = None,
    ) -> None:
        """``metrics``: served at ``/metrics``, only with an ``api`` (whose tokens it takes)."""
        self._pairing = pairing
        self._host = host
        self._port = port
        self._tls = tls
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_post(PAIR_PATH, self._pair)
        if api is not None:
            open_pages = pages.install(app)  # the dashboard's pages (cloud_relay.pages)
            app.middlewares.append(api.middleware(open_paths={PAIR_PATH, *open_pages}))
            api.add_routes(app.router)
            app.on_shutdown.append(api.shutdown)
            if metrics is not None:
                app.router.add_get(METRICS_PATH, metrics.handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one the OS chose for 0)."""
        addresses = self._runner.addresses
        return int(addresses[0][1]) if addresses else self._port

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._tls)
        await site.start()
        logger.info("HTTPS endpoint on https://%s:%d", self._host, self.port)

    async def close(self) -> None:
        await self._runner.cleanup()

    async def _pair(self, request: web.Request) -> web.Response:
        source = request.remote or "unknown"
        body = await request.read()
        outcome, reply = await self._pairing.redeem(source, body)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if outcome.http_status == 429 else None
        return web.json_response(reply, status=outcome.http_status, headers=headers)
