"""A fake trusted peer: real CURVE key, real ZeroMQ sockets, and whatever frames a test wants.

A compromised pod holds a key the mesh trusts, so it passes ZAP and then sends what it likes.
This peer speaks just enough of the protocol (``zmesh.mesh.wire``) to become a member of a
real node, the way a node would:

* a DEALER to the node's ROUTER: hellos (heartbeats), and any control frames a test sends;
* a ROUTER the node dials back (our hello's ``control_port``): we answer its hellos with
  welcomes and its sync requests with ``sync_answer`` (by default an empty snapshot);
* an XPUB the node's SUB connects to (our hello's ``pub_port``): events and retained frames.
  XPUB, not PUB, so that the test can wait for the node's subscription instead of sleeping;
* a PULL the node's PUSH reaches (``pull_port``), and a PUSH to the node's PULL for job frames.

The ROUTER and the heartbeat DEALER belong to a background thread; XPUB, PUSH and the
extra DEALERs of ``control`` belong to the test's thread (a ZeroMQ socket is used by one
thread only).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from tests.helpers import load_keys
from zmesh.mesh import wire

HEARTBEAT = 0.3


class FakePeer:
    def __init__(self, cert: Path, node_public: bytes, node_control_port: int, name: str = "evil",
                 host: str = "127.0.0.1") -> None:
        public, secret = load_keys(cert)
        assert secret is not None
        self.public, self.secret, self.name = public, secret, name
        self.node_public, self.node_control_port, self.host = node_public, node_control_port, host
        self.context = zmq.Context()
        self.router = self._server(zmq.ROUTER)
        self.xpub = self._server(zmq.XPUB)
        self.pull = self._server(zmq.PULL)
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.ports = {sock: int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
                      for sock in (self.router, self.xpub, self.pull)}
        self.dealer = self._client(zmq.DEALER, node_control_port)
        self.incarnation = int(time.time() * 1000)
        self.retained_seq = 0
        self.hello_changes: dict[str, Any] = {}
        self.errors: list[str] = []  # what the background thread could not handle
        self.delivery_controls: list[bytes] = []  # 0xFE messages the node sent us (docs/delivery.md)
        # What the node's sync requests get: a function of the request, returning frames.
        self.sync_answer: Callable[[wire.ControlMessage], list[bytes]] = (
            lambda request: [wire.encode_sync_data([], True, self.retained_seq)]
        )
        self.sync_requests = 0
        self.node_hello: wire.Hello | None = None  # from the node's welcome
        self.subscriptions: set[bytes] = set()
        self.push: zmq.Socket[bytes] | None = None
        self.extra: list[zmq.Socket[bytes]] = []
        # Frames for the node's DEALER (through our ROUTER), sent by the background thread
        # once the node has said hello to us (which tells the ROUTER its identity).
        self.node_ident: bytes | None = None
        self.to_node: collections.deque[bytes] = collections.deque()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"fakepeer-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ sockets

    def _server(self, kind: int) -> zmq.Socket[bytes]:
        sock = self.context.socket(kind)
        sock.linger = 0
        sock.curve_server = True
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.sndhwm = sock.rcvhwm = 100_000
        sock.bind(f"tcp://{self.host}:*")
        return sock

    def _client(self, kind: int, port: int) -> zmq.Socket[bytes]:
        sock = self.context.socket(kind)
        sock.linger = 0
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.node_public
        sock.sndhwm = 100_000
        sock.connect(f"tcp://{self.host}:{port}")
        return sock

    def hello(self, **changes: Any) -> wire.Hello:
        fields: dict[str, Any] = dict(
            name=self.name, version=wire.WIRE_VERSION, incarnation=self.incarnation,
            control_port=self.ports[self.router], pub_port=self.ports[self.xpub],
            pull_port=self.ports[self.pull], retained_seq=self.retained_seq,
        )
        fields.update(self.hello_changes)
        fields.update(changes)
        return wire.Hello(**fields)

    # ------------------------------------------------------------------ the background half

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.dealer, zmq.POLLIN)
        next_hello = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_hello:
                with self._lock:
                    data = wire.encode_control(wire.HELLO, self.hello())
                self.dealer.send(data, zmq.NOBLOCK)
                next_hello = now + HEARTBEAT
            for sock, _ in poller.poll(10 if self.to_node else 50):
                try:
                    if sock is self.dealer:
                        self._on_dealer(self.dealer.recv())
                    else:
                        self._on_router(self.router.recv_multipart())
                except Exception as exc:  # noqa: BLE001 - kept for close() to report
                    self.errors.append(repr(exc))
            while self.to_node and self.node_ident is not None:
                try:
                    self.router.send_multipart([self.node_ident, self.to_node.popleft()], zmq.NOBLOCK)
                except zmq.ZMQError:
                    break

    def _on_dealer(self, data: bytes) -> None:
        try:
            message = wire.decode_control(data)
        except wire.WireError:
            return
        if message.kind == wire.WELCOME and message.hello is not None:
            self.node_hello = message.hello

    def _on_router(self, frames: list[bytes]) -> None:
        ident, data = frames[0], frames[-1]
        if data[:1] == b"\xfe":  # reliable delivery's control messages (INTEREST...): kept, not spoken
            self.delivery_controls.append(data)
            return
        message = wire.decode_control(data)
        if message.kind == wire.HELLO:
            self.node_ident = ident
            with self._lock:
                reply = wire.encode_control(wire.WELCOME, self.hello())
            self.router.send_multipart([ident, reply])
        elif message.kind == wire.SYNC:
            self.sync_requests += 1
            with self._lock:
                answer = self.sync_answer(message)
            for frame in answer:
                self.router.send_multipart([ident, frame])

    # ------------------------------------------------------------------ the test's half

    def wait_joined(self, timeout: float = 15) -> None:
        """Until the node knows us (its welcome came) and its SUB has subscribed to the
        retained channel on our XPUB: from then on what we publish reaches it."""
        deadline = time.monotonic() + timeout
        while b"\x00" not in self.subscriptions or self.node_hello is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"fake peer not joined within {timeout} s: "
                                     f"welcome={self.node_hello is not None}, subs={self.subscriptions}")
            self.read_subscriptions(min(remaining, 0.1))

    def read_subscriptions(self, timeout: float = 0.0) -> None:
        if self.xpub.poll(int(timeout * 1000)):
            while self.xpub.poll(0):
                message = self.xpub.recv()
                if message[:1] == b"\x01":
                    self.subscriptions.add(message[1:])
                elif message[:1] == b"\x00":
                    self.subscriptions.discard(message[1:])

    def publish(self, frame: bytes) -> None:
        """A frame on our event socket (an event frame, or a retained-channel frame)."""
        self.xpub.send(frame)

    def publish_retained(self, topic: bytes, items: list[list[Any]]) -> None:
        with self._lock:
            self.retained_seq += 1
            seq = self.retained_seq
        self.publish(wire.encode_retained_frame(topic, items, seq))

    def control(self, *frames: bytes) -> zmq.Socket[bytes]:
        """Send ``frames`` as one (multipart) message on a fresh DEALER with our key."""
        sock = self._client(zmq.DEALER, self.node_control_port)
        self.extra.append(sock)
        sock.send_multipart(list(frames))
        return sock

    def send_job(self, frame: bytes) -> None:
        """A frame on our PUSH to the node's PULL (its port from the node's welcome)."""
        if self.push is None:
            assert self.node_hello is not None
            self.push = self._client(zmq.PUSH, self.node_hello.pull_port)
        self.push.send(frame)

    def set_hello(self, **changes: Any) -> None:
        """Change what every later hello (and welcome) of ours says, e.g. a peer list."""
        with self._lock:
            self.hello_changes.update(changes)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.context.destroy(linger=0)
        assert not self.errors, f"the fake peer's thread failed: {self.errors[:3]}"

    def __enter__(self) -> FakePeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
