"""Clients for the MQTT protocol tests: a paho MQTT 5 / 3.1.1 client that records what the
node answers (CONNACK flags and properties, SUBACK reason codes, PUBACK reason codes,
a server DISCONNECT), raw MQTT 5 packets built with paho's property encoder (independent of
zmesh's codec), and mosquitto_sub / mosquitto_pub runners."""

from __future__ import annotations

import queue
import shutil
import subprocess
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from tests.helpers import RawMQTT, _str16, packet

needs_mosquitto_clients = pytest.mark.skipif(
    shutil.which("mosquitto_sub") is None or shutil.which("mosquitto_pub") is None,
    reason="mosquitto_sub/mosquitto_pub not installed (apt install mosquitto-clients)",
)


def props(packet_type: int, **values: Any) -> Properties:
    """paho Properties: ``props(PacketTypes.PUBLISH, ContentType="text/plain")``."""
    p = Properties(packet_type)
    for name, value in values.items():
        setattr(p, name, value)
    return p


class Client:
    """A paho client (MQTT 5 by default) that keeps every answer of the node in queues."""

    def __init__(self, port: int, client_id: str | None = None, *, protocol: int = mqtt.MQTTv5,
                 clean: bool = True, session_expiry: int | None = None, connect: bool = True,
                 username: str | None = None, password: str | None = None,
                 connect_properties: dict[str, Any] | None = None,
                 will: tuple[str, bytes, int, bool, dict[str, Any]] | None = None,
                 keepalive: int = 30) -> None:
        self.port = port
        self.protocol = protocol
        self.client_id = client_id if client_id is not None else f"k-{uuid.uuid4().hex[:8]}"
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol,
            clean_session=clean if protocol != mqtt.MQTTv5 else None,
        )
        self.client.reconnect_delay_set(60, 120)  # never reconnect behind a test's back
        self.clean = clean
        self.session_expiry = session_expiry
        self.connect_properties = connect_properties or {}
        self.keepalive = keepalive
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connacks: queue.Queue[tuple[bool, int, Properties | None]] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.unsubacks: queue.Queue[list[int]] = queue.Queue()
        self.disconnects: queue.Queue[tuple[int, Properties | None]] = queue.Queue()
        self.published: queue.Queue[tuple[int, int, Properties | None]] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.subacks.put([int(x.value) for x in codes])
        self.client.on_unsubscribe = lambda c, u, mid, codes, p: self.unsubacks.put([int(x.value) for x in codes])
        self.client.on_disconnect = lambda c, u, flags, rc, p: self.disconnects.put((int(rc.value), p))
        self.client.on_publish = lambda c, u, mid, rc, p: self.published.put((mid, int(rc.value), p))
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            topic, payload, qos, retain, will_props = will
            self.client.will_set(topic, payload, qos, retain,
                                 props(PacketTypes.WILLMESSAGE, **will_props) if will_props else None)
        self.session_present = False
        self.connack_properties: Properties | None = None
        self.reason = 0
        if connect:
            self.connect()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, properties: Any) -> None:
        self.connacks.put((bool(flags.session_present), int(rc.value), properties))

    def connect(self, expect_success: bool = True) -> int:
        """Connect; returns the CONNACK reason code (the 3.1.1 return code at 3.1.1)."""
        kwargs: dict[str, Any] = {"keepalive": self.keepalive}
        if self.protocol == mqtt.MQTTv5:
            kwargs["clean_start"] = self.clean
            values = dict(self.connect_properties)
            if self.session_expiry is not None:
                values["SessionExpiryInterval"] = self.session_expiry
            if values:
                kwargs["properties"] = props(PacketTypes.CONNECT, **values)
        self.client.connect("127.0.0.1", self.port, **kwargs)
        self.client.loop_start()
        self.session_present, self.reason, self.connack_properties = self.connacks.get(timeout=10)
        if expect_success:
            assert self.reason == 0, f"CONNACK reason {self.reason:#x}"
        return self.reason

    def subscribe(self, *filters: str, qos: int = 1, no_local: bool = False,
                  retain_as_published: bool = False, retain_handling: int = 0,
                  identifier: int | None = None) -> list[int]:
        """Subscribe and return the SUBACK reason codes."""
        if self.protocol == mqtt.MQTTv5:
            options = SubscribeOptions(qos=qos, noLocal=no_local, retainAsPublished=retain_as_published,
                                       retainHandling=retain_handling)
            p = props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=identifier) if identifier else None
            self.client.subscribe([(f, options) for f in filters], properties=p)
        else:
            self.client.subscribe([(f, qos) for f in filters])
        return self.subacks.get(timeout=10)

    def unsubscribe(self, *filters: str) -> list[int]:
        self.client.unsubscribe(list(filters))
        return self.unsubacks.get(timeout=10)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
                wait: bool = True, **properties: Any) -> mqtt.MQTTMessageInfo:
        p = props(PacketTypes.PUBLISH, **properties) if properties else None
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=p)
        if wait and qos:
            info.wait_for_publish(timeout=10)
            assert info.is_published(), f"publish to {topic} not acknowledged"
        return info

    def publish_result(self, topic: str, payload: bytes | str, qos: int = 1, **properties: Any) -> tuple[int, Properties | None]:
        """Publish and return the PUBACK/PUBREC reason code (and its properties)."""
        info = self.publish(topic, payload, qos=qos, wait=True, **properties)
        while True:
            mid, rc, p = self.published.get(timeout=10)
            if mid == info.mid:
                return rc, p

    def get(self, timeout: float = 10) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def collect(self, count: int, timeout: float = 10) -> list[mqtt.MQTTMessage]:
        deadline = time.monotonic() + timeout
        out = []
        while len(out) < count:
            try:
                out.append(self.messages.get(timeout=max(deadline - time.monotonic(), 0.001)))
            except queue.Empty:
                raise AssertionError(f"got {len(out)} of {count} messages: {[(m.topic, m.payload) for m in out]}") from None
        return out

    def drain(self) -> list[mqtt.MQTTMessage]:
        out = []
        while not self.messages.empty():
            out.append(self.messages.get_nowait())
        return out

    def disconnect(self, **properties: Any) -> None:
        """A clean DISCONNECT (MQTT 5 properties such as SessionExpiryInterval allowed)."""
        p = props(PacketTypes.DISCONNECT, **properties) if properties else None
        self.client.disconnect(properties=p)
        self.client.loop_stop()

    def drop(self) -> None:
        """Lose the connection without DISCONNECT (the node publishes the will)."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


# ---------------------------------------------------------------------------------------
# Raw MQTT 5 packets


def _props(packet_type: int, values: dict[str, Any] | None) -> bytes:
    return props(packet_type, **values).pack() if values else b"\x00"


def connect_v5(client_id: str, clean: bool = True, keepalive: int = 30,
               properties: dict[str, Any] | None = None) -> bytes:
    flags = 0x02 if clean else 0
    body = (_str16("MQTT") + bytes((5, flags)) + keepalive.to_bytes(2, "big")
            + _props(PacketTypes.CONNECT, properties) + _str16(client_id))
    return packet(0x10, body)


def subscribe_v5(packet_id: int, filt: str, qos: int, properties: dict[str, Any] | None = None,
                 options: int = 0) -> bytes:
    body = packet_id.to_bytes(2, "big") + _props(PacketTypes.SUBSCRIBE, properties) + _str16(filt) + bytes((qos | options,))
    return packet(0x82, body)


def subscribe_311(packet_id: int, filt: str, qos: int) -> bytes:
    return packet(0x82, packet_id.to_bytes(2, "big") + _str16(filt) + bytes((qos,)))


def publish_v5(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0,
               properties: dict[str, Any] | None = None, retain: bool = False, dup: bool = False) -> bytes:
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    body = _str16(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + _props(PacketTypes.PUBLISH, properties) + payload
    return packet(first, body)


def ack(kind: int, packet_id: int) -> bytes:
    """PUBACK (0x40), PUBREC (0x50), PUBREL (0x62) or PUBCOMP (0x70)."""
    return bytes((kind, 2)) + packet_id.to_bytes(2, "big")


class Publish:
    """A PUBLISH read off a raw socket."""

    def __init__(self, first: int, body: bytes, level: int) -> None:
        self.qos = (first >> 1) & 3
        self.dup = bool(first & 0x08)
        self.retain = bool(first & 1)
        n = int.from_bytes(body[:2], "big")
        self.topic = body[2:2 + n].decode()
        pos = 2 + n
        self.packet_id = 0
        if self.qos:
            self.packet_id = int.from_bytes(body[pos:pos + 2], "big")
            pos += 2
        self.properties: Properties | None = None
        if level == 5:
            self.properties = Properties(PacketTypes.PUBLISH)
            _, used = self.properties.unpack(body[pos:])
            pos += used
        self.payload = body[pos:]


def read_publish(raw: RawMQTT, level: int = 4, timeout: float = 5) -> Publish:
    first, body = raw.read_packet(timeout)
    assert first >> 4 == 3, f"expected PUBLISH, got first byte {first:#x} body {body!r}"
    return Publish(first, body, level)


# ---------------------------------------------------------------------------------------
# mosquitto_sub / mosquitto_pub


def mosquitto_pub(port: int, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), *args],
                          capture_output=True, text=True, timeout=timeout)


def mosquitto_sub(port: int, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), *args],
                          capture_output=True, text=True, timeout=timeout)


class MosquittoSub:
    """A running ``mosquitto_sub -v``: its output lines arrive in a queue (read by a thread),
    so a test can wait for one line at a time with a bound instead of for the process."""

    def __init__(self, port: int, *args: str) -> None:
        self.process = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-v", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def get(self, timeout: float = 10) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"mosquitto_sub printed nothing within {timeout} s") from None

    def await_route(self, publisher: Client, topic: str, timeout: float = 10) -> None:
        """Publish probes on ``topic`` until this subscriber prints one: it is connected,
        subscribed, and its node's subscription has reached the publisher's node."""
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"mosquitto_sub got no probe on {topic} within {timeout} s")
            publisher.publish(topic, b"probe", qos=0)
            try:
                if self.lines.get(timeout=0.2) == f"{topic} probe":
                    return
            except queue.Empty:
                pass

    def close(self) -> str:
        """Stop it; returns what it wrote on stderr."""
        if self.process.poll() is None:
            self.process.kill()
        _, err = self.process.communicate(timeout=10)
        return err


def two_nodes(workdir: Any, extra: list[str] | None = None) -> list[Any]:
    """Nodes a and b in a mesh (started side by side), each seeing the other."""
    from tests.helpers import NodeProcess, make_certs, start_nodes, wait_until

    certs = make_certs(workdir / "certs", ["a", "b"])
    first = NodeProcess(workdir, "a", certs, extra=extra)
    nodes = [first]
    try:
        nodes += start_nodes(workdir, [dict(name="b", cert_dir=certs, seeds=[first.control_port], extra=extra)])
        for node, other in ((nodes[0], "b"), (nodes[1], "a")):
            wait_until(lambda n=node, o=other: o in n.peers_up(), 15, f"{node.name} to see {other}")
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes
