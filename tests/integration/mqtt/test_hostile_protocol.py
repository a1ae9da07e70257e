"""Issue 14, holes 8 and 14: protocol rules a hostile client breaks, against a real node.

Every test drives raw bytes at a real node process (``RawMQTT``, packets built by hand or
with paho's property encoder, independent of zmesh's codec) and checks what the spec asks:
a CONNACK code or a DISCONNECT reason, and the connection closed. The node must stay
healthy for everyone else: each test ends by proving a fresh client still gets an answer,
and the module ends by checking that no hostile input stalled the node's event loop.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.helpers import (
    NodeProcess,
    RawMQTT,
    _str16,
    connect_packet,
    make_certs,
    packet,
    publish_packet,
)
from tests.mqttkit import (
    ack,
    connect_v5,
    publish_v5,
    read_publish,
    subscribe_311,
    subscribe_v5,
)

pytestmark = pytest.mark.timeout(90)

PINGREQ = b"\xc0\x00"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    workdir = tmp_path_factory.mktemp("hostile-protocol")
    started = NodeProcess(workdir, "a", make_certs(workdir / "certs", ["a"]))
    try:
        yield started
        # No hostile input above may have held the loop for more than 50 ms.
        assert started.loop_stalls()["stalls_total"] == 0, started.loop_stalls()
    finally:
        started.stop()


def cid() -> str:
    return f"h-{uuid.uuid4().hex[:8]}"


def still_serving(node: NodeProcess) -> None:
    with RawMQTT(node.mqtt_port) as raw:
        assert raw.connect(cid())[1] == 0
        raw.send(PINGREQ)
        assert raw.read_packet()[0] == 0xD0


def closed(raw: RawMQTT, timeout: float = 5) -> bytes:
    """Wait for the node to close ``raw``; the bytes it sent meanwhile."""
    done, data = raw.closed_within(timeout)
    assert done, f"connection still open; node sent {data!r}"
    return data


# ---------------------------------------------------------------------------- MQTT-4.12.0-1


def test_unsupported_authentication_method_gets_0x8c_and_close(node: NodeProcess) -> None:
    with RawMQTT(node.mqtt_port) as raw:
        raw.send(connect_v5(cid(), properties={"AuthenticationMethod": "SCRAM-SHA-256"}))
        first, body = raw.read_packet()
        assert first == 0x20 and body[1] == 0x8C, (hex(first), body)  # Bad authentication method
        closed(raw)
    still_serving(node)


# ---------------------------------------------------------------------------- MQTT-4.8.0-1


def _subscriber(node: NodeProcess, level: int, qos: int) -> tuple[RawMQTT, str]:
    topic = f"acks/{uuid.uuid4().hex[:8]}"
    raw = RawMQTT(node.mqtt_port)
    if level == 5:
        raw.send(connect_v5(cid()))
        assert raw.read_packet()[0] == 0x20
        raw.send(subscribe_v5(1, topic, qos))
    else:
        raw.connect(cid())
        raw.send(subscribe_311(1, topic, qos))
    assert raw.read_packet()[0] == 0x90
    return raw, topic


@pytest.mark.parametrize("level", [4, 5])
@pytest.mark.parametrize(
    ("qos", "answers"),
    [
        (1, [0x50]),  # PUBREC answering a QoS 1 PUBLISH
        (1, [0x70]),  # PUBCOMP answering a QoS 1 PUBLISH
        (2, [0x40]),  # PUBACK answering a QoS 2 PUBLISH
        (2, [0x70]),  # PUBCOMP before PUBREC/PUBREL
        (2, [0x50, 0x40]),  # PUBACK instead of PUBCOMP (after PUBREC, PUBREL)
    ],
)
def test_wrong_acknowledgement_type_is_a_protocol_error(
    node: NodeProcess, level: int, qos: int, answers: list[int]
) -> None:
    raw, topic = _subscriber(node, level, qos)
    with raw:
        publish(node, topic, qos)
        message = read_publish(raw, level)
        for kind in answers:
            raw.send(ack(kind, message.packet_id))
            if kind == 0x50 and qos == 2:
                assert raw.read_packet()[0] == 0x62  # the PUBREL this PUBREC asks for
        data = closed(raw)
        if level == 5:
            assert data[:1] == b"\xe0" and data[2] == 0x82, data  # DISCONNECT, protocol error
    still_serving(node)


def test_acknowledging_an_unknown_packet_id_is_ignored(node: NodeProcess) -> None:
    """Not a protocol error: a client may acknowledge twice after a retransmission."""
    raw, topic = _subscriber(node, 5, 1)
    with raw:
        publish(node, topic, 1)
        message = read_publish(raw, 5)
        for kind in (0x40, 0x40, 0x70):  # the right PUBACK, then a duplicate, then a stray PUBCOMP
            raw.send(ack(kind, message.packet_id))
        raw.send(PINGREQ)
        assert raw.read_packet()[0] == 0xD0


def publish(node: NodeProcess, topic: str, qos: int) -> None:
    with RawMQTT(node.mqtt_port) as pub:
        pub.connect(cid())
        pub.send(publish_packet(topic, b"payload", qos=qos, packet_id=7))
        assert pub.read_packet()[0] == (0x40 if qos == 1 else 0x50)


# ---------------------------------------------------------------------------- PUBLISH rules


@pytest.mark.parametrize("level", [4, 5])
def test_qos0_publish_with_dup_is_refused(node: NodeProcess, level: int) -> None:
    """MQTT-3.3.1-2: the DUP flag is 0 on every QoS 0 PUBLISH."""
    with RawMQTT(node.mqtt_port) as raw:
        if level == 5:
            raw.send(connect_v5(cid()))
            raw.read_packet()
            raw.send(publish_v5("dup/t", b"x", dup=True))
        else:
            raw.connect(cid())
            raw.send(publish_packet("dup/t", b"x", dup=True))
        data = closed(raw)
        if level == 5:
            assert data[:1] == b"\xe0" and data[2] == 0x81, data  # malformed packet
    still_serving(node)


@pytest.mark.parametrize("response_topic", ["replies/+", "replies/#", "#"])
def test_response_topic_with_a_wildcard_is_refused(node: NodeProcess, response_topic: str) -> None:
    """MQTT-3.3.2-14: a Response Topic is a topic name."""
    with RawMQTT(node.mqtt_port) as raw:
        raw.send(connect_v5(cid()))
        raw.read_packet()
        raw.send(publish_v5("req/t", b"x", qos=1, packet_id=3, properties={"ResponseTopic": response_topic}))
        data = closed(raw)
        assert data[:1] == b"\xe0" and data[2] == 0x82, data
    still_serving(node)


def test_client_publish_with_subscription_identifier_is_refused(node: NodeProcess) -> None:
    """MQTT-3.3.4-6: a PUBLISH from a client carries no Subscription Identifier."""
    with RawMQTT(node.mqtt_port) as raw:
        raw.send(connect_v5(cid()))
        raw.read_packet()
        raw.send(publish_v5("subid/t", b"x", qos=1, packet_id=3, properties={"SubscriptionIdentifier": 5}))
        data = closed(raw)
        assert data[:1] == b"\xe0" and data[2] == 0x82, data
    still_serving(node)


# ---------------------------------------------------------------------------- MQTT-1.5.5-1


@pytest.mark.parametrize(
    "wire",
    [
        b"\xc0\x80\x00",  # PINGREQ whose remaining length 0 takes two bytes
        b"\x30\x86\x00\x00\x01tabc",  # PUBLISH, remaining length 6 in two bytes
    ],
)
def test_non_minimal_variable_byte_integer_is_refused(node: NodeProcess, wire: bytes) -> None:
    with RawMQTT(node.mqtt_port) as raw:
        raw.connect(cid())
        raw.send(wire)
        closed(raw)
    with RawMQTT(node.mqtt_port) as raw:  # a property length of 0 in two bytes (MQTT 5)
        raw.send(connect_v5(cid()))
        raw.read_packet()
        raw.send(packet(0x30, _str16("t") + b"\x80\x00" + b"x"))
        data = closed(raw)
        assert data[:1] == b"\xe0" and data[2] == 0x81, data
    still_serving(node)


# ---------------------------------------------------------------------------- CONNACK


def test_mqtt31_connack_never_sets_session_present(node: NodeProcess) -> None:
    """MQTT 3.1 has no session present flag: the first CONNACK byte is reserved (0)."""
    client_id = cid()
    mqisdp = packet(0x10, _str16("MQIsdp") + bytes((3, 0)) + (30).to_bytes(2, "big") + _str16(client_id))
    with RawMQTT(node.mqtt_port) as raw:
        raw.send(mqisdp)
        assert raw.read_packet() == (0x20, b"\x00\x00")
        raw.send(b"\xe0\x00")
    with RawMQTT(node.mqtt_port) as raw:  # the session (clean session 0) is resumed...
        raw.send(mqisdp)
        assert raw.read_packet() == (0x20, b"\x00\x00")  # ...but 3.1 cannot say so
    with RawMQTT(node.mqtt_port) as raw:  # 3.1.1 can, for the same kind of session
        raw.connect(client_id + "-311", clean=False)
        raw.send(b"\xe0\x00")
    with RawMQTT(node.mqtt_port) as raw:
        assert raw.connect(client_id + "-311", clean=False) == b"\x01\x00"


@pytest.mark.parametrize("maximum", [12, 20, 30, 40, 200])
def test_no_connack_larger_than_the_clients_maximum_packet_size(node: NodeProcess, maximum: int) -> None:
    """MQTT-3.1.2-24. An empty client id makes the node assign one (a 22-byte property): the
    CONNACK drops what the client may assume anyway, and when even the smallest one would
    be too large, none is sent and the connection closes."""
    with RawMQTT(node.mqtt_port) as raw:
        raw.send(connect_v5("", properties={"MaximumPacketSize": maximum}))
        try:
            first, body = raw.read_packet()
        except ConnectionError:
            assert maximum < 60, "a CONNACK with what the client must be told fits in 60 bytes"
            return  # closed without a CONNACK: none that says what the client must know fits
        size = len(packet(first, body))
        assert first == 0x20 and size <= maximum, (size, maximum, body)
        assert body[1] == 0, body


# ---------------------------------------------------------------------------- hole 8


def test_connect_deadline_counts_from_accept(node: NodeProcess) -> None:
    """Connections trickling one CONNECT byte every 2 s are closed at the CONNECT deadline
    (10 s after accept), not kept open by each byte."""
    wire = connect_packet(cid())  # about 20 bytes: 40 s of trickling, far past the deadline
    socks = [socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=5) for _ in range(20)]
    start = time.monotonic()
    try:
        open_ = set(range(len(socks)))
        for byte in wire:
            for i in sorted(open_):
                try:
                    socks[i].sendall(bytes((byte,)))
                except OSError:
                    open_.discard(i)
            # Wait 2 s, noticing connections the node closes meanwhile.
            deadline = time.monotonic() + 2
            while open_ and time.monotonic() < deadline:
                for i in sorted(open_):
                    socks[i].settimeout(0.01)
                    try:
                        if socks[i].recv(16) == b"":
                            open_.discard(i)
                    except TimeoutError:
                        pass
                    except OSError:
                        open_.discard(i)
            if not open_:
                break
        elapsed = time.monotonic() - start
        assert not open_, f"{len(open_)} trickling connections still open after {elapsed:.1f} s"
        assert 9 < elapsed < 14, elapsed
    finally:
        for s in socks:
            s.close()
    still_serving(node)
