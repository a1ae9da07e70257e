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
A seed given as ``KEY@HOST:PORT`` is dialled once, with that key, whatever the ring's size.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from zmesh.drops import Drops
from zmesh.mesh import credentials, inbound, streamwire, wire
from zmesh.mesh.admission import Admission
from zmesh.mesh.discovery import Hint
from zmesh.mesh.links import NOBLOCK, EventReader, JobReader, Link, rearm, try_send
from zmesh.mesh.membership import MEMBER_STATES, EventKind, Membership, Peer, PeerEvent, PeerState
from zmesh.mesh.ratelimit import PeerLimits
from zmesh.mesh.sync import TOO_LARGE, Replica, RetainedSync
from zmesh.mesh.transport import Transport

if TYPE_CHECKING:
    from zmesh.mesh.delivery import Delivery

log = logging.getLogger("zmesh.mesh")

# The interim of docs/delivery.md §3.3: no SUB may hold the empty prefix (it would match
# every node's addressed 0xFF stream frames on the shared PUB), so a filter that wants
# every topic subscribes to each byte a UTF-8 topic can start with instead.
UTF8_LEAD_BYTES = tuple(bytes((b,)) for b in (*range(0x01, 0x80), *range(0xC2, 0xF5)))


def _sub_prefixes(prefixes: set[bytes]) -> set[bytes]:
    return (prefixes - {b""}) | set(UTF8_LEAD_BYTES) if b"" in prefixes else prefixes

# Batching bounds: a frame is flushed when the event loop goes idle (call_soon), or at once
# when this many messages or bytes are pending, so a publisher that never yields still sends.
FLUSH_COUNT = 1024
FLUSH_BYTES = 256 * 1024
# How often the liveness loop runs, and how fast an unanswered peer is re-hailed.
TICK = 0.05
# Members one hello names (issue 16): those whose state changed in the last RECENT_HEARTBEATS
# heartbeats first, the rest drawn at random. 16 x ~60 B, whatever the mesh's size.
HELLO_PEERS = 16
RECENT_HEARTBEATS = 5
# A hello sent before the CURVE handshake completes is dropped (IMMEDIATE), so an
# unanswered peer is re-hailed often; it costs nothing on the wire until it connects.
RETRY_HELLO = 0.05
BYE_LINGER_MS = 200
# A fixed event port unbound for a revocation is bound again as soon as ZeroMQ lets go of it.
REBIND_RETRY = 0.01  # seconds, the first retry; doubling up to 0.2 s
REBIND_GIVE_UP = 5.0
QUIET_GAP = 0.0005  # seconds without a flush after which a publish is sent at once
_clock = time.perf_counter
SYNC_TIMEOUT = 10.0  # a sync unanswered this long is asked again
# A hint that names a trusted key must lead to a completed handshake with that key within
# this time; otherwise the key did not match the server there, and the hint is dropped.
HINT_CONFIRM_TIMEOUT = 10.0
# A seed dialled this long (hellos every RETRY_HELLO, ZeroMQ reconnecting with backoff) with
# no handshake is diagnosed (zmesh.mesh.seedcheck) and warned about once; dialling goes on.
SEED_WARN_AFTER = 3.0
# A peer (not a seed) down this many peer expiries is forgotten: it left (a pod replaced by
# another with a new key, a node retired), and `zmesh peers` should not list it forever.
FORGET_AFTER_EXPIRIES = 12

EventHandler = Callable[[Peer, str, list[bytes | wire.Item], bool], None]
PeerHandler = Callable[[PeerEvent], None]
Drop = Callable[[str, str], None]  # (reason, detail): zmesh.drops.Drops.drop

# Drop reasons (zmesh.drops): what a peer sent that cost it one dropped message.
BAD_CONTROL = "mesh_bad_control"  # not a control message we can decode
CONTROL_ERROR = "mesh_control_error"  # a control message whose handling failed
BAD_FRAME = "mesh_bad_frame"  # an event or retained frame we cannot decode
UNSOLICITED_SYNC = "mesh_unsolicited_sync"  # sync data while we had asked nothing
SYNC_APPLY_SLICE = 500  # synced entries merged per loop turn
# Sync requests one peer may make in a burst, and the seconds of answer bytes in a burst.
SYNC_REQUEST_BURST = 10.0
SYNC_BYTE_BURST_SECONDS = 4.0


class Mesh(RetainedSync):
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
        admission: Admission | None = None,
        identity_port: int = 0,
        events_port: int = 0,
        jobs_port: int = 0,
        drop: Drop | None = None,
        sync_requests_per_second: float = 2.0,
        sync_bytes_per_second: float = 4 * 1024 * 1024,
        max_payload: int = 0,
    ) -> None:
        self.name = name
        # With a mesh authority: who is a member is decided by certificate (admission.py),
        # and a seed's key is learnt by asking its identity socket (control port + 1 unless
        # mesh.identity_port says otherwise).
        self.admission = admission
        self.identity_port = identity_port
        self.identity: zmq.asyncio.Socket | None = None
        self._last_lapse_check = 0.0
        # Ports for the PUB and PULL sockets; 0: ephemeral (peers learn them from the hello).
        self.events_port, self.jobs_port = events_port, jobs_port
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
        # Every refused input is counted and logged, rate-limited (the node's Drops).
        self.drop: Drop = drop or Drops(log).drop
        # A payload a client could not publish here (mqtt.max_packet_size) is refused from a
        # peer too; 0: no bound but the frame's.
        self.max_payload = max_payload
        self.sync_limits = PeerLimits(
            sync_requests_per_second, sync_bytes_per_second,
            max(SYNC_REQUEST_BURST, sync_requests_per_second),
            sync_bytes_per_second * SYNC_BYTE_BURST_SECONDS,
        )
        # The node's mesh policy check (peer, topic, count) -> allowed; None: no policy.
        self.may_publish: Callable[[Peer, str, int], bool] | None = None
        self.retained_seq = 0
        self._pending_retained: dict[bytes, list[Any]] = {}
        self.own_key = transport.identity.public.decode()
        self.membership = Membership(expiry=peer_expiry, evasive=peer_evasive)
        self.incarnation = random.getrandbits(62) ^ time.time_ns()
        self.links: dict[str, Link] = {}
        self.probes: dict[tuple[str, int], asyncio.Task[None]] = {}
        self.prefixes: set[bytes] = set()
        self.control_port = self.pub_port = self.pull_port = 0
        self.router: zmq.asyncio.Socket | None = None
        self.pub: zmq.asyncio.Socket | None = None
        self.pull: zmq.asyncio.Socket | None = None
        self.stats = {
            "frames_in": 0,
            "frames_out": 0,
            # Live (non-retained) messages and event frame bytes, counted per frame.
            "messages_in": 0,
            "messages_out": 0,
            "bytes_in": 0,
            "bytes_out": 0,
            "bad_frames": 0,
            "refused_hellos": 0,
            "untrusted_hints": 0,
            "unconfirmed_hints": 0,
            "syncs_requested": 0,
            "sync_entries_in": 0,
            "sync_entries_out": 0,
            "retained_gaps": 0,
            "refused_certificates": 0,
            # CURVE connections opened to seeds by address (one per trusted key, or one for a
            # seed given with its key): what joining costs, for the tests and operators.
            "seed_dials": 0,
        }
        self._pending: dict[bytes, list[Any]] = {}
        self._pending_count = 0
        self._pending_bytes = 0
        self._flush_scheduled = False
        self._last_flush = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pub_endpoint = ""
        self._rebinding: asyncio.TimerHandle | None = None  # a fixed PUB port, bound again soon
        self._warned: set[str] = set()
        self._own_hosts: set[str] = set()
        self._unconfirmed: dict[str, tuple[float, Hint]] = {}  # hinted key -> (deadline, hint)
        # Seeds dialled for SEED_WARN_AFTER with no handshake -> why (for wait_for_peers too).
        self.seed_trouble: dict[tuple[str, int], str] = {}
        self._next_forget = 0.0
        self._peer_list: tuple[tuple[str, str, int], ...] = ()
        self._peer_list_at: float | None = None  # when _peer_list was drawn (see _hello)
        # Retained anti-entropy: one random member per anti_entropy_interval (issue 16),
        # and the links whose sync is in flight (their answer may be lost with a peer).
        self._next_anti_entropy = time.monotonic() + anti_entropy_interval
        self._syncs_in_flight: dict[str, Link] = {}
        self._first_syncs_due: dict[str, Link] = {}  # links up whose first sync could not be sent yet
        self._diagnoses: set[asyncio.Task[None]] = set()
        # Work queues (zmesh.jobs.service wires these): what we serve, and where jobs go.
        self.local_queues: dict[str, int] = {}
        self.on_hello: Callable[[str, wire.Hello], None] | None = None
        self.on_job: Callable[[str, bytes], None] | None = None  # job or report frame, sender key
        self._job_reader: JobReader | None = None
        self._shadows: dict[int, zmq.Socket[bytes]] = {}  # socket address -> synchronous view
        # Reliable QoS >= 1 delivery (zmesh.mesh.delivery), set by the node before start.
        self.delivery: Delivery | None = None
        self._idents: dict[str, bytes] = {}  # member key -> its DEALER's identity at our ROUTER

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        host = self.listen.rpartition(":")[0] or "0.0.0.0"
        self.router, self.control_port = self.transport.server(zmq.ROUTER, self.listen, control=True)
        self._router_send = zmq.Socket.shadow(self.router.underlying).send_multipart
        self._own_hosts = _local_addresses(host)
        if self.admission is not None:
            self.identity = self.transport.plain(zmq.ROUTER)
            port = self.identity_port or self.control_port + 1
            self.identity.bind(f"tcp://{_bracket(host) if host != '0.0.0.0' else '*'}:{port}")
            self.identity_port = port
        self._bind_pub(host)
        self.pull, self.pull_port = self.transport.server(zmq.PULL, f"{host}:{self.jobs_port}")
        self._tasks = [
            asyncio.create_task(self._read_control(), name="mesh-control"),
            asyncio.create_task(self._liveness(), name="mesh-liveness"),
        ]
        if self.identity is not None:
            self._tasks.append(asyncio.create_task(
                credentials.serve_identity(self.identity, self.own_key, self.admission), name="mesh-identity"))
        self._job_reader = JobReader(self, self.pull)
        log.info(
            "mesh listening: control %s:%d, events %d, jobs %d",
            host,
            self.control_port,
            self.pub_port,
            self.pull_port,
        )

    def _bind_pub(self, host: str) -> None:
        self.pub, self.pub_port = self.transport.server(zmq.PUB, f"{host}:{self.events_port}")
        self._pub_endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        # PUB never blocks (it drops at the high-water mark), so the hot path sends on a
        # plain synchronous view of the socket and skips a Future per frame.
        self._pub_send = zmq.Socket.shadow(self.pub.underlying).send

    async def stop(self) -> None:
        if self._rebinding is not None:
            self._rebinding.cancel()
        self.flush()
        bye = wire.encode_control(wire.BYE)
        for link in self.links.values():
            if link.peer.state in MEMBER_STATES and try_send(link.dealer, bye):
                link.dealer.linger = BYE_LINGER_MS  # let the goodbye leave before the close
        tasks = list(self._tasks) + list(self.probes.values()) + list(self._diagnoses)
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
        for sock in (self.router, self.pub, self.pull, self.identity):
            if sock is not None:  # None when start() failed part way (a port in use)
                sock.close(linger=0)

    # ------------------------------------------------------------------ peers

    def add_seed(self, host: str, port: int, key: str | None = None) -> None:
        """Dial ``host:port``: with ``key`` (a ``KEY@HOST:PORT`` seed), once with that key;
        without, we learn its key by which trusted key completes the handshake."""
        if (host, port) in self.probes:
            return
        self.probes[(host, port)] = asyncio.create_task(
            self._probe(host, port, key), name=f"probe-{host}:{port}"
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
        if hint.key.encode() not in self.transport.ring and self.admission is None:
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

    def _hello(self, full: bool = False) -> wire.Hello:
        """Our hello. It names at most HELLO_PEERS members (issue 16: no message carries the
        whole member list): the ones whose state changed lately first, so that a join or a
        restart spreads within a few heartbeats, then others drawn at random. ``full``: every
        member, for the welcome that answers a peer just joined or restarted (push-pull
        once, on join). The list is made at most once per tick (welcomes answer every
        hello: building it per answer was O(N) per hello, O(N^2) per second)."""
        now = time.monotonic()
        if full or self._peer_list_at is None or now - self._peer_list_at >= TICK:
            listed = self._listed_peers(now, full)
            if full:
                return self._hello_with(listed)
            self._peer_list, self._peer_list_at = listed, now
        return self._hello_with(self._peer_list)

    def _listed_peers(self, now: float, full: bool) -> tuple[tuple[str, str, int], ...]:
        links = self.links
        recent_since = now - RECENT_HEARTBEATS * self.heartbeat_interval
        recent: list[tuple[str, str, int]] = []
        others: list[tuple[str, str, int]] = []
        twins: list[tuple[str, str, int]] = []
        for p in self.membership.up():  # O(members), once per tick at most
            link = links.get(p.key)
            if link is None:
                continue
            (recent if p.since >= recent_since else others).append((p.key, p.host, p.control_port))
            if link.twins is not None and link.twins_at > now - self.membership.expiry:
                # Both holders of a copied key, whichever said hello last: each of them then
                # hears of the other from our next hello. Listing only the last one, a holder
                # whose hellos always reached us just before ours went out never heard.
                twins.extend((p.key, host, port) for host, port in link.twins if (host, port) != (p.host, p.control_port))
        if full or len(recent) + len(others) <= HELLO_PEERS:
            return (*recent, *others, *twins)
        listed = recent[:HELLO_PEERS]
        room = HELLO_PEERS - len(listed)
        if room > 0:
            listed += random.sample(others, min(room, len(others)))
        return (*listed, *twins)

    def _hello_with(self, known: tuple[tuple[str, str, int], ...]) -> wire.Hello:
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
            cert=self.admission.own_chain if self.admission is not None else None,
        )

    async def _probe(self, host: str, port: int, seed_key: str | None = None) -> None:
        """Try every trusted key (or only ``seed_key``) against a seed until one answers; then
        it becomes a link."""
        if self.admission is not None:
            # One question and one handshake already, key or not; and the seed's certificate
            # is verified there (the loop below would take its welcome unverified).
            await self._probe_identity(host, port)
            return
        endpoint = f"tcp://{_bracket(host)}:{port}"
        candidates: dict[zmq.asyncio.Socket, str] = {}
        address = await _resolve(host)
        warn_at = time.monotonic() + SEED_WARN_AFTER
        try:
            while True:
                if warn_at and time.monotonic() > warn_at:
                    warn_at = 0.0
                    task = asyncio.create_task(self._warn_seed(host, port), name=f"seedcheck-{host}:{port}")
                    self._diagnoses.add(task)
                    task.add_done_callback(self._diagnoses.discard)
                if any((p.host, p.control_port) == (address, port) for p in self.membership.peers.values()):
                    return  # it said hello to us first and is linked already
                if seed_key is not None and seed_key in self.links:
                    return  # linked already (it said hello first, under another address)
                # O(ring) sockets for a seed by address, once per seed: why KEY@HOST:PORT exists.
                ring = {seed_key} if seed_key is not None else {k.decode() for k in self.transport.ring.keys()}
                wanted = ring - {self.own_key}
                wanted -= set(self.links)  # a key already linked is not this seed's, or is done
                for sock, key in list(candidates.items()):
                    if key not in wanted:
                        sock.close(linger=0)
                        del candidates[sock]
                for key in wanted - set(candidates.values()):
                    sock = self.transport.client(zmq.DEALER, key.encode())
                    sock.connect(endpoint)
                    self.stats["seed_dials"] += 1
                    candidates[sock] = key
                hello = wire.encode_control(wire.HELLO, self._hello())
                for sock in candidates:
                    try_send(sock, hello)
                poller = zmq.asyncio.Poller()
                for sock in candidates:
                    poller.register(sock, zmq.POLLIN)
                for ready, _ in await poller.poll(timeout=int(RETRY_HELLO * 1000)):
                    answered: zmq.asyncio.Socket = ready  # type: ignore[assignment]
                    data = await answered.recv()
                    key = candidates[answered]
                    if data[:1] == streamwire.CONTROL_TAG:
                        # A delivery control can reach a probe: a peer answers on the
                        # identity it last saw us on, and this probe's hello made that ours.
                        # Authentic (the CURVE handshake proved the key): handled as on the
                        # link's DEALER once the key is a member, never decoded as a hello.
                        if self.delivery is not None and key in self.links:
                            try:
                                self.delivery.on_control(key, data)
                            except Exception as exc:  # noqa: BLE001 - one bad message costs only itself
                                self.drop(CONTROL_ERROR, f"{key[:8]}: {type(exc).__name__}: {exc}")
                        continue
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
                    if self.seed_trouble.pop((host, port), None) is not None:
                        log.info("seed %s:%d answered at last: it is %s", host, port, message.hello.name)
                    return
        finally:
            for sock in candidates:
                sock.close(linger=0)
            self.probes.pop((host, port), None)

    async def _probe_identity(self, host: str, port: int) -> None:
        """With a mesh authority: ask the seed who it is (its identity socket, no security
        mechanism), believe the answer only if its chain verifies for the key it names, and
        dial that key. One question and one handshake per seed, whatever the mesh's size; an
        impostor answering for a real node's key never completes the CURVE handshake."""
        assert self.admission is not None
        address = await _resolve(host)
        endpoint = f"tcp://{_bracket(host)}:{port + 1}"  # seeds name the control port
        delay = RETRY_HELLO
        try:
            while True:
                if any((p.host, p.control_port) == (address, port) for p in self.membership.peers.values()):
                    return  # it said hello to us first and is linked already
                sock = self.transport.plain(zmq.DEALER)
                try:
                    sock.connect(endpoint)
                    await sock.send(credentials.WHO)
                    if await sock.poll(timeout=int(max(delay, 0.2) * 1000)):
                        answer = await sock.recv()
                        found = self._identity_answer(answer, f"{host}:{port}")
                        if found is not None:
                            self._link_to(found, address, port)
                            log.debug("seed %s:%d is %s", host, port, found[:8])
                            return
                finally:
                    sock.close(linger=0)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)  # a seed that is down costs little
        finally:
            self.probes.pop((host, port), None)

    def _identity_answer(self, answer: bytes, who: str) -> str | None:
        """The key a seed's identity answer proves, or None (counted, logged once)."""
        assert self.admission is not None
        try:
            key, chain = credentials.parse_identity_answer(answer)
        except ValueError:
            self.stats["refused_certificates"] += 1
            self._warn_once(f"identity:{who}", "seed %s: not an identity answer", who)
            return None
        if key == self.own_key:
            self._warn_once(f"self:{who}", "seed %s answers with our own key: ignored", who)
            return None
        verdict = self.admission.admit(key, chain)
        if verdict.identity is None:
            self.stats["refused_certificates"] += 1
            self._warn_once(f"identity:{who}:{verdict.reason}", "seed %s presents a certificate we do not "
                            "believe (%s): %s", who, verdict.reason, verdict.message)
            return None
        return key

    async def diagnose_seed(self, host: str, port: int) -> str:
        """Why the seed at ``host:port`` gives no handshake, in a sentence (zmesh.mesh.seedcheck)."""
        from zmesh.mesh.seedcheck import diagnose_seed

        identity, ring = self.transport.identity, self.transport.ring
        return await diagnose_seed(host, port, identity.public, identity.secret,
                                   len(set(ring.keys()) - {identity.public}), ring.directory)

    async def _warn_seed(self, host: str, port: int) -> None:
        why = await self.diagnose_seed(host, port)
        if (host, port) in self.probes:  # not answered meanwhile
            self.seed_trouble[(host, port)] = why
            log.warning("%s", why)

    def _link_to(self, key: str, host: str, control_port: int) -> Link:
        link = self.links.get(key)
        if link is None:
            peer = self.membership.ensure(key, host, control_port, time.monotonic())
            dealer = self.transport.client(zmq.DEALER, key.encode())
            dealer.connect(f"tcp://{_bracket(host)}:{control_port}")
            link = self._add_link(peer, dealer)
        return link

    def _add_link(self, peer: Peer, dealer: zmq.asyncio.Socket) -> Link:
        link = Link(peer, dealer)
        self.links[peer.key] = link
        self._start_reader(link)
        return link

    def _start_reader(self, link: Link) -> None:
        link.reader = asyncio.create_task(self._read_dealer(link), name=f"dealer-{link.peer.key[:8]}")
        link.tasks.append(link.reader)

    def _redial(self, link: Link) -> None:
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
            if peer_key == self.own_key and port != self.control_port:
                # Another node holds our secret key (every replica mounting the same key):
                # both flap in every peer's view. Say it loudly, once per address.
                self._warn_once(f"samekey:{host}:{port}", "another node at %s:%d uses OUR key %s (a copy of "
                                "our secret?): peers cannot tell us apart; give each node its own key",
                                host, port, self.own_key, level=logging.ERROR)
            if peer_key != self.own_key and peer_key not in self.links:
                if peer_key.encode() in self.transport.ring:
                    self._link_to(peer_key, host, port)
                elif self.admission is not None:
                    # A key we have no certificate for yet: dial it; its welcome must carry a
                    # chain for it, or the hint lapses (HINT_CONFIRM_TIMEOUT) and is dropped.
                    self.found(Hint(host, port, peer_key, None, "peer exchange"))

    def _check_duplicate_key(self, key: str, host: str, hello: wire.Hello) -> None:
        """Two live nodes saying hello with one key (a secret copied to every replica)."""
        peer = self.membership.peers.get(key)
        if (peer is None or peer.hello is None or peer.state not in MEMBER_STATES
                or hello.incarnation == peer.hello.incarnation):
            return
        now = time.monotonic()
        if (host, hello.control_port) != (peer.host, peer.control_port) and now - peer.last_seen < self.membership.expiry:
            link = self.links.get(key)
            if link is not None:
                link.twins, link.twins_at = ((peer.host, peer.control_port), (host, hello.control_port)), now
            self._warn_once(f"dupkey:{key}:{host}:{hello.control_port}", "two nodes present the key %s: %s at "
                            "%s:%d and %s at %s:%d (a secret copied to both?); they will flap", key,
                            peer.name, peer.host, peer.control_port, hello.name, host, hello.control_port,
                            level=logging.ERROR)

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

    def _connect_sub(self, link: Link) -> None:
        self._close_sub(link)
        peer = link.peer
        assert peer.hello is not None
        sub = self.transport.client(zmq.SUB, peer.key.encode())
        sub.setsockopt(zmq.SUBSCRIBE, wire.RETAINED_CHANNEL)  # every node keeps all retained state
        sub.setsockopt(zmq.SUBSCRIBE, streamwire.subscription(self.own_key))  # stream frames for us
        for prefix in _sub_prefixes(self.prefixes):
            sub.setsockopt(zmq.SUBSCRIBE, prefix)
        sub.connect(peer.endpoint(peer.hello.pub_port))
        link.sub = sub
        link.reset_sync()
        self.request_sync(link)
        if not link.sync_pending:  # our DEALER's handshake is not done: asked again each tick
            self._first_syncs_due[peer.key] = link
        link.sub_reader = EventReader(self, link, sub)

    def _close_sub(self, link: Link) -> None:
        if link.push is not None:  # its ports may change with the peer's incarnation
            link.push.close(linger=0)
            link.push = None
        if link.sub_reader is not None:
            link.sub_reader.close()
            link.sub_reader = None
        if link.sub is not None:
            link.sub.close(linger=0)
            link.sub = None

    def _close_link_sockets(self, link: Link) -> None:
        self._close_sub(link)
        link.dealer.close(linger=0)

    def _forget_gone(self, now: float) -> None:
        for key in self.membership.gone(now, self.membership.expiry * FORGET_AFTER_EXPIRIES):
            peer = self.membership.peers[key]
            log.info("peer %s forgotten: down for %.0f s", peer.label, now - peer.since)
            # Still trusted: delivery keeps what it holds for the peer until its outbox
            # would have let it go anyway (Delivery.tick), so a peer back after a long cut
            # or a restart still gets what was published meanwhile.
            self.drop_peer(key, untrusted=False)
            self.on_peer(PeerEvent(EventKind.DOWN, peer))  # so $SYS/zmesh/peers drops it too

    def drop_peer(self, key: str, untrusted: bool = True) -> None:
        """Cut a peer off entirely: its key is no longer trusted, or (``untrusted`` False)
        it has been down long enough to leave the member list."""
        link = self.links.pop(key, None)
        peer = self.membership.forget(key)
        self.sync_limits.forget(key)
        self._idents.pop(key, None)
        if link is not None:
            for task in link.tasks:
                task.cancel()
            self._close_link_sockets(link)
        if self.delivery is not None:
            if untrusted:
                self.delivery.forget(key)
            else:
                self.delivery.peer_down(key)
        if peer is not None and peer.state in MEMBER_STATES:
            peer.state = PeerState.DOWN
            self.on_peer(PeerEvent(EventKind.DOWN, peer))

    def _rebind_pub(self, waited: float) -> None:
        self._rebinding = None
        assert self.pub is not None
        try:
            self.pub.bind(self._pub_endpoint)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or waited >= REBIND_GIVE_UP or self._loop is None:
                log.error("event socket: cannot bind %s again: %s (peers receive nothing from us)",
                          self._pub_endpoint, exc)
                return
            delay = min(max(waited, REBIND_RETRY), 0.2)
            log.debug("event socket: %s still held by ZeroMQ, binding again in %g s", self._pub_endpoint, delay)
            self._rebinding = self._loop.call_later(delay, self._rebind_pub, waited + delay)

    def rotate_event_socket(self) -> None:
        """Rebind PUB on a fresh port (a fixed ``events_port``: the same one), dropping every
        connection to it.

        ZAP judges a key only at the handshake, so a subscriber whose key was just revoked
        would keep receiving on its established connection. Rebinding ends all of them;
        trusted peers see the new port in our next hello (or redial the fixed one) and
        reconnect, the revoked one is refused by ZAP."""
        self.flush()
        if self.events_port and self.pub is not None:
            # A fixed port cannot move: unbinding ends every connection accepted on it, and
            # the same socket binds it again as soon as ZeroMQ's I/O thread has let the
            # listener go (a few ms, retried). Reconnecting peers meet ZAP afresh.
            if self._rebinding is None:  # else: unbound already, the rebind is pending
                try:
                    self.pub.unbind(self._pub_endpoint)
                except zmq.ZMQError:
                    pass  # not bound (an earlier rebind gave up): bind below all the same
                self._rebind_pub(0.0)
        else:
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
            frames = await router.recv_multipart(copy=False)
            try:
                await self._on_control(router, frames)
            except Exception as exc:  # noqa: BLE001 - whatever one message does, it costs only itself
                self.drop(CONTROL_ERROR, f"{type(exc).__name__}: {exc}")

    async def _on_control(self, router: zmq.asyncio.Socket, frames: list[zmq.Frame]) -> None:
        if len(frames) != 2:  # our ROUTER prepends the identity to the one frame a peer sends
            self.drop(BAD_CONTROL, f"a control message of {len(frames) - 1} frames")
            return
        ident, frame = frames
        key = str(frame.get("User-Id"))  # the z85 key ZAP authenticated
        if key.encode() not in self.transport.ring and self.admission is None:
            return  # revoked since it connected
        data = frame.bytes
        if key in self.links:
            # The way back to this peer when our DEALER to it is not connected (it came
            # back on another port and we have not re-dialled yet): its DEALER's identity.
            self._idents[key] = ident.bytes
        if data[:1] == streamwire.CONTROL_TAG:
            # Reliable delivery's own messages (docs/delivery.md §3.2), from members only.
            if self.delivery is not None and key in self.links and key.encode() in self.transport.ring:
                self.delivery.on_control(key, data)
            else:
                self.drop("delivery_bad_control", f"{self._label(key)}: delivery control from a non-member")
            return
        message = self._decode_or_warn(data, key)
        if message is None:
            return
        if key.encode() not in self.transport.ring:
            # With a mesh authority: a key without a verified chain may only say hello
            # with its chain; everything else from it is dropped unread.
            refusal = self._admit_hello(key, message)
            if refusal is not None:
                try:
                    await router.send_multipart([ident.bytes, refusal], flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
                return
        elif self.admission is not None and message.kind == wire.HELLO and message.hello is not None:
            self._check_renewal(key, message.hello)
        if message.kind == wire.SYNC and message.digests is not None:
            await self._answer_sync(ident.bytes, message, router, key)
            return
        if message.kind == wire.PROBE:  # zmesh doctor: answer, but it is no peer
            await router.send_multipart([ident.bytes, wire.encode_control(wire.WELCOME, self._hello(full=True))])
            return
        if message.kind == wire.BYE:
            if key in self.links:
                for event in self.membership.force_down(key, time.monotonic()):
                    self._apply(event, "said goodbye")
            return
        if message.kind != wire.HELLO:
            return
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
            self._check_duplicate_key(key, host, message.hello)
            link = self._link_to(key, host, message.hello.control_port)
            link.peer.host = link.peer.host or host
            previous = link.peer.hello
            joined = (link.peer.state not in MEMBER_STATES or previous is None
                      or previous.incarnation != message.hello.incarnation)
            self._observe(key, message.hello)
            # A peer just joined (or restarted) gets every member once (push-pull); the
            # others a heartbeat's sample.
            reply = wire.encode_control(wire.WELCOME, self._hello(full=joined))
        try:
            await router.send_multipart([ident.bytes, reply], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the peer went away between hello and welcome; it will hail again

    def _admit_hello(self, key: str, message: wire.ControlMessage) -> bytes | None:
        """None when ``key`` is now a member; else the refusal to send back."""
        assert self.admission is not None
        if message.kind != wire.HELLO or message.hello is None:
            self.stats["refused_certificates"] += 1
            return None if message.kind == wire.BYE else wire.encode_control(
                wire.REFUSED, reason="this mesh admits by certificate: say hello with one first")
        verdict = self.admission.admit(key, message.hello.cert)
        if verdict.identity is not None:
            if verdict.identity.name != message.hello.name:
                log.info("peer %s calls itself %r; its certificate names it %r", key[:8],
                         message.hello.name, verdict.identity.name)
            return None
        self.stats["refused_certificates"] += 1
        reason = f"certificate refused by {self.name} ({verdict.reason}): {verdict.message}"
        self._log_refusal(f"{message.hello.name}/{key[:8]}:{verdict.reason}", reason)
        return wire.encode_control(wire.REFUSED, reason=reason)

    def _admit_welcome(self, link: Link, hello: wire.Hello) -> bool:
        """With a mesh authority: is the peer we dialled a member? Its welcome carries its
        chain, which must be for the key we dialled."""
        if self.admission is None:
            return True
        if link.peer.key.encode() in self.transport.ring:
            self._check_renewal(link.peer.key, hello)
            return True
        verdict = self.admission.admit(link.peer.key, hello.cert)
        if verdict.identity is not None:
            return True
        self.stats["refused_certificates"] += 1
        self._log_refusal(f"{link.peer.label}:{verdict.reason}",
                          f"its certificate is refused ({verdict.reason}): {verdict.message}")
        return False

    def _check_renewal(self, key: str, hello: wire.Hello) -> None:
        """A member renews its certificate before it expires; its hellos carry the new chain
        (a changed chain costs one verification, the same one a comparison)."""
        assert self.admission is not None
        verdict = self.admission.renewed(key, hello.cert)
        if verdict is not None and verdict.identity is None:
            self.stats["refused_certificates"] += 1
            self._warn_once(f"renewal:{key}:{verdict.reason}", "peer %s: renewed certificate refused (%s): %s",
                            self._label(key), verdict.reason, verdict.message)

    def check_lapsed_now(self) -> None:
        """A newer revocation list arrived: judge every member at once."""
        self._last_lapse_check = 0.0
        self._check_lapsed(time.monotonic())

    def _check_lapsed(self, now: float) -> None:
        """Members whose certificate expired or was revoked leave: their links are dropped.
        Once a second over every member: O(N) per second, where N members' certificates must
        be judged anyway."""
        if self.admission is None or now - self._last_lapse_check < 1.0:
            return
        self._last_lapse_check = now
        lapsed = self.admission.lapsed()
        for key, why in lapsed:
            link = self.links.get(key)
            log.warning("peer %s dropped: %s", link.peer.label if link else key[:8], why)
            self.drop_peer(key)
        if lapsed:
            # Its SUB's connection to our PUB was admitted by ZAP at the handshake and would
            # go on receiving: rebinding ends every connection, and only members reconnect.
            # (Its PUSH into our PULL stays, but the job reader checks the ring per frame.)
            self.rotate_event_socket()

    async def _read_dealer(self, link: Link) -> None:
        while True:
            data = await link.dealer.recv()
            message = None
            if data[:1] == streamwire.CONTROL_TAG:  # delivery control sent back on our DEALER
                if self.delivery is not None:
                    try:
                        self.delivery.on_control(link.peer.key, data)
                    except Exception as exc:  # noqa: BLE001 - one bad message costs only itself
                        self.drop(CONTROL_ERROR, f"{link.peer.label}: {type(exc).__name__}: {exc}")
                continue
            try:
                message = self._decode_or_warn(data, link.peer.key)
                if message is None:
                    continue
                if message.kind == wire.REFUSED:
                    self._log_refusal(link.peer.label, message.reason)
                elif message.kind == wire.WELCOME and message.hello is not None:
                    if not self._admit_welcome(link, message.hello):
                        self.drop_peer(link.peer.key)
                        return
                    self._observe(link.peer.key, message.hello)
                elif message.kind == wire.SYNC_DATA and message.entries is not None:
                    if not link.sync_pending:  # an answer to nothing we asked (or asked too long ago)
                        self.drop(UNSOLICITED_SYNC, link.peer.label)
                        continue
                    # Merged a slice per loop turn: one message may hold far more entries
                    # than our own chunks do (a peer chooses its chunk size).
                    entries = message.entries
                    for start in range(0, len(entries), SYNC_APPLY_SLICE):
                        if start:
                            await asyncio.sleep(0)
                        self._apply_sync_entries(link, entries[start : start + SYNC_APPLY_SLICE])
                    self._end_sync_chunk(link, message)
            except Exception as exc:  # noqa: BLE001 - one bad answer costs only itself
                self.drop(CONTROL_ERROR, f"{link.peer.label}: {type(exc).__name__}: {exc}")
            if message is not None and message.kind == wire.SYNC_DATA:
                # recv() does not suspend while chunks are waiting: without this a joiner
                # merging 100,000 entries kept its loop (heartbeats, MQTT) stalled for ~3 s.
                await asyncio.sleep(0)

    def _decode_or_warn(self, data: bytes, source: str) -> wire.ControlMessage | None:
        try:
            return wire.decode_control(data)
        except wire.WireError as exc:
            self.stats["bad_frames"] += 1
            self.drop(exc.reason or BAD_CONTROL, f"{self._label(source)}: {exc}")
            return None

    def _label(self, key: str) -> str:
        peer = self.membership.peers.get(key)
        return peer.label if peer is not None else key[:8]

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
                    if try_send(link.dealer, hello):
                        link.last_hello = now
            for event in self.membership.expire(now):
                self._apply(event)
            if now >= self._next_forget:
                self._next_forget = now + 1.0
                self._forget_gone(now)
            self._confirm_hints(now)
            self._check_lapsed(now)
            if self.delivery is not None:
                try:
                    self.delivery.tick(now)
                except Exception as exc:  # noqa: BLE001 - a failed tick must not end liveness
                    self.drop(CONTROL_ERROR, f"delivery tick: {type(exc).__name__}: {exc}")
            if self._syncs_in_flight:  # O(syncs in flight): none or a few, never every peer
                for key, link in list(self._syncs_in_flight.items()):
                    if not link.sync_pending or self.links.get(key) is not link:
                        del self._syncs_in_flight[key]
                    elif now - link.last_sync > SYNC_TIMEOUT:
                        link.sync_pending = False  # the answer was lost with a dropped peer
                        del self._syncs_in_flight[key]
            if self._first_syncs_due:  # O(links just up whose DEALER was not connected yet)
                for key, link in list(self._first_syncs_due.items()):
                    if self.links.get(key) is not link or link.sync_pending or link.synced_upto is not None:
                        del self._first_syncs_due[key]
                    elif link.sub is not None and link.peer.state in MEMBER_STATES:
                        self.request_sync(link)
            if now >= self._next_anti_entropy:
                self._next_anti_entropy = now + self.anti_entropy_interval
                self._anti_entropy_round()
            await asyncio.sleep(TICK)

    def _anti_entropy_round(self) -> None:
        """One digest exchange with one random member: every node holds every retained
        value, so any member will do, and rounds against random members converge the mesh
        epidemically (O(log N) rounds) at O(1) exchanges per node per interval. Against every
        peer it was O(N) per node and O(N^2) for the mesh. A link's first sync happens when
        it comes up, and a gap in a peer's sequence asks that peer at once (sync.py)."""
        # O(links) once per interval (30 s by default) to draw from them, not per tick.
        members = [link for link in self.links.values()
                   if link.sub is not None and link.peer.state in MEMBER_STATES and not link.sync_pending]
        if members:
            self.request_sync(random.choice(members))

    # ------------------------------------------------------------------ events out

    def update_prefixes(self, added: set[bytes], removed: set[bytes]) -> None:
        """Subscribe every SUB socket to ``added`` prefixes and drop ``removed`` ones."""
        self.prefixes |= added
        self.prefixes -= removed
        added, removed = _sub_prefixes(added), _sub_prefixes(removed)
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
                frame = wire.encode_event_frame(topic, [item])
                self._pub_send(frame, NOBLOCK)
                stats = self.stats
                stats["frames_out"] += 1
                stats["messages_out"] += 1
                stats["bytes_out"] += len(frame)
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
        # Bytes too, not only messages: a frame must stay under mesh.max_message_size.
        self._pending_bytes += len(item[0])
        if self._pending_count >= FLUSH_COUNT or self._pending_bytes >= FLUSH_BYTES:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        self._last_flush = _clock()
        stats = self.stats
        live = self._pending_count
        if self._pending_retained:
            retained, self._pending_retained = self._pending_retained, {}
            for topic, items in retained.items():
                self.retained_seq += 1
                frame = wire.encode_retained_frame(topic, items, self.retained_seq)
                self._pub_send(frame, NOBLOCK)
                stats["bytes_out"] += len(frame)
                live -= len(items)
            stats["frames_out"] += len(retained)
        if not self._pending:
            self._pending_count = self._pending_bytes = 0
            return
        pending, self._pending = self._pending, {}
        self._pending_count = self._pending_bytes = 0
        send, encode = self._pub_send, wire.encode_event_frame
        sent = 0
        for topic, items in pending.items():
            frame = encode(topic, items)
            send(frame, NOBLOCK)
            sent += len(frame)
        stats["frames_out"] += len(pending)
        stats["messages_out"] += live
        stats["bytes_out"] += sent

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
        finally:
            rearm(sock)  # a DEALER's reader awaits recv on this socket (see rearm)

    # ------------------------------------------------------------------ events in

    def _on_frame(self, link: Link, frame: bytes) -> None:
        stats = self.stats
        stats["bytes_in"] += len(frame)
        try:
            head = frame[:1]
            if head == wire.RETAINED_CHANNEL:
                self._on_retained_frame(link, frame)
                return
            if head == streamwire.STREAM_TAG:  # a numbered QoS >= 1 frame addressed to us
                if self.delivery is not None:
                    self.delivery.on_frame(link.peer.key, frame)
                return
            topic, items, plain = wire.decode_event_frame(frame)
        except wire.WireError as exc:
            stats["bad_frames"] += 1
            self.drop(exc.reason or BAD_FRAME, f"{link.peer.label}: {exc}")
            return
        limit = self.max_payload
        if limit and len(frame) > limit and any(
            len(item if type(item) is bytes else item.payload) > limit for item in items  # type: ignore[union-attr,arg-type]
        ):  # (a frame no larger than the bound holds no payload larger: the common case costs one len)
            self.drop(TOO_LARGE, f"{link.peer.label}: event on {topic[:80]!r}")
            return
        if not plain:
            # Properties are delivered to MQTT 5 clients as they are: a client's rules. One
            # bad item refuses its frame (a sender that makes one makes them all).
            check = inbound.check_properties
            try:
                for index, item in enumerate(items):
                    if type(item) is not bytes and item.properties:  # type: ignore[union-attr]
                        items[index] = item._replace(properties=check(item.properties))  # type: ignore[union-attr]
            except inbound.Refused as exc:
                self.drop(exc.reason, f"{link.peer.label}: event on {topic[:80]!r}: {exc}")
                return
        stats["messages_in"] += len(items)
        self.on_event(link.peer, topic, items, plain)

    def send_stream(self, frame: bytes, count: int) -> bool:
        """A stream frame of ``count`` messages on the PUB (the interim: addressed by its
        0xFF + key prefix)."""
        if self.pub is None:
            return False
        try:
            self._pub_send(frame, NOBLOCK)
        except zmq.ZMQError:
            return False
        stats = self.stats
        stats["frames_out"] += 1
        stats["messages_out"] += count
        stats["bytes_out"] += len(frame)
        return True

    def send_delivery(self, key: str, data: bytes) -> bool:
        """A delivery control message on our DEALER to member ``key``'s ROUTER."""
        link = self.links.get(key)
        if link is None or link.peer.state not in MEMBER_STATES:
            return False
        if self._send_now(link.dealer, data):
            return True
        ident = self._idents.get(key)
        if ident is None or self.router is None:
            return False
        try:  # the answer path: our ROUTER to its DEALER (IMMEDIATE refused the DEALER)
            self._router_send([ident, data], NOBLOCK)
            return True
        except zmq.ZMQError:
            return False
        finally:
            rearm(self.router)  # the ROUTER's reader awaits recv_multipart (see rearm)

    def congested(self) -> bool:
        """Replaced by the node: True while a local subscriber is far behind."""
        return False


def _local_addresses(listen_host: str) -> set[str]:
    from zmesh.mesh.discovery import netif

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


