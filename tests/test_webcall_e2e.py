"""Calls from the browser to a board through the real relay (``cloud_relay.webcall``).

The relay (``edge-intercom-relay serve`` with its mosquitto) and a paired board
(``edge-intercom-agent run`` playing a 700 Hz tone, recording what it hears into a WAV)
run as processes. The far end is a WebRTC stack nobody here wrote: aiortc (fast, in this
process, on the API with tokens from ``edge-intercom-relay token new``) and headless
Chromium (its own ICE, DTLS-SRTP and Opus) driving the dashboard itself: an admin logged
in clicks Listen and Talk on the board's device page (``cloud_relay/static/talk.js``).
Each side must hear the other's tone: checked on the received audio (the board's WAV, an
``AnalyserNode`` on the page's ``<audio>``), not on a "connected" state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import wave
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from playwright.async_api import Browser, Page, Response, expect
from test_api import Client, client
from test_dashboard_api import PASSWORD, user_cli
from test_dashboard_browser import artefacts, log_in, shot
from test_edge_clip_e2e import relay_cli

from agent.audio.format import SAMPLE_RATE
from cloud_relay.store import Store
from tools.lab.aiortc_peer import AiortcPeer
from tools.lab.chromium import context, launch
from tools.lab.fleet import WAIT, Fleet, fleet
from tools.lab.turn import Coturn, lab_networks
from tools.lab.virtual_audio import write_wav
from tools.lab.webcall_page import (
    AUTOPLAY,
    call_flags,
    element_peak_hz,
    lab_address,
    offered_candidates,
)

BOARD = "door-a"
BOARD_HZ = 700.0
BROWSER_HZ = 440.0
LISTENERS = 'listen_allowed = ["web.ops"]'
"""The board's policy: only ``ops`` listens in; every web peer's talk call is answered at once."""


@dataclass
class Lab:
    fleet: Fleet
    api: Client
    ops: str
    """API token of ``ops`` (may listen)."""
    guest: str
    """API token of ``guest`` (may talk, may not listen)."""

    @property
    def origin(self) -> str:
        return f"https://127.0.0.1:{self.fleet.pairing_port}"

    async def post_call(
        self, mode: str, sdp: str, token: str | None, device: str = BOARD
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.api.http.post(
            f"{self.origin}/api/v1/devices/{device}/calls",
            json={"mode": mode, "sdp": sdp},
            headers=headers,
        ) as response:
            return response.status, await response.json()

    async def delete_call(self, call: str, token: str) -> int:
        status, _, _ = await self.api.call("DELETE", f"/api/v1/calls/{call}", token)
        return status

    async def recorded_calls(self) -> list[tuple[str, str, str, str | None]]:
        store = await Store.open(f"sqlite:///{self.fleet.db_path}")
        try:
            calls = await store.run(store.calls)
        finally:
            await store.close()
        return [(c.caller, c.callee, c.mode, c.end_reason) for c in calls]


async def _token(f: Fleet, name: str) -> str:
    token: str = json.loads(await relay_cli(f, "token", "new", "--name", name, "--json"))["token"]
    return token


@contextlib.asynccontextmanager
async def lab(root: Path, ice: str = "", relay_extra: str = "") -> AsyncIterator[Lab]:
    """The relay (``relay_extra``: more of its config), two API tokens and the board, idle
    and online."""
    async with fleet(root, devices=(BOARD,), client_id="webcall", relay_extra=relay_extra) as f:
        ops, guest = await _token(f, "ops"), await _token(f, "guest")
        await f.agent(BOARD, source=f"tone:{BOARD_HZ:g}", sink=f"wav:{root / BOARD}.wav",
                      auto_answer=["web.*"], extra=LISTENERS, ice=ice)  # fmt: skip
        await f.until_status(BOARD, lambda s: s["phase"] == "idle", "the board up")
        await f.until_online(BOARD)
        url = f"https://127.0.0.1:{f.pairing_port}"
        async with client(url, f.pki_dir / "ca.pem") as api:
            yield Lab(f, api, ops, guest)


def peak_hz(samples: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    x = samples.astype(float)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[int(np.argmax(spectrum))])


def heard_by_board(lab_: Lab) -> float:
    """The main frequency of what the board played (its WAV sink), once it has stopped."""
    with wave.open(str(lab_.fleet.root / f"{BOARD}.wav"), "rb") as wav:
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
        rate = wav.getframerate()
    assert len(samples) > rate, f"the board played only {len(samples)} samples"
    return peak_hz(samples, rate)


async def _until_heard(peer: AiortcPeer, seconds: float) -> np.ndarray:
    """The last ``seconds`` of what ``peer`` received, once it has that much."""
    async with asyncio.timeout(WAIT):
        while len(peer.samples()) < seconds * SAMPLE_RATE:
            await asyncio.sleep(0.1)
    return peer.samples()[-int(seconds * SAMPLE_RATE) :]


async def test_aiortc_listens_and_talks_to_a_board_through_the_relay(tmp_path: Path) -> None:
    async with lab(tmp_path) as lab_:
        f = lab_.fleet
        # Listen: the board's tone reaches the browser; nothing goes back.
        listener = AiortcPeer(BROWSER_HZ)
        try:
            status, reply = await lab_.post_call("listen", await listener.offer(), lab_.ops)
            assert status == 201, reply
            assert reply["peer"] == "web.ops"
            await listener.accept(reply["sdp"])
            heard = await _until_heard(listener, 1.0)
            assert abs(peak_hz(heard) - BOARD_HZ) < 5.0, f.logs()
            board = await f.until_status(
                BOARD, lambda s: s["phase"] == "active", "the board in the listen call"
            )
            assert board["peer"] == "web.ops" and board["role"] == "callee"
            assert await lab_.delete_call(reply["call"], lab_.ops) == 204
            assert await lab_.delete_call(reply["call"], lab_.ops) == 404
        finally:
            await listener.close()
        await f.until_status(BOARD, lambda s: s["phase"] in ("idle", "ended"), "listen over")

        # Talk: both tones cross.
        talker = AiortcPeer(BROWSER_HZ)
        try:
            status, reply = await lab_.post_call("talk", await talker.offer(), lab_.guest)
            assert status == 201, reply
            await talker.accept(reply["sdp"])
            heard = await _until_heard(talker, 1.0)
            assert abs(peak_hz(heard) - BOARD_HZ) < 5.0, f.logs()
            await f.until_status(
                BOARD,
                lambda s: (s["media"] or {}).get("packets_received", 0) >= 100,
                "2 s of the browser's audio at the board",
            )
            # Only the caller may hang up its call.
            assert await lab_.delete_call(reply["call"], lab_.ops) == 404
            assert await lab_.delete_call(reply["call"], lab_.guest) == 204
        finally:
            await talker.close()
        ended = await f.until_status(
            BOARD,
            lambda s: (s["last_call"] or {}).get("call_id") == reply["call"],
            "the talk call over",
        )
        assert ended["last_call"]["reason"] == "remote-hangup"
        await f.stop_agent(BOARD)
        assert abs(heard_by_board(lab_) - BROWSER_HZ) < 5.0, f.logs()
        calls = await lab_.recorded_calls()
        assert [c[:3] for c in calls] == [
            ("web.ops", BOARD, "listen"),
            ("web.guest", BOARD, "normal"),
        ], calls
        assert all(c[3] is not None for c in calls), calls


async def test_refusals_come_back_with_their_reason(tmp_path: Path) -> None:
    async with lab(tmp_path) as lab_:
        peer = AiortcPeer(BROWSER_HZ)
        try:
            offer = await peer.offer()
            # Without a token: 401, and nothing reaches the board.
            status, _ = await lab_.post_call("listen", offer, None)
            assert status == 401
            # The board's policy: guest may not listen in.
            status, reply = await lab_.post_call("listen", offer, lab_.guest)
            assert status == 409, reply
            assert (reply["reason"], reply["detail"]) == ("policy-refused", "listen-not-allowed")
            # A device the relay does not know: the relay refuses for it.
            status, reply = await lab_.post_call("talk", offer, lab_.ops, device="door-nobody")
            assert status == 409, reply
            assert (reply["reason"], reply["detail"]) == ("unreachable", "unknown")
            # Not an SDP: 400 before anything is sent.
            status, reply = await lab_.post_call("talk", "v=0\r\nbogus", lab_.ops)
            assert status == 400, reply
            # The page's ICE servers: none from a relay without TURN; nothing without a token.
            status, servers, _ = await lab_.api.call("GET", "/api/v1/ice-servers", lab_.ops)
            assert (status, servers) == (200, {"iceServers": [], "expires": None})
            assert (await lab_.api.call("GET", "/api/v1/ice-servers"))[0] == 401
        finally:
            await peer.close()


@pytest.fixture
def chromium_address() -> Iterator[str]:
    """Chromium gathers no loopback candidates: it needs another address."""
    with lab_address() as address:
        yield address


@dataclass
class Dashboard:
    """The device page of ``BOARD``, logged in as the admin ``ops`` (web peer ``web.ops``)."""

    page: Page
    errors: list[str]

    async def click(self, button: str) -> tuple[str, dict[str, list[tuple[str, int]]]]:
        """Click Listen or Talk; the call id the relay answered with and the candidates the
        page offered, once the page's call is connected."""

        def placed(r: Response) -> bool:
            return r.request.method == "POST" and r.url.endswith(f"/devices/{BOARD}/calls")

        async with self.page.expect_response(placed) as info:
            await self.page.click(button)
        response = await info.value
        reply = await response.json()
        assert response.status == 201, reply
        sent = response.request.post_data_json
        assert sent is not None
        offer = sent["sdp"]
        await expect(self.page.locator("#talk")).to_have_attribute("data-state", "connected")
        return reply["call"], offered_candidates(offer)

    async def end(self) -> None:
        await self.page.click("#hangup-web")
        await expect(self.page.locator("#status")).to_have_text("Browser call ended.")
        await expect(self.page.locator("#listen")).to_be_enabled()

    async def call_listed(self, call: str, text: str) -> None:
        """The device page's list of calls (updated live) shows ``call`` with ``text``."""
        await expect(self.page.locator(f'#calls [data-call="{call}"]')).to_contain_text(text)


@contextlib.asynccontextmanager
async def dashboard(lab_: Lab, browser: Browser) -> AsyncIterator[Dashboard]:
    secret = lab_.fleet.root / "password"
    secret.write_text(PASSWORD + "\n")
    assert (await user_cli(lab_.fleet, "add", "ops", "--password-file", str(secret)))[0] == 0
    ctx = await context(browser)
    ctx.set_default_timeout(WAIT * 1000)
    try:
        page = await ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        await log_in(page, lab_.origin)
        await page.goto(f"{lab_.origin}/devices/{BOARD}")
        await expect(page.locator("#summary .state")).to_have_text("online")
        await expect(page.locator("#talk")).to_be_visible()
        yield Dashboard(page, errors)
    finally:
        await ctx.close()


def _mdns(offered: dict[str, list[tuple[str, int]]]) -> list[str]:
    """The offered host candidates named by mDNS (``<uuid>.local``), not by address."""
    return [host for host, _ in offered.get("host", []) if host.endswith(".local")]


def _heard(hz: float, db: float) -> bool:
    return abs(hz - BOARD_HZ) < 10.0 and db > -60.0


@pytest.mark.usefixtures("chromium_address")
async def test_the_dashboards_talk_and_listen_buttons_carry_audio(tmp_path: Path) -> None:
    """The device page's Talk: the page's ``<audio>`` plays the board's 700 Hz (an
    AnalyserNode on it), the board hears the fake microphone's 440 Hz; End hangs up and the
    call is listed with its end reason. Listen: the board's tone reaches the page, nothing
    goes back. No TURN here: the page asks for the microphone in both modes, so its host
    candidates are plain addresses (not mDNS names the board cannot resolve)."""
    t = np.arange(10 * SAMPLE_RATE)
    mic = write_wav(tmp_path / "mic.wav", 8000 * np.sin(2 * np.pi * BROWSER_HZ * t / SAMPLE_RATE))
    out = artefacts(tmp_path)
    async with lab(tmp_path) as lab_:
        f = lab_.fleet
        async with (
            launch(f.pki_dir / "https.pem", args=call_flags(mic)) as browser,
            dashboard(lab_, browser) as dash,
        ):
            page = dash.page
            talk, offered = await dash.click("#speak")
            assert offered.get("host") and not _mdns(offered), offered
            await expect(page.locator("#status")).to_have_text("Talking with the board.")
            hz, db = await element_peak_hz(page.locator("#remote"))
            assert _heard(hz, db), (hz, db, f.logs())
            board = await f.until_status(
                BOARD,
                lambda s: (s["media"] or {}).get("packets_received", 0) >= 100,
                "2 s of Chromium's audio at the board",
            )
            assert (board["peer"], board["call_id"]) == ("web.ops", talk), board
            await dash.call_listed(talk, "live")
            await shot(page, out, "device-call")
            await dash.end()
            ended = await f.until_status(
                BOARD,
                lambda s: (s["last_call"] or {}).get("call_id") == talk,
                "the talk call over",
            )
            assert ended["phase"] in ("idle", "ended"), ended
            assert ended["last_call"]["reason"] == "remote-hangup", ended
            await dash.call_listed(talk, "ended: hangup")

            listen, offered = await dash.click("#listen")
            assert not _mdns(offered), offered
            await expect(page.locator("#status")).to_have_text("Listening to the board.")
            hz, db = await element_peak_hz(page.locator("#remote"))
            assert _heard(hz, db), (hz, db, f.logs())
            board = await f.until_status(
                BOARD, lambda s: s["call_id"] == listen and s["phase"] == "active",
                "the board in the listen call",
            )  # fmt: skip
            assert board["mode"] == "listen" and board["role"] == "callee", board
            assert (board["media"] or {}).get("packets_received", 0) == 0, board
            await dash.end()
            await f.until_status(
                BOARD,
                lambda s: (s["last_call"] or {}).get("call_id") == listen,
                "the listen call over",
            )
            await dash.call_listed(listen, "ended: hangup")
            assert dash.errors == [], dash.errors
        await f.stop_agent(BOARD)
        assert abs(heard_by_board(lab_) - BROWSER_HZ) < 5.0, f.logs()
        calls = await lab_.recorded_calls()
        assert [c[:3] for c in calls] == [
            ("web.ops", BOARD, "normal"),
            ("web.ops", BOARD, "listen"),
        ], calls
        assert all(c[3] is not None for c in calls), calls
    print(f"device page during a browser call: {out / 'device-call.png'}")


async def test_listen_needs_no_microphone_with_turn(tmp_path: Path, chromium_address: str) -> None:
    """With TURN on the relay, the page gets credentials minted for its call
    (``GET /api/v1/ice-servers``) and Listen asks for no microphone: Chromium (launched
    with neither a fake microphone nor leave to use one) hides its host addresses behind
    mDNS names, which the board cannot resolve, and the candidates from the TURN server
    (server-reflexive, relayed) carry the call."""
    # The board's host candidate is 127.0.0.1: coturn may relay to it too.
    peers = (*lab_networks((chromium_address,)), "127.0.0.1")
    with Coturn.running(listen=(chromium_address,), allowed_peers=peers) as turn:
        secret = tmp_path / "turn-secret"
        secret.write_text(turn.secret)
        secret.chmod(0o600)
        url = f"turn:{chromium_address}:{turn.port}?transport=udp"
        extra = f'[turn]\nurls = ["{url}"]\nsecret_file = "{secret}"\n'
        async with lab(tmp_path, relay_extra=extra) as lab_:
            status, servers, _ = await lab_.api.call("GET", "/api/v1/ice-servers", lab_.guest)
            assert status == 200, servers
            [server] = servers["iceServers"]
            assert server["urls"] == [url] and server["credential"], servers
            assert turn.secret not in json.dumps(servers)
            async with (
                launch(lab_.fleet.pki_dir / "https.pem", args=[AUTOPLAY]) as browser,
                dashboard(lab_, browser) as dash,
            ):
                call, offered = await dash.click("#listen")
                hosts = offered.get("host", [])
                assert hosts and len(_mdns(offered)) == len(hosts), offered
                assert offered.get("relay"), offered
                hz, db = await element_peak_hz(dash.page.locator("#remote"))
                assert _heard(hz, db), (hz, db, lab_.fleet.logs(), turn.log_tail())
                # The board reached the page at an address the TURN server told it: its
                # server-reflexive one (here its own address: no NAT) or its relayed one. On
                # this one machine the answers come from 127.0.0.1: a prflx on that port.
                log = lab_.fleet.log(BOARD)
                connected = re.findall(r"ICE connected via .* -> \w+ [\d.]+:(\d+)", log)
                served = {port for kind in ("srflx", "relay") for _, port in offered.get(kind, [])}
                assert connected and int(connected[-1]) in served, (offered, log)
                await dash.end()
                await dash.call_listed(call, "ended: hangup")
                assert dash.errors == [], dash.errors
