"""Only the worker holding a job's lease may answer it (issue 14, hole 12).

Real node process, real paho clients: a submitter, two workers each holding one job, and an
intruder that holds none. Before the fix any client could publish ``$jobs/done/ID`` (or
``fail``/``extend``) and its answer was delivered to the submitter as the job's result; any
client could also publish ``$jobs/result/ID`` itself. Now such publishes are refused with
MQTT 5 reason 0x87 (not authorized, as Mosquitto answers a publish its ACL refuses),
counted in ``$SYS/zmesh/node`` ``drops``, and the job waits for its real worker.
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from tests.helpers import (
    MqttSubmitter,
    MqttWorker,
    NodeProcess,
    RawMQTT,
    Subscriber,
    make_certs,
    stop_all,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

NOT_AUTHORIZED = 0x87


class V5Client:
    """A paho MQTT 5 client whose QoS 1 publishes return the PUBACK's reason code."""

    def __init__(self, port: int, name: str) -> None:
        self.acks: dict[int, queue.Queue[int]] = {}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        self._pending: dict[int, int] = {}

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self.acks.setdefault(mid, queue.Queue()).put(int(reason.value))

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> int:
        """The PUBACK's reason code (QoS 1), or 0 once a QoS 0 publish is sent."""
        info = self.client.publish(topic, payload, qos=qos)
        if qos == 0:
            info.wait_for_publish(10)
            return 0
        return self.acks.setdefault(info.mid, queue.Queue()).get(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    certs = make_certs(tmp_path / "certs", ["s"])
    node = NodeProcess(tmp_path, "s", certs, control_port=0)
    try:
        yield node
    finally:
        stop_all([node])


def test_only_the_lease_holder_can_answer_a_job(node: NodeProcess) -> None:
    opened: list[Any] = []
    stalls = node.loop_stalls()["stalls_total"]  # from here on: start-up is not the attack
    try:
        results = Subscriber(node.mqtt_port, "$jobs/result/#", "$jobs/failed/#", qos=1)
        opened.append(results)
        w1 = MqttWorker(node.mqtt_port, "scan", lambda job_id, payload: None, name="w1")  # holds its job
        w2 = MqttWorker(node.mqtt_port, "scan", lambda job_id, payload: None, name="w2")
        opened += [w1, w2]
        submitter = MqttSubmitter(node.mqtt_port)
        opened.append(submitter)
        submitter.submit("scan", {"j1": b"10.0.0.1", "j2": b"10.0.0.2"})
        wait_until(lambda: len(w1.received) == 1 and len(w2.received) == 1, 10, "each worker to hold a job")
        held_by_w1 = w1.received[0]
        held_by_w2 = w2.received[0]

        intruder = V5Client(node.mqtt_port, "intruder")
        opened.append(intruder)
        # Not a worker at all: every answer to w1's job is refused, as is forging its result.
        for topic in (f"$jobs/done/{held_by_w1}", f"$jobs/fail/{held_by_w1}", f"$jobs/extend/{held_by_w1}",
                      f"$jobs/result/{held_by_w1}", f"$jobs/failed/{held_by_w1}", f"$jobs/queue/scan/{held_by_w1}",
                      "$jobs/done/no-such-job"):
            assert intruder.publish(topic, b"forged") == NOT_AUTHORIZED, topic
        intruder.publish(f"$jobs/done/{held_by_w1}", b"forged at qos 0", qos=0)
        # A worker, but of the other job (MQTT 3.1.1: a plain PUBACK, and dropped).
        w2.client.publish(f"$jobs/done/{held_by_w1}", b"forged by w2", qos=1).wait_for_publish(10)
        # Submitting stays open to every client the ACL lets publish there.
        assert intruder.publish("$jobs/submit/other/j3", b"x") == 0
        # A will is a publish too: one on w1's job, sent when the intruder drops its socket.
        with RawMQTT(node.mqtt_port) as raw:
            raw.connect(f"will-{uuid.uuid4().hex[:6]}", will=(f"$jobs/done/{held_by_w1}", b"forged will", 1, False))
        wait_until(lambda: node.sys_value("$SYS/zmesh/node")["drops"].get("jobs_not_lease_holder") == 7, 10,
                   "the forged will to be refused")

        # The real answers arrive, and they are the first (and only) outcomes published.
        w1.client.publish(f"$jobs/done/{held_by_w1}", b"open: 22", qos=1).wait_for_publish(10)
        first = results.get()
        assert (first.topic, first.payload) == (f"$jobs/result/{held_by_w1}", b"open: 22")
        w2.client.publish(f"$jobs/done/{held_by_w2}", b"open: 80", qos=1).wait_for_publish(10)
        second = results.get()
        assert (second.topic, second.payload) == (f"$jobs/result/{held_by_w2}", b"open: 80")
        assert not results.drain()

        sys_node = node.sys_value("$SYS/zmesh/node")
        # done, fail, extend, no-such-job, qos 0, w2's, the will: seven answers from non-holders;
        # result, failed, queue: three topics only the node writes.
        assert sys_node["drops"].get("jobs_not_lease_holder") == 7, sys_node["drops"]
        assert sys_node["drops"].get("jobs_reserved_topic") == 3, sys_node["drops"]
        lag = node.loop_stalls()
        assert lag["stalls_total"] == stalls, lag  # issue 14: no wake-up more than 50 ms late
    finally:
        for thing in reversed(opened):
            thing.close()
    assert "dropped 1 (jobs_not_lease_holder)" in node.output()
