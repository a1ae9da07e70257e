"""The node: wires the mesh, the local router, the retained cache and the MQTT listener.

``Node`` is both the daemon behind ``zmesh node run`` and the embedding API::

    async with Node(name="a", cert="certs/a.key_secret", peers=["127.0.0.1:7102"]) as node:
        await node.publish("alerts/disk", b"95%")
        async for msg in node.subscribe("alerts/#"):
            print(msg.topic, msg.payload, msg.origin)

One message, published here: validated, stored if retained, delivered to local subscribers,
and queued once on the PUB socket (batched per topic). One message from a peer: re-checked
against the exact filters, stored if retained, delivered to local subscribers, and never
sent on to the mesh again (every node hears every other directly), so nothing loops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple, cast

from zmesh import topics, wire
from zmesh.auth.authority import Authority
from zmesh.certs import KeyRing, load_secret_certificate
from zmesh.config import NodeConfig, load_config, parse_hostport
from zmesh.jobbridge import JobBridge, is_local_only, worker_queue
from zmesh.jobqueue import SHARED_PREFIX, JobBatch, JobHandle, JobService, WorkQueue
from zmesh.membership import EventKind, Peer, PeerEvent
from zmesh.mesh import Mesh
from zmesh.meshpolicy import MeshPolicy, TopicGate
from zmesh.replica import RetainedReplica
from zmesh.routing import LocalRouter, Subscriber
from zmesh.shared import SharedGroups
from zmesh.transport import Identity, Transport

log = logging.getLogger("zmesh.node")

SYS_PREFIX = "$SYS/"  # node-local topics: never sent to, nor accepted from, the mesh
SYS_PEERS = "$SYS/zmesh/peers"
SYS_TOPICS = "$SYS/zmesh/topics"
SYS_NODE = "$SYS/zmesh/node"
SYS_JOBS = "$SYS/zmesh/jobs"
TOPIC_CACHE_LIMIT = 100_000
# A publisher awaiting publish() in a tight loop never suspends; yielding this often keeps
# the node's own tasks (heartbeats, readers, MQTT clients) running beside it.
YIELD_EVERY = 256


def _check_queue(queue: str) -> None:
    if not queue or queue.startswith(SHARED_PREFIX):
        raise ValueError(f"invalid queue name {queue!r}: empty, or a shared subscription's")


class Message(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    retain: bool
    origin: str  # name of the node it was published on
    properties: dict[str, Any] | None = None


class Subscription:
    """A live subscription of the Python API: an async iterator of ``Message``.

    Messages wait in a bounded buffer; when the consumer falls ``maxsize`` behind, new
    messages are dropped and counted in ``dropped`` (as Mosquitto does for a full queue),
    so a stalled consumer cannot exhaust the node's memory.
    """

    def __init__(self, node: Node, filt: str, qos: int, maxsize: int) -> None:
        self.node, self.filter, self.qos, self.maxsize = node, filt, qos, maxsize
        self.dropped = 0
        # Past `_high` buffered messages the node's mesh readers slow down (mesh.CONGESTION_DELAY
        # between bursts) until the consumer is back under `_low`: a burst waits in ZeroMQ's
        # queue instead of being dropped.
        self._high, self._low = maxsize // 2, maxsize // 4
        self._behind = False
        self._buffer: deque[Message] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        # Shared-subscription messages in the buffer (by id of the Message) -> what to call
        # when the consumer takes one: that is its acknowledgement (zmesh.shared).
        self._on_taken: dict[int, Callable[[bool], None]] = {}

    def deliver_shared(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        properties: dict[str, Any] | None,
        origin: str,
        settle: Callable[[bool], None],
    ) -> bool:
        """A message of a shared subscription: ``settle(True)`` once the consumer has taken
        it. False (not taken) when the buffer is full or closed: another member gets it."""
        if self._closed or len(self._buffer) >= self.maxsize:
            return False
        message = tuple.__new__(Message, (topic, payload, qos, False, origin, properties))
        self._on_taken[id(message)] = settle
        self._buffer.append(message)
        self._wake()
        return True

    @property
    def shared_credit(self) -> int:
        """Shared-subscription messages this subscription may hold untaken (zmesh.shared)."""
        return self.maxsize

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def deliver(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        origin: str,
        properties: dict[str, Any] | None,
    ) -> None:
        if len(self._buffer) >= self.maxsize:
            self.dropped += 1
            return
        self._buffer.append(tuple.__new__(Message, (topic, payload, qos, retain, origin, properties)))
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def deliver_plain(self, topic: str, payloads: list[bytes], origin: str) -> None:
        room = self.maxsize - len(self._buffer)
        if room < len(payloads):
            self.dropped += len(payloads) - max(room, 0)
            payloads = payloads[: max(room, 0)]
        new = tuple.__new__  # Message(...) costs a Python-level __new__ per message
        self._buffer.extend([new(Message, (topic, p, 0, False, origin, None)) for p in payloads])
        if len(self._buffer) > self._high and not self._behind:
            self._behind = True
            self.node._behind.add(self)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if self._behind and len(self._buffer) < self._low:
            self._behind = False
            self.node._caught_up(self)
        message = self._buffer.popleft()
        if self._on_taken:
            settle = self._on_taken.pop(id(message), None)
            if settle is not None:
                settle(True)
        return message

    async def get(self, timeout: float | None = None) -> Message:
        """The next message, waiting at most ``timeout`` seconds (TimeoutError)."""
        return await asyncio.wait_for(self.__anext__(), timeout)

    def close(self) -> None:
        if self._behind:
            self._behind = False
            self.node._caught_up(self)
        if not self._closed:
            self._closed = True
            self.node._unsubscribe_all(self)
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Node:
    """One zmesh node. Use as ``async with Node(...) as node``."""

    def __init__(
        self,
        config: NodeConfig | None = None,
        *,
        config_file: str | Path | None = None,
        name: str | None = None,
        cert: str | Path | None = None,
        trusted: str | Path | None = None,
        listen: str | None = None,
        peers: list[str] | tuple[str, ...] | None = None,
        mqtt: str | None | bool = True,
        data_dir: str | Path | None = None,
    ) -> None:
        if config is None:
            overrides: dict[str, Any] = {}
            for key, value in (
                ("node.name", name),
                ("mesh.cert", cert),
                ("mesh.trusted", trusted),
                ("mesh.listen", listen),
                ("node.data_dir", data_dir),
            ):
                if value is not None:
                    overrides[key] = str(value)
            if peers is not None:
                overrides["mesh.peers"] = list(peers)
            if mqtt is not True:
                overrides["mqtt.listen"] = mqtt or ""
            config = load_config(Path(config_file) if config_file else None, overrides)
        self.config = config
        self.name = config.name
        # Users and ACLs of the MQTT listener; a broken password or ACL file raises here
        # (AuthFileError naming file:line), before anything is bound. No files: allow all.
        self.auth = Authority.from_config(config.mqtt)
        self.router = LocalRouter()
        self.replica = RetainedReplica(
            config.name, config.retained, config.store, config.data_dir, self._deliver_local
        )
        self.started_at = 0.0
        self.stats = {"delivered_from_mesh": 0, "bad_topics": 0, "policy_denied": 0}
        self.mesh_policy = MeshPolicy(config.mesh.policy)
        # peer key -> its gate (None: unrestricted); filled on first use, reset when trust reloads
        self._gates: dict[str, TopicGate | None] = {}
        self._topic_bytes: dict[str, bytes] = {}  # validated topic -> wire form (b"": local only)
        self._publish_calls = 0
        self._done: asyncio.Future[None] | None = None
        self._sys_subscribers: set[Subscriber] = set()
        self.transport: Transport | None = None
        self.mesh: Mesh | None = None
        self.mqtt_server: Any = None
        self.discovery: list[Any] = []
        self.jobs = JobService(self, config.jobs.lease, config.jobs.max_attempts)
        self.job_bridge = JobBridge(self)
        self.shared = SharedGroups(self)  # $share/GROUP/FILTER, mesh-wide (zmesh.shared)
        self._closed = asyncio.Event()
        self._peer_change = asyncio.Event()  # replaced (after being set) on every peer event
        self._behind: set[Subscription] = set()  # API subscriptions more than half full
        # True while a live message published with the retain flag is handed to local
        # subscribers (see _deliver_retained_live).
        self.delivering_retained = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        mesh_config = self.config.mesh
        if mesh_config.cert is None:
            raise ValueError(
                f"{self.config.source}: mesh.cert: a node needs its secret certificate "
                "(make one with: zmesh certs create NAME)"
            )
        public, secret = load_secret_certificate(mesh_config.cert)
        trusted_dir = mesh_config.trusted or mesh_config.cert.parent
        ring = KeyRing.from_directory(trusted_dir)
        await self.replica.open()
        self.transport = Transport(Identity(public, secret), ring)
        self.mesh = Mesh(
            name=self.name,
            transport=self.transport,
            listen=mesh_config.listen,
            heartbeat_interval=mesh_config.heartbeat_interval,
            peer_expiry=mesh_config.peer_expiry,
            peer_evasive=mesh_config.peer_evasive,
            advertise_host=mesh_config.advertise_host,
            on_event=self._on_mesh_event,
            on_peer=self._on_peer,
            replica=self.replica,
            congested=lambda: bool(self._behind),
            anti_entropy_interval=self.config.retained.anti_entropy_interval,
        )
        if self.mesh_policy:
            self.mesh.may_publish = self.peer_may_publish
        try:
            await self.mesh.start()
            for seed in mesh_config.peers:
                host, port = parse_hostport(seed)
                self.mesh.add_seed(host, port)
            await self._start_discovery(public.decode())
            await self.jobs.start(public.decode(), self.config.data_dir)
            if self.config.mqtt.all_listeners:
                from zmesh.mqtt.server import MQTTServer

                self.mqtt_server = MQTTServer(self, self.config.mqtt)
                await self.mqtt_server.start()
        except BaseException:
            await self.stop()
            raise
        self.started_at = time.time()
        log.info(
            "node %s up: key %s, %d trusted keys, mqtt %s",
            self.name,
            public.decode(),
            len(ring),
            "{}:{}".format(*self.mqtt_address) if self.mqtt_address else "off",
        )

    async def _start_discovery(self, key: str) -> None:
        assert self.mesh is not None
        settings = self.config.discovery
        if "mdns" in settings.mode:
            from zmesh.discovery import netif
            from zmesh.discovery.mdns import MdnsDiscovery

            listen_host = parse_hostport(self.config.mesh.listen)[0]
            interface = settings.interface or netif.interface_of(listen_host) or netif.default_route_interface()
            network = netif.interface_network(interface) if interface else None
            if network is None:
                raise ValueError(
                    f"{self.config.source}: discovery.interface: mDNS needs an interface with an "
                    f"IPv4 address; {interface or 'none found'} has none (set --interface)"
                )
            mdns = MdnsDiscovery(self.name, key, self.mesh.control_port, network, wire.WIRE_VERSION, self.mesh)
            await mdns.start()
            self.discovery.append(mdns)
        if "dns" in settings.mode:
            from zmesh.discovery.dns import DnsDiscovery

            assert settings.dns_name is not None  # config guarantees it
            port = settings.dns_port or self.mesh.control_port
            dns = DnsDiscovery(settings.dns_name, port, settings.dns_interval, self.mesh)
            await dns.start()
            self.discovery.append(dns)

    async def stop(self) -> None:
        await self.jobs.stop()
        if self.mqtt_server is not None:
            await self.mqtt_server.stop()
            self.mqtt_server = None
        if self.mesh is not None:
            await self.mesh.stop()
            self.mesh = None
        # Goodbyes last: once they are out, no welcome of ours can revive us in a peer's view.
        for provider in reversed(self.discovery):
            await provider.stop()
        self.discovery.clear()
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        await self.replica.close()
        self._closed.set()

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def mqtt_address(self) -> tuple[str, int] | None:
        return self.mqtt_server.address if self.mqtt_server is not None else None

    @property
    def control_port(self) -> int:
        assert self.mesh is not None
        return self.mesh.control_port

    def reload_trust(self) -> tuple[set[str], set[str]]:
        """Re-read the trusted-key directory; peers whose keys were removed are cut off."""
        assert self.transport is not None and self.mesh is not None
        ring = self.transport.ring
        before = set(ring.keys())
        added, removed = ring.reload()  # validates everything first; raises and keeps the old ring
        self._gates.clear()  # names may now belong to other keys
        revoked = before - set(ring.keys())
        for key in revoked:
            self.mesh.drop_peer(key.decode())
        if revoked:
            self.mesh.rotate_event_socket()
        log.info("trusted keys reloaded: +%s -%s", sorted(added) or "none", sorted(removed) or "none")
        return added, removed

    # ------------------------------------------------------------------ publishing

    def _topic(self, topic: str) -> bytes:
        """The topic's wire form once validated; b"" for a node-local ($SYS) topic."""
        encoded = self._topic_bytes.get(topic)
        if encoded is None:
            topics.validate_topic_name(topic)
            local = topic.startswith(SYS_PREFIX) or is_local_only(topic)
            encoded = b"" if local else topic.encode()
            if len(self._topic_bytes) >= TOPIC_CACHE_LIMIT:
                self._topic_bytes.clear()
            self._topic_bytes[topic] = encoded
        return encoded

    def publish_nowait(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 0,
        retain: bool = False,
        properties: dict[str, Any] | None = None,
    ) -> asyncio.Future[None] | None:
        """Publish from this node: local subscribers now, peers on the next flush.

        Returns a future when the message is a retained write at QoS >= 1 that the store
        puts on disk before it may be acknowledged (``store.sync = "always"``), else None.
        Raises ``topics.TopicError`` for an invalid topic name."""
        encoded = self._topic_bytes.get(topic) or self._topic(topic)
        if type(payload) is not bytes:
            payload = payload.encode() if isinstance(payload, str) else bytes(payload)
        name = self.name
        if retain:
            self._deliver_retained_live(topic, payload, qos, name, properties)
        else:
            for subscriber, granted in self.router.targets(topic):
                subscriber.deliver(topic, payload, qos if qos < granted else granted, False, name, properties)
        mesh = self.mesh
        if not encoded and topic[:6] == "$jobs/":
            return self.job_bridge.on_publish(topic, payload)
        if self.shared.active and encoded:  # one member of each matching shared group
            self.shared.route(topic, payload, qos, properties)
        if retain:
            item, durable = self.replica.write_local(topic, payload, qos, properties)
            if mesh is not None and encoded:
                if item is not None:
                    mesh.publish_retained(encoded, item)
                else:  # not retained here (limits): still delivered live, as any publish
                    mesh.publish(encoded, wire.encode_item(payload, qos, False, 0, properties), len(payload))
            return durable
        if mesh is not None and encoded:
            if qos or properties:
                mesh.publish(encoded, wire.encode_item(payload, qos, False, 0, properties), len(payload))
            else:  # the bare form, without a call (see wire.encode_item)
                mesh.publish(encoded, payload, len(payload))
        return None

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 0,
        retain: bool = False,
        properties: dict[str, Any] | None = None,
    ) -> Awaitable[None]:
        """Publish a message to the mesh (and this node's own subscribers): ``await`` it.

        The work is done by the time this returns; what is awaited is a future that is
        already complete (no coroutine per message: a third of the cost of a publish), or,
        every ``YIELD_EVERY`` calls, a real yield to the event loop."""
        durable = self.publish_nowait(topic, payload, qos, retain, properties)
        if durable is not None:
            return durable
        self._publish_calls += 1
        if self._publish_calls >= YIELD_EVERY:
            self._publish_calls = 0
            return asyncio.sleep(0)
        done = self._done
        if done is None:
            done = self._done = asyncio.get_running_loop().create_future()
            done.set_result(None)
        return done

    def _deliver_local(
        self, topic: str, payload: bytes, qos: int, properties: dict[str, Any] | None, origin: str
    ) -> None:
        """Hand a message that arrived from the mesh (retained channel) to local subscribers."""
        if not len(self.router.trie):
            return  # nobody here yet (a late joiner's first sync): skip validation and matching
        if not self._topic_bytes.get(topic):
            try:
                if not self._topic(topic):
                    return  # $SYS is node-local
            except topics.TopicError:
                self.stats["bad_topics"] += 1
                return
        self._deliver_retained_live(topic, payload, qos, origin, properties)

    def _deliver_retained_live(
        self, topic: str, payload: bytes, qos: int, origin: str, properties: dict[str, Any] | None
    ) -> None:
        """A live message that was published with the retain flag: delivered with it clear
        (as MQTT asks of live messages), while ``delivering_retained`` tells subscribers
        that keep it (MQTT 5 retain as published) what it was."""
        self.delivering_retained = True
        try:
            for subscriber, granted in self.router.targets(topic):
                subscriber.deliver(topic, payload, qos if qos < granted else granted, False, origin, properties)
        finally:
            self.delivering_retained = False

    # ------------------------------------------------------------------ from the mesh

    def _on_mesh_event(self, peer: Peer, topic: str, items: list[bytes | wire.Item], plain: bool) -> None:
        encoded = self._topic_bytes.get(topic)
        if encoded is None:
            try:
                encoded = self._topic(topic)
            except topics.TopicError:
                self.stats["bad_topics"] += 1
                return
        if not encoded:
            return  # $SYS is node-local: a peer has no business sending it
        if self.mesh_policy and not self.peer_may_publish(peer, topic, len(items)):
            return
        targets = self.router.targets(topic)
        origin = peer.name
        self.stats["delivered_from_mesh"] += len(items)
        if plain:  # the common case under load: a batch of QoS 0 payloads, handed on whole
            for subscriber, _granted in targets:
                subscriber.deliver_plain(topic, items, origin)  # type: ignore[arg-type]
            return
        for item in items:
            if type(item) is bytes:
                for subscriber, _granted in targets:
                    subscriber.deliver(topic, item, 0, False, origin, None)
                continue
            payload, qos, _retain, _timestamp, properties = cast(wire.Item, item)
            for subscriber, granted in targets:
                subscriber.deliver(topic, payload, qos if qos < granted else granted, False, origin, properties)

    def peer_may_publish(self, peer: Peer, topic: str, count: int = 1) -> bool:
        """The mesh policy's verdict on ``peer`` publishing to ``topic`` (see meshpolicy)."""
        gate = self._gates.get(peer.key, False)
        if gate is False:
            ring = self.transport.ring if self.transport is not None else None
            name = ring.name_of(peer.key.encode()) if ring is not None else None
            gate = self._gates[peer.key] = self.mesh_policy.gate_for(name, peer.key)
        if gate is None or gate.allows(topic):
            return True
        self.stats["policy_denied"] += count
        if self.mesh is not None:
            self.mesh._warn_once(
                f"policy:{peer.key}",  # once per peer: a hostile one could vary topics forever
                "mesh policy: %s may not publish to %s; dropped", peer.label, topic,
            )
        return False

    def _caught_up(self, subscription: Subscription) -> None:
        self._behind.discard(subscription)

    def _on_peer(self, event: PeerEvent) -> None:
        if event.kind in (EventKind.DOWN, EventKind.RESTARTED):
            self.jobs.peer_gone(event.peer.key)
        self._refresh_sys(SYS_PEERS)
        changed, self._peer_change = self._peer_change, asyncio.Event()
        changed.set()

    # ------------------------------------------------------------------ work queues

    async def submit(self, queue: str, payload: bytes | str, job_id: str | None = None) -> JobHandle:
        """Submit a job to ``queue``: done once by one worker somewhere in the mesh.

        ``await handle.result()`` gives the worker's result (JobFailed if it ended in the
        dead letters, ``$jobs/dead/<queue>``). A repeated ``job_id`` is the same job."""
        _check_queue(queue)
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        return await self.jobs.submit(queue, data, job_id)

    async def submit_many(
        self, queue: str, payloads: Iterable[bytes], job_ids: Iterable[str] | None = None
    ) -> JobBatch:
        """Submit many jobs at once (one spool write, one dispatch, no future per job):
        ``batch = await node.submit_many(q, payloads)``, then ``await batch.results()``."""
        _check_queue(queue)
        return await self.jobs.submit_many(queue, payloads, job_ids)

    def work(self, queue: str, prefetch: int = 1) -> WorkQueue:
        """Serve ``queue`` on this node: ``async for job in node.work(q): ... await job.ack()``.
        At most ``prefetch`` jobs are held here at once."""
        _check_queue(queue)
        return self.jobs.work(queue, prefetch)

    # ------------------------------------------------------------------ subscribing

    def subscribe(self, filt: str, qos: int = 0, maxsize: int = 65_536) -> Subscription:
        """Subscribe to an MQTT filter; retained messages that match arrive first."""
        subscription = Subscription(self, filt, qos, maxsize)
        self.add_subscription(subscription, filt, qos)
        return subscription

    def add_subscription(self, subscriber: Subscriber, filt: str, qos: int, retained: bool = True) -> None:
        """Register ``subscriber`` for ``filt`` and replay matching retained messages to it
        (not with ``retained=False``: MQTT 5 retain handling). A replayed message carries
        what is left of its MQTT 5 message expiry interval.

        Raises ``topics.TopicError`` for an invalid filter."""
        topics.validate_topic_filter(filt)
        group, inner = topics.parse_shared(filt)
        if group is not None:
            # One member of the group gets each message, mesh-wide (zmesh.shared); not the
            # router's business. MQTT 5: shared subscriptions get no retained messages.
            self.shared.add_member(subscriber, filt, qos)
            return
        self.router.subscribe(subscriber, filt, qos)
        self._update_mesh_subscriptions()
        job_queue = worker_queue(inner)
        if job_queue is not None:
            self.job_bridge.add_worker(subscriber, job_queue)
            return
        if retained:
            now_ms = int(time.time() * 1000)
            for entry in self.replica.match(inner):
                properties = entry.properties
                if entry.expires_at is not None and properties:
                    left = max(1, -((now_ms - entry.expires_at) // 1000))  # seconds, rounded up
                    properties = {**properties, "message_expiry_interval": left}
                subscriber.deliver(entry.topic, entry.payload, min(entry.qos, qos), True, entry.origin, properties)
        if inner.startswith(SYS_PREFIX) or inner.startswith("$SYS"):
            self._sys_subscribers.add(subscriber)
            for sys_topic in (SYS_NODE, SYS_PEERS, SYS_TOPICS, SYS_JOBS) if retained else ():
                if topics.matches(inner, sys_topic):
                    subscriber.deliver(sys_topic, self._sys_value(sys_topic), 0, True, self.name, None)

    def remove_subscription(self, subscriber: Subscriber, filt: str) -> bool:
        if filt.startswith(SHARED_PREFIX):
            return self.shared.remove_member(subscriber, filt)
        if worker_queue(filt) is not None:
            self.job_bridge.remove_worker(subscriber)
        removed = self.router.unsubscribe(subscriber, filt)
        self._update_mesh_subscriptions()
        return removed

    def _unsubscribe_all(self, subscriber: Subscriber) -> None:
        self.job_bridge.remove_worker(subscriber)
        self.shared.remove_subscriber(subscriber)
        self.router.remove(subscriber)
        self._update_mesh_subscriptions()
        self._sys_subscribers.discard(subscriber)

    remove_subscriber = _unsubscribe_all

    def _update_mesh_subscriptions(self) -> None:
        added, removed = self.router.take_prefix_changes()
        if self.mesh is not None and (added or removed):
            self.mesh.update_prefixes(added, removed)

    # ------------------------------------------------------------------ introspection

    def peers(self) -> list[dict[str, Any]]:
        """The peers this node knows, with their state (what ``zmesh peers`` prints)."""
        if self.mesh is None:
            return []
        now = time.monotonic()
        return [
            {
                "name": p.name,
                "key": p.key,
                "state": p.state.value,
                "address": f"{p.host}:{p.control_port}",
                "for_s": round(now - p.since, 1),
                "last_seen_s": round(now - p.last_seen, 1) if p.last_seen else None,
            }
            for p in self.mesh.peers()
        ]

    def retained_topics(self) -> list[dict[str, Any]]:
        return [
            {"topic": e.topic, "bytes": len(e.payload), "origin": e.origin}
            for e in sorted(self.replica.cache.live(), key=lambda e: e.topic)
        ]

    def _sys_value(self, sys_topic: str) -> bytes:
        value: Any
        if sys_topic == SYS_PEERS:
            value = self.peers()
        elif sys_topic == SYS_TOPICS:
            value = self.retained_topics()
        elif sys_topic == SYS_JOBS:
            value = self.jobs.stats()
        else:
            value = {
                "name": self.name,
                "key": self.transport.identity.public.decode() if self.transport else None,
                "uptime_s": round(time.time() - self.started_at, 1),
                "control_port": self.mesh.control_port if self.mesh else None,
                "stats": {**self.stats, **(self.mesh.stats if self.mesh else {})},
                "mqtt": {
                    "clients": len(self.mqtt_server.connections) if self.mqtt_server else 0,
                    "dropped_total": self.mqtt_server.dropped_total if self.mqtt_server else 0,
                    "protocol_errors_total": self.mqtt_server.protocol_errors_total if self.mqtt_server else 0,
                    **(self.mqtt_server.sessions.stats() if self.mqtt_server else {}),
                },
                "retained": {
                    "entries": len(self.replica.cache),
                    "bytes": self.replica.cache.live_bytes,
                    "refused_total": self.replica.refused_total,
                    "store_errors_total": self.replica.store_errors_total,
                    "durable": self.replica.store is not None,
                },
            }
        return json.dumps(value).encode()

    def _refresh_sys(self, sys_topic: str) -> None:
        """Push a changed ``$SYS`` value to the local subscribers that asked for it."""
        if not self._sys_subscribers:
            return
        payload = self._sys_value(sys_topic)
        for subscriber, _granted in self.router.targets(sys_topic):
            subscriber.deliver(sys_topic, payload, 0, False, self.name, None)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def wait_for_peers(self, count: int, timeout: float = 10.0) -> None:
        """Wait until at least ``count`` peers are up (TimeoutError after ``timeout``)."""
        async with asyncio.timeout(timeout):
            while self.mesh is None or len(self.mesh.membership.up()) < count:
                await self._peer_change.wait()

