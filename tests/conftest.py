"""Shared fixtures. Audio: a private ALSA configuration and a PulseAudio daemon."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from audio_env import PulseServer, require_tools
from hypothesis import HealthCheck, settings

from tools.lab.broker import Mosquitto
from tools.lab.postgres import Postgres

# Hypothesis times its own data generation; on a loaded 2-core CI machine a garbage
# collection or a busy neighbour makes that look slow. What is tested stays the same.
settings.register_profile(
    "edge", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("edge")


@pytest.fixture
def alsa_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh HOME for this test: PortAudio instances created now read its ``.asoundrc``."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("PULSE_SERVER", raising=False)
    return home


@pytest.fixture(scope="session")
def pulse_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PulseServer]:
    """One PulseAudio daemon for the session, sinks ``mic``, ``spk``, ``hotmic``, ``hotspk``.

    Tests that unload a sink (``hot*``) must load it again before they end.
    """
    require_tools("pulseaudio", "pactl", "paplay", "pacat")
    with PulseServer.running(
        tmp_path_factory.mktemp("pulse"), ("mic", "spk", "hotmic", "hotspk")
    ) as server:
        yield server


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private mosquitto (tools/lab/broker.py) for this test."""
    with Mosquitto.running(root=tmp_path / "broker") as b:
        yield b


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One PostgreSQL server for the session (tools/lab/postgres.py); a database per test."""
    with Postgres.running() as pg:
        yield pg


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The relay's store on each database it supports: a SQLite file, a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'relay.db'}"
    pg: Postgres = request.getfixturevalue("postgres")
    return pg.create_database()
