"""zmesh across hosts: each node in its own network namespace, all joined by one bridge.

Liveness is fast here (heartbeat 0.2 s, peer expiry 1 s), so a dead or partitioned peer must be
marked down within ``EXPIRY_MARGIN`` of the expiry."""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import pytest

from tests.helpers import REPO, await_route, get_until, wait_until
from tests.netns.conftest import Mesh
from tests.netns.netns import Host, Net
from tests.netns.node import HostSubscriber, NodeOnHost

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

PEER_EXPIRY = 1.0
# Expiry is checked on the heartbeat tick; allow that, a loaded 2-core machine, and the MQTT
# hop that reports it.
EXPIRY_MARGIN = 2.0


# ------------------------------------------------------------------------------ helpers


class PeersWatch(HostSubscriber):
    """A node's ``$SYS/zmesh/peers``: the current value on subscribe, then every change."""

    def __init__(self, node: NodeOnHost) -> None:
        super().__init__(node.ip, node.mqtt_port, "$SYS/zmesh/peers")
        self.node = node

    def wait_for(self, condition: Any, timeout: float, what: str) -> tuple[dict[str, str], float]:
        """Wait for a value (name -> state) satisfying ``condition``; returns it and the
        monotonic time it arrived."""
        message, _ = get_until(self, lambda m: condition(_states(m.payload)), timeout,
                               f"{self.node.name}: {what}")
        return _states(message.payload), time.monotonic()


def _states(payload: bytes | bytearray) -> dict[str, str]:
    return {p["name"]: p["state"] for p in json.loads(payload)}


def wait_full_mesh(nodes: list[NodeOnHost], timeout: float = 20) -> None:
    names = {n.name for n in nodes}
    for node in nodes:
        others = names - {node.name}

        def sees_all(n: NodeOnHost = node, o: set[str] = others) -> bool:
            return n.peers_up() >= o

        wait_until(sees_all, timeout, f"{node.name} to see {sorted(others)} up")


def three_nodes(net: Net, mesh: Mesh) -> tuple[NodeOnHost, NodeOnHost, NodeOnHost]:
    """a, b, c on three hosts; b and c are seeded with a's address only."""
    mesh.certs("a", "b", "c")
    ha, hb, hc = net.add_host("a"), net.add_host("b"), net.add_host("c")
    a = mesh.node(ha, "a", peer_expiry=PEER_EXPIRY)
    b = mesh.node(hb, "b", seeds=[ha.ip], peer_expiry=PEER_EXPIRY)
    c = mesh.node(hc, "c", seeds=[ha.ip], peer_expiry=PEER_EXPIRY)
    wait_full_mesh([a, b, c])
    return a, b, c


def assert_delivers(source: NodeOnHost, *targets: NodeOnHost, topic: str | None = None) -> None:
    """A message published on ``source`` reaches an MQTT subscriber on every target."""
    topic = topic or f"t/{source.name}/{uuid.uuid4().hex[:8]}"
    payload = f"from {source.name} {uuid.uuid4().hex}".encode()
    subscribers = [t.subscriber(topic, qos=1) for t in targets]
    try:
        with source.publisher() as publisher:
            for subscriber in subscribers:
                await_route(publisher, subscriber, topic, timeout=15)
            publisher.publish(topic, payload, qos=1)
            for target, subscriber in zip(targets, subscribers, strict=True):
                message, _ = get_until(subscriber, lambda m: m.payload == payload, 10,
                                       f"{payload!r} from {source.name} at {target.name}")
                assert message.topic == topic
    finally:
        for subscriber in subscribers:
            subscriber.close()


# -------------------------------------------------------------------------------- tests


def _lines(process: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.strip())

    threading.Thread(target=pump, daemon=True).start()
    return lines


@pytest.mark.parametrize("group", ["224.0.0.251", "239.255.77.77"], ids=["mdns-group", "site-local-group"])
def test_multicast_crosses_the_bridge(net: Net, group: str) -> None:
    a, b, c = net.add_host("a"), net.add_host("b"), net.add_host("c")
    for host in (a, b, c):
        routes = host.check_output(["ip", "route"])
        assert "224.0.0.0/4 dev eth0" in routes, f"{host}: {routes}"
    port = 5353 if group == "224.0.0.251" else 45454
    module = [sys.executable, "-m", "tests.netns.mcast"]
    receivers: list[tuple[Host, subprocess.Popen[str], queue.Queue[str]]] = []
    for host in (b, c):
        process = host.run([*module, "recv", group, str(port), "20"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, cwd=REPO)
        receivers.append((host, process, _lines(process)))
    for host, _, lines in receivers:
        assert lines.get(timeout=10) == "joined", f"{host} could not join {group}"
    # Joined on both; now send until each has one (a datagram sent before a join completes at
    # the bridge may be lost, so the sender repeats).
    sender = a.run([*module, "send", group, str(port), "300", "0.05"], cwd=REPO)
    try:
        for host, process, lines in receivers:
            process.wait(15)
            line = lines.get(timeout=5)
            assert process.returncode == 0 and line.startswith("{"), f"{host} received nothing on {group}: {line}"
            received = json.loads(line)
            assert received["from"] == a.ip, received
            assert received["data"].startswith("hello "), received
    finally:
        sender.kill()


def test_three_hosts_static_seeds(net: Net, mesh: Mesh) -> None:
    a, b, c = three_nodes(net, mesh)
    # Every node reports the others with the address it sees them at, on the bridge.
    for node in (a, b, c):
        peers = node.peers()
        assert set(peers) == {"a", "b", "c"} - {node.name}, peers
        for name, entry in peers.items():
            assert entry["state"] == "up", entry
            assert entry["address"] == f"{net.host(name).ip}:7100", entry
    assert_delivers(a, b, c)
    assert_delivers(c, a, b)


def test_killed_node_goes_down_and_comes_back(net: Net, mesh: Mesh) -> None:
    a, b, c = three_nodes(net, mesh)
    with contextlib.ExitStack() as stack:
        watches = [stack.enter_context(PeersWatch(a)), stack.enter_context(PeersWatch(c))]
        # A subscriber on a that outlives b's incarnation: a must subscribe it again on the
        # socket it dials to the restarted b (new event port).
        kept = stack.enter_context(a.subscriber("kept/b/#", qos=1))
        with b.publisher() as publisher:
            await_route(publisher, kept, "kept/b/before", timeout=15)
        for watch in watches:
            watch.wait_for(lambda s: s.get("b") == "up", 10, "b up")

        b.kill()
        killed = time.monotonic()
        for watch in watches:
            _, seen = watch.wait_for(lambda s: s.get("b") == "down", PEER_EXPIRY + 10, "b down after SIGKILL")
            elapsed = seen - killed
            print(f"{watch.node.name} marked b down {elapsed:.2f} s after SIGKILL")
            assert elapsed <= PEER_EXPIRY + EXPIRY_MARGIN, f"{watch.node.name} took {elapsed:.2f} s"
        # Still down when read afresh (not flapping back up by itself).
        for node in (a, c):
            assert node.peer_states().get("b") == "down"

        b.start()  # same host, same ports
        restarted = time.monotonic()
        for watch in watches:
            _, seen = watch.wait_for(lambda s: s.get("b") == "up", 20, "b up again after restart")
            print(f"{watch.node.name} saw b up {seen - restarted:.2f} s after its restart")
        wait_until(lambda: b.peers_up() >= {"a", "c"}, 20, "restarted b to see a and c up")
        with b.publisher() as publisher:
            await_route(publisher, kept, "kept/b/after", timeout=15)
    assert_delivers(a, b)
    assert_delivers(c, b)
    assert_delivers(b, a, c)


def test_partition_and_heal(net: Net, mesh: Mesh) -> None:
    a, b, c = three_nodes(net, mesh)
    with contextlib.ExitStack() as stack:
        watches = [stack.enter_context(PeersWatch(a)), stack.enter_context(PeersWatch(b))]
        # Subscribers that live through the partition, on both sides of it: their routes
        # must come back by themselves after the heal.
        kept_a = stack.enter_context(a.subscriber("kept/c/#", qos=1))
        kept_c = stack.enter_context(c.subscriber("kept/a/#", qos=1))
        with c.publisher() as publisher:
            await_route(publisher, kept_a, "kept/c/before", timeout=15)
        with a.publisher() as publisher:
            await_route(publisher, kept_c, "kept/a/before", timeout=15)
        for watch in watches:
            watch.wait_for(lambda s: s.get("c") == "up", 10, "c up")

        c.host.cut()
        cut = time.monotonic()
        for watch in watches:
            _, seen = watch.wait_for(lambda s: s.get("c") == "down", PEER_EXPIRY + 10, "c down after the cut")
            elapsed = seen - cut
            print(f"{watch.node.name} marked c down {elapsed:.2f} s after the cut")
            assert elapsed <= PEER_EXPIRY + EXPIRY_MARGIN, f"{watch.node.name} took {elapsed:.2f} s"
        # a and b are unaffected by c's partition.
        assert a.peer_states().get("b") == "up" and b.peer_states().get("a") == "up"
        assert_delivers(a, b)
        assert_delivers(b, a)

        c.host.heal()
        healed = time.monotonic()
        for watch in watches:
            _, seen = watch.wait_for(lambda s: s.get("c") == "up", 20, "c up again after heal")
            print(f"{watch.node.name} saw c up {seen - healed:.2f} s after the heal")
        wait_until(lambda: c.peers_up() >= {"a", "b"}, 20, "c to see a and b up after heal")
        assert c.running(), "c exited during the partition"
        with c.publisher() as publisher:
            await_route(publisher, kept_a, "kept/c/after", timeout=15)
        with a.publisher() as publisher:
            await_route(publisher, kept_c, "kept/a/after", timeout=15)
    assert_delivers(a, c)
    assert_delivers(b, c)
    assert_delivers(c, a, b)
