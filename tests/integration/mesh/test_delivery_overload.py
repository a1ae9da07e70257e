"""Flow control across nodes (issue 17, docs/delivery.md §7): a publisher faster than the
subscriber's node is slowed (``block``) or the oldest messages go and the loss is reported
exactly (``drop``). Real node processes, paho clients; a subscriber node is made slow by
a small MQTT queue or stopped outright (SIGSTOP) while the publisher goes on.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from tests.helpers import NodeProcess, Subscriber, make_certs, stop_all, wait_until

pytestmark = pytest.mark.timeout(240)

GAPS = "$SYS/zmesh/delivery/gaps"
# The new [delivery] table is given only where a test needs it, so that the subscriber
# node's config also loads on code from before it (the tests were first run there).
NO_DELIVERY_TABLE = os.environ.get("ZMESH_TEST_NO_DELIVERY_TABLE") == "1"


def _config(workdir: Path, name: str, text: str) -> list[str]:
    path = workdir / f"{name}-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(text)
    return ["--config", str(path)]


def _pair(workdir: Path, a_config: str, b_config: str) -> list[NodeProcess]:
    certs = make_certs(workdir / "certs", ["a", "b"])
    nodes: list[NodeProcess] = []
    a = NodeProcess(workdir, "a", certs, extra=_config(workdir, "a", a_config))
    nodes.append(a)
    b = NodeProcess(workdir, "b", certs, seeds=[a.control_port], extra=_config(workdir, "b", b_config))
    nodes.append(b)
    wait_until(lambda: a.peers_up() == {"b"} and b.peers_up() == {"a"}, 15, "a and b to see each other")
    return nodes


class Client:
    def __init__(self, port: int, inflight: int = 100) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"c-{uuid.uuid4().hex[:8]}")
        self.client.max_inflight_messages_set(inflight)
        self.client.max_queued_messages_set(0)
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        subscribed: queue.Queue[Any] = queue.Queue()
        self.client.on_subscribe = lambda c, u, mid, codes, props: subscribed.put(codes)
        self._subscribed = subscribed
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()

    def subscribe(self, filt: str) -> None:
        self.client.subscribe(filt, qos=1)
        self._subscribed.get(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _route(pub: Client, sub: Client, topic: str) -> None:
    """Probe until the subscriber gets one (the interest reached the publisher's node)."""
    def probe() -> bool:
        pub.client.publish(topic, b"probe", qos=1).wait_for_publish(5)
        try:
            while True:
                if sub.messages.get(timeout=0.2).topic == topic:
                    return True
        except queue.Empty:
            return False
    wait_until(probe, 15, "the route a -> b")
    try:
        while True:
            sub.messages.get(timeout=0.3)
    except queue.Empty:
        pass


def _numbered(sub: Client, topic: str, count: int) -> list[int]:
    """The numbers of the messages on ``topic``, in arrival order, until ``count`` came or
    none came for 20 s."""
    got: list[int] = []
    while len(got) < count:
        try:
            message = sub.messages.get(timeout=20)
        except queue.Empty:
            break
        if message.topic == topic:
            got.append(int.from_bytes(message.payload[:4], "big"))
    return got


def _delivery(node: NodeProcess) -> dict[str, Any]:
    value: dict[str, Any] = node.sys_value("$SYS/zmesh/node")["delivery"]
    return value


@pytest.fixture
def nodes() -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    yield started
    stop_all(started)


def test_saturated_qos1_two_nodes_loses_nothing(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    """20,000 QoS 1 messages of 64 bytes as fast as a paho publisher (window 100) can, on
    a; a paho subscriber on b whose session queue is small (mqtt.max_queued 1,000): every
    message arrives, once, in order (today b's queue dropped what it could not hold while
    a kept acknowledging)."""
    a_text = '[node]\nname = "a"\n' + ("" if NO_DELIVERY_TABLE else "[delivery]\noutbox_max_bytes = 2097152\n")
    nodes.extend(_pair(tmp_path, a_text, '[node]\nname = "b"\n[mqtt]\nmax_queued = 1000\n'))
    a, b = nodes
    p = f"s{uuid.uuid4().hex[:6]}"
    sub, pub = Client(b.mqtt_port), Client(a.mqtt_port, inflight=100)
    try:
        sub.subscribe(f"{p}/#")
        _route(pub, sub, f"{p}/probe")
        count = 20_000
        infos = [pub.client.publish(f"{p}/m", i.to_bytes(4, "big") + bytes(60), qos=1) for i in range(count)]
        for info in infos:
            info.wait_for_publish(timeout=120)
        got = _numbered(sub, f"{p}/m", count)
        lost = count - len(set(got))
        assert lost == 0, f"lost {lost} of {count}"
        assert got == list(range(count))  # in order, none twice
        assert _delivery(b)["gaps_total"] == 0
    finally:
        sub.close()
        pub.close()


def test_block_holds_puback_within_window(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    """While b acknowledges nothing (stopped), a's outbox fills and the gate holds the
    publisher's PUBACKs: the paho publisher stops at its window. Once b runs again
    everything is acknowledged and delivered, in order."""
    a_text = '[node]\nname = "a"\n[delivery]\noutbox_max_bytes = 65536\nwindow = 16\n'
    nodes.extend(_pair(tmp_path, a_text, '[node]\nname = "b"\n'))
    a, b = nodes
    p = f"k{uuid.uuid4().hex[:6]}"
    sub, pub = Client(b.mqtt_port), Client(a.mqtt_port, inflight=20)
    try:
        sub.subscribe(f"{p}/#")
        _route(pub, sub, f"{p}/probe")
        b.signal(signal.SIGSTOP)
        try:
            count = 400
            infos = [pub.client.publish(f"{p}/m", i.to_bytes(4, "big") + bytes(60), qos=1) for i in range(count)]
            wait_until(lambda: _delivery(a)["held_publishes"] > 0, 10, "a's gate to hold a publish")
            acked = sum(info.is_published() for info in infos)
            assert acked < count  # the publisher was slowed, not told "accepted" for all
        finally:
            b.signal(signal.SIGCONT)
        for info in infos:
            info.wait_for_publish(timeout=60)
        got = _numbered(sub, f"{p}/m", count)
        assert got == list(range(count))
        assert _delivery(a)["held_total"] > 0
    finally:
        sub.close()
        pub.close()


def test_drop_policy_reports_gaps(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    """With policy "drop" and a tiny outbox, messages published while b is stopped push
    the oldest out. b reports the loss on $SYS/zmesh/delivery/gaps (reason "evicted"),
    exactly: delivered + reported lost = published, nothing twice."""
    a_text = '[node]\nname = "a"\n[delivery]\npolicy = "drop"\noutbox_max_bytes = 65536\nwindow = 16\n'
    nodes.extend(_pair(tmp_path, a_text, '[node]\nname = "b"\n'))
    a, b = nodes
    p = f"g{uuid.uuid4().hex[:6]}"
    sub, pub = Client(b.mqtt_port), Client(a.mqtt_port, inflight=100)
    gaps = Subscriber(b.mqtt_port, GAPS)
    try:
        sub.subscribe(f"{p}/#")
        _route(pub, sub, f"{p}/probe")
        count = 1000
        b.signal(signal.SIGSTOP)
        try:
            infos = [pub.client.publish(f"{p}/m", i.to_bytes(4, "big") + bytes(60), qos=1) for i in range(count)]
            for info in infos:
                info.wait_for_publish(timeout=30)  # drop: acknowledged at once
            wait_until(lambda: _delivery(a)["outbox"]["evicted_total"] > 0, 10, "a to evict")
        finally:
            b.signal(signal.SIGCONT)
        reported: list[dict[str, Any]] = []
        got: list[int] = []

        def settled() -> bool:
            while not sub.messages.empty():
                message = sub.messages.get_nowait()
                if message.topic == f"{p}/m":
                    got.append(int.from_bytes(message.payload[:4], "big"))
            reported.extend(json.loads(m.payload) for m in gaps.drain())
            return len(got) + sum(g["count"] or 0 for g in reported) >= count

        wait_until(settled, 30, "every message delivered or reported lost")
        lost = sum(g["count"] or 0 for g in reported)
        assert reported and {g["reason"] for g in reported} == {"evicted"}
        assert {g["origin"] for g in reported} == {"a"}
        assert len(got) == len(set(got)) and got == sorted(got)  # in order, none twice
        assert len(got) + lost == count, (len(got), lost, reported)
        delivery = _delivery(b)
        assert delivery["lost_total"] == lost and delivery["by_origin"] == {"a": lost}
        assert sum(_delivery(a)["outbox"]["evicted_by_destination"].values()) >= lost
    finally:
        gaps.close()
        sub.close()
        pub.close()


def test_a_publish_past_the_gate_is_refused_and_never_acknowledged(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    """b stopped, a's outbox tiny: publishes wait in a's gate (65,536 at most); past that a
    publish is refused. An MQTT 3.1.1 client cannot be told no, so once the held ones are
    acknowledged (b runs again) the connection is closed: every publish but the refused
    ones got its PUBACK, the refused ones none."""
    from tests.helpers import RawMQTT, publish_packet

    a_text = '[node]\nname = "a"\n[delivery]\noutbox_max_bytes = 1048576\n'
    nodes.extend(_pair(tmp_path, a_text, '[node]\nname = "b"\n'))
    a, b = nodes
    p = f"r{uuid.uuid4().hex[:6]}"
    sub, probe = Client(b.mqtt_port), Client(a.mqtt_port)
    try:
        sub.subscribe(f"{p}/#")
        _route(probe, sub, f"{p}/probe")
        appended_before = _delivery(a)["outbox"]["appended_total"]
        count = 70_000
        with RawMQTT(a.mqtt_port) as raw:
            raw.connect(f"r-{uuid.uuid4().hex[:6]}", keepalive=0)  # it sends nothing while it waits
            b.signal(signal.SIGSTOP)
            try:
                raw.send(b"".join(publish_packet(f"{p}/m", b"x" * 8, qos=1, packet_id=i % 65535 + 1)
                                  for i in range(count)))

                def all_decided() -> dict[str, Any] | None:
                    d = _delivery(a)
                    decided = d["outbox"]["appended_total"] - appended_before + d["held_publishes"] + d["refused_total"]
                    return d if decided == count else None

                decided = wait_until(all_decided, 60, "a to take or refuse every publish")
                assert decided["held_publishes"] == 65_536 and decided["refused_total"] > 0
            finally:
                b.signal(signal.SIGCONT)
            closed, data = raw.closed_within(90)
        assert closed
        # Nothing but PUBACKs (0x40 0x02 + packet id), in publish order, none for the refused.
        assert len(data) % 4 == 0 and set(data[0::4]) == {0x40} and set(data[1::4]) == {0x02}
        pubacks = len(data) // 4
        assert pubacks == count - decided["refused_total"]
        ids = [int.from_bytes(data[i + 2:i + 4], "big") for i in range(0, len(data), 4)]
        assert ids == [i % 65535 + 1 for i in range(pubacks)]
    finally:
        sub.close()
        probe.close()
