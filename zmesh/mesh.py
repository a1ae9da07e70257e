"""The mesh side of a node: its ZeroMQ sockets, the hello exchange, liveness, event I/O.

Sockets (every bound one a CURVE server behind the ZAP key ring):

* ROUTER, bound at ``mesh.listen``: the control socket, the one address a peer must know.
  Hellos arrive here; the sender's identity is its ZAP-authenticated key (``User-Id``).
* one DEALER per peer, connected to that peer's ROUTER: we send our hellos (which double as
  heartbeats) and get welcomes back.
* PUB, bound on an ephemeral port: our events, batched per topic (see ``wire``).
* one SUB per peer, connected to that peer's PUB once its hello told us the port. One socket
  per peer means every frame's sender is known from the socket it arrived on.
* PULL, bound on an ephemeral port, for the job queues built on top.

A seed given only as ``host:port`` has an unknown key, and a CURVE client must know the
server's key before it can connect. We dial the address once per trusted key at the same
time; only the DEALER holding the right key completes the handshake and gets a welcome, the
others are closed. What the seed says about itself is believed only after that handshake.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

import zmq
import zmq.asyncio

from zmesh import wire
from zmesh.discovery import Hint
from zmesh.membership import MEMBER_STATES, EventKind, Membership, Peer, PeerEvent, PeerState
from zmesh.retained import RetainedEntry
from zmesh.transport import Transport

log = logging.getLogger("zmesh.mesh")

# Batching bounds: a frame is flushed when the event loop goes idle (call_soon), or at once
# when this many messages or bytes are pending, so a publisher that never yields still sends.
FLUSH_COUNT = 1024
FLUSH_BYTES = 256 * 1024
# How often the liveness loop runs, and how fast an unanswered peer is re-hailed.
TICK = 0.05
# A hello sent before the CURVE handshake completes is dropped (IMMEDIATE), so an
# unanswered peer is re-hailed often; it costs nothing on the wire until it connects.
RETRY_HELLO = 0.05
MAX_FRAMES_PER_WAKEUP = 64  # frames (of up to 1024 messages) per burst between yields
CONGESTION_DELAY = 0.01
# Plain ints: pyzmq's enum members cost ~2 us per call in `&` and flag handling.
_NOBLOCK, _EVENTS, _POLLIN = int(zmq.NOBLOCK), int(zmq.EVENTS), int(zmq.POLLIN)
BYE_LINGER_MS = 200
RETAINED_GRACE = 0.25  # seconds a hello's retained sequence may run ahead of the frames seen
QUIET_GAP = 0.0005  # seconds without a flush after which a publish is sent at once
_clock = time.perf_counter
SYNC_TIMEOUT = 10.0  # a sync unanswered this long is asked again
# A hint that names a trusted key must lead to a completed handshake with that key within
# this time; otherwise the key did not match the server there, and the hint is dropped.
HINT_CONFIRM_TIMEOUT = 10.0

EventHandler = Callable[[Peer, str, list[bytes | wire.Item], bool], None]
PeerHandler = Callable[[PeerEvent], None]


class Replica(Protocol):
    """The node's retained state, as the mesh needs it to replicate (see ``Node``)."""

    def digests(self) -> list[int]: ...

    def in_buckets(self, buckets: set[int]) -> list[RetainedEntry]: ...

    def differing_buckets(self, remote: list[int]) -> set[int]: ...

    def apply_live(self, peer: Peer, topic: str, items: list[wire.RetainedItem]) -> None: ...

    def apply_sync(self, peer: Peer, entries: list[RetainedEntry]) -> None: ...


class _Link:
    """Our sockets towards one peer, and how far we have its retained state."""

    __slots__ = ("peer", "dealer", "reader", "sub", "sub_reader", "push", "tasks", "last_hello",
                 "synced_upto", "max_seen", "sync_pending", "last_sync", "announced_seq", "announced_at")

    def __init__(self, peer: Peer, dealer: zmq.asyncio.Socket) -> None:
        self.peer = peer
        self.dealer = dealer
        self.reader: asyncio.Task[None] | None = None  # the task reading `dealer`
        self.sub: zmq.asyncio.Socket | None = None
        self.sub_reader: _EventReader | None = None  # reads `sub`
        self.push: zmq.asyncio.Socket | None = None  # jobs to the peer's PULL, made on first use
        self.tasks: list[asyncio.Task[None]] = []
        self.last_hello = 0.0
        self.reset_sync()

    def reset_sync(self) -> None:
        # Every retained frame of the peer up to `synced_upto` is reflected in our state;
        # None until a sync has completed since we (re)connected.
        self.synced_upto: int | None = None
        self.max_seen: int | None = None  # highest retained frame seen live since then
        self.sync_pending = False
        self.last_sync = 0.0
        # The peer's retained sequence from a hello that was ahead of `synced_upto`, and when
        # it came; still behind it RETAINED_GRACE later, its frame was lost, not late.
        self.announced_seq: int | None = None
        self.announced_at = 0.0


class Mesh:
    def __init__(
        self,
        name: str,
        transport: Transport,
        listen: str,
        heartbeat_interval: float,
        peer_expiry: float,
        advertise_host: str | None,
        peer_evasive: float | None,
        on_event: EventHandler,
        on_peer: PeerHandler,
        replica: Replica,
        anti_entropy_interval: float = 30.0,
        congested: Callable[[], bool] | None = None,
    ) -> None:
        self.name = name
        self.transport = transport
        self.listen = listen
        self.heartbeat_interval = heartbeat_interval
        self.advertise_host = advertise_host
        self.on_event = on_event
        self.on_peer = on_peer
        self.replica = replica
        if congested is not None:
            self.congested = congested  # type: ignore[method-assign]
        self.anti_entropy_interval = anti_entropy_interval
        # The node's mesh policy check (peer, topic, count) -> allowed; None: no policy.
        self.may_publish: Callable[[Peer, str, int], bool] | None = None
        self.retained_seq = 0
        self._pending_retained: dict[bytes, list[Any]] = {}
        self.own_key = transport.identity.public.decode()
        self.membership = Membership(expiry=peer_expiry, evasive=peer_evasive)
        self.incarnation = random.getrandbits(62) ^ time.time_ns()
        self.links: dict[str, _Link] = {}
        self.probes: dict[tuple[str, int], asyncio.Task[None]] = {}
        self.prefixes: set[bytes] = set()
        self.control_port = self.pub_port = self.pull_port = 0
        self.router: zmq.asyncio.Socket | None = None
        self.pub: zmq.asyncio.Socket | None = None
        self.pull: zmq.asyncio.Socket | None = None
        self.stats = {
            "frames_in": 0,
            "frames_out": 0,
            "bad_frames": 0,
            "refused_hellos": 0,
            "untrusted_hints": 0,
            "unconfirmed_hints": 0,
            "syncs_requested": 0,
            "sync_entries_in": 0,
            "sync_entries_out": 0,
            "retained_gaps": 0,
        }
        self._pending: dict[bytes, list[Any]] = {}
        self._pending_count = 0
        self._pending_bytes = 0
        self._flush_scheduled = False
        self._last_flush = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warned: set[str] = set()
        self._own_hosts: set[str] = set()
        self._unconfirmed: dict[str, tuple[float, Hint]] = {}  # hinted key -> (deadline, hint)
        # Work queues (zmesh.jobqueue wires these): what we serve, and where jobs go.
        self.local_queues: dict[str, int] = {}
        self.on_hello: Callable[[str, wire.Hello], None] | None = None
        self.on_job: Callable[[str, bytes], None] | None = None  # job or report frame, sender key
        self._job_reader: _JobReader | None = None
        self._shadows: dict[int, zmq.Socket[bytes]] = {}  # socket address -> synchronous view

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        host = self.listen.rpartition(":")[0] or "0.0.0.0"
        self.router, self.control_port = self.transport.server(zmq.ROUTER, self.listen)
        self._own_hosts = _local_addresses(host)
        self._bind_pub(host)
        self.pull, self.pull_port = self.transport.server(zmq.PULL, f"{host}:0")
        self._tasks = [
            asyncio.create_task(self._read_control(), name="mesh-control"),
            asyncio.create_task(self._liveness(), name="mesh-liveness"),
        ]
        self._job_reader = _JobReader(self, self.pull)
        log.info(
            "mesh listening: control %s:%d, events %d, jobs %d",
            host,
            self.control_port,
            self.pub_port,
            self.pull_port,
        )

    def _bind_pub(self, host: str) -> None:
        self.pub, self.pub_port = self.transport.server(zmq.PUB, f"{host}:0")
        # PUB never blocks (it drops at the high-water mark), so the hot path sends on a
        # plain synchronous view of the socket and skips a Future per frame.
        self._pub_send = zmq.Socket.shadow(self.pub.underlying).send

    async def stop(self) -> None:
        self.flush()
        bye = wire.encode_control(wire.BYE)
        for link in self.links.values():
            if link.peer.state in MEMBER_STATES and _try_send(link.dealer, bye):
                link.dealer.linger = BYE_LINGER_MS  # let the goodbye leave before the close
        tasks = list(self._tasks) + list(self.probes.values())
        for link in self.links.values():
            tasks.extend(link.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._job_reader is not None:
            self._job_reader.close()
        for link in self.links.values():
            self._close_sub(link)
            link.dealer.close()  # with the linger set above when a goodbye is queued
        for sock in (self.router, self.pub, self.pull):
            if sock is not None:  # None when start() failed part way (a port in use)
                sock.close(linger=0)

    # ------------------------------------------------------------------ peers

    def add_seed(self, host: str, port: int) -> None:
        """Dial ``host:port``, whose key we learn by which trusted key completes the handshake."""
        if (host, port) in self.probes:
            return
        self.probes[(host, port)] = asyncio.create_task(
            self._probe(host, port), name=f"probe-{host}:{port}"
        )

    def found(self, hint: Hint) -> None:
        """A discovery provider says a peer may be at ``hint``: dial it, trusting nothing yet."""
        if hint.port == self.control_port and hint.host in self._own_hosts:
            return  # ourselves (a headless Service name resolves to our own pod too)
        if hint.key is None:
            if not any((p.host, p.control_port) == (hint.host, hint.port) for p in self.membership.peers.values()):
                self.add_seed(hint.host, hint.port)
            return
        if hint.key == self.own_key or hint.key in self.links:
            return
        if hint.key.encode() not in self.transport.ring:
            self.stats["untrusted_hints"] += 1
            self._warn_once(
                f"untrusted:{hint.key}",
                "%s hint %s at %s:%d names a key that is not trusted: ignored",
                hint.source, hint.name or "?", hint.host, hint.port,
            )
            return
        # The handshake proves the key: an impostor using a trusted key's name never
        # completes it, and so never becomes a member; unconfirmed, it is dropped and counted.
        self._link_to(hint.key, hint.host, hint.port)
        self._unconfirmed[hint.key] = (time.monotonic() + HINT_CONFIRM_TIMEOUT, hint)

    def _confirm_hints(self, now: float) -> None:
        for key, (deadline, hint) in list(self._unconfirmed.items()):
            peer = self.membership.peers.get(key)
            if peer is not None and peer.hello is not None:
                del self._unconfirmed[key]  # the handshake with that key completed: confirmed
            elif now > deadline:
                del self._unconfirmed[key]
                self.stats["unconfirmed_hints"] += 1
                self._warn_once(
                    f"unconfirmed:{key}:{hint.host}",
                    "%s hint %s at %s:%d claims a trusted key, but no handshake with it completed "
                    "in %g s (a key that does not match the server there): dropped",
                    hint.source, hint.name or "?", hint.host, hint.port, HINT_CONFIRM_TIMEOUT,
                )
                self.drop_peer(key)

    def lost(self, hint: Hint) -> None:
        """A peer said goodbye (mDNS), or an address left DNS: down now / stop dialling it."""
        if hint.key is None:
            probe = self.probes.get((hint.host, hint.port))
            if probe is not None:
                probe.cancel()  # a pod that left the Service: no need to dial it forever
            return
        if hint.key in self.links:
            for event in self.membership.force_down(hint.key, time.monotonic()):
                self._apply(event, f"said goodbye ({hint.source})")

    def peers(self) -> list[Peer]:
        return sorted(self.membership.peers.values(), key=lambda p: (p.name, p.key))

    def _hello(self) -> wire.Hello:
        known = tuple(
            (p.key, p.host, p.control_port) for p in self.membership.up() if p.key in self.links
        )
        return wire.Hello(
            name=self.name,
            version=wire.WIRE_VERSION,
            incarnation=self.incarnation,
            control_port=self.control_port,
            pub_port=self.pub_port,
            pull_port=self.pull_port,
            host=self.advertise_host,
            peers=known,
            queues=tuple(sorted(self.local_queues.items())),
            retained_seq=self.retained_seq,
        )

    async def _probe(self, host: str, port: int) -> None:
        """Try every trusted key against a seed until one answers; then it becomes a link."""
        endpoint = f"tcp://{_bracket(host)}:{port}"
        candidates: dict[zmq.asyncio.Socket, str] = {}
        address = await _resolve(host)
        try:
            while True:
                if any((p.host, p.control_port) == (address, port) for p in self.membership.peers.values()):
                    return  # it said hello to us first and is linked already
                wanted = {k.decode() for k in self.transport.ring.keys()} - {self.own_key}
                wanted -= set(self.links)  # a key already linked is not this seed's, or is done
                for sock, key in list(candidates.items()):
                    if key not in wanted:
                        sock.close(linger=0)
                        del candidates[sock]
                for key in wanted - set(candidates.values()):
                    sock = self.transport.client(zmq.DEALER, key.encode())
                    sock.connect(endpoint)
                    candidates[sock] = key
                hello = wire.encode_control(wire.HELLO, self._hello())
                for sock in candidates:
                    _try_send(sock, hello)
                poller = zmq.asyncio.Poller()
                for sock in candidates:
                    poller.register(sock, zmq.POLLIN)
                for ready, _ in await poller.poll(timeout=int(RETRY_HELLO * 1000)):
                    answered: zmq.asyncio.Socket = ready  # type: ignore[assignment]
                    data = await answered.recv()
                    key = candidates[answered]
                    message = self._decode_or_warn(data, key)
                    if message is None:
                        continue
                    if message.kind == wire.REFUSED:
                        self._log_refusal(f"{host}:{port}", message.reason)
                        continue
                    if message.kind != wire.WELCOME or message.hello is None:
                        continue
                    del candidates[answered]
                    if key not in self.links:
                        peer = self.membership.ensure(key, address, port, time.monotonic(), seed=True)
                        self._add_link(peer, answered)
                        self._observe(key, message.hello)
                    else:
                        answered.close(linger=0)
                    log.debug("seed %s:%d is %s", host, port, message.hello.name)
                    return
        finally:
            for sock in candidates:
                sock.close(linger=0)
            self.probes.pop((host, port), None)

    def _link_to(self, key: str, host: str, control_port: int) -> _Link:
        link = self.links.get(key)
        if link is None:
            peer = self.membership.ensure(key, host, control_port, time.monotonic())
            dealer = self.transport.client(zmq.DEALER, key.encode())
            dealer.connect(f"tcp://{_bracket(host)}:{control_port}")
            link = self._add_link(peer, dealer)
        return link

    def _add_link(self, peer: Peer, dealer: zmq.asyncio.Socket) -> _Link:
        link = _Link(peer, dealer)
        self.links[peer.key] = link
        self._start_reader(link)
        return link

    def _start_reader(self, link: _Link) -> None:
        link.reader = asyncio.create_task(self._read_dealer(link), name=f"dealer-{link.peer.key[:8]}")
        link.tasks.append(link.reader)

    def _redial(self, link: _Link) -> None:
        """Replace a down peer's DEALER with a fresh one. The old one's TCP connection may be
        stuck behind a partition, and what we queue on it (hellos, sync requests) would wait
        for TCP's retransmission backoff, which grows with the partition: a 30 s cut healed
        only ~23 s after the link came back. A fresh socket dials anew (IMMEDIATE: nothing
        is queued until its handshake completes)."""
        if link.reader is not None:
            link.reader.cancel()
            if link.reader in link.tasks:
                link.tasks.remove(link.reader)
        link.dealer.close(linger=0)
        link.dealer = self.transport.client(zmq.DEALER, link.peer.key.encode())
        link.dealer.connect(link.peer.endpoint(link.peer.control_port))
        self._start_reader(link)

    def _observe(self, key: str, hello: wire.Hello) -> None:
        for event in self.membership.observe(key, hello, time.monotonic()):
            self._apply(event)
        link = self.links.get(key)
        if link is not None and link.sub is not None:
            self._check_retained_seq(link, hello.retained_seq)
        if self.on_hello is not None:
            self.on_hello(key, hello)
        for peer_key, host, port in hello.peers:
            if peer_key != self.own_key and peer_key not in self.links:
                if peer_key.encode() in self.transport.ring:
                    self._link_to(peer_key, host, port)

    def _apply(self, event: PeerEvent, why: str = "") -> None:
        link = self.links.get(event.peer.key)
        if link is None:
            return
        peer = event.peer
        if event.kind is EventKind.EVASIVE:
            log.warning("peer %s evasive: nothing heard for %.1f s", peer.label, time.monotonic() - peer.last_seen)
        elif event.kind in (EventKind.UP, EventKind.RESTARTED):
            self._connect_sub(link)
            log.info(
                "peer %s %s (%s)",
                peer.label,
                "up" if event.kind is EventKind.UP else "restarted, re-dialled",
                peer.endpoint(peer.control_port),
            )
        else:
            self._close_sub(link)
            self._redial(link)
            if why:  # a goodbye: the peer left cleanly, nothing is wrong
                log.info("peer %s down: %s", peer.label, why)
            else:
                log.warning("peer %s down: nothing heard for %g s", peer.label, self.membership.expiry)
        self.on_peer(event)

    def _connect_sub(self, link: _Link) -> None:
        self._close_sub(link)
        peer = link.peer
        assert peer.hello is not None
        sub = self.transport.client(zmq.SUB, peer.key.encode())
        sub.setsockopt(zmq.SUBSCRIBE, wire.RETAINED_CHANNEL)  # every node keeps all retained state
        for prefix in self.prefixes:
            sub.setsockopt(zmq.SUBSCRIBE, prefix)
        sub.connect(peer.endpoint(peer.hello.pub_port))
        link.sub = sub
        link.reset_sync()
        self.request_sync(link)
        link.sub_reader = _EventReader(self, link, sub)

    def _close_sub(self, link: _Link) -> None:
        if link.push is not None:  # its ports may change with the peer's incarnation
            link.push.close(linger=0)
            link.push = None
        if link.sub_reader is not None:
            link.sub_reader.close()
            link.sub_reader = None
        if link.sub is not None:
            link.sub.close(linger=0)
            link.sub = None

    def _close_link_sockets(self, link: _Link) -> None:
        self._close_sub(link)
        link.dealer.close(linger=0)

    def drop_peer(self, key: str) -> None:
        """Cut a peer off entirely (its key is no longer trusted)."""
        link = self.links.pop(key, None)
        peer = self.membership.forget(key)
        if link is not None:
            for task in link.tasks:
                task.cancel()
            self._close_link_sockets(link)
        if peer is not None and peer.state in MEMBER_STATES:
            peer.state = PeerState.DOWN
            self.on_peer(PeerEvent(EventKind.DOWN, peer))

    def rotate_event_socket(self) -> None:
        """Rebind PUB on a fresh port, dropping every connection to it.

        ZAP judges a key only at the handshake, so a subscriber whose key was just revoked
        would keep receiving on its established connection. Rebinding ends all of them;
        trusted peers see the new port in our next hello and reconnect, the revoked one is
        refused by ZAP."""
        self.flush()
        old = self.pub
        host = self.listen.rpartition(":")[0] or "0.0.0.0"
        self._bind_pub(host)
        if old is not None:
            old.close(linger=0)
        self.incarnation += 1
        for link in self.links.values():
            link.last_hello = 0.0  # tell everyone now

    # ------------------------------------------------------------------ control I/O

    async def _read_control(self) -> None:
        router = self.router
        assert router is not None
        while True:
            ident, frame = await router.recv_multipart(copy=False)
            key = str(frame.get("User-Id"))  # the z85 key ZAP authenticated
            if key.encode() not in self.transport.ring:  # revoked since it connected
                continue
            message = self._decode_or_warn(frame.bytes, key)
            if message is None:
                continue
            if message.kind == wire.SYNC and message.digests is not None:
                await self._answer_sync(ident.bytes, message, router)
                continue
            if message.kind == wire.PROBE:  # zmesh doctor: answer, but it is no peer
                await router.send_multipart([ident.bytes, wire.encode_control(wire.WELCOME, self._hello())])
                continue
            if message.kind == wire.BYE:
                if key in self.links:
                    for event in self.membership.force_down(key, time.monotonic()):
                        self._apply(event, "said goodbye")
                continue
            if message.kind != wire.HELLO:
                continue
            if message.version != wire.WIRE_VERSION:
                self.stats["refused_hellos"] += 1
                reason = (
                    f"protocol version {message.version} not supported by {self.name}, "
                    f"which speaks {wire.WIRE_VERSION}"
                )
                self._log_refusal(key, reason)
                reply = wire.encode_control(wire.REFUSED, reason=reason)
            else:
                assert message.hello is not None
                host = message.hello.host or _strip_port(str(frame.get("Peer-Address")))
                link = self._link_to(key, host, message.hello.control_port)
                link.peer.host = link.peer.host or host
                self._observe(key, message.hello)
                reply = wire.encode_control(wire.WELCOME, self._hello())
            try:
                await router.send_multipart([ident.bytes, reply], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the peer went away between hello and welcome; it will hail again

    async def _read_dealer(self, link: _Link) -> None:
        while True:
            data = await link.dealer.recv()
            message = self._decode_or_warn(data, link.peer.key)
            if message is None:
                continue
            if message.kind == wire.REFUSED:
                self._log_refusal(link.peer.label, message.reason)
            elif message.kind == wire.WELCOME and message.hello is not None:
                self._observe(link.peer.key, message.hello)
            elif message.kind == wire.SYNC_DATA and message.entries is not None:
                self._on_sync_data(link, message)
                # recv() does not suspend while chunks are waiting: without this a joiner
                # merging 100,000 entries kept its loop (heartbeats, MQTT) stalled for ~3 s.
                await asyncio.sleep(0)

    def _decode_or_warn(self, data: bytes, source: str) -> wire.ControlMessage | None:
        try:
            return wire.decode_control(data)
        except wire.WireError as exc:
            self.stats["bad_frames"] += 1
            self._warn_once(f"bad:{source}", "bad control message from %s: %s", source, exc)
            return None

    def _log_refusal(self, who: str, reason: str) -> None:
        self._warn_once(f"refused:{who}", "hello with %s refused: %s", who, reason, level=logging.ERROR)

    def _warn_once(self, tag: str, fmt: str, *args: Any, level: int = logging.WARNING) -> None:
        # A misbehaving peer repeats itself every heartbeat: say it once, count the rest.
        if tag not in self._warned:
            self._warned.add(tag)
            log.log(level, fmt, *args)

    async def _liveness(self) -> None:
        while True:
            now = time.monotonic()
            hello = None
            for link in list(self.links.values()):
                due = self.heartbeat_interval if link.peer.state in MEMBER_STATES else RETRY_HELLO
                if now - link.last_hello >= due:
                    hello = hello or wire.encode_control(wire.HELLO, self._hello())
                    if _try_send(link.dealer, hello):
                        link.last_hello = now
            for event in self.membership.expire(now):
                self._apply(event)
            self._confirm_hints(now)
            for link in self.links.values():
                if link.sub is not None and link.peer.state in MEMBER_STATES:
                    if link.sync_pending and now - link.last_sync > SYNC_TIMEOUT:
                        link.sync_pending = False  # the answer was lost with a dropped peer
                    if now - link.last_sync >= self.anti_entropy_interval:
                        self.request_sync(link)
            await asyncio.sleep(TICK)

    # ------------------------------------------------------------------ events out

    def update_prefixes(self, added: set[bytes], removed: set[bytes]) -> None:
        """Subscribe every SUB socket to ``added`` prefixes and drop ``removed`` ones."""
        self.prefixes |= added
        self.prefixes -= removed
        for link in self.links.values():
            if link.sub is None:
                continue
            for prefix in added:
                link.sub.setsockopt(zmq.SUBSCRIBE, prefix)
            for prefix in removed:
                link.sub.setsockopt(zmq.UNSUBSCRIBE, prefix)

    def publish(self, topic: bytes, item: bytes | list[Any], size: int) -> None:
        """Queue one message for every peer; sent when the loop goes idle or a bound is hit."""
        if not self._pending_count and not self._flush_scheduled:
            now = _clock()
            if now - self._last_flush > QUIET_GAP:
                # Nothing sent lately: a lone message goes out now, in a frame of its own,
                # rather than one loop turn later (a turn costs ~50 us here). Under load
                # flushes follow each other closely and messages keep coalescing.
                self._last_flush = now
                self._pub_send(wire.encode_event_frame(topic, [item]), _NOBLOCK)
                self.stats["frames_out"] += 1
                return
        bucket = self._pending.get(topic)
        if bucket is None:
            self._pending[topic] = [item]
        else:
            bucket.append(item)
        self._pending_count += 1
        self._pending_bytes += size
        if self._pending_count >= FLUSH_COUNT or self._pending_bytes >= FLUSH_BYTES:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self.flush)

    def publish_retained(self, topic: bytes, item: list[Any]) -> None:
        """Queue a retained write for every peer, on the retained channel."""
        bucket = self._pending_retained.get(topic)
        if bucket is None:
            self._pending_retained[topic] = [item]
        else:
            bucket.append(item)
        self._pending_count += 1
        if self._pending_count >= FLUSH_COUNT:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        self._last_flush = _clock()
        if self._pending_retained:
            retained, self._pending_retained = self._pending_retained, {}
            for topic, items in retained.items():
                self.retained_seq += 1
                self._pub_send(wire.encode_retained_frame(topic, items, self.retained_seq), _NOBLOCK)
            self.stats["frames_out"] += len(retained)
        if not self._pending:
            self._pending_count = self._pending_bytes = 0
            return
        pending, self._pending = self._pending, {}
        self._pending_count = self._pending_bytes = 0
        send, encode = self._pub_send, wire.encode_event_frame
        for topic, items in pending.items():
            send(encode(topic, items), _NOBLOCK)
        self.stats["frames_out"] += len(pending)

    # ------------------------------------------------------------------ jobs

    def send_job(self, key: str, frame: bytes) -> bool:
        """A frame of jobs, or of job reports, to a peer's PULL socket; False if it cannot
        be queued now (not connected yet, or the socket is full)."""
        push = self.job_socket(key)
        return push is not None and self._send_now(push, frame)

    def job_socket(self, key: str) -> zmq.asyncio.Socket | None:
        """Our PUSH to a member peer's PULL, connected on first call: called as soon as a
        peer says hello, its handshake is done by the time the first job or report leaves
        (IMMEDIATE would refuse them before)."""
        link = self.links.get(key)
        if link is None or link.peer.hello is None or link.peer.state not in MEMBER_STATES:
            return None
        if link.push is None:
            link.push = self.transport.client(zmq.PUSH, key.encode())
            link.push.connect(link.peer.endpoint(link.peer.hello.pull_port))
        return link.push

    def announce(self) -> None:
        """Say hello to every peer on the next liveness tick rather than the next heartbeat:
        what we serve (queues, shared subscription groups) changed."""
        for link in self.links.values():
            link.last_hello = 0.0

    def _send_now(self, sock: zmq.asyncio.Socket, data: bytes) -> bool:
        # A synchronous view per socket, made once: making one per send cost more than the
        # send. Keyed by address, so a socket replaced by another at the same address is
        # served by the same (still correct) view.
        address = sock.underlying
        raw = self._shadows.get(address)
        if raw is None:
            if len(self._shadows) > 4096:
                self._shadows.clear()
            raw = self._shadows[address] = zmq.Socket.shadow(address)
        try:
            raw.send(data, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    # ------------------------------------------------------------------ retained replication

    def request_sync(self, link: _Link) -> None:
        """Ask a peer for the retained entries we lack (digest exchange, then a snapshot of
        only the buckets that differ). Merge is last-writer-wins, so a snapshot and live
        frames may arrive in any order; a gap in the live sequence just asks again."""
        if link.sync_pending:
            return
        if _try_send(link.dealer, wire.encode_sync_request(self.replica.digests())):
            link.sync_pending = True
            link.last_sync = time.monotonic()
            self.stats["syncs_requested"] += 1

    def _check_retained_seq(self, link: _Link, announced: int) -> None:
        """A hello said the peer has sent retained frames up to ``announced``. Frames lost
        while our SUB was still connecting (PUB drops them) leave no gap until the peer's
        next retained write, which may never come: a value written just as we joined would
        stay missing until anti-entropy. A later hello, RETAINED_GRACE on, is the proof: a
        frame still in flight has arrived by then (a needless resync would cost only a
        digest exchange)."""
        synced = link.synced_upto
        if synced is None or link.sync_pending or announced <= synced:
            link.announced_seq = None
            return
        now = time.monotonic()
        earlier = link.announced_seq
        if earlier is not None and earlier > synced:  # still waiting for an earlier one
            if now - link.announced_at >= RETAINED_GRACE:
                self.stats["retained_gaps"] += 1
                log.info("retained frames up to %d from %s never arrived: resyncing", earlier, link.peer.label)
                link.announced_seq = None
                self.request_sync(link)
            return
        link.announced_seq, link.announced_at = announced, now

    def _on_retained_frame(self, link: _Link, frame: bytes) -> None:
        topic, items, seq = wire.decode_retained_frame(frame)
        if self.may_publish is None or self.may_publish(link.peer, topic, len(items)):
            self.replica.apply_live(link.peer, topic, items)
        if link.synced_upto is None:
            link.max_seen = seq if link.max_seen is None else max(link.max_seen, seq)
        elif seq > link.synced_upto + 1:
            self.stats["retained_gaps"] += 1
            log.info("retained frames %d..%d from %s missed: resyncing", link.synced_upto + 1, seq - 1, link.peer.label)
            link.synced_upto = seq  # the resync's snapshot is taken after this frame was sent
            self.request_sync(link)
        else:
            link.synced_upto = max(link.synced_upto, seq)

    def _on_sync_data(self, link: _Link, message: wire.ControlMessage) -> None:
        assert message.entries is not None
        self.stats["sync_entries_in"] += len(message.entries)
        entries = message.entries
        if entries and self.may_publish is not None:
            allowed = self.may_publish
            entries = [entry for entry in entries if allowed(link.peer, entry.topic, 1)]
        if entries:
            self.replica.apply_sync(link.peer, entries)
        if not message.last:
            return
        link.sync_pending = False
        snapshot = message.seq
        if link.synced_upto is None and link.max_seen is not None and link.max_seen > snapshot:
            # Live frames arrived before the snapshot's point: if the first of them is not
            # right after it, some frames in between may have been missed.
            first_gap = snapshot + 1 < link.max_seen
            link.synced_upto = link.max_seen
            if first_gap:
                self.request_sync(link)
            return
        link.synced_upto = max(snapshot, link.synced_upto or 0)

    async def _answer_sync(self, ident: bytes, message: wire.ControlMessage, router: zmq.asyncio.Socket) -> None:
        assert message.digests is not None
        self.flush()  # so the sequence number we report covers every write we have made
        entries = self.replica.in_buckets(self.replica.differing_buckets(message.digests))
        self.stats["sync_entries_out"] += len(entries)
        seq = self.retained_seq
        chunks = [entries[i : i + wire.SYNC_CHUNK] for i in range(0, len(entries), wire.SYNC_CHUNK)] or [[]]
        for index, chunk in enumerate(chunks):
            data = wire.encode_sync_data(chunk, index == len(chunks) - 1, seq)
            await router.send_multipart([ident, data])  # waits at the high-water mark
            await asyncio.sleep(0)  # heartbeats and MQTT clients run between chunks

    # ------------------------------------------------------------------ events in

    def _on_frame(self, link: _Link, frame: bytes) -> None:
        try:
            if frame[:1] == wire.RETAINED_CHANNEL:
                self._on_retained_frame(link, frame)
                return
            topic, items, plain = wire.decode_event_frame(frame)
        except wire.WireError as exc:
            self.stats["bad_frames"] += 1
            self._warn_once(f"frame:{link.peer.key}", "bad event frame from %s: %s", link.peer.label, exc)
            return
        self.on_event(link.peer, topic, items, plain)

    def congested(self) -> bool:
        """Replaced by the node: True while a local subscriber is far behind."""
        return False


class _EventReader:
    """Reads a peer's event frames straight off the SUB socket's file descriptor.

    pyzmq's awaitable recv costs ~175 Python calls and two event-loop turns per message and
    never yields while a message is waiting. Here the loop calls ``drain`` when ZeroMQ's
    descriptor signals; it takes what ZeroMQ holds (checking EVENTS, so no exception per
    wakeup) in bursts of MAX_FRAMES_PER_WAKEUP, handing each frame to the node in the same
    turn, and gives the loop back between bursts so subscribers, MQTT clients and
    heartbeats run. While a local subscriber is far behind, the next burst waits
    CONGESTION_DELAY: a stream waits in ZeroMQ's queue instead of being dropped, and one
    stalled consumer only slows the node's intake."""

    def __init__(self, mesh: Mesh, link: _Link, sub: zmq.asyncio.Socket) -> None:
        self.mesh, self.link = mesh, link
        self.raw: zmq.Socket[bytes] = zmq.Socket.shadow(sub.underlying)
        self.loop = asyncio.get_running_loop()
        self.fd = int(self.raw.getsockopt(zmq.FD))
        self.next: asyncio.Handle | None = None
        self.loop.add_reader(self.fd, self.drain)
        self.next = self.loop.call_soon(self.drain)  # the descriptor is edge-triggered

    def drain(self) -> None:
        self.next = None
        recv, events, on_frame, link = self.raw.recv, self.raw.getsockopt, self.mesh._on_frame, self.link
        # The first frame is taken before asking EVENTS: after a wake-up for a lone message,
        # EVENTS costs ~10 us (it reads ZeroMQ's mailbox) that the message need not wait for.
        # The loop below still ends on an EVENTS check, which is what re-arms the
        # edge-triggered descriptor.
        try:
            first: bytes | None = recv(_NOBLOCK)
        except zmq.Again:
            first = None
        frames = 0
        if first is not None:
            on_frame(link, first)
            frames = 1
        while frames < MAX_FRAMES_PER_WAKEUP and events(_EVENTS) & _POLLIN:  # type: ignore[operator,arg-type]
            on_frame(link, recv(_NOBLOCK))
            frames += 1
        if frames:
            self.mesh.stats["frames_in"] += frames
        if frames >= MAX_FRAMES_PER_WAKEUP and self.next is None:
            if self.mesh.congested():
                self.next = self.loop.call_later(CONGESTION_DELAY, self.drain)
            else:
                self.next = self.loop.call_soon(self.drain)

    def close(self) -> None:
        # Unhook the descriptor before the socket (and so the fd number) goes away.
        self.loop.remove_reader(self.fd)
        if self.next is not None:
            self.next.cancel()


class _JobReader:
    """Reads job and report frames straight off the PULL socket's descriptor, in bursts, as
    ``_EventReader`` does for events: an awaited recv per frame cost more than the jobs in
    it. The sender is the key ZAP authenticated (``User-Id``), never the frame's word."""

    def __init__(self, mesh: Mesh, pull: zmq.asyncio.Socket) -> None:
        self.mesh = mesh
        self.raw: zmq.Socket[bytes] = zmq.Socket.shadow(pull.underlying)
        self.loop = asyncio.get_running_loop()
        self.fd = int(self.raw.getsockopt(zmq.FD))
        self.loop.add_reader(self.fd, self.drain)
        self.next: asyncio.Handle | None = self.loop.call_soon(self.drain)  # edge-triggered

    def drain(self) -> None:
        self.next = None
        raw, ring, mesh = self.raw, self.mesh.transport.ring, self.mesh
        frames = 0
        while frames < MAX_FRAMES_PER_WAKEUP and raw.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # type: ignore[operator]
            frame = raw.recv(zmq.NOBLOCK, copy=False)
            frames += 1
            key = str(frame.get("User-Id"))  # the sender, as ZAP authenticated it
            if mesh.on_job is not None and key.encode() in ring:
                try:
                    mesh.on_job(key, frame.bytes)
                except Exception:  # a bug must not stall the socket: the next frames still come
                    log.exception("job frame from %s not handled", key[:8])
        if frames >= MAX_FRAMES_PER_WAKEUP:
            self.next = self.loop.call_soon(self.drain)

    def close(self) -> None:
        self.loop.remove_reader(self.fd)
        if self.next is not None:
            self.next.cancel()


def _try_send(sock: zmq.asyncio.Socket, data: bytes) -> bool:
    try:
        zmq.Socket.shadow(sock.underlying).send(data, zmq.NOBLOCK)
        return True
    except zmq.Again:
        return False  # handshake not done (IMMEDIATE) or peer gone: the next tick retries


def _local_addresses(listen_host: str) -> set[str]:
    from zmesh.discovery import netif

    hosts = {listen_host, "127.0.0.1", "localhost"}
    for name in netif.interfaces():
        network = netif.interface_network(name)
        if network is not None:
            hosts.add(str(network.ip))
    return hosts


async def _resolve(host: str) -> str:
    """The IP a seed name stands for, so a seed and a hello from it are recognised as one."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return host
    return str(infos[0][4][0]) if infos else host


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _strip_port(address: str) -> str:
    # ZeroMQ's Peer-Address is the bare IP of the remote end; with IPv6 enabled an IPv4
    # peer shows as ::ffff:a.b.c.d, which we print and dial as plain IPv4.
    address = address.strip("[]") if address else "127.0.0.1"
    return address[7:] if address.startswith("::ffff:") and "." in address else address


