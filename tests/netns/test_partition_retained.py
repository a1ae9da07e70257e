"""Retained state across a network partition: both sides write, the link heals, every node
ends with the last-writer-wins result.

Three hosts on one bridge: ``a`` alone on one side of the cut, ``b`` and ``c`` on the other.
``Host.cut()`` takes a's link to the bridge down, so during the partition the test (in the
root namespace) cannot reach a either: a's side is driven by running this module inside a's
namespace (``python -m tests.netns.test_partition_retained pub|state|peers``), which talks to
the node there on 127.0.0.1.

Liveness is fast (heartbeat 0.2 s, expiry 1 s) and ``[retained] anti_entropy_interval`` is
1 s, so the sides notice the cut at once and convergence after the heal is bounded by a
reconnect plus one sync (a reconnect triggers a sync on its own).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers import REPO, Publisher, Subscriber, get_until, wait_until
from tests.netns.conftest import Mesh
from tests.netns.netns import Host, Net
from tests.netns.node import MQTT_PORT, HostSubscriber, NodeOnHost

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

HEARTBEAT = 0.2
PEER_EXPIRY = 1.0
ANTI_ENTROPY = 1.0
CONVERGE_BOUND = 10.0  # seconds from heal until every node holds the LWW result
CLEARLY_LATER = 0.1  # seconds between one side's last write and the other side's first
PREFIX = "part"
SYS_NODE = "$SYS/zmesh/node"


# ------------------------------------------------------------------ reading and writing state


def read_state(subscribe: Callable[[str], Subscriber]) -> dict[str, str]:
    """The retained messages a late subscriber to ``part/#`` gets (topic -> payload). The
    ``$SYS`` value subscribed right after is the fence: the node answers one connection's
    packets in order, so every retained message comes before it."""
    with subscribe(f"{PREFIX}/#") as sub:
        sub.client.subscribe(SYS_NODE, 0)
        _, before = get_until(sub, lambda m: m.topic == SYS_NODE, 10, "the $SYS fence")
    return {m.topic: m.payload.decode() for m in before if m.retain}


def read_peer_states(subscribe: Callable[[str], Subscriber]) -> dict[str, str]:
    with subscribe("$SYS/zmesh/peers") as sub:
        message = sub.get(timeout=10)
    return {p["name"]: p["state"] for p in json.loads(message.payload)}


def publish(publisher: Publisher, writes: list[tuple[str, str]]) -> None:
    """Retained QoS 1 writes, each acknowledged before the next (empty payload: delete)."""
    for topic, payload in writes:
        publisher.publish(topic, payload.encode(), qos=1, retain=True)


def _local_subscriber(topic: str) -> Subscriber:
    return HostSubscriber("127.0.0.1", MQTT_PORT, topic)


def main(argv: list[str]) -> None:
    """Run inside a host's namespace: ``pub JSON`` | ``state`` | ``peers``."""
    command = argv[0]
    if command == "pub":
        with Publisher(MQTT_PORT) as publisher:  # 127.0.0.1 inside the namespace
            publish(publisher, [tuple(w) for w in json.loads(argv[1])])  # type: ignore[misc]
        print("ok")
    elif command == "state":
        print(json.dumps(read_state(_local_subscriber)))
    elif command == "peers":
        print(json.dumps(read_peer_states(_local_subscriber)))
    else:
        raise SystemExit(f"unknown command {command!r}")


class Inside:
    """A node driven from inside its own namespace (reachable while its host is cut off)."""

    def __init__(self, node: NodeOnHost) -> None:
        self.node = node

    def _run(self, *args: str) -> str:
        result = subprocess.run(
            ["ip", "netns", "exec", self.node.host.ns, sys.executable, "-m",
             "tests.netns.test_partition_retained", *args],
            capture_output=True, text=True, timeout=30, cwd=REPO,
        )
        assert result.returncode == 0, f"in {self.node.host.ns}: {args[0]} failed:\n{result.stderr}"
        return result.stdout

    def publish(self, writes: list[tuple[str, str]]) -> None:
        assert self._run("pub", json.dumps(writes)).strip() == "ok"

    def state(self) -> dict[str, str]:
        state: dict[str, str] = json.loads(self._run("state"))
        return state

    def peer_states(self) -> dict[str, str]:
        states: dict[str, str] = json.loads(self._run("peers"))
        return states


def root_state(node: NodeOnHost) -> dict[str, str]:
    return read_state(lambda topic: node.subscriber(topic))


# ------------------------------------------------------------------------------------ test


def _start(mesh: Mesh, host: Host, name: str, seeds: list[str] | None = None) -> NodeOnHost:
    node = mesh.node(host, name, seeds=seeds, heartbeat_interval=HEARTBEAT,
                     peer_expiry=PEER_EXPIRY, start=False)
    with node.config_path.open("a") as f:
        f.write(f"\n[retained]\nanti_entropy_interval = {ANTI_ENTROPY}\n")
    node.start()
    return node


def _wait_wall_clock_past(moment: float) -> None:
    """The scenario needs the other side's writes to be clearly later (LWW by HLC, whose
    physical part is the wall clock): wait until the wall clock has passed ``moment``."""
    while time.time() < moment:
        time.sleep(0.01)  # waiting on the clock itself, which is what defines "later"


def test_partitioned_sides_converge_to_the_last_writer_after_heal(net: Net, mesh: Mesh) -> None:
    mesh.certs("a", "b", "c")
    ha, hb, hc = net.add_host("a"), net.add_host("b"), net.add_host("c")
    a = _start(mesh, ha, "a")
    b = _start(mesh, hb, "b", seeds=[ha.ip])
    c = _start(mesh, hc, "c", seeds=[ha.ip])
    for node, others in ((a, {"b", "c"}), (b, {"a", "c"}), (c, {"a", "b"})):
        wait_until(lambda n=node, o=others: n.peers_up() >= o, 20, f"{node.name} to see {others}")

    base = {f"{PREFIX}/{k}": f"base-{k}" for k in ("x", "y", "z", "w", "del-a", "del-b", "keep")}
    with b.publisher() as pub_b:
        publish(pub_b, list(base.items()))
    for node in (a, b, c):
        wait_until(lambda n=node: root_state(n) == base, 15, f"{node.name} to hold the base state")

    # ---- partition: a | b, c
    ha.cut()
    inside_a = Inside(a)
    wait_until(lambda: b.peer_states().get("a") == "down" and c.peer_states().get("a") == "down",
               10, "b and c to see a down")
    wait_until(lambda: inside_a.peer_states() == {"b": "down", "c": "down"}, 10,
               "a to see b and c down")

    # a writes first; then b (clearly later); then a again (clearly later than b).
    inside_a.publish([
        (f"{PREFIX}/x", "a-early"),  # b overwrites it later: b wins
        (f"{PREFIX}/y", "a-early"),  # b deletes it later: deleted
        (f"{PREFIX}/z", ""),  # deleted here, b writes it later: b's value
        (f"{PREFIX}/del-a", ""),  # deleted on a only
    ])
    _wait_wall_clock_past(time.time() + CLEARLY_LATER)
    with b.publisher() as pub_b:
        publish(pub_b, [
            (f"{PREFIX}/x", "b-late"),
            (f"{PREFIX}/y", ""),
            (f"{PREFIX}/z", "b-late"),
            (f"{PREFIX}/del-b", ""),  # deleted on b's side only
            (f"{PREFIX}/w", "b-early"),  # a overwrites it later: a wins
        ])
    _wait_wall_clock_past(time.time() + CLEARLY_LATER)
    inside_a.publish([(f"{PREFIX}/w", "a-late")])

    # The partition was real: each side holds only its own writes.
    side_a = {**base, f"{PREFIX}/x": "a-early", f"{PREFIX}/y": "a-early", f"{PREFIX}/w": "a-late"}
    for gone in ("z", "del-a"):
        side_a.pop(f"{PREFIX}/{gone}")
    side_b = {**base, f"{PREFIX}/x": "b-late", f"{PREFIX}/z": "b-late", f"{PREFIX}/w": "b-early"}
    for gone in ("y", "del-b"):
        side_b.pop(f"{PREFIX}/{gone}")
    assert inside_a.state() == side_a
    wait_until(lambda: root_state(c) == side_b, 10, "c to hold b's side")  # live within a side
    assert root_state(b) == side_b

    # ---- heal
    ha.heal()
    healed = time.monotonic()
    expected = {
        f"{PREFIX}/x": "b-late",
        f"{PREFIX}/z": "b-late",
        f"{PREFIX}/w": "a-late",
        f"{PREFIX}/keep": "base-keep",
    }  # y, del-a, del-b: deleted
    converged: dict[str, float] = {}
    for node in (a, b, c):
        wait_until(lambda n=node: root_state(n) == expected, CONVERGE_BOUND,
                   f"{node.name} to converge to the LWW state after the heal")
        converged[node.name] = time.monotonic() - healed
    print(f"converged after heal (s): { {k: round(v, 2) for k, v in converged.items()} }")
    topics: list[Any] = []
    for node in (a, b, c):
        with node.subscriber("$SYS/zmesh/topics") as sub:
            topics.append(sorted(e["topic"] for e in json.loads(sub.get(timeout=10).payload)))
    assert topics[0] == topics[1] == topics[2] == sorted(expected)
    for node in (a, b, c):
        assert node.running(), f"{node.name} exited"


if __name__ == "__main__":
    main(sys.argv[1:])
