"""A zmesh node running inside a :class:`~tests.netns.netns.Host`, and MQTT clients that reach
it from the root namespace over the bridge."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Self

import paho.mqtt.client as mqtt

from tests.helpers import REPO, Publisher, Subscriber, wait_until
from tests.netns.netns import Host

CONTROL_PORT = 7100
MQTT_PORT = 1883


class HostSubscriber(Subscriber):
    """:class:`tests.helpers.Subscriber`, connected to ``host:port`` instead of loopback."""

    def __init__(self, host: str, port: int, *topics: str, qos: int = 0, timeout: float = 10) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}")
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        subscribed: queue.Queue[Any] = queue.Queue()
        self.client.on_subscribe = lambda c, u, mid, codes, props: subscribed.put(codes)
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if topics:
            self.client.subscribe([(t, qos) for t in topics])
            try:
                self.granted = subscribed.get(timeout=timeout)
            except queue.Empty:
                self.close()
                raise AssertionError(f"no SUBACK from {host}:{port} for {topics} within {timeout} s") from None

    def __enter__(self) -> Self:
        return self


class HostPublisher(Publisher):
    """:class:`tests.helpers.Publisher`, connected to ``host:port`` instead of loopback."""

    def __init__(self, host: str, port: int) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"p-{uuid.uuid4().hex[:8]}")
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()

    def __enter__(self) -> Self:
        return self


class NodeOnHost:
    """``python -m zmesh node run`` inside ``host``, listening on ``host.ip:7100`` (mesh) and
    ``0.0.0.0:1883`` (MQTT), seeded with ``seeds`` (host IPs or ``IP:PORT``).

    Liveness is fast (``heartbeat_interval``/``peer_expiry`` from a TOML file given with
    ``--config``; flags override the file). Certificates must already be in ``cert_dir``
    (every node trusts the whole directory; create them all before the first node starts).
    The log is kept in ``workdir/<name>.log`` across restarts."""

    def __init__(self, host: Host, name: str, cert_dir: Path, workdir: Path, seeds: list[str] | None = None,
                 heartbeat_interval: float = 0.2, peer_expiry: float = 1.0, extra: list[str] | None = None,
                 start: bool = True, ready_timeout: float = 20) -> None:
        self.host = host
        self.name = name
        self.cert_dir = cert_dir
        self.workdir = workdir
        self.heartbeat_interval = heartbeat_interval
        self.peer_expiry = peer_expiry
        self.ready_timeout = ready_timeout
        self.ip = host.ip
        self.control_port = CONTROL_PORT
        self.mqtt_port = MQTT_PORT
        self.log_path = workdir / f"{name}.log"
        self.config_path = workdir / f"{name}.toml"
        self.config_path.write_text(
            f'[node]\nname = "{name}"\n\n'
            f"[mesh]\nheartbeat_interval = {heartbeat_interval}\npeer_expiry = {peer_expiry}\n"
        )
        self.seeds = [s if ":" in s else f"{s}:{CONTROL_PORT}" for s in seeds or []]
        self.extra = extra or []
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self.ready_file: Path | None = None
        host.nodes.append(self)
        if start:
            self.start()

    @property
    def args(self) -> list[str]:
        args = [
            sys.executable, "-m", "zmesh", "node", "run",
            "--config", str(self.config_path),
            "--name", self.name,
            "--cert", str(self.cert_dir / f"{self.name}.key_secret"),
            "--trusted", str(self.cert_dir),
            "--listen", f"{self.ip}:{self.control_port}",
            "--mqtt", f"0.0.0.0:{self.mqtt_port}",
            "--log-level", "debug",
        ]
        for seed in self.seeds:
            args += ["--peer", seed]
        assert self.ready_file is not None
        return args + ["--ready-file", str(self.ready_file)] + self.extra

    def start(self) -> None:
        """Start (or restart, same host and ports) and wait for the ready file."""
        assert self.process is None or self.process.poll() is not None, f"{self.name} is running"
        self.ready_file = self.workdir / f"{self.name}-{uuid.uuid4().hex[:6]}.ready"
        self.close_log()
        self._log = open(self.log_path, "ab")
        self._log.write(f"---- start: {' '.join(self.args)}\n".encode())
        self._log.flush()
        self.process = self.host.run(self.args, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)
        info = wait_until(self._ready, self.ready_timeout,
                          f"node {self.name} on {self.host.name} to start (log: {self.log_path})")
        assert info["control_port"] == self.control_port, info
        assert info["mqtt_port"] == self.mqtt_port, info

    def _ready(self) -> dict[str, Any] | None:
        assert self.process is not None and self.ready_file is not None
        if self.process.poll() is not None:
            raise AssertionError(f"node {self.name} exited {self.process.returncode}:\n{self.tail()}")
        if self.ready_file.exists():
            return json.loads(self.ready_file.read_text())
        return None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no goodbye to anyone."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(5)

    def stop(self, timeout: float = 10) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def output(self) -> str:
        if self._log is not None:
            self._log.flush()
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    # -- MQTT from the root namespace

    def subscriber(self, *topics: str, qos: int = 0) -> HostSubscriber:
        return HostSubscriber(self.ip, self.mqtt_port, *topics, qos=qos)

    def publisher(self) -> HostPublisher:
        return HostPublisher(self.ip, self.mqtt_port)

    def peers(self, timeout: float = 5) -> dict[str, dict[str, Any]]:
        """This node's ``$SYS/zmesh/peers``, name -> entry (read with a fresh subscription)."""
        with self.subscriber("$SYS/zmesh/peers") as sub:
            try:
                message = sub.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"{self.name}: no $SYS/zmesh/peers within {timeout} s") from None
        return {p["name"]: p for p in json.loads(message.payload)}

    def peer_states(self) -> dict[str, str]:
        return {name: entry["state"] for name, entry in self.peers().items()}

    def peers_up(self) -> set[str]:
        return {name for name, state in self.peer_states().items() if state == "up"}

    def __repr__(self) -> str:
        return f"NodeOnHost({self.name!r} on {self.host.name} {self.ip})"
