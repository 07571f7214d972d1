"""Around headless Chromium for tests of the dashboard's browser calls (the device page's
Listen and Talk, ``cloud_relay/static/talk.js``; ``cloud_relay.webcall`` on the relay).

The page under test is the dashboard's own: nothing here re-implements it. What is here:

- ``call_flags(wav)``: Chromium flags for a call from the lab. ``--use-fake-ui-for-media-stream``
  grants the microphone without a prompt; ``--use-fake-device-for-media-stream`` and
  ``--use-file-for-fake-audio-capture=WAV`` make the microphone play ``wav`` (looped);
  ``AUTOPLAY`` (alone: a browser with no microphone at all) lets the page's ``<audio>``
  element and the analyser's ``AudioContext`` run without a click.
- ``lab_address()``: Chromium gathers no loopback candidates, so it needs another address
  (on a machine with none, a dummy interface with a documentation address for the test).
  A board whose ICE offers only 127.0.0.1 still connects: Chromium's checks from that
  address to 127.0.0.1 stay on this machine.
- ``element_peak_hz(audio)``: what an ``<audio>`` element plays (its ``srcObject``), measured in
  the page with an ``AnalyserNode``: the strongest frequency and its level.
- ``offered_candidates(sdp)``: the candidates of an offer the page sent, by type.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from playwright.async_api import Locator

AUTOPLAY: Final = "--autoplay-policy=no-user-gesture-required"

PEAK_HZ_JS: Final = """async (audio, ms) => {
  // The strongest frequency the element plays over ms: AnalyserNode spectra averaged in dB.
  const stream = audio.srcObject;
  if (!stream) throw new Error("the audio element has no stream");
  // Chromium feeds a remote track to WebAudio only while an element plays it.
  if (audio.paused) await audio.play();
  const ctx = new AudioContext();
  await ctx.resume();
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 8192;
  analyser.smoothingTimeConstant = 0;
  const source = ctx.createMediaStreamSource(stream);
  source.connect(analyser);
  const sum = new Float64Array(analyser.frequencyBinCount);
  const bins = new Float32Array(analyser.frequencyBinCount);
  const snapshots = Math.max(1, Math.floor(ms / 100));
  for (let i = 0; i < snapshots; i++) {
    await new Promise((r) => setTimeout(r, 100));
    analyser.getFloatFrequencyData(bins);
    for (let k = 0; k < bins.length; k++) sum[k] += Math.max(bins[k], -200);
  }
  let best = 1;
  for (let k = 2; k < sum.length; k++) if (sum[k] > sum[best]) best = k;
  const hz = (best * ctx.sampleRate) / analyser.fftSize;
  source.disconnect();
  await ctx.close();
  return { hz, db: sum[best] / snapshots };
}"""


def call_flags(wav: Path) -> list[str]:
    """Chromium flags for a call from the lab with ``wav`` as the microphone (module
    docstring)."""
    return [
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        AUTOPLAY,
    ]


async def element_peak_hz(audio: Locator, ms: int = 2000) -> tuple[float, float]:
    """The strongest frequency an ``<audio>`` element plays over ``ms`` and its level
    (dBFS), measured in the page."""
    result: dict[str, float] = await audio.evaluate(PEAK_HZ_JS, ms)
    return result["hz"], result["db"]


def offered_candidates(sdp: str) -> dict[str, list[tuple[str, int]]]:
    """The (address, port) of an SDP's candidates by type (``host``, ``srflx``, ``relay``)."""
    found: dict[str, list[tuple[str, int]]] = {}
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            words = line.split()
            kind = words[words.index("typ") + 1]
            found.setdefault(kind, []).append((words[4], int(words[5])))
    return found


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
