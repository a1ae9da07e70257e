"""QoS 2 both ways, packet ids, DUP on resend and in-flight limits (Receive Maximum), with two
real nodes, paho (3.1.1 and 5), mosquitto_sub/mosquitto_pub and raw sockets."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from tests.helpers import RawMQTT, await_route, connect_packet, stop_all
from tests.mqttkit import (
    Client,
    MosquittoSub,
    ack,
    connect_v5,
    mosquitto_pub,
    needs_mosquitto_clients,
    publish_v5,
    read_publish,
    subscribe_311,
    subscribe_v5,
    two_nodes,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list]:
    started = two_nodes(tmp_path_factory.mktemp("qos2"))
    try:
        yield started
    finally:
        stop_all(started)


def prefix() -> str:
    return f"q2-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["3.1.1", "5"])
def test_qos2_across_the_mesh_arrives_exactly_once_at_qos2(nodes: list, protocol: int) -> None:
    a, b = nodes
    p = prefix()
    sub = Client(b.mqtt_port, protocol=protocol)
    pub = Client(a.mqtt_port, protocol=protocol)
    try:
        assert sub.subscribe(f"{p}/#", qos=2) == [2]  # granted QoS 2
        await_route(pub, sub, f"{p}/probe")
        for i in range(30):
            pub.publish(f"{p}/x", f"m{i}", qos=2)  # waits for PUBCOMP
        got = sub.collect(30)
        assert [m.payload for m in got] == [f"m{i}".encode() for i in range(30)]  # in order, once each
        assert {m.qos for m in got} == {2}
        # A QoS 1 message to a QoS 2 subscription stays QoS 1; QoS 2 to a QoS 1 one is downgraded.
        pub.publish(f"{p}/one", b"q1", qos=1)
        assert sub.get().qos == 1
        assert sub.drain() == []
    finally:
        sub.close()
        pub.close()


def test_outbound_qos2_flow_on_the_wire_and_resend_after_reconnect(nodes: list) -> None:
    """PUBLISH(QoS 2) -> PUBREC -> PUBREL -> PUBCOMP as the node sends it; an unanswered
    PUBLISH is sent again with DUP and the same packet id on reconnect, and an unanswered
    PUBREL is sent again as PUBREL (the message itself is not delivered twice)."""
    a, b = nodes
    p = prefix()
    client_id = f"raw-{p}"
    pub = Client(a.mqtt_port)
    try:
        with RawMQTT(b.mqtt_port) as raw:
            assert raw.connect(client_id, clean=False) == b"\x00\x00"
            raw.send(subscribe_311(1, f"{p}/#", 2))
            assert raw.read_packet() == (0x90, b"\x00\x01\x02")
            # The route a -> b: probes at QoS 0 until one arrives.
            for _ in range(50):
                pub.publish(f"{p}/probe", b"probe", qos=0)
                try:
                    if read_publish(raw, timeout=0.2).payload == b"probe":
                        break
                except TimeoutError:
                    continue
            pub.publish(f"{p}/t", b"first", qos=2)
            message = read_publish(raw)
            while message.payload == b"probe":
                message = read_publish(raw)
            assert (message.topic, message.payload, message.qos, message.dup) == (f"{p}/t", b"first", 2, False)
            first_id = message.packet_id
            # Leave without answering.
        with RawMQTT(b.mqtt_port) as raw:
            assert raw.connect(client_id, clean=False) == b"\x01\x00"  # session present
            again = read_publish(raw)
            assert (again.payload, again.packet_id, again.dup, again.qos) == (b"first", first_id, True, 2)
            raw.send(ack(0x50, first_id))  # PUBREC
            assert raw.read_packet() == (0x62, first_id.to_bytes(2, "big"))  # PUBREL
            # Leave before PUBCOMP.
        with RawMQTT(b.mqtt_port) as raw:
            assert raw.connect(client_id, clean=False) == b"\x01\x00"
            assert raw.read_packet() == (0x62, first_id.to_bytes(2, "big"))  # PUBREL again, no PUBLISH
            raw.send(ack(0x70, first_id))  # PUBCOMP
            pub.publish(f"{p}/t", b"second", qos=2)
            second = read_publish(raw)
            assert (second.payload, second.dup) == (b"second", False)
            assert second.packet_id != 0
            raw.send(ack(0x50, second.packet_id))
            assert raw.read_packet() == (0x62, second.packet_id.to_bytes(2, "big"))
            raw.send(ack(0x70, second.packet_id))
            raw.send(connect_packet(client_id)[:0] + b"\xe0\x00")  # DISCONNECT
        # Clean up the persistent session.
        with RawMQTT(b.mqtt_port) as raw:
            assert raw.connect(client_id, clean=True) == b"\x00\x00"
    finally:
        pub.close()


def test_client_receive_maximum_limits_what_is_in_flight(nodes: list) -> None:
    """A v5 client with Receive Maximum 2 has at most 2 unacknowledged messages at a time."""
    a, _ = nodes
    p = prefix()
    pub = Client(a.mqtt_port)
    try:
        with RawMQTT(a.mqtt_port) as raw:
            raw.send(connect_v5(f"rm-{p}", properties={"ReceiveMaximum": 2}))
            first, _ = raw.read_packet()
            assert first == 0x20
            raw.send(subscribe_v5(1, f"{p}/#", 1))
            assert raw.read_packet()[0] == 0x90
            for i in range(5):
                pub.publish(f"{p}/t", f"m{i}", qos=1)
            got = [read_publish(raw, 5) for _ in range(2)]
            assert [m.payload for m in got] == [b"m0", b"m1"]
            closed, data = raw.closed_within(0.5)  # nothing more until an ack
            assert not closed and data == b"", data
            raw.send(ack(0x40, got[0].packet_id))
            assert read_publish(raw, 5).payload == b"m2"
            raw.send(ack(0x40, got[1].packet_id))
            third = read_publish(raw, 5)
            assert third.payload == b"m3"
    finally:
        pub.close()


def test_inbound_receive_maximum_is_enforced(nodes: list) -> None:
    """More unreleased QoS 2 messages than the node's Receive Maximum (mqtt.max_inflight,
    20): DISCONNECT 0x93."""
    a, _ = nodes
    with RawMQTT(a.mqtt_port) as raw:
        raw.send(connect_v5(f"flood-{prefix()}"))
        first, body = raw.read_packet()
        assert first == 0x20 and body[1] == 0
        for packet_id in range(1, 21):
            raw.send(publish_v5(f"{prefix()}/x", b"x", qos=2, packet_id=packet_id))
            assert raw.read_packet() == (0x50, packet_id.to_bytes(2, "big"))  # PUBREC, no PUBREL yet
        raw.send(publish_v5(f"{prefix()}/x", b"x", qos=2, packet_id=21))
        closed, data = raw.closed_within(5)
        assert closed
        assert data[:1] == b"\xe0" and data[2] == 0x93, data  # DISCONNECT, Receive Maximum exceeded


@needs_mosquitto_clients
def test_mosquitto_clients_at_qos2_across_nodes(nodes: list) -> None:
    a, b = nodes
    p = prefix()
    sub = MosquittoSub(b.mqtt_port, "-q", "2", "-t", f"{p}/#", "-V", "mqttv5")
    pub = Client(a.mqtt_port)
    try:
        sub.await_route(pub, f"{p}/probe")
        for i in range(10):
            result = mosquitto_pub(a.mqtt_port, "-q", "2", "-t", f"{p}/m", "-m", f"n{i}", "-V", "mqttv5")
            assert result.returncode == 0, result.stderr
        # A fence after the ten: every line before it is what QoS 2 delivered, in order, once.
        assert mosquitto_pub(a.mqtt_port, "-q", "2", "-t", f"{p}/end", "-m", "fence").returncode == 0
        lines = []
        while (line := sub.get()) != f"{p}/end fence":
            if not line.endswith(" probe"):
                lines.append(line)
        assert lines == [f"{p}/m n{i}" for i in range(10)]
    finally:
        sub.close()
        pub.close()
