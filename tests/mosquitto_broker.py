"""A real Mosquitto broker per test, for cross-checking zmesh against the original.

Each broker gets its own generated ``mosquitto.conf`` (one loopback listener on a free port,
optional ``password_file`` / ``acl_file`` / ``allow_anonymous``) and runs in the
foreground as a child process; its log goes to a file next to the config.
"""

from __future__ import annotations

import getpass
import queue
import shutil
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from tests.helpers import free_port, wait_until

MOSQUITTO = "/usr/sbin/mosquitto"
HAVE_MOSQUITTO = Path(MOSQUITTO).exists()
HAVE_MOSQUITTO_CLIENTS = shutil.which("mosquitto_pub") is not None
NO_MOSQUITTO = f"needs the real Mosquitto broker at {MOSQUITTO} (Debian package mosquitto)"


class MosquittoBroker:
    """``mosquitto -c <generated conf>`` on 127.0.0.1:<free port>; use as a context manager."""

    def __init__(
        self,
        workdir: Path,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        allow_anonymous: bool = True,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.extra = extra  # more mosquitto.conf lines (limits such as max_keepalive)
        self.conf = workdir / f"mosquitto-{uuid.uuid4().hex[:6]}.conf"
        self.log_path = self.conf.with_suffix(".log")
        self.password_file, self.acl_file, self.allow_anonymous = password_file, acl_file, allow_anonymous
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def _write_conf(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            # Started as root, Mosquitto would switch to the "mosquitto" user, which cannot
            # read our 0600 files; keep the user we run as.
            f"user {getpass.getuser()}",
            "persistence false",
            "log_type all",
        ]
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        lines.extend(self.extra)
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> MosquittoBroker:
        # A port picked here can be taken before Mosquitto binds it; retry a few times.
        for _ in range(5):
            if self.try_start():
                return self
            if "Address already in use" not in self.log():
                break
        raise AssertionError(f"mosquitto did not start:\n{self.log()}")

    def try_start(self) -> bool:
        """Start once; False (with the reason in ``log()``) if Mosquitto exits instead of
        listening, e.g. because it refuses the password or ACL file."""
        self.port = free_port()
        self._write_conf()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        process = self.process
        wait_until(lambda: process.poll() is not None or self._listening(), 10, "mosquitto to listen or exit")
        if process.poll() is None:
            return True
        self.stop()
        return False

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Client:
    """A paho client that records CONNACK, SUBACK and messages; blocking helpers."""

    def __init__(self, port: int, username: str | None = None, password: str | None = None,
                 client_id: str | None = None, protocol: int = mqtt.MQTTv311) -> None:
        self.client_id = client_id or f"c-{uuid.uuid4().hex[:8]}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack: queue.Queue[Any] = queue.Queue()
        self.subacks: queue.Queue[list[Any]] = queue.Queue()
        self.pubacks: dict[int, Any] = {}  # mid -> reason code (MQTT 5: 0x87 when denied)
        self.client.on_connect = lambda c, u, flags, rc, props: self.connack.put(rc)
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.subacks.put(codes)
        self.client.on_publish = lambda c, u, mid, code, props: self.pubacks.__setitem__(mid, code)
        self.port = port

    def connect(self, timeout: float = 10) -> Any:
        """Connect and return the CONNACK reason code (paho ReasonCode)."""
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        return self.connack.get(timeout=timeout)

    def subscribe(self, *filters: str, qos: int = 0) -> list[Any]:
        self.client.subscribe([(f, qos) for f in filters])
        return self.subacks.get(timeout=10)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> Any:
        """Publish and wait for the broker's acknowledgement; its reason code (QoS 1)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), f"no PUBACK for {topic}"
        if not qos:
            return None
        wait_until(lambda: info.mid in self.pubacks, 10, f"PUBACK code for {topic}")
        return self.pubacks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connack_ok(port: int, username: str | None, password: str | None) -> bool:
    """Whether a broker on ``port`` accepts this username/password (CONNACK 0)."""
    client = Client(port, username, password)
    try:
        code = client.connect()
        return not code.is_failure
    finally:
        client.close()


