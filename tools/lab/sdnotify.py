"""systemd's side of sd_notify and of the journal, for tests: sockets that keep what a
service sends.

systemd reads the datagrams a ``Type=notify`` service sends to ``$NOTIFY_SOCKET``
(``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ...), and journald those that libsystemd
sends to ``/run/systemd/journal/socket`` (the native protocol: ``KEY=value`` lines, or a
key, a little-endian 64-bit length and the bytes for values with newlines).
``NotifySocket`` and ``JournalSocket`` bind such a socket in a directory of the test's,
read it on a thread (so a service whose event loop is the test's own is heard even while
that loop is blocked) and keep each datagram's fields with the monotonic time it
arrived. ``JournalSocket.prefix`` runs a command in a mount namespace whose
``/run/systemd`` is that directory, so its journal entries come to the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self


@dataclass(frozen=True, slots=True)
class Notice:
    at: float
    """``time.monotonic()`` when it arrived."""
    fields: dict[str, str]
    """``READY``, ``STATUS``, ``WATCHDOG``, ... as sent."""


def parse_notify(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)


def parse_journal(data: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    i = 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            i = end + 1
        else:  # KEY \n size(le64) value \n
            key, size = line, int.from_bytes(data[end + 1 : end + 9], "little")
            value = data[end + 9 : end + 9 + size]
            i = end + 9 + size + 1
        fields[key.decode()] = value.decode(errors="replace")
    return fields


class NotifySocket:
    """``with NotifySocket(path) as sock``: ``sock.env`` for the service's environment."""

    parse = staticmethod(parse_notify)

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._notices: list[Notice] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="notify-socket", daemon=True)

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def __enter__(self) -> Self:
        self._reader.start()
        return self

    def __exit__(
        self, tp: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed.set()
        self._reader.join()
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def notices(self) -> list[Notice]:
        with self._lock:
            return list(self._notices)

    def count(self, key: str) -> int:
        return sum(key in n.fields for n in self.notices())

    def statuses(self) -> list[str]:
        return [n.fields["STATUS"] for n in self.notices() if "STATUS" in n.fields]

    async def until(self, check: Callable[[Notice], bool], what: str, limit_s: float) -> Notice:
        """The first notice (old or new) ``check`` accepts; AssertionError after ``limit_s``."""
        try:
            async with asyncio.timeout(limit_s):
                while True:
                    for notice in self.notices():
                        if check(notice):
                            return notice
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(
                f"no notice with {what} within {limit_s:g} s; got {self.notices()}"
            ) from None

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            at = time.monotonic()
            fields = self.parse(data)
            with self._lock:
                self._notices.append(Notice(at, fields))


class JournalSocket(NotifySocket):
    """``with JournalSocket(directory) as journal``: run the service under
    ``journal.prefix`` (needs root: a mount namespace) and read ``journal.notices()``."""

    parse = staticmethod(parse_journal)

    def __init__(self, directory: Path) -> None:
        (directory / "journal").mkdir(parents=True, exist_ok=True)
        self.directory = directory
        super().__init__(directory / "journal" / "socket")

    def text(self) -> str:
        """The entries' messages, a line each, for failure reports."""
        return "\n".join(
            f"{n.fields.get('LOGGER', '')}: {n.fields.get('MESSAGE', '')}" for n in self.notices()
        )

    @property
    def prefix(self) -> list[str]:
        script = f'mkdir -p /run/systemd && mount --bind {self.directory} /run/systemd && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
