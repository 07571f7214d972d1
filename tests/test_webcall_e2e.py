"""Calls from the browser to a board through the real relay (``cloud_relay.webcall``).

The relay (``edge-intercom-relay serve`` with its mosquitto) and a paired board
(``edge-intercom-agent run`` playing a 700 Hz tone, recording what it hears into a WAV)
run as processes; API tokens come from ``edge-intercom-relay token new``. The far end is
a WebRTC stack nobody here wrote: aiortc (fast, in this process) and headless Chromium
(its own ICE, DTLS-SRTP and Opus; ``tools.lab.browser``). Each side must hear the other's
tone: checked on the received audio, not on a "connected" state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import wave
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_api import Client, client
from test_edge_clip_e2e import relay_cli

from agent.audio.format import SAMPLE_RATE
from cloud_relay.store import Store
from tools.lab.aiortc_peer import AiortcPeer
from tools.lab.chromium import launch
from tools.lab.fleet import WAIT, Fleet, fleet
from tools.lab.virtual_audio import write_wav
from tools.lab.webcall_page import CallPage, call_flags, lab_address

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
async def lab(root: Path, ice: str = "") -> AsyncIterator[Lab]:
    """The relay, two API tokens and the board, idle and online."""
    async with fleet(root, devices=(BOARD,), client_id="webcall") as f:
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
        finally:
            await peer.close()


@pytest.fixture
def chromium_address() -> Iterator[str]:
    """Chromium gathers no loopback candidates: it needs another address."""
    with lab_address() as address:
        yield address


@pytest.mark.usefixtures("chromium_address")
async def test_chromium_talks_with_a_board(tmp_path: Path) -> None:
    """The browser's fake microphone plays 440 Hz; its AnalyserNode must hear the board's
    700 Hz, and the board's speaker the browser's 440 Hz."""
    t = np.arange(10 * SAMPLE_RATE)
    mic = write_wav(tmp_path / "mic.wav", 8000 * np.sin(2 * np.pi * BROWSER_HZ * t / SAMPLE_RATE))
    async with lab(tmp_path) as lab_:
        f = lab_.fleet
        async with launch(f.pki_dir / "https.pem", args=call_flags(mic)) as browser:
            page = await CallPage.open(browser, lab_.origin)
            try:
                result = await page.start(BOARD, "talk", lab_.ops)
                assert result["status"] == 201, result
                await page.until_connected(WAIT)
                hz, db = await page.peak_hz(2000)
                stats = await page.rtp_stats()
                assert abs(hz - BOARD_HZ) < 10.0 and db > -60.0, (hz, db, stats, f.logs())
                await f.until_status(
                    BOARD,
                    lambda s: (s["media"] or {}).get("packets_received", 0) >= 100,
                    "2 s of Chromium's audio at the board",
                )
                await page.page.screenshot(path=str(tmp_path / "webcall.png"))
                assert await page.hang_up(lab_.ops) == 204
            finally:
                await page.close()
        await f.until_status(BOARD, lambda s: s["phase"] in ("idle", "ended"), "call over")
        await f.stop_agent(BOARD)
        assert abs(heard_by_board(lab_) - BROWSER_HZ) < 5.0, f.logs()
