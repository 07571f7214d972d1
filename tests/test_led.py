"""The status LED through the Linux LED class attributes (a directory of the same files)."""

from __future__ import annotations

from pathlib import Path

from agent.calls.machine import Indicator
from agent.service.led import OFF, ON, PATTERNS, StatusLed


def attributes(led: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(led.iterdir())}


def test_every_indicator_has_a_pattern_and_being_listened_stands_out() -> None:
    assert set(PATTERNS) == set(Indicator)
    listened = PATTERNS[Indicator.BEING_LISTENED]
    others = {PATTERNS[i] for i in Indicator if i is not Indicator.BEING_LISTENED}
    assert listened not in others and listened not in (ON, OFF)


async def test_steady_and_blinking_patterns_are_written(tmp_path: Path) -> None:
    led = StatusLed(tmp_path)
    await led.show(Indicator.RINGING)
    assert attributes(tmp_path) == {"delay_off": "250", "delay_on": "250", "trigger": "timer"}
    await led.show(Indicator.IN_CALL)
    assert (attributes(tmp_path)["trigger"], attributes(tmp_path)["brightness"]) == ("none", "1")
    (tmp_path / "brightness").write_text("x")
    await led.show(Indicator.LISTENING)  # the same pattern: nothing written
    assert (tmp_path / "brightness").read_text() == "x"
    await led.close()  # the agent stops: off
    assert (attributes(tmp_path)["trigger"], attributes(tmp_path)["brightness"]) == ("none", "0")
    await led.show(Indicator.IDLE)  # online: steady
    assert (attributes(tmp_path)["trigger"], attributes(tmp_path)["brightness"]) == ("none", "1")


async def test_a_missing_led_is_counted_not_raised(tmp_path: Path) -> None:
    led = StatusLed(tmp_path / "gone")
    await led.show(Indicator.RINGING)
    await led.show(Indicator.RINGING)  # tried again: the last write did not land
    assert led.failures == 2
