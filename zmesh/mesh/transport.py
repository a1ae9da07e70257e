"""ZeroMQ sockets with CURVE, and the ZAP handler that admits only trusted keys.

Every socket a node binds is a CURVE server, and libzmq asks the ZAP handler about every
connecting key. The handler is pyzmq's own ThreadAuthenticator (a well-kept, tested
implementation of the ZAP protocol) configured with a callback over our KeyRing: there is
no "allow any" path. It runs on its own thread so that handshakes are answered even while
the event loop is busy on the hot path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import zmq
import zmq.asyncio
from zmq.auth.thread import ThreadAuthenticator

from zmesh.security.certs import KeyRing

log = logging.getLogger("zmesh.transport")

# A frame carries up to a few hundred messages, so these bound memory, not message counts.
EVENT_HWM = 10_000
CONTROL_HWM = 1_000
ZAP_DOMAIN = "zmesh"
# With a mesh authority the control socket admits any CURVE key at the handshake: a key
# without a verified certificate may send only a hello carrying its chain, which the mesh
# checks (zmesh.mesh.admission). Events and jobs keep ZAP_DOMAIN: the ring only.
ADMISSION_DOMAIN = "zmesh-admission"


class _AnyKey:
    """ZAP credentials provider of the admission domain: every key may knock."""

    def callback(self, domain: str, key: bytes) -> bool:
        return True

DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024  # bytes; the node passes mesh.max_message_size


@dataclass(frozen=True)
class Identity:
    public: bytes  # z85
    secret: bytes  # z85; never logged

    def __repr__(self) -> str:  # keep the secret out of tracebacks and debug output
        return f"Identity(public={self.public.decode()!r})"


class Transport:
    """Owns the zmq context and the authenticator of one node."""

    def __init__(self, identity: Identity, ring: KeyRing, *, admission: bool = False,
                 max_message_size: int = DEFAULT_MAX_MESSAGE) -> None:
        self.identity = identity
        self.ring = ring
        self.admission = admission  # a mesh authority: the control socket admits any key
        self.max_message_size = max_message_size
        self.context = zmq.asyncio.Context()
        self._auth = ThreadAuthenticator(self.context, log=logging.getLogger("zmesh.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=ring)
        if admission:
            self._auth.configure_curve_callback(domain=ADMISSION_DOMAIN, credentials_provider=_AnyKey())

    def server(self, kind: int, address: str, *, control: bool = False) -> tuple[zmq.asyncio.Socket, int]:
        """Bind a CURVE server socket at ``host:port`` (port 0: ephemeral); returns it and its
        port. ``control``: the control socket, which with a mesh authority admits any key."""
        sock = self._socket(kind)
        sock.curve_secretkey = self.identity.secret
        sock.curve_publickey = self.identity.public
        sock.curve_server = True
        sock.zap_domain = (ADMISSION_DOMAIN if control and self.admission else ZAP_DOMAIN).encode()
        host, port = _split(address)
        endpoint = f"tcp://{host}:{port}" if port else f"tcp://{host}:*"
        sock.bind(endpoint)
        bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return sock, int(bound.rsplit(":", 1)[1])

    def client(self, kind: int, server_key: bytes) -> zmq.asyncio.Socket:
        """A CURVE client socket that will only talk to the holder of ``server_key``."""
        sock = self._socket(kind)
        sock.curve_secretkey = self.identity.secret
        sock.curve_publickey = self.identity.public
        sock.curve_serverkey = server_key
        return sock

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        sock = self.context.socket(kind)
        sock.linger = 0
        sock.ipv6 = True
        hwm = EVENT_HWM if kind in (zmq.PUB, zmq.SUB) else CONTROL_HWM
        sock.sndhwm = hwm
        sock.rcvhwm = hwm
        # Back off reconnecting to a peer that is down (100 ms doubling to 2 s); a peer that
        # is up again is reached within 2 s, and a dead seed costs little.
        sock.reconnect_ivl_max = 2000
        # A TCP connect gives up after 1 s and is tried again (reconnect_ivl): one begun
        # while the peer is cut off would otherwise wait out the kernel's SYN backoff
        # (1, 3, 7, 15 s ...) after the cut heals. A socket re-dialled during a partition
        # (Mesh._redial) is exactly that case.
        sock.connect_timeout = 1000
        # ZMQ_MAXMSGSIZE: libzmq reads a frame's size before its body and cuts a connection
        # announcing more, so an oversized frame from a (trusted, hostile) peer is never
        # assembled in our memory. That peer's link is re-dialled; nothing else is lost.
        sock.maxmsgsize = self.max_message_size
        if kind in (zmq.DEALER, zmq.PUSH):
            # Queue nothing to a peer whose handshake has not completed: a dead or
            # impostor endpoint must not swallow hellos or jobs.
            sock.immediate = True
        return sock

    def plain(self, kind: int) -> zmq.asyncio.Socket:
        """A socket with no security mechanism: only for the identity question, whose answer
        (a public key and the chain that binds it) needs no protection."""
        sock = self._socket(kind)
        sock.immediate = False
        return sock

    def close(self) -> None:
        self._auth.stop()
        self.context.destroy(linger=0)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if ":" in host:
        host = f"[{host}]"
    return host, int(port)
