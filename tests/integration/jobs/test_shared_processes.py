"""Shared subscriptions (``$share/GROUP/FILTER``) with real node processes, paho clients and
mosquitto_sub, on two and three nodes: each message to exactly one member of a group,
mesh-wide, acknowledged by the member's PUBACK; a member that dies gives back what it had
not acknowledged.

Every wait is on observable state: what clients received, and the publishing node's
``$SYS/zmesh/jobs`` figures (a group is a queue there, with the number of nodes serving
it). The one fixed wait is an absence check after a positive control.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    Publisher,
    Subscriber,
    collect,
    jobs_stats,
    make_certs,
    start_nodes,
    stop_all,
    wait_until,
    write_config,
)

SCAN = "$share/scan/jobs/#"
AUDIT = "$share/audit/jobs/#"


@pytest.fixture
def running(tmp_path: Path) -> Iterator[dict[str, list]]:
    started: dict[str, list] = {"nodes": [], "clients": [], "processes": []}
    yield started
    for process in started["processes"]:
        if process.poll() is None:
            process.kill()
        process.wait(5)
    for client in started["clients"]:
        client.close()
    stop_all(started["nodes"])


def three_nodes(tmp_path: Path, running: dict[str, list], config: str = "") -> list:
    certs = make_certs(tmp_path / "certs", ["a", "b", "c"])
    extra = ["--config", str(write_config(tmp_path / "n.toml", config))] if config else []
    (a,) = start_nodes(tmp_path, [dict(name="a", cert_dir=certs, control_port=0, extra=extra)])
    running["nodes"].append(a)
    others = start_nodes(tmp_path, [dict(name=n, cert_dir=certs, control_port=0, seeds=[a.control_port], extra=extra)
                                    for n in ("b", "c")])
    running["nodes"].extend(others)
    wait_until(lambda: a.peers_up() >= {"b", "c"}, 15, "a to see b and c")
    return [a, *others]


def until_served(node, group: str, nodes: int) -> None:
    """Until ``node`` knows ``nodes`` nodes with members of ``group`` (their hellos)."""
    wait_until(lambda: jobs_stats(node, group).get("workers", 0) == nodes, 15,
               f"{node.name} to see {group} served by {nodes} nodes")


class MosquittoSub:
    """``mosquitto_sub -v`` as a member: one ``topic payload`` line per message, read by a
    thread into ``lines``."""

    def __init__(self, port: int, filt: str, running: dict[str, list]) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-v", "-t", filt],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        running["processes"].append(self.process)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def payloads(self) -> list[str]:
        return [line.split(" ", 1)[1] for line in list(self.lines) if " " in line]


HOLDER = r"""
import sys, paho.mqtt.client as mqtt
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="holder")
client.manual_ack_set(True)  # receives, never acknowledges: a scanner stuck on its work
def on_message(client, userdata, message):
    print(message.payload.decode(), flush=True)
client.on_message = on_message
client.on_subscribe = lambda *a: print("subscribed", flush=True)
client.connect("127.0.0.1", int(sys.argv[1]), keepalive=60)
client.subscribe(sys.argv[2], qos=1)
client.loop_forever()
"""


@pytest.mark.timeout(90)
def test_each_message_goes_to_exactly_one_member_across_three_nodes(tmp_path: Path, running: dict[str, list]) -> None:
    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub not installed (Debian: mosquitto-clients)")
    a, b, c = three_nodes(tmp_path, running)
    members = [Subscriber(a.mqtt_port, SCAN, qos=1), Subscriber(b.mqtt_port, SCAN, qos=1)]
    audit = Subscriber(b.mqtt_port, AUDIT, qos=1)  # another group: gets every message too
    plain = Subscriber(c.mqtt_port, "jobs/#", qos=1)  # not shared: gets every message
    publisher = Publisher(a.mqtt_port)
    running["clients"] += [*members, audit, plain, publisher]
    sub_c = MosquittoSub(c.mqtt_port, SCAN, running)
    until_served(a, SCAN, 3)
    until_served(a, AUDIT, 1)
    sent = [f"target-{i}" for i in range(300)]
    for i, target in enumerate(sent):
        publisher.client.publish(f"jobs/scan/{i % 7}", target, qos=1)  # PUBACKs awaited below
    publisher.publish("jobs/scan/last", "fence", qos=1)
    sent.append("fence")

    assert sorted(m.payload.decode() for m in collect(plain, len(sent), timeout=30)) == sorted(sent)
    assert sorted(m.payload.decode() for m in collect(audit, len(sent), timeout=30)) == sorted(sent)

    kept: Counter[str] = Counter()  # what the paho members took

    def all_taken() -> bool:
        for member in members:
            kept.update(m.payload.decode() for m in member.drain())
        return sum(kept.values()) + len(sub_c.payloads()) >= len(sent)

    wait_until(all_taken, 30, "every message taken by a member of the group")
    time.sleep(1.0)  # absence check: no second copy of any message turns up
    all_taken()
    counts = kept + Counter(sub_c.payloads())
    assert set(counts) == set(sent)
    assert set(counts.values()) == {1}, [(p, n) for p, n in counts.items() if n > 1][:5]
    stats = wait_until(lambda: (st := jobs_stats(a, SCAN))["done_total"] == len(sent) and st, 10,
                       "every message acknowledged")
    assert stats["redeliveries_total"] == 0 and stats["dead_total"] == 0, stats


@pytest.mark.timeout(90)
def test_a_member_killed_mid_stream_has_its_unacknowledged_messages_go_to_another(
        tmp_path: Path, running: dict[str, list]) -> None:
    # Leases of 1 s: a member that stays connected keeps what it holds (its node extends
    # the lease), however long it takes; only its death gives the messages back.
    a, b, c = three_nodes(tmp_path, running, "[jobs]\nlease = 1.0\n")
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    holder = subprocess.Popen([sys.executable, str(script), str(b.mqtt_port), SCAN],
                              stdout=subprocess.PIPE, text=True)
    running["processes"].append(holder)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "subscribed"
    held: list[str] = []
    threading.Thread(target=lambda: held.extend(line.strip() for line in holder.stdout), daemon=True).start()
    until_served(a, SCAN, 1)
    publisher = Publisher(a.mqtt_port)
    running["clients"].append(publisher)
    sent = [f"target-{i}" for i in range(60)]
    for target in sent[:20]:
        publisher.publish("jobs/scan", target, qos=1)
    # Its credit (mqtt.max_inflight, 20) is full: it takes nothing more until it acknowledges.
    wait_until(lambda: len(held) == 20, 15, "the holder to receive the first twenty")
    worker = Subscriber(c.mqtt_port, SCAN, qos=1)  # joins later, acknowledges at once
    running["clients"].append(worker)
    until_served(a, SCAN, 2)
    for target in sent[20:]:
        publisher.publish("jobs/scan", target, qos=1)
    first = collect(worker, len(sent) - 20, timeout=15)
    time.sleep(2.5)  # absence check: 2.5 leases, and nothing the holder has came back
    assert worker.drain() == [] and jobs_stats(a, SCAN)["redeliveries_total"] == 0
    os.kill(holder.pid, signal.SIGKILL)  # dies mid-stream with 20 unacknowledged
    holder.wait(5)
    rest = collect(worker, 20, timeout=15)
    got = Counter(m.payload.decode() for m in first + rest)
    assert set(got) == set(sent) and set(got.values()) == {1}
    assert {m.payload.decode() for m in rest} == set(held)
    # Acknowledged by the worker's PUBACKs; the holder's twenty were delivered twice.
    stats = wait_until(lambda: (st := jobs_stats(a, SCAN))["done_total"] == len(sent) and st, 10,
                       "every message acknowledged")
    assert stats["redeliveries_total"] == 20 and stats["dead_total"] == 0, stats


@pytest.mark.timeout(90)
def test_a_persistent_session_member_gets_its_share_when_it_returns(tmp_path: Path, running: dict[str, list]) -> None:
    # Leases of 1 s: messages queued for an absent client with a persistent session stay
    # its own (its node extends their leases) until it comes back, however long it is away.
    a, b, _c = three_nodes(tmp_path, running, "[jobs]\nlease = 1.0\n")
    member = Subscriber(b.mqtt_port, SCAN, qos=1, client_id="scanner-7", clean=False)
    until_served(a, SCAN, 1)
    member.close()  # away; its session (and so its membership) stays on b
    publisher = Publisher(a.mqtt_port)
    running["clients"].append(publisher)
    sent = [f"target-{i}" for i in range(5)]
    for target in sent:
        publisher.publish("jobs/scan", target, qos=1)
    wait_until(lambda: jobs_stats(a, SCAN)["in_flight"] == len(sent), 10, "the five to be held at b")
    time.sleep(2.5)  # absence check: 2.5 leases away, and nothing was taken back
    stats = jobs_stats(a, SCAN)
    assert (stats["in_flight"], stats["redeliveries_total"], stats["done_total"]) == (5, 0, 0), stats
    back = Subscriber(b.mqtt_port, client_id="scanner-7", clean=False)  # resumes, no new SUBSCRIBE
    running["clients"].append(back)
    assert sorted(m.payload.decode() for m in collect(back, len(sent), timeout=10)) == sorted(sent)
    wait_until(lambda: jobs_stats(a, SCAN)["done_total"] == len(sent), 10, "its PUBACKs to ack the five")


def test_mqtt5_shared_subscriptions_get_no_retained_messages_and_no_local_is_a_protocol_error(
        tmp_path: Path, running: dict[str, list]) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.subscribeoptions import SubscribeOptions

    certs = make_certs(tmp_path / "certs", ["a"])
    (a,) = start_nodes(tmp_path, [dict(name="a", cert_dir=certs, control_port=0)])
    running["nodes"].append(a)
    publisher = Publisher(a.mqtt_port)
    running["clients"].append(publisher)
    publisher.publish("status/x", "old", qos=1, retain=True)
    plain = Subscriber(a.mqtt_port, "status/#", qos=1, protocol=mqtt.MQTTv5)
    shared = Subscriber(a.mqtt_port, "$share/g/status/#", qos=1, protocol=mqtt.MQTTv5)
    running["clients"] += [plain, shared]
    assert plain.get().payload == b"old"  # retained, for the ordinary subscription only
    until_served(a, "$share/g/status/#", 1)
    publisher.publish("status/x", "live", qos=1)
    assert shared.get().payload == b"live" and plain.get().payload == b"live"
    assert shared.drain() == []

    reasons: list[int] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="no-local", protocol=mqtt.MQTTv5)
    client.on_disconnect = lambda c, u, flags, reason, props: reasons.append(int(reason.value))
    client.connect("127.0.0.1", a.mqtt_port)
    client.loop_start()
    try:
        client.subscribe("$share/g/status/#", options=SubscribeOptions(qos=1, noLocal=True))
        wait_until(lambda: reasons, 10, "the node to close the connection")
    finally:
        client.loop_stop()
    assert reasons[0] == 0x82  # Protocol Error (MQTT 5 section 3.8.3.1)
