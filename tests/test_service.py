"""The agent and the relay as systemd services: what they tell the service manager.

systemd is not PID 1 here, so the tests play its part with real sockets
(``tools.lab.sdnotify``): a ``$NOTIFY_SOCKET`` that records READY, STATUS, WATCHDOG and
STOPPING, and a journal socket that a mount namespace puts where libsystemd sends
journal entries. The processes are the real ``edge-intercom-agent run`` and
``edge-intercom-relay serve`` (``tools.lab.fleet``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agent.audio.format import SAMPLE_RATE
from agent.calls.machine import Indicator
from agent.edge.outbox import OUTBOX_FILE
from agent.service.config import AgentConfig
from agent.service.notifier import ServiceNotifier, problems
from agent.service.status import call_line, outage_line
from agent.service.tomlconf import changed_keys
from agent.signaling.mqtt import Outage
from cloud_relay.store import Store
from tools.lab.fleet import AGENT_CMD, WAIT, fleet
from tools.lab.sdnotify import JournalSocket, NotifySocket, parse_journal
from tools.lab.virtual_audio import VirtualAudio, write_wav

A, B = "door-a", "door-b"

# The watchdog of these tests: 0.4 s, so the agent pings every 0.2 s.
WATCHDOG_USEC = "400000"


# --- the status line and the health checks, without I/O --------------------------------


def test_every_call_indicator_has_a_status_line_naming_the_peer() -> None:
    assert call_line(Indicator.IDLE, None) == "online, idle"
    assert call_line(Indicator.IN_CALL, "front-door") == "in call with front-door"
    for indicator in Indicator:
        if indicator is not Indicator.IDLE:
            assert "front-door" in call_line(indicator, "front-door"), indicator


def test_outage_line_says_why_and_counts_down_to_the_retry() -> None:
    outage = Outage("connection refused", retry_at=108.2)
    assert outage_line("10.0.0.2:8883", outage, now=100.0) == (
        "broker 10.0.0.2:8883 unreachable (connection refused), retrying in 9 s"
    )
    assert outage_line("h:1", Outage("tls", None), now=0.0) == "broker h:1 unreachable (tls)"


def test_problems_names_each_failing_check_and_a_check_that_raises() -> None:
    def broken() -> str | None:
        raise OSError("disk gone")

    found = problems({"ok": lambda: None, "mic": lambda: "no frame for 31 s", "db": broken})
    assert found == ["mic: no frame for 31 s", "db: check failed: OSError('disk gone')"]


def test_parse_journal_reads_both_field_forms() -> None:
    long_value = b"line one\nline two"
    data = (
        b"MESSAGE_ID=x\nMESSAGE\n"
        + len(long_value).to_bytes(8, "little")
        + long_value
        + b"\nCALL_ID=c1\n"
    )
    assert parse_journal(data) == {
        "MESSAGE_ID": "x",
        "MESSAGE": "line one\nline two",
        "CALL_ID": "c1",
    }


# --- the notifier on a real socket ------------------------------------------------------


async def test_watchdog_pings_stop_while_a_check_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    problem: list[str] = []
    ticks = 0

    def check() -> str | None:
        nonlocal ticks
        ticks += 1
        return problem[0] if problem else None

    with NotifySocket(tmp_path / "notify") as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", str(sock.path))
        notifier = ServiceNotifier(lambda: "online, idle", watchdog_s=0.1)
        notifier.add_check("microphone", check)
        notifier.start()
        try:
            notifier.ready()
            await sock.until(lambda n: n.fields.get("WATCHDOG") == "1", "a ping", WAIT)
            problem.append("no microphone frame for 31 s")
            sick = await sock.until(
                lambda n: "unhealthy" in n.fields.get("STATUS", ""), "the sick status", WAIT
            )
            assert sick.fields["STATUS"] == (
                "online, idle; unhealthy: microphone: no microphone frame for 31 s"
            )
            seen = ticks
            async with asyncio.timeout(WAIT):
                while ticks < seen + 5:  # five more rounds of checks, all failing
                    await asyncio.sleep(0.02)
            problem.clear()
            well = await sock.until(
                lambda n: n.at > sick.at and n.fields.get("STATUS") == "online, idle",
                "the healthy status again",
                WAIT,
            )
            await sock.until(
                lambda n: n.at > well.at and "WATCHDOG" in n.fields, "pings again", WAIT
            )
        finally:
            await notifier.close()
    notices = sock.notices()
    assert notices[0].fields == {"READY": "1", "STATUS": "online, idle"}
    silent = [n for n in notices if sick.at <= n.at < well.at and "WATCHDOG" in n.fields]
    assert silent == [], "pinged while a check failed"


async def test_a_frozen_event_loop_sends_no_watchdog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with NotifySocket(tmp_path / "notify") as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", str(sock.path))
        notifier = ServiceNotifier(lambda: "online, idle", watchdog_s=0.1)
        notifier.start()
        try:
            await sock.until(lambda n: "WATCHDOG" in n.fields, "a ping", WAIT)
            frozen_at = time.monotonic()
            time.sleep(1.0)  # noqa: ASYNC251 - the point: the loop is stuck in a blocking call
            thawed_at = time.monotonic()
            await sock.until(lambda n: n.at > thawed_at and "WATCHDOG" in n.fields, "pings", WAIT)
        finally:
            await notifier.close()
    during = [n for n in sock.notices() if frozen_at + 0.05 < n.at < thawed_at]
    assert during == [], "pinged while the event loop was stuck"
    # Half a second without a ping is past the watchdog's 0.1 s: systemd would kill it.
    assert notifier.pings >= 2


def test_journal_only_when_stderr_goes_there(tmp_path: Path) -> None:
    """``--log-target auto`` picks the journal exactly when ``$JOURNAL_STREAM`` names
    stderr (systemd's StandardError=journal), else plain lines on stderr."""
    code = (
        "import logging, sys\n"
        "from agent.service.systemd import journal_is_stderr\n"
        "print(journal_is_stderr())\n"
    )
    err = tmp_path / "stderr"
    err.touch()
    st = os.stat(err)
    results = []
    for stream in (f"{st.st_dev}:{st.st_ino}", f"{st.st_dev}:{st.st_ino + 1}", ""):
        with err.open("w") as stderr:
            out = subprocess.run(
                [sys.executable, "-c", code],
                env={**os.environ, "JOURNAL_STREAM": stream},
                stderr=stderr,
                capture_output=False,
                stdout=subprocess.PIPE,
                check=True,
                text=True,
            ).stdout.strip()
        results.append(out)
    assert results == ["True", "False", "False"]


# --- the real agent and relay -----------------------------------------------------------


async def test_agent_under_systemd_ready_status_watchdog_and_a_clean_shutdown(
    tmp_path: Path,
) -> None:
    """READY once online, STATUS that follows the call, WATCHDOG pings, journal entries
    with the device's and the call's fields (stderr is "the journal", as systemd says in
    ``$JOURNAL_STREAM``); SIGTERM during a call ends it at the peer with reason
    ``shutdown`` and leaves no alert behind, although the relay was frozen when the alert
    was raised (so it was the stop that waited for the ack)."""
    loud = write_wav(tmp_path / "loud.wav", _tone(1000.0, 2.0, 0.5))
    log = tmp_path / f"{A}.log"
    log.touch()  # the agent's stderr (fleet appends to it): "the journal" for this test
    st = os.stat(log)
    env = {"WATCHDOG_USEC": WATCHDOG_USEC, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    with (
        VirtualAudio.start(("a",)) as audio,
        NotifySocket(tmp_path / "notify") as sock,
        JournalSocket(tmp_path / "journal-run") as journal,
    ):
        board = audio.boards[0]
        devices = (
            f'[audio.capture]\nname = "^{board.mic}$"\n'
            f'[audio.playback]\nname = "^{board.speaker}$"\n'
        )
        async with fleet(tmp_path, devices=(A, B), client_id="service-test") as lab:
            await lab.agent(
                A,
                env={**os.environ, **audio.env, **sock.env, **env},
                prefix=journal.prefix,
                extra=f"{devices}[service]\nstop_flush_s = {WAIT}\n",
            )
            await lab.agent(B, source="tone:1100", sink="null", auto_answer=[A])
            ready = await sock.until(lambda n: n.fields.get("READY") == "1", "READY", WAIT)
            assert ready.fields["STATUS"] == "online, idle"
            await sock.until(
                lambda n: n.at > ready.at + 0.5 and "WATCHDOG" in n.fields, "pings", WAIT
            )
            await lab.until_online(A, B)
            call = (await lab.command(A, "call", peer=B))["call_id"]
            await sock.until(
                lambda n: n.fields.get("STATUS") == f"in call with {B}", "in-call status", WAIT
            )
            await lab.until_status(B, lambda s: s["phase"] == "active", "b active")

            # The relay freezes; A hears a loud noise (the relay cannot ack its alert) and
            # is stopped.
            assert lab.relay is not None
            lab.relay.send_signal(signal.SIGSTOP)
            try:
                player = audio.play(loud, board.mic)
                alert = await journal.until(
                    lambda n: "loud_noise" in n.fields.get("MESSAGE", ""), "the alert", WAIT
                )
                lab.procs[A].send_signal(signal.SIGTERM)
                await sock.until(lambda n: n.fields.get("STOPPING") == "1", "STOPPING", WAIT)
            finally:
                lab.relay.send_signal(signal.SIGCONT)
                player.kill()
                player.wait(10)
            try:
                async with asyncio.timeout(WAIT):
                    assert await lab.procs[A].wait() == 0
            except (TimeoutError, AssertionError):
                raise AssertionError(f"{A} did not stop cleanly:\n{journal.text()}") from None
            ended = await lab.until_status(
                B, lambda s: (s["last_call"] or {}).get("call_id") == call, "b's call ended"
            )
            assert ended["last_call"]["reason"] == "shutdown", lab.logs()
            store = await Store.open(f"sqlite:///{lab.db_path}")
            try:
                stored = await store.run(lambda: store.alerts(device=A))
            finally:
                await store.close()
    with sqlite3.connect(lab.state_dir(A) / OUTBOX_FILE) as db:
        (left,) = db.execute("SELECT count(*) FROM outbox").fetchone()
    assert left == 0, "alerts left unsent in the outbox"
    loud_ids = {a.id for a in stored if a.kind == "loud_noise"}
    assert alert.fields["ALERT_ID"] in loud_ids, (alert, stored)
    assert alert.fields["PRIORITY"] == "4" and alert.fields["DEVICE_ID"] == A
    entries = [e for e in journal.notices() if "LOGGER" in e.fields]
    assert all(e.fields.get("DEVICE_ID") == A for e in entries if e.at > ready.at)
    in_call = [e for e in entries if e.fields.get("CALL_ID") == call]
    assert in_call and all(e.fields["PEER"] == B for e in in_call), entries


def _tone(hz: float, seconds: float, amplitude: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amplitude * 32767 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def test_changed_keys_names_the_leaves_that_differ() -> None:
    old = AgentConfig()
    new = dataclasses.replace(
        old,
        calls=dataclasses.replace(old.calls, do_not_disturb=True),
        media=dataclasses.replace(
            old.media, opus=dataclasses.replace(old.media.opus, complexity=3)
        ),
    )
    assert changed_keys(old, new) == ["media.opus.complexity", "calls.do_not_disturb"]
    assert changed_keys(old, old) == []


async def test_sighup_applies_the_policy_at_once_and_names_what_needs_a_restart(
    tmp_path: Path,
) -> None:
    """The operator edits the agent's file and sends SIGHUP (``systemctl reload``): the
    new do-not-disturb refuses the next call without a restart, and the Opus complexity,
    which this version applies only at start, is named as waiting for a restart."""
    with NotifySocket(tmp_path / "notify") as sock:
        async with fleet(tmp_path, devices=(A, B), client_id="reload-test") as lab:
            config = await lab.agent(
                A, source="tone:700", sink="null", env={**os.environ, **sock.env}
            )
            await lab.agent(B, source="tone:1100", sink="null")
            ready = await sock.until(lambda n: n.fields.get("READY") == "1", "READY", WAIT)
            await lab.until_online(A, B)
            text = config.read_text().replace("[calls]\n", "[calls]\ndo_not_disturb = true\n")
            config.write_text(text + "\n[media.opus]\ncomplexity = 3\n")
            lab.procs[A].send_signal(signal.SIGHUP)
            reloading = await sock.until(
                lambda n: n.fields.get("RELOADING") == "1", "RELOADING", WAIT
            )
            await sock.until(
                lambda n: n.at > reloading.at and n.fields.get("READY") == "1", "READY", WAIT
            )
            assert reloading.at > ready.at
            status = await lab.command(A, "config/get")
            assert status["config"]["calls"]["do_not_disturb"] is True
            call = (await lab.command(B, "call", peer=A))["call_id"]
            ended = await lab.until_status(
                B, lambda s: (s["last_call"] or {}).get("call_id") == call, "b's call refused"
            )
            assert ended["last_call"]["reason"] == "policy-refused", ended
            assert lab.procs[A].returncode is None  # no restart
            await lab.stop_agent(A)
            log = lab.log(A)
    assert "take effect after a restart: media.opus.complexity" in log
    assert "applied: calls.do_not_disturb" in log


async def test_status_names_an_unreachable_broker_and_there_is_no_ready(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = held.getsockname()[1]
        config = tmp_path / "agent.toml"
        config.write_text(
            f'device_id = "{A}"\nstate_dir = "{tmp_path / "state"}"\n'
            f"[mqtt]\nport = {port}\nbackoff_min = 0.05\nbackoff_max = 0.2\n"
            "connect_timeout = 1.0\n"
        )
        with NotifySocket(tmp_path / "notify") as sock:
            proc = await asyncio.create_subprocess_exec(
                *AGENT_CMD, "--config", str(config), "run", "--source", "tone:440",
                "--sink", "null",
                env={**os.environ, **sock.env, "WATCHDOG_USEC": WATCHDOG_USEC},
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                down = await sock.until(
                    lambda n: "unreachable" in n.fields.get("STATUS", ""), "the outage", WAIT
                )
                proc.send_signal(signal.SIGTERM)
                async with asyncio.timeout(WAIT):
                    _, err = await proc.communicate()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert re.fullmatch(
        rf"broker 127\.0\.0\.1:{port} unreachable \(.*refused.*\), retrying in \d+ s",
        down.fields["STATUS"],
    ), down.fields
    assert sock.count("READY") == 0
    assert sock.count("WATCHDOG") > 0  # a board waiting for its broker is not stuck


async def test_a_capture_stream_that_ends_stops_the_watchdog(tmp_path: Path) -> None:
    """The microphone's stream ends (here a recording; on a board, a stream nobody can
    re-open): the pings stop, so systemd restarts the agent, and STATUS says why."""
    wav = write_wav(tmp_path / "short.wav", _tone(440.0, 1.0, 0.1))
    with NotifySocket(tmp_path / "notify") as sock:
        async with fleet(tmp_path, devices=(A,), client_id="dead-mic-test") as lab:
            await lab.agent(
                A, source=f"wav:{wav}", sink="null",
                env={**os.environ, **sock.env, "WATCHDOG_USEC": WATCHDOG_USEC},
            )  # fmt: skip
            sick = await sock.until(
                lambda n: "unhealthy" in n.fields.get("STATUS", ""), "the sick status", WAIT
            )
            # Absence takes time to show: five watchdog periods without a ping.
            await asyncio.sleep(5 * int(WATCHDOG_USEC) / 1e6)
            assert lab.procs[A].returncode is None  # alive: systemd is the one to restart it
            await lab.stop_agent(A)
    assert "unhealthy: microphone: capture ended" in sick.fields["STATUS"], sick
    [stopping] = [n for n in sock.notices() if "STOPPING" in n.fields]
    pinged = [n for n in sock.notices() if sick.at < n.at < stopping.at and "WATCHDOG" in n.fields]
    assert not pinged, sock.notices()


async def test_relay_is_ready_once_serving_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with NotifySocket(tmp_path / "notify") as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", str(sock.path))
        async with fleet(tmp_path, devices=(), client_id="relay-notify") as lab:
            ready = await sock.until(lambda n: n.fields.get("READY") == "1", "READY", WAIT)
            await lab.stop_relay()
        stopping = await sock.until(lambda n: n.fields.get("STOPPING") == "1", "STOPPING", WAIT)
    assert ready.fields["STATUS"] == "serving: 0 device(s) online, 0 call(s) up"
    assert stopping.at > ready.at
    starting = [n.fields["STATUS"] for n in sock.notices() if n.at < ready.at]
    assert starting and all(s.startswith("starting") for s in starting), starting


def test_without_libsystemd_logs_go_to_stderr_and_notifications_are_dropped(
    tmp_path: Path,
) -> None:
    """A machine without libsystemd (a laptop, a container): the agent runs the same, its
    log lines on stderr, its notifications nowhere, even when told to use the journal."""
    code = (
        "import logging, sys\n"
        "sys.modules['systemd'] = None  # as if systemd-python could not load libsystemd\n"
        "from agent.service import systemd\n"
        "systemd.setup_logging('INFO', 'journal')\n"
        "logging.getLogger('probe').warning('still here')\n"
        "print(systemd.notify('READY=1'))\n"
    )
    with NotifySocket(tmp_path / "notify") as sock:
        done = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **sock.env},
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
    assert done.stdout.strip() == "False"
    assert "WARNING probe: still here" in done.stderr
    assert sock.notices() == []
