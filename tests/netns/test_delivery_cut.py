"""Delivery across a cut link (issue 17): QoS 1 and 2 published while the two nodes cannot
reach each other are delivered after the heal, in order per origin, none twice; a cut longer
than the outbox keeps its messages is reported as a gap naming the range.

Two hosts, ``a`` (the publisher's node) and ``b`` (the subscriber's node). The cut is
between them only (blackhole routes both ways, ``Host.block``): the test, in the root
namespace, keeps its MQTT connections to both nodes, so what is measured is the mesh's
recovery and nothing of MQTT's own reconnects.

Publishing is paced (a load shape, not synchronisation) so that the cut falls in the
middle of it; every wait is on an event with a bound.
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from tests.helpers import await_route, wait_until
from tests.netns.conftest import Mesh
from tests.netns.netns import Host, Net
from tests.netns.node import HostSubscriber, NodeOnHost

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

HEARTBEAT = 0.2
PEER_EXPIRY = 1.0
GAPS = "$SYS/zmesh/delivery/gaps"


class PacedPublisher:
    """Publishes ``count`` messages ``cut/<i % 10>`` = ``i`` at ``rate`` per second from a
    thread; paho keeps up to ``inflight`` unacknowledged and queues the rest."""

    def __init__(self, host: str, port: int, count: int, rate: float, qos: int, inflight: int = 100) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"p-{uuid.uuid4().hex[:8]}")
        self.client.max_inflight_messages_set(inflight)
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        self.count, self.rate, self.qos = count, rate, qos
        self.infos: list[mqtt.MQTTMessageInfo] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PacedPublisher:
        self.thread.start()
        return self

    def _run(self) -> None:
        start = time.monotonic()
        for i in range(self.count):
            delay = start + i / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the load, not waiting for an event
            self.infos.append(self.client.publish(f"cut/{i % 10}", str(i).encode(), qos=self.qos))
        self.done.set()

    def wait_acknowledged(self, timeout: float) -> None:
        assert self.done.wait(timeout), "the publisher did not finish queueing"
        deadline = time.monotonic() + timeout
        for info in self.infos:
            info.wait_for_publish(timeout=max(deadline - time.monotonic(), 0.001))
        missing = sum(not info.is_published() for info in self.infos)
        assert missing == 0, f"{missing} of {self.count} publishes not acknowledged within {timeout} s"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _partition(a: Host, b: Host) -> None:
    a.block(b)
    b.block(a)


def _heal(a: Host, b: Host) -> None:
    a.unblock(b)
    b.unblock(a)


def _pair(mesh: Mesh, net: Net, delivery: str = "") -> tuple[Host, Host, NodeOnHost, NodeOnHost]:
    mesh.certs("a", "b")
    ha, hb = net.add_host("a"), net.add_host("b")
    nodes = []
    for host, name, seeds in ((ha, "a", None), (hb, "b", [ha.ip])):
        node = mesh.node(host, name, seeds=seeds, heartbeat_interval=HEARTBEAT, peer_expiry=PEER_EXPIRY,
                         start=False)
        if delivery:
            with node.config_path.open("a") as f:
                f.write(f"\n[delivery]\n{delivery}\n")
        node.start()
        nodes.append(node)
    a, b = nodes
    wait_until(lambda: a.peers_up() == {"b"} and b.peers_up() == {"a"}, 20, "a and b to see each other up")
    return ha, hb, a, b


def _received(sub: HostSubscriber, count: int, timeout: float) -> list[int]:
    """The ids of the ``cut/#`` messages, in arrival order, until ``count`` distinct ones
    came (or ``timeout``); then a short drain so that duplicates behind them are seen."""
    ids: list[int] = []
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < count:
        try:
            message = sub.get(timeout=max(deadline - time.monotonic(), 0.001))
        except queue.Empty:
            break
        if message.topic.startswith("cut/") and message.payload.isdigit():
            ids.append(int(message.payload))
            seen.add(ids[-1])
    ids += [int(m.payload) for m in sub.drain() if m.topic.startswith("cut/") and m.payload.isdigit()]
    return ids


def _assert_all_once_in_order(ids: list[int], count: int) -> None:
    missing = sorted(set(range(count)) - set(ids))
    assert not missing, f"{len(missing)} of {count} lost, first {missing[:20]}"
    duplicates = len(ids) - len(set(ids))
    assert duplicates == 0, f"{duplicates} delivered twice"
    for topic in range(10):
        on_topic = [i for i in ids if i % 10 == topic]
        assert on_topic == sorted(on_topic), f"cut/{topic} out of order"


def _route(a: NodeOnHost, sub: HostSubscriber) -> None:
    with a.publisher() as probe:
        await_route(probe, sub, "cut/probe", timeout=20)  # type: ignore[arg-type]


def test_20s_cut_10000_qos1_all_delivered_in_order(net: Net, mesh: Mesh) -> None:
    ha, hb, a, b = _pair(mesh, net)
    count = 10_000
    with b.subscriber("cut/#", qos=1) as sub:
        _route(a, sub)
        publisher = PacedPublisher(a.ip, a.mqtt_port, count, rate=400, qos=1).start()
        try:
            wait_until(lambda: len(publisher.infos) >= 1_000, 30, "the first 1,000 publishes")
            _partition(ha, hb)
            wait_until(lambda: b.peer_states().get("a") == "down", 10, "b to see a down")
            cut_at = time.monotonic()
            wait_until(lambda: time.monotonic() - cut_at >= 20, 25, "20 s of cut")
            _heal(ha, hb)
            publisher.wait_acknowledged(90)
            ids = _received(sub, count, 90)
        finally:
            publisher.close()
    _assert_all_once_in_order(ids, count)


def test_qos2_random_cuts_10000_exactly_once(net: Net, mesh: Mesh) -> None:
    ha, hb, a, b = _pair(mesh, net)
    count = 10_000
    rng = random.Random(17)
    with b.subscriber("cut/#", qos=2) as sub:
        _route(a, sub)
        publisher = PacedPublisher(a.ip, a.mqtt_port, count, rate=500, qos=2).start()
        try:
            cuts = 0
            while not publisher.done.is_set() and cuts < 8:
                # up for 0.5-2 s, then cut for 0.3-3 s: some cuts shorter than the peer
                # expiry (the link survives, frames are lost), some longer (the peer goes down)
                publisher.done.wait(rng.uniform(0.5, 2.0))
                _partition(ha, hb)
                time.sleep(rng.uniform(0.3, 3.0))  # the cut's length is the scenario itself
                _heal(ha, hb)
                cuts += 1
            publisher.wait_acknowledged(90)
            ids = _received(sub, count, 90)
        finally:
            publisher.close()
    assert cuts >= 3, f"only {cuts} cuts happened while publishing"
    _assert_all_once_in_order(ids, count)


def test_cut_past_max_age_reports_the_range(net: Net, mesh: Mesh) -> None:
    # The outbox keeps a destination's messages 3 s; a 6 s cut loses some, and b must say
    # which: a gap on $SYS/zmesh/delivery/gaps from origin a whose range covers the loss.
    ha, hb, a, b = _pair(mesh, net, delivery="outbox_max_age = 3\nblock_max = 1\ngive_up = 5\n"
                                         'policy = "drop"')
    with b.subscriber("cut/#", qos=1) as sub, b.subscriber(GAPS, qos=0) as gaps:
        _route(a, sub)
        count = 400
        publisher = PacedPublisher(a.ip, a.mqtt_port, count, rate=100, qos=1).start()
        try:
            wait_until(lambda: len(publisher.infos) >= 50, 10, "the first 50 publishes")
            _partition(ha, hb)
            wait_until(lambda: b.peer_states().get("a") == "down", 10, "b to see a down")
            cut_at = time.monotonic()
            wait_until(lambda: time.monotonic() - cut_at >= 6, 10, "6 s of cut")
            _heal(ha, hb)
            publisher.wait_acknowledged(60)
            ids = _received(sub, count, 30)
        finally:
            publisher.close()
        lost = sorted(set(range(count)) - set(ids))
        assert lost, "a 6 s cut past a 3 s outbox lost nothing: the scenario did not happen"
        assert len(ids) == len(set(ids)), "duplicates"
        reports: list[dict[str, Any]] = []
        deadline = time.monotonic() + 15
        reported = 0
        while time.monotonic() < deadline and reported < len(lost):
            try:
                message = gaps.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                break
            report = json.loads(message.payload)
            reports.append(report)
            if report.get("origin") == "a" and report.get("count"):
                reported += int(report["count"])
        assert reports, "the loss was silent: no gap on $SYS/zmesh/delivery/gaps"
        assert reported == len(lost), (reported, len(lost), reports)
