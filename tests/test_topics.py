"""Control-plane topics: build/parse round trips, and everything outside the table refused."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.signaling.topics import (
    DEVICE_PUBLISHES,
    DEVICE_SUBSCRIBES,
    QOS,
    RELAY_OUT_FILTER,
    RETAINED,
    DeviceTopic,
    Kind,
    TopicError,
    all_devices,
    check_device_id,
    device_topic,
    device_tree,
    is_device_id,
    parse_topic,
    shared,
)

device_ids = st.from_regex(r"[a-z0-9][a-z0-9-]{0,62}", fullmatch=True)


def test_the_table_by_hand() -> None:
    assert device_topic("door-1", Kind.PRESENCE) == "intercom/v1/dev/door-1/presence"
    assert device_topic("door-1", Kind.ALERT_ACK) == "intercom/v1/dev/door-1/alert/ack"
    assert {k.value for k in Kind} == {
        "presence",
        "out",
        "in",
        "cmd",
        "reply",
        "alert",
        "alert/ack",
        "telemetry",
        "config",
    }
    assert RELAY_OUT_FILTER == "$share/relay/intercom/v1/dev/+/out"
    assert all_devices(Kind.PRESENCE) == "intercom/v1/dev/+/presence"
    assert device_tree("door-1") == "intercom/v1/dev/door-1/#"
    assert shared("a/b", "workers") == "$share/workers/a/b"
    assert QOS[Kind.TELEMETRY] == 0
    assert all(QOS[k] == 1 for k in Kind if k is not Kind.TELEMETRY)
    assert {Kind.PRESENCE, Kind.CONFIG} == RETAINED
    # Every kind is written by exactly one side: the device or the relay/operator.
    assert DEVICE_PUBLISHES.isdisjoint(DEVICE_SUBSCRIBES)
    assert set(Kind) == DEVICE_PUBLISHES | DEVICE_SUBSCRIBES


@given(device_ids, st.sampled_from(Kind))
def test_build_parse_round_trip(device_id: str, kind: Kind) -> None:
    topic = device_topic(device_id, kind)
    assert parse_topic(topic) == DeviceTopic(device_id, kind)
    assert is_device_id(device_id)
    assert check_device_id(device_id) == device_id


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("intercom/v1/dev/+/out", "bad device id"),
        ("intercom/v1/dev/#", "no kind"),
        ("intercom/v1/dev/a/#", "unknown kind"),
        ("intercom/v1/dev/a/+", "unknown kind"),
        ("intercom/v1/dev/a/alert/+", "unknown kind"),
        ("$share/relay/intercom/v1/dev/a/out", "not below"),
        ("intercom/v2/dev/a/out", "not below"),
        ("/intercom/v1/dev/a/out", "not below"),
        ("other/v1/dev/a/out", "not below"),
        ("intercom/v1/dev/a", "no kind"),
        ("intercom/v1/dev/a/", "unknown kind ''"),
        ("intercom/v1/dev//out", "bad device id"),
        ("intercom/v1/dev/a/out/", "unknown kind"),
        ("intercom/v1/dev/a/out/x", "unknown kind"),
        ("intercom/v1/dev/a/alert/ack/x", "unknown kind"),
        ("intercom/v1/dev/a/OUT", "unknown kind"),
        ("intercom/v1/dev/Door/out", "bad device id"),
        ("intercom/v1/dev/-a/out", "bad device id"),
        ("intercom/v1/dev/a_b/out", "bad device id"),
        ("intercom/v1/dev/a.b/out", "bad device id"),
        ("intercom/v1/dev/a\x00/out", "bad device id"),
        ("intercom/v1/dev/a\n/out", "bad device id"),
        ("intercom/v1/dev/\u0661/out", "bad device id"),  # Arabic-Indic digit one
        ("intercom/v1/dev/" + "a" * 64 + "/out", "bad device id"),
        ("", "not below"),
    ],
)
def test_parse_refuses(topic: str, reason: str) -> None:
    with pytest.raises(TopicError, match=reason):
        parse_topic(topic)


@pytest.mark.parametrize(
    "device_id", ["", "+", "#", "a/b", "a+", "$sys", "A", "-a", "a b", "é", "a" * 64, "a\n"]
)
def test_bad_device_ids_refused_by_builders(device_id: str) -> None:
    assert not is_device_id(device_id)
    with pytest.raises(TopicError, match="bad device id"):
        device_topic(device_id, Kind.OUT)
    with pytest.raises(TopicError, match="bad device id"):
        device_tree(device_id)


def test_non_strings_refused() -> None:
    assert not is_device_id(7)
    with pytest.raises(TopicError, match="must be a string"):
        check_device_id(b"door")
    with pytest.raises(TopicError, match="must be a string"):
        parse_topic(b"intercom/v1/dev/a/out")  # type: ignore[arg-type]
    with pytest.raises(TopicError, match="share group"):
        shared("a/b", "re/lay")


@given(st.text(max_size=120))
def test_garbage_raises_only_topic_error(topic: str) -> None:
    with contextlib.suppress(TopicError):
        device_id, kind = parse_topic(topic)
        assert device_topic(device_id, kind) == topic


@given(device_ids, st.sampled_from(Kind), st.sampled_from(["+", "#", "/", "$", "\x00", "A"]))
def test_any_foreign_character_in_the_id_is_refused(device_id: str, kind: Kind, bad: str) -> None:
    topic = device_topic(device_id, kind)
    start = len("intercom/v1/dev/")
    for at in (start, start + len(device_id) // 2, start + len(device_id)):
        tampered = topic[:at] + bad + topic[at:]
        with pytest.raises(TopicError):
            parse_topic(tampered)
