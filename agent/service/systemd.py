"""The service manager, through systemd-python: sd_notify and the journal.

Notifications go to ``$NOTIFY_SOCKET`` (``Type=notify`` units); log records go to the
journal as structured entries when systemd connected stderr to it (``$JOURNAL_STREAM``
names stderr's device and inode). Where libsystemd is absent (a laptop, a container)
or the process is not a systemd service, notifications are dropped and logs stay on
stderr: the agent runs the same either way.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

_daemon: ModuleType | None
_journal: ModuleType | None
try:
    # By name: this repository's unit-file folder ``systemd/`` would shadow the package
    # for mypy (at run time the installed regular package wins).
    _daemon = importlib.import_module("systemd.daemon")
    _journal = importlib.import_module("systemd.journal")
except ImportError:  # no libsystemd: plain stderr, no notifications
    _daemon = None
    _journal = None

logger = logging.getLogger(__name__)

FIELDS: dict[str, contextvars.ContextVar[str | None]] = {
    name: contextvars.ContextVar(name, default=None)
    for name in ("DEVICE_ID", "CALL_ID", "PEER", "ALERT_ID")
}
"""Journal fields every record carries while set in the logging task's context: the
call runtime sets the call's, the uplink an alert's, so ``journalctl CALL_ID=...``
finds one call's lines across modules."""


@contextlib.contextmanager
def journal_fields(**values: str | None) -> Iterator[None]:
    """Journal fields (names from ``FIELDS``) for the records logged inside, and in the
    tasks started inside."""
    tokens = [(FIELDS[name], FIELDS[name].set(value)) for name, value in values.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def notify(*assignments: str) -> bool:
    """Send ``READY=1``, ``STATUS=...``, ``WATCHDOG=1``... to the service manager; False
    when there is none to tell (no ``$NOTIFY_SOCKET`` or no libsystemd)."""
    if _daemon is None or "NOTIFY_SOCKET" not in os.environ:
        return False
    try:
        return bool(_daemon.notify("\n".join(assignments)))
    except OSError as exc:  # the manager went away; the service goes on
        logger.debug("sd_notify failed: %s", exc)
        return False


def watchdog_interval() -> float | None:
    """The unit's ``WatchdogSec=`` in seconds when its watchdog watches this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # meant for the process that started us
    return int(usec) / 1e6


def journal_is_stderr() -> bool:
    """True when systemd connected our stderr to the journal (``$JOURNAL_STREAM``)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{device}:{inode}"


class _Fields(logging.Filter):
    """Puts the set ``FIELDS`` on each record, where the journal handler sends them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in FIELDS.items():
            value = var.get()
            if value is not None:
                setattr(record, name, value)
        return True


LOG_TARGETS = ("auto", "journal", "stderr")

STDERR_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str, target: str) -> None:
    """The root logger at ``level`` with the one handler ``log_handler`` picks."""
    logging.basicConfig(level=level.upper(), handlers=[log_handler(target, STDERR_FORMAT)])


def log_handler(target: str, fmt: str) -> logging.Handler:
    """The process's log handler: ``journal``, ``stderr``, or ``auto`` (the journal when
    stderr goes there, so each line keeps its priority and fields)."""
    if target not in LOG_TARGETS:
        raise ValueError(f"log target must be auto, journal or stderr, not {target!r}")
    use_journal = target == "journal" or (target == "auto" and journal_is_stderr())
    handler: logging.Handler
    if use_journal and _journal is not None:
        handler = _JournalHandler(_journal.send, os.path.basename(sys.argv[0]) or "python")
        handler.setFormatter(logging.Formatter("%(message)s"))  # LOGGER is a field
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(_Fields())
    return handler


class _JournalHandler(logging.Handler):
    """Records as journal entries: the message with its syslog priority, logger and code
    location, and the ``FIELDS`` set where it was logged."""

    def __init__(self, send: Callable[..., Any], identifier: str) -> None:
        super().__init__()
        self._send = send
        self._identifier = identifier

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {k: v for k, v in record.__dict__.items() if k in FIELDS}
            self._send(
                self.format(record),
                PRIORITY=str(_priority(record.levelno)),
                SYSLOG_IDENTIFIER=self._identifier,
                LOGGER=record.name,
                CODE_FILE=record.pathname,
                CODE_LINE=record.lineno,
                CODE_FUNC=record.funcName,
                **fields,
            )
        except Exception:
            self.handleError(record)


def _priority(level: int) -> int:
    """syslog's: 2 crit, 3 err, 4 warning, 6 info, 7 debug."""
    for floor, priority in ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                            (logging.INFO, 6)):  # fmt: skip
        if level >= floor:
            return priority
    return 7
