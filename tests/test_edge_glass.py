"""Glass-break detector (``agent.edge.glass``): seeded breaks and their look-alikes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from agent.edge.base import Detection
from agent.edge.glass import GlassBreakDetector, GlassBreakSettings
from tools.lab import events as ev
from tools.lab.sounds import detect

SEEDS = range(12)


def run(samples: np.ndarray, settings: GlassBreakSettings | None = None) -> list[Detection]:
    return detect(GlassBreakDetector(settings), samples)


def breaking(seed: int) -> np.ndarray:
    return ev.glass_break(seed, delay_s=0.01 + 0.012 * seed)


@pytest.fixture(scope="module")
def household() -> np.ndarray:
    return ev.household(20.0, seed=7)


@pytest.fixture(scope="module")
def music() -> np.ndarray:
    """Chords without drums: a drum kit's own rate of false alarms is tested on its own."""
    return ev.music(20.0, seed=9, rms_dbfs=-30.0, drums=False)


@pytest.mark.parametrize("seed", SEEDS)
def test_glass_break_gives_one_detection(seed: int) -> None:
    hits = run(ev.pad(breaking(seed), before_s=1.0, after_s=3.0))
    assert len(hits) == 1
    [hit] = hits
    assert hit.detector == "glass_break" and hit.kind == "glass_break"
    assert hit.start_s == pytest.approx(1.0, abs=0.03)  # the impact
    assert 1.1 <= hit.end_s <= 2.5  # the shatter's end
    assert 0.5 <= hit.confidence <= 1.0
    assert -20.0 < hit.level_dbfs < 0.0


@pytest.mark.parametrize("snr_db", [20, 10, 5])
@pytest.mark.parametrize("background", ["household", "music"])
def test_glass_break_in_background(
    snr_db: int, background: str, request: pytest.FixtureRequest
) -> None:
    bg = request.getfixturevalue(background)
    found = 0
    for seed in SEEDS:
        hits = run(ev.mix(bg, breaking(seed), at_s=5.0, snr_db=snr_db))
        assert len(hits) <= 1
        found += len(hits) == 1 and abs(hits[0].start_s - 5.0) < 0.1
    assert found >= 0.9 * len(SEEDS)


LOOK_ALIKES: dict[str, Callable[[int], np.ndarray]] = {
    "thud": ev.impact,
    "clank": ev.clank,
    "mail-slot": ev.mail_slot,
    "door-slam": ev.door_slam,
    "claps": ev.claps,
    "keys": ev.keys,
    "dropped-keys": lambda seed: ev.keys(seed, drop=True),
    "thud-then-hiss": ev.thud_hiss,
    "shatter-without-impact": ev.shatter,
}


@pytest.fixture(scope="module")
def tv() -> np.ndarray:
    """TV-like audio: speech over chords (no drums), 16 s, -30 dBFS."""
    talk = np.concatenate(
        [
            ev.speech("The weather tonight: showers spreading from the west, clearing by dawn."),
            ev.speech("And now, the news. The council has approved the new bridge over the river."),
            ev.speech("Sixty six sisters sell seashells, sir. Stop it, Chris!"),
        ]
    ).astype(np.float64)
    talk = np.resize(talk, 16 * ev.RATE)
    tune = ev.music(16.0, seed=21, rms_dbfs=-36.0, drums=False).astype(np.float64)
    return ev.to_int16(talk / np.sqrt(np.mean(talk**2)) * 1037.0 + tune)


@pytest.fixture(scope="module")
def hiss() -> np.ndarray:
    """A steady broadband hiss (a fan, rain on the window): white noise at -30 dBFS."""
    return ev.noise(16.0, -30.0, seed=22, color="white")


@pytest.mark.parametrize(("background", "snr_db"), [("tv", 5), ("hiss", 10)])
def test_glass_break_at_low_snr(
    background: str, snr_db: int, request: pytest.FixtureRequest
) -> None:
    """A break about as loud as the room. In speech the shatter stands out in the 8-16 kHz
    sub-bands, quiet between fricatives. In a steady hiss it rises only 6-10 dB over the
    high band, which counts because the hiss's own level hardly moves: the onset threshold
    follows each sub-band's spread (a fixed 10 dB rise missed a quarter of these)."""
    bg = request.getfixturevalue(background)
    found = 0
    for seed in SEEDS:
        at = 4.0 + 0.37 * seed
        hits = run(ev.mix(bg, breaking(seed), at_s=at, snr_db=snr_db))
        assert len(hits) <= 1
        found += len(hits) == 1 and abs(hits[0].start_s - at) < 0.1
    assert found >= 0.9 * len(SEEDS)


@pytest.fixture(scope="module")
def pink() -> np.ndarray:
    """A steady pink hiss (a room, a distant road) at -30 dBFS."""
    return ev.noise(16.0, -30.0, seed=24, color="pink")


@pytest.mark.parametrize("background", ["household", "pink"])
def test_glass_break_at_2_db_snr(background: str, request: pytest.FixtureRequest) -> None:
    """Under a background about as loud as the break, the clicks' peaks are smoothed over
    (a crest close to noise's) while the rings still stand out of the spectrum: a spiky,
    broadband shatter passes with that crest (a crest of 3.75 alone missed 2 of these 12)."""
    bg = request.getfixturevalue(background)
    found = 0
    for seed in SEEDS:
        at = 4.0 + 0.37 * seed
        hits = run(ev.mix(bg, breaking(seed), at_s=at, snr_db=2))
        assert len(hits) <= 1
        found += len(hits) == 1 and abs(hits[0].start_s - at) < 0.1
    assert found >= 0.9 * len(SEEDS)


def thud_buzz(f0_hz: float) -> np.ndarray:
    """A thud then 0.5 s of a buzz (a door buzzer, a dropped shaver): every harmonic of
    ``f0_hz`` up to 16 kHz, so broadband, spiky and, being a pulse train, impulsive."""
    t = np.arange(ev.RATE // 2) / ev.RATE
    buzz = sum(np.cos(2 * np.pi * k * f0_hz * t) for k in range(1, int(16000 / f0_hz)))
    buzz *= np.exp(-t / 0.25) * 0.3 * 32767 / np.max(np.abs(buzz))
    out = np.zeros(4 * ev.RATE)
    ev.place(out, ev.impact(3).astype(np.float64), 1.0)
    ev.place(out, buzz, 1.03)
    return ev.to_int16(out)


def test_thud_then_buzz_does_not_fire() -> None:
    """A buzz's harmonics pass every other shape check of a shatter, but stay at the same
    frequencies from frame to frame, where shards ring at new ones."""
    buzzes = [thud_buzz(f0) for f0 in range(170, 250, 10)]
    assert [run(buzz) for buzz in buzzes] == [[]] * len(buzzes)
    without_repeat = GlassBreakSettings(max_repeat=1.0)
    assert sum(len(run(buzz, without_repeat)) for buzz in buzzes) >= len(buzzes) // 2


def test_spiky_shatter_must_move(hiss: np.ndarray) -> None:
    """Dropped keys ring partials of 20-100 ms: spiky and broadband like shards, but the same
    peaks over several frames. In a hiss their crest is close to noise's, as a faint shatter's
    is, and the spiky path's stricter limit on repeated peaks is what refuses them."""
    sounds = [
        ev.mix(hiss, ev.keys(seed, drop=True), at_s=4.0 + 0.37 * seed, snr_db=5) for seed in SEEDS
    ]
    assert [run(sound) for sound in sounds] == [[]] * len(sounds)
    loose = GlassBreakSettings(max_spiky_repeat=0.4)
    assert sum(len(run(sound, loose)) for sound in sounds) >= 1


@pytest.mark.parametrize("background", ["tv", "hiss"])
@pytest.mark.parametrize("name", ["thud-then-hiss", "mail-slot", "door-slam", "dropped-keys"])
def test_look_alikes_do_not_fire_at_5_db_snr(
    name: str, background: str, request: pytest.FixtureRequest
) -> None:
    """The lower onset threshold of a steady background lets no look-alike through: what
    the rise admits, the shape checks (duration, flatness, crest) still judge."""
    bg = request.getfixturevalue(background)
    make = LOOK_ALIKES[name]
    for seed in SEEDS:
        sound = make(seed)
        assert run(ev.mix(bg, sound, at_s=4.0 + 0.37 * seed, snr_db=5)) == [], f"seed {seed}"


def test_onset_threshold_follows_the_background_spread() -> None:
    """In a steady hiss a shatter 6 dB over the high band is an onset; with the spread rule
    off (a fixed 10 dB rise, as in a fluctuating background) it is not."""
    bg = ev.noise(10.0, -30.0, seed=23, color="white")
    quiet = ev.mix(bg, breaking(2), at_s=5.0, snr_db=3)
    assert len(run(quiet)) == 1
    fixed = GlassBreakSettings(min_rise_db=10.0, min_sustain_db=6.0)
    assert run(quiet, fixed) == []


@pytest.mark.parametrize("name", sorted(LOOK_ALIKES))
def test_look_alikes_do_not_fire(name: str, household: np.ndarray) -> None:
    make = LOOK_ALIKES[name]
    for seed in SEEDS:
        sound = make(seed)
        assert run(ev.pad(sound)) == [], f"{name} seed {seed}"
        assert run(ev.mix(household, sound, at_s=5.0, snr_db=10)) == [], f"{name} seed {seed}"


@pytest.mark.parametrize(
    "make",
    [
        lambda: ev.household(180.0, seed=11),
        lambda: ev.music(180.0, seed=12, drums=False),
        lambda: ev.music(60.0, seed=13, rms_dbfs=-12.0, drums=False),
        lambda: ev.noise(60.0, -30.0, seed=14, color="pink"),
    ],
    ids=["household-3min", "music-3min", "loud-music", "pink"],
)
def test_backgrounds_do_not_fire(make: Callable[[], np.ndarray]) -> None:
    assert run(make()) == []


def test_drum_kit_rarely_fires() -> None:
    """A kick with a crash cymbal on it is a thud and then broadband noise: the noise checks
    (crest, local flatness) reject nearly all of them, not all. The count over 9 minutes
    of drum-heavy music is pinned here (a known weakness); ``tools/bench/run detect``
    reports the rate per hour of TV and music."""
    clips = [ev.music(60.0, seed=13, rms_dbfs=-12.0)]
    clips += [ev.music(120.0, seed=100 + s, rms_dbfs=-20.0) for s in range(4)]
    assert sum(len(run(clip)) for clip in clips) <= 2


def test_speech_does_not_fire() -> None:
    speech = np.concatenate(
        [
            ev.speech("Sixty six sisters sell seashells, sir. Stop it, Chris!"),
            ev.speech("Crash! Smash! Pass the glass, Sasha, and switch off the fish pump."),
        ]
    )
    assert run(ev.pad(speech)) == []


def test_cooldown_gives_one_detection_per_break() -> None:
    twice = np.zeros(20 * ev.RATE)
    ev.place(twice, breaking(1).astype(np.float64), 1.0)
    ev.place(twice, breaking(2).astype(np.float64), 3.0)  # debris, 2 s later
    ev.place(twice, breaking(3).astype(np.float64), 12.0)  # another pane
    samples = ev.to_int16(twice)
    assert [round(h.start_s) for h in run(samples)] == [1, 12]
    no_cooldown = GlassBreakSettings(cooldown_s=0.0)
    assert [round(h.start_s) for h in run(samples, no_cooldown)] == [1, 3, 12]


def test_shatter_window_is_a_setting() -> None:
    late = ev.pad(ev.glass_break(4, delay_s=0.35))
    assert run(late) == []
    assert len(run(late, GlassBreakSettings(shatter_window_s=0.4))) == 1


def test_thresholds_are_settings() -> None:
    sound = ev.pad(breaking(5))
    assert len(run(sound)) == 1
    assert run(sound, GlassBreakSettings(impact_min_dbfs=-5.0)) == []  # a louder impact needed
    assert run(sound, GlassBreakSettings(min_flatness=0.6)) == []
    assert run(sound, GlassBreakSettings(min_crest=8.0, min_spiky_crest=8.0)) == []
    # A spiky spectrum lets a lower crest through (3.3 instead of 3.75), if its peaks move.
    assert len(run(sound, GlassBreakSettings(min_crest=8.0))) == 1
    assert run(sound, GlassBreakSettings(min_crest=8.0, spiky_local_flatness=0.3)) == []
    assert run(sound, GlassBreakSettings(min_crest=8.0, max_spiky_repeat=0.0)) == []
    assert run(sound, GlassBreakSettings(min_shatter_s=1.4)) == []
    # Without the noise checks, a thud then smooth hiss passes for glass: they matter.
    hiss = ev.pad(ev.thud_hiss(3))
    assert run(hiss) == []
    assert run(hiss, GlassBreakSettings(min_crest=0.0)) == []
    assert run(hiss, GlassBreakSettings(max_local_flatness=1.0)) == []
    assert len(run(hiss, GlassBreakSettings(min_crest=0.0, max_local_flatness=1.0))) == 1


def test_reset_restarts_the_clock() -> None:
    detector = GlassBreakDetector()
    detect(detector, ev.pad(breaking(6), before_s=5.0))
    detector.reset()
    hits = detect(detector, ev.pad(breaking(6), before_s=0.5))
    assert [round(h.start_s, 1) for h in hits] == [0.5]


@pytest.mark.parametrize(
    "bad",
    [
        {"impact_rise_db": -1.0},
        {"shatter_window_s": 5.0},
        {"min_flatness": 2.0},
        {"min_crest": "high"},
        {"cooldown_s": None},
        {"high_band_hz": (16000.0, 4000.0)},
        {"low_band_hz": (40.0, 30000.0)},
        {"low_band_hz": "40-1000"},
        {"max_shatter_s": 0.05},
        {"high_bands": 0},
        {"onset_bands": 5},
        {"sustain_bands": 2.0},
        {"min_rise_db": 12.0},
        {"min_sustain_db": 7.0},
        {"min_spiky_crest": -1.0},
        {"max_repeat": 2.0},
    ],
)
def test_settings_refused(bad: dict[str, object]) -> None:
    name = next(iter(bad))
    with pytest.raises(ValueError, match=rf"GlassBreakSettings\.{name} must"):
        GlassBreakSettings(**bad)  # type: ignore[arg-type]


def test_settings_take_toml_lists_and_ints() -> None:
    settings = GlassBreakSettings(high_band_hz=[3000, 15000], cooldown_s=10)  # type: ignore[arg-type]
    assert settings.high_band_hz == (3000.0, 15000.0)
    assert settings.cooldown_s == 10.0


def test_frames_must_be_960_int16() -> None:
    with pytest.raises(ValueError, match="960 int16"):
        GlassBreakDetector().feed(np.zeros(480, np.int16))
