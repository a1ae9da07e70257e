"""The MQTT front door: an asyncio listener driving the sans-I/O codec.

One ``Connection`` (an ``asyncio.Protocol``, cheaper per packet than streams) per client.
It feeds bytes to its ``Decoder``, handles each packet, and hands publishes to the node.
Deliveries to the client are encoded with the codec's fast path and written in one
``write`` per event-loop turn (coalesced), so a stream of small messages costs one syscall
per burst, not one per message.

Bad input closes only that connection: a malformed or oversized packet or a protocol
violation gets the answer the spec asks for (a CONNACK code before CONNECT completes,
an MQTT 5 DISCONNECT with a reason code after), the will is published, and every other
client is untouched.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from zmesh import topics
from zmesh.config import MqttConfig
from zmesh.drops import Drops
from zmesh.mqtt import codec
from zmesh.mqtt.codec import (
    MQTT_5,
    Connect,
    Disconnect,
    MQTTError,
    PingReq,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    Subscribe,
    Unsubscribe,
    encode,
    encode_properties,
    encode_publish,
)
from zmesh.mqtt.listeners import BoundListener, ListenerSet
from zmesh.mqtt.session import (
    NEVER,
    Outgoing,
    QueueBudget,
    SubscriptionOptions,
    TopicAliases,
    remaining_expiry,
)
from zmesh.mqtt.sessions import ACL_CACHE_LIMIT, Session, SessionStore

if TYPE_CHECKING:
    from zmesh.mqtt.sessionstore import SessionPersistence, StoredSession
    from zmesh.ports import Broker
    from zmesh.security.authority import Authority

LONE_WRITE_GAP = 0.0005  # s of quiet after which a packet is written at once (see _write)
log = logging.getLogger("zmesh.mqtt")

CONNECT_TIMEOUT = 10.0  # a socket that never sends CONNECT is closed after this
WRITE_BUFFER_LIMIT = 8 * 1024 * 1024  # past this, QoS 0 messages to a slow client are dropped
MAX_GRANTED_QOS = 2
BACKLOG_LIMIT = 1000  # packets a client may send before its CONNACK (while its password is checked)

# 3.1.1 CONNACK return codes
CONNACK_UNACCEPTABLE_VERSION = 1
CONNACK_IDENTIFIER_REJECTED = 2
CONNACK_NOT_AUTHORIZED = 5
# MQTT 5 reason codes used here
RC_UNSPECIFIED = 0x80
RC_CLIENT_ID_NOT_VALID = 0x85
RC_NOT_AUTHORIZED = 0x87
RC_KEEP_ALIVE_TIMEOUT = 0x8D
RC_BAD_AUTHENTICATION_METHOD = 0x8C
RC_RETAIN_NOT_SUPPORTED = 0x9A
RC_QOS_NOT_SUPPORTED = 0x9B
RC_IMPLEMENTATION_SPECIFIC = 0x83
RC_SESSION_TAKEN_OVER = 0x8E
RC_TOPIC_FILTER_INVALID = 0x8F
RC_PACKET_ID_NOT_FOUND = 0x92
RC_TOPIC_ALIAS_INVALID = 0x94
RC_NO_SUBSCRIPTION = 0x11
RC_SERVER_SHUTTING_DOWN = 0x8B
RC_DISCONNECT_WITH_WILL = 0x04

PINGRESP = b"\xd0\x00"
SLICE_SECONDS = 0.005  # one client's SUBSCRIBE work per loop turn before others get a turn
PAUSED = object()  # a packet handler's answer: "not done, goes on in a later loop turn"


class Connection(asyncio.Protocol):
    """One client connection: decodes its packets, drives its ``Session``, and encodes and
    writes what goes to the client. The session (subscriptions, messages in flight and
    queued, QoS 2 state) outlives the connection when the client asked for that."""

    def __init__(self, server: MQTTServer) -> None:
        self.server = server
        self.broker = server.broker
        self.config = server.config
        self.transport: asyncio.Transport | None = None
        self.decoder = codec.Decoder(max_packet_size=server.config.max_packet_size)
        self.client_id = ""
        self.level = 4
        self.connected = False  # CONNECT accepted (CONNACK 0 sent)
        self.closing = False
        self.keepalive = CONNECT_TIMEOUT
        self.last_rx = self.accepted_at = time.monotonic()
        self.will: codec.Will | None = None
        self.session: Session | None = None
        self.username: str | None = None
        # The TLS client certificate's CN, set by a listener with use_identity_as_username:
        # then it is the username and no password is checked (the certificate was).
        self.cert_username: str | None = None
        self.acl: Any = None  # the node's Authority when it has ACL rules, else None (allow all)
        self.aliases: TopicAliases | None = None
        self.max_out = 0  # the client's Maximum Packet Size (MQTT 5); 0: no limit
        self.problem_info = True  # MQTT 5 Request Problem Information: reason strings on acks
        self.dropped = 0
        self.peer = "?"
        self._write_allowed: dict[str, bool] = {}
        self._write_generation = -1
        self._out: list[bytes] = []
        self._held_acks: deque[tuple[asyncio.Future[None] | None, bytes, int, int]] = deque()
        self._flush_scheduled = False
        self._last_write = 0.0  # monotonic time of the last transport write (see _write)
        # Packets that arrived while the CONNECT's password was checked in a thread.
        self._backlog: list[codec.Packet] | None = None
        self._backlog_error: MQTTError | None = None
        self._lost = False
        self._loop = asyncio.get_running_loop()

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, and a WebSocket
        # listener hands over its own wrapper: only the Transport methods are relied on.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Without it Nagle and delayed ACK add ~40 ms to a small message.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        limit = self.config.max_connections
        if 0 < limit <= len(self.server.connections):
            # Mosquitto's max_connections: the connection is closed at once, before any byte
            # is read (all listeners together here; Mosquitto counts per listener).
            self.server.drop("mqtt_max_connections", f"{self.peer}: more than {limit} connections")
            self.closing = True
            transport.close()
            return
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # refused or failed: nothing more from this client is read
        self.last_rx = time.monotonic()
        error: MQTTError | None = None
        try:
            packets = self.decoder.feed(data)
        except MQTTError as exc:
            # The packets before the bad one in this read are valid and are handled first
            # (a CONNECT gets its CONNACK), as if they had arrived in an earlier read.
            packets, error = getattr(exc, "packets", None) or [], exc
        backlog = self._backlog
        if backlog is not None:  # the CONNECT is still being authenticated
            backlog.extend(packets)
            self._backlog_error = self._backlog_error or error
            if len(backlog) > BACKLOG_LIMIT:
                self._fail(codec.QUOTA_EXCEEDED, f"more than {BACKLOG_LIMIT} packets before CONNACK")
            return
        if not self.connected and packets and type(packets[0]) is Connect:
            # CONNECT may go to a thread (a password to check): what follows it waits.
            try:
                self._on_connect(packets[0])
            except MQTTError as exc:
                self._fail(exc.reason_code, str(exc))
                return
            packets = packets[1:]
            if self._backlog is not None:
                self._backlog.extend(packets)
                self._backlog_error = error
                return
        self._handle(packets, error)

    def _handle(self, packets: list[codec.Packet], error: MQTTError | None) -> None:
        try:
            for i, packet in enumerate(packets):
                if self.closing:
                    return
                handler = self._handlers.get(type(packet))
                if handler is None:
                    raise MQTTError(codec.PROTOCOL_ERROR, f"unexpected {type(packet).__name__}")
                if handler(self, packet) is PAUSED:
                    # A long SUBSCRIBE goes on in later loop turns: the packets after it
                    # wait, in order, and reading stops until it is done.
                    self._backlog, self._backlog_error = list(packets[i + 1 :]), error
                    if self.transport is not None:
                        self.transport.pause_reading()
                    return
            if error is not None and not self.closing:
                raise error
        except MQTTError as exc:
            self._fail(exc.reason_code, str(exc))
        except topics.TopicError as exc:
            self._fail(codec.PROTOCOL_ERROR, str(exc))

    def _in_slices(self, steps: Iterator[None]) -> object:
        """Run ``steps`` (a generator yielding after each unit of work) for at most
        SLICE_SECONDS per event-loop turn, so that one client's 20,000-filter SUBSCRIBE does
        not hold every other client and the mesh heartbeats (issue 14, hole 2). Returns
        PAUSED when the work goes on in a later turn, None when it is done."""
        deadline = time.monotonic() + SLICE_SECONDS
        for _ in steps:
            if time.monotonic() > deadline:
                self._loop.call_soon(self._next_slice, steps)
                return PAUSED
        return None

    def _next_slice(self, steps: Iterator[None]) -> None:
        if self.closing or self._lost:
            return
        try:
            if self._in_slices(steps) is PAUSED:
                return
        except MQTTError as exc:
            self._fail(exc.reason_code, str(exc))
            return
        except topics.TopicError as exc:
            self._fail(codec.PROTOCOL_ERROR, str(exc))
            return
        backlog, error = self._backlog or [], self._backlog_error
        self._backlog = self._backlog_error = None
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()
        self._handle(backlog, error)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.server.connections.discard(self)
        session, self.session = self.session, None
        self.connected = False
        if session is None:
            return  # never connected, refused, or taken over (already detached)
        will, self.will = self.will, None
        if will is not None:
            log.info("client %s gone without DISCONNECT: its will goes to %s", self.client_id, will.topic)
        else:
            log.debug("client %s disconnected", self.client_id)
        self.server.sessions.disconnected(session, will)

    # ------------------------------------------------------------------ CONNECT

    def _on_connect(self, packet: Connect) -> None:
        level = packet.protocol_level
        self.level = level
        self.decoder.protocol_level = level
        if level == MQTT_5 and "authentication_method" in packet.properties:
            # No enhanced authentication method is supported: MQTT-4.12.0-1 asks for CONNACK
            # 0x8C and a closed connection (Mosquitto without an auth plugin does the same).
            self._refuse(CONNACK_NOT_AUTHORIZED, RC_BAD_AUTHENTICATION_METHOD, "unsupported authentication method")
            return
        config = self.config
        will = packet.will
        if will is not None and will.retain and not config.retain_available:
            # Mosquitto: MQTT 5 "retain not supported"; 3.1.1 has no code, the connection closes.
            self._refuse_v5_or_close(RC_RETAIN_NOT_SUPPORTED, "a retained will, with retain_available false")
            return
        if will is not None and will.qos > self.server.maximum_qos:
            self._refuse_v5_or_close(RC_QOS_NOT_SUPPORTED, f"a QoS {will.qos} will, above maximum_qos")
            return
        if level < MQTT_5 and 0 < config.max_keepalive < 65535 and packet.keepalive > config.max_keepalive:
            # 3.1.1 cannot be told a shorter keepalive: refused, as Mosquitto's manual says.
            self._refuse(CONNACK_IDENTIFIER_REJECTED, RC_CLIENT_ID_NOT_VALID,
                         f"keepalive {packet.keepalive} s above max_keepalive {config.max_keepalive}")
            return
        client_id = packet.client_id
        assigned = False
        if not client_id:
            if level < MQTT_5 and not packet.clean_start or level == 3:
                self._refuse(CONNACK_IDENTIFIER_REJECTED, RC_CLIENT_ID_NOT_VALID, "empty client id without clean session")
                return
            client_id, assigned = f"zmesh-{secrets.token_hex(8)}", True
        self.client_id = client_id
        auth = self.server.auth
        if auth is not None and not getattr(auth, "enabled", True):
            auth = None  # no password file, no ACL, anonymous allowed: nothing to check, ever
        if auth is not None and self.cert_username is None:
            if packet.password is not None and packet.username is not None:
                # Checking a password hash (PBKDF2) can take long: a thread does it while
                # this connection's further packets wait; nobody else waits.
                self._backlog = []
                future = self._loop.run_in_executor(None, auth.authenticate, packet.username, packet.password)
                future.add_done_callback(lambda f: self._authenticated(f, packet, assigned, auth))
                return
            if not auth.authenticate(packet.username, packet.password):
                self._refuse_login(packet.username)
                return
        self._accept(packet, assigned, auth)

    def _authenticated(self, future: asyncio.Future[bool], packet: Connect, assigned: bool, auth: Any) -> None:
        backlog, error = self._backlog or [], self._backlog_error
        self._backlog = self._backlog_error = None
        if self._lost or self.closing:
            return
        try:
            allowed = bool(future.result())
        except Exception as exc:  # a bug in the password check must not let anyone in
            log.error("client %s: password check failed: %s", self.client_id, type(exc).__name__)
            allowed = False
        if not allowed:
            self._refuse_login(packet.username)
            return
        try:
            self._accept(packet, assigned, auth)
        except MQTTError as exc:
            self._fail(exc.reason_code, str(exc))
            return
        self._handle(backlog, error)

    def _refuse_login(self, username: str | None) -> None:
        # Mosquitto 2.0 answers every refused login "not authorized" (3.1.1 code 5, MQTT 5
        # 0x87), wrong password and unknown user alike, so the answer reveals no user names.
        self.server.refused_logins_total += 1
        who = f"user {username!r}" if username is not None else "anonymous client"
        self._refuse(CONNACK_NOT_AUTHORIZED, RC_NOT_AUTHORIZED, f"not authorised: {who} (client {self.client_id!r})")

    def _accept(self, packet: Connect, assigned: bool, auth: Any) -> None:
        level = self.level
        v5 = level == MQTT_5
        config = self.config
        client_id = self.client_id
        props = packet.properties if v5 else {}
        if v5:
            expiry = props.get("session_expiry_interval", 0)
        else:
            expiry = 0 if packet.clean_start else NEVER  # 3.1.1: clean session 0 never expires
        store = self.server.sessions
        existing = store.get(client_id)
        if existing is not None and isinstance(existing.conn, Connection):
            existing.conn.take_over()
        session, present = store.open(client_id, packet.clean_start)
        acl = auth if auth is not None and getattr(auth, "acl_file", True) is not None else None
        self.username = self.cert_username if self.cert_username is not None else packet.username
        new_owner = session.set_owner(self.username, acl) and present
        self.acl = acl
        session.level = level
        store.set_expiry(session, expiry)  # with a data_dir: on disk while the expiry is not 0
        session.conn = self
        self.session = session
        self.connected = True
        keepalive = packet.keepalive
        server_keepalive = None
        if v5 and config.max_keepalive and (keepalive > config.max_keepalive or not keepalive):
            # Mosquitto's max_keepalive: an MQTT 5 client asking more (or none) is told
            # the Server Keep Alive, and held to it.
            keepalive = server_keepalive = config.max_keepalive
        self.keepalive = keepalive * 1.5 if keepalive else 0.0
        self.will = packet.will
        client_receive_maximum = 65535
        properties: dict[str, Any] = {}
        if v5:
            self.max_out = props.get("maximum_packet_size", 0)
            self.problem_info = bool(props.get("request_problem_information", 1))
            client_receive_maximum = props.get("receive_maximum", 65535)
            if config.topic_alias_maximum:
                self.aliases = TopicAliases(config.topic_alias_maximum)
            properties = {
                # maximum_qos (below) only when it is 0 or 1: the property cannot say 2.
                "receive_maximum": config.max_inflight,
                "topic_alias_maximum": config.topic_alias_maximum,
                "retain_available": 1 if config.retain_available else 0,
                "wildcard_subscription_available": 1,
                "shared_subscription_available": 1,
                "subscription_identifier_available": 1,
                "maximum_packet_size": config.max_packet_size,
            }
            if assigned:
                properties["assigned_client_identifier"] = client_id
            if server_keepalive is not None:
                properties["server_keep_alive"] = server_keepalive
            if self.server.maximum_qos < 2:
                properties["maximum_qos"] = self.server.maximum_qos
        # Our in-flight window towards the client: our limit, or its Receive Maximum.
        session.window.set_max_inflight(min(config.max_inflight, client_receive_maximum))
        if present and acl is not None:
            # The user may differ from last time (another user with this client id takes
            # the session over), or the rules may have changed: subscriptions it may not
            # make, and queued and in-flight messages it may not read, are dropped (hole 1
            # of issue 14; Mosquitto 2.0 drops the messages on connect too).
            if new_owner:
                log.info("client %s: session taken over by user %r: kept only as far as its rights allow",
                         client_id, self.username)
                session.restrict_to_owner()
            else:
                session.window.retain_only(lambda m: session.may_read(m.topic))
        # MQTT 3.1 has no session present flag: its first CONNACK byte is reserved.
        connack = encode(codec.ConnAck(present and level >= codec.MQTT_311, 0, properties), level)
        if self.max_out and len(connack) > self.max_out:
            connack = self._shrink_connack(present, properties)
            if connack is None:
                return
        self._write(connack)
        log.debug(
            "client %s connected from %s (MQTT level %d, session %s)",
            client_id, self.peer, level, "resumed" if present else "new",
        )
        if present:
            now = time.monotonic()
            for message in session.window.resume(now):
                if message.released:
                    self._write(bytes((0x62, 2)) + message.packet_id.to_bytes(2, "big"))  # PUBREL again
                else:
                    self.send(message)  # DUP when it went out before
            session.count_drops()

    def _shrink_connack(self, present: bool, properties: dict[str, Any]) -> bytes | None:
        """MQTT-3.1.2-24: no packet larger than the client's Maximum Packet Size, CONNACK
        included. Properties the client assumes anyway (defaults) go first, then the topic
        alias maximum (without it the client uses no aliases); what is left the client must
        be told, and when even that does not fit, the connection closes without a CONNACK."""
        optional = {"retain_available": 1, "wildcard_subscription_available": 1,
                    "shared_subscription_available": 1, "subscription_identifier_available": 1}
        kept = {k: v for k, v in properties.items() if optional.get(k) != v}
        connack = encode(codec.ConnAck(present, 0, kept), MQTT_5)
        if len(connack) > self.max_out and kept.pop("topic_alias_maximum", None) is not None:
            self.aliases = None  # not announced: an alias from this client is then an error
            connack = encode(codec.ConnAck(present, 0, kept), MQTT_5)
        if len(connack) <= self.max_out:
            return connack
        log.info("client %s (%s): closing: its maximum packet size %d is below the %d-byte CONNACK",
                 self.client_id, self.peer, self.max_out, len(connack))
        self.will = None  # never connected, as far as the client can know
        self._close()
        return None

    # ------------------------------------------------------------------ packets in

    def _may_write(self, topic: str) -> bool:
        if topic.startswith("$SYS"):
            return False  # $SYS is the node's to write, as in Mosquitto
        acl = self.acl
        if acl is None:
            return True
        if acl.generation != self._write_generation:
            self._write_allowed.clear()
            self._write_generation = acl.generation
        allowed = self._write_allowed.get(topic)
        if allowed is None:
            allowed = bool(acl.authorize(self.username, self.client_id, topic, "write"))
            if len(self._write_allowed) >= ACL_CACHE_LIMIT:
                self._write_allowed.clear()
            self._write_allowed[topic] = allowed
            if not allowed:
                log.info("client %s: ACL denies publishing to %s", self.client_id, topic)
        return allowed

    def _on_publish(self, packet: Publish) -> None:
        session = self.session
        if session is None:
            raise MQTTError(codec.PROTOCOL_ERROR, "PUBLISH before CONNECT")
        topic = packet.topic
        properties: dict[str, Any] | None = packet.properties
        if properties:
            alias = properties.get("topic_alias")
            if alias is not None:
                if self.aliases is None:
                    raise MQTTError(RC_TOPIC_ALIAS_INVALID, "topic aliases are not enabled (topic_alias_maximum 0)")
                topic = self.aliases.resolve(topic, alias)
            if "subscription_identifier" in properties:
                # Identifiers are the receiver's, set by the server (MQTT-3.3.4-6).
                raise MQTTError(codec.PROTOCOL_ERROR, "PUBLISH from a client with a subscription identifier")
            if alias is not None:
                # An alias is this connection's shorthand, not part of the message.
                properties = {k: v for k, v in properties.items() if k != "topic_alias"}
            properties = properties or None
        else:
            properties = None
        if not topic:
            raise MQTTError(codec.PROTOCOL_ERROR, "PUBLISH with an empty topic and no topic alias")
        qos = packet.qos
        if qos > self.server.maximum_qos:
            raise MQTTError(RC_QOS_NOT_SUPPORTED, f"PUBLISH at QoS {qos}, above maximum_qos {self.server.maximum_qos}")
        if packet.retain and not self.config.retain_available:
            raise MQTTError(RC_RETAIN_NOT_SUPPORTED, "retained PUBLISH with retain_available false")
        allowed = self._may_write(topic)
        if allowed and topic[0] == "$":  # the node's own topics: it has rules of its own
            allowed = self.broker.may_publish(topic, session)
        limit = self.config.message_size_limit
        if limit and len(packet.payload) > limit and allowed:
            # Mosquitto's message_size_limit: not delivered, but the QoS flow completes (MQTT 5:
            # "implementation specific error"), and the connection stays.
            self.server.drop("mqtt_message_size_limit", f"client {self.client_id}: {len(packet.payload)}-byte payload")
            if qos:
                assert packet.packet_id is not None
                self._ack(0x40 if qos == 1 else 0x50, packet.packet_id, RC_IMPLEMENTATION_SPECIFIC)
            return
        if qos == 0:
            if allowed:
                self._publish(session, topic, packet.payload, 0, packet.retain, properties)
            return
        packet_id = packet.packet_id
        assert packet_id is not None
        if not allowed:
            # Mosquitto 2.0: acknowledged (MQTT 5: "not authorized") and dropped. A refused
            # QoS 2 message ends with that PUBREC in MQTT 5; 3.1.1 goes on to PUBREL/PUBCOMP.
            self._ack(0x40 if qos == 1 else 0x50, packet_id, RC_NOT_AUTHORIZED, None, topic)
            return
        if qos == 1:
            self._ack(0x40, packet_id, 0, self._publish(session, topic, packet.payload, 1, packet.retain, properties))
            return
        durable = None
        inbound = session.inbound_qos2
        if inbound.received(packet_id):
            if self.level == MQTT_5 and len(inbound.pending) + len(self._held_acks) > self.config.max_inflight:
                raise MQTTError(
                    codec.RECEIVE_MAXIMUM_EXCEEDED,
                    f"more than {self.config.max_inflight} unacknowledged QoS 2 messages (receive maximum)",
                )
            durable = self._publish(session, topic, packet.payload, 2, packet.retain, properties)
        self._ack(0x50, packet_id, 0, durable)  # a duplicate (DUP) gets its PUBREC again, no delivery

    def _publish(
        self, session: Session, topic: str, payload: bytes, qos: int, retain: bool, properties: dict[str, Any] | None
    ) -> asyncio.Future[None] | None:
        server = self.server
        server.publishing = session  # for MQTT 5 no local: this client's own subscriptions skip it
        try:
            return self.broker.publish_nowait(topic, payload, qos, retain, properties)
        finally:
            server.publishing = None

    def _ack(
        self,
        header: int,
        packet_id: int | None,
        reason: int,
        durable: asyncio.Future[None] | None = None,
        denied_topic: str | None = None,
    ) -> None:
        """Acknowledge a publish; after ``durable`` completes (a retained write reaching the
        disk) when given. Acks leave in the order the publishes came, as MQTT requires."""
        assert packet_id is not None
        if reason and self.level == MQTT_5:
            if denied_topic is not None and self.problem_info:
                properties = {"reason_string": f"not authorized to publish to {denied_topic}"}
                data = encode((PubAck if header == 0x40 else PubRec)(packet_id, reason, properties), MQTT_5)
            else:
                data = bytes((header, 3)) + packet_id.to_bytes(2, "big") + bytes((reason,))
        else:
            data = bytes((header, 2)) + packet_id.to_bytes(2, "big")
        if durable is None and not self._held_acks:
            self._write(data)
            return
        self._held_acks.append((durable, data, header, packet_id))
        if durable is not None:
            durable.add_done_callback(lambda _: self._release_acks())

    def _release_acks(self) -> None:
        while self._held_acks and (self._held_acks[0][0] is None or self._held_acks[0][0].done()):
            durable, data, header, packet_id = self._held_acks.popleft()
            error = durable.exception() if durable is not None else None
            if error is not None:
                # Not on disk, or refused by the mesh's flow control (DeliveryRefused, past
                # delivery's bounds: 0x97 quota exceeded): never acknowledge it. MQTT 5 says
                # why; 3.1.1 has no way to, so the connection closes and the client sends
                # the message again.
                code = getattr(error, "reason_code", RC_UNSPECIFIED)
                if self.level != MQTT_5:
                    self._fail(code, str(error) if code != RC_UNSPECIFIED else "retained message could not be stored")
                    return
                data = bytes((header, 3)) + packet_id.to_bytes(2, "big") + bytes((code,))
            self._write(data)

    def _on_puback(self, packet: PubAck) -> None:
        session = self.session
        if session is not None:
            _check_ack(session, "PUBACK", packet.packet_id)
            for message in session.window.acknowledge(packet.packet_id, time.monotonic()):
                self.send(message)

    def _on_pubrec(self, packet: PubRec) -> None:
        session = self.session
        if session is None:
            return
        packet_id = packet.packet_id
        _check_ack(session, "PUBREC", packet_id)
        if packet.reason_code >= 0x80:
            # MQTT 5: the client refused the message; the QoS 2 flow ends with this PUBREC.
            for message in session.window.complete(packet_id, time.monotonic()):
                self.send(message)
        elif session.window.pubrec(packet_id):
            self._write(bytes((0x62, 2)) + packet_id.to_bytes(2, "big"))  # PUBREL
        else:
            reason = RC_PACKET_ID_NOT_FOUND if self.level == MQTT_5 else 0
            self._write(encode(PubRel(packet_id, reason), self.level))

    def _on_pubrel(self, packet: PubRel) -> None:
        session = self.session
        known = session is not None and session.inbound_qos2.released(packet.packet_id)
        reason = 0 if known or self.level != MQTT_5 else RC_PACKET_ID_NOT_FOUND
        self._write(encode(PubComp(packet.packet_id, reason), self.level))

    def _on_pubcomp(self, packet: PubComp) -> None:
        session = self.session
        if session is not None:
            _check_ack(session, "PUBCOMP", packet.packet_id)
            for message in session.window.complete(packet.packet_id, time.monotonic()):
                self.send(message)

    def _on_subscribe(self, packet: Subscribe) -> object:
        session = self.session
        if session is None:
            raise MQTTError(codec.PROTOCOL_ERROR, "SUBSCRIBE before CONNECT")
        return self._in_slices(self._subscribe_steps(session, packet))

    def _subscribe_steps(self, session: Session, packet: Subscribe) -> Iterator[None]:
        v5 = self.level == MQTT_5
        identifier = packet.properties.get("subscription_identifier", 0) if v5 else 0
        granted: list[tuple[str, SubscriptionOptions, bool]] = []
        codes = []
        limit = self.config.max_subscriptions
        new: set[str] = set()  # filters this SUBSCRIBE adds (a replaced one is not new)
        for request in packet.subscriptions:
            yield
            filt = request.filter
            try:
                topics.validate_topic_filter(filt)
                shared = topics.parse_shared(filt)[0] is not None
            except topics.TopicError as exc:
                log.info("client %s: refused filter %r: %s", self.client_id, filt, exc)
                codes.append(RC_TOPIC_FILTER_INVALID if v5 else 0x80)
                continue
            if shared and request.no_local:
                raise MQTTError(codec.PROTOCOL_ERROR, f"no local on shared subscription {filt!r}")
            if self.acl is not None and not self.acl.authorize(self.username, self.client_id, filt, "subscribe"):
                log.info("client %s: ACL denies subscribing to %s", self.client_id, filt)
                codes.append(RC_NOT_AUTHORIZED if v5 else 0x80)
                continue
            existed = filt in session.subscriptions
            if limit and not existed and filt not in new and len(session.subscriptions) + len(new) >= limit:
                self.server.drop("mqtt_max_subscriptions", f"client {self.client_id}: more than {limit} subscriptions")
                codes.append(codec.QUOTA_EXCEEDED if v5 else 0x80)
                continue
            if not existed:
                new.add(filt)
            options = SubscriptionOptions(
                min(request.qos, self.server.maximum_qos), request.no_local, request.retain_as_published,
                request.retain_handling if v5 else 0, identifier,
            )
            codes.append(options.qos)
            # Retained messages: always at 3.1.1 and with retain handling 0, only for a new
            # subscription with 1, never with 2 (section 3.3.1.3).
            replay = options.retain_handling == 0 or (options.retain_handling == 1 and not existed)
            granted.append((filt, options, replay))
        self._write(encode(codec.SubAck(packet.packet_id, codes), self.level))
        for filt, options, replay in granted:  # after SUBACK, so retained messages follow it
            yield
            session.subscribe(filt, options, replay)

    def _on_unsubscribe(self, packet: Unsubscribe) -> object:
        session = self.session
        if session is None:
            raise MQTTError(codec.PROTOCOL_ERROR, "UNSUBSCRIBE before CONNECT")
        return self._in_slices(self._unsubscribe_steps(session, packet))

    def _unsubscribe_steps(self, session: Session, packet: Unsubscribe) -> Iterator[None]:
        codes = []
        for f in packet.filters:
            yield
            codes.append(0 if session.unsubscribe(f) else RC_NO_SUBSCRIPTION)
        self._write(encode(codec.UnsubAck(packet.packet_id, codes if self.level == MQTT_5 else []), self.level))

    def _on_pingreq(self, packet: PingReq) -> None:
        self._write(PINGRESP)

    def _on_disconnect(self, packet: Disconnect) -> None:
        session = self.session
        if self.level == MQTT_5 and session is not None:
            expiry = packet.properties.get("session_expiry_interval")
            if expiry is not None:
                if not session.expiry and expiry:
                    raise MQTTError(codec.PROTOCOL_ERROR, "DISCONNECT sets a session expiry after CONNECT set 0")
                self.server.sessions.set_expiry(session, expiry)
        if not (self.level == MQTT_5 and packet.reason_code == RC_DISCONNECT_WITH_WILL):
            self.will = None  # a clean DISCONNECT discards the will
        self.closing = True
        self._flush_out()
        assert self.transport is not None
        self.transport.close()

    def _on_auth(self, packet: Any) -> None:
        raise MQTTError(0x8C, "enhanced authentication is not supported")

    _handlers: dict[type, Any] = {
        Connect: _on_connect,
        Publish: _on_publish,
        PubAck: _on_puback,
        PubRec: _on_pubrec,
        PubRel: _on_pubrel,
        PubComp: _on_pubcomp,
        Subscribe: _on_subscribe,
        Unsubscribe: _on_unsubscribe,
        PingReq: _on_pingreq,
        Disconnect: _on_disconnect,
        codec.Auth: _on_auth,
    }

    # ------------------------------------------------------------------ packets out (the session's Link)

    def publish0(self, topic: str, payload: bytes, retain: bool, properties: dict[str, Any] | None) -> None:
        """One QoS 0 message; dropped (and counted) when the client cannot keep up."""
        if self.closing:
            return
        assert self.transport is not None
        if self.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            self.dropped += 1
            self.server.dropped_total += 1
            return
        level = self.level
        props = encode_properties(properties) if properties and level == MQTT_5 else b""
        data = encode_publish(topic.encode(), payload, 0, retain, False, None, level, props)
        if self.max_out and len(data) > self.max_out:
            self._too_large(topic, len(data))
            return
        self._write(data)

    def publish_plain(self, topic: str, payloads: list[bytes]) -> None:
        """Many QoS 0 messages without properties, not retained (a batch from the mesh)."""
        if self.closing:
            return
        assert self.transport is not None
        if self.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            self.dropped += len(payloads)
            self.server.dropped_total += len(payloads)
            return
        encoded_topic, level = topic.encode(), self.level
        write = self._write
        if not self.max_out:
            for payload in payloads:
                write(encode_publish(encoded_topic, payload, 0, False, False, None, level, b""))
            return
        for payload in payloads:
            data = encode_publish(encoded_topic, payload, 0, False, False, None, level, b"")
            if len(data) > self.max_out:
                self._too_large(topic, len(data))
            else:
                write(data)

    def send(self, message: Outgoing) -> None:
        """A QoS 1 or 2 message admitted to the in-flight window (DUP if sent before)."""
        level = self.level
        properties = message.properties
        props = b""
        if properties and level == MQTT_5:
            if message.expires_at:
                properties = remaining_expiry(properties, message.expires_at, time.monotonic())
            props = encode_properties(properties)
        data = encode_publish(
            message.topic.encode(), message.payload, message.qos, message.retain, message.sent,
            message.packet_id, level, props,
        )
        message.sent = True
        if self.max_out and len(data) > self.max_out:
            # Section 3.1.2.11.4: not sent, and treated as if delivered.
            self._too_large(message.topic, len(data))
            session = self.session
            if session is not None:
                window = session.window
                now = time.monotonic()
                pid = message.packet_id
                for released in window.acknowledge(pid, now) if message.qos == 1 else window.complete(pid, now):
                    self.send(released)
            return
        self._write(data)

    def _too_large(self, topic: str, size: int) -> None:
        self.dropped += 1
        self.server.dropped_total += 1
        log.debug("client %s: %d-byte message on %s exceeds its maximum packet size %d: not sent",
                  self.client_id, size, topic, self.max_out)

    def _write(self, data: bytes) -> None:
        # Packets written in one event-loop turn leave in one transport write (what
        # throughput needs), except a lone one: after LONE_WRITE_GAP of quiet a packet goes
        # out at once, since waiting a turn to coalesce only adds latency to it. Nothing is
        # queued in _out while no flush is scheduled, so writing directly keeps the order.
        # With sessions on disk, nothing leaves while session changes are uncommitted: the
        # packet waits for _flush_out, which commits first (the write-ahead rule of
        # zmesh.mqtt.sessionstore: no PUBACK, PUBREC, PUBCOMP, PUBREL or QoS 2 PUBLISH
        # before the state it implies is on disk).
        if not self._flush_scheduled:
            now = time.monotonic()
            transport = self.transport
            persistence = self.server.persistence
            if (
                now - self._last_write > LONE_WRITE_GAP and transport is not None and not transport.is_closing()
                and (persistence is None or not persistence.pending)
            ):
                self._last_write = now
                transport.write(data)
                return
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_out)
        self._out.append(data)

    def _flush_out(self) -> None:
        self._flush_scheduled = False
        persistence = self.server.persistence
        if persistence is not None and persistence.pending:
            persistence.flush()  # one commit for every connection's packets of this turn
        self._last_write = time.monotonic()
        if self._out and self.transport is not None and not self.transport.is_closing():
            out, self._out = self._out, []
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        else:
            self._out.clear()

    # ------------------------------------------------------------------ endings

    def _refuse_v5_or_close(self, code_5: int, why: str) -> None:
        """Refuse a CONNECT with an MQTT 5 reason; 3.1.1 has no code for it: just close."""
        if self.level == MQTT_5:
            self._refuse(0, code_5, why)
            return
        log.info("client from %s refused: %s", self.peer, why)
        self._close()

    def _refuse(self, code_311: int, code_5: int, why: str) -> None:
        log.info("client from %s refused: %s", self.peer, why)
        self._write(encode(codec.ConnAck(False, code_5 if self.level == MQTT_5 else code_311), self.level))
        self._close()

    def _fail(self, reason_code: int, why: str) -> None:
        """Bad input or a protocol violation: answer as the spec says and close this client."""
        log.info("client %s (%s): closing: %s", self.client_id or "-", self.peer, why)
        self.server.protocol_errors_total += 1
        if not self.connected:
            if reason_code == codec.UNSUPPORTED_PROTOCOL_VERSION:
                # The spec answers an unknown level with a 3.1.1 CONNACK, code 1.
                self._write(encode(codec.ConnAck(False, CONNACK_UNACCEPTABLE_VERSION), 4))
            elif self.decoder.protocol_level == MQTT_5:
                self._write(encode(codec.ConnAck(False, reason_code), MQTT_5))
        elif self.level == MQTT_5:
            self._write(encode(Disconnect(reason_code, {"reason_string": why[:200]}), MQTT_5))
        self._close()

    def _close(self) -> None:
        self.closing = True
        self._flush_out()
        if self.transport is not None:
            self.transport.close()

    def take_over(self) -> None:
        """Another connection claimed our client id: MQTT says this one goes. The session
        is detached now (the new connection takes it, or a clean start ends it)."""
        log.info("client %s: session taken over by a new connection", self.client_id)
        if self.level == MQTT_5:
            self._write(encode(Disconnect(RC_SESSION_TAKEN_OVER), MQTT_5))
        session, self.session = self.session, None
        will, self.will = self.will, None
        self.connected = False
        self._close()
        if session is not None:
            self.server.sessions.disconnected(session, will)

    def expire_keepalive(self) -> None:
        log.info("client %s (%s): keepalive expired", self.client_id or "-", self.peer)
        if self.connected and self.level == MQTT_5:
            self._write(encode(Disconnect(RC_KEEP_ALIVE_TIMEOUT), MQTT_5))
        self._close()
        if self.transport is not None:
            self.transport.abort()  # a silent peer may never read what we write


def _check_ack(session: Session, kind: str, packet_id: int) -> None:
    """An acknowledgement of the wrong type for a message in flight is a protocol violation
    (3.1.1 MQTT-4.8.0-1, MQTT 5 section 4.13): the connection closes. One for a packet id
    not in flight is ignored (a client may acknowledge twice after a retransmission)."""
    problem = session.window.wrong_ack(kind, packet_id)
    if problem is not None:
        raise MQTTError(codec.PROTOCOL_ERROR, problem)


class MQTTServer:
    def __init__(
        self,
        broker: Broker,
        config: MqttConfig,
        auth: Authority | None,
        source: str,
        drops: Drops | None = None,
        persistence: SessionPersistence | None = None,
        stored_sessions: list[StoredSession] | None = None,
    ) -> None:
        self.broker = broker
        self.config = config
        # Refused input and dropped messages, counted by reason and logged rate-limited.
        self.drops = drops if drops is not None else Drops(log)
        self.queue_budget = QueueBudget(config.max_queued_bytes_total)
        self.maximum_qos = min(config.maximum_qos, MAX_GRANTED_QOS)
        self.auth = auth  # users and ACLs (None: allow all)
        self.source = source  # the config file, named in listener errors
        self.stopped = False
        self.connections: set[Connection] = set()
        # Sessions by client id; they outlive connections (zmesh.mqtt.sessions).
        # With a data_dir, persistent sessions are on disk too (zmesh.mqtt.sessionstore);
        # ``stored_sessions`` (read from it) are restored at start, before any listener opens.
        self.persistence = persistence
        self._stored_sessions = stored_sessions or []
        self.sessions = SessionStore(self, asyncio.get_running_loop().call_later, self._publish_will, persistence)
        self.publishing: Session | None = None  # whose PUBLISH is being routed (MQTT 5 no local)
        self.refused_logins_total = 0
        self.address: tuple[str, int] | None = None  # the first listener's, as bound
        self.addresses: list[tuple[str, int]] = []  # every listener's, in config.all_listeners order
        self.dropped_total = 0
        self.protocol_errors_total = 0
        self._listeners: ListenerSet | None = None
        self._keepalive_task: asyncio.Task[None] | None = None

    def drop(self, reason: str, detail: str = "", count: int = 1) -> None:
        self.drops.drop(reason, detail, count)

    def _publish_will(self, session: Session, will: codec.Will) -> None:
        """Publish a will, to this node's subscribers and the whole mesh. Like Mosquitto,
        the write ACL decides at this moment, for the user the session had."""
        if self.stopped:
            return  # the server has stopped (a timer that outlived it)
        topic = will.topic
        if topic.startswith("$SYS") or (
            session.auth is not None and not session.auth.authorize(session.username, session.client_id, topic, "write")
        ) or (topic[:1] == "$" and not self.broker.may_publish(topic, session)):
            log.info("client %s: will to %s not published: not authorized", session.client_id, topic)
            return
        properties = will.properties
        if properties and "will_delay_interval" in properties:  # not a PUBLISH property
            properties = {k: v for k, v in properties.items() if k != "will_delay_interval"}
        log.info("client %s: publishing its will to %s", session.client_id, topic)
        try:
            durable = self.broker.publish_nowait(topic, will.payload, will.qos, will.retain, properties or None)
        except topics.TopicError as exc:
            log.warning("client %s: will not published: %s", session.client_id, exc)
            return
        if durable is not None:  # nobody awaits a will's disk write: only collect its outcome
            durable.add_done_callback(lambda f: f.cancelled() or f.exception())

    def restore_sessions(self) -> None:
        """Put the sessions read from disk back (their subscriptions in the router); once.
        The node calls it before its mesh starts; ``start`` does if nobody did."""
        if self.persistence is None or not self._stored_sessions:
            return
        stored, self._stored_sessions = self._stored_sessions, []
        restored = self.sessions.restore(stored, time.time(), time.monotonic())
        log.info("%s: %d persistent sessions restored (%d expired while the node was down, or refused)",
                 self.persistence.disk.path, restored, len(stored) - restored)

    async def start(self) -> None:
        """Open every listener (``mqtt.listen``, then ``[[mqtt.listeners]]``); a listener
        that cannot start raises ``ListenerError`` (a ValueError) naming its config key."""
        listeners = self.config.all_listeners
        assert listeners, "no MQTT listener configured"
        self.restore_sessions()
        self._listeners = ListenerSet(lambda: Connection(self), self.source)
        await self._listeners.open(listeners)
        self.addresses = self._listeners.addresses
        self.address = self.addresses[0]
        self._keepalive_task = asyncio.create_task(self._enforce_keepalive(), name="mqtt-keepalive")

    @property
    def listeners(self) -> list[BoundListener]:
        """The open listeners: each one's config and bound address."""
        return self._listeners.bound if self._listeners is not None else []

    async def _enforce_keepalive(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for connection in list(self.connections):
                if not connection.connected:
                    # The CONNECT deadline counts from accept, not from the last byte: a
                    # client trickling its CONNECT one byte at a time still has CONNECT_TIMEOUT.
                    if now - connection.accepted_at > CONNECT_TIMEOUT:
                        connection.expire_keepalive()
                elif connection.keepalive and now - connection.last_rx > connection.keepalive:
                    connection.expire_keepalive()

    def stop_accepting(self) -> None:
        """Take no new connections (the start of a drain); open ones stay until ``stop``."""
        if self._listeners is not None:
            self._listeners.stop_accepting()

    async def stop(self) -> None:
        self.stopped = True
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        if self._listeners is not None:
            self._listeners.stop_accepting()
        for connection in list(self.connections):
            connection.will = None  # a node shutting down is not the client's failure
            if connection.connected and connection.level == MQTT_5:
                connection._write(encode(Disconnect(RC_SERVER_SHUTTING_DOWN), MQTT_5))
            connection._close()
        if self._listeners is not None:
            self._listeners.close()  # end the WebSocket sockets still waiting for the client's Close
            await self._listeners.wait_closed()
