"""NAT traversal with real agents: two ``agent.app call`` processes behind real NATs.

Each agent runs in its own network namespace behind a NAT router of the namespace lab
(``tools.lab.netns``); coturn on the public host is the STUN and TURN server. The test is
the agents' signaling (``relay_signals``); everything else, ICE checks, DTLS and SRTP,
crosses the NATs. Each agent sends a tone of its own and records what it hears, so a call
passes only if audio got through both ways.

These tests need root (network namespaces) and fail, never skip, without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest

from agent.audio.format import SAMPLE_RATE
from tools.lab.agents import relay_signals
from tools.lab.netns import NatKind, NetLab
from tools.lab.turn import Coturn
from tools.lab.virtual_audio import read_wav

ROOT = Path(__file__).resolve().parents[1]
TURN_PORT = 3478
CALL_S = 3.0
"""How long the offerer stays in the call once connected; it then hangs up."""
ANSWERER_CALL_S = 30.0
"""The answerer's own limit: far longer, so the call ends by the offerer's BYE."""
CALL_LIMIT_S = 40.0
"""Bound on a whole call, start to both exits (a good one takes about 5 s)."""
TONES = {"h1": 700.0, "h2": 1100.0}
"""The tone each host sends; the other one must hear it."""

ICE_TIMERS = {"gather_timeout": 3.0, "connect_timeout": 10.0, "close_timeout": 2.0}
DTLS_TIMERS = {"retransmit_s": 0.5, "handshake_timeout_s": 10.0}


@dataclass
class Agent:
    """One ``agent.app call`` process in a lab node, and what it printed."""

    node: str
    proc: asyncio.subprocess.Process
    stderr: Path
    wav: Path
    records: list[dict[str, Any]] = field(default_factory=list)

    def events(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("event") == event]

    @property
    def last(self) -> dict[str, Any]:
        return self.records[-1] if self.records else {}


@dataclass
class Lab:
    """A two-NAT lab, a coturn on its public host, and what went wrong where."""

    net: NetLab
    turn: Coturn
    work: Path
    agents: list[Agent] = field(default_factory=list)

    def diagnostics(self) -> str:
        """Every agent's records and stderr, and coturn's log tail: for failure messages."""
        parts = []
        for agent in self.agents:
            stderr = agent.stderr.read_text(errors="replace") if agent.stderr.exists() else ""
            parts.append(
                f"=== {agent.node} exited {agent.proc.returncode}, records:\n"
                + "\n".join(json.dumps(r) for r in agent.records)
                + f"\n--- {agent.node} stderr (tail):\n"
                + "\n".join(stderr.splitlines()[-60:])
            )
        parts.append(f"=== coturn:\n{self.turn.log_tail(30)}")
        return "\n".join(parts)


@contextlib.asynccontextmanager
async def nat_lab(work: Path, kind1: NatKind, kind2: NatKind) -> AsyncIterator[Lab]:
    """h1 behind a ``kind1`` NAT, h2 behind a ``kind2`` one, coturn on the public host."""
    async with NetLab() as net:
        public = net.two_nats(kind1, kind2).public
        with Coturn.running(
            argv_prefix=net.command("pub", []),
            listen=(public.address,),
            port=TURN_PORT,
            relay_ip=public.address,
        ) as turn:
            yield Lab(net, turn, work)


def _toml(value: Any) -> str:
    """A TOML value: JSON's strings and numbers are TOML's too."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def _config(
    lab: Lab,
    node: str,
    *,
    stun: bool,
    turn: Literal["udp", "tcp"] | None,
    connect_timeout: float | None = None,
) -> Path:
    """The agent's TOML: coturn as STUN and/or TURN server (REST shared secret), short timers."""
    ice: dict[str, Any] = {}
    if stun:
        ice["stun_servers"] = [{"host": lab.turn.host, "port": lab.turn.port}]
    if turn is not None:
        ice["turn_servers"] = [
            {
                "host": lab.turn.host,
                "port": lab.turn.port,
                "transport": turn,
                "shared_secret": lab.turn.secret,
            }
        ]
    timers = {**ICE_TIMERS, "connect_timeout": connect_timeout or ICE_TIMERS["connect_timeout"]}
    lines = [
        f"device_id = {_toml(f'nat-{node}')}",
        f"state_dir = {_toml(str(lab.work / node))}",
        "[ice]",
        *(f"{k} = {_toml(v)}" for k, v in ice.items()),
        "[ice.timers]",
        *(f"{k} = {_toml(v)}" for k, v in timers.items()),
        "[dtls]",
        *(f"{k} = {_toml(v)}" for k, v in DTLS_TIMERS.items()),
    ]
    path = lab.work / f"{node}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def _spawn(lab: Lab, node: str, config: Path, role: str, duration: float) -> Agent:
    stderr, wav = lab.work / f"{node}.stderr", lab.work / f"{node}.wav"
    with stderr.open("wb") as err:
        proc = await lab.net.spawn(
            node,
            [
                sys.executable, "-m", "agent.app", "--config", str(config), "call",
                "--role", role, "--source", f"tone:{TONES[node]:g}", "--sink", f"wav:{wav}",
                "--duration", str(duration), "--stats-interval", "1000", "--setup-timeout", "30",
            ],
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=err.fileno(),
            cwd=ROOT,
        )  # fmt: skip
    agent = Agent(node, proc, stderr, wav)
    lab.agents.append(agent)
    return agent


async def _signaling(source: Agent, to: Agent) -> None:
    """``source``'s signals to ``to`` until ``source`` exits, then EOF: an agent left alone
    in call setup fails at once instead of at its setup timeout."""
    await relay_signals(source.proc, to.proc, on_record=source.records.append)
    assert to.proc.stdin is not None
    to.proc.stdin.close()


async def call(
    lab: Lab,
    *,
    stun: bool,
    turn: Literal["udp", "tcp"] | None,
    connect_timeout: float | None = None,
) -> tuple[Agent, Agent]:
    """h1 offers, h2 answers; returns once both have exited (within ``CALL_LIMIT_S``)."""
    configs = {
        node: _config(lab, node, stun=stun, turn=turn, connect_timeout=connect_timeout)
        for node in ("h1", "h2")
    }
    h1 = await _spawn(lab, "h1", configs["h1"], "offerer", CALL_S)
    h2 = await _spawn(lab, "h2", configs["h2"], "answerer", ANSWERER_CALL_S)
    try:
        async with asyncio.timeout(CALL_LIMIT_S):
            await asyncio.gather(_signaling(h1, h2), _signaling(h2, h1))
            await asyncio.gather(h1.proc.wait(), h2.proc.wait())
    except TimeoutError:
        pytest.fail(f"the call did not end within {CALL_LIMIT_S} s\n{lab.diagnostics()}")
    except Exception as exc:
        pytest.fail(f"the call broke: {exc!r}\n{lab.diagnostics()}")
    return h1, h2


def _peak_hz(path: Path) -> float:
    samples, rate = read_wav(path)
    assert rate == SAMPLE_RATE
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64)))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


def check_call(lab: Lab, h1: Agent, h2: Agent) -> list[tuple[Agent, dict[str, Any]]]:
    """Assert the call connected, carried each tone to the other side, and ended by BYE.

    Returns each agent with its ``connected`` record, for the caller's checks on the pair.
    """
    why = lab.diagnostics()
    for agent in (h1, h2):
        assert agent.proc.returncode == 0, why
        assert len(agent.events("connected")) == 1, why
        assert agent.last.get("event") == "ended", why
        # 50 packets a second for about CALL_S seconds came in, not a trickle.
        assert agent.last["packets_received"] > 100, why
    # h1 hung up on its timer; h2, whose own timer is far off, was told so by h1 (RTCP BYE
    # or DTLS close_notify, over the same NATs as the media).
    assert (h1.last["reason"], h2.last["reason"]) == ("LOCAL_HANGUP", "REMOTE_BYE"), why
    for agent, other in ((h1, h2), (h2, h1)):
        peak = _peak_hz(agent.wav)
        assert abs(peak - TONES[other.node]) < 3.0, f"{agent.node} heard {peak} Hz\n{why}"
    return [(agent, agent.events("connected")[0]) for agent in (h1, h2)]


async def test_cone_nats_connect_directly_through_server_reflexive_candidates(
    tmp_path: Path,
) -> None:
    async with nat_lab(tmp_path, NatKind.CONE, NatKind.CONE) as lab:
        h1, h2 = await call(lab, stun=True, turn=None)
        for agent, connected in check_call(lab, h1, h2):
            # aioice pairs a server-reflexive candidate through its base (RFC 8445 6.1.2.4),
            # so our side of the pair is the host socket, seen outside as our srflx. The
            # peer's side is its srflx (trickled), or prflx when its check came first.
            # Private addresses cannot reach each other across the lab, so a direct pair
            # through the NATs is the only way without TURN.
            assert connected["local_candidate"] == "host", agent.records
            assert connected["remote_candidate"] in ("srflx", "prflx"), agent.records


async def test_symmetric_nats_fall_back_to_turn_over_udp(tmp_path: Path) -> None:
    async with nat_lab(tmp_path, NatKind.SYMMETRIC, NatKind.SYMMETRIC) as lab:
        h1, h2 = await call(lab, stun=True, turn="udp")
        for agent, connected in check_call(lab, h1, h2):
            # The srflx candidates are useless (a symmetric NAT's mapping was made for the
            # STUN server alone), so every working pair goes through a relay: either both
            # allocations, or one side's host socket straight to the other's allocation
            # (TURN permissions are per IP, and the peer already sent to our NAT's IP).
            pair = (connected["local_candidate"], connected["remote_candidate"])
            assert "relay" in pair, agent.records


async def test_udp_blocked_falls_back_to_turn_over_tcp(tmp_path: Path) -> None:
    async with nat_lab(tmp_path, NatKind.BLOCK_UDP, NatKind.BLOCK_UDP) as lab:
        h1, h2 = await call(lab, stun=False, turn="tcp")
        for agent, connected in check_call(lab, h1, h2):
            # Both sides can only be TCP allocations: no UDP leaves either LAN. The peer's
            # relay shows as prflx if its check came before its candidate.
            assert connected["local_candidate"] == "relay", agent.records
            assert connected["remote_candidate"] in ("relay", "prflx"), agent.records


async def test_symmetric_nats_without_turn_fail_with_an_ice_error(tmp_path: Path) -> None:
    async with nat_lab(tmp_path, NatKind.SYMMETRIC, NatKind.SYMMETRIC) as lab:
        agents = await call(lab, stun=True, turn=None, connect_timeout=5.0)
        why = lab.diagnostics()
        for agent in agents:
            assert agent.proc.returncode == 1, why
            assert not agent.events("connected"), why
            assert agent.last.get("event") == "failed", why
            # Candidates were exchanged and paired, and no pair got through.
            assert agent.last["reason"].startswith("ICE failed: no candidate pair succeeded"), why
