"""Packaging for edge-intercom: the board agent and the cloud relay."""

from setuptools import find_packages, setup

RELAY = [
    "aiohttp>=3.9",
    "alembic>=1.13",
    "prometheus-client>=0.20",  # cloud_relay.metrics: /metrics
    "segno>=1.5",
    "sqlalchemy>=2.0",
]
POSTGRES = ["psycopg[binary]>=3.1"]

setup(
    name="edge-intercom",
    version="0.1.0",
    description="Voice intercom for Raspberry-class boards: agent and cloud relay",
    python_requires=">=3.11",
    packages=find_packages(include=["agent", "agent.*", "cloud_relay", "cloud_relay.*"]),
    package_data={
        "agent": ["py.typed"],
        "cloud_relay": ["static/*"],  # the dashboard (cloud_relay.pages)
        "cloud_relay.migrations": ["script.py.mako"],
    },
    install_requires=[
        "aioice>=0.10",
        "cryptography>=42",
        # libgpiod v2 bindings (agent.gpio.gpiod_chip): wheels bundle libgpiod; elsewhere
        # (32-bit Raspberry Pi OS) the sdist builds it with gcc and python3-dev.
        "gpiod>=2.1; sys_platform == 'linux'",
        "numpy>=1.24",
        "opuslib==3.0.1",
        "paho-mqtt>=2.2,<2.3",  # agent.signaling.mqtt overrides two of its socket methods
        "pyaudio>=0.2.13",
        "pylibsrtp>=0.10",
        "pyOpenSSL>=24",
        "soxr>=0.3",
        # sd_notify and the journal; built against libsystemd (libsystemd-dev, pkg-config).
        "systemd-python>=235; sys_platform == 'linux'",
        # agent.audio.webrtc_ns: WebRTC's noise suppressor; abi3 wheels for aarch64 and armv7.
        "webrtc-noise-gain>=1.3,<2",
        "webrtcvad-wheels>=2.0.14",  # voice activity on the board: tiny C, no model file
    ],
    extras_require={
        # The relay runs on a server; a board never installs its store.
        "relay": RELAY,
        # The relay's store on PostgreSQL (store.url = "postgresql+psycopg://...").
        "postgres": [*RELAY, *POSTGRES],
        "test": [
            *RELAY,
            *POSTGRES,
            "aiortc>=1.9",
            "coverage>=7",
            "hypothesis>=6.90",
            "mypy>=1.8",
            "pesq>=0.0.4",
            "playwright>=1.40",  # drives Debian's chromium: the dashboard and web call tests
            "pytest>=8",
            "pytest-asyncio>=0.23",
            "pytest-timeout>=2.2",
            "ruff>=0.5",
            "schemathesis>=4.0",  # tests/test_api.py fuzzes the relay's OpenAPI document
        ],
    },
    entry_points={
        "console_scripts": [
            "edge-intercom-agent=agent.app:main",
            "edge-intercom-relay=cloud_relay.__main__:main",
        ],
    },
)
