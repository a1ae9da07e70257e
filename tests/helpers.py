"""Helpers for tests that run real nodes: processes, ports, MQTT clients, waiting on events."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import zmq.auth

from zmesh.security.certs import create_certificate

REPO = Path(__file__).resolve().parent.parent
# Every NodeProcess started in this session, so a failing test can show the logs.
STARTED: list[NodeProcess] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_certs(directory: Path, names: list[str]) -> Path:
    for name in names:
        create_certificate(directory, name)
    return directory


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``condition`` until truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class NodeProcess:
    """`zmesh node run` as a child process, with its ports read from its ready file."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        cert_dir: Path,
        trusted: Path | None = None,
        seeds: list[int] | None = None,
        control_port: int | None = None,
        extra: list[str] | None = None,
        keys: bool = True,
    ) -> None:
        """``keys=False``: no --cert/--trusted (a node admitted by certificate, whose key
        pair is made at start; its config file comes in ``extra``)."""
        self.name = name
        self.workdir = workdir
        # 0: an ephemeral port the node binds itself, read back from its ready file (no race
        # with other processes for a port picked here and released before the node binds it).
        self.control_port = free_port() if control_port is None else control_port
        self.ready_file = workdir / f"{name}-{uuid.uuid4().hex[:6]}.ready"
        self.log_path = workdir / f"{name}.log"
        args = [
            sys.executable, "-m", "zmesh", "node", "run",
            "--name", name,
            *(["--cert", str(cert_dir / f"{name}.key_secret"), "--trusted", str(trusted or cert_dir)] if keys else []),
            "--listen", f"127.0.0.1:{self.control_port}",
            "--mqtt", "127.0.0.1:0",
            "--ready-file", str(self.ready_file),
            "--log-level", "debug",
        ]
        for seed in seeds or []:
            args += ["--peer", f"127.0.0.1:{seed}"]
        args += extra or []
        self.args = args
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        STARTED.append(self)
        info = wait_until(self._ready, 20, f"node {name} to start (log: {self.log_path})")
        self.mqtt_port: int = info["mqtt_port"]
        self.control_port = info["control_port"]

    def _ready(self) -> dict[str, Any] | None:
        if self.process.poll() is not None:
            raise AssertionError(f"node {self.name} exited {self.process.returncode}:\n{self.output()}")
        if self.ready_file.exists():
            return json.loads(self.ready_file.read_text())
        return None

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 10) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()
        return self.process.returncode

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(5)

    def sys_value(self, topic: str) -> Any:
        """Read a $SYS/zmesh/... value over MQTT."""
        with Subscriber(self.mqtt_port, topic) as sub:
            return json.loads(sub.get().payload)

    def loop_stalls(self) -> dict[str, Any]:
        """The node's event-loop lag (``lag_last_ms``, ``lag_max_ms``, ``stalls_total``: wake-ups
        more than 50 ms late), for tests that put it under hostile load."""
        value: dict[str, Any] = self.sys_value("$SYS/zmesh/node")["loop"]
        return value

    def peers_up(self) -> set[str]:
        return {p["name"] for p in self.sys_value("$SYS/zmesh/peers") if p["state"] == "up"}


def start_mesh(workdir: Path, certs: Path, names: list[str], nodes: list[NodeProcess]) -> list[NodeProcess]:
    """Start ``names`` as a mesh seeded from the first; wait until every node sees all others."""
    first = NodeProcess(workdir, names[0], certs)
    nodes.append(first)
    for name in names[1:]:
        nodes.append(NodeProcess(workdir, name, certs, seeds=[first.control_port]))
    for node in nodes[-len(names):]:
        others = set(names) - {node.name}
        wait_until(lambda n=node, o=others: n.peers_up() >= o, 15, f"{node.name} to see {others}")
    return nodes[-len(names):]


class Subscriber:
    """A paho client subscribed to ``topics``; messages land in a queue."""

    def __init__(self, port: int, *topics: str, qos: int = 0, client_id: str = "",
                 protocol: int = mqtt.MQTTv311, clean: bool = True) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
                                  protocol=protocol, clean_session=clean if protocol != mqtt.MQTTv5 else None)
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        subscribed: queue.Queue[Any] = queue.Queue()
        self.client.on_subscribe = lambda c, u, mid, codes, props: subscribed.put(codes)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if topics:
            self.client.subscribe([(t, qos) for t in topics])
            self.granted = subscribed.get(timeout=10)

    def get(self, timeout: float = 10) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def drain(self) -> list[mqtt.MQTTMessage]:
        out = []
        while not self.messages.empty():
            out.append(self.messages.get_nowait())
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Publisher:
    def __init__(self, port: int, protocol: int = mqtt.MQTTv311) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"p-{uuid.uuid4().hex[:8]}", protocol=protocol)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), f"publish to {topic} not acknowledged"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def await_route(publisher: Publisher, subscriber: Subscriber, topic: str, timeout: float = 10) -> None:
    """Publish probes on ``topic`` until the subscriber receives one, then drain the rest.

    A new subscription reaches the publishing node asynchronously (ZeroMQ forwards it
    upstream), so a test first proves the route exists before it counts messages."""
    deadline = time.monotonic() + timeout
    arrived = False
    while not arrived and time.monotonic() < deadline:
        publisher.publish(topic, b"probe")
        probe_deadline = min(time.monotonic() + 0.2, deadline)
        # Only a probe on this topic proves this route: the subscriber may still hold
        # messages from before (other routes' probes, or ones sent before a reconnect).
        while not arrived and (remaining := probe_deadline - time.monotonic()) > 0:
            try:
                message = subscriber.get(timeout=remaining)
            except queue.Empty:
                break
            arrived = message.topic == topic and message.payload == b"probe"
    if not arrived:
        raise AssertionError(f"no route for {topic} within {timeout} s")
    # Messages on one path keep their order, so once a fence published after the probes
    # arrives, no probe is still in flight.
    fence = f"fence-{uuid.uuid4().hex}".encode()
    publisher.publish(topic, fence)
    while subscriber.get(timeout=timeout).payload != fence:
        pass

os.environ.setdefault("PYTHONUNBUFFERED", "1")


# ---------------------------------------------------------------------------------------
# More helpers for the integration suite


def write_config(path: Path, text: str) -> Path:
    """Write a TOML config file (the node's name, cert and ports come from flags)."""
    path.write_text(text)
    return path


def load_keys(path: Path) -> tuple[bytes, bytes | None]:
    """(public, secret) z85 keys of a certificate file (secret is None for a ``.key``)."""
    public, secret = zmq.auth.load_certificate(str(path))
    return public, secret


def is_probe(message: mqtt.MQTTMessage) -> bool:
    """A leftover of ``await_route`` (another subscriber's probes may still be in flight)."""
    return message.payload == b"probe" or message.payload.startswith(b"fence-")


def collect(subscriber: Subscriber, count: int, timeout: float = 10,
            skip_probes: bool = True) -> list[mqtt.MQTTMessage]:
    """The next ``count`` messages (route probes skipped), failing if they do not all
    arrive within ``timeout``."""
    deadline = time.monotonic() + timeout
    out: list[mqtt.MQTTMessage] = []
    while len(out) < count:
        remaining = deadline - time.monotonic()
        try:
            message = subscriber.get(timeout=max(remaining, 0.001))
            if not (skip_probes and is_probe(message)):
                out.append(message)
        except queue.Empty:
            raise AssertionError(
                f"got {len(out)} of {count} messages within {timeout} s: "
                f"{[(m.topic, m.payload[:40]) for m in out]}"
            ) from None
    return out


def get_until(subscriber: Subscriber, predicate: Callable[[mqtt.MQTTMessage], bool],
              timeout: float = 10, what: str = "a matching message") -> tuple[mqtt.MQTTMessage, list[mqtt.MQTTMessage]]:
    """Read messages until one satisfies ``predicate``; returns it and those before it."""
    deadline = time.monotonic() + timeout
    before: list[mqtt.MQTTMessage] = []
    while True:
        remaining = deadline - time.monotonic()
        try:
            message = subscriber.get(timeout=max(remaining, 0.001))
        except queue.Empty:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None
        if predicate(message):
            return message, before
        before.append(message)


QUIET = 1.0  # how long an absence check listens, after a positive control has passed


def assert_quiet(*subscribers: Subscriber, timeout: float = QUIET, what: str = "") -> None:
    """Nothing more arrives at any of ``subscribers`` within ``timeout`` (one shared window)."""
    time.sleep(timeout)  # an absence check: a bounded wait is all there is to wait on
    for subscriber in subscribers:
        extra = [m for m in subscriber.drain() if not is_probe(m)]
        assert not extra, f"unexpected messages {what}: {[(m.topic, m.payload[:60]) for m in extra]}"


class PeersWatch(Subscriber):
    """A subscriber to a node's ``$SYS/zmesh/peers``: the current value, then every change."""

    def __init__(self, port: int) -> None:
        super().__init__(port, "$SYS/zmesh/peers")

    def wait_for(self, condition: Callable[[dict[str, dict[str, Any]]], bool], timeout: float = 10,
                 what: str = "peers") -> tuple[dict[str, dict[str, Any]], float]:
        """Wait for a peers value (name -> entry) satisfying ``condition``; returns it and
        the monotonic time it arrived."""
        message, _ = get_until(self, lambda m: condition(_by_name(m.payload)), timeout, what)
        return _by_name(message.payload), time.monotonic()


def _by_name(payload: bytes) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in json.loads(payload)}


def zmesh_cli(*args: str, timeout: float = 30, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run the ``zmesh`` command to completion."""
    return subprocess.run([sys.executable, "-m", "zmesh", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, **kwargs)


def zmesh_popen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "zmesh", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)


def publish_until_exit(process: subprocess.Popen[str], publish: Callable[[int], None],
                       timeout: float = 15, interval: float = 0.3) -> tuple[str, str]:
    """Publish (attempt ``i``) until the subscribing ``process`` exits, e.g. after ``-C 1``.

    The subscription of a freshly started command-line client reaches the publishing node
    asynchronously, so the publisher repeats until the subscriber has what it waits for."""
    deadline = time.monotonic() + timeout
    attempt = 0
    try:
        while process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"subscriber did not exit within {timeout} s")
            attempt += 1
            publish(attempt)
            try:
                process.wait(interval)
            except subprocess.TimeoutExpired:
                pass
        out, err = process.communicate(timeout=5)
        return out, err
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=5)


# ---------------------------------------------------------------------------------------
# Raw MQTT packets, built by hand (independent of zmesh's codec)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str16(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


def packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def connect_packet(client_id: str, keepalive: int = 30, clean: bool = True, level: int = 4,
                   will: tuple[str, bytes, int, bool] | None = None) -> bytes:
    """An MQTT 3.1.1 CONNECT (``level`` may be set to anything to test refusals)."""
    flags = 0x02 if clean else 0
    payload = _str16(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += _str16(topic) + _str16(message)
    body = _str16("MQTT") + bytes((level, flags)) + keepalive.to_bytes(2, "big") + payload
    return packet(0x10, body)


def publish_packet(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0,
                   dup: bool = False, retain: bool = False) -> bytes:
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    body = _str16(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return packet(first, body)


DISCONNECT = b"\xe0\x00"


class RawMQTT:
    """A TCP socket to a node's MQTT listener, for sending what no real client would."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_packet(self, timeout: float = 5) -> tuple[int, bytes]:
        """The next packet as (first byte, body)."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self._buffer) >= 2:
                length, shift, pos = 0, 0, 1
                while pos < len(self._buffer):
                    byte = self._buffer[pos]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    pos += 1
                    if not byte & 0x80:
                        if len(self._buffer) >= pos + length:
                            first, body = self._buffer[0], self._buffer[pos:pos + length]
                            self._buffer = self._buffer[pos + length:]
                            return first, body
                        break
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the node")
            self._buffer += chunk

    def connect(self, client_id: str, **kwargs: Any) -> bytes:
        """CONNECT and return the CONNACK body (asserting it is a CONNACK)."""
        self.send(connect_packet(client_id, **kwargs))
        first, body = self.read_packet()
        assert first == 0x20, f"expected CONNACK, got first byte {first:#x}"
        return body

    def closed_within(self, timeout: float) -> tuple[bool, bytes]:
        """Read until the node closes the connection; (closed?, bytes read meanwhile)."""
        deadline = time.monotonic() + timeout
        data = self._buffer
        self._buffer = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False, data
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return False, data
            except ConnectionResetError:
                return True, data
            if not chunk:
                return True, data
            data += chunk

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawMQTT:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------
# Talking to a node's control socket as a (trusted or not) CURVE client


def control_request(port: int, server_public: bytes, client_public: bytes, client_secret: bytes,
                    data: bytes, timeout: float = 5) -> bytes | None:
    """Send ``data`` on a CURVE DEALER to a node's control port; its reply, or None."""
    context = zmq.Context()
    try:
        dealer = context.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.curve_publickey = client_public
        dealer.curve_secretkey = client_secret
        dealer.curve_serverkey = server_public
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send(data)
        if dealer.poll(int(timeout * 1000)):
            return dealer.recv()
        return None
    finally:
        context.destroy(linger=0)


def stop_all(nodes: list[NodeProcess]) -> None:
    """Stop every node (SIGTERM); then fail if one did not exit 0 or logged a traceback.

    Nodes a test killed on purpose (SIGKILL) are only checked for tracebacks."""
    problems = []
    for node in nodes:
        killed = node.process.returncode == -signal.SIGKILL
        code = node.stop()
        if not killed and code != 0:
            problems.append(f"node {node.name} exited {code} (log: {node.log_path})")
    for node in nodes:
        if "Traceback" in node.log_path.read_text(errors="replace"):
            problems.append(f"node {node.name} logged a traceback (log: {node.log_path})")
    assert not problems, "; ".join(sorted(set(problems)))


# ---------------------------------------------------------------------------------------
# Work queues: node processes started side by side, paho workers and submitters


def start_nodes(workdir: Path, specs: list[dict[str, Any]]) -> list[NodeProcess]:
    """Start several ``NodeProcess(workdir, **spec)`` at once (each waits for its own ready
    file); the interpreter start-ups overlap instead of adding up."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(specs)) as pool:
        futures = [pool.submit(NodeProcess, workdir, **spec) for spec in specs]
        started, errors = [], []
        for future in futures:
            try:
                started.append(future.result())
            except Exception as exc:  # the others are still returned, so they get stopped
                errors.append(exc)
    if errors:
        for node in started:
            node.stop()
        raise errors[0]
    return started


def jobs_stats(node: NodeProcess, queue: str) -> dict[str, Any]:
    """The node's ``$SYS/zmesh/jobs`` figures for ``queue`` (zeros if it has none yet)."""
    zero = {"depth": 0, "in_flight": 0, "oldest_age": 0.0, "redeliveries_total": 0, "dead_total": 0, "done_total": 0}
    return node.sys_value("$SYS/zmesh/jobs").get(queue, zero)


class MqttWorker:
    """A paho client working ``queue`` on a node (subscribed to ``$jobs/queue/QUEUE/+``: one
    job at a time). Each job is handed to a thread that calls ``handle(job_id, payload)``:
    bytes -> ``$jobs/done/ID`` with them, a str -> ``$jobs/fail/ID`` with that reason, None ->
    the job is held and never answered (a hung scanner). ``received`` lists every job id
    delivered, in order (redeliveries included); ``answered`` those whose answer the node
    acknowledged."""

    def __init__(self, port: int, job_queue: str, handle: Callable[[str, bytes], bytes | str | None],
                 name: str = "") -> None:
        import threading

        self.name = name or f"w-{uuid.uuid4().hex[:6]}"
        self.queue, self.handle = job_queue, handle
        self.received: list[str] = []
        self.answered: list[str] = []
        self.errors: list[BaseException] = []
        self._jobs: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{self.name}-{uuid.uuid4().hex[:6]}")
        self.client.on_message = self._on_message
        subscribed: queue.Queue[Any] = queue.Queue()
        self.client.on_subscribe = lambda c, u, mid, codes, props: subscribed.put(codes)
        self.client.connect("127.0.0.1", port, keepalive=30)
        # paho leaves Nagle on: the done after a job's PUBACK would wait ~40 ms for a delayed ACK.
        self.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        self.client.subscribe(f"$jobs/queue/{job_queue}/+", qos=1)
        subscribed.get(timeout=10)

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        job_id = message.topic.rsplit("/", 1)[1]
        self.received.append(job_id)
        self._jobs.put((job_id, message.payload))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job_id, payload = job
            try:
                answer = self.handle(job_id, payload)
            except BaseException as exc:  # surfaced by the test through .errors
                self.errors.append(exc)
                continue
            if isinstance(answer, bytes):
                info = self.client.publish(f"$jobs/done/{job_id}", answer, qos=1)
            elif isinstance(answer, str):
                info = self.client.publish(f"$jobs/fail/{job_id}", answer.encode(), qos=1)
            else:
                continue
            info.wait_for_publish(timeout=10)
            self.answered.append(job_id)  # the node has the answer (PUBACK)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(5)
        self.client.disconnect()
        self.client.loop_stop()


class MqttSubmitter:
    """A paho client submitting jobs by QoS 1 publishes to ``$jobs/submit/QUEUE/ID``; the
    PUBACK means the node accepted the job (and spooled it, with a data_dir)."""

    def __init__(self, port: int, inflight: int = 200) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"submit-{uuid.uuid4().hex[:8]}")
        self.client.max_inflight_messages_set(inflight)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()

    def submit(self, queue_name: str, jobs: dict[str, bytes], timeout: float = 60) -> None:
        """Submit ``jobs`` (id -> payload); returns once every one is acknowledged."""
        infos = [self.client.publish(f"$jobs/submit/{queue_name}/{job_id}", payload, qos=1)
                 for job_id, payload in jobs.items()]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(timeout=max(deadline - time.monotonic(), 0.001))
        missing = sum(not info.is_published() for info in infos)
        assert not missing, f"{missing} of {len(infos)} submits not acknowledged within {timeout} s"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class WorkProcess:
    """``zmesh jobs work QUEUE -p PORT -- COMMAND`` in its own session, so that stopping it
    also stops the command it may be running (a hung scan) and nothing is left behind."""

    def __init__(self, port: int, job_queue: str, command: list[str], env: dict[str, str] | None = None,
                 log_path: Path | None = None) -> None:
        self.log = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "zmesh", "jobs", "work", job_queue, "-p", str(port), "--", *command],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
            env={**os.environ, **(env or {})},
        )

    def stop(self) -> None:
        if self.process.returncode is None:  # not reaped: its pid still names its group
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # the group it leads (its session)
            except ProcessLookupError:
                pass
        self.process.wait(5)
        if self.log is not subprocess.DEVNULL:
            self.log.close()
