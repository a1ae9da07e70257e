"""Mosquitto's resource limits, under Mosquitto's names, on a real node (issue 14):
``max_keepalive``, ``max_connections``, ``message_size_limit``, ``max_subscriptions``
(zmesh's; Mosquitto has none), ``retain_available``, ``maximum_qos`` and
``persistent_client_expiration``. (``max_queued_bytes``: tests/integration/mqtt/test_hostile_load.py.)

One node carries every limit at once; raw sockets see exactly what it answers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.helpers import (
    NodeProcess,
    RawMQTT,
    _str16,
    connect_packet,
    make_certs,
    packet,
    publish_packet,
    wait_until,
)
from tests.mosquitto_broker import HAVE_MOSQUITTO, NO_MOSQUITTO, MosquittoBroker
from tests.mqttkit import connect_v5, publish_v5, read_publish, subscribe_311, subscribe_v5

pytestmark = pytest.mark.timeout(60)

CONFIG = """\
[mqtt]
max_keepalive = 60
max_connections = 4
message_size_limit = 100
max_subscriptions = 5
retain_available = false
maximum_qos = 1
persistent_client_expiration = 1
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    workdir = tmp_path_factory.mktemp("limits")
    config = workdir / "n.toml"
    config.write_text(CONFIG)
    started = NodeProcess(workdir, "a", make_certs(workdir / "certs", ["a"]), extra=["--config", str(config)])
    try:
        yield started
    finally:
        started.stop()


def cid() -> str:
    return f"l-{uuid.uuid4().hex[:8]}"


def connack_v5(raw: RawMQTT, client_id: str = "", keepalive: int = 30, **props: Any) -> tuple[int, Properties]:
    raw.send(connect_v5(client_id or cid(), keepalive=keepalive, properties=props or None))
    first, body = raw.read_packet()
    assert first == 0x20, body
    properties = Properties(PacketTypes.CONNACK)
    properties.unpack(body[2:])
    return body[1], properties


def closed_with(raw: RawMQTT, reason: int | None) -> None:
    done, data = raw.closed_within(5)
    assert done, data
    if reason is not None:
        assert data[:1] == b"\xe0" and data[2] == reason, data


def sys_node(node: NodeProcess) -> dict[str, Any]:
    return node.sys_value("$SYS/zmesh/node")


# ---------------------------------------------------------------------------- max_keepalive


@pytest.mark.parametrize(("asked", "told"), [(0, 60), (120, 60), (30, None), (60, None)])
def test_max_keepalive_sets_server_keep_alive_for_mqtt5(node: NodeProcess, asked: int, told: int | None) -> None:
    """As Mosquitto 2.0.11 answers (checked by hand): a v5 client asking more than
    max_keepalive, or none (0), gets Server Keep Alive = max_keepalive."""
    with RawMQTT(node.mqtt_port) as raw:
        code, props = connack_v5(raw, keepalive=asked)
        assert code == 0
        assert getattr(props, "ServerKeepAlive", None) == told


@pytest.mark.parametrize(("asked", "code"), [(120, 2), (61, 2), (60, 0), (0, 0)])
def test_max_keepalive_refuses_a_longer_311_keepalive(node: NodeProcess, asked: int, code: int) -> None:
    """3.1.1 cannot be told: more than max_keepalive is refused "identifier rejected", as
    Mosquitto's manual says (2.0.11 itself lets it in); 0 is let in, as Mosquitto does."""
    with RawMQTT(node.mqtt_port) as raw:
        raw.send(connect_packet(cid(), keepalive=asked))
        assert raw.read_packet() == (0x20, bytes((0, code)))


# ---------------------------------------------------------------------------- max_connections


def test_max_connections(node: NodeProcess) -> None:
    held = [RawMQTT(node.mqtt_port) for _ in range(4)]
    try:
        for raw in held:
            assert raw.connect(cid()) == b"\x00\x00"
        with RawMQTT(node.mqtt_port) as extra:  # the fifth is closed before it says anything
            extra.send(connect_packet(cid()))
            assert extra.closed_within(5) == (True, b"")
    finally:
        for raw in held:
            raw.close()
    wait_until(lambda: _can_connect(node), 10, "a connection slot to free up")
    assert sys_node(node)["drops"].get("mqtt_max_connections", 0) >= 1


def _can_connect(node: NodeProcess) -> bool:
    with RawMQTT(node.mqtt_port) as raw:
        raw.send(connect_packet(cid()))
        try:
            return raw.read_packet(2)[0] == 0x20
        except (ConnectionError, OSError):
            return False


# ---------------------------------------------------------------------------- message_size_limit


@pytest.mark.parametrize("level", [4, 5])
def test_message_size_limit_drops_larger_payloads_but_completes_the_flow(node: NodeProcess, level: int) -> None:
    topic = f"size/{uuid.uuid4().hex[:6]}"
    with RawMQTT(node.mqtt_port) as sub, RawMQTT(node.mqtt_port) as pub:
        sub.connect(cid())
        sub.send(subscribe_311(1, topic, 1))
        assert sub.read_packet()[0] == 0x90
        if level == 5:
            connack_v5(pub)
            pub.send(publish_v5(topic, b"x" * 101, qos=1, packet_id=1))
            assert pub.read_packet() == (0x40, b"\x00\x01\x83")  # implementation specific error
            pub.send(publish_v5(topic, b"y" * 100, qos=1, packet_id=2))
        else:
            pub.connect(cid())
            pub.send(publish_packet(topic, b"x" * 101, qos=1, packet_id=1))
            assert pub.read_packet() == (0x40, b"\x00\x01")  # 3.1.1 cannot say why
            pub.send(publish_packet(topic, b"y" * 100, qos=1, packet_id=2))
        assert pub.read_packet()[0] == 0x40
        assert read_publish(sub).payload == b"y" * 100  # the 101-byte one never arrived
    assert sys_node(node)["drops"].get("mqtt_message_size_limit", 0) >= 1


# ---------------------------------------------------------------------------- max_subscriptions


def test_max_subscriptions_per_client(node: NodeProcess) -> None:
    with RawMQTT(node.mqtt_port) as raw:
        connack_v5(raw)
        body = (1).to_bytes(2, "big") + b"\x00" + b"".join(_str16(f"s/{i}") + b"\x01" for i in range(7))
        raw.send(packet(0x82, body))
        assert raw.read_packet() == (0x90, b"\x00\x01\x00" + b"\x01" * 5 + b"\x97\x97")  # quota exceeded
        raw.send(subscribe_v5(2, "s/0", 1))  # replacing one is not a new one
        assert raw.read_packet() == (0x90, b"\x00\x02\x00\x01")
    with RawMQTT(node.mqtt_port) as raw:
        raw.connect(cid())
        body = (1).to_bytes(2, "big") + b"".join(_str16(f"s/{i}") + b"\x00" for i in range(6))
        raw.send(packet(0x82, body))
        assert raw.read_packet() == (0x90, b"\x00\x01" + b"\x00" * 5 + b"\x80")
    assert sys_node(node)["drops"].get("mqtt_max_subscriptions", 0) >= 3


# ---------------------------------------------------------------------------- retain_available


def test_retain_available_false(node: NodeProcess) -> None:
    with RawMQTT(node.mqtt_port) as raw:
        code, props = connack_v5(raw)
        assert code == 0 and props.RetainAvailable == 0
        raw.send(publish_v5("r/t", b"x", retain=True))
        closed_with(raw, 0x9A)  # retain not supported
    with RawMQTT(node.mqtt_port) as raw:
        raw.connect(cid())
        raw.send(publish_packet("r/t", b"x", retain=True))
        closed_with(raw, None)
    with RawMQTT(node.mqtt_port) as raw:  # a retained will
        raw.send(connect_packet(cid(), will=("w/t", b"bye", 0, True)))
        closed_with(raw, None)


def _v5_will_connect(qos: int, retain: bool) -> bytes:
    flags = 0x02 | 0x04 | (qos << 3) | (0x20 if retain else 0)
    body = (_str16("MQTT") + bytes((5, flags)) + (30).to_bytes(2, "big") + b"\x00" + _str16(cid())
            + b"\x00" + _str16("w/t") + _str16("bye"))
    return packet(0x10, body)


@pytest.mark.parametrize(("qos", "retain", "code"), [(0, True, 0x9A), (2, False, 0x9B)])
def test_wills_beyond_the_limits_are_refused_in_connack(node: NodeProcess, qos: int, retain: bool, code: int) -> None:
    with RawMQTT(node.mqtt_port) as raw:
        raw.send(_v5_will_connect(qos, retain))
        first, body = raw.read_packet()
        assert first == 0x20 and body[1] == code, body
        closed_with(raw, None)


# ---------------------------------------------------------------------------- maximum_qos


def test_maximum_qos(node: NodeProcess) -> None:
    with RawMQTT(node.mqtt_port) as raw:
        code, props = connack_v5(raw)
        assert code == 0 and props.MaximumQoS == 1
        raw.send(subscribe_v5(1, "q/#", 2))
        assert raw.read_packet() == (0x90, b"\x00\x01\x00\x01")  # granted QoS 1
        raw.send(publish_v5("q/t", b"x", qos=2, packet_id=1))
        closed_with(raw, 0x9B)  # QoS not supported
    with RawMQTT(node.mqtt_port) as raw:
        raw.connect(cid())
        raw.send(subscribe_311(1, "q/#", 2))
        assert raw.read_packet() == (0x90, b"\x00\x01\x01")
        raw.send(publish_packet("q/t", b"x", qos=2, packet_id=1))
        closed_with(raw, None)


# ---------------------------------------------------------------------------- persistent_client_expiration


def test_persistent_client_expiration(node: NodeProcess) -> None:
    """A 3.1.1 clean-session-0 session never expires by itself; after
    persistent_client_expiration (1 s here) away, it is gone."""
    client_id = cid()
    before = sys_node(node)["mqtt"]["sessions_expired_total"]
    with RawMQTT(node.mqtt_port) as raw:
        raw.connect(client_id, clean=False)
        raw.send(b"\xe0\x00")
    wait_until(lambda: sys_node(node)["mqtt"]["sessions_expired_total"] > before, 10, "the session to expire")
    with RawMQTT(node.mqtt_port) as raw:
        assert raw.connect(client_id, clean=False) == b"\x00\x00"  # no session present


# ---------------------------------------------------------------------------- the same limits on Mosquitto


@pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NO_MOSQUITTO)
def test_mosquitto_answers_the_same(tmp_path: Path, node: NodeProcess) -> None:
    """The limits whose answers zmesh claims to share with Mosquitto, asked of a real one
    (Debian's 2.0.11) with the same settings and of the node: the same bytes back."""
    extra = ("max_keepalive 60", "message_size_limit 100", "retain_available false", "maximum_qos 1")
    with MosquittoBroker(tmp_path, extra=extra) as broker:
        for port in (broker.port, node.mqtt_port):
            for asked in (0, 120, 30):  # Server Keep Alive
                with RawMQTT(port) as raw:
                    code, props = connack_v5(raw, keepalive=asked)
                    assert code == 0 and getattr(props, "ServerKeepAlive", None) == (None if asked == 30 else 60), port
                    assert props.MaximumQoS == 1 and props.RetainAvailable == 0, port
            with RawMQTT(port) as raw:  # message_size_limit: acknowledged with a failure code
                connack_v5(raw)
                raw.send(publish_v5("size/t", b"x" * 101, qos=1, packet_id=1))
                # Mosquitto says 0x95 "packet too large", which MQTT 5 does not allow in a
                # PUBACK (section 3.4.2.1); zmesh says 0x83 "implementation specific error",
                # the code Mosquitto's manual names.
                code = 0x95 if port == broker.port else 0x83
                assert raw.read_packet() == (0x40, b"\x00\x01" + bytes((code,))), port
            with RawMQTT(port) as raw:  # maximum_qos: a SUBSCRIBE at 2 is granted 1
                connack_v5(raw)
                raw.send(subscribe_v5(1, "q/#", 2))
                assert raw.read_packet() == (0x90, b"\x00\x01\x00\x01"), port
            with RawMQTT(port) as raw:  # retain_available false: DISCONNECT 0x9A
                connack_v5(raw)
                raw.send(publish_v5("r/t", b"x", retain=True))
                closed_with(raw, 0x9A)
