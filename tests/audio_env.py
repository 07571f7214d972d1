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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent.audio.format import SAMPLE_RATE
from tools.lab.virtual_audio import PulseDaemon, VirtualAudioError, read_wav, write_wav

Samples = npt.NDArray[np.int16]
__all__ = ["read_wav", "write_wav"]  # re-exported: tests take their audio helpers from here

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


# -- PulseAudio -------------------------------------------------------------------------------


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
        if self._process.stdout is not None:
            self._process.stdout.close()
        return self.samples()


class PulseServer(PulseDaemon):
    """A private PulseAudio daemon with named null sinks (48 kHz mono s16le).

    A sink that is the default makes its streams follow the default when it is
    unloaded, so a never-unloaded ``idle`` sink is the default.
    """

    def __init__(self, root: Path, process: subprocess.Popen[bytes]) -> None:
        super().__init__(root, process)
        self._modules: dict[str, str] = {}

    @classmethod
    @contextmanager
    def running(
        cls, root: Path, sinks: Sequence[str], timeout: float = 10.0
    ) -> Iterator[PulseServer]:
        """Start a daemon in ``root`` with ``sinks``; kill it on exit."""
        script = [_null_sink("idle"), "set-default-sink idle", "set-default-source idle.monitor"]
        with super().running(root, script, timeout) as daemon:
            assert isinstance(daemon, PulseServer)
            for sink in sinks:
                daemon.load_sink(sink)
            yield daemon

    def capture_pcm(self, sink: str) -> str:
        """Body of an ALSA PCM that captures what is played into ``sink``."""
        return pulse_pcm(f"{sink}.monitor", self.server)

    def playback_pcm(self, sink: str) -> str:
        """Body of an ALSA PCM that plays into ``sink``."""
        return pulse_pcm(sink, self.server)

    def load_sink(self, sink: str) -> None:
        """Create the null sink ``sink`` (again, after ``unload_sink``)."""
        self._modules[sink] = self.pactl(*_null_sink(sink).split()).strip()

    def unload_sink(self, sink: str) -> None:
        """Remove ``sink``: streams on it and on its monitor die, as on an unplug."""
        self.pactl("unload-module", self._modules.pop(sink))

    def record(self, sink: str) -> Recorder:
        """Start recording what is played into ``sink`` (its monitor), 48 kHz mono."""
        process = subprocess.Popen(
            ["pacat", "--record", f"--device={sink}.monitor", "--format=s16le",
             f"--rate={SAMPLE_RATE}", "--channels=1", "--latency-msec=20", "--raw"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return Recorder(process)


def _null_sink(name: str) -> str:
    return (
        f"load-module module-null-sink sink_name={name} rate={SAMPLE_RATE} channels=1 format=s16le"
    )


def require_tools(*names: str) -> None:
    """Fail (not skip) with what to install when a command-line tool is missing."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise VirtualAudioError(
            f"missing {', '.join(missing)}: apt-get install pulseaudio pulseaudio-utils alsa-utils"
        )
