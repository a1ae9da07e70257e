"""A small asyncio MQTT client on our own codec, for the CLI (`zmesh pub/sub/peers/topics`)
and the demo. It speaks to any MQTT server, zmesh or Mosquitto alike, over TCP, TLS, and
WebSocket (``ws``/``wss``: wsproto, imported only then).

Every failure is a ``ClientError`` whose message names the server (``host:port``) and what
happened, with ``code`` the exit status mosquitto_pub/sub would give (the CONNACK code for a
refused connection, else 1), so that the command line never shows a traceback for a wrong
port, an unknown host or a message too large."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from zmesh.mqtt import codec

if TYPE_CHECKING:
    import ssl


class ClientError(Exception):
    """The server refused or broke the conversation; the message says how.

    ``code`` is the exit status a mosquitto client gives for it."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


CONNACK_311 = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorised",
}
CONNACK_5 = {
    0x80: "unspecified error", 0x81: "malformed packet", 0x82: "protocol error",
    0x84: "unsupported protocol version", 0x85: "client identifier not valid",
    0x86: "bad user name or password", 0x87: "not authorized", 0x88: "server unavailable",
    0x89: "server busy", 0x8A: "banned", 0x8C: "bad authentication method",
    0x95: "packet too large", 0x97: "quota exceeded", 0x99: "payload format invalid",
    0x9A: "retain not supported", 0x9B: "QoS not supported", 0x9F: "connection rate exceeded",
}
PACKET_NAMES = {
    codec.Connect: "CONNECT", codec.ConnAck: "CONNACK", codec.Publish: "PUBLISH",
    codec.PubAck: "PUBACK", codec.PubRec: "PUBREC", codec.PubRel: "PUBREL", codec.PubComp: "PUBCOMP",
    codec.Subscribe: "SUBSCRIBE", codec.SubAck: "SUBACK", codec.Unsubscribe: "UNSUBSCRIBE",
    codec.UnsubAck: "UNSUBACK", codec.PingReq: "PINGREQ", codec.PingResp: "PINGRESP",
    codec.Disconnect: "DISCONNECT", codec.Auth: "AUTH",
}
# A node closes a connection whose packet exceeds mqtt.max_packet_size; a 3.1.1 server has
# no way to say so, so a close right after a large PUBLISH names the likely cause.
LARGE_PACKET = 64 * 1024
NOT_MQTT = "is this an MQTT port? (a node's MQTT port is mqtt.listen, default 1883; mesh.listen is for peers)"


def describe(packet: codec.Packet) -> str:
    """One line for ``-d``, in the spirit of mosquitto's debug output."""
    name = PACKET_NAMES.get(type(packet), type(packet).__name__)
    if isinstance(packet, codec.Publish):
        return (f"{name} (d{int(packet.dup)}, q{packet.qos}, r{int(packet.retain)}, m{packet.packet_id or 0}, "
                f"'{packet.topic}', ... ({len(packet.payload)} bytes))")
    if isinstance(packet, codec.ConnAck):
        return f"{name} ({packet.reason_code})"
    if isinstance(packet, codec.SubAck):
        return f"{name} (m{packet.packet_id}, {', '.join(str(c) for c in packet.reason_codes)})"
    if isinstance(packet, (codec.PubAck, codec.PubRec, codec.PubRel, codec.PubComp)):
        return f"{name} (m{packet.packet_id}, rc{getattr(packet, 'reason_code', 0)})"
    if isinstance(packet, codec.Subscribe):
        return f"{name} (m{packet.packet_id}, {', '.join(f'{r.filter!r} q{r.qos}' for r in packet.subscriptions)})"
    return name


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if exc.errno == errno.ECONNREFUSED:
        return "connection refused (is a node running, and is this its MQTT port, mqtt.listen?)"
    return exc.strerror or str(exc) or type(exc).__name__


class _WebSocket:
    """Client side of RFC 6455 over an asyncio stream: binary messages carry the MQTT bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, path: str) -> None:
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import Request

        self.reader, self.writer = reader, writer
        self.ws = WSConnection(ConnectionType.CLIENT)
        writer.write(self.ws.send(Request(host=host, target=path or "/", subprotocols=["mqtt"])))
        self._buffer = bytearray()
        self.accepted = False

    async def handshake(self) -> None:
        while not self.accepted:
            if not await self.read_into():
                raise ConnectionResetError("closed during the WebSocket upgrade")

    async def read_into(self) -> bool:
        """Read from the socket and feed wsproto; False at end of stream."""
        from wsproto.events import (
            AcceptConnection,
            BytesMessage,
            CloseConnection,
            Ping,
            RejectConnection,
        )

        data = await self.reader.read(65536)
        if not data:
            return False
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, AcceptConnection):
                self.accepted = True
            elif isinstance(event, RejectConnection):
                raise ConnectionRefusedError(errno.ECONNREFUSED, f"WebSocket upgrade refused (HTTP {event.status_code})")
            elif isinstance(event, BytesMessage):
                self._buffer += event.data
            elif isinstance(event, Ping):
                self.writer.write(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                return False
        return True

    async def read(self) -> bytes:
        while not self._buffer:
            if not await self.read_into():
                return b""
        data, self._buffer = bytes(self._buffer), bytearray()
        return data

    def write(self, data: bytes) -> None:
        from wsproto.events import Message

        self.writer.write(self.ws.send(Message(data=data)))


class Client:
    def __init__(self, client_id: str = "", level: int = codec.MQTT_311, keepalive: int = 60,
                 debug: Callable[[str], None] | None = None) -> None:
        self.client_id, self.level, self.keepalive = client_id, level, keepalive
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ws: _WebSocket | None = None
        self._decoder = codec.Decoder(max_packet_size=256 * 1024 * 1024, protocol_level=level)
        self._next_id = 0
        self._acks: dict[tuple[type, int], asyncio.Future[Any]] = {}
        self._messages: asyncio.Queue[codec.Publish | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._debug = debug
        self.server = ""  # "host:port", for messages
        self.server_max_packet = 0  # MQTT 5 CONNACK maximum_packet_size; 0: not said
        self.closed_reason = ""

    # ------------------------------------------------------------------ I/O

    def _send(self, packet: codec.Packet) -> None:
        assert self._writer is not None
        if self._debug is not None:
            self._debug(f"Client {self.client_id or '(null)'} sending {describe(packet)}")
        data = codec.encode(packet, self.level)
        if self._ws is not None:
            self._ws.write(data)
        else:
            self._writer.write(data)

    async def _recv(self) -> bytes:
        if self._ws is not None:
            return await self._ws.read()
        assert self._reader is not None
        return await self._reader.read(65536)

    def _feed(self, data: bytes) -> list[codec.Packet]:
        try:
            return self._decoder.feed(data)
        except codec.MQTTError as exc:
            raise ClientError(f"{self.server} does not speak MQTT ({exc.reason}): {NOT_MQTT}") from None

    async def connect(
        self,
        host: str,
        port: int,
        username: str | None = None,
        password: str | None = None,
        clean_start: bool = True,
        will: codec.Will | None = None,
        timeout: float = 10.0,
        properties: dict[str, Any] | None = None,
        tls: ssl.SSLContext | None = None,
        websocket_path: str | None = None,
    ) -> codec.ConnAck:
        """Connect and wait for the CONNACK; ClientError (naming ``host:port``) otherwise."""
        self.server = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=tls, server_hostname=host if tls else None), timeout)
            if websocket_path is not None:
                self._ws = _WebSocket(self._reader, self._writer, host, websocket_path)
                await asyncio.wait_for(self._ws.handshake(), timeout)
        except TimeoutError:
            raise ClientError(f"{self.server}: no answer within {timeout:g} s") from None
        except OSError as exc:  # refused, unreachable, no such host, TLS verification failed
            raise ClientError(f"{self.server}: {_os_reason(exc)}") from None
        connect = codec.Connect(
            client_id=self.client_id,
            protocol_level=self.level,
            clean_start=clean_start,
            keepalive=self.keepalive,
            username=username,
            password=password.encode() if password is not None else None,
            will=will,
            properties=dict(properties or {}),
        )
        self._send(connect)
        try:
            connack = await asyncio.wait_for(self._read_one(), timeout)
        except TimeoutError:
            raise ClientError(f"{self.server}: no CONNACK within {timeout:g} s: {NOT_MQTT}") from None
        except OSError as exc:
            raise ClientError(f"{self.server}: {_os_reason(exc)} before CONNACK: {NOT_MQTT}") from None
        if self._debug is not None:
            self._debug(f"Client {self.client_id or '(null)'} received {describe(connack)}")
        if not isinstance(connack, codec.ConnAck):
            raise ClientError(f"{self.server}: expected CONNACK, got {type(connack).__name__}")
        if connack.reason_code:
            table = CONNACK_311 if self.level < codec.MQTT_5 else CONNACK_5
            why = table.get(connack.reason_code, "refused")
            self._close_now()
            raise ClientError(f"{self.server}: connection refused: {why} (code {connack.reason_code})",
                              connack.reason_code)
        self.server_max_packet = int(connack.properties.get("maximum_packet_size", 0) or 0)
        if not self.client_id and connack.properties.get("assigned_client_identifier"):
            self.client_id = connack.properties["assigned_client_identifier"]
        self._tasks = [asyncio.create_task(self._read_loop()), asyncio.create_task(self._ping_loop())]
        return connack

    def _close_now(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def _read_one(self) -> codec.Packet:
        while True:
            data = await self._recv()
            if not data:
                raise ClientError(f"{self.server} closed the connection before CONNACK: {NOT_MQTT}")
            packets = self._feed(data)
            if packets:
                for extra in packets[1:]:
                    self._dispatch(extra)
                return packets[0]

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._recv()
                if not data:
                    self.closed_reason = self.closed_reason or f"{self.server} closed the connection"
                    break
                for packet in self._feed(data):
                    self._dispatch(packet)
        except ClientError as exc:
            self.closed_reason = str(exc)
        except OSError as exc:
            self.closed_reason = f"{self.server}: {_os_reason(exc)}"
        finally:
            for future in self._acks.values():
                if not future.done():
                    future.set_exception(ClientError(self.closed_reason or "connection lost"))
            self._messages.put_nowait(None)

    def _dispatch(self, packet: codec.Packet) -> None:
        if self._debug is not None and not isinstance(packet, codec.ConnAck):
            self._debug(f"Client {self.client_id or '(null)'} received {describe(packet)}")
        if self._writer is None:
            return
        if isinstance(packet, codec.Publish):
            if packet.qos == 1:
                self._send(codec.PubAck(packet.packet_id or 0))
            elif packet.qos == 2:
                self._send(codec.PubRec(packet.packet_id or 0))
            self._messages.put_nowait(packet)
        elif isinstance(packet, codec.PubRec):
            self._send(codec.PubRel(packet.packet_id))
        elif isinstance(packet, codec.PubRel):
            self._send(codec.PubComp(packet.packet_id))
        elif isinstance(packet, codec.Disconnect):
            reason = packet.properties.get("reason_string") or CONNACK_5.get(packet.reason_code, "")
            self.closed_reason = f"{self.server} disconnected us: reason {packet.reason_code:#x} {reason}".rstrip()
        elif isinstance(packet, (codec.PubAck, codec.PubComp, codec.SubAck, codec.UnsubAck)):
            future = self._acks.pop((type(packet), packet.packet_id), None)
            if future is not None and not future.done():
                future.set_result(packet)

    async def _ping_loop(self) -> None:
        if not self.keepalive:
            return
        while self._writer is not None:
            await asyncio.sleep(self.keepalive / 2)
            if self._writer is not None:
                self._send(codec.PingReq())

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def _expect(self, kind: type, packet_id: int) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._acks[(kind, packet_id)] = future
        return future

    def _abandon(self, kind: type, packet_id: int) -> None:
        """Forget an acknowledgement nobody will await (the send failed first).

        The read loop fails every pending future when the connection drops; one the
        caller no longer awaits would otherwise be reported at garbage collection as
        "Future exception was never retrieved", a second error after the real one.
        """
        future = self._acks.pop((kind, packet_id), None)
        if future is None:
            return
        if future.done():
            if not future.cancelled():
                future.exception()
        else:
            future.cancel()

    def _live_writer(self) -> asyncio.StreamWriter:
        if self._writer is None or self._writer.is_closing():
            raise ClientError(self.closed_reason or f"{self.server}: not connected")
        return self._writer

    async def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, timeout: float = 10.0,
        properties: dict[str, Any] | None = None,
    ) -> None:
        """Publish; at QoS 1/2 returns once the server has acknowledged."""
        writer = self._live_writer()
        packet_id = self._packet_id() if qos else None
        publish = codec.Publish(topic, payload, qos, retain, packet_id=packet_id, properties=dict(properties or {}))
        size = len(payload) + len(topic) + 16
        if self.server_max_packet and size > self.server_max_packet:
            raise ClientError(f"{self.server}: the message ({len(payload)} bytes) is larger than the server's "
                              f"maximum packet size ({self.server_max_packet} bytes)")
        ack = None
        ack_kind = codec.PubAck if qos == 1 else codec.PubComp
        if packet_id is not None:
            ack = self._expect(ack_kind, packet_id)
        self._send(publish)
        try:
            await writer.drain()
            if ack is None:
                return
            result = await asyncio.wait_for(ack, timeout)
        except TimeoutError:
            raise ClientError(f"{self.server}: no acknowledgement of the publish to {topic} within {timeout:g} s") from None
        except (ClientError, OSError) as exc:
            if packet_id is not None:
                self._abandon(ack_kind, packet_id)
            why = str(exc) if isinstance(exc, ClientError) else f"{self.server}: {_os_reason(exc)}"
            if len(payload) >= LARGE_PACKET:
                why += (f" after a {len(payload)}-byte message: larger than the server accepts? "
                        "(a node's mqtt.max_packet_size, default 1048576)")
            raise ClientError(why) from None
        if getattr(result, "reason_code", 0) >= 0x80:
            raise ClientError(f"{self.server}: publish to {topic} refused: reason {result.reason_code:#x}")

    async def subscribe(self, filters: list[tuple[str, int]], timeout: float = 10.0,
                        properties: dict[str, Any] | None = None) -> list[int]:
        self._live_writer()
        packet_id = self._packet_id()
        ack = self._expect(codec.SubAck, packet_id)
        requests = [codec.SubscriptionRequest(f, q) for f, q in filters]
        self._send(codec.Subscribe(packet_id, requests, properties=dict(properties or {})))
        try:
            result: codec.SubAck = await asyncio.wait_for(ack, timeout)
        except TimeoutError:
            raise ClientError(f"{self.server}: no SUBACK within {timeout:g} s") from None
        return list(result.reason_codes)

    async def messages(self) -> AsyncIterator[codec.Publish]:
        while True:
            packet = await self._messages.get()
            if packet is None:
                raise ClientError(self.closed_reason or f"{self.server}: connection lost")
            yield packet

    async def disconnect(self, properties: dict[str, Any] | None = None) -> None:
        if self._writer is None:
            return
        writer = self._writer
        with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
            if not writer.is_closing():
                self._send(codec.Disconnect(properties=dict(properties or {})))
                await asyncio.wait_for(writer.drain(), 2)
        self._writer = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError, OSError):
            await asyncio.wait_for(writer.wait_closed(), 2)
