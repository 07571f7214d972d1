"""Headless Chromium (Debian's ``chromium``) driven by Playwright, for the dashboard's tests
(``tests/test_dashboard_browser.py``) and benchmark (``tools/bench/dashboard.py``), on a
closed network.

``async with launch(relay_cert) as browser:`` launches it with the flags a machine
without Internet access and without user namespaces needs: no sandbox (tests run as
root in containers), nothing that phones home (component updates, sync,
metrics, translation), ``/dev/shm`` not relied on. The relay's HTTPS certificate is
trusted by its public key alone (``--ignore-certificate-errors-spki-list``): every other
certificate error still fails, unlike ``ignore_https_errors``. ``context()`` makes a
fresh profile (no cookies) with a desktop or phone viewport.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from playwright.async_api import Browser, BrowserContext, ViewportSize, async_playwright

CHROMIUM: Final = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CLOSED_NETWORK_FLAGS: Final = (
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-domain-reliability",
    "--disable-sync",
    "--metrics-recording-only",
    "--no-first-run",
    "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider",
)
DESKTOP: Final = ViewportSize(width=1280, height=860)
PHONE: Final = ViewportSize(width=390, height=844)


def spki_sha256(cert_pem: bytes) -> str:
    """The base64 SHA-256 of a certificate's public key, as Chromium's SPKI list takes it."""
    key = x509.load_pem_x509_certificate(cert_pem).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@contextlib.asynccontextmanager
async def launch(trusted_cert: Path, args: Sequence[str] = ()) -> AsyncIterator[Browser]:
    """Chromium trusting ``trusted_cert``'s key (the relay's HTTPS certificate); ``args``:
    more command-line flags (a fake microphone, ...)."""
    spki = spki_sha256(await asyncio.to_thread(trusted_cert.read_bytes))
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[*CLOSED_NETWORK_FLAGS, f"--ignore-certificate-errors-spki-list={spki}", *args],
        )
        try:
            yield browser
        finally:
            await browser.close()


async def context(browser: Browser, *, phone: bool = False) -> BrowserContext:
    """A fresh profile; ``phone``: a small touch screen."""
    if phone:
        return await browser.new_context(
            viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True
        )
    return await browser.new_context(viewport=DESKTOP)
