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

from zmesh.certs import create_certificate

REPO = Path(__file__).resolve().parent.parent


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
    ) -> None:
        self.name = name
        self.workdir = workdir
        self.control_port = control_port or free_port()
        self.ready_file = workdir / f"{name}-{uuid.uuid4().hex[:6]}.ready"
        self.log_path = workdir / f"{name}.log"
        args = [
            sys.executable, "-m", "zmesh", "node", "run",
            "--name", name,
            "--cert", str(cert_dir / f"{name}.key_secret"),
            "--trusted", str(trusted or cert_dir),
            "--listen", f"127.0.0.1:{self.control_port}",
            "--mqtt", "127.0.0.1:0",
            "--ready-file", str(self.ready_file),
            "--log-level", "debug",
        ]
        for seed in seeds or []:
            args += ["--peer", f"127.0.0.1:{seed}"]
        args += extra or []
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        info = wait_until(self._ready, 20, f"node {name} to start (log: {self.log_path})")
        self.mqtt_port: int = info["mqtt_port"]

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
    while time.monotonic() < deadline:
        publisher.publish(topic, b"probe")
        try:
            subscriber.get(timeout=0.2)
            break
        except queue.Empty:
            continue
    else:
        raise AssertionError(f"no route for {topic} within {timeout} s")
    # Messages on one path keep their order, so once a fence published after the probes
    # arrives, no probe is still in flight.
    fence = f"fence-{uuid.uuid4().hex}".encode()
    publisher.publish(topic, fence)
    while subscriber.get(timeout=timeout).payload != fence:
        pass

os.environ.setdefault("PYTHONUNBUFFERED", "1")
