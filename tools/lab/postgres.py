"""A throwaway PostgreSQL server (Debian's ``postgresql``) for tests of the relay's store.

``with Postgres.running() as pg:`` runs ``initdb`` into a new temporary directory
(trust authentication for loopback only, a ``relay`` superuser), starts ``postgres``
on a free loopback port with its socket there, waits until it takes connections,
and on exit stops it and removes the directory. ``pg.url(db)`` is a SQLAlchemy URL
for the psycopg driver; ``pg.create_database()`` makes a fresh database per test.

PostgreSQL refuses to run as root: as root, the server runs as the ``postgres``
user the Debian package creates, and the directory (made directly in the world-
traversable temp dir, not in a test's private one) is handed to that user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tools.lab.broker import _free_port

USER = "relay"
START_TIMEOUT_S = 30.0


class PostgresError(RuntimeError):
    """The server could not be set up; the text ends with its log's tail."""


def _bin(name: str) -> str:
    """A server binary: Debian keeps them off PATH, under /usr/lib/postgresql/N/bin."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path is None:
        raise PostgresError(f"{name} not found: install the Debian package postgresql")
    return path


class Postgres:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = _free_port("127.0.0.1")
        self.log = root / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._as: list[str] = []
        if os.geteuid() == 0:
            # setpriv execs: the child we hold is the server itself, and gets our signals.
            self._as = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def _tail(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-30:])

    def _run(self, *argv: str) -> None:
        result = subprocess.run(
            [*self._as, *argv], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            raise PostgresError(f"{argv[0]} failed: {result.stderr.strip()}\n{self._tail()}")

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self._as:
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
        self._run(
            _bin("initdb"), "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8",
            "--no-sync",
        )  # fmt: skip
        with self.log.open("ab") as log:
            # fsync off: a test database need not survive a power cut, and it is much faster.
            self.process = subprocess.Popen(
                [
                    *self._as, _bin("postgres"), "-D", str(self.data), "-p", str(self.port),
                    "-h", "127.0.0.1", "-k", str(self.root), "-F",
                ],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            ready = subprocess.run(
                [_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER],
                capture_output=True,
                timeout=10,
                check=False,
            )
            if ready.returncode == 0:
                return
            if self.process.poll() is not None:
                raise PostgresError(
                    f"postgres exited with {self.process.returncode}\n{self._tail()}"
                )
            if time.monotonic() > deadline:
                raise PostgresError(
                    f"postgres not ready within {START_TIMEOUT_S:g} s\n{self._tail()}"
                )
            time.sleep(0.1)

    def create_database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        name = f"t{secrets.token_hex(6)}"
        self._run(_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, name)
        return self.url(name)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)  # "fast" shutdown; SIGTERM waits for clients
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    @classmethod
    @contextlib.contextmanager
    def running(cls) -> Iterator[Postgres]:
        pg = cls(Path(tempfile.mkdtemp(prefix="edge-intercom-pg-")))
        try:
            pg.start()
            yield pg
        finally:
            pg.stop()
            shutil.rmtree(pg.root, ignore_errors=True)
