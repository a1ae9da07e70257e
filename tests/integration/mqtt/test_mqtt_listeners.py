"""MQTT listeners of a real node: plain TCP, TLS with and without client certificates,
WebSocket and WebSocket over TLS, all on one node at once, with real clients
(``mosquitto_pub``/``mosquitto_sub``, paho over TCP and WebSockets, a raw wsproto client)
and, where installed, the real Mosquitto broker for the same listener options.

The certificates are made per run with ``cryptography`` (tests/tls_certs.py)."""

from __future__ import annotations

import getpass
import json
import queue
import shutil
import socket
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)

from tests.helpers import (
    NodeProcess,
    RawMQTT,
    connect_packet,
    free_port,
    make_certs,
    packet,
    publish_until_exit,
    stop_all,
    wait_until,
    write_config,
)
from tests.tls_certs import CA, Issued, issue, make_ca

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="needs mosquitto-clients"),
]

MOSQUITTO = Path("/usr/sbin/mosquitto")

# Listener keys of the node below, as its ready file names them.
PLAIN, MTLS, TLS, WS, WSS = "mqtt.listen", "mqtt.listeners[0]", "mqtt.listeners[1]", "mqtt.listeners[2]", "mqtt.listeners[3]"

ACL = """\
# anonymous clients
topic readwrite t/#
topic read alice/#

user alice
topic readwrite t/#
topic readwrite alice/#
"""


@dataclass(frozen=True)
class Tls:
    ca: CA
    server: Issued
    alice: Issued  # CN alice, from our CA
    rogue: Issued  # CN alice, from another CA
    no_cn: Issued  # from our CA, without a common name


@dataclass
class Node:
    process: NodeProcess
    ports: dict[str, int]

    def log(self) -> str:
        return self.process.output()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    directory = tmp_path_factory.mktemp("tls")
    ca = make_ca(directory)
    other = make_ca(directory / "rogue", "rogue CA")
    return Tls(
        ca=ca,
        server=issue(ca, directory, "localhost", server=True, file_stem="server"),
        alice=issue(ca, directory, "alice"),
        rogue=issue(other, directory, "alice", file_stem="rogue-alice"),
        no_cn=issue(ca, directory, None),
    )


def listener_toml(tls: Tls, require: bool = True) -> str:
    server = f'certfile = "{tls.server.cert}"\nkeyfile = "{tls.server.key}"\n'
    return (
        "[[mqtt.listeners]]\naddress = \"127.0.0.1:0\"\n" + server
        + f'cafile = "{tls.ca.cert}"\nrequire_certificate = {str(require).lower()}\n'
        + "use_identity_as_username = true\n\n" * require
        + "[[mqtt.listeners]]\naddress = \"127.0.0.1:0\"\n" + server + 'tls_version = "tlsv1.3"\n\n'
        + "[[mqtt.listeners]]\naddress = \"127.0.0.1:0\"\nprotocol = \"websockets\"\n\n"
        + "[[mqtt.listeners]]\naddress = \"127.0.0.1:0\"\nprotocol = \"websockets\"\n" + server
    )


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tls: Tls) -> Iterator[Node]:
    workdir = tmp_path_factory.mktemp("listeners")
    certs = make_certs(workdir / "certs", ["a"])
    acl = write_config(workdir / "acl", ACL)
    config = write_config(workdir / "node.toml", f'[mqtt]\nacl_file = "{acl}"\n\n' + listener_toml(tls))
    started: list[NodeProcess] = []
    try:
        # NodeProcess adds --mqtt 127.0.0.1:0: the plain listener, first, beside the file's.
        process = NodeProcess(workdir, "a", certs, extra=["--config", str(config)])
        started.append(process)
        ready = json.loads(process.ready_file.read_text())
        ports = {entry["key"]: entry["port"] for entry in ready["mqtt_listeners"]}
        assert [e["scheme"] for e in ready["mqtt_listeners"]] == ["mqtt", "mqtts", "mqtts", "ws", "wss"]
        assert ready["mqtt_port"] == ports[PLAIN]
        yield Node(process, ports)
    finally:
        stop_all(started)  # also fails the module if the node logged a traceback


# ---------------------------------------------------------------------------- clients


class Client:
    """A paho 2.x client over TCP or WebSockets, with or without TLS; messages in a queue."""

    def __init__(
        self,
        port: int,
        *,
        websockets: bool = False,
        ca: Path | None = None,
        cert: Issued | None = None,
        protocol: int = mqtt.MQTTv311,
        topics: tuple[str, ...] = (),
    ) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"c-{uuid.uuid4().hex[:8]}",
            protocol=protocol,
            transport="websockets" if websockets else "tcp",
        )
        if ca is not None:
            self.client.tls_set(
                ca_certs=str(ca),
                certfile=str(cert.cert) if cert else None,
                keyfile=str(cert.key) if cert else None,
            )
        connected: queue.Queue[Any] = queue.Queue()
        subscribed: queue.Queue[Any] = queue.Queue()
        self.client.on_connect = lambda c, u, flags, reason, props: connected.put(reason)
        self.client.on_subscribe = lambda c, u, mid, codes, props: subscribed.put(codes)
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        reason = connected.get(timeout=10)
        assert not reason.is_failure, f"CONNECT refused: {reason}"
        if topics:
            self.client.subscribe([(t, 1) for t in topics])
            codes = subscribed.get(timeout=10)
            assert all(not c.is_failure for c in codes), codes

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout=10)
        assert info.is_published()

    def get(self, timeout: float = 10) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def payloads(self, count: int, timeout: float = 10) -> list[bytes]:
        return [self.get(timeout).payload for _ in range(count)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def mosquitto_pub(port: int, topic: str, message: str, *tls_args: str, qos: int = 1) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", str(qos), "-t", topic, "-m", message,
         "-i", f"pub-{uuid.uuid4().hex[:8]}", *tls_args],
        capture_output=True, text=True, timeout=20,
    )


def cert_args(tls: Tls, cert: Issued | None = None) -> list[str]:
    args = ["--cafile", str(tls.ca.cert)]
    if cert is not None:
        args += ["--cert", str(cert.cert), "--key", str(cert.key)]
    return args


# ---------------------------------------------------------------------------- delivery


def test_every_listener_delivers_to_every_other(node: Node, tls: Tls) -> None:
    """Subscribers on plain TCP, TLS with a client certificate, ws and wss (MQTT 5 too) each
    get what publishers on every listener send."""
    p = node.ports
    subscribers = {
        "plain": Client(p[PLAIN], topics=("t/all/#",)),
        "mtls": Client(p[MTLS], ca=tls.ca.cert, cert=tls.alice, topics=("t/all/#",)),
        "ws": Client(p[WS], websockets=True, protocol=mqtt.MQTTv5, topics=("t/all/#",)),
        "wss": Client(p[WSS], websockets=True, ca=tls.ca.cert, topics=("t/all/#",)),
    }
    try:
        # Local subscriptions are in place once SUBACK is back: no probing needed.
        assert mosquitto_pub(p[MTLS], "t/all/mtls", "from-mtls", *cert_args(tls, tls.alice)).returncode == 0
        assert mosquitto_pub(p[TLS], "t/all/tls", "from-tls", *cert_args(tls)).returncode == 0
        for name, client in (
            ("ws", Client(p[WS], websockets=True)),
            ("wss", Client(p[WSS], websockets=True, ca=tls.ca.cert, protocol=mqtt.MQTTv5)),
            ("plain", Client(p[PLAIN])),
        ):
            client.publish(f"t/all/{name}", f"from-{name}")
            client.close()
        expected = {b"from-mtls", b"from-tls", b"from-ws", b"from-wss", b"from-plain"}
        for name, subscriber in subscribers.items():
            assert set(subscriber.payloads(5)) == expected, name
    finally:
        for subscriber in subscribers.values():
            subscriber.close()


def test_mosquitto_sub_over_tls_with_a_client_certificate(node: Node, tls: Tls) -> None:
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(node.ports[MTLS]), "-t", "t/msub", "-C", "1", "-v",
         *cert_args(tls, tls.alice)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    publisher = Client(node.ports[WSS], websockets=True, ca=tls.ca.cert)
    try:
        out, err = publish_until_exit(sub, lambda i: publisher.publish("t/msub", f"m{i}"))
    finally:
        publisher.close()
    assert sub.returncode == 0, err
    assert out.startswith("t/msub m"), out


def test_large_packets_span_many_websocket_frames_and_tls_records(node: Node, tls: Tls) -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB: many TLS records, many TCP reads
    subscriber = Client(node.ports[WSS], websockets=True, ca=tls.ca.cert, topics=("t/big",))
    publisher = Client(node.ports[WS], websockets=True)
    try:
        publisher.publish("t/big", payload)
        assert subscriber.get().payload == payload
    finally:
        publisher.close()
        subscriber.close()


# ---------------------------------------------------------------------------- client certificates


def test_the_client_certificate_cn_is_the_username(node: Node, tls: Tls) -> None:
    """The ACL lets user alice write alice/#, and anonymous clients only read it. A client
    with alice's certificate may publish there, whatever username it sends; an anonymous
    TLS client may not."""
    watcher = Client(node.ports[PLAIN], topics=("alice/#",))
    try:
        # Refused by the ACL (QoS 1: acknowledged, dropped, as Mosquitto does for 3.1.1).
        mosquitto_pub(node.ports[TLS], "alice/x", "anonymous", *cert_args(tls))
        # Delivered to local subscribers before the PUBACK: had it passed, it would come first.
        assert mosquitto_pub(node.ports[MTLS], "alice/x", "by-cn", *cert_args(tls, tls.alice)).returncode == 0
        spoof = mosquitto_pub(node.ports[MTLS], "alice/y", "cn-wins", "-u", "mallory", "-P", "pw", *cert_args(tls, tls.alice))
        assert spoof.returncode == 0, spoof.stderr
        assert watcher.payloads(2) == [b"by-cn", b"cn-wins"]
    finally:
        watcher.close()
    assert "certificate CN 'alice' is its username" in node.log()


def test_a_client_without_a_certificate_is_refused_when_one_is_required(node: Node, tls: Tls) -> None:
    result = mosquitto_pub(node.ports[MTLS], "t/x", "no-cert", *cert_args(tls))
    assert result.returncode != 0
    wait_until(lambda: "the client sent no certificate" in node.log(), 10, "the refusal in the log")
    # The listener keeps serving clients that have one.
    Client(node.ports[MTLS], ca=tls.ca.cert, cert=tls.alice).close()


def test_a_certificate_from_another_ca_is_refused(node: Node, tls: Tls) -> None:
    result = mosquitto_pub(node.ports[MTLS], "t/x", "rogue", *cert_args(tls, tls.rogue))
    assert result.returncode != 0
    wait_until(lambda: "client certificate refused: unable to get local issuer certificate" in node.log(), 10,
               "the refusal in the log")


def test_a_certificate_without_a_cn_is_refused_under_use_identity_as_username(node: Node, tls: Tls) -> None:
    result = mosquitto_pub(node.ports[MTLS], "t/x", "no-cn", *cert_args(tls, tls.no_cn))
    assert result.returncode != 0
    wait_until(lambda: "its certificate has no usable CN" in node.log(), 10, "the refusal in the log")


def test_the_tls_listener_presents_its_certificate_and_enforces_tls_version(node: Node, tls: Tls) -> None:
    context = ssl.create_default_context(cafile=str(tls.ca.cert))
    with socket.create_connection(("127.0.0.1", node.ports[TLS]), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as s:
        assert dict(x[0] for x in s.getpeercert()["subject"])["commonName"] == "localhost"
        assert s.version() == "TLSv1.3"  # the listener's tls_version
    # Below the listener's minimum: refused, and said so.
    old = ssl.create_default_context(cafile=str(tls.ca.cert))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", node.ports[TLS]), timeout=5) as raw, pytest.raises(ssl.SSLError):
        old.wrap_socket(raw, server_hostname="localhost")
    wait_until(lambda: "below the listener's tls_version" in node.log(), 10, "the refusal in the log")
    # The same client gets in where TLS 1.2 is allowed.
    with socket.create_connection(("127.0.0.1", node.ports[WSS]), timeout=5) as raw, \
            old.wrap_socket(raw, server_hostname="localhost") as s:
        assert s.version() == "TLSv1.2"


# ---------------------------------------------------------------------------- bad input


def test_plain_mqtt_on_the_tls_port_closes_only_that_socket(node: Node, tls: Tls) -> None:
    survivor = Client(node.ports[MTLS], ca=tls.ca.cert, cert=tls.alice, topics=("t/survive",))
    try:
        with RawMQTT(node.ports[MTLS]) as raw:
            raw.send(connect_packet("plain-on-tls"))
            closed, data = raw.closed_within(10)
            assert closed and not data.startswith(b"\x20"), data  # a TLS alert, never a CONNACK
        wait_until(lambda: "not TLS (plain MQTT to the TLS port?)" in node.log(), 10, "the log line")
        Client(node.ports[PLAIN]).publish("t/survive", "still here")
        assert survivor.get().payload == b"still here"
    finally:
        survivor.close()
    lines = [line for line in node.log().splitlines() if "plain MQTT to the TLS port" in line]
    assert lines and all("Traceback" not in line for line in lines)


def raw_ws(port: int, subprotocols: list[str] | None = None) -> tuple[socket.socket, WSConnection, list[Any]]:
    """A WebSocket client on a plain socket (wsproto, client side); returns the socket,
    the connection and the handshake's events."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    ws = WSConnection(ConnectionType.CLIENT)
    sock.sendall(ws.send(Request(host="localhost", target="/any/path", subprotocols=subprotocols or [])))
    return sock, ws, ws_events(sock, ws, lambda e: isinstance(e, AcceptConnection | RejectConnection))


def ws_events(sock: socket.socket, ws: WSConnection, until: Any) -> list[Any]:
    events: list[Any] = []
    while not any(until(e) for e in events):
        data = sock.recv(65536)
        ws.receive_data(data or None)
        events += list(ws.events())
        if not data:
            break
    return events


def test_a_plain_http_request_on_the_websocket_port_gets_an_error_and_is_closed(node: Node) -> None:
    survivor = Client(node.ports[WS], websockets=True, topics=("t/http",))
    try:
        with socket.create_connection(("127.0.0.1", node.ports[WS]), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            response = b""
            while chunk := s.recv(65536):
                response += chunk
            assert response.startswith(b"HTTP/1.1 400"), response  # and then closed
        # A WebSocket upgrade that does not offer the mqtt subprotocol: refused too.
        sock, _, events = raw_ws(node.ports[WS], ["chat"])
        sock.close()
        assert isinstance(events[0], RejectConnection) and events[0].status_code == 400
        # Binary garbage instead of HTTP.
        with socket.create_connection(("127.0.0.1", node.ports[WS]), timeout=10) as s:
            s.sendall(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 400")
        Client(node.ports[PLAIN]).publish("t/http", "still here")
        assert survivor.get().payload == b"still here"
    finally:
        survivor.close()
    assert "request from" in node.log() and "no 'mqtt' WebSocket subprotocol offered" in node.log()


def test_packets_across_frames_several_packets_per_frame_ping_and_close(node: Node) -> None:
    sock, ws, events = raw_ws(node.ports[WS], ["mqtt"])
    with sock:
        assert isinstance(events[0], AcceptConnection) and events[0].subprotocol == "mqtt"
        connect = connect_packet(f"raw-{uuid.uuid4().hex[:6]}")
        # CONNECT in three frames of one message, then three frames in one send.
        sock.sendall(ws.send(BytesMessage(data=connect[:3], message_finished=False))
                     + ws.send(BytesMessage(data=connect[3:9], message_finished=False))
                     + ws.send(BytesMessage(data=connect[9:], message_finished=True)))
        # SUBSCRIBE (packet id 1, t/raw QoS 0) and PINGREQ in one frame.
        subscribe = packet(0x82, b"\x00\x01" + len(b"t/raw").to_bytes(2, "big") + b"t/raw\x00")
        sock.sendall(ws.send(BytesMessage(data=subscribe + b"\xc0\x00")))
        sock.sendall(ws.send(Ping(payload=b"are you there")))
        stream = b""
        pong = False
        while not (pong and len(stream) >= 4 + 5 + 2):
            for event in ws_events(sock, ws, lambda e: True):
                if isinstance(event, BytesMessage):
                    stream += event.data
                pong |= isinstance(event, Pong) and event.payload == b"are you there"
        assert stream == b"\x20\x02\x00\x00" + b"\x90\x03\x00\x01\x00" + b"\xd0\x00"  # CONNACK, SUBACK, PINGRESP
        # A text frame is not MQTT: the node closes with 1003.
        sock.sendall(ws.send(TextMessage(data="hello")))
        closes = [e for e in ws_events(sock, ws, lambda e: isinstance(e, CloseConnection)) if isinstance(e, CloseConnection)]
        assert closes and closes[0].code == 1003
        sock.sendall(ws.send(closes[0].response()))
        assert sock.recv(65536) == b""


def test_a_client_close_frame_is_answered_and_ends_the_session(node: Node) -> None:
    watcher = Client(node.ports[PLAIN], topics=("t/will",))
    try:
        sock, ws, _ = raw_ws(node.ports[WS], ["mqtt"])
        with sock:
            will_connect = connect_packet("ws-will", will=("t/will", b"gone", 0, False))
            sock.sendall(ws.send(BytesMessage(data=will_connect)))
            assert ws_events(sock, ws, lambda e: isinstance(e, BytesMessage))
            sock.sendall(ws.send(CloseConnection(code=1000)))  # no MQTT DISCONNECT first
            closes = [e for e in ws_events(sock, ws, lambda e: isinstance(e, CloseConnection)) if isinstance(e, CloseConnection)]
            assert closes and closes[0].code == 1000
            assert sock.recv(65536) == b""  # the node ends the TCP connection
        assert watcher.get().payload == b"gone"  # no DISCONNECT: the will is published
    finally:
        watcher.close()


# ---------------------------------------------------------------------------- the same options on Mosquitto


class MosquittoTls:
    """The real Mosquitto with one TLS listener configured with the same options."""

    def __init__(self, workdir: Path, tls: Tls) -> None:
        self.port = free_port()
        conf = workdir / f"mosquitto-{self.port}.conf"
        conf.write_text("\n".join([
            f"listener {self.port} 127.0.0.1",
            f"certfile {tls.server.cert}",
            f"keyfile {tls.server.key}",
            f"cafile {tls.ca.cert}",
            "require_certificate true",
            "use_identity_as_username true",
            "allow_anonymous true",
            f"user {getpass.getuser()}",
            "persistence false",
        ]) + "\n")
        self.log = open(workdir / f"mosquitto-{self.port}.log", "wb")
        self.process = subprocess.Popen([str(MOSQUITTO), "-c", str(conf)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(self._listening, 10, "mosquitto to listen")

    def _listening(self) -> bool:
        assert self.process.poll() is None, "mosquitto exited"
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


@pytest.mark.skipif(not MOSQUITTO.exists(), reason=f"needs the real Mosquitto at {MOSQUITTO}")
def test_the_same_clients_get_in_as_on_mosquitto(node: Node, tls: Tls, tmp_path: Path) -> None:
    broker = MosquittoTls(tmp_path, tls)
    try:
        for name, cert in (("alice", tls.alice), ("no certificate", None), ("other CA", tls.rogue), ("no CN", tls.no_cn)):
            ours = mosquitto_pub(node.ports[MTLS], "t/parity", name, *cert_args(tls, cert)).returncode == 0
            theirs = mosquitto_pub(broker.port, "t/parity", name, *cert_args(tls, cert)).returncode == 0
            assert ours == theirs == (name == "alice"), name
    finally:
        broker.stop()


# ---------------------------------------------------------------------------- startup errors


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("missing key", "mqtt.listeners[0].keyfile: {d}/missing.key: private key file not found"),
        ("encrypted key", "mqtt.listeners[0].keyfile: {d}/locked.key: the private key is encrypted"),
        ("wrong key", "mqtt.listeners[0].keyfile: {d}/alice.key: this private key does not belong to {d}/server.pem"),
        ("not a certificate", "mqtt.listeners[0].certfile: {d}/alice.key: no PEM certificate in it"),
        ("address taken", "mqtt.listeners[0]: cannot listen on 127.0.0.1:{port} (mqtts): Address already in use"),
    ],
)
def test_a_listener_that_cannot_start_stops_the_node_with_an_error_naming_it(
    tls: Tls, tmp_path: Path, case: str, fragment: str
) -> None:
    from tests.helpers import zmesh_cli

    d = tls.server.cert.parent
    locked = issue(tls.ca, d, "locked", server=True, password=b"hunter2-secret", file_stem="locked")
    certfile, keyfile = {
        "missing key": (tls.server.cert, d / "missing.key"),
        "encrypted key": (locked.cert, locked.key),
        "wrong key": (tls.server.cert, tls.alice.key),
        "not a certificate": (tls.alice.key, tls.alice.key),
        "address taken": (tls.server.cert, tls.server.key),
    }[case]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = write_config(tmp_path / "node.toml", (
            f'[[mqtt.listeners]]\naddress = "127.0.0.1:{port if case == "address taken" else 0}"\n'
            f'certfile = "{certfile}"\nkeyfile = "{keyfile}"\n'
        ))
        certs = make_certs(tmp_path / "certs", ["n"])
        result = zmesh_cli("node", "run", "--config", str(config), "--name", "n", "--cert", str(certs / "n.key_secret"),
                           "--listen", "127.0.0.1:0")
    assert result.returncode != 0
    assert f"{config}: " + fragment.format(d=d, port=port) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr + result.stdout
