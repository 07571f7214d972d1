"""GPIO end to end: a button press on door-a calls door-b through the real relay, and an
operator acting for door-b opens door-a's door.

Both are ``edge-intercom-agent run`` processes (``tools.lab.fleet``, paired, TLS broker).
door-a runs the Raspberry Pi 4 profile with its lines on the lab chip
(``[gpio] chip = "fake:PATH"``): this test presses its button and reads its relay and LED
through the chip's unix socket (``agent.gpio.fake.FakeChipClient``). Every wait polls a
condition under a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agent.gpio.fake import FakeChipClient, pulses
from tools.lab.fleet import WAIT, Fleet, fleet

A, B = "door-a", "door-b"
BUTTON, RELAY, LED = 17, 27, 22
"""Lines of ``firmware_configs/raspberry-pi-4-usb.toml``."""


@contextlib.asynccontextmanager
async def fake_chip(f: Fleet, sock: Path) -> AsyncIterator[FakeChipClient]:
    """The agent's lab chip, once it serves it."""
    try:
        async with asyncio.timeout(WAIT):
            while True:
                with contextlib.suppress(OSError):
                    client = await FakeChipClient.connect(sock)
                    break
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise f.fail(f"{A} did not serve its fake chip on {sock}") from None
    try:
        yield client
    finally:
        await client.close()


async def until_pulses(f: Fleet, chip: FakeChipClient, count: int) -> None:
    """Until door-a's relay has pulsed ``count`` times, the last one over."""
    found: list[tuple[float, float | None]] = []
    try:
        async with asyncio.timeout(WAIT):
            while len(found) < count or found[-1][1] is None:
                found = pulses(await chip.history(RELAY))
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise f.fail(f"{count} relay pulse(s) expected, saw {found}") from None
    assert len(found) == count, found


async def door_refused(f: Fleet, words: str, **args: Any) -> None:
    reply = await f.command(A, "door/open", **args)
    assert reply["ok"] is False and words in reply["message"], reply


async def test_button_calls_the_peer_who_opens_the_door(tmp_path: Path) -> None:
    sock = tmp_path / "gpio.sock"
    async with fleet(tmp_path, devices=(A, B), client_id="gpio-e2e-test") as f:
        await f.agent(
            A,
            source="tone:700",
            sink="null",
            settings='board = "raspberry-pi-4-usb"',
            extra=f"""
[gpio]
chip = "fake:{sock}"
button_peer = "{B}"
door_allowed = ["{B}"]
door_pulse_s = 0.2
hangup_after_door = true
""",
        )
        await f.agent(B, source="tone:1100", sink="null", auto_answer=[A])
        for device in (A, B):
            await f.until_status(device, lambda s: s["phase"] == "idle", f"{device} up")
        await f.until_online(A, B)

        async with fake_chip(f, sock) as chip:
            await door_refused(f, "not in a call", by=B)
            await chip.press(BUTTON)
            status = await f.until_status(
                A, lambda s: s["phase"] == "active", f"{A} in a call after the press"
            )
            assert (status["peer"], status["role"]) == (B, "caller")
            call = status["call_id"]
            await f.until_status(B, lambda s: s["phase"] == "active", f"{B} answered")

            await door_refused(f, "not in door_allowed", by="door-c")
            reply = await f.command(A, "door/open", by=B)
            assert reply["ok"] and reply["hung_up"] == call, reply
            ended = await f.until_status(
                A,
                lambda s: (s["last_call"] or {}).get("call_id") == call,
                f"{A} hung up after the door opened",
            )
            assert ended["last_call"]["reason"] == "local-hangup"
            await until_pulses(f, chip, 1)

            # Within door_window_s of the call, door-b may still open the door.
            assert (await f.command(A, "door/open", by=B))["ok"]
            await until_pulses(f, chip, 2)
            status = await f.command(A, "status")
            assert status["door"] == {
                "opened": 2,
                "refused": {"no-call": 1, "not-allowed": 1},
                "open": False,
            }
            assert True in [level for _, level in await chip.history(LED)]  # online, in call

        for device in (A, B):
            await f.stop_agent(device)
