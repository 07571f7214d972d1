"""A web page that calls a board from headless Chromium (``cloud_relay.webcall``), for tests.

``CallPage.open(browser, origin)`` serves ``PAGE`` at ``origin + PAGE_PATH`` from the test
itself (Playwright fulfils the request; nothing is asked of the relay, whose dashboard
this does not need), so the page's ``fetch`` calls to the relay's API are same-origin, and
the ``https`` origin makes it a secure context (``getUserMedia`` needs one). The page does
what a dashboard's "Listen"/"Talk" buttons do: an offer with every candidate gathered,
``POST /api/v1/devices/{id}/calls``, the answer applied; then it measures what it hears
with an ``AnalyserNode`` (``peak_hz``) and reads its RTP statistics.

Launch Chromium with ``tools.lab.chromium.launch(relay_cert, args=call_flags(wav))``.
``call_flags``, and why:

- ``--use-fake-ui-for-media-stream``: grant the microphone without a prompt.
- ``--use-fake-device-for-media-stream`` and ``--use-file-for-fake-audio-capture=WAV``: the
  microphone plays ``wav`` (looped) instead of a device.
- ``--autoplay-policy=no-user-gesture-required``: the analyser's ``AudioContext`` runs
  without a click.

Chromium hides host addresses behind mDNS names (``<uuid>.local``), which the board does not
resolve, unless the page may use the microphone: the page asks for it in both modes (a
listen call sends nothing), so its candidates carry plain addresses. Chromium gathers no
loopback candidates: it needs another address (``lab_address``; on a machine with none,
it adds a dummy interface with a documentation address for the test). A board whose ICE
offers only 127.0.0.1 still connects: Chromium's checks from that address to 127.0.0.1
stay on this machine.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from playwright.async_api import Browser, Page, Route

from tools.lab.chromium import context

PAGE_PATH: Final = "/lab/webcall.html"

PAGE: Final = """<!doctype html>
<meta charset="utf-8">
<title>web call</title>
<script>
"use strict";
let call = null;

function gathered(pc, ms) {
  return new Promise(resolve => {
    if (pc.iceGatheringState === "complete") return resolve();
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") resolve();
    });
    setTimeout(resolve, ms);  // bounded: what is gathered by then goes
  });
}

// "Listen" (mode listen: receive only) or "Talk" (mode talk: the microphone too).
window.startCall = async (device, mode, token) => {
  const pc = new RTCPeerConnection();
  // Asked in both modes: a page with the microphone granted gathers plain host addresses.
  const mic = await navigator.mediaDevices.getUserMedia({audio: true});
  if (mode === "talk") {
    for (const track of mic.getTracks()) pc.addTrack(track, mic);
  } else {
    pc.addTransceiver("audio", {direction: "recvonly"});
  }
  const remote = new Promise(resolve => { pc.ontrack = e => resolve(e.track); });
  await pc.setLocalDescription(await pc.createOffer());
  await gathered(pc, 5000);
  const res = await fetch(`/api/v1/devices/${device}/calls`, {
    method: "POST",
    headers: {"Authorization": `Bearer ${token}`, "Content-Type": "application/json"},
    body: JSON.stringify({mode, sdp: pc.localDescription.sdp}),
  });
  const reply = await res.json();
  if (res.status !== 201) { pc.close(); return {status: res.status, reply}; }
  await pc.setRemoteDescription({type: "answer", sdp: reply.sdp});
  call = {pc, id: reply.call, track: await remote};
  return {status: res.status, reply: {call: reply.call, peer: reply.peer}};
};

window.connected = () => call !== null && call.pc.connectionState === "connected";

// The strongest frequency heard over `ms`: AnalyserNode spectra averaged in dB.
window.peakHz = async ms => {
  const stream = new MediaStream([call.track]);
  const sink = new Audio();  // Chromium feeds a remote track to WebAudio only while played
  sink.muted = true;
  sink.srcObject = stream;
  await sink.play();
  const ctx = new AudioContext();
  await ctx.resume();
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 8192;
  analyser.smoothingTimeConstant = 0;
  ctx.createMediaStreamSource(stream).connect(analyser);
  const sum = new Float64Array(analyser.frequencyBinCount);
  const bins = new Float32Array(analyser.frequencyBinCount);
  const snapshots = Math.max(1, Math.floor(ms / 100));
  for (let i = 0; i < snapshots; i++) {
    await new Promise(r => setTimeout(r, 100));
    analyser.getFloatFrequencyData(bins);
    for (let k = 0; k < bins.length; k++) sum[k] += Math.max(bins[k], -200);
  }
  let best = 1;
  for (let k = 2; k < sum.length; k++) if (sum[k] > sum[best]) best = k;
  const hz = best * ctx.sampleRate / analyser.fftSize;
  await ctx.close();
  sink.srcObject = null;
  return {hz, db: sum[best] / snapshots};
};

// The page's RTP statistics (for checks and failure messages).
window.rtpStats = async () => {
  const report = await call.pc.getStats();
  const out = [];
  report.forEach(s => {
    if (s.type === "inbound-rtp" || s.type === "outbound-rtp") {
      const codec = report.get(s.codecId);
      out.push({type: s.type, codec: codec ? codec.mimeType : null,
                packets: s.packetsReceived ?? s.packetsSent, lost: s.packetsLost ?? null,
                level: s.audioLevel ?? null, energy: s.totalAudioEnergy ?? null,
                samples: s.totalSamplesReceived ?? null,
                concealed: s.concealedSamples ?? null});
    }
  });
  return out;
};

window.hangUp = async token => {
  const res = await fetch(`/api/v1/calls/${call.id}`, {
    method: "DELETE", headers: {"Authorization": `Bearer ${token}`},
  });
  call.pc.close();
  return res.status;
};
</script>
"""


def call_flags(wav: Path) -> list[str]:
    """Chromium flags for a call from the lab (module docstring)."""
    return [
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--autoplay-policy=no-user-gesture-required",
    ]


DUMMY_INTERFACE: Final = "edge-lab0"
DUMMY_ADDRESS: Final = "192.0.2.2"


def _routed_address() -> str | None:
    """This machine's IPv4 address towards 192.0.2.1 (what Chromium gathers), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: it only picks a route
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@contextlib.contextmanager
def lab_address() -> Iterator[str]:
    """A non-loopback IPv4 address of this machine for Chromium's candidates: the routed
    one, else a dummy interface made for the block (root, as the NAT labs need)."""
    address = _routed_address()
    if address is not None:
        yield address
        return
    ip = ["ip", "addr", "add", f"{DUMMY_ADDRESS}/24", "dev", DUMMY_INTERFACE]
    subprocess.run(["ip", "link", "add", DUMMY_INTERFACE, "type", "dummy"], check=True)
    try:
        subprocess.run(ip, check=True)
        subprocess.run(["ip", "link", "set", DUMMY_INTERFACE, "up"], check=True)
        yield DUMMY_ADDRESS
    finally:
        subprocess.run(["ip", "link", "del", DUMMY_INTERFACE], check=False)


class CallPage:
    """``PAGE`` open in a fresh browser profile at ``origin``; methods run its functions."""

    def __init__(self, page: Page) -> None:
        self.page = page

    @classmethod
    async def open(cls, browser: Browser, origin: str) -> CallPage:
        page = await (await context(browser)).new_page()

        async def serve(route: Route) -> None:
            await route.fulfill(body=PAGE, content_type="text/html")

        await page.route(origin + PAGE_PATH, serve)
        await page.goto(origin + PAGE_PATH)
        return cls(page)

    async def start(self, device: str, mode: str, token: str) -> dict[str, Any]:
        """``{status, reply}`` of the call request (the answer is applied on 201)."""
        result: dict[str, Any] = await self.page.evaluate(
            "([d, m, t]) => startCall(d, m, t)", [device, mode, token]
        )
        return result

    async def until_connected(self, timeout_s: float) -> None:
        await self.page.wait_for_function("connected()", timeout=timeout_s * 1000)

    async def peak_hz(self, ms: int = 2000) -> tuple[float, float]:
        """The strongest frequency heard over ``ms`` and its level (dBFS)."""
        result: dict[str, float] = await self.page.evaluate("ms => peakHz(ms)", ms)
        return result["hz"], result["db"]

    async def rtp_stats(self) -> list[dict[str, Any]]:
        """The page's inbound and outbound RTP statistics (packets, audio level, energy)."""
        stats: list[dict[str, Any]] = await self.page.evaluate("() => rtpStats()")
        return stats

    async def hang_up(self, token: str) -> int:
        status: int = await self.page.evaluate("t => hangUp(t)", token)
        return status

    async def close(self) -> None:
        await self.page.context.close()
