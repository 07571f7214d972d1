"""The latency floor of a pair of audio devices: a bare full-duplex PortAudio copy.

``python -m tools.lab.passthrough IN OUT SECONDS`` copies each 20 ms capture
buffer of the ALSA PCM ``IN`` straight into the playback buffer of ``OUT`` in
PortAudio's own callback: no queue, no codec, no network. The media benchmark
measures this path with the same clicks as a call, so the delay that the audio
devices (here, PulseAudio) add by themselves can be told apart from the delay
that the agent's pipeline adds. Run it with the virtual boards' environment.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import pyaudio

from agent.audio.format import CHANNELS, FRAME_SAMPLES, SAMPLE_RATE


def _index(pa: pyaudio.PyAudio, name: str) -> int:
    for i in range(pa.get_device_count()):
        if pa.get_device_info_by_index(i)["name"] == name:
            return i
    raise SystemExit(f"no audio device named {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("seconds", type=float)
    args = parser.parse_args()
    pa = pyaudio.PyAudio()
    try:

        def copy(data: bytes | None, frames: int, _time: Any, _status: int) -> tuple[bytes, int]:
            return data or bytes(2 * frames), pyaudio.paContinue

        stream = pa.open(
            rate=SAMPLE_RATE, channels=CHANNELS, format=pyaudio.paInt16, input=True, output=True,
            input_device_index=_index(pa, args.input), output_device_index=_index(pa, args.output),
            frames_per_buffer=FRAME_SAMPLES, stream_callback=copy,
        )  # fmt: skip
        time.sleep(args.seconds)
        stream.close()
    finally:
        pa.terminate()


if __name__ == "__main__":
    main()
