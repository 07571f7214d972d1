"""Real ALSA for tests without a sound card: generated ``.asoundrc`` PCMs and PulseAudio.

PyAudio lists the PCMs defined in ``$HOME/.asoundrc``, read when PortAudio
initialises, so a test points ``HOME`` at a temporary directory (fixture
``alsa_home``), writes PCMs there with ``write_asoundrc`` and only then opens
devices. Two kinds of PCM:

* unpaced (``file_capture_pcm``/``file_playback_pcm``): ALSA's ``file`` plugin
  over the ``null`` PCM. Capture reads a raw s16le file, playback writes one;
  the ``null`` slave has no clock, so callbacks come as fast as the CPU allows.
* paced (``PulseServer``): a private PulseAudio daemon with one null sink per
  virtual device. A ``pulse`` PCM on ``SINK.monitor`` is a microphone that
  hears whatever is played into ``SINK``; a ``pulse`` PCM on ``SINK`` is a
  speaker whose output is recorded from ``SINK.monitor``. The first capture
  callback can take ~2 s to arrive.

Audio helpers (``tone``, ``noise``, ``dominant_frequency``, WAV and raw I/O)
are here too, so the tests that use these devices need nothing else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import wave
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent.audio.format import SAMPLE_RATE

Samples = npt.NDArray[np.int16]

# -- ALSA configuration -----------------------------------------------------------------------


def write_asoundrc(home: Path, pcms: Mapping[str, str]) -> Path:
    """Write ``home/.asoundrc`` defining ``pcm.NAME { BODY }`` for each entry; returns it.

    Overwrites any previous file: PortAudio instances created afterwards see the
    new set of devices (already initialised ones keep the old list).
    """
    text = "".join(f"pcm.{name} {{\n{body}}}\n" for name, body in pcms.items())
    path = home / ".asoundrc"
    path.write_text(text)
    return path


def file_capture_pcm(infile: Path) -> str:
    """Body of an unpaced capture PCM that reads raw s16le samples from ``infile``.

    Opened at any rate and mono, it yields the file's samples from the start.
    Past the end of the file the data is undefined.
    """
    return (
        '    type file\n    slave.pcm "null"\n    file "/dev/null"\n'
        f'    infile "{infile}"\n    format "raw"\n'
    )


def file_playback_pcm(outfile: Path) -> str:
    """Body of an unpaced playback PCM that writes every buffer, raw s16le, to ``outfile``."""
    return f'    type file\n    slave.pcm "null"\n    file "{outfile}"\n    format "raw"\n'


def pulse_pcm(device: str, server: str) -> str:
    """Body of a PCM on a PulseAudio sink (playback) or source such as ``SINK.monitor``."""
    return f'    type pulse\n    device "{device}"\n    server "{server}"\n'


# -- signals ----------------------------------------------------------------------------------


def tone(
    frequency: float, seconds: float, rate: int = SAMPLE_RATE, amplitude: float = 0.5
) -> Samples:
    """A sine wave, int16, ``amplitude`` as a fraction of full scale."""
    t = np.arange(round(seconds * rate)) / rate
    wave_: npt.NDArray[np.float64] = amplitude * 32767 * np.sin(2 * np.pi * frequency * t)
    return wave_.round().astype(np.int16)


def noise(samples: int, seed: int = 0, amplitude: float = 0.2) -> Samples:
    """Reproducible white noise with no silent stretch (unambiguous to align)."""
    x = np.random.default_rng(seed).standard_normal(samples) * amplitude * 32767
    return np.clip(x, -32767, 32767).astype(np.int16)


def dominant_frequency(samples: Samples, rate: int = SAMPLE_RATE) -> float:
    """The strongest frequency in Hz (Hann window, parabolic interpolation between bins)."""
    x = samples.astype(np.float64)
    spectrum = np.abs(np.fft.rfft((x - x.mean()) * np.hanning(len(x))))
    k = int(np.argmax(spectrum[1:-1])) + 1
    a, b, c = np.log(spectrum[k - 1 : k + 2] + 1e-12)
    offset = 0.5 * (a - c) / (a - 2 * b + c)
    return float((k + offset) * rate / len(x))


def rms(samples: Samples) -> float:
    """Root mean square in int16 units."""
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) if len(samples) else 0.0


def write_raw(path: Path, samples: Samples) -> Path:
    """Write raw s16le samples; returns ``path``."""
    samples.astype("<i2").tofile(path)
    return path


def read_raw(path: Path) -> Samples:
    """Read raw s16le samples."""
    return np.fromfile(path, "<i2").astype(np.int16)


def write_wav(path: Path, samples: Samples, rate: int = SAMPLE_RATE, channels: int = 1) -> Path:
    """Write a 16-bit WAV; ``samples`` is (n,) or (n, channels). Returns ``path``."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return path


def read_wav(path: Path) -> tuple[Samples, int]:
    """A 16-bit WAV's samples (interleaved if multichannel) and rate."""
    with wave.open(str(path), "rb") as w:
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.int16)
        return data, w.getframerate()


# -- PulseAudio -------------------------------------------------------------------------------


class PulseError(RuntimeError):
    """The PulseAudio daemon or one of its tools failed."""


class Recorder:
    """A running ``pacat --record`` of one source; ``stop()`` returns what it heard."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process
        self._data = bytearray()
        # Drained continuously: a full pipe would stall the recorder.
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self._process.stdout is not None
        fd = self._process.stdout.fileno()
        while chunk := os.read(fd, 65536):
            self._data += chunk

    def samples(self) -> Samples:
        """What was recorded so far."""
        data = bytes(self._data)
        return np.frombuffer(data[: len(data) // 2 * 2], "<i2").astype(np.int16)

    def stop(self) -> Samples:
        """End the recording and return all of it (48 kHz mono int16)."""
        self._process.terminate()
        self._process.wait(10)
        self._reader.join(10)
        return self.samples()


class PulseServer:
    """A private PulseAudio daemon with named null sinks (48 kHz mono s16le).

    A sink that is the default makes its streams follow the default when it is
    unloaded, so a never-unloaded ``idle`` sink is the default; and
    ``rescue-streams = no`` makes unloading a sink kill its streams instead of
    moving them, which is what an unplug looks like to a client.
    """

    def __init__(self, root: Path, process: subprocess.Popen[bytes]) -> None:
        self.root = root
        """Directory holding the socket, the daemon's HOME and its log."""
        self.socket = root / "pulse.sock"
        self.server = f"unix:{self.socket}"
        """Value for ``PULSE_SERVER`` or a ``pulse`` PCM's ``server``."""
        self._process = process
        self._modules: dict[str, str] = {}

    @classmethod
    @contextmanager
    def running(
        cls, root: Path, sinks: Sequence[str], timeout: float = 10.0
    ) -> Iterator[PulseServer]:
        """Start a daemon in ``root`` with ``sinks``; kill it on exit."""
        root.mkdir(parents=True, exist_ok=True)
        (root / ".config" / "pulse").mkdir(parents=True, exist_ok=True)
        (root / ".config" / "pulse" / "daemon.conf").write_text("rescue-streams = no\n")
        script = [
            f"load-module module-native-protocol-unix auth-anonymous=1 socket={root}/pulse.sock",
            _null_sink("idle"),
            "set-default-sink idle",
            "set-default-source idle.monitor",
        ]
        (root / "pulse.pa").write_text("\n".join(script) + "\n")
        env = {**os.environ, "HOME": str(root), "XDG_RUNTIME_DIR": str(root)}
        env.pop("PULSE_SERVER", None)
        with (root / "pulse.log").open("wb") as log:
            process = subprocess.Popen(
                ["pulseaudio", "-n", "-F", str(root / "pulse.pa"), "--daemonize=no",
                 "--exit-idle-time=-1", "--log-target=stderr"],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        server = cls(root, process)
        try:
            server._wait_ready(timeout)
            for sink in sinks:
                server.load_sink(sink)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    @property
    def env(self) -> dict[str, str]:
        """Environment for Pulse clients (``paplay``, ``pacat``, ``pactl``)."""
        return {**os.environ, "PULSE_SERVER": self.server, "XDG_RUNTIME_DIR": str(self.root)}

    def capture_pcm(self, sink: str) -> str:
        """Body of an ALSA PCM that captures what is played into ``sink``."""
        return pulse_pcm(f"{sink}.monitor", self.server)

    def playback_pcm(self, sink: str) -> str:
        """Body of an ALSA PCM that plays into ``sink``."""
        return pulse_pcm(sink, self.server)

    def load_sink(self, sink: str) -> None:
        """Create the null sink ``sink`` (again, after ``unload_sink``)."""
        args = _null_sink(sink).split()
        self._modules[sink] = self.pactl(*args).strip()

    def unload_sink(self, sink: str) -> None:
        """Remove ``sink``: streams on it and on its monitor die, as on an unplug."""
        self.pactl("unload-module", self._modules.pop(sink))

    def pactl(self, *args: str) -> str:
        """Run ``pactl`` against this daemon; its output."""
        done = subprocess.run(
            ["pactl", *args], env=self.env, capture_output=True, text=True, timeout=10, check=False
        )
        if done.returncode != 0:
            raise PulseError(f"pactl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def play(self, wav: Path, sink: str) -> subprocess.Popen[bytes]:
        """Start playing ``wav`` into ``sink``; the caller waits for or kills the process."""
        return subprocess.Popen(
            ["paplay", f"--device={sink}", "--latency-msec=20", str(wav)],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def record(self, sink: str) -> Recorder:
        """Start recording what is played into ``sink`` (its monitor), 48 kHz mono."""
        process = subprocess.Popen(
            ["pacat", "--record", f"--device={sink}.monitor", "--format=s16le",
             f"--rate={SAMPLE_RATE}", "--channels=1", "--latency-msec=20", "--raw"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return Recorder(process)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log = (self.root / "pulse.log").read_text(errors="replace")
                raise PulseError(f"pulseaudio exited with {self._process.returncode}: {log}")
            if self.socket.exists():
                try:
                    self.pactl("info")
                    return
                except PulseError:
                    pass
            time.sleep(0.05)
        raise PulseError(f"pulseaudio not ready after {timeout} s")


def _null_sink(name: str) -> str:
    return (
        f"load-module module-null-sink sink_name={name} rate={SAMPLE_RATE} channels=1 format=s16le"
    )


def require_tools(*names: str) -> None:
    """Fail (not skip) with what to install when a command-line tool is missing."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise PulseError(
            f"missing {', '.join(missing)}: apt-get install pulseaudio pulseaudio-utils alsa-utils"
        )
