"""Virtual boards for tests, the demo and benchmarks: real ALSA, real-time pacing, no sound card.

A private PulseAudio daemon holds one null "probe" sink with one channel per
virtual device; each board's microphone and speaker is a mono remap sink onto
its own probe channel. Agents reach them through ALSA ``pulse`` PCMs defined
in a generated ``$HOME/.asoundrc``, so the agent runs its real PyAudio path.
What is played into a microphone and what a speaker plays can be recorded
together, sample-aligned, from the probe's monitor (that is how added latency
is measured).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.audio.format import SAMPLE_RATE

logger = logging.getLogger(__name__)


class VirtualAudioError(RuntimeError):
    """The PulseAudio daemon or one of its tools failed."""


@dataclass(frozen=True, slots=True)
class VirtualBoard:
    """Names of one board's devices: ALSA PCM names, and the Pulse sinks behind them."""

    name: str

    @property
    def mic(self) -> str:
        """ALSA PCM (and Pulse sink) of the microphone: play into the sink, capture the PCM."""
        return f"{self.name}_mic"

    @property
    def speaker(self) -> str:
        """ALSA PCM (and Pulse sink) of the speaker."""
        return f"{self.name}_spk"


class PulseDaemon:
    """A private PulseAudio daemon in ``root`` running ``script`` (lines of a ``.pa`` file).

    ``rescue-streams = no``: unloading a sink kills its streams instead of moving them
    elsewhere, which is what an unplug looks like to a client.
    """

    def __init__(self, root: Path, process: subprocess.Popen[bytes]) -> None:
        self.root = root
        self.socket = root / "pulse.sock"
        self.server = f"unix:{self.socket}"
        """Value for ``PULSE_SERVER`` or a ``pulse`` PCM's ``server``."""
        self.process = process

    @property
    def env(self) -> dict[str, str]:
        """Environment for Pulse clients; HOME is ``root``, where an ``.asoundrc`` may live."""
        return {
            **os.environ,
            "HOME": str(self.root),
            "PULSE_SERVER": self.server,
            "XDG_RUNTIME_DIR": str(self.root),
        }

    def pactl(self, *args: str) -> str:
        args_ = ["pactl", *args]
        done = subprocess.run(args_, check=False, env=self.env, capture_output=True, timeout=10)
        if done.returncode != 0:
            raise VirtualAudioError(f"pactl {' '.join(args)}: {done.stderr.decode().strip()}")
        return done.stdout.decode()

    def play(self, wav: Path, sink: str) -> subprocess.Popen[bytes]:
        """Start playing a WAV file into a sink (a microphone); the caller waits or kills it."""
        return subprocess.Popen(
            ["paplay", f"--device={sink}", "--latency-msec=20", str(wav)],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    @classmethod
    @contextlib.contextmanager
    def running(cls, root: Path, script: list[str], timeout: float = 10.0) -> Iterator[PulseDaemon]:
        """Start the daemon, wait until it answers, and stop it on exit."""
        (root / ".config" / "pulse").mkdir(parents=True, exist_ok=True)
        (root / ".config" / "pulse" / "daemon.conf").write_text("rescue-streams = no\n")
        listen = (
            f"load-module module-native-protocol-unix auth-anonymous=1 socket={root}/pulse.sock"
        )
        (root / "pulse.pa").write_text("\n".join([listen, *script]) + "\n")
        env = {**os.environ, "HOME": str(root), "XDG_RUNTIME_DIR": str(root)}
        env.pop("PULSE_SERVER", None)
        with (root / "pulse.log").open("wb") as log:
            process = subprocess.Popen(
                ["pulseaudio", "-n", "-F", str(root / "pulse.pa"), "--daemonize=no",
                 "--exit-idle-time=-1", "--log-target=stderr"],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            daemon = cls(root, process)
            try:
                daemon._wait_ready(time.monotonic() + timeout)
                yield daemon
            finally:
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.root / "pulse.log").read_text(errors="replace")
                raise VirtualAudioError(f"pulseaudio exited with {self.process.returncode}: {log}")
            if self.socket.exists():
                with contextlib.suppress(VirtualAudioError):
                    self.pactl("info")
                    return
            time.sleep(0.05)
        raise VirtualAudioError("pulseaudio not ready in time")


class VirtualAudio:
    """Virtual boards on a private PulseAudio daemon; ``with VirtualAudio.start(...)``."""

    def __init__(self, daemon: PulseDaemon, boards: tuple[VirtualBoard, ...]) -> None:
        self.daemon = daemon
        self.boards = boards

    @property
    def devices(self) -> list[str]:
        return [d for b in self.boards for d in (b.mic, b.speaker)]

    @property
    def _channel_map(self) -> str:
        return ",".join(f"aux{i}" for i in range(len(self.devices)))

    @property
    def env(self) -> dict[str, str]:
        """Environment for agents and Pulse tools: HOME holds the generated .asoundrc, and
        ALSA reads a board-like configuration (see ``_board_alsa_conf``)."""
        return {**self.daemon.env, "ALSA_CONFIG_PATH": str(self.daemon.root / "alsa.conf")}

    @classmethod
    @contextlib.contextmanager
    def start(
        cls, names: tuple[str, ...] = ("a", "b"), timeout: float = 10.0
    ) -> Iterator[VirtualAudio]:
        root = Path(tempfile.mkdtemp(prefix="edge-vaudio-"))
        boards = tuple(VirtualBoard(n) for n in names)
        devices = [d for b in boards for d in (b.mic, b.speaker)]
        channels = ",".join(f"aux{i}" for i in range(len(devices)))
        script = [
            f"load-module module-null-sink sink_name=probe format=s16le rate={SAMPLE_RATE} "
            f"channels={len(devices)} channel_map={channels}",
            *(
                f"load-module module-remap-sink sink_name={dev} master=probe channels=1 "
                f"master_channel_map=aux{i} channel_map=mono remix=no"
                for i, dev in enumerate(devices)
            ),
        ]
        pcms = [f'pcm.{b.mic} {{ type pulse device "{b.mic}.monitor" }}' for b in boards]
        pcms += [f'pcm.{b.speaker} {{ type pulse device "{b.speaker}" }}' for b in boards]
        (root / ".asoundrc").write_text("\n".join(pcms) + "\n")
        (root / "alsa.conf").write_text(_board_alsa_conf(SYSTEM_ALSA_CONF.read_text()))
        keeper: subprocess.Popen[bytes] | None = None
        try:
            with PulseDaemon.running(root, script, timeout) as daemon:
                self = cls(daemon, boards)
                # An idle null sink renders in blocks of up to 2 s, so new streams wait that
                # long for their first audio. A permanent low-latency reader keeps it at 10 ms.
                keeper = subprocess.Popen(
                    ["parec", "--device=probe.monitor", "--latency-msec=10", "--raw"],
                    env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                self._wait_ticking(deadline=time.monotonic() + timeout)
                yield self
        finally:
            if keeper is not None:
                keeper.kill()
                keeper.wait()
            shutil.rmtree(root, ignore_errors=True)

    def _wait_ticking(self, deadline: float) -> None:
        """Block until the probe delivers audio to a new reader (the sink left its 2 s blocks)."""
        while time.monotonic() < deadline:
            with subprocess.Popen(
                ["parec", "--device=probe.monitor", "--latency-msec=10", "--raw"],
                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            ) as proc:  # fmt: skip
                assert proc.stdout is not None
                ready, _, _ = select.select([proc.stdout], [], [], 0.5)
                proc.kill()
            if ready:
                return
        raise VirtualAudioError("the probe sink delivers no audio")

    def play(self, wav: Path, sink: str) -> subprocess.Popen[bytes]:
        """Start playing a WAV file into a sink (a microphone); the caller waits or kills it."""
        return self.daemon.play(wav, sink)

    @contextlib.contextmanager
    def echo(self, board: str, latency_ms: int = 40) -> Iterator[None]:
        """While in the block, ``board``'s speaker plays into its own microphone
        (``module-loopback``, ``latency_ms`` late, at unit gain, clock drift and all): a
        speaker next to a microphone."""
        b = next(x for x in self.boards if x.name == board)
        module = self.daemon.pactl(
            "load-module", "module-loopback", f"source={b.speaker}.monitor", f"sink={b.mic}",
            f"latency_msec={latency_ms}", "source_dont_move=true", "sink_dont_move=true",
        ).strip()  # fmt: skip
        try:
            yield
        finally:
            self.daemon.pactl("unload-module", module)

    def record_probe(self, seconds: float) -> np.ndarray:
        """Record every virtual device at once, sample-aligned: shape (samples, len(devices))."""
        channels = len(self.devices)
        proc = subprocess.Popen(
            ["parec", "--device=probe.monitor", "--format=s16le", f"--rate={SAMPLE_RATE}",
             f"--channels={channels}", f"--channel-map={self._channel_map}",
             "--latency-msec=20", "--raw"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        # parec only flushes to a pipe reliably, so read it while it records.
        try:
            out, _ = proc.communicate(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.terminate()
            out, _ = proc.communicate(timeout=10)
        data = np.frombuffer(out, "<i2")
        return data[: len(data) // channels * channels].reshape(-1, channels)

    def channel(self, recording: np.ndarray, device: str) -> np.ndarray:
        return recording[:, self.devices.index(device)]


SYSTEM_ALSA_CONF = Path("/usr/share/alsa/alsa.conf")
_LOAD_FILES = re.compile(r"(@hooks \[\s*\{\s*func load\s*files \[).*?(\n\t\t\]\n)", re.S)


def _board_alsa_conf(system: str) -> str:
    """ALSA's own alsa.conf, loading only ``~/.asoundrc`` on top.

    This machine has every ALSA plugin package installed (a52 linked to ffmpeg,
    jack, speex, ...); PortAudio probes each PCM they define and maps their
    libraries, ~19 MB that a board with just its sound card never loads. The
    virtual boards see only their own PCMs, as a board sees only its card's.
    """
    lean, count = _LOAD_FILES.subn(r'\1\n\t\t\t"~/.asoundrc"\2', system, count=1)
    if count != 1:
        raise VirtualAudioError("unexpected alsa.conf layout: cannot limit what ALSA loads")
    return lean


def speech_wav(path: Path, text: str, rate: int = SAMPLE_RATE, voice: str = "en") -> Path:
    """Synthesise speech with espeak-ng (``voice``, e.g. ``en-us+f3``) and convert it with
    sox to mono int16 at ``rate``."""
    raw = path.with_suffix(".espeak.wav")
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", "150", "-w", str(raw), text], check=True, timeout=60
    )
    # -R: sox dithers with a random seed unless told to repeat itself; the same text must
    # give the same samples, or a test near a threshold passes or fails by chance.
    argv = ["sox", "-R", str(raw), "-r", str(rate), "-c", "1", "-b", "16", str(path)]
    subprocess.run(argv, check=True, timeout=60)
    raw.unlink()
    return path


def write_wav(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE, channels: int = 1) -> Path:
    """Write a 16-bit WAV; ``samples`` is (n,) or (n, channels). Returns ``path``."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(samples).astype("<i2").tobytes())
    return path


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A 16-bit WAV's samples (interleaved if multichannel) and its rate."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit samples")
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.int16)
        return data, w.getframerate()
