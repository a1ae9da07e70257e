"""Who is in the mesh: peer records and their liveness. Pure: hellos and ``now`` in, events out.

A peer is known by its CURVE public key, never by what it claims: the key comes from the
ZAP-authenticated connection. Its state moves

    connecting --hello--> up --silent `evasive` s--> evasive --silent `expiry` s--> down
    down --hello--> up;  evasive --hello--> up;  up/evasive --goodbye--> down

and a hello whose incarnation or ports differ from the last one means the peer restarted:
its ephemeral ports may have changed, so the caller re-dials it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from zmesh.mesh.wire import Hello


class PeerState(enum.Enum):
    CONNECTING = "connecting"
    UP = "up"
    EVASIVE = "evasive"  # late with its heartbeats, still a member
    DOWN = "down"


@dataclass
class Peer:
    key: str  # z85 public key: the identity
    host: str  # where we reach it
    control_port: int
    name: str = ""
    hello: Hello | None = None
    state: PeerState = PeerState.CONNECTING
    last_seen: float = 0.0
    since: float = 0.0  # when the state last changed
    seed: bool = False  # configured by hand: keep dialling it while down

    @property
    def label(self) -> str:
        return self.name or f"{self.host}:{self.control_port}"

    def endpoint(self, port: int) -> str:
        host = self.hello.host if self.hello and self.hello.host else self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"tcp://{host}:{port}"


class EventKind(enum.Enum):
    UP = "up"
    EVASIVE = "evasive"
    DOWN = "down"
    RESTARTED = "restarted"


@dataclass(frozen=True)
class PeerEvent:
    kind: EventKind
    peer: Peer


MEMBER_STATES = (PeerState.UP, PeerState.EVASIVE)


@dataclass
class Membership:
    expiry: float
    evasive: float | None = None  # default: half the expiry
    peers: dict[str, Peer] = field(default_factory=dict)

    def ensure(self, key: str, host: str, control_port: int, now: float, seed: bool = False) -> Peer:
        """The record for ``key``, created in the connecting state if new."""
        peer = self.peers.get(key)
        if peer is None:
            peer = Peer(key=key, host=host, control_port=control_port, since=now, seed=seed)
            self.peers[key] = peer
        peer.seed = peer.seed or seed
        return peer

    def observe(self, key: str, hello: Hello, now: float) -> list[PeerEvent]:
        """A hello or welcome arrived from ``key`` (which ``ensure`` has recorded)."""
        peer = self.peers[key]
        previous = peer.hello
        peer.hello, peer.name, peer.last_seen = hello, hello.name, now
        peer.control_port = hello.control_port
        if peer.state is PeerState.EVASIVE:
            peer.state = PeerState.UP  # it was late, not gone: no new membership event
        elif peer.state is not PeerState.UP:
            peer.state, peer.since = PeerState.UP, now
            return [PeerEvent(EventKind.UP, peer)]
        if previous is not None and _endpoints(previous) != _endpoints(hello):
            peer.since = now
            return [PeerEvent(EventKind.RESTARTED, peer)]
        return []

    def expire(self, now: float) -> list[PeerEvent]:
        """Mark evasive, then down, every member silent for too long."""
        evasive = self.evasive if self.evasive is not None else self.expiry / 2
        events = []
        for peer in self.peers.values():
            if peer.state not in MEMBER_STATES:
                continue
            silence = now - peer.last_seen
            if silence > self.expiry:
                peer.state, peer.since = PeerState.DOWN, now
                events.append(PeerEvent(EventKind.DOWN, peer))
            elif silence > evasive and peer.state is PeerState.UP:
                peer.state = PeerState.EVASIVE
                events.append(PeerEvent(EventKind.EVASIVE, peer))
        return events

    def force_down(self, key: str, now: float) -> list[PeerEvent]:
        """The peer said goodbye (mDNS): down now rather than after the expiry."""
        peer = self.peers.get(key)
        if peer is None or peer.state not in MEMBER_STATES:
            return []
        peer.state, peer.since = PeerState.DOWN, now
        return [PeerEvent(EventKind.DOWN, peer)]

    def forget(self, key: str) -> Peer | None:
        return self.peers.pop(key, None)

    def gone(self, now: float, after: float) -> list[str]:
        """Peers down for longer than ``after`` that are not seeds: they left, and are to be
        forgotten (a seed is dialled until it answers; one that comes back is learned again)."""
        return [k for k, p in self.peers.items()
                if p.state is PeerState.DOWN and not p.seed and now - p.since > after]

    def up(self) -> list[Peer]:
        """The members: peers up or merely evasive."""
        return [p for p in self.peers.values() if p.state in MEMBER_STATES]


def _endpoints(hello: Hello) -> tuple[int, int, int, int, str | None]:
    return (hello.incarnation, hello.control_port, hello.pub_port, hello.pull_port, hello.host)
