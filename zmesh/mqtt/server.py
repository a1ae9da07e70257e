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
from typing import TYPE_CHECKING, Any

from zmesh import topics
from zmesh.config import MqttConfig, parse_hostport
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
from zmesh.mqtt.session import InboundQoS2, OutboundWindow, Outgoing

if TYPE_CHECKING:
    from zmesh.node import Node

log = logging.getLogger("zmesh.mqtt")

CONNECT_TIMEOUT = 10.0  # a socket that never sends CONNECT is closed after this
WRITE_BUFFER_LIMIT = 8 * 1024 * 1024  # past this, QoS 0 messages to a slow client are dropped
MAX_GRANTED_QOS = 1  # outbound QoS 2 comes with the full MQTT front door

# 3.1.1 CONNACK return codes
CONNACK_UNACCEPTABLE_VERSION = 1
CONNACK_IDENTIFIER_REJECTED = 2
# MQTT 5 reason codes used here
RC_UNSPECIFIED = 0x80
RC_CLIENT_ID_NOT_VALID = 0x85
RC_NOT_AUTHORIZED = 0x87
RC_KEEP_ALIVE_TIMEOUT = 0x8D
RC_SESSION_TAKEN_OVER = 0x8E
RC_TOPIC_FILTER_INVALID = 0x8F
RC_PACKET_ID_NOT_FOUND = 0x92
RC_TOPIC_ALIAS_INVALID = 0x94
RC_NO_SUBSCRIPTION = 0x11
RC_SERVER_SHUTTING_DOWN = 0x8B
RC_DISCONNECT_WITH_WILL = 0x04

PINGRESP = b"\xd0\x00"


class Connection(asyncio.Protocol):
    def __init__(self, server: MQTTServer) -> None:
        self.server = server
        self.node = server.node
        self.transport: asyncio.Transport | None = None
        self.decoder = codec.Decoder(max_packet_size=server.config.max_packet_size)
        self.client_id = ""
        self.level = 4
        self.connected = False
        self.closing = False
        self.keepalive = CONNECT_TIMEOUT
        self.last_rx = time.monotonic()
        self.will: codec.Will | None = None
        self.window = OutboundWindow(server.config.max_inflight, server.config.max_queued)
        self.inbound_qos2 = InboundQoS2(server.config.max_inflight * 4)
        self.dropped = 0
        self.peer = "?"
        self._out: list[bytes] = []
        self._held_acks: deque[tuple[asyncio.Future[None] | None, bytes, int, int]] = deque()
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Without it Nagle and delayed ACK add ~40 ms to a small message.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        error: MQTTError | None = None
        try:
            packets = self.decoder.feed(data)
        except MQTTError as exc:
            # The packets before the bad one in this read are valid and are handled first
            # (a CONNECT gets its CONNACK), as if they had arrived in an earlier read.
            packets, error = getattr(exc, "packets", None) or [], exc
        try:
            for packet in packets:
                if self.closing:
                    return
                handler = self._handlers.get(type(packet))
                if handler is None:
                    raise MQTTError(codec.PROTOCOL_ERROR, f"unexpected {type(packet).__name__}")
                handler(self, packet)
            if error is not None and not self.closing:
                raise error
        except MQTTError as exc:
            self._fail(exc.reason_code, str(exc))
        except topics.TopicError as exc:
            self._fail(codec.PROTOCOL_ERROR, str(exc))

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if not self.connected:
            return
        self.connected = False
        if self.server.sessions.get(self.client_id) is self:
            del self.server.sessions[self.client_id]
        self.node.remove_subscriber(self)
        if self.will is not None:
            will, self.will = self.will, None
            log.info("client %s gone without DISCONNECT: publishing its will to %s", self.client_id, will.topic)
            self._publish_will(will)
        else:
            log.debug("client %s disconnected", self.client_id)

    # ------------------------------------------------------------------ packets in

    def _on_connect(self, packet: Connect) -> None:
        self.level = packet.protocol_level
        self.decoder.protocol_level = packet.protocol_level
        client_id = packet.client_id
        assigned = False
        if not client_id:
            if self.level < MQTT_5 and not packet.clean_start or self.level == 3:
                self._refuse(CONNACK_IDENTIFIER_REJECTED, RC_CLIENT_ID_NOT_VALID, "empty client id without clean session")
                return
            client_id, assigned = f"zmesh-{secrets.token_hex(8)}", True
        self.client_id = client_id
        previous = self.server.sessions.get(client_id)
        if previous is not None:
            previous.take_over()
        self.server.sessions[client_id] = self
        self.connected = True
        self.keepalive = packet.keepalive * 1.5 if packet.keepalive else 0.0
        self.will = packet.will
        properties: dict[str, Any] = {}
        if self.level == MQTT_5:
            properties = {
                "maximum_qos": MAX_GRANTED_QOS,
                "topic_alias_maximum": 0,
                "retain_available": 1,
                "wildcard_subscription_available": 1,
                "shared_subscription_available": 1,
                "subscription_identifier_available": 0,
                "maximum_packet_size": self.server.config.max_packet_size,
                "receive_maximum": max(1, self.server.config.max_inflight),
            }
            if assigned:
                properties["assigned_client_identifier"] = client_id
        self._write(encode(codec.ConnAck(False, 0, properties), self.level))
        log.debug("client %s connected from %s (MQTT level %d)", client_id, self.peer, self.level)

    def _on_publish(self, packet: Publish) -> None:
        if not self.connected:
            raise MQTTError(codec.PROTOCOL_ERROR, "PUBLISH before CONNECT")
        properties: dict[str, Any] | None = packet.properties
        if properties:
            if "topic_alias" in properties:
                raise MQTTError(RC_TOPIC_ALIAS_INVALID, "topic aliases are not enabled (topic_alias_maximum 0)")
            properties = {k: v for k, v in properties.items() if k != "subscription_identifier"} or None
        else:
            properties = None
        topic, qos = packet.topic, packet.qos
        allowed = not topic.startswith("$SYS")  # $SYS is the node's to write, as in Mosquitto
        if qos == 0:
            if allowed:
                self.node.publish_nowait(topic, packet.payload, 0, packet.retain, properties)
        elif qos == 1:
            durable = None
            if allowed:
                durable = self.node.publish_nowait(topic, packet.payload, 1, packet.retain, properties)
            self._ack(0x40, packet.packet_id, 0 if allowed else RC_NOT_AUTHORIZED, durable)
        else:
            assert packet.packet_id is not None
            durable = None
            if self.inbound_qos2.received(packet.packet_id):
                if self.inbound_qos2.full():
                    raise MQTTError(0x93, "too many unreleased QoS 2 messages (receive maximum exceeded)")
                if allowed:
                    durable = self.node.publish_nowait(topic, packet.payload, 2, packet.retain, properties)
            self._ack(0x50, packet.packet_id, 0 if allowed else RC_NOT_AUTHORIZED, durable)

    def _ack(
        self, header: int, packet_id: int | None, reason: int, durable: asyncio.Future[None] | None = None
    ) -> None:
        """Acknowledge a publish; after ``durable`` completes (a retained write reaching the
        disk) when given. Acks leave in the order the publishes came, as MQTT requires."""
        assert packet_id is not None
        if reason and self.level == MQTT_5:
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
            if durable is not None and durable.exception() is not None:
                # Not on disk: never acknowledge it. MQTT 5 says why; 3.1.1 has no way to,
                # so the connection closes and the client sends the message again.
                if self.level != MQTT_5:
                    self._fail(RC_UNSPECIFIED, "retained message could not be stored")
                    return
                data = bytes((header, 3)) + packet_id.to_bytes(2, "big") + bytes((RC_UNSPECIFIED,))
            self._write(data)

    def _on_puback(self, packet: PubAck) -> None:
        for message in self.window.acknowledge(packet.packet_id):
            self._send(message)

    def _on_pubrec(self, packet: PubRec) -> None:
        # We never send QoS 2 yet (MAX_GRANTED_QOS), so a PUBREC names no message of ours.
        self._write(encode(PubRel(packet.packet_id, RC_PACKET_ID_NOT_FOUND if self.level == MQTT_5 else 0), self.level))

    def _on_pubrel(self, packet: PubRel) -> None:
        known = self.inbound_qos2.released(packet.packet_id)
        reason = 0 if known or self.level != MQTT_5 else RC_PACKET_ID_NOT_FOUND
        self._write(encode(PubComp(packet.packet_id, reason), self.level))

    def _on_pubcomp(self, packet: PubComp) -> None:
        pass  # see _on_pubrec

    def _on_subscribe(self, packet: Subscribe) -> None:
        if not self.connected:
            raise MQTTError(codec.PROTOCOL_ERROR, "SUBSCRIBE before CONNECT")
        granted: list[tuple[str, int]] = []
        codes = []
        for request in packet.subscriptions:
            try:
                topics.validate_topic_filter(request.filter)
            except topics.TopicError as exc:
                log.info("client %s: refused filter %r: %s", self.client_id, request.filter, exc)
                codes.append(RC_TOPIC_FILTER_INVALID if self.level == MQTT_5 else 0x80)
                continue
            qos = min(request.qos, MAX_GRANTED_QOS)
            codes.append(qos)
            granted.append((request.filter, qos))
        self._write(encode(codec.SubAck(packet.packet_id, codes), self.level))
        for filt, qos in granted:  # after SUBACK, so retained messages follow it
            self.node.add_subscription(self, filt, qos)

    def _on_unsubscribe(self, packet: Unsubscribe) -> None:
        if not self.connected:
            raise MQTTError(codec.PROTOCOL_ERROR, "UNSUBSCRIBE before CONNECT")
        codes = [0 if self.node.remove_subscription(self, f) else RC_NO_SUBSCRIPTION for f in packet.filters]
        self._write(encode(codec.UnsubAck(packet.packet_id, codes if self.level == MQTT_5 else []), self.level))

    def _on_pingreq(self, packet: PingReq) -> None:
        self._write(PINGRESP)

    def _on_disconnect(self, packet: Disconnect) -> None:
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

    # ------------------------------------------------------------------ packets out

    def deliver(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        origin: str,
        properties: dict[str, Any] | None,
    ) -> None:
        if not self.connected or self.closing:
            return
        if qos == 0:
            assert self.transport is not None
            if self.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
                self.dropped += 1
                self.server.dropped_total += 1
                return
            props = encode_properties(properties) if properties and self.level == MQTT_5 else b""
            self._write(encode_publish(topic.encode(), payload, 0, retain, False, None, self.level, props))
            return
        message = self.window.offer(Outgoing(topic, payload, qos, retain, properties))
        if message is not None:
            self._send(message)
        elif self.window.dropped > self.dropped:
            self.server.dropped_total += self.window.dropped - self.dropped
            self.dropped = self.window.dropped

    def deliver_plain(self, topic: str, payloads: list[bytes], origin: str) -> None:
        if not self.connected or self.closing:
            return
        assert self.transport is not None
        if self.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            self.dropped += len(payloads)
            self.server.dropped_total += len(payloads)
            return
        encoded_topic, level = topic.encode(), self.level
        write = self._write
        for payload in payloads:
            write(encode_publish(encoded_topic, payload, 0, False, False, None, level, b""))

    def _send(self, message: Outgoing) -> None:
        props = encode_properties(message.properties) if message.properties and self.level == MQTT_5 else b""
        self._write(
            encode_publish(
                message.topic.encode(), message.payload, message.qos, message.retain, False,
                message.packet_id, self.level, props,
            )
        )

    def _write(self, data: bytes) -> None:
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_out)

    def _flush_out(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.transport.is_closing():
            out, self._out = self._out, []
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        else:
            self._out.clear()

    # ------------------------------------------------------------------ endings

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
            self._write(encode(Disconnect(reason_code), MQTT_5))
        self._close()

    def _close(self) -> None:
        self.closing = True
        self._flush_out()
        if self.transport is not None:
            self.transport.close()

    def take_over(self) -> None:
        """Another connection claimed our client id: MQTT says this one goes."""
        log.info("client %s: session taken over by a new connection", self.client_id)
        if self.level == MQTT_5:
            self._write(encode(Disconnect(RC_SESSION_TAKEN_OVER), MQTT_5))
        self.server.sessions.pop(self.client_id, None)
        self._close()

    def expire_keepalive(self) -> None:
        log.info("client %s (%s): keepalive expired", self.client_id or "-", self.peer)
        if self.connected and self.level == MQTT_5:
            self._write(encode(Disconnect(RC_KEEP_ALIVE_TIMEOUT), MQTT_5))
        self._close()
        if self.transport is not None:
            self.transport.abort()  # a silent peer may never read what we write

    def _publish_will(self, will: codec.Will) -> None:
        try:
            self.node.publish_nowait(will.topic, will.payload, will.qos, will.retain, will.properties or None)
        except topics.TopicError as exc:
            log.warning("client %s: will not published: %s", self.client_id, exc)


class MQTTServer:
    def __init__(self, node: Node, config: MqttConfig) -> None:
        self.node = node
        self.config = config
        self.connections: set[Connection] = set()
        self.sessions: dict[str, Connection] = {}
        self.address: tuple[str, int] | None = None
        self.dropped_total = 0
        self.protocol_errors_total = 0
        self._server: asyncio.Server | None = None
        self._keepalive_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        assert self.config.listen
        host, port = parse_hostport(self.config.listen)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Connection(self), host, port, reuse_address=True)
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        self._keepalive_task = asyncio.create_task(self._enforce_keepalive(), name="mqtt-keepalive")
        log.info("MQTT listening on %s:%d", *self.address)

    async def _enforce_keepalive(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for connection in list(self.connections):
                if connection.keepalive and now - connection.last_rx > connection.keepalive:
                    connection.expire_keepalive()

    async def stop(self) -> None:
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.will = None  # a node shutting down is not the client's failure
            if connection.connected and connection.level == MQTT_5:
                connection._write(encode(Disconnect(RC_SERVER_SHUTTING_DOWN), MQTT_5))
            connection._close()
        if self._server is not None:
            await self._server.wait_closed()
