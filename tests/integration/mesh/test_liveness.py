"""Liveness: heartbeats, expiry, restarts, protocol versions and clean shutdown.

The module's nodes run with fast heartbeats (a TOML config file, flags for the rest):
b is started first without seeds and a is seeded with b's address, so that when b dies
and comes back on the same control port it is a that must find it again.
"""

from __future__ import annotations

import re
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from tests.helpers import (
    NodeProcess,
    PeersWatch,
    Publisher,
    Subscriber,
    await_route,
    control_request,
    free_port,
    get_until,
    load_keys,
    make_certs,
    stop_all,
    wait_until,
    write_config,
)
from zmesh.mesh import wire

pytestmark = pytest.mark.timeout(90)

HEARTBEAT = 0.2
EXPIRY = 1.0
MARGIN = 1.0  # scheduling slack on a loaded 2-core machine
FAST = f"""
[mesh]
heartbeat_interval = {HEARTBEAT}
peer_expiry = {EXPIRY}
"""


class Pair:
    def __init__(self, workdir: Path, certs: Path, config: Path, a: NodeProcess, b: NodeProcess) -> None:
        self.workdir, self.certs, self.config = workdir, certs, config
        self.a, self.b = a, b
        self.started = [b, a]

    def start_b(self) -> NodeProcess:
        self.b = NodeProcess(self.workdir, "b", self.certs, control_port=self.b.control_port,
                             extra=["--config", str(self.config)])
        self.started.append(self.b)
        return self.b


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    workdir = tmp_path_factory.mktemp("liveness")
    certs = make_certs(workdir / "certs", ["a", "b", "c", "d"])
    config = write_config(workdir / "fast.toml", FAST)
    b = NodeProcess(workdir, "b", certs, control_port=free_port(), extra=["--config", str(config)])
    pair = None
    try:
        a = NodeProcess(workdir, "a", certs, seeds=[b.control_port], extra=["--config", str(config)])
        pair = Pair(workdir, certs, config, a, b)
        wait_until(lambda: a.peers_up() >= {"b"} and b.peers_up() >= {"a"}, 15, "a and b to meet")
        yield pair
    finally:
        stop_all(pair.started if pair else [b])


def prefix() -> str:
    return f"l{uuid.uuid4().hex[:8]}"


def test_killed_peer_is_reported_down_within_expiry(pair: Pair) -> None:
    with PeersWatch(pair.a.mqtt_port) as watch:
        watch.wait_for(lambda v: v.get("b", {}).get("state") == "up", what="b up in a's view")
        killed = time.monotonic()
        pair.b.kill()
        peers, seen = watch.wait_for(lambda v: v["b"]["state"] == "down", EXPIRY + 5, "b down")
    assert seen - killed <= EXPIRY + HEARTBEAT + MARGIN, f"b reported down after {seen - killed:.2f} s"
    assert peers["b"]["address"] == f"127.0.0.1:{pair.b.control_port}"


def test_restarted_peer_is_up_again_and_receives_without_restarting_a(pair: Pair) -> None:
    a = pair.a
    a_pid = a.process.pid
    if pair.b.process.poll() is None:  # run alone: take b down first
        pair.b.kill()
    with PeersWatch(a.mqtt_port) as watch:
        watch.wait_for(lambda v: v.get("b", {}).get("state") == "down", EXPIRY + 5, "b down")
        b = pair.start_b()  # no seeds: a, which keeps hailing b's control port, finds it
        watch.wait_for(lambda v: v["b"]["state"] == "up", 10, "b up again in a's view")
    assert a.process.poll() is None and a.process.pid == a_pid
    assert b.peers_up() >= {"a"}
    p = prefix()
    with Subscriber(b.mqtt_port, f"{p}/#", qos=1) as on_b, Subscriber(a.mqtt_port, f"{p}/#", qos=1) as on_a, \
            Publisher(a.mqtt_port) as pub_a, Publisher(b.mqtt_port) as pub_b:
        await_route(pub_a, on_b, f"{p}/a-to-b")
        await_route(pub_b, on_a, f"{p}/b-to-a")
        pub_a.publish(f"{p}/after-restart", b"hello again", qos=1)
        message, _ = get_until(on_b, lambda m: m.topic == f"{p}/after-restart")
        assert message.payload == b"hello again"


def test_peer_with_another_protocol_version_is_refused_with_a_reason(pair: Pair) -> None:
    """A fake peer holding a trusted key (d) says hello with version 99 on a's control port."""
    a = pair.a
    a_public = load_keys(pair.certs / "a.key")[0]
    d_public, d_secret = load_keys(pair.certs / "d.key_secret")
    assert d_secret is not None
    hello = msgpack.packb({"t": wire.HELLO, "v": 99, "n": "d", "i": 7, "pc": 1111, "pp": 1112,
                           "pl": 1113, "h": None, "ps": []})
    reply = control_request(a.control_port, a_public, d_public, d_secret, hello)
    assert reply is not None, "no reply to a version 99 hello"
    message = wire.decode_control(reply)
    assert message.kind == wire.REFUSED
    # The reason names both versions: the peer's and the one this node speaks.
    assert {"99", str(wire.WIRE_VERSION)} <= set(re.findall(r"\d+", message.reason)), message.reason
    log_line = wait_until(
        lambda: next((x for x in a.output().splitlines() if "ERROR" in x and "refused" in x and "99" in x), None),
        5, "a to log the refusal as an error")
    assert message.reason in log_line
    # The fake did not become a member, and a keeps serving MQTT clients and the mesh.
    assert "d" not in {p["name"] for p in a.sys_value("$SYS/zmesh/peers")}
    assert a.sys_value("$SYS/zmesh/node")["stats"]["refused_hellos"] >= 1
    p = prefix()
    with Subscriber(a.mqtt_port, f"{p}/#") as local, Subscriber(pair.b.mqtt_port, f"{p}/#") as remote, \
            Publisher(a.mqtt_port) as pub:
        await_route(pub, remote, f"{p}/mesh")
        pub.publish(f"{p}/local", b"still serving", qos=1)
        message, _ = get_until(local, lambda m: m.topic == f"{p}/local")
        assert message.payload == b"still serving"


def test_sigterm_stops_the_node_with_exit_0_and_no_traceback(pair: Pair) -> None:
    c = NodeProcess(pair.workdir, "c", pair.certs, seeds=[pair.a.control_port],
                    extra=["--config", str(pair.config)])
    pair.started.append(c)
    wait_until(lambda: c.peers_up() >= {"a"}, 10, "c to join")
    # Live clients at stop time: a subscriber and an in-flight QoS 1 stream.
    with Subscriber(c.mqtt_port, "x/#", qos=1), Publisher(c.mqtt_port) as pub:
        pub.publish("x/y", b"z", qos=1)
        stopping = time.monotonic()
        c.signal(signal.SIGTERM)
        code = c.process.wait(10)
        took = time.monotonic() - stopping
    assert code == 0
    assert took < 5, f"SIGTERM took {took:.1f} s"
    log = c.output()
    assert "Traceback" not in log, log
    assert "stopped" in log
