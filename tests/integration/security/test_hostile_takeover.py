"""Issue 14, hole 1: a logged-in user who connects with another user's client id takes over
that session, and must get only what its own rights allow.

The same scenario runs against a real node and, when it is installed, a real Mosquitto 2.0
with the same password and ACL files: alice holds a persistent session subscribed to
``secret/#`` and ``public/#``; she receives one QoS 1 message she never acknowledges (in
flight) and goes away; more arrive while she is away (queued); mallory, who may read only
``public/#``, connects with alice's client id and resumes her session. What mallory
receives (resent in-flight messages, the queue, then live messages) is read up to a fence
message, so nothing sleeps. Mosquitto's answer is pinned, and zmesh must match or beat it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.helpers import NodeProcess, RawMQTT, _str16, make_certs, packet, publish_packet
from tests.mosquitto_broker import HAVE_MOSQUITTO, NO_MOSQUITTO, MosquittoBroker
from tests.mqttkit import ack
from zmesh.security import hash_password

pytestmark = pytest.mark.timeout(90)

ACL = """\
user alice
topic read secret/#
topic read public/#
user mallory
topic read public/#
user writer
topic write #
"""
USERS = {"alice": "a-pw", "mallory": "m-pw", "writer": "w-pw"}


def write_files(directory: Path) -> tuple[Path, Path]:
    passwd, acl = directory / "passwd", directory / "acl"
    passwd.write_text("".join(f"{u}:{hash_password(p.encode(), iterations=1000)}\n" for u, p in USERS.items()))
    passwd.chmod(0o600)
    acl.write_text(ACL)
    return passwd, acl


def connect_bytes(client_id: str, user: str, level: int, clean: bool = False) -> bytes:
    flags = 0xC0 | (0x02 if clean else 0)
    props = b""
    if level == 5:
        p = Properties(PacketTypes.CONNECT)
        p.SessionExpiryInterval = 600
        props = p.pack()
    body = (_str16("MQTT") + bytes((level, flags)) + (60).to_bytes(2, "big") + props
            + _str16(client_id) + _str16(user) + _str16(USERS[user]))
    return packet(0x10, body)


def login(port: int, client_id: str, user: str, level: int, clean: bool = False) -> tuple[RawMQTT, bytes]:
    raw = RawMQTT(port)
    raw.send(connect_bytes(client_id, user, level, clean))
    first, body = raw.read_packet()
    assert first == 0x20 and body[1] == 0, (first, body)
    return raw, body


def subscribe(raw: RawMQTT, level: int, *filters: str) -> None:
    body = (1).to_bytes(2, "big") + (b"\x00" if level == 5 else b"")
    for f in filters:
        body += _str16(f) + b"\x01"
    raw.send(packet(0x82, body))
    first, codes = raw.read_packet()
    assert first == 0x90


def publish(port: int, *messages: tuple[str, bytes]) -> None:
    with RawMQTT(port) as writer:
        writer.send(connect_bytes(f"w-{uuid.uuid4().hex[:6]}", "writer", 4, clean=True))
        assert writer.read_packet()[0] == 0x20
        for i, (topic, payload) in enumerate(messages, 1):
            writer.send(publish_packet(topic, payload, qos=1, packet_id=i))
            assert writer.read_packet()[0] == 0x40


def read_until(raw: RawMQTT, fence: bytes, level: int) -> list[tuple[str, bytes, bool]]:
    """(topic, payload, dup) of every PUBLISH before the one whose payload is ``fence``; each
    is acknowledged as a client would."""
    got = []
    while True:
        first, body = raw.read_packet(10)
        if first >> 4 != 3:
            continue
        n = int.from_bytes(body[:2], "big")
        topic = body[2:2 + n].decode()
        pos = 2 + n
        packet_id = int.from_bytes(body[pos:pos + 2], "big") if first & 0x06 else 0
        pos += 2 if packet_id else 0
        if level == 5:
            pos += 1 + body[pos]  # short property block
        payload = body[pos:]
        if packet_id:
            raw.send(ack(0x40, packet_id))
        if payload == fence:
            return got
        got.append((topic, payload, bool(first & 0x08)))


def takeover_scenario(port: int, level: int) -> dict[str, object]:
    """What mallory gets after taking over alice's session: the topics resent or queued, and
    the live ones. Returned as plain data so the two brokers can be compared."""
    client_id = f"alice-{uuid.uuid4().hex[:6]}"
    alice, _ = login(port, client_id, "alice", level)
    subscribe(alice, level, "secret/#", "public/#")
    publish(port, ("secret/inflight", b"s1"))
    first, body = alice.read_packet(10)  # received, never acknowledged: in flight
    assert first >> 4 == 3
    alice.close()
    publish(port, ("secret/queued", b"s2"), ("public/queued", b"p1"))
    mallory, connack = login(port, client_id, "mallory", level)
    resumed = bool(connack[0] & 1)
    fence = b"fence-1"
    publish(port, ("public/fence", fence))
    queued = read_until(mallory, fence, level)
    # Live: secret/inflight is a topic the session already read (for alice) before.
    publish(port, ("secret/inflight", b"s3"), ("public/live", b"p2"), ("public/fence", b"fence-2"))
    live = read_until(mallory, b"fence-2", level)
    mallory.send(b"\xe0\x00")
    mallory.close()
    return {
        "session_present": resumed,
        "resumed": sorted(t for t, _, _ in queued),
        "live": sorted(t for t, _, _ in live),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    directory = tmp_path_factory.mktemp("takeover")
    return (directory, *write_files(directory))


@pytest.fixture(scope="module")
def node(files: tuple[Path, Path, Path]) -> Iterator[NodeProcess]:
    directory, passwd, acl = files
    config = directory / "node.toml"
    config.write_text(f'[mqtt]\npassword_file = "{passwd}"\nacl_file = "{acl}"\n')
    started = NodeProcess(directory, "a", make_certs(directory / "certs", ["a"]), extra=["--config", str(config)])
    try:
        yield started
    finally:
        started.stop()


# What a real Mosquitto 2.0 (Debian's 2.0.11) does, observed by the test below: the read ACL is
# checked for the new owner on every message it sends, the resent in-flight one included.
MOSQUITTO_SAYS = {"session_present": True, "resumed": ["public/queued"], "live": ["public/live"]}


@pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NO_MOSQUITTO)
@pytest.mark.parametrize("level", [4, 5])
def test_mosquitto_gives_the_new_owner_only_what_it_may_read(files: tuple[Path, Path, Path], level: int) -> None:
    directory, passwd, acl = files
    with MosquittoBroker(directory, password_file=passwd, acl_file=acl, allow_anonymous=False) as broker:
        observed = takeover_scenario(broker.port, level)
    assert observed == MOSQUITTO_SAYS, json.dumps(observed)


@pytest.mark.parametrize("level", [4, 5])
def test_zmesh_gives_the_new_owner_only_what_it_may_read(node: NodeProcess, level: int) -> None:
    observed = takeover_scenario(node.mqtt_port, level)
    assert observed == MOSQUITTO_SAYS, json.dumps(observed)
