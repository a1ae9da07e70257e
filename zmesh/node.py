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
from collections.abc import AsyncIterator, Awaitable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, cast

from zmesh import topics
from zmesh.config import (
    COMMAND_LINE,
    NodeConfig,
    load_config,
    mesh_max_message_size,
    parse_hostport,
    parse_seed,
)
from zmesh.drops import Drops
from zmesh.health import INTERVAL as LAG_INTERVAL
from zmesh.health import LoopLag
from zmesh.jobs.bridge import JobBridge, is_local_only, worker_queue
from zmesh.jobs.service import SHARED_PREFIX, JobBatch, JobHandle, JobService, WorkQueue
from zmesh.jobs.shared import SharedGroups
from zmesh.mesh import inbound, wire
from zmesh.mesh.admission import Admission
from zmesh.mesh.delivery import Delivery, DeliverySettings
from zmesh.mesh.flow import DeliveryRefused, FlowConfig  # noqa: F401 - DeliveryRefused: for embedders
from zmesh.mesh.membership import EventKind, Peer, PeerEvent
from zmesh.mesh.mesh import Mesh
from zmesh.mesh.outbox import OutboxConfig
from zmesh.mesh.policy import MeshPolicy, TopicGate
from zmesh.mesh.streams import Gap, StreamConfig
from zmesh.mesh.streamwire import StreamEntry
from zmesh.mesh.transport import Identity, Transport
from zmesh.ops.latency import DeliveryLatency
from zmesh.ops.status import NodeStatus
from zmesh.retained.lastvalue import RetainedEntry
from zmesh.retained.replay import Replays, TopicsDump
from zmesh.retained.replica import RetainedReplica
from zmesh.routing import LocalRouter, Subscriber
from zmesh.security.authority import Authority
from zmesh.security.certs import KeyRing, load_secret_certificate
from zmesh.security.keys import load_key_file
from zmesh.security.secretfile import ensure_private_dir
from zmesh.subscription import Subscription

log = logging.getLogger("zmesh.node")

SYS_PREFIX = "$SYS/"  # node-local topics: never sent to, nor accepted from, the mesh
SYS_PEERS = "$SYS/zmesh/peers"
SYS_TOPICS = "$SYS/zmesh/topics"
SYS_NODE = "$SYS/zmesh/node"
SYS_JOBS = "$SYS/zmesh/jobs"
SYS_GAPS = "$SYS/zmesh/delivery/gaps"  # one JSON message per gap (docs/delivery.md §8)
GAPS_QUEUE = 1024  # Node.gaps(): gaps held for an embedder; past it counted as unreported
TOPIC_CACHE_LIMIT = 100_000
# A publisher awaiting publish() in a tight loop never suspends; yielding this often keeps
# the node's own tasks (heartbeats, readers, MQTT clients) running beside it.
YIELD_EVERY = 256


REVOCATIONS_TOPIC = "$zmesh/revocations"  # a signed revocation list, retained (docs/identity.md)


class _RevocationListener:
    """The node's own subscriber to REVOCATIONS_TOPIC: a newer signed list takes effect at
    once on live links."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def deliver(self, topic: str, payload: bytes, qos: int, retain: bool, origin: str,
                properties: dict[str, Any] | None) -> None:
        self.node._on_revocations(payload, origin)

    def deliver_plain(self, topic: str, payloads: list[bytes], origin: str) -> None:
        for payload in payloads:
            self.node._on_revocations(payload, origin)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _behind(window: Any, backlog: int) -> bool:
    """An MQTT session's outbound queue past ``backlog`` messages (delivery.session_backlog)
    or more than half full (by count or bytes). The backlog mark is what bounds latency
    when a subscriber is slower than its publishers: half of max_queued (5,000 messages)
    was ~0.8 s of queue at a paho subscriber's pace before its origins were slowed."""
    queued = len(window.queue)
    return queued > backlog or bool(window.max_queued and queued * 2 > window.max_queued) or bool(
        window.max_queued_bytes and window.queued_bytes * 2 > window.max_queued_bytes)


def _check_queue(queue: str) -> None:
    if not queue or queue.startswith(SHARED_PREFIX):
        raise ValueError(f"invalid queue name {queue!r}: empty, or a shared subscription's")


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
        # What this node refused from clients, peers and files, by reason, with rate-limited
        # log lines (zmesh.drops); given to every service that refuses input.
        self.drops = Drops(log)
        self.replica = RetainedReplica(
            config.name, config.retained, config.store, config.data_dir, self._deliver_local, self.drops.drop
        )
        # Large retained answers in slices, not in one loop turn (zmesh.retained.replay).
        self.replays = Replays(self.replica.cache)
        self.topics_dump = TopicsDump(self.replica.cache)
        self.started_at = 0.0
        self.stats = {"delivered_from_mesh": 0, "bad_topics": 0, "policy_denied": 0}
        self.loop_lag = LoopLag()  # event-loop responsiveness (zmesh.health)
        self.admission: Admission | None = None  # certificate mode (mesh.authority)
        self._credentials: Any = None  # zmesh.mesh.credentials.Credentials in certificate mode
        self._renew_task: asyncio.Task[None] | None = None
        self._lag_task: asyncio.Task[None] | None = None
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
        # With a data_dir: persistent MQTT sessions on disk (zmesh.mqtt.sessionstore), and the
        # receiver's stream positions kept with them (origin key -> (epoch, delivered), read
        # at start for the delivery wiring; written by session_persistence.set_position).
        self.session_persistence: Any = None
        self.stream_positions: dict[str, tuple[int, int]] = {}
        self.discovery: list[Any] = []
        self.jobs = JobService(self, config.jobs.lease, config.jobs.max_attempts, self.drops.drop)
        self.job_bridge = JobBridge(self.jobs, self, config.name, self.drops.drop)
        self.jobs.on_recovered = self.job_bridge.watch
        # $share/GROUP/FILTER, mesh-wide (zmesh.jobs.shared)
        self.shared = SharedGroups(self.jobs, config.mqtt.max_inflight, self._origin)
        self._closed = asyncio.Event()
        self._peer_change = asyncio.Event()  # replaced (after being set) on every peer event
        self._behind: set[Subscription] = set()  # API subscriptions more than half full
        # True while a live message published with the retain flag is handed to local
        # subscribers (see _deliver_retained_live).
        self.delivering_retained = False
        # Probes and metrics ([http] listen, zmesh.ops): they get self.status, nothing else.
        self.ops: Any = None
        self.latency = DeliveryLatency()
        self.draining = False
        self.delivery: Delivery | None = None  # reliable QoS >= 1 across nodes (issue 17)
        self._gaps: asyncio.Queue[Gap] | None = None  # made by the first gaps() call
        self.gaps_unreported = 0
        # MQTT sessions whose queue is above half its bound: while one is (online, for less
        # than delivery.block_max), stream input waits instead of filling it (docs/delivery.md §7).
        self._sessions_behind: dict[Any, float] = {}
        self._sessions_stuck: set[Any] = set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        mesh_config = self.config.mesh
        admission: Admission | None = None
        if mesh_config.authority is not None:
            from zmesh.mesh.credentials import Credentials

            self._credentials = Credentials(self.config)
            public, secret = self._credentials.public, self._credentials.secret
            ring, admission = self._credentials.ring, self._credentials.admission
        else:
            if mesh_config.cert is None:
                raise ValueError(
                    f"{self.config.source}: mesh.cert: a node needs its secret certificate "
                    "(make one with: zmesh certs create NAME)"
                )
            public, secret = load_secret_certificate(mesh_config.cert)
            trusted_dir = mesh_config.trusted or mesh_config.cert.parent
            ring = KeyRing.from_directory(trusted_dir)
        seeds = _checked_seeds(self.config, ring, public, admission is not None)
        self.admission = admission
        if self.config.data_dir is not None:
            ensure_private_dir(self.config.data_dir, log=log)  # 0700 before any file is in it
        await self.replica.open()
        self.transport = Transport(
            Identity(public, secret), ring, admission=admission is not None,
            max_message_size=mesh_max_message_size(self.config),
        )
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
            admission=admission,
            identity_port=mesh_config.identity_port,
            events_port=mesh_config.events_port,
            jobs_port=mesh_config.jobs_port,
            drop=self.drops.drop,
            sync_requests_per_second=self.config.retained.sync_requests_per_second,
            sync_bytes_per_second=self.config.retained.sync_bytes_per_second,
            max_payload=self.config.mqtt.max_packet_size,
        )
        if self.mesh_policy:
            self.mesh.may_publish = self.peer_may_publish
        try:
            # With a data_dir: sessions.db holds the persistent sessions, the receiver's
            # stream positions and the origin's outbox, all committed together per turn.
            stored = await self._open_session_store()
            self.delivery = self._make_delivery(self.mesh, public.decode())
            self.mesh.delivery = self.delivery
            self.delivery.start()
            await self._restore_outbox()
            self.delivery.set_interest(self.router.mesh_prefixes(), set())
            # A restarted subscriber node resumes each origin's stream where its sessions'
            # queues (committed with the positions) left it: nothing lost, nothing twice.
            self.delivery.restore_positions(self.stream_positions)
            if self.config.mqtt.all_listeners:
                from zmesh.mqtt.server import MQTTServer

                self.mqtt_server = MQTTServer(
                    self, self.config.mqtt, self.auth, self.config.source, self.drops,
                    self.session_persistence, stored,
                )
                # Persistent sessions are back in the router before the mesh starts, so the
                # first interest this node declares to its peers already holds what its
                # offline sessions wait for (else an origin would stop sending it).
                self.mqtt_server.restore_sessions()
            await self.mesh.start()
            for key, host, port in seeds:
                self.mesh.add_seed(host, port, key)  # with its key: one dial, not one per trusted key
            await self._start_discovery(public.decode())
            await self.jobs.start(self.mesh, public.decode(), self.config.data_dir, *self._store_keys())
            if self._credentials is not None:
                self._renew_task = asyncio.create_task(self._credentials.renew_forever(), name="certificate-renewal")
            if admission is not None:
                # Revocation lists travel as a retained message: the latest reaches every node,
                # late joiners included, and each node checks its signature before using it.
                self.add_subscription(_RevocationListener(self), REVOCATIONS_TOPIC, 1)
            if self.mqtt_server is not None:
                await self.mqtt_server.start()
            if self.config.http.listen:
                # Last: /healthz answering means everything above is up (the startup probe).
                from zmesh.ops.http import OpsServer

                self.ops = OpsServer(self.config.http.listen, self.status)
                await self.ops.start()
        except BaseException:
            await self.stop()
            raise
        self.started_at = time.time()
        # From here on: start-up's one-off work (opening the store, binding) is not a stall
        # that a client or peer caused.
        self._lag_task = asyncio.create_task(self._watch_loop(), name="loop-lag")
        log.info(
            "node %s up: key %s, %s, mqtt %s",
            self.name,
            public.decode(),
            "members admitted by certificate" if admission is not None else f"{len(ring)} trusted keys",
            "{}:{}".format(*self.mqtt_address) if self.mqtt_address else "off",
        )

    async def _open_session_store(self) -> list[Any]:
        """With a data_dir: open ``sessions.db`` and read what it holds (in a thread: at
        start only); a file in use by another node raises SessionStoreError naming it."""
        if self.config.data_dir is None:
            return []
        from zmesh.mqtt.sessionstore import FILE_NAME, Limits, SessionDisk, SessionPersistence

        mqtt = self.config.mqtt
        limits = Limits(mqtt.max_sessions, mqtt.max_subscriptions, 65535 + mqtt.max_queued, mqtt.max_packet_size)
        disk = await asyncio.to_thread(SessionDisk, self.config.data_dir / FILE_NAME, limits)
        try:
            stored = await asyncio.to_thread(disk.load)
            self.stream_positions = await asyncio.to_thread(disk.load_positions)
        except BaseException:
            disk.close()
            raise
        self.session_persistence = SessionPersistence(disk, asyncio.get_running_loop().call_soon)
        return stored

    async def _restore_outbox(self) -> None:
        """A restarted origin's outbox, as committed: the same epochs and numbers, so its
        receivers get every message they had not acknowledged, once, in order (docs/delivery.md §9)."""
        persistence, delivery = self.session_persistence, self.delivery
        if persistence is None or delivery is None:
            return
        outbox = delivery.outbox
        config = outbox.config
        from zmesh.mesh.outbox import ENTRY_OVERHEAD

        stored = await asyncio.to_thread(persistence.disk.load_outbox, config.max_bytes // ENTRY_OVERHEAD + 1,
                                         config.max_destinations)
        delivery.restore_interest(stored.interest)
        if not stored.streams and not stored.entries:
            return
        now, now_ms = time.monotonic(), time.time_ns() // 1_000_000
        try:  # into a scratch outbox first: a refused store must leave the real one empty
            type(outbox)(config, lambda: 1).restore(stored.streams, stored.entries, now, now_ms,
                                                   stored.released_until_ms)
        except ValueError as exc:
            log.error("%s: the stored outbox was refused and is discarded (receivers will report what it "
                      "held as lost): %s", persistence.disk.path, exc)
            await asyncio.to_thread(persistence.disk.clear_outbox)
            return
        outbox.restore(stored.streams, stored.entries, now, now_ms, stored.released_until_ms)
        for dest in list(outbox.streams):
            outbox.attach(dest, False)  # until the peer is up (Delivery.peer_up): not before
        held = sum(len(s.entries) for s in outbox.streams.values())
        log.info("%s: outbox restored: %d messages unacknowledged for %d destinations",
                 persistence.disk.path, held, len(outbox.streams))

    def _make_delivery(self, mesh: Mesh, own_key: str) -> Delivery:
        d = self.config.delivery
        settings = DeliverySettings(
            outbox=OutboxConfig(max_bytes=d.outbox_max_bytes, max_age=d.outbox_max_age,
                                backfill_window=d.backfill_window,
                                backfill_max_bytes=d.backfill_max_bytes, window=d.window, window_bytes=d.window_bytes),
            streams=StreamConfig(max_buffered=d.reorder_buffer, max_buffered_bytes=d.reorder_buffer_bytes,
                                 give_up=d.give_up),
            flow=FlowConfig(policy=d.policy, block_max=d.block_max),
            stop_timeout=d.stop_timeout,
            interest_repeat=self.config.mesh.heartbeat_interval,
        )
        def send_control(key: str, data: bytes) -> None:
            # With persistent sessions, an acknowledgement leaves only once what it
            # acknowledges is on disk (the queue entries and the stream position, one
            # commit): acked before and lost in a crash, the origin would let it go.
            persistence = self.session_persistence
            if persistence is not None and persistence.pending:
                persistence.when_committed(lambda: mesh.send_delivery(key, data))
            else:
                mesh.send_delivery(key, data)

        persistence = self.session_persistence
        return Delivery(
            own_key, settings, mesh.send_stream, send_control, self._on_stream, self._on_gaps,
            self.drops.drop, self._stream_congested, mesh._label,
            journal=persistence.outbox_journal() if persistence is not None else None,
        )

    def _store_keys(self) -> tuple[bytes | None, list[bytes]]:
        """The store's current and previous keys: the job spool seals with them too."""
        store = self.config.store
        if self.config.data_dir is None:
            return None, []
        key = load_key_file(store.key_file) if store.key_file else None
        return key, [load_key_file(p) for p in store.previous_key_files]

    async def _start_discovery(self, key: str) -> None:
        assert self.mesh is not None
        settings = self.config.discovery
        if "mdns" in settings.mode:
            from zmesh.mesh.discovery import netif
            from zmesh.mesh.discovery.mdns import MdnsDiscovery

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
            from zmesh.mesh.discovery.dns import DnsDiscovery

            assert settings.dns_name is not None  # config guarantees it
            port = settings.dns_port or self.mesh.control_port
            dns = DnsDiscovery(settings.dns_name, port, settings.dns_interval, self.mesh)
            await dns.start()
            self.discovery.append(dns)

    def _on_revocations(self, payload: bytes, origin: str) -> None:
        from zmesh.security.identity import IdentityError

        if self.admission is None or not payload:
            return
        try:
            newer = self.admission.offer_revocations(payload)
        except IdentityError as exc:
            self.drops.drop("bad_revocation_list", f"from {origin}: {exc.reason}")
            return
        if newer and self.mesh is not None:
            log.info("revocation list from %s taken: checking every member now", origin)
            self.mesh.check_lapsed_now()

    async def _watch_loop(self) -> None:
        # Sleeps LAG_INTERVAL again and again; waking up late means something held the loop.
        # The time the loop's thread waited for a CPU meanwhile is the machine's share of
        # the lateness, not a stall the node caused (zmesh.health).
        from zmesh.eventloop import RunQueueWait

        loop, waited = asyncio.get_running_loop(), RunQueueWait()
        try:
            while True:
                due, before = loop.time() + LAG_INTERVAL, waited.read()
                await asyncio.sleep(LAG_INTERVAL)
                now, after = loop.time(), waited.read()
                preempted = after - before if after is not None and before is not None else None
                self.loop_lag.observe(now - due, now, preempted)
        finally:
            waited.close()

    async def drain(self) -> None:
        """Leave in good order (SIGTERM): not ready at once, then ``stop``, whose order is
        the drain: job reports flushed, MQTT clients told (MQTT 5: server shutting down)
        and no new ones taken, outgoing messages flushed, peers told bye. The bye is what
        hands our leased jobs back: a submitter whose worker node leaves redelivers its
        jobs at once (``JobService.peer_gone``), not when their leases run out."""
        self.draining = True
        if self.mqtt_server is not None:
            self.mqtt_server.stop_accepting()
        log.info("draining: not ready, closing MQTT, handing back jobs, saying goodbye")
        await self.stop()

    async def stop(self) -> None:
        self.draining = True
        self.topics_dump.close()
        for task in (self._lag_task, self._renew_task):
            if task is not None:
                task.cancel()
        self._lag_task = self._renew_task = None
        await self.jobs.stop()
        if self.mqtt_server is not None:
            await self.mqtt_server.stop()
            self.mqtt_server = None
        if self.delivery is not None and self.mesh is not None and self.mesh.router is not None:
            # Stop flushes: what was published here at QoS >= 1 is acknowledged by the peers
            # that want it, within delivery.stop_timeout (docs/delivery.md §9).
            await self.delivery.stop()
        if self.session_persistence is not None:
            await asyncio.sleep(0)  # the closed connections' connection_lost (offline since now)
            # After the flush: what arrived for offline sessions meanwhile is committed too.
            self.session_persistence.close()  # the last changes committed
            self.session_persistence = None
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
        if self.ops is not None:  # last: probes answer (not ready) until the very end
            await self.ops.stop()
            self.ops = None
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

    def may_publish(self, topic: str, publisher: Subscriber) -> bool:
        """Broker.may_publish: the MQTT server asks before a client's publish to a ``$``
        topic. Only ``$jobs/`` has rules: the worker holding a job answers it."""
        return topic[:6] != "$jobs/" or self.job_bridge.may_publish(topic, publisher)

    def publish_nowait(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 0,
        retain: bool = False,
        properties: dict[str, Any] | None = None,
    ) -> asyncio.Future[None] | None:
        """Publish from this node: local subscribers now, peers on the next flush.

        Returns a future when the message may not be acknowledged yet: a retained write at
        QoS >= 1 that the store puts on disk first (``store.sync = "always"``), or a QoS >= 1
        publish held by delivery's flow control (``delivery.policy = "block"``: it completes
        when the outbox has room; it fails with DeliveryRefused past the gate's bounds).
        Else None.
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
            if qos:
                # Numbered, acknowledged and recovered across nodes (zmesh.mesh.delivery);
                # the future, when there is one, holds the PUBACK (flow control).
                held = self.delivery.publish(encoded, topic, payload, qos, properties)  # type: ignore[union-attr]
                persistence = self.session_persistence
                if held is None and persistence is not None and persistence.pending:
                    # With a data_dir the message is acknowledged once its outbox row is
                    # committed (this turn's commit). MQTT clients get that from the
                    # write-ahead rule; this future gives it to the Python API.
                    held = asyncio.get_running_loop().create_future()
                    persistence.when_committed(partial(_resolve, held))
                return held
            if properties:
                # Stamped with our wall clock (us): receivers time publish-to-delivery (zmesh.ops).
                stamp = time.time_ns() // 1_000
                mesh.publish(encoded, wire.encode_item(payload, qos, False, stamp, properties), len(payload))
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
            except topics.TopicError as exc:
                self.stats["bad_topics"] += 1
                self.drops.drop(inbound.BAD_TOPIC, f"{peer.label}: {exc}", len(items))
                return
        if not encoded:  # $SYS is node-local: a peer has no business sending it
            self.drops.drop(inbound.BAD_TOPIC, f"{peer.label}: node-local topic {topic[:80]!r}", len(items))
            return
        if self.mesh_policy and not self.peer_may_publish(peer, topic, len(items)):
            return
        targets = self.router.targets(topic)
        origin = peer.name
        self.stats["delivered_from_mesh"] += len(items)
        if plain:  # the common case under load: a batch of QoS 0 payloads, handed on whole
            for subscriber, _granted in targets:
                subscriber.deliver_plain(topic, items, origin)  # type: ignore[arg-type]
            return
        stamps = []
        for item in items:
            if type(item) is bytes:
                for subscriber, _granted in targets:
                    subscriber.deliver(topic, item, 0, False, origin, None)
                continue
            payload, qos, _retain, timestamp, properties = cast(wire.Item, item)
            stamps.append(timestamp)
            for subscriber, granted in targets:
                subscriber.deliver(topic, payload, qos if qos < granted else granted, False, origin, properties)
        self.latency.observe_stamps(stamps, time.time_ns() // 1_000)

    def _on_stream(self, key: str, entries: list[StreamEntry]) -> None:
        """Messages a peer's stream released, in its publish order, each once (the per-item
        half of _on_mesh_event)."""
        mesh = self.mesh
        peer = mesh.membership.peers.get(key) if mesh is not None else None
        if peer is None:
            self.drops.drop("delivery_unknown_origin", key[:8], len(entries))
            return
        origin = peer.name
        mesh.stats["messages_in"] += len(entries)  # type: ignore[union-attr]
        limit = self.config.mqtt.max_packet_size
        stamps = []
        behind = self._sessions_behind
        backlog = self.config.delivery.session_backlog
        for topic, payload, qos, timestamp, properties in entries:
            encoded = self._topic_bytes.get(topic)
            if not encoded:
                try:
                    encoded = self._topic(topic)
                except topics.TopicError as exc:
                    self.stats["bad_topics"] += 1
                    self.drops.drop(inbound.BAD_TOPIC, f"{peer.label}: {exc}")
                    continue
                if not encoded:
                    self.drops.drop(inbound.BAD_TOPIC, f"{peer.label}: node-local topic {topic[:80]!r}")
                    continue
            if limit and len(payload) > limit:
                self.drops.drop("mesh_too_large", f"{peer.label}: stream message on {topic[:80]!r}")
                continue
            if self.mesh_policy and not self.peer_may_publish(peer, topic):
                continue
            if properties:
                try:
                    properties = inbound.check_properties(properties)
                except inbound.Refused as exc:
                    self.drops.drop(exc.reason, f"{peer.label}: stream message on {topic[:80]!r}: {exc}")
                    continue
            stamps.append(timestamp * 1000)
            self.stats["delivered_from_mesh"] += 1
            for subscriber, granted in self.router.targets(topic):
                subscriber.deliver(topic, payload, qos if qos < granted else granted, False, origin, properties)
                window = getattr(subscriber, "window", None)
                if window is not None and subscriber not in behind and _behind(window, backlog):
                    behind[subscriber] = time.monotonic()
        persistence = self.session_persistence
        if persistence is not None and self.delivery is not None:
            # In the same commit as the queue entries just made (one per loop turn).
            position = self.delivery.position(key)
            if position is not None:
                persistence.set_position(key, *position)
        self.latency.observe_stamps(stamps, time.time_ns() // 1_000)

    def _stream_congested(self) -> bool:
        """True while a local consumer is behind: a Python subscription more than half full,
        or an online MQTT session with more than delivery.session_backlog messages queued or
        a queue more than half its bound (for at most
        delivery.block_max: a client stuck longer no longer holds the node's streams)."""
        if self._behind:
            return True
        behind = self._sessions_behind
        if not behind:
            return False
        now = time.monotonic()
        block_max, backlog = self.config.delivery.block_max, self.config.delivery.session_backlog
        # O(sessions behind): only those, only while some are.
        for session, since in list(behind.items()):
            if getattr(session, "conn", None) is None or not _behind(session.window, backlog):
                del behind[session]
                self._sessions_stuck.discard(session)
            elif now - since >= block_max:
                if session not in self._sessions_stuck:
                    self._sessions_stuck.add(session)
                    self.drops.drop("delivery_session_stuck", f"client {getattr(session, 'client_id', '?')}: "
                                    f"queue full for {block_max:g} s; no longer slowing the mesh for it")
        return len(behind) > len(self._sessions_stuck)

    def _on_gaps(self, gaps: list[Gap]) -> None:
        """Gaps are never silent (docs/delivery.md §8): counted (Delivery), logged, on
        $SYS/zmesh/delivery/gaps, and in the gaps() queue."""
        mesh = self.mesh
        for gap in gaps:
            peer = mesh.membership.peers.get(gap.origin) if mesh is not None else None
            name = peer.name if peer is not None else gap.origin[:8]
            what = f"{gap.count} messages" if gap.count is not None else "an unknown number of messages"
            self.drops.drop("delivery_gap", f"from {name}: {what} ({gap.reason}, {gap.first}..{gap.last})",
                            gap.count or 1)
            if self._gaps is not None:
                try:
                    self._gaps.put_nowait(gap)
                except asyncio.QueueFull:
                    self.gaps_unreported += 1
            if self.router.targets(SYS_GAPS):
                payload = json.dumps({
                    "origin": name, "origin_key": gap.origin, "epoch": gap.epoch, "first": gap.first,
                    "last": gap.last, "count": gap.count, "reason": gap.reason,
                    "since_ms": gap.since_ms, "until_ms": gap.until_ms,
                }).encode()
                for subscriber, _granted in self.router.targets(SYS_GAPS):
                    subscriber.deliver(SYS_GAPS, payload, 0, False, self.name, None)

    async def gaps(self) -> AsyncIterator[Gap]:
        """Every delivery gap this node reports, as it happens: ``async for gap in
        node.gaps()`` (a bounded queue: past GAPS_QUEUE unread, counted in gaps_unreported)."""
        if self._gaps is None:
            self._gaps = asyncio.Queue(GAPS_QUEUE)
        while True:
            yield await self._gaps.get()

    def _origin(self, key: str, topic: str) -> tuple[str, bool]:
        """The name of the node a message came from, and whether the mesh policy lets that
        node publish ``topic`` to us (for shared subscriptions, zmesh.jobs.shared)."""
        if self.mesh is None or key == self.mesh.own_key:
            return self.name, True
        peer = self.mesh.membership.peers.get(key)
        if peer is None:
            return "?", True
        allowed = not self.mesh_policy or self.peer_may_publish(peer, topic)
        return peer.name, allowed

    def peer_may_publish(self, peer: Peer, topic: str, count: int = 1) -> bool:
        """The mesh policy's verdict on ``peer`` publishing to ``topic`` (see zmesh.mesh.policy)."""
        gate = self._gates.get(peer.key, False)
        if gate is False:
            ring = self.transport.ring if self.transport is not None else None
            name = ring.name_of(peer.key.encode()) if ring is not None else None
            groups = self.admission.groups_of(peer.key) if self.admission is not None else ()
            gate = self._gates[peer.key] = self.mesh_policy.gate_for(name, peer.key, groups)
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
        if self.delivery is not None:
            if event.kind in (EventKind.UP, EventKind.RESTARTED):
                self.delivery.peer_up(event.peer.key)
            elif event.kind is EventKind.DOWN:
                self.delivery.peer_down(event.peer.key)
        if event.kind in (EventKind.DOWN, EventKind.RESTARTED):
            self.jobs.peer_gone(event.peer.key)
            self._gates.pop(event.peer.key, None)  # its next certificate may name other groups
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
        subscription = Subscription(filt, qos, maxsize, self._behind.add, self._caught_up, self._unsubscribe_all)
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
            # One member of the group gets each message, mesh-wide (zmesh.jobs.shared); not the
            # router's business. MQTT 5: shared subscriptions get no retained messages.
            self.shared.add_member(subscriber, filt, qos)
            return
        self.router.subscribe(subscriber, filt, qos)
        self._update_mesh_subscriptions()
        job_queue = worker_queue(inner)
        if job_queue is not None:
            self.job_bridge.add_worker(subscriber, job_queue)
            return
        if inner.startswith("$jobs/"):  # a job's result asked for after it finished
            outcome = self.job_bridge.outcome_for(inner)
            if outcome is not None:
                subscriber.deliver(outcome[0], outcome[1], min(1, qos), True, self.name, None)
        if retained:
            def replayed(entry: RetainedEntry, properties: dict[str, Any] | None) -> None:
                subscriber.deliver(entry.topic, entry.payload, min(entry.qos, qos), True, entry.origin, properties)

            self.replays.start(subscriber, filt, self.replica.match(inner), replayed)
        if inner.startswith(SYS_PREFIX) or inner.startswith("$SYS"):
            self._sys_subscribers.add(subscriber)
            for sys_topic in (SYS_NODE, SYS_PEERS, SYS_TOPICS, SYS_JOBS) if retained else ():
                if not topics.matches(inner, sys_topic):
                    continue
                if sys_topic == SYS_TOPICS:  # built in slices when large, once per state
                    self.topics_dump.get(
                        lambda value, s=subscriber: s.deliver(SYS_TOPICS, value, 0, True, self.name, None)
                        if s in self._sys_subscribers else None
                    )
                    continue
                subscriber.deliver(sys_topic, self._sys_value(sys_topic), 0, True, self.name, None)

    def remove_subscription(self, subscriber: Subscriber, filt: str) -> bool:
        if filt.startswith(SHARED_PREFIX):
            return self.shared.remove_member(subscriber, filt)
        if worker_queue(filt) is not None:
            self.job_bridge.remove_worker(subscriber)
        self.replays.cancel(subscriber, filt)
        removed = self.router.unsubscribe(subscriber, filt)
        self._update_mesh_subscriptions()
        return removed

    def _unsubscribe_all(self, subscriber: Subscriber) -> None:
        self.replays.cancel(subscriber)
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
            if self.delivery is not None:
                self.delivery.set_interest(added, removed)

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
            return self.topics_dump.now()
        elif sys_topic == SYS_JOBS:
            value = self.jobs.stats()
        else:
            value = {
                "name": self.name,
                "key": self.transport.identity.public.decode() if self.transport else None,
                "uptime_s": round(time.time() - self.started_at, 1),
                "control_port": self.mesh.control_port if self.mesh else None,
                "stats": {**self.stats, **(self.mesh.stats if self.mesh else {})},
                "drops": self.drops.snapshot(),  # by reason: what was refused, counted
                "drops_total": self.drops.total,
                "loop": self.loop_lag.snapshot(),
                "mqtt": {
                    "clients": len(self.mqtt_server.connections) if self.mqtt_server else 0,
                    "dropped_total": self.mqtt_server.dropped_total if self.mqtt_server else 0,
                    "protocol_errors_total": self.mqtt_server.protocol_errors_total if self.mqtt_server else 0,
                    **(self.mqtt_server.sessions.stats() if self.mqtt_server else {}),
                },
                "delivery": {**self.delivery.snapshot(), "gaps_unreported": self.gaps_unreported}
                if self.delivery is not None else {},
                "retained": {
                    "entries": len(self.replica.cache),
                    "bytes": self.replica.cache.live_bytes,
                    "refused_total": self.replica.refused_total,
                    "store_errors_total": self.replica.store_errors_total,
                    "durable": self.replica.store is not None,
                },
            }
        return json.dumps(value).encode()

    def status(self) -> NodeStatus:
        """The snapshot that /healthz, /readyz and /metrics read (zmesh.ops.status); call
        it on the node's event loop."""
        mesh, mqtt, config = self.mesh, self.mqtt_server, self.config
        peers: dict[str, int] = {}
        synced = 0
        # O(peers + sessions) per call: called per probe or scrape (seconds apart), never on
        # the message path; at 10,000 peers and sessions that is a few ms every few seconds.
        for peer in mesh.peers() if mesh is not None else ():
            peers[peer.state.value] = peers.get(peer.state.value, 0) + 1
            link = mesh.links.get(peer.key) if mesh is not None else None
            if peer.state.value in ("up", "evasive") and link is not None and link.synced_upto is not None:
                synced += 1
        mesh_stats = mesh.stats if mesh is not None else {}
        sessions = mqtt.sessions if mqtt is not None else None
        queued = sum(len(s.window.queue) for s in sessions.sessions.values()) if sessions else 0
        jobs = self.jobs.stats().values()
        dns = "dns" in config.discovery.mode
        return NodeStatus(
            uptime=time.time() - self.started_at if self.started_at else 0.0,
            draining=self.draining,
            mqtt_listening=mqtt is not None or not config.mqtt.all_listeners,
            alone_by_design=not config.mesh.peers and config.discovery.mode == ("static",),
            join_timeout=3 * config.mesh.peer_expiry + (2 * config.discovery.dns_interval if dns else 0.0),
            peers=peers,
            peers_synced=synced,
            messages={d: mesh_stats.get(f"messages_{d}", 0) for d in ("in", "out")},
            bytes={d: mesh_stats.get(f"bytes_{d}", 0) for d in ("in", "out")},
            frames={d: mesh_stats.get(f"frames_{d}", 0) for d in ("in", "out")},
            drops={
                # The counters that predate zmesh.drops, then whatever is counted there.
                "mqtt_queue_full": mqtt.dropped_total if mqtt is not None else 0,
                "mqtt_protocol_error": mqtt.protocol_errors_total if mqtt is not None else 0,
                "bad_topic": self.stats["bad_topics"],
                "policy_denied": self.stats["policy_denied"],
                "bad_frame": mesh_stats.get("bad_frames", 0),
                "refused_hello": mesh_stats.get("refused_hellos", 0),
                "untrusted_hint": mesh_stats.get("untrusted_hints", 0),
                "unconfirmed_hint": mesh_stats.get("unconfirmed_hints", 0),
                "retained_refused": self.replica.refused_total,
                "http_refused": self.ops.refused_total if self.ops is not None else 0,
                **self.drops.snapshot(),
            },
            mqtt_connections=len(mqtt.connections) if mqtt is not None else 0,
            mqtt_sessions={"online": len(sessions) - len(sessions.offline), "offline": len(sessions.offline)} if sessions else {},
            queued_messages=queued + (mesh._pending_count if mesh is not None else 0),
            # What mqtt.max_queued_bytes_total counts (held for clients, queued and in
            # flight), plus what waits for the mesh's next flush.
            queued_bytes=(mqtt.queue_budget.used if mqtt is not None else 0) + (mesh._pending_bytes if mesh is not None else 0),
            retained_entries=len(self.replica.cache),
            retained_bytes=self.replica.cache.live_bytes,
            jobs={"pending": sum(int(q["depth"]) for q in jobs), "in_flight": sum(int(q["in_flight"]) for q in jobs)},
            jobs_total={"done": sum(int(q["done_total"]) for q in jobs), "dead": sum(int(q["dead_total"]) for q in jobs),
                        "redelivered": sum(int(q["redeliveries_total"]) for q in jobs)},
            # The ticker's clock is the loop's; no tick yet (the first 100 ms) is no evidence.
            loop_ticking=not self.loop_lag.last_tick or self.loop_lag.healthy(asyncio.get_running_loop().time()),
            loop_lag=self.loop_lag.lag_last_s,
            loop_lag_max=self.loop_lag.lag_max_s,
            loop_stalls=self.loop_lag.stalls_total,
            delivery_latency=self.latency.histogram.snapshot(),
            latency_ignored=self.latency.histogram.ignored,
            **self._delivery_status(),
        )

    def _delivery_status(self) -> dict[str, Any]:
        if self.delivery is None:
            return {}
        snap = self.delivery.snapshot()
        outbox = snap.pop("outbox")
        by_origin = snap.pop("by_origin")
        values = {k: v for k, v in snap.items() if isinstance(v, int | float)}
        values.update(outbox_bytes=outbox["bytes"], outbox_messages=outbox["messages"],
                      evicted_total=outbox["evicted_total"], unacknowledged=outbox["unacknowledged"])
        return {"delivery": values, "delivery_lost_by_origin": by_origin,
                "delivery_evicted_by_destination": outbox["evicted_by_destination"]}

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
        """Wait until at least ``count`` peers are up.

        TimeoutError after ``timeout``, saying how many are up and, for each seed still
        without a handshake, why (down, our own key, or keys not trusted both ways)."""
        try:
            async with asyncio.timeout(timeout):
                while self.mesh is None or len(self.mesh.membership.up()) < count:
                    await self._peer_change.wait()
        except TimeoutError:
            raise TimeoutError(await self._why_no_peers(count, timeout)) from None

    async def _why_no_peers(self, count: int, timeout: float) -> str:
        mesh = self.mesh
        up = len(mesh.membership.up()) if mesh is not None else 0
        head = f"{up} of {count} peers up after {timeout:g} s" if up else f"no peer up after {timeout:g} s"
        if mesh is None:
            return f"{head}: the node is not started"
        seeds = list(mesh.probes)
        if not seeds:
            return f"{head}: no seed is being dialled (mesh.peers / peers=, or discovery, found none that is not up)"
        reasons = await asyncio.gather(*(mesh.diagnose_seed(host, port) for host, port in seeds))
        return f"{head}: " + "; ".join(reasons)


def _checked_seeds(config: NodeConfig, ring: KeyRing, own: bytes, admission: bool) -> list[tuple[str | None, str, int]]:
    """``mesh.peers`` as ``(key or None, host, port)``. A seed's key must be one we trust: a
    node outside our ring can never be a member (our ZAP refuses its links to us), so such a
    seed is a typo or a missing NAME.key file, said at start rather than as a seed that never
    answers. With a mesh authority members are admitted by certificate, so any key may name
    a seed. Raises ValueError naming where the seed was given (file, or --peer) and the key."""
    origin = config.origins.get("mesh.peers", config.source)
    flag = " (--peer)" if origin == COMMAND_LINE else ""
    seeds = []
    for i, seed in enumerate(config.mesh.peers):
        key, host, port = parse_seed(seed)  # the loader checked the form already
        where = f"{origin}: mesh.peers{flag}: item {i}: {seed!r}"
        if key is not None and key.encode() == own:
            raise ValueError(f"{where}: the key {key} is this node's own")
        if key is not None and not admission and key.encode() not in ring:
            raise ValueError(
                f"{where}: the key {key} is not among the trusted keys in {ring.directory}: "
                "copy the seed's NAME.key there, or correct the key"
            )
        seeds.append((key, host, port))
    return seeds
