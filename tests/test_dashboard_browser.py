"""The dashboard in a real browser: headless Chromium (Playwright) against the real relay
(``edge-intercom-relay serve`` with its mosquitto) and real agents (``tools.lab.fleet``).

One operator's session from login on: the pages are behind the login, a board started
meanwhile comes online on the open devices page (no reload), a pairing token made on
the pairing page is redeemed by ``tools/pair-device`` with the text read off the page,
an alert published for a board shows on the open alerts page and its clip plays in an
``<audio>`` element, a command's reply shows on the device page. Screenshots of the main
pages (desktop, and the devices list on a phone) go to ``$ARTEFACTS/dashboard`` or the
test's temporary directory, printed at the end.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from playwright.async_api import Page, expect
from test_api import make_alert, tone_clip
from test_dashboard_api import PASSWORD, user_cli

from agent.edge.clip import seal
from agent.signaling import topics
from agent.signaling.topics import Kind
from cloud_relay.clips import ClipKey
from tools.lab.chromium import context, launch
from tools.lab.fleet import WAIT, Fleet, fleet

HALL = "hall-1"
TELEMETRY = "[telemetry]\ninterval_s = 0.5"
"""Levels twice a second: the device page has a sound level and CPU to chart."""
TIMEOUT_MS = WAIT * 1000
expect.set_options(timeout=TIMEOUT_MS)


def artefacts(tmp_path: Path) -> Path:
    root = Path(os.environ["ARTEFACTS"]) / "dashboard" if "ARTEFACTS" in os.environ else tmp_path
    out = root / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    return out


async def shot(page: Page, out: Path, name: str, *, full_page: bool = True) -> None:
    await page.screenshot(path=str(out / f"{name}.png"), full_page=full_page)


async def log_in(page: Page, origin: str) -> None:
    await page.goto(origin + "/devices")
    await expect(page).to_have_url(re.compile(r"/login\?next=/devices$"))
    await submit_login(page, origin)


async def submit_login(page: Page, origin: str) -> None:
    """Log in on the open login page: the devices page follows."""
    await page.fill("input[name=name]", "ops")
    await page.fill("input[name=password]", PASSWORD)
    await page.click("button")
    await expect(page).to_have_url(origin + "/devices")


async def pair_from_the_page(page: Page, f: Fleet, origin: str) -> str:
    """Mint a token on the pairing page and pair a board with its text; the device id."""
    await page.goto(origin + "/pairing")
    await page.fill("#mint input[name=name]", "Front door")
    await page.fill("#mint input[name=site]", "Home")
    await page.click("#mint button")
    await expect(page.locator("#qr svg")).to_be_visible()
    token = await page.input_value("#token")
    row = page.locator("#pending tr", has_text="Front door")
    await expect(row).to_have_count(1)
    device = (await row.locator("td").first.inner_text()).strip()
    await f.pair(device, token)
    await f.agent(device, source="tone:440", sink="null", extra=TELEMETRY)
    await expect(row).to_have_count(0)  # used: no longer pending
    return device


async def test_the_dashboard_in_chromium(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    out = artefacts(tmp_path)
    async with fleet(tmp_path, devices=(HALL,), client_id="browser") as f:
        assert (await user_cli(f, "add", "ops", "--password-file", str(secret)))[0] == 0
        origin = f"https://127.0.0.1:{f.pairing_port}"
        async with launch(f.pki_dir / "https.pem") as browser:
            ctx = await context(browser)
            ctx.set_default_timeout(TIMEOUT_MS)
            page = await ctx.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            await page.goto(origin + "/login")
            await shot(page, out, "login")
            await log_in(page, origin)
            response = await page.reload()
            assert response is not None
            assert "default-src 'self'" in response.headers["content-security-policy"]

            # A board comes online while the list is open: its row appears, no reload.
            await page.evaluate("window.sameDocument = true")
            await f.agent(HALL, source="tone:440", sink="null")
            row = page.locator(f'[data-id="{HALL}"]')
            await expect(row).to_have_attribute("data-state", "online")
            assert await page.evaluate("window.sameDocument") is True

            device = await pair_from_the_page(page, f, origin)
            await shot(page, out, "pairing")

            # The device page: a command and the device's reply; renamed.
            await page.goto(f"{origin}/devices/{device}")
            await expect(page.locator("#summary .state")).to_have_text("online")
            await page.click("[data-cmd=status]")
            await expect(page.locator("#reply")).to_contain_text("status: ok")
            await expect(page.locator("#reply")).to_contain_text(f'"device": "{device}"')
            await page.fill("#cmd-volume input", "40")
            await page.click("#cmd-volume button")
            await expect(page.locator("#reply")).to_contain_text("volume 40")
            await page.fill("#edit input[name=group]", "doors")
            await page.click("#edit button")
            await expect(page.locator("#status")).to_have_text("Saved.")

            # An alert with a clip, live on the alerts page; acknowledged; its clip plays.
            await page.goto(origin + "/alerts")
            await expect(page.locator("#per-day svg")).to_be_visible()
            await page.evaluate("window.sameDocument = true")
            key = ClipKey.load(f.pki_dir)
            alert = make_alert(0)
            alert = dataclasses.replace(
                alert, clip=seal(tone_clip(1.0), key.public, alert.id).to_text()
            )
            assert f.client is not None
            await f.client.publish(topics.device_topic(device, Kind.ALERT), alert.to_json())
            item = page.locator(f'[data-alert="{alert.id}"]')
            await expect(item).to_contain_text("smoke_alarm")
            assert await page.evaluate("window.sameDocument") is True
            await item.locator("button.play").click()
            # Played to its end (the clip is served whole, without ranges: no duration ahead).
            seconds = await item.locator("audio").evaluate(
                "a => new Promise((ok, fail) => { a.onended = () => ok(a.currentTime);"
                " a.onerror = () => fail(a.error.code); })"
            )
            assert 0.8 < seconds < 1.5, seconds
            await item.locator("button.ack").click()
            await expect(page.locator(f'[data-alert="{alert.id}"]')).to_contain_text(
                "acknowledged by ops"
            )
            await page.reload()
            await expect(page.locator("#per-day .legend")).to_contain_text("smoke_alarm")
            await shot(page, out, "alerts")

            await page.goto(f"{origin}/devices/{device}")
            await expect(page.locator("#alerts")).to_contain_text("smoke_alarm")
            await expect(page.locator("#charts path.line")).not_to_have_count(0)
            await shot(page, out, "device")
            await page.goto(origin + "/calls")
            await expect(page.locator("#live-calls")).to_contain_text("No call is up.")
            await shot(page, out, "calls")
            await page.goto(origin + "/devices")
            await expect(page.locator(f'[data-id="{device}"]')).to_contain_text("doors")
            await shot(page, out, "devices")

            # On a phone.
            small = await (await context(browser, phone=True)).new_page()
            await log_in(small, origin)
            await expect(small.locator(f'[data-id="{HALL}"]')).to_be_visible()
            await shot(small, out, "devices-phone", full_page=False)

            # Logged out: the pages are closed again.
            await page.click("#logout")
            await expect(page).to_have_url(origin + "/login")
            await page.goto(origin + "/alerts")
            await expect(page).to_have_url(re.compile(r"/login\?next=/alerts$"))
            # A next page elsewhere ("/\\host" is "//host" to a browser) is not followed.
            await page.goto(origin + "/login?next=%2F%5Cexample.com")
            await submit_login(page, origin)
            assert errors == [], errors
    print(f"dashboard screenshots in {out}")
