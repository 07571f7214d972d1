"""The relay benchmark end to end with a few devices, and the swarm's MQTT packets.

Only the shape of the result is checked (every device online, every message routed,
figures present and consistent); how fast the relay is, is the benchmark's business.
"""

from __future__ import annotations

import json

import pytest

from tools.bench import relay as bench
from tools.lab import mqtt_swarm as mq

PHASE_FIGURES = (
    "signaling_msgs_per_s", "route_p50_ms", "route_p99_ms", "route_max_ms", "relay_cpu_cores",
    "cpu_per_1k_msgs_s", "broker_cpu_cores", "swarm_cpu_cores",
)  # fmt: skip


def test_relay_benchmark_routes_every_call(capsys: pytest.CaptureFixture[str]) -> None:
    bench.main(["--devices", "50", "--seconds", "2", "--rate", "200", "--batch", "20"])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert any(line.startswith("relay: ") for line in lines[:-1])
    assert result["benchmark"] == "relay"
    assert result["devices_requested"] == result["devices"] == 50
    assert result["devices_online_at_end"] == 50 and result["devices_lost"] == 0
    for name in ("relay_phase", "baseline"):
        phase = result[name]
        assert phase["calls"] > 0, name
        assert phase["calls_completed"] == phase["calls"], name
        assert phase["messages"] == 4 * phase["calls"], name
        assert phase["lost"] == phase["unexpected"] == phase["calls_declined"] == 0, name
        for figure in PHASE_FIGURES:
            assert phase[figure] >= 0, (name, figure)
        assert 0 < phase["route_p50_ms"] <= phase["route_p99_ms"] <= phase["route_max_ms"]
    assert result["relay_phase"]["relay_cpu_cores"] > 0
    for figure in ("signaling_msgs_per_s", "route_p50_ms", "route_p99_ms", "cpu_per_1k_msgs_s"):
        assert result[figure] == result["relay_phase"][figure]
    assert result["rss_mb"] > 0
    assert result["relay_log_warnings"] == result["broker_drop_warnings"] == 0
    assert set(result["targets"]) == {"devices", "signaling_msgs_per_s", "route_p99_ms"}
    assert result["targets"]["devices"]["pass"] is False  # 50 < 10,000


def test_options_must_be_positive() -> None:
    for bad in (["--devices", "0"], ["--seconds", "-1"], ["--rate", "0"]):
        with pytest.raises(SystemExit):
            bench.build_parser().parse_args(bad)


def test_swarm_packets_round_trip() -> None:
    for n in (0, 127, 128, 16_383, 16_384, 268_435_455):
        encoded = mq.varint(n)
        assert mq.read_varint(encoded, 0) == (n, len(encoded))
        assert mq.read_varint(encoded[:-1], 0) is None  # cut short: wait for more
    with pytest.raises(mq.ProtocolError):
        mq.read_varint(b"\xff\xff\xff\xff\x01", 0)

    big = b"x" * 300
    stream = bytearray(
        mq.publish_packet("intercom/v1/dev/a/in", big, qos=1, packet_id=7)
        + mq.puback_packet(7)
        + mq.PINGREQ_PACKET
    )
    tail = stream[-5:]
    del stream[-5:]
    packets = list(mq.split_packets(stream))
    assert [kind for kind, _, _ in packets] == [mq.PUBLISH]  # the PUBACK is cut short
    stream += tail
    packets += list(mq.split_packets(stream))
    assert not stream
    kinds = [kind for kind, _, _ in packets]
    assert kinds == [mq.PUBLISH, mq.PUBACK, mq.PINGREQ]
    _, flags, body = packets[0]
    msg = mq.parse_publish(flags, body)
    assert (msg.topic, msg.payload, msg.qos, msg.retain, msg.packet_id) == (
        "intercom/v1/dev/a/in", big, 1, False, 7,
    )  # fmt: skip
    assert mq.parse_ack(packets[1][2]) == (7, 0)
    retained = mq.publish_packet("t", b"{}", qos=0, retain=True)
    _, flags, body = next(mq.split_packets(bytearray(retained)))
    assert mq.parse_publish(flags, body) == mq.Publish("t", b"{}", 0, True, 0)
