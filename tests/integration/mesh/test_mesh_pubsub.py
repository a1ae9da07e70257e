"""Publish/subscribe across a real three-node mesh with ordinary MQTT clients.

One mesh (a, b, c; b and c seeded only with a) serves the whole module: every test uses
its own topic prefix, so the tests do not see each other's traffic.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    QUIET,
    NodeProcess,
    PeersWatch,
    Publisher,
    Subscriber,
    assert_quiet,
    await_route,
    collect,
    get_until,
    load_keys,
    make_certs,
    publish_until_exit,
    start_mesh,
    stop_all,
    zmesh_cli,
)

pytestmark = pytest.mark.timeout(90)

needs_mosquitto = pytest.mark.skipif(
    shutil.which("mosquitto_sub") is None or shutil.which("mosquitto_pub") is None,
    reason="mosquitto_pub/mosquitto_sub not installed (Debian package mosquitto-clients)",
)


class Mesh:
    def __init__(self, workdir: Path, certs: Path, nodes: list[NodeProcess]) -> None:
        self.workdir, self.certs = workdir, certs
        self.a, self.b, self.c = nodes


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("pubsub")
    certs = make_certs(workdir / "certs", ["a", "b", "c", "d"])
    started: list[NodeProcess] = []
    try:
        start_mesh(workdir, certs, ["a", "b", "c"], started)
        yield Mesh(workdir, certs, started)
    finally:
        stop_all(started)


def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def test_paho_messages_cross_the_mesh_exact_and_in_order_at_qos0_and_qos1(mesh: Mesh) -> None:
    p = prefix()
    payloads = [bytes(range(256)), b"", b"\x00" * 3, "h\u00e9llo \u2603".encode(), bytes(100_000)]
    payloads += [f"m{i}".encode() for i in range(50)]
    with Subscriber(mesh.b.mqtt_port, f"{p}/#", qos=1) as sub, Publisher(mesh.a.mqtt_port) as pub:
        await_route(pub, sub, f"{p}/probe")
        for qos in (0, 1):
            for payload in payloads:
                pub.publish(f"{p}/q{qos}", payload, qos=qos)
            got = collect(sub, len(payloads))
            assert [m.topic for m in got] == [f"{p}/q{qos}"] * len(payloads)
            assert [m.payload for m in got] == payloads  # exact bytes, publisher's order
            assert {m.qos for m in got} == {qos}  # min(published, granted 1)
            assert not any(m.retain for m in got)


@needs_mosquitto
def test_mosquitto_pub_reaches_mosquitto_sub_on_another_node(mesh: Mesh) -> None:
    p = prefix()
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(mesh.c.mqtt_port), "-t", f"{p}/#",
         "-q", "1", "-v", "-C", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    sent: list[str] = []

    def publish(attempt: int) -> None:
        sent.append(f"disk at 9{attempt}%")
        subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(mesh.a.mqtt_port), "-t", f"{p}/disk",
             "-q", "1", "-m", sent[-1]],
            check=True, timeout=10, capture_output=True,
        )

    out, err = publish_until_exit(sub, publish)
    assert sub.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 1, out  # -C 1: exactly one message, then exit
    topic, _, payload = lines[0].partition(" ")
    assert topic == f"{p}/disk"
    assert payload in sent


def test_wildcard_and_exact_filters_across_the_mesh(mesh: Mesh) -> None:
    p = prefix()
    subs = {
        f"{p}/+/temp": Subscriber(mesh.b.mqtt_port, f"{p}/+/temp"),
        f"{p}/#": Subscriber(mesh.b.mqtt_port, f"{p}/#"),
        f"{p}/room": Subscriber(mesh.b.mqtt_port, f"{p}/room"),
        f"+/{p}/x": Subscriber(mesh.b.mqtt_port, f"+/{p}/x"),
    }
    published = [f"{p}", f"{p}/room", f"{p}/room/longer", f"{p}/roomy", f"{p}/k/temp",
                 f"{p}/k/humid", f"{p}/k/temp/x", f"{p}/x", f"$e/{p}/x", f"z/{p}/x"]
    expected = {
        f"{p}/+/temp": [f"{p}/k/temp"],
        # "sport/#" matches "sport" itself (MQTT 3.1.1, 4.7.1.2)
        f"{p}/#": [t for t in published if t.startswith(p)],
        f"{p}/room": [f"{p}/room"],
        # "+" never matches a level starting with "$" at the front
        f"+/{p}/x": [f"z/{p}/x"],
    }
    try:
        with Publisher(mesh.a.mqtt_port) as pub:
            for filt, sub in subs.items():
                # route proof on a topic each filter matches; drained by await_route
                probe = {f"{p}/+/temp": f"{p}/probe/temp", f"+/{p}/x": f"probe/{p}/x"}.get(filt, f"{p}/room")
                await_route(pub, sub, probe)
            for topic in published:
                pub.publish(topic, topic.encode(), qos=1)
            for filt, sub in subs.items():
                got = collect(sub, len(expected[filt]))
                assert sorted(m.topic for m in got) == sorted(expected[filt]), filt
                assert all(m.payload == m.topic.encode() for m in got)
            assert_quiet(*subs.values(), what="on filters that should not match")
    finally:
        for sub in subs.values():
            sub.close()


def test_hash_filter_does_not_receive_dollar_topics(mesh: Mesh) -> None:
    """`#` matches neither `$SYS/...` (node-local, pushed on peer changes) nor any other
    `$` topic crossing the mesh; `$SYS/...` and `$e/#` subscribers prove those exist."""
    p = prefix()
    with Subscriber(mesh.a.mqtt_port, "#") as everything, PeersWatch(mesh.a.mqtt_port) as peers, \
            Subscriber(mesh.b.mqtt_port, f"$e/{p}/#") as dollar_b, \
            Subscriber(mesh.b.mqtt_port, "#") as everything_b, Publisher(mesh.a.mqtt_port) as pub:
        peers.wait_for(lambda v: "b" in v, what="the current $SYS/zmesh/peers value")
        await_route(pub, dollar_b, f"$e/{p}/probe")
        pub.publish(f"$e/{p}/x", b"dollar", qos=1)
        assert dollar_b.get().payload == b"dollar"
        # A peer joining changes a's $SYS/zmesh/peers: subscribers of it are told at once.
        d = NodeProcess(mesh.workdir, "d", mesh.certs, seeds=[mesh.a.control_port])
        try:
            peers.wait_for(lambda v: v.get("d", {}).get("state") == "up", what="d up in a's $SYS")
        finally:
            d.stop()
        time.sleep(QUIET)  # an absence check, after the positive controls above
        leaked = [m.topic for m in everything.drain() + everything_b.drain() if m.topic.startswith("$")]
        assert not leaked, f"'#' received $ topics: {leaked}"


def test_overlapping_filters_on_one_client_deliver_each_message_once(mesh: Mesh) -> None:
    p = prefix()
    sub = Subscriber(mesh.b.mqtt_port)
    try:
        granted = []
        sub.client.on_subscribe = lambda c, u, mid, codes, props: granted.append(codes)
        sub.client.subscribe([(f"{p}/#", 0), (f"{p}/+/x", 1), (f"{p}/a/x", 0), ("+/a/x", 0)])
        with Publisher(mesh.a.mqtt_port) as pub, Publisher(mesh.b.mqtt_port) as local:
            await_route(pub, sub, f"{p}/a/x")
            for i in range(20):
                pub.publish(f"{p}/a/x", f"remote {i}", qos=1)
                local.publish(f"{p}/a/x", f"local {i}", qos=1)
            got = collect(sub, 40)
            assert len(granted) == 1 and [int(c.value) for c in granted[0]] == [0, 1, 0, 0]
            assert_quiet(sub, what="(duplicates)")
        payloads = [m.payload.decode() for m in got]
        assert sorted(payloads) == sorted([f"remote {i}" for i in range(20)] + [f"local {i}" for i in range(20)])
        # One delivery at the highest QoS any matching filter granted (here 1).
        assert {m.qos for m in got} == {1}
    finally:
        sub.close()


def test_message_from_a_reaches_b_and_c_exactly_once_each(mesh: Mesh) -> None:
    p = prefix()
    topic = f"{p}/n"
    count = 200
    with Subscriber(mesh.a.mqtt_port, f"{p}/#", qos=1) as on_a, \
            Subscriber(mesh.b.mqtt_port, f"{p}/#", qos=1) as on_b, \
            Subscriber(mesh.c.mqtt_port, f"{p}/#", qos=1) as on_c, \
            Publisher(mesh.a.mqtt_port) as pub:
        for sub in (on_a, on_b, on_c):
            await_route(pub, sub, topic)
        infos = [pub.client.publish(topic, str(i), qos=1 if i % 2 else 0) for i in range(count)]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()
        results = {name: collect(sub, count) for name, sub in (("a", on_a), ("b", on_b), ("c", on_c))}
        assert_quiet(on_a, on_b, on_c, what="(a duplicate or a loop)")
    for name, got in results.items():
        payloads = [int(m.payload) for m in got]
        assert sorted(payloads) == list(range(count)), name  # each exactly once
        # MQTT orders per topic and QoS (a QoS 0 message may overtake queued QoS 1 ones).
        for qos in (0, 1):
            same_qos = [i for i in payloads if i % 2 == qos]
            assert same_qos == sorted(same_qos), (name, qos)


def test_one_seed_is_enough_nodes_learn_each_other(mesh: Mesh) -> None:
    keys = {n: load_keys(mesh.certs / f"{n}.key")[0].decode() for n in "abc"}
    for node, other in ((mesh.c, mesh.b), (mesh.b, mesh.c)):
        peers = {p["name"]: p for p in node.sys_value("$SYS/zmesh/peers")}
        assert peers[other.name]["state"] == "up"
        assert peers[other.name]["key"] == keys[other.name]
        assert peers[other.name]["address"] == f"127.0.0.1:{other.control_port}"
        assert peers["a"]["state"] == "up"
    # The learned link carries events both ways.
    p = prefix()
    for src, dst in ((mesh.c, mesh.b), (mesh.b, mesh.c)):
        with Subscriber(dst.mqtt_port, f"{p}/#") as sub, Publisher(src.mqtt_port) as pub:
            await_route(pub, sub, f"{p}/{src.name}")
            pub.publish(f"{p}/{src.name}", b"direct", qos=1)
            assert sub.get().payload == b"direct"


def _topics_tree(port: int) -> str:
    result = zmesh_cli("topics", "-h", "127.0.0.1", "-p", str(port))
    assert result.returncode == 0, result.stderr
    return result.stdout


def _line(tree: str, level: str) -> str:
    """The one line of ``zmesh topics`` output naming topic level ``level``."""
    lines = [line for line in tree.splitlines() if f" {level} " in line]
    assert len(lines) == 1, tree
    return lines[0]


def test_retained_message_reaches_late_subscriber_and_empty_payload_deletes_it(mesh: Mesh) -> None:
    p = prefix()
    with Subscriber(mesh.b.mqtt_port, f"{p}/#", qos=1) as live, Publisher(mesh.a.mqtt_port) as pub:
        await_route(pub, live, f"{p}/probe")
        pub.publish(f"{p}/cfg", b"v1", qos=1, retain=True)
        pub.publish(f"{p}/other", b"keep", qos=1, retain=True)
        got = collect(live, 2)
        # To an established subscription the retain flag is 0 (MQTT 3.1.1, 3.3.1.3).
        assert [(m.topic, m.payload, m.retain) for m in got] == [(f"{p}/cfg", b"v1", False), (f"{p}/other", b"keep", False)]

        with Subscriber(mesh.b.mqtt_port, f"{p}/cfg", qos=1) as late:
            message = late.get()
            assert (message.topic, message.payload, message.retain) == (f"{p}/cfg", b"v1", True)
        tree = _topics_tree(mesh.b.mqtt_port)
        assert "2 topics, 6 B" in _line(tree, p), tree  # p: cfg (2 B) + other (4 B)
        assert "2 B" in _line(tree, "cfg") and "4 B" in _line(tree, "other"), tree

        pub.publish(f"{p}/cfg", b"", qos=1, retain=True)  # deletes
        message = collect(live, 1)[0]
        assert (message.topic, message.payload) == (f"{p}/cfg", b"")  # b has processed it

        with Subscriber(mesh.b.mqtt_port, f"{p}/#", qos=1) as later:
            message = later.get()  # the positive control: the other retained topic
            assert (message.topic, message.payload, message.retain) == (f"{p}/other", b"keep", True)
            assert_quiet(later, what="after the retained value was deleted")
        tree = _topics_tree(mesh.b.mqtt_port)
        assert "4 B" in _line(tree, p) and "4 B" in _line(tree, "other"), tree
        assert not [line for line in tree.splitlines() if " cfg " in line], tree


@needs_mosquitto
def test_late_mosquitto_sub_reads_the_retained_value_on_a_peer_node(mesh: Mesh) -> None:
    """A late mosquitto_sub on c reads the value a retained (``--retained-only -C 1``); a live
    subscriber on c saw it first, so c holds it."""
    p = prefix()
    with Subscriber(mesh.c.mqtt_port, f"{p}/#", qos=1) as live, Publisher(mesh.a.mqtt_port) as pub:
        await_route(pub, live, f"{p}/probe")
        pub.publish(f"{p}/state", b"on", qos=1, retain=True)
        get_until(live, lambda m: m.topic == f"{p}/state")
    result = subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(mesh.c.mqtt_port), "-t", f"{p}/#",
         "-v", "-C", "1", "-W", "10", "--retained-only"],
        capture_output=True, text=True, timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{p}/state on\n"

