"""Mesh policy across real node processes: a restricted peer cannot inject topics it is not
allowed, live, retained, or through the retained anti-entropy answers a late joiner fetches.

The hub's config says ``"scanner-*" = ["scans/#"]``; ``scanner-1`` is a trusted node (its
CURVE key is in the hub's trusted directory) that also publishes to ``alerts/...``, as a
compromised scanner would. ``ops`` has no rule, so it may publish anything. Messages from
one peer arrive in order, so a permitted message published after a forbidden one is the
fence proving the forbidden one was dropped, not still on its way.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import (
    NodeProcess,
    Publisher,
    Subscriber,
    await_route,
    get_until,
    make_certs,
    stop_all,
    wait_until,
    write_config,
)
from tests.integration.retained.test_retained import payloads

pytestmark = pytest.mark.timeout(90)

POLICY = """
[mesh.policy]
"scanner-*" = ["scans/#"]
"""


def test_restricted_peer_cannot_publish_outside_its_topics(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", ["hub", "scanner-1", "ops"])
    nodes: list[NodeProcess] = []
    try:
        scanner = NodeProcess(tmp_path, "scanner-1", certs)
        nodes.append(scanner)
        # Retained state the scanner holds before the hub exists: the hub gets it by sync.
        with Publisher(scanner.mqtt_port) as pub:
            pub.publish("alerts/forged", b"from-sync", qos=1, retain=True)
            pub.publish("scans/report-1", b"ok-sync", qos=1, retain=True)

        config = write_config(tmp_path / "hub.toml", POLICY)
        hub = NodeProcess(tmp_path, "hub", certs, seeds=[scanner.control_port], extra=["--config", str(config)])
        nodes.append(hub)
        ops = NodeProcess(tmp_path, "ops", certs, seeds=[hub.control_port])
        nodes.append(ops)
        wait_until(lambda: hub.peers_up() >= {"scanner-1", "ops"}, 15, "hub to see scanner-1 and ops")

        # Anti-entropy: the permitted entry arrives, the forged one never does.
        wait_until(lambda: "scans/report-1" in payloads(hub.mqtt_port), 15, "scans/report-1 synced to hub")
        assert "alerts/forged" not in payloads(hub.mqtt_port)
        # The policy is the receiving node's: ops has none and takes the scanner's alert.
        wait_until(lambda: "alerts/forged" in payloads(ops.mqtt_port), 15, "alerts/forged synced to ops")

        with Subscriber(hub.mqtt_port, "alerts/#", "scans/#", qos=1) as sub, \
                Publisher(scanner.mqtt_port) as from_scanner, Publisher(ops.mqtt_port) as from_ops:
            await_route(from_scanner, sub, "scans/probe")
            await_route(from_ops, sub, "alerts/probe")
            # Live and retained, at QoS 0 and 1: forbidden first, then the permitted fence.
            from_scanner.publish("alerts/live", b"forged", qos=0)
            from_scanner.publish("alerts/retained", b"forged", qos=1, retain=True)
            from_scanner.publish("scans/fence", b"fence", qos=1)
            fence, before = get_until(sub, lambda m: m.topic == "scans/fence", 10, "the scanner's fence")
            assert [m.topic for m in before if m.topic.startswith("alerts/")] == []
            # An unrestricted peer's alert still gets through.
            from_ops.publish("alerts/real", b"disk 95%", qos=1)
            real, _ = get_until(sub, lambda m: m.topic == "alerts/real", 10, "ops's alert")
            assert real.payload == b"disk 95%"

        assert "alerts/retained" not in payloads(hub.mqtt_port)
        stats = hub.sys_value("$SYS/zmesh/node")["stats"]
        assert stats["policy_denied"] >= 3
        assert "mesh policy: scanner-1 may not publish to alerts/" in hub.output()
    finally:
        stop_all(nodes)


def test_policy_names_come_from_trusted_keys_not_from_hello(tmp_path: Path) -> None:
    """A node whose key file is ``scanner-2`` but who calls itself ``ops`` is still
    a scanner: the rule is chosen by the name our trusted directory gives its key."""
    certs = make_certs(tmp_path / "certs", ["hub", "scanner-2"])
    nodes: list[NodeProcess] = []
    try:
        config = write_config(tmp_path / "hub.toml", POLICY)
        hub = NodeProcess(tmp_path, "hub", certs, extra=["--config", str(config)])
        nodes.append(hub)
        # --name ops with scanner-2's certificate: the hello claims "ops".
        impostor = NodeProcess(
            tmp_path, "scanner-2", certs, seeds=[hub.control_port], extra=["--name", "ops"]
        )
        nodes.append(impostor)
        wait_until(lambda: "ops" in hub.peers_up(), 15, "hub to see the impostor")
        with Subscriber(hub.mqtt_port, "alerts/#", "scans/#", qos=1) as sub, \
                Publisher(impostor.mqtt_port) as pub:
            await_route(pub, sub, "scans/probe")
            pub.publish("alerts/x", b"forged", qos=1)
            pub.publish("scans/fence", b"fence", qos=1)
            _, before = get_until(sub, lambda m: m.topic == "scans/fence", 10, "the fence")
            assert [m.topic for m in before if m.topic.startswith("alerts/")] == []
    finally:
        stop_all(nodes)
