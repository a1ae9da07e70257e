"""MQTT 5 features and persistent sessions across two real nodes: publish properties crossing
the mesh, sessions that outlive their connection, inbound topic aliases, subscription options
(no local, retain as published, retain handling), wills with a will delay interval, and the
client's Maximum Packet Size, subscription identifiers.

Nothing sleeps to synchronise: a route is proven with ``await_route``, deliveries are waited
for with bounded queue gets, and "nothing arrives" is shown by a fence message published after
the thing that must not arrive (the fence arriving first means it did not)."""

from __future__ import annotations

import queue
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from tests.helpers import RawMQTT, _str16, await_route, packet, stop_all, wait_until
from tests.mosquitto_broker import HAVE_MOSQUITTO, NO_MOSQUITTO, MosquittoBroker
from tests.mqttkit import Client, connect_v5, publish_v5, subscribe_v5, two_nodes

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list]:
    started = two_nodes(tmp_path_factory.mktemp("mqtt5"))
    try:
        yield started
    finally:
        stop_all(started)


def prefix() -> str:
    return f"m5-{uuid.uuid4().hex[:8]}"


def until_fence(client: Client, fence: bytes, timeout: float = 10) -> list:
    """Every message ``client`` gets before ``fence`` (await_route's probes and fences left out)."""
    before = []
    while (message := client.get(timeout=timeout)).payload != fence:
        if not is_route_traffic(message):
            before.append(message)
    return before


def is_route_traffic(message: Any) -> bool:
    return message.payload == b"probe" or message.payload.startswith(b"fence-")


def collect_real(client: Client, count: int, timeout: float = 10) -> list:
    """The next ``count`` messages that are not await_route's probes and fences."""
    out = []
    while len(out) < count:
        message = client.get(timeout=timeout)
        if not is_route_traffic(message):
            out.append(message)
    return out


def nothing_for(client: Client, seconds: float) -> None:
    try:
        message = client.get(timeout=seconds)
    except queue.Empty:
        return
    raise AssertionError(f"unexpected message on {message.topic}: {message.payload!r}")


# ---------------------------------------------------------------------------------------
# 1. Publish properties


@pytest.mark.parametrize("qos", [0, 1])
def test_publish_properties_cross_the_mesh_unchanged(nodes: list, qos: int) -> None:
    a, b = nodes
    p = prefix()
    sub = Client(b.mqtt_port)
    pub = Client(a.mqtt_port)
    try:
        assert sub.subscribe(f"{p}/#", qos=1) == [1]
        await_route(pub, sub, f"{p}/probe")
        user = [("k1", "v1"), ("dup", "x"), ("k2", "v2"), ("dup", "y"), ("ünï", "cödé")]
        pub.publish(
            f"{p}/t", b"\xe2\x9c\x93 payload", qos=qos,
            ContentType="application/json; charset=utf-8",
            ResponseTopic=f"{p}/reply/1",
            CorrelationData=b"\x00\x01corr\xff",
            UserProperty=user,
            PayloadFormatIndicator=1,
            MessageExpiryInterval=120,
        )
        message = sub.get()
        assert (message.topic, message.payload, message.qos) == (f"{p}/t", b"\xe2\x9c\x93 payload", qos)
        got = message.properties
        assert got is not None
        assert got.ContentType == "application/json; charset=utf-8"
        assert got.ResponseTopic == f"{p}/reply/1"
        assert got.CorrelationData == b"\x00\x01corr\xff"
        assert got.UserProperty == user  # every pair, duplicates kept, in order
        assert got.PayloadFormatIndicator == 1
        assert 0 < got.MessageExpiryInterval <= 120
        assert not hasattr(got, "TopicAlias")
    finally:
        sub.close()
        pub.close()


# ---------------------------------------------------------------------------------------
# 2. Persistent sessions


@contextmanager
def session_away(nodes: list, name: str, session_expiry: int) -> Iterator[tuple[Client, Client, str, str]]:
    """A persistent session on node b subscribed to ``PREFIX/#``, its route proven, then
    disconnected. A witness on b has the same subscription: once the witness has a message,
    node b has routed it (to the absent session too). Yields (a publisher on node a, the
    witness, the session's client id, the prefix its subscription is under)."""
    a, b = nodes
    p = prefix()
    client_id = f"{name}-{p}"
    pub, witness = Client(a.mqtt_port), Client(b.mqtt_port)
    sub = Client(b.mqtt_port, client_id, clean=False, session_expiry=session_expiry)
    try:
        assert not sub.session_present
        assert witness.subscribe(f"{p}/#", qos=1) == [1]
        assert sub.subscribe(f"{p}/#", qos=1) == [1]
        await_route(pub, witness, f"{p}/probe")
        await_route(pub, sub, f"{p}/probe")  # also drains what the witness's route sent

        def offline() -> int:
            return int(b.sys_value("$SYS/zmesh/node")["mqtt"]["sessions_offline"])

        before = offline()
        sub.disconnect()
        # Node b has taken the DISCONNECT before anything is published for the session:
        # a message it had already started to deliver would rightly be resent on resume.
        wait_until(lambda: offline() > before, 10, "node b to hold the session offline")
        yield pub, witness, client_id, p
    finally:
        for client in (witness, pub, sub):
            client.close()


def test_persistent_session_queues_while_away_and_clean_start_discards(nodes: list) -> None:
    _, b = nodes
    with session_away(nodes, "persist", 300) as (pub, witness, client_id, p):
        topic = f"{p}/t"
        for i in range(10):
            pub.publish(topic, f"away-{i}", qos=1)
        pub.publish(topic, b"end-away", qos=1)
        assert [m.payload for m in until_fence(witness, b"end-away")] == [f"away-{i}".encode() for i in range(10)]

        back = Client(b.mqtt_port, client_id, clean=False, session_expiry=300)
        try:
            assert back.session_present
            # (await_route's last fence may come again first: its PUBACK can lose the race
            # with the DISCONNECT.)
            got = until_fence(back, b"end-away")
            assert [m.payload for m in got] == [f"away-{i}".encode() for i in range(10)]  # in order
            assert {m.qos for m in got} == {1}
            # The subscription is still there: live messages keep coming.
            pub.publish(topic, b"live", qos=1)
            assert back.get().payload == b"live"
            back.disconnect()
        finally:
            back.close()
        assert witness.get().payload == b"live"

        # Away again; then a clean start: no session, nothing queued.
        for i in range(3):
            pub.publish(topic, f"lost-{i}", qos=1)
        pub.publish(topic, b"end-lost", qos=1)
        assert [m.payload for m in until_fence(witness, b"end-lost")] == [f"lost-{i}".encode() for i in range(3)]
        clean = Client(b.mqtt_port, client_id, clean=True)
        try:
            assert not clean.session_present
            # The subscription went with the session: a fence on its topic does not arrive,
            # and neither does anything queued; a new subscription gets the fence only.
            assert clean.subscribe(f"{p}/#", qos=1) == [1]
            await_route(pub, clean, f"{p}/probe")
            fence = b"end-after-clean"
            pub.publish(topic, fence, qos=1)
            assert until_fence(clean, fence) == []
        finally:
            clean.close()


def test_queued_message_expiry_is_dropped_on_resume(nodes: list) -> None:
    _, b = nodes
    back = None
    with session_away(nodes, "expiry2", 60) as (pub, witness, client_id, p):
        topic = f"{p}/t"
        try:
            pub.publish(topic, b"short", qos=1, MessageExpiryInterval=1)
            pub.publish(topic, b"long", qos=1, MessageExpiryInterval=100)
            pub.publish(topic, b"end-expiry", qos=1)
            assert [m.payload for m in until_fence(witness, b"end-expiry")] == [b"short", b"long"]
            nothing_for(witness, 2.5)  # the wall clock: "short" expires meanwhile
            back = Client(b.mqtt_port, client_id, clean=False, session_expiry=0)
            assert back.session_present
            got = until_fence(back, b"end-expiry")
            assert [m.payload for m in got] == [b"long"]
            assert 0 < got[0].properties.MessageExpiryInterval < 100
        finally:
            if back is not None:
                back.close()


# ---------------------------------------------------------------------------------------
# 3. Inbound topic aliases


def test_topic_alias_inbound_and_alias_above_maximum(nodes: list) -> None:
    a, b = nodes
    p = prefix()
    topic = f"{p}/aliased/topic"
    sub = Client(b.mqtt_port)
    pub = Client(a.mqtt_port)
    try:
        assert sub.subscribe(f"{p}/#", qos=1) == [1]
        await_route(pub, sub, f"{p}/probe")
        with RawMQTT(a.mqtt_port) as raw:
            raw.send(connect_v5(f"alias-{p}"))
            first, body = raw.read_packet()
            assert first == 0x20 and body[1] == 0
            raw.send(publish_v5(topic, b"with-topic", qos=1, packet_id=1, properties={"TopicAlias": 3}))
            assert raw.read_packet() == (0x40, b"\x00\x01")
            raw.send(publish_v5("", b"alias-only", qos=1, packet_id=2, properties={"TopicAlias": 3}))
            assert raw.read_packet() == (0x40, b"\x00\x02")
            raw.send(publish_v5("", b"alias-only-qos0", qos=0, properties={"TopicAlias": 3}))
            # A new topic for the same alias replaces it.
            raw.send(publish_v5(f"{p}/other", b"rebound", qos=1, packet_id=3, properties={"TopicAlias": 3}))
            assert raw.read_packet() == (0x40, b"\x00\x03")
            raw.send(publish_v5("", b"alias-rebound", qos=1, packet_id=4, properties={"TopicAlias": 3}))
            assert raw.read_packet() == (0x40, b"\x00\x04")
            got = sub.collect(5)
            assert [(m.topic, m.payload) for m in got] == [
                (topic, b"with-topic"), (topic, b"alias-only"), (topic, b"alias-only-qos0"),
                (f"{p}/other", b"rebound"), (f"{p}/other", b"alias-rebound"),
            ]
            for m in got:  # the alias is the connection's shorthand, not the message's
                assert m.properties is None or not hasattr(m.properties, "TopicAlias")
            # Above the node's topic_alias_maximum (10): DISCONNECT 0x94 and the connection closes.
            raw.send(publish_v5(topic, b"too-high", qos=1, packet_id=5, properties={"TopicAlias": 11}))
            closed, data = raw.closed_within(5)
            assert closed
            assert data[:1] == b"\xe0" and data[2] == 0x94, data
        fence = b"end-alias"
        pub.publish(topic, fence, qos=1)
        assert until_fence(sub, fence) == []  # the refused publish went nowhere
    finally:
        sub.close()
        pub.close()


def test_topic_alias_zero_and_unknown_alias_are_refused(nodes: list) -> None:
    a, _ = nodes
    p = prefix()
    with RawMQTT(a.mqtt_port) as raw:
        raw.send(connect_v5(f"alias0-{p}"))
        assert raw.read_packet()[0] == 0x20
        # paho will not encode alias 0: properties length 3, Topic Alias (0x23) = 0.
        raw.send(packet(0x30, _str16(f"{p}/t") + b"\x03\x23\x00\x00" + b"x"))
        closed, data = raw.closed_within(5)
        assert closed and data[:1] == b"\xe0" and data[2] == 0x94, data
    with RawMQTT(a.mqtt_port) as raw:
        raw.send(connect_v5(f"alias-unknown-{p}"))
        assert raw.read_packet()[0] == 0x20
        raw.send(publish_v5("", b"x", qos=0, properties={"TopicAlias": 5}))  # never set
        closed, data = raw.closed_within(5)
        assert closed and data[:1] == b"\xe0" and data[2] == 0x82, data  # protocol error


# ---------------------------------------------------------------------------------------
# 4. Subscription options


def test_no_local_skips_own_messages_only(nodes: list) -> None:
    a, b = nodes
    p = prefix()
    own = Client(a.mqtt_port)
    other = Client(b.mqtt_port)
    third = Client(a.mqtt_port)
    try:
        assert own.subscribe(f"{p}/#", qos=1, no_local=True) == [1]
        assert other.subscribe(f"{p}/#", qos=1) == [1]
        await_route(third, other, f"{p}/probe")
        own.drain()
        own.publish(f"{p}/t", b"mine", qos=1)
        own.publish(f"{p}/t", b"mine-0", qos=0)
        assert [m.payload for m in other.collect(2)] == [b"mine", b"mine-0"]  # others get it
        fence = b"end-no-local"
        third.publish(f"{p}/t", fence, qos=1)  # someone else's message does come back
        assert until_fence(own, fence) == []
        assert other.get().payload == fence
    finally:
        own.close()
        other.close()
        third.close()


def test_retain_as_published_on_live_delivery(nodes: list) -> None:
    a, b = nodes
    p = prefix()
    topic = f"{p}/r"
    kept = Client(b.mqtt_port)
    cleared = Client(b.mqtt_port)
    pub = Client(a.mqtt_port)
    try:
        assert kept.subscribe(f"{p}/#", qos=1, retain_as_published=True) == [1]
        assert cleared.subscribe(f"{p}/#", qos=1) == [1]
        await_route(pub, kept, f"{p}/probe")
        await_route(pub, cleared, f"{p}/probe")
        pub.publish(topic, b"retained-live", qos=1, retain=True)
        pub.publish(topic, b"plain-live", qos=1)
        k = collect_real(kept, 2)
        c = collect_real(cleared, 2)
        assert [(m.payload, m.retain) for m in k] == [(b"retained-live", True), (b"plain-live", False)]
        assert [(m.payload, m.retain) for m in c] == [(b"retained-live", False), (b"plain-live", False)]
    finally:
        pub.publish(topic, b"", qos=1, retain=True)  # clear the retained message
        kept.close()
        cleared.close()
        pub.close()


def test_retain_handling(nodes: list) -> None:
    a, _ = nodes
    p = prefix()
    topic = f"{p}/r"
    pub = Client(a.mqtt_port)
    never = Client(a.mqtt_port)
    new_only = Client(a.mqtt_port)
    always = Client(a.mqtt_port)
    try:
        pub.publish(topic, b"kept", qos=1, retain=True)
        # Retain handling 0 (a witness that the retained message is in place).
        assert always.subscribe(f"{p}/#", qos=1, retain_handling=0) == [1]
        first = always.get()
        assert (first.payload, first.retain) == (b"kept", True)

        # 2: never any retained message on subscribe.
        assert never.subscribe(f"{p}/#", qos=1, retain_handling=2) == [1]
        pub.publish(topic, b"end-2", qos=1)
        assert until_fence(never, b"end-2") == []

        # 1: retained only when the subscription is new.
        assert new_only.subscribe(f"{p}/#", qos=1, retain_handling=1) == [1]
        first = new_only.get()
        assert (first.payload, first.retain) == (b"kept", True)
        assert new_only.subscribe(f"{p}/#", qos=1, retain_handling=1) == [1]  # exists: no replay
        pub.publish(topic, b"end-1", qos=1)
        assert until_fence(new_only, b"end-1") == []

        # 0 again on an existing subscription: replayed every time.
        always.drain()
        assert always.subscribe(f"{p}/#", qos=1, retain_handling=0) == [1]
        again = always.get()
        while again.payload.startswith(b"end-"):
            again = always.get()
        assert (again.payload, again.retain) == (b"kept", True)
    finally:
        pub.publish(topic, b"", qos=1, retain=True)
        for c in (pub, never, new_only, always):
            c.close()


# ---------------------------------------------------------------------------------------
# 5. Wills with a will delay interval


def test_will_with_delay_is_published_across_the_mesh(nodes: list) -> None:
    a, b = nodes
    p = prefix()
    will_topic = f"{p}/will"
    sub = Client(b.mqtt_port)
    pub = Client(a.mqtt_port)
    client_id = f"will-{p}"
    dying = Client(a.mqtt_port, client_id, clean=True, session_expiry=10,
                   will=(will_topic, b"gone", 1, False, {"WillDelayInterval": 2, "ContentType": "text/plain"}))
    try:
        assert sub.subscribe(f"{p}/#", qos=1) == [1]
        await_route(pub, sub, f"{p}/probe")
        dying.drop()
        will = sub.get(timeout=10)
        assert (will.topic, will.payload, will.qos) == (will_topic, b"gone", 1)
        assert will.properties is not None and will.properties.ContentType == "text/plain"
        assert not hasattr(will.properties, "WillDelayInterval")
    finally:
        # End the session it left behind.
        Client(a.mqtt_port, client_id, clean=True).disconnect()
        sub.close()
        pub.close()


@contextmanager
def back_within_the_will_delay(pub_port: int, sub_port: int, *, clean_start: bool,
                               delay: int) -> Iterator[tuple[Client, Client, str]]:
    """A client whose will has a ``delay`` s delay (session expiry 300 s) loses its connection
    and comes straight back, with a clean start or resuming; yields (a subscriber to the will
    topic on ``sub_port``, a publisher on ``pub_port``, the will topic)."""
    p = prefix()
    will_topic, client_id = f"{p}/will", f"back-{p}"
    sub, pub = Client(sub_port), Client(pub_port)
    first = Client(pub_port, client_id, clean=True, session_expiry=300,
                   will=(will_topic, b"old-session-over", 1, False, {"WillDelayInterval": delay}))
    back = None
    try:
        assert sub.subscribe(f"{p}/#", qos=1) == [1]
        await_route(pub, sub, f"{p}/probe")
        first.drop()
        back = Client(pub_port, client_id, clean=clean_start, session_expiry=300)
        assert back.session_present is not clean_start
        yield sub, pub, will_topic
        back.disconnect(SessionExpiryInterval=0)
    finally:
        for client in (back, first, sub, pub):
            if client is not None:
                client.close()


def assert_no_will(sub: Client, pub: Client, will_topic: str) -> None:
    nothing_for(sub, 3.0)  # past the 2 s delay
    fence = b"end-will"
    pub.publish(will_topic, fence, qos=1)
    assert until_fence(sub, fence) == []


def test_reconnect_within_the_will_delay_suppresses_the_will(nodes: list) -> None:
    a, b = nodes
    with back_within_the_will_delay(a.mqtt_port, b.mqtt_port, clean_start=False, delay=2) as (sub, pub, topic):
        assert_no_will(sub, pub, topic)


def test_a_clean_start_within_the_will_delay_ends_the_session_and_sends_the_will(nodes: list) -> None:
    """MQTT 5 3.1.2.5: the will goes when the delay has passed *or the session ends*; a
    clean start ends it (3.1.2.4). So the will comes at once, long before its 60 s delay.
    Mosquitto 2.0.11 drops the will here instead (the README says so)."""
    a, b = nodes
    with back_within_the_will_delay(a.mqtt_port, b.mqtt_port, clean_start=True, delay=60) as (sub, _pub, topic):
        will = sub.get(timeout=10)
        assert (will.topic, will.payload) == (topic, b"old-session-over")


@pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NO_MOSQUITTO)
def test_mosquitto_drops_the_will_on_a_clean_start_within_the_delay(tmp_path: Any) -> None:
    """The other side of the difference the README states (and the test above pins for
    zmesh): Mosquitto, same clients, same steps, never sends that will. If a Mosquitto
    release changes this, this fails and the README's migration notes need updating."""
    with MosquittoBroker(tmp_path) as broker, \
            back_within_the_will_delay(broker.port, broker.port, clean_start=True, delay=2) as (sub, pub, topic):
        assert_no_will(sub, pub, topic)


def test_will_goes_when_the_session_ends_before_the_delay(nodes: list) -> None:
    """Will delay 60 s, session expiry 1 s: the will is published when the session ends."""
    a, b = nodes
    p = prefix()
    will_topic = f"{p}/will"
    sub = Client(b.mqtt_port)
    pub = Client(a.mqtt_port)
    dying = Client(a.mqtt_port, f"short-{p}", clean=True, session_expiry=1,
                   will=(will_topic, b"session-over", 1, False, {"WillDelayInterval": 60}))
    try:
        assert sub.subscribe(f"{p}/#", qos=1) == [1]
        await_route(pub, sub, f"{p}/probe")
        dying.drop()
        will = sub.get(timeout=10)
        assert (will.topic, will.payload) == (will_topic, b"session-over")
    finally:
        sub.close()
        pub.close()


def test_will_without_delay_and_disconnect_with_will(nodes: list) -> None:
    """No delay: the will goes at once when the connection drops; a DISCONNECT with reason
    0x04 publishes it too; a plain DISCONNECT does not."""
    a, b = nodes
    p = prefix()
    sub = Client(b.mqtt_port)
    pub = Client(a.mqtt_port)
    try:
        assert sub.subscribe(f"{p}/#", qos=1) == [1]
        await_route(pub, sub, f"{p}/probe")
        dropped = Client(a.mqtt_port, will=(f"{p}/w1", b"dropped", 1, False, {}))
        dropped.drop()
        assert (sub.get().payload) == b"dropped"
        polite = Client(a.mqtt_port, will=(f"{p}/w2", b"polite", 1, False, {}))
        polite.disconnect()
        with_will = Client(a.mqtt_port, will=(f"{p}/w3", b"asked", 1, False, {}))
        with_will.client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=0x04))
        with_will.client.loop_stop()
        assert sub.get().payload == b"asked"
        pub.publish(f"{p}/w2", b"end-wills", qos=1)
        assert until_fence(sub, b"end-wills") == []
    finally:
        sub.close()
        pub.close()


# ---------------------------------------------------------------------------------------
# 6. The client's Maximum Packet Size


@pytest.mark.parametrize("qos", [0, 1])
def test_publish_above_client_maximum_packet_size_is_not_sent(nodes: list, qos: int) -> None:
    a, b = nodes
    p = prefix()
    small = Client(b.mqtt_port, connect_properties={"MaximumPacketSize": 256})
    pub = Client(a.mqtt_port)
    try:
        assert small.subscribe(f"{p}/#", qos=1) == [1]
        await_route(pub, small, f"{p}/probe")
        pub.publish(f"{p}/big", b"x" * 1000, qos=qos)
        pub.publish(f"{p}/ok", b"small", qos=qos)
        fence = b"end-size"
        pub.publish(f"{p}/ok", fence, qos=1)
        assert [m.payload for m in until_fence(small, fence)] == [b"small"]
        # The window was not blocked by the dropped message: more QoS 1 flows.
        for i in range(25):
            pub.publish(f"{p}/ok", f"n{i}", qos=1)
        assert [m.payload for m in small.collect(25)] == [f"n{i}".encode() for i in range(25)]
    finally:
        small.close()
        pub.close()


def test_subscription_identifiers_across_the_mesh(nodes: list) -> None:
    """Each matching subscription's identifier comes with the message (one copy); the
    publisher's own identifiers never travel."""
    a, b = nodes
    p = prefix()
    sub = Client(b.mqtt_port)
    pub = Client(a.mqtt_port)
    try:
        assert sub.subscribe(f"{p}/#", qos=1, identifier=7) == [1]
        assert sub.subscribe(f"{p}/x/+", qos=1, identifier=42) == [1]
        assert sub.subscribe(f"{p}/plain", qos=1) == [1]
        await_route(pub, sub, f"{p}/x/probe")
        pub.publish(f"{p}/x/y", b"both", qos=1)
        pub.publish(f"{p}/z", b"one", qos=1)
        pub.publish(f"{p}/plain", b"plain", qos=1)
        both, one, plain = collect_real(sub, 3)
        assert both.payload == b"both" and sorted(both.properties.SubscriptionIdentifier) == [7, 42]
        assert one.payload == b"one" and one.properties.SubscriptionIdentifier == [7]
        assert plain.payload == b"plain" and plain.properties.SubscriptionIdentifier == [7]
    finally:
        sub.close()
        pub.close()


def test_retain_handling_3_is_a_malformed_subscribe(nodes: list) -> None:
    """Retain handling 3 is a malformed SUBSCRIBE: the connection is closed (0x81 or 0x82)."""
    a, _ = nodes
    with RawMQTT(a.mqtt_port) as raw:
        raw.send(connect_v5(f"rh3-{prefix()}"))
        assert raw.read_packet()[0] == 0x20
        raw.send(subscribe_v5(1, f"{prefix()}/#", 1, options=0x30))
        closed, data = raw.closed_within(5)
        assert closed
        assert data[:1] == b"\xe0" and data[2] in (0x81, 0x82), data
