"""MQTT topic names of the control plane (ARCHITECTURE.md, "Control plane: MQTT v5").

Every device topic is ``intercom/v1/dev/{id}/{kind}``. This module builds them,
parses them back and refuses anything else: a topic that arrives from the broker
either names one device and one known kind, or raises ``TopicError``.

Device ids are issued at pairing and become topic levels, ACL patterns and
certificate subjects, so their syntax is narrow: lowercase ASCII letters, digits
and ``-``, starting with a letter or digit, at most 63 characters. That rules out
MQTT wildcards (``+``, ``#``), level separators (``/``), ``$`` prefixes, NUL and
anything that case-folds or normalises into something else.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import NamedTuple

ROOT = "intercom/v1"
"""Topic root; the version in it changes only with an incompatible topic layout."""

_DEVICES = f"{ROOT}/dev/"

_DEVICE_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")

RELAY_ID = "relay"
"""The relay's own address in envelopes it originates (e.g. a rejection); never a device id.

It has device-id syntax so that ``from``/``to`` need one rule; pairing must not issue it.
"""

WEB_PEER_PREFIX = "web."
"""Ids of web peers: ``web.<name>``, a browser the relay speaks for (``cloud_relay.webcall``).

A web peer is no paired device: it has no key, no certificate and no topics. The relay,
which authenticated the person behind it (a dashboard session or an API token named
``<name>``), originates its envelopes and signs them with its own key. The ``.`` keeps the
namespace apart from device ids, which pairing issues without one, so no device can ever
be a web peer nor a web peer a device; ``WEB_PEERS`` in a policy list stands for all of them.
"""

WEB_PEERS = "web.*"
"""A call-policy entry that matches every web peer (and nothing else)."""

_WEB_PEER_ID = re.compile(r"web\.[a-z0-9][a-z0-9_.-]{0,58}")
"""At most 63 characters, as a device id (the relay stores both in the same columns)."""

RELAY_SHARE_GROUP = "relay"
"""MQTT v5 shared-subscription group of the relay workers."""


class TopicError(ValueError):
    """A topic or device id outside the contract; the text says why."""


class Kind(StrEnum):
    """The last level(s) of a device topic."""

    PRESENCE = "presence"
    OUT = "out"
    IN = "in"
    CMD = "cmd"
    REPLY = "reply"
    ALERT = "alert"
    ALERT_ACK = "alert/ack"
    TELEMETRY = "telemetry"
    CONFIG = "config"


QOS: dict[Kind, int] = {kind: 0 if kind is Kind.TELEMETRY else 1 for kind in Kind}
"""QoS of each kind, from the topic table."""

RETAINED: frozenset[Kind] = frozenset({Kind.PRESENCE, Kind.CONFIG})
"""Kinds published with the retain flag."""

DEVICE_PUBLISHES: frozenset[Kind] = frozenset(
    {Kind.PRESENCE, Kind.OUT, Kind.REPLY, Kind.ALERT, Kind.TELEMETRY}
)
"""What a device may write below its own ``dev/{id}/`` (broker ACL)."""

DEVICE_SUBSCRIBES: frozenset[Kind] = frozenset({Kind.IN, Kind.CMD, Kind.CONFIG, Kind.ALERT_ACK})
"""What a device may read below its own ``dev/{id}/`` (broker ACL)."""


class DeviceTopic(NamedTuple):
    device_id: str
    kind: Kind


def is_device_id(value: object) -> bool:
    return isinstance(value, str) and _DEVICE_ID.fullmatch(value) is not None


def check_device_id(value: object) -> str:
    """Return ``value`` if it is a well-formed device id, else raise ``TopicError``."""
    if not isinstance(value, str):
        raise TopicError(f"device id must be a string, not {type(value).__name__}")
    if _DEVICE_ID.fullmatch(value) is None:
        raise TopicError(
            f"bad device id {value[:80]!r}: use 1-63 of a-z, 0-9, '-', not starting with '-'"
        )
    return value


def is_web_peer(value: object) -> bool:
    return isinstance(value, str) and _WEB_PEER_ID.fullmatch(value) is not None


def check_peer_id(value: object) -> str:
    """Return ``value`` if it is a device id or a web peer id (an envelope's ``from``/``to``),
    else raise ``TopicError``."""
    if is_web_peer(value):
        assert isinstance(value, str)
        return value
    return check_device_id(value)


def signer_of(peer: str) -> str:
    """Whose certificate must sign what ``peer`` sends: the relay's for a web peer (it speaks
    for the browser), the device's own otherwise."""
    return RELAY_ID if is_web_peer(peer) else peer


def is_relay_name(value: str) -> bool:
    """``relay`` and ``relay-*``: the relay's own MQTT client ids, never a device's (on the
    relay's listener a device with such an id could take over a relay session)."""
    return value == RELAY_ID or value.startswith(RELAY_ID + "-")


def device_topic(device_id: str, kind: Kind) -> str:
    """``intercom/v1/dev/{device_id}/{kind}``."""
    return f"{_DEVICES}{check_device_id(device_id)}/{Kind(kind).value}"


def device_tree(device_id: str) -> str:
    """Filter for everything below one device: ``intercom/v1/dev/{device_id}/#``."""
    return f"{_DEVICES}{check_device_id(device_id)}/#"


def all_devices(kind: Kind) -> str:
    """Filter for one kind of every device, e.g. ``intercom/v1/dev/+/presence``."""
    return f"{_DEVICES}+/{Kind(kind).value}"


def shared(topic_filter: str, group: str = RELAY_SHARE_GROUP) -> str:
    """The MQTT v5 shared subscription ``$share/{group}/{topic_filter}``."""
    if not is_device_id(group):
        raise TopicError(f"bad share group {group!r}")
    return f"$share/{group}/{topic_filter}"


RELAY_OUT_FILTER = shared(all_devices(Kind.OUT))
"""What relay workers subscribe to for routing: ``$share/relay/intercom/v1/dev/+/out``."""

_KINDS = {kind.value: kind for kind in Kind}


def parse_topic(topic: str) -> DeviceTopic:
    """Split a concrete device topic into (device id, kind); anything else is a ``TopicError``.

    Filters (``+``, ``#``), shared-subscription prefixes, other roots, extra or
    empty levels, and unknown kinds are all refused.
    """
    if not isinstance(topic, str):
        raise TopicError(f"topic must be a string, not {type(topic).__name__}")
    if not topic.startswith(_DEVICES):
        raise TopicError(f"topic {topic[:120]!r} is not below {_DEVICES!r}")
    device_id, sep, rest = topic[len(_DEVICES) :].partition("/")
    if not sep:
        raise TopicError(f"topic {topic[:120]!r} has no kind after the device id")
    kind = _KINDS.get(rest)
    if kind is None:
        raise TopicError(f"topic {topic[:120]!r}: unknown kind {rest[:40]!r}")
    try:
        check_device_id(device_id)
    except TopicError as exc:
        raise TopicError(f"topic {topic[:120]!r}: {exc}") from None
    return DeviceTopic(device_id, kind)
