"""Persistent MQTT sessions on disk (issue 17, docs/delivery.md section 9): a node with a
``data_dir`` that is SIGKILLed and restarted on the same directory still holds its clients'
persistent sessions: subscriptions, queued QoS 1/2 messages, QoS 2 state both ways. Real
node processes, paho clients (3.1.1 clean session 0, MQTT 5 session expiry) and raw sockets
where a test must stop half-way through a QoS 2 flow."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.helpers import (
    RawMQTT,
    assert_quiet,
    make_certs,
    publish_packet,
    wait_until,
)
from tests.mqttkit import Client, ack, read_publish, subscribe_311

pytestmark = pytest.mark.timeout(180)


class Node:
    """One node on a fixed data dir that can be SIGKILLed and started again."""

    def __init__(self, workdir: Path, data_dir: Path | None) -> None:
        from tests.helpers import NodeProcess

        self._cls = NodeProcess
        self.workdir = workdir
        self.certs = make_certs(workdir / "certs", ["a"])
        self.extra = ["--data-dir", str(data_dir)] if data_dir is not None else []
        self.process = NodeProcess(workdir, "a", self.certs, extra=self.extra)

    @property
    def port(self) -> int:
        return self.process.mqtt_port

    def crash_and_restart(self) -> None:
        self.process.kill()  # SIGKILL: nothing flushed, nothing said
        self.process.log.close()
        self.process = self._cls(self.workdir, "a", self.certs, extra=self.extra)

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    started = Node(tmp_path, tmp_path / "data")
    try:
        yield started
    finally:
        started.stop()


def prefix() -> str:
    return f"ps-{uuid.uuid4().hex[:8]}"


def test_sessions_survive_sigkill_with_their_queued_messages(node: Node) -> None:
    p = prefix()
    old = Client(node.port, f"{p}-311", protocol=mqtt.MQTTv311, clean=False)
    new = Client(node.port, f"{p}-5", protocol=mqtt.MQTTv5, clean=False, session_expiry=3600)
    brief = Client(node.port, f"{p}-brief", protocol=mqtt.MQTTv5, clean=False, session_expiry=1)
    for client in (old, new, brief):
        assert client.subscribe(f"{p}/#", qos=1) == [1]
        client.disconnect()
    gone_at = time.time()
    pub = Client(node.port, f"{p}-pub", protocol=mqtt.MQTTv311)
    for i in range(20):
        pub.publish(f"{p}/alert", f"m{i}", qos=1)  # each waits for its PUBACK
    pub.close()

    node.crash_and_restart()
    # The brief session's expiry (1 s from its disconnect) passes while the node is down
    # or starting: wall time, the clock the expiry is counted on.
    wait_until(lambda: time.time() > gone_at + 1.5, 10, "the brief session's expiry to pass")

    for client in (old, new):
        again = Client(node.port, client.client_id, protocol=client.protocol, clean=False,
                       session_expiry=client.session_expiry)
        try:
            assert again.session_present, f"{client.client_id}: session not restored"
            got = again.collect(20)
            assert [m.payload for m in got] == [f"m{i}".encode() for i in range(20)]  # none lost, in order
            assert {m.qos for m in got} == {1}
            # The subscription itself was restored: a new message arrives live.
            pub = Client(node.port, f"{p}-pub2", protocol=mqtt.MQTTv311)
            pub.publish(f"{p}/alert", b"after", qos=1)
            pub.close()
            assert again.get().payload == b"after"
        finally:
            again.close()
    expired = Client(node.port, brief.client_id, protocol=mqtt.MQTTv5, clean=False, session_expiry=1)
    try:
        assert not expired.session_present  # expired while the node was down: gone
        assert_quiet(expired, what="for a session that expired")  # type: ignore[arg-type]
    finally:
        expired.close()


def _raw_session(port: int, client_id: str) -> tuple[RawMQTT, bool]:
    raw = RawMQTT(port)
    body = raw.connect(client_id, clean=False)
    assert body[1] == 0, f"CONNACK return code {body[1]}"
    return raw, bool(body[0] & 1)


def test_qos2_in_flight_to_a_client_survives_restarts_exactly_once(node: Node) -> None:
    p = prefix()
    raw, present = _raw_session(node.port, f"{p}-q2")
    assert not present
    raw.send(subscribe_311(1, f"{p}/#", 2))
    first, body = raw.read_packet()
    assert first == 0x90 and body[-1] == 2  # SUBACK, QoS 2 granted
    pub = Client(node.port, f"{p}-pub", protocol=mqtt.MQTTv311)
    pub.publish(f"{p}/x", b"only-once", qos=2)
    pub.close()
    sent = read_publish(raw)
    assert (sent.qos, sent.payload) == (2, b"only-once")
    raw.close()  # no PUBREC: the message is in flight, PUBLISH stage

    node.crash_and_restart()
    raw, present = _raw_session(node.port, f"{p}-q2")
    assert present
    again = read_publish(raw)
    assert (again.packet_id, again.dup, again.payload) == (sent.packet_id, True, b"only-once")
    raw.send(ack(0x50, sent.packet_id))  # PUBREC: the client has it now
    first, body = raw.read_packet()
    assert (first, int.from_bytes(body[:2], "big")) == (0x62, sent.packet_id)  # PUBREL
    raw.close()  # no PUBCOMP: the PUBREL stage

    node.crash_and_restart()
    raw, present = _raw_session(node.port, f"{p}-q2")
    assert present
    first, body = raw.read_packet()
    # PUBREL again, never the PUBLISH: a second copy would be a second delivery.
    assert (first, int.from_bytes(body[:2], "big")) == (0x62, sent.packet_id)
    raw.send(ack(0x70, sent.packet_id))  # PUBCOMP
    closed, extra = raw.closed_within(1.0)
    assert not closed and extra == b""  # nothing more is owed
    raw.close()


def test_qos2_from_a_client_is_delivered_once_across_a_restart(node: Node) -> None:
    p = prefix()
    sub = Client(node.port, f"{p}-sub", protocol=mqtt.MQTTv311, clean=False)
    assert sub.subscribe(f"{p}/#", qos=2) == [2]
    sub.disconnect()
    raw, _ = _raw_session(node.port, f"{p}-pub")
    raw.send(publish_packet(f"{p}/in", b"once", qos=2, packet_id=7))
    first, body = raw.read_packet()
    assert (first, int.from_bytes(body[:2], "big")) == (0x50, 7)  # PUBREC: the node has it
    raw.close()  # the PUBREL is not sent before the crash

    node.crash_and_restart()
    raw, present = _raw_session(node.port, f"{p}-pub")
    assert present
    raw.send(publish_packet(f"{p}/in", b"once", qos=2, packet_id=7, dup=True))  # the client resends
    first, body = raw.read_packet()
    assert (first, int.from_bytes(body[:2], "big")) == (0x50, 7)
    raw.send(ack(0x62, 7))  # PUBREL
    first, body = raw.read_packet()
    assert (first, int.from_bytes(body[:2], "big")) == (0x70, 7)  # PUBCOMP
    raw.close()

    again = Client(node.port, sub.client_id, protocol=mqtt.MQTTv311, clean=False)
    try:
        assert again.session_present
        got = again.get()
        assert (got.payload, got.qos) == (b"once", 2)
        assert_quiet(again, what="after the one copy")  # type: ignore[arg-type]  # not twice
    finally:
        again.close()


def test_without_data_dir_sessions_end_with_the_node(tmp_path: Path) -> None:
    node = Node(tmp_path, None)
    try:
        p = prefix()
        client = Client(node.port, f"{p}-311", protocol=mqtt.MQTTv311, clean=False)
        assert client.subscribe(f"{p}/#", qos=1) == [1]
        client.disconnect()
        pub = Client(node.port, f"{p}-pub", protocol=mqtt.MQTTv311)
        pub.publish(f"{p}/a", b"lost", qos=1)
        pub.close()
        node.crash_and_restart()
        again = Client(node.port, client.client_id, protocol=mqtt.MQTTv311, clean=False)
        try:
            assert not again.session_present  # in memory only, as before: the restart ended it
            assert_quiet(again, what="without a data_dir")  # type: ignore[arg-type]
        finally:
            again.close()
        assert not (tmp_path / "data").exists()
    finally:
        node.stop()
