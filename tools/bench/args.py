"""What the benchmarks share: argument types, and the machine their figures come from."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
from pathlib import Path


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not > 0")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not > 0")
    return value


def machine() -> str:
    """Architecture, cores, CPU model and Python, for the README next to each figure."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    python = platform.python_version()
    return f"{platform.machine()}, {os.cpu_count()} cores ({model}), Python {python}"
