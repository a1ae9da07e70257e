"""A subscriber node SIGKILLed and restarted with its data_dir (issue 17): the persistent
session of its client survives on disk, the publisher's node keeps what the subscriber's
node had not acknowledged, and after the restart the client gets every QoS 1 message
published before, during and after the outage, in order per topic, none twice.

Two hosts: ``a`` (publisher's node) and ``b`` (subscriber's node, ``--data-dir``). The
client is in the root namespace with a fixed client id and a persistent session.
"""

from __future__ import annotations

import queue
import time
import uuid

import paho.mqtt.client as mqtt
import pytest

from tests.helpers import wait_until
from tests.netns.conftest import Mesh
from tests.netns.netns import Net
from tests.netns.node import HostSubscriber
from tests.netns.test_delivery_cut import (
    HEARTBEAT,
    PEER_EXPIRY,
    PacedPublisher,
    _assert_all_once_in_order,
    _route,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]


class PersistentSubscriber(HostSubscriber):
    """A 3.1.1 client with clean_session False and a fixed id; subscribes only if asked."""

    def __init__(self, host: str, port: int, client_id: str, *topics: str) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        connected: queue.Queue[bool] = queue.Queue()
        self.client.on_connect = lambda c, u, flags, rc, props: connected.put(flags.session_present)
        subscribed: queue.Queue[object] = queue.Queue()
        self.client.on_subscribe = lambda c, u, mid, codes, props: subscribed.put(codes)
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        self.session_present = connected.get(timeout=10)
        if topics:
            self.client.subscribe([(t, 1) for t in topics])
            self.granted = subscribed.get(timeout=10)


def test_subscriber_sigkilled_and_restarted_with_data_dir(net: Net, mesh: Mesh, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mesh.certs("a", "b")
    ha, hb = net.add_host("a"), net.add_host("b")
    a = mesh.node(ha, "a", heartbeat_interval=HEARTBEAT, peer_expiry=PEER_EXPIRY)
    data_dir = tmp_path / "b-data"
    b = mesh.node(hb, "b", seeds=[ha.ip], heartbeat_interval=HEARTBEAT, peer_expiry=PEER_EXPIRY,
                  extra=["--data-dir", str(data_dir)])
    wait_until(lambda: a.peers_up() == {"b"} and b.peers_up() == {"a"}, 20, "a and b to see each other up")

    client_id = f"keep-{uuid.uuid4().hex[:6]}"
    first = PersistentSubscriber(b.ip, b.mqtt_port, client_id, "cut/#")
    arrivals: list[tuple[int, bool]] = []  # (id, DUP flag), in arrival order
    count = 3_000
    publisher = PacedPublisher(a.ip, a.mqtt_port, count, rate=300, qos=1)
    try:
        _route(a, first)
        publisher.start()
        wait_until(lambda: len(publisher.infos) >= 1_000, 30, "the first 1,000 publishes")
        b.kill()  # SIGKILL: no goodbye, no flush
        first.client.loop_stop()
        arrivals += _ids(first.drain())
        wait_until(lambda: a.peer_states().get("b") == "down", 10, "a to see b down")
        killed_at = time.monotonic()
        wait_until(lambda: time.monotonic() - killed_at >= 3 or publisher.done.is_set(), 10, "3 s away")
        b.start()
        second = PersistentSubscriber(b.ip, b.mqtt_port, client_id)
        try:
            assert second.session_present, "the persistent session did not survive the restart"
            publisher.wait_acknowledged(90)
            deadline = time.monotonic() + 90
            while len({i for i, _ in arrivals}) < count and time.monotonic() < deadline:
                try:
                    arrivals += _ids([second.get(timeout=max(deadline - time.monotonic(), 0.001))])
                except queue.Empty:
                    break
            arrivals += _ids(second.drain())
        finally:
            second.close()
    finally:
        publisher.close()
    # A QoS 1 message b had sent its client when it was killed may come again with DUP set
    # (b never saw the PUBACK): that is MQTT's at-least-once on the last hop, and it is the
    # only repetition allowed. Everything else arrives once, in order per topic.
    seen: set[int] = set()
    firsts: list[int] = []
    for i, dup in arrivals:
        if i in seen:
            assert dup, f"message {i} delivered twice, the second time without DUP (not a resend)"
            continue
        seen.add(i)
        firsts.append(i)
    _assert_all_once_in_order(firsts, count)


def _ids(messages: list[mqtt.MQTTMessage]) -> list[tuple[int, bool]]:
    return [(int(m.payload), bool(m.dup)) for m in messages if m.topic.startswith("cut/") and m.payload.isdigit()]
