"""Delivery you can count on across nodes (issue 17, docs/delivery.md §10): real node
processes, real paho clients.

Two nodes (a, b) serve most tests; each test uses its own topic prefix. The tests that kill
or restart a node make their own.
"""

from __future__ import annotations

import asyncio
import json
import queue
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from tests.helpers import (
    NodeProcess,
    Publisher,
    RawMQTT,
    Subscriber,
    assert_quiet,
    await_route,
    collect,
    make_certs,
    publish_packet,
    start_mesh,
    stop_all,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

GAPS = "$SYS/zmesh/delivery/gaps"


class Pair:
    def __init__(self, workdir: Path, certs: Path, nodes: list[NodeProcess]) -> None:
        self.workdir, self.certs = workdir, certs
        self.a, self.b = nodes


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    workdir = tmp_path_factory.mktemp("delivery")
    certs = make_certs(workdir / "certs", ["a", "b", "e"])
    started: list[NodeProcess] = []
    try:
        start_mesh(workdir, certs, ["a", "b"], started)
        yield Pair(workdir, certs, started)
    finally:
        stop_all(started)


def prefix() -> str:
    return f"d{uuid.uuid4().hex[:8]}"


def test_qos1_and_qos2_across_two_nodes(pair: Pair) -> None:
    """Numbered streams: every QoS 1 and QoS 2 message once, in order, and the receiver's
    stream counters show they came that way (not over today's PUB/SUB fan-out)."""
    p = prefix()
    with Subscriber(pair.b.mqtt_port, f"{p}/#", qos=2) as sub, Publisher(pair.a.mqtt_port) as pub:
        await_route(pub, sub, f"{p}/probe")
        before = pair.b.sys_value("$SYS/zmesh/node")["delivery"]["released_total"]
        for qos in (1, 2):
            for i in range(200):
                pub.client.publish(f"{p}/q{qos}", f"{qos}:{i}".encode(), qos=qos)
            got = collect(sub, 200, timeout=30)
            assert [m.payload for m in got] == [f"{qos}:{i}".encode() for i in range(200)]
            assert {m.qos for m in got} == {qos}
        assert_quiet(sub, what="a duplicate")
        after = pair.b.sys_value("$SYS/zmesh/node")["delivery"]
        # 400 messages, plus the QoS 0 probes' neighbours: at least 400 came as stream frames.
        assert after["released_total"] - before >= 400
        assert after["gaps_total"] == 0


class SubackClient:
    """A paho subscriber that publishes from inside its SUBACK callback, on an MQTT
    connection to the other node whose 20 PUBLISH packets are written in one send: the
    messages leave the moment the SUBACK is read (0 ms after it)."""

    def __init__(self, port: int, publisher: RawMQTT, per_round: int) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.acks: queue.Queue[tuple[int, float]] = queue.Queue()
        self.topic = ""
        self.packet_id = 0
        self.publisher, self.per_round = publisher, per_round
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"s-{uuid.uuid4().hex[:8]}")
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_subscribe = self._subscribed
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def _subscribed(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        at = time.perf_counter()
        topic = self.topic  # one subscribe at a time: its SUBACK may come before subscribe() returns
        packets = []
        for i in range(self.per_round):
            self.packet_id = self.packet_id % 65535 + 1
            packets.append(publish_packet(topic, f"{topic}:{i}".encode(), qos=1, packet_id=self.packet_id))
        self.publisher.send(b"".join(packets))
        self.acks.put((mid, at))

    def subscribe(self, filt: str, topic: str) -> float:
        """Subscribe; the SUBACK's latency in seconds (once the round is published)."""
        self.topic = topic
        started = time.perf_counter()
        _rc, mid = self.client.subscribe(filt, qos=1)
        while True:
            got, at = self.acks.get(timeout=10)
            if got == mid:
                return at - started

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_1000_qos1_published_0ms_after_suback_on_another_node(pair: Pair) -> None:
    """50 rounds: a subscriber on b subscribes to a new topic; the moment its SUBACK is read,
    1,000 QoS 1 messages in all are published to it on a. None may be lost, none repeated,
    and every one is acknowledged to its publisher (the subscription reaches a's PUB some
    time after the SUBACK: 1-5 of 20 lost in issue 17)."""
    p = prefix()
    rounds, per_round = 50, 20
    latencies: list[float] = []
    with Subscriber(pair.b.mqtt_port, f"{p}/probe/#", qos=1) as probe, Publisher(pair.a.mqtt_port) as pub:
        await_route(pub, probe, f"{p}/probe/x")  # the link is up: what is measured is the subscription
    with RawMQTT(pair.a.mqtt_port) as raw:
        raw.connect(f"r-{uuid.uuid4().hex[:8]}")
        sub = SubackClient(pair.b.mqtt_port, raw, per_round)
        try:
            for r in range(rounds):
                latencies.append(sub.subscribe(f"{p}/r{r}/#", f"{p}/r{r}/m"))
            pubacks = [raw.read_packet(timeout=30)[0] for _ in range(rounds * per_round)]
            assert set(pubacks) == {0x40}
            got: dict[str, list[bytes]] = {}
            deadline = time.monotonic() + 20
            total = 0
            while total < rounds * per_round:
                try:
                    message = sub.messages.get(timeout=max(deadline - time.monotonic(), 0.01))
                except queue.Empty:
                    break
                got.setdefault(message.topic, []).append(message.payload)
                total += 1
        finally:
            sub.close()
    lost = {f"{p}/r{r}/m": per_round - len(got.get(f"{p}/r{r}/m", [])) for r in range(rounds)}
    lost = {t: n for t, n in lost.items() if n}
    latencies.sort()
    print(f"SUBACK latency p50 {statistics.median(latencies) * 1000:.2f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99) - 1] * 1000:.2f} ms; lost {sum(lost.values())}")
    assert not lost, f"lost {sum(lost.values())} of {rounds * per_round}: {lost}"
    for r in range(rounds):  # in order, none twice
        topic = f"{p}/r{r}/m"
        assert got[topic] == [f"{topic}:{i}".encode() for i in range(per_round)]


def _node_config(workdir: Path, name: str, text: str) -> list[str]:
    path = workdir / f"{name}-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(f'[node]\nname = "{name}"\n{text}')
    return ["--config", str(path)]


def test_publish_then_stop_is_delivered(pair: Pair) -> None:
    """An embedded node joins, publishes one QoS 1 message and leaves its ``async with`` at
    once: the message still reaches a subscriber on b (stop waits for the acknowledgement;
    today it was lost in 4 of 6 runs)."""
    from zmesh import Node

    p = prefix()

    async def publish_and_leave(i: int) -> None:
        async with Node(name="e", cert=pair.certs / "e.key_secret", trusted=pair.certs,
                        listen="127.0.0.1:0", peers=[f"127.0.0.1:{pair.b.control_port}"], mqtt=False) as node:
            await node.wait_for_peers(1, timeout=15)
            await node.publish(f"{p}/stop", f"m{i}".encode(), qos=1)

    with Subscriber(pair.b.mqtt_port, f"{p}/#", qos=1) as sub:
        for i in range(6):
            asyncio.run(publish_and_leave(i))
            message = sub.get(timeout=10)
            assert message.payload == f"m{i}".encode()


def _gaps_subscriber(node: NodeProcess) -> Subscriber:
    return Subscriber(node.mqtt_port, GAPS)


def test_origin_sigkill_reports_open_ended_gap(tmp_path: Path) -> None:
    """a publishes at QoS 1 to b and is SIGKILLed (no data_dir); restarted with the same key,
    its next message starts a new epoch, and b reports what the old one may still have
    owed as an open-ended gap on $SYS/zmesh/delivery/gaps (and in its counters)."""
    certs = make_certs(tmp_path / "certs", ["a", "b"])
    nodes: list[NodeProcess] = []
    try:
        a, b = start_mesh(tmp_path, certs, ["a", "b"], nodes)
        p = prefix()
        with Subscriber(b.mqtt_port, f"{p}/#", qos=1) as sub, _gaps_subscriber(b) as gaps:
            with Publisher(a.mqtt_port) as pub:
                await_route(pub, sub, f"{p}/probe")
                for i in range(10):
                    pub.client.publish(f"{p}/m", f"{i}".encode(), qos=1)
                assert [m.payload for m in collect(sub, 10)] == [f"{i}".encode() for i in range(10)]
            a.kill()
            a2 = NodeProcess(tmp_path, "a", certs, control_port=a.control_port, seeds=[b.control_port])
            nodes.append(a2)
            with Publisher(a2.mqtt_port) as pub:
                await_route(pub, sub, f"{p}/probe")
                pub.publish(f"{p}/m", b"after", qos=1)
            got = collect(sub, 1, timeout=20)
            assert got[0].payload == b"after"
            gap = json.loads(gaps.get(timeout=20).payload)
            assert gap["origin"] == "a" and gap["reason"] == "origin_restarted"
            assert gap["last"] is None  # open-ended: "after N, an unknown number"
            delivery = b.sys_value("$SYS/zmesh/node")["delivery"]
            assert delivery["gaps_open_ended_total"] >= 1
    finally:
        stop_all(nodes)


def test_origin_sigkill_with_a_data_dir_delivers_what_it_held_once(tmp_path: Path) -> None:
    """a (with a data_dir) acknowledges 600 QoS 1 publishes while b is frozen (SIGSTOP), so
    they wait in a's outbox, and is SIGKILLed. Restarted from its data_dir, a resumes the
    same streams (same epochs and numbers, from sessions.db): b's subscriber gets all 600,
    in order, none twice, and b reports no gap. Without the disk outbox they were lost
    (the restarted origin starts new epochs: an open-ended gap, as the test above shows)."""
    import signal

    certs = make_certs(tmp_path / "certs", ["a", "b"])
    fast = "[mesh]\nheartbeat_interval = 0.2\npeer_expiry = 1.5\n"
    # A window of 100: at most 100 of the 600 can be in flight (in b's socket) when a dies;
    # the other 500 exist only in a's outbox, so only the disk copy can deliver them.
    a_config = _node_config(tmp_path, "a", f'data_dir = "{tmp_path / "a-data"}"\n{fast}[delivery]\nwindow = 100\n')
    nodes: list[NodeProcess] = []
    count = 600
    try:
        a = NodeProcess(tmp_path, "a", certs, extra=a_config)
        nodes.append(a)
        b = NodeProcess(tmp_path, "b", certs, seeds=[a.control_port], extra=_node_config(tmp_path, "b", fast))
        nodes.append(b)
        p = prefix()
        with Subscriber(b.mqtt_port, f"{p}/#", qos=1) as sub, _gaps_subscriber(b) as gaps:
            with Publisher(a.mqtt_port) as pub:
                await_route(pub, sub, f"{p}/probe")
                b.signal(signal.SIGSTOP)
                try:
                    infos = [pub.client.publish(f"{p}/m", f"{i}".encode(), qos=1) for i in range(count)]
                    # Held while b still counts as up and has a window's worth unacknowledged;
                    # acknowledged once a sees b down (peer_expiry) and detaches it.
                    wait_until(lambda: all(info.is_published() for info in infos), 60,
                               "a to acknowledge every publish")
                    a.kill()
                finally:
                    b.signal(signal.SIGCONT)
            assert "outbox restored" not in a.output()
            a2 = NodeProcess(tmp_path, "a", certs, control_port=a.control_port, seeds=[b.control_port],
                             extra=a_config)
            nodes.append(a2)
            got = collect(sub, count, timeout=60)
            assert [m.payload for m in got] == [f"{i}".encode() for i in range(count)]
            assert_quiet(sub, timeout=1.0)  # none twice
            assert "outbox restored" in a2.output()
            # b's interest declaration reached a2's seed probe (b answers on the identity it
            # last saw): taken as delivery's, not dropped as a bad control message.
            assert "mesh_bad_control" not in a2.output()
            with pytest.raises(queue.Empty):
                gaps.get(timeout=0.5)
            assert b.sys_value("$SYS/zmesh/node")["delivery"]["gaps_total"] == 0
    finally:
        stop_all(nodes)


def test_hostile_stream_input_is_dropped_and_counted(tmp_path: Path) -> None:
    """A member (a fake peer) sends garbage behind the delivery control tag and the stream
    tag: each costs one counted drop (delivery_bad_control), the reader survives, and a
    valid stream frame from the same peer afterwards is delivered."""
    from tests.helpers import load_keys
    from tests.integration.mesh.fakepeer import FakePeer
    from zmesh.mesh import streamwire as sw

    certs = make_certs(tmp_path / "certs", ["hub", "evil"])
    nodes = [NodeProcess(tmp_path, "hub", certs)]
    try:
        hub = nodes[0]
        hub_public, _ = load_keys(certs / "hub.key")
        with FakePeer(certs / "evil.key_secret", hub_public, hub.control_port) as peer:
            peer.wait_joined()
            wait_until(lambda: "evil" in hub.peers_up(), 15, "hub to see the fake peer up")
            stream_prefix = sw.subscription(hub_public.decode())
            wait_until(lambda: (peer.read_subscriptions(0.05), stream_prefix in peer.subscriptions)[1], 10,
                       "the hub's SUB to take the stream frames addressed to it")
            assert b"" not in peer.subscriptions
            with Subscriber(hub.mqtt_port, "x/#", qos=1) as sub:
                bad_controls = [b"\xfe", b"\xfe\x93\x01\x02", b"\xfe" + b"\xc1" * 10,
                                b"\xfe\x94\x01\x01\x00\x00", sw.encode_nack(1, 5, 5 + 70_000)]
                for junk in bad_controls:
                    peer.dealer.send(junk)
                key = hub_public.decode()
                # empty body, undecodable, no entries (a frame of none is refused)
                bad_frames = [stream_prefix, stream_prefix + b"\x93", stream_prefix + b"\xc1" * 5,
                              stream_prefix + b"\x94\x01\x01\x01\x90"]
                for junk in bad_frames:
                    peer.publish(junk)
                wait_until(lambda: _status(hub)["drops"].get("delivery_bad_control", 0)
                           >= len(bad_controls) + len(bad_frames), 10, "every bad input counted")
                entry = sw.StreamEntry("x/ok", b"still", 1, int(time.time() * 1000), None)
                peer.publish(sw.encode_frame(key, 7, 1, [entry]))
                message = sub.get(timeout=10)
                assert (message.topic, message.payload) == ("x/ok", b"still")
                assert _status(hub)["delivery"]["released_total"] == 1
    finally:
        stop_all(nodes)


def _status(node: NodeProcess) -> dict[str, Any]:
    return node.sys_value("$SYS/zmesh/node")
