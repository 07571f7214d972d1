"""GPIO: debouncing (pure, hypothesis), the door's rules, and the board's lines on a FakeChip.

No gpiochip exists here (and no gpio-sim), so the lines are ``agent.gpio.fake.FakeChip``'s,
behind the same interface as libgpiod's. Every wait polls a condition under a bound.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.calls.machine import Indicator, Phase
from agent.edge.alerts import TAMPER, Alert, Severity
from agent.edge.outbox import Outbox
from agent.gpio.board import GpioBoard, button_command
from agent.gpio.chip import GpioError
from agent.gpio.debounce import Debouncer
from agent.gpio.door import DoorOpener, DoorRefused, door_refusal
from agent.gpio.fake import FakeChip, FakeChipClient, pulses
from agent.gpio.gpiod_chip import find_chip
from agent.gpio.settings import GpioSettings
from agent.service.config import ConfigError, load_config
from agent.service.led import PATTERNS, GpioLed, Led
from agent.service.profile import GpioLine, GpioPins

WAIT = 5.0
DEVICE = "door-a"
BUTTON, RELAY, LED, TAMPER_LINE = 17, 27, 22, 23
PINS = GpioPins(
    chip="fake",
    call_button=GpioLine(BUTTON, active_low=True, bias="pull-up"),
    door_relay=GpioLine(RELAY, active_low=True),
    status_led=GpioLine(LED),
    tamper_switch=GpioLine(TAMPER_LINE, bias="pull-up"),
)
FAST = GpioSettings(
    button_peer="door-b",
    debounce_s=0.02,
    door_pulse_s=0.05,
    door_allowed=("door-b",),
    tamper_cooldown_s=300.0,
)


async def until(check: Callable[[], object], what: str) -> None:
    try:
        async with asyncio.timeout(WAIT):
            while not check():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


# --- debouncing ---------------------------------------------------------------------------


def test_a_level_counts_once_it_has_held() -> None:
    d = Debouncer(hold_s=10)
    assert (d.edge(0, True), d.deadline) == (None, 10)
    assert d.settle(9) is None  # not yet
    assert (d.settle(10), d.stable, d.deadline) == (True, True, None)
    assert d.settle(50) is None  # nothing pending
    # A release that bounces: only the last level, once it held, counts.
    assert d.edge(100, False) is None
    assert d.edge(101, True) is None
    assert d.edge(102, False) is None
    assert d.edge(120, True) is False  # the False held 18 >= 10 before this edge
    assert d.edge(121, False) is None  # the True lasted 1: a bounce
    assert d.settle(200) is None  # back to False, which is already the settled level


def test_a_negative_hold_is_refused() -> None:
    with pytest.raises(ValueError, match="hold_s"):
        Debouncer(hold_s=-1)


def reference(initial: bool, hold: int, edges: list[tuple[int, bool]]) -> list[bool]:
    """The settled levels a contact goes through: each stretch between edges (the last one
    unending) that lasts >= ``hold`` sets the level if it differs."""
    out, stable = [], initial
    for i, (at, level) in enumerate(edges):
        end = edges[i + 1][0] if i + 1 < len(edges) else None
        if (end is None or end - at >= hold) and level != stable:
            stable = level
            out.append(level)
    return out


@given(
    initial=st.booleans(),
    hold=st.integers(1, 50),
    train=st.lists(st.tuples(st.integers(0, 80), st.booleans()), max_size=40),
)
def test_bounce_trains_settle_as_the_reference_says(
    initial: bool, hold: int, train: list[tuple[int, bool]]
) -> None:
    edges, at = [], 0
    for gap, level in train:
        at += gap
        edges.append((at, level))
    d = Debouncer(hold_s=hold, stable=initial)
    seen = [c for at, level in edges if (c := d.edge(at, level)) is not None]
    if (end := d.settle(at + hold)) is not None:
        seen.append(end)
    assert seen == reference(initial, hold, edges)
    assert all(a != b for a, b in itertools.pairwise(seen))  # changes alternate
    assert d.deadline is None


@given(st.lists(st.integers(0, 9), min_size=1, max_size=30))
def test_a_train_of_bounces_shorter_than_hold_gives_one_press(gaps: list[int]) -> None:
    d = Debouncer(hold_s=10)
    at, level, seen = 0, False, []
    for gap in gaps:  # every stretch shorter than hold: nothing settles
        at += gap
        level = not level
        seen.append(d.edge(at, level))
    assert set(seen) == {None}
    assert d.settle(at + 10) is (True if level else None)


# --- the door's rules -----------------------------------------------------------------------


def test_who_may_open_the_door() -> None:
    s = GpioSettings(door_allowed=("door-b", "flat-1"), door_window_s=30)

    def why(by: str | None, **kw: Any) -> str | None:
        kw = {"in_call_with": None, "last_call": None, "now": 100.0, **kw}
        refusal = door_refusal(by, s, **kw)
        return None if refusal is None else refusal.label

    assert why(None) is None  # the operator, any time
    assert why("door-b", in_call_with="door-b") is None
    assert why("door-b", last_call=("door-b", 70.0)) is None  # 30 s ago: within the window
    assert why("door-b", last_call=("door-b", 69.0)) == "window-expired"
    assert why("door-b", in_call_with="flat-1") == "no-call"
    assert why("door-b", last_call=("flat-1", 99.0)) == "no-call"
    assert why("door-b") == "no-call"
    assert why("door-c", in_call_with="door-c") == "not-allowed"


async def test_the_relay_pulses_and_refusals_are_counted() -> None:
    chip = FakeChip()
    relay = chip.request_output(GpioLine(RELAY, active_low=True))
    door = DoorOpener(DEVICE, relay, FAST)
    now = asyncio.get_running_loop().time()

    with pytest.raises(DoorRefused, match="not in a call"):
        door.open("door-b", None, now)
    with pytest.raises(DoorRefused, match="not in door_allowed"):
        door.open("door-c", "door-c", now)
    door.call_ended("door-b", now - 31)  # door_window_s 30 passed
    with pytest.raises(DoorRefused, match="more than door_window_s"):
        door.open("door-b", None, now)
    assert pulses(relay.history) == []

    assert "door-b" in door.open("door-b", "door-b", now)
    assert relay.active and door.stats()["open"] is True
    await until(lambda: not relay.active, "the end of the pulse")
    door.call_ended("door-b", now)
    assert "operator" in door.open(None, None, now)
    await until(lambda: len(pulses(relay.history)) == 2 and not relay.active, "a second pulse")
    for start, end in pulses(relay.history):
        assert end is not None and end > start
    assert door.stats() == {
        "opened": 2,
        "refused": {"no-call": 1, "not-allowed": 1, "window-expired": 1},
        "open": False,
    }


async def test_closing_ends_a_pulse_at_once() -> None:
    chip = FakeChip()
    relay = chip.request_output(GpioLine(RELAY))
    door = DoorOpener(DEVICE, relay, GpioSettings(door_pulse_s=30))
    door.open(None, None, 0.0)
    assert door.stats()["open"] is True
    door.close()
    assert [level for _, level in relay.history] == [False, True, False]
    assert door.stats()["open"] is False


class BrokenLine:
    """An output the chip refuses to drive."""

    def set(self, active: bool) -> None:
        raise OSError("EIO")


async def test_a_broken_relay_is_a_refusal_not_a_crash() -> None:
    door = DoorOpener(DEVICE, BrokenLine(), FAST)
    with pytest.raises(DoorRefused, match="relay failed"):
        door.open(None, None, 0.0)
    assert door.refused["relay-failed"] == 1


# --- the call button ------------------------------------------------------------------------


def test_what_the_button_does_in_each_phase() -> None:
    assert button_command(Phase.IDLE, "door-b") == ("call", {"peer": "door-b"})
    assert button_command(Phase.ENDED, "door-b") == ("call", {"peer": "door-b"})
    assert button_command(Phase.IDLE, None) is None
    assert button_command(Phase.RINGING, None) == ("answer", {})
    for phase in (Phase.OUTGOING, Phase.CONNECTING, Phase.ACTIVE):
        assert button_command(phase, "door-b") == ("hangup", {})


class Commands:
    """Records what the button asks of the call runtime; replies ok."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.phase = Phase.IDLE

    async def __call__(self, name: str, args: Mapping[str, Any]) -> dict[str, Any]:
        self.sent.append((name, dict(args)))
        return {"ok": name != "hangup", "message": f"{name} done"}

    async def alert(self, alert: Alert) -> None:
        self.sent.append(("alert", alert.to_dict()))


async def test_button_presses_call_answer_and_hang_up() -> None:
    chip = FakeChip()
    board = GpioBoard(DEVICE, PINS, FAST, chip)
    commands = Commands()
    board.watch_button(commands, lambda: commands.phase)
    # Edge times a few seconds back: each edge settles the level before it, as the kernel's
    # timestamps would for a reader that was busy.
    t = asyncio.get_running_loop().time() - 10
    try:
        chip.press(BUTTON, at=t)
        await until(lambda: commands.sent, "the press")
        assert commands.sent == [("call", {"peer": "door-b"})]
        # A bouncing contact: edges 1 ms apart, then held: one press.
        commands.phase = Phase.RINGING
        for i in range(9):
            chip.set_input(BUTTON, i % 2 == 0, t + 1 + i * 0.001)
        chip.set_input(BUTTON, False, t + 1.5)
        await until(lambda: len(commands.sent) == 2, "the bounced press")
        commands.phase = Phase.ACTIVE
        chip.press(BUTTON, hold_s=0.005, at=t + 2)  # shorter than debounce_s: a glitch
        chip.press(BUTTON, at=t + 3)
        await until(lambda: len(commands.sent) == 3, "the press in a call")
        assert commands.sent[1:] == [("answer", {}), ("hangup", {})]
    finally:
        await board.close()


async def test_without_a_peer_the_button_only_answers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.gpio.board")
    chip = FakeChip()
    board = GpioBoard(DEVICE, PINS, GpioSettings(debounce_s=0.01), chip)
    commands = Commands()
    board.watch_button(commands, lambda: commands.phase)
    t = asyncio.get_running_loop().time() - 10
    try:
        chip.press(BUTTON, at=t)
        await until(lambda: "no button_peer" in caplog.text, "the press with no one to call")
        commands.phase = Phase.RINGING
        chip.press(BUTTON, at=t + 1)
        await until(lambda: commands.sent, "the press while ringing")
        assert commands.sent == [("answer", {})]
    finally:
        await board.close()


# --- the tamper switch ----------------------------------------------------------------------


async def tamper_alerts(outbox: Outbox) -> list[Alert]:
    return [a for a in await outbox.pending(10) if a.kind == TAMPER]


async def test_opening_the_enclosure_raises_one_alert(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.gpio.board")
    outbox = await Outbox.open(tmp_path / "outbox.db")
    chip = FakeChip()
    board = GpioBoard(DEVICE, PINS, FAST, chip)
    try:
        board.watch_tamper(outbox.add)
        chip.set_input(TAMPER_LINE, True)
        alerts: list[Alert] = []

        async def stored() -> bool:
            alerts[:] = await tamper_alerts(outbox)
            return bool(alerts)

        async with asyncio.timeout(WAIT):
            while not await stored():
                await asyncio.sleep(0.01)
        alert = alerts[0]
        assert (alert.detector, alert.severity) == ("gpio", Severity.CRITICAL)
        assert alert.detail == {"line": TAMPER_LINE, "at_start": False}
        # Closed, then opened again with a bounce: within the cool-down, no new alert.
        chip.set_input(TAMPER_LINE, False)
        await until(lambda: "enclosure closed" in caplog.text, "the closing")
        now = asyncio.get_running_loop().time()
        for i, level in enumerate((True, False, True)):
            chip.set_input(TAMPER_LINE, level, now + i * 0.001)
        await until(lambda: "opened again" in caplog.text, "the second opening")
        assert len(await tamper_alerts(outbox)) == 1
    finally:
        await board.close()
        await outbox.close()


async def test_an_enclosure_open_at_start_raises_an_alert(tmp_path: Path) -> None:
    outbox = await Outbox.open(tmp_path / "outbox.db")
    chip = FakeChip()
    board = GpioBoard(DEVICE, PINS, GpioSettings(tamper_cooldown_s=0), chip)
    chip.inputs[TAMPER_LINE].active = True
    try:
        board.watch_tamper(outbox.add)
        async with asyncio.timeout(WAIT):
            while not (alerts := await tamper_alerts(outbox)):
                await asyncio.sleep(0.01)
        assert alerts[0].detail["at_start"] is True
    finally:
        await board.close()
        await outbox.close()


async def test_a_failing_outbox_does_not_stop_the_watch() -> None:
    chip = FakeChip()
    board = GpioBoard(DEVICE, PINS, GpioSettings(debounce_s=0, tamper_cooldown_s=0), chip)
    tries: list[Alert] = []

    async def broken(alert: Alert) -> str:
        tries.append(alert)
        raise OSError("disk full")

    board.watch_tamper(broken)
    try:
        for _ in range(2):
            chip.set_input(TAMPER_LINE, True)
            chip.set_input(TAMPER_LINE, False)
        await until(lambda: len(tries) == 2, "two openings, each tried")
    finally:
        await board.close()


# --- the status LED -------------------------------------------------------------------------


async def test_gpio_led_shows_the_patterns() -> None:
    chip = FakeChip()
    line = chip.request_output(GpioLine(LED))
    led: Led = GpioLed(line, "fake line 22")
    await led.show(Indicator.IDLE)  # online: steady on
    assert line.history[-1][1] is True
    await led.show(Indicator.RINGING)  # blinks on its own
    await until(lambda: len(line.history) >= 6, "a few blinks")
    levels = [v for _, v in line.history[1:]]
    assert all(a != b for a, b in itertools.pairwise(levels))
    await led.show(Indicator.BEING_LISTENED)  # its own pattern, blinking too
    mark = len(line.history)
    await until(lambda: len(line.history) >= mark + 2, "the listened-to blink")
    await led.show(Indicator.IN_CALL)
    assert line.active
    mark = len(line.history)
    await asyncio.sleep(0)
    assert len(line.history) == mark  # no blinking task left
    await led.close()
    assert not line.active


async def test_gpio_led_failures_are_counted_and_tried_again() -> None:
    led = GpioLed(BrokenLine(), "broken")
    await led.show(Indicator.IN_CALL)
    await led.show(Indicator.IDLE)  # the same pattern, tried again: the last one failed
    await led.show(Indicator.RINGING)  # blinking fails in its task
    await until(lambda: led.failures == 3, "the blink's failure")
    await led.close()
    assert led.failures == 4


def test_every_indicator_has_a_gpio_pattern() -> None:
    assert set(PATTERNS) == set(Indicator)


# --- the board ------------------------------------------------------------------------------


async def test_a_board_without_pins_opens_no_chip() -> None:
    board = await GpioBoard.open(DEVICE, GpioPins(chip="none-such"), GpioSettings())
    assert (board.chip, board.led, board.door) == (None, None, None)
    commands = Commands()
    board.watch_button(commands, lambda: Phase.IDLE)  # no lines: nothing watched
    board.watch_tamper(commands.alert)
    await board.close()
    assert commands.sent == []


async def test_a_missing_chip_means_no_gpio_not_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    board = await GpioBoard.open(DEVICE, PINS, GpioSettings(chip="no-such-label"))
    assert board.chip is None and board.door is None
    assert "no GPIO chip named or labelled 'no-such-label'" in caplog.text
    await board.close()


async def test_a_line_taken_twice_is_refused_and_the_chip_released(tmp_path: Path) -> None:
    pins = GpioPins(call_button=GpioLine(5))
    chip = FakeChip()
    chip.request_output(GpioLine(5))
    with pytest.raises(GpioError, match="busy"):
        GpioBoard(DEVICE, pins, GpioSettings(), chip)
    with pytest.raises(GpioError, match="not requested as an input"):
        chip.set_input(6, True)
    with pytest.raises(GpioError, match="not requested as an output"):
        chip.output(6)
    # Through ``open``: a fake chip whose socket cannot be made is no GPIO.
    board = await GpioBoard.open(
        DEVICE, pins, GpioSettings(chip=f"fake:{tmp_path}/missing-dir/gpio.sock")
    )
    assert board.chip is None


def test_find_chip_names_what_it_found(tmp_path: Path) -> None:
    (tmp_path / "gpiochip0").write_text("not a device")
    with pytest.raises(GpioError, match=r"no GPIO chip named or labelled 'gpiochip0'.*none"):
        find_chip("gpiochip0", tmp_path)
    with pytest.raises(GpioError, match="not a GPIO chip device"):
        find_chip(str(tmp_path / "gpiochip0"))


async def test_a_served_fake_chip_is_driven_from_outside(tmp_path: Path) -> None:
    sock = tmp_path / "gpio.sock"
    settings = GpioSettings(chip=f"fake:{sock}", button_peer="door-b", debounce_s=0.01)
    board = await GpioBoard.open(DEVICE, PINS, settings)
    commands = Commands()
    board.watch_button(commands, lambda: Phase.IDLE)
    client = await FakeChipClient.connect(sock)
    try:
        await client.press(BUTTON)
        await until(lambda: commands.sent, "the press through the socket")
        assert board.door is not None
        board.door.open(None, None, 0.0)
        history = await client.history(RELAY)
        assert [v for _, v in history] == [False, True]
        await client.set(TAMPER_LINE, True)
        with pytest.raises(GpioError, match="not requested as an output"):
            await client.history(BUTTON)
        with pytest.raises(GpioError, match="unknown op"):
            await client.request(op="dance", line=1)
        with pytest.raises(GpioError, match="bad request"):
            await client.request(op="set")
    finally:
        await client.close()
        await board.close()


# --- configuration --------------------------------------------------------------------------


def test_gpio_settings_load_from_the_agent_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'state_dir = "{tmp_path}"\n'
        '[gpio]\nbutton_peer = "front-door"\ndoor_allowed = ["flat-1"]\n'
        "hangup_after_door = true\ndoor_pulse_s = 2\n"
    )
    gpio = load_config(path).gpio
    assert gpio == GpioSettings(
        button_peer="front-door", door_allowed=("flat-1",), hangup_after_door=True, door_pulse_s=2
    )
    path.write_text(f'state_dir = "{tmp_path}"\n[gpio]\ndoor_pulse = 2\n')
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path)


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"chip": "fake:"}, "chip must not be empty"),
        ({"debounce_s": -1}, "debounce_s"),
        ({"door_pulse_s": 0}, "door_pulse_s"),
        ({"door_pulse_s": 60}, "door_pulse_s"),
        ({"button_peer": "Front Door"}, "button_peer"),
        ({"door_allowed": ("ok", "#")}, "door_allowed"),
    ],
)
def test_bad_gpio_settings_are_refused(settings: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        GpioSettings(**settings)
