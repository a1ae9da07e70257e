"""A small asyncio MQTT client on our own codec, for the CLI (`zmesh pub/sub/peers/topics`)
and the demo. It speaks to any MQTT server, zmesh or Mosquitto alike."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from zmesh.mqtt import codec


class ClientError(Exception):
    """The server refused or broke the conversation; the message says how."""


CONNACK_311 = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


class Client:
    def __init__(self, client_id: str = "", level: int = codec.MQTT_311, keepalive: int = 60) -> None:
        self.client_id, self.level, self.keepalive = client_id, level, keepalive
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._decoder = codec.Decoder(max_packet_size=256 * 1024 * 1024, protocol_level=level)
        self._next_id = 0
        self._acks: dict[tuple[type, int], asyncio.Future[Any]] = {}
        self._messages: asyncio.Queue[codec.Publish | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.closed_reason = ""

    async def connect(
        self,
        host: str,
        port: int,
        username: str | None = None,
        password: str | None = None,
        clean_start: bool = True,
        will: codec.Will | None = None,
        timeout: float = 10.0,
    ) -> codec.ConnAck:
        self._reader, self._writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        connect = codec.Connect(
            client_id=self.client_id,
            protocol_level=self.level,
            clean_start=clean_start,
            keepalive=self.keepalive,
            username=username,
            password=password.encode() if password is not None else None,
            will=will,
        )
        assert self._writer is not None
        self._writer.write(codec.encode(connect, self.level))
        connack = await asyncio.wait_for(self._read_one(), timeout)
        if not isinstance(connack, codec.ConnAck):
            raise ClientError(f"expected CONNACK, got {type(connack).__name__}")
        if connack.reason_code:
            why = CONNACK_311.get(connack.reason_code, "") if self.level < codec.MQTT_5 else ""
            raise ClientError(f"connection refused: code {connack.reason_code:#x} {why}".rstrip())
        self._tasks = [asyncio.create_task(self._read_loop()), asyncio.create_task(self._ping_loop())]
        return connack

    async def _read_one(self) -> codec.Packet:
        assert self._reader is not None
        while True:
            data = await self._reader.read(65536)
            if not data:
                raise ClientError("connection closed by server")
            packets = self._decoder.feed(data)
            if packets:
                for extra in packets[1:]:
                    self._dispatch(extra)
                return packets[0]

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    self.closed_reason = "connection closed by server"
                    break
                for packet in self._decoder.feed(data):
                    self._dispatch(packet)
        except (codec.MQTTError, ConnectionError) as exc:
            self.closed_reason = str(exc)
        finally:
            for future in self._acks.values():
                if not future.done():
                    future.set_exception(ClientError(self.closed_reason or "connection lost"))
            self._messages.put_nowait(None)

    def _dispatch(self, packet: codec.Packet) -> None:
        assert self._writer is not None
        if isinstance(packet, codec.Publish):
            if packet.qos == 1:
                self._writer.write(codec.encode(codec.PubAck(packet.packet_id or 0), self.level))
            elif packet.qos == 2:
                self._writer.write(codec.encode(codec.PubRec(packet.packet_id or 0), self.level))
            self._messages.put_nowait(packet)
        elif isinstance(packet, codec.PubRec):
            self._writer.write(codec.encode(codec.PubRel(packet.packet_id), self.level))
        elif isinstance(packet, codec.PubRel):
            self._writer.write(codec.encode(codec.PubComp(packet.packet_id), self.level))
        elif isinstance(packet, codec.Disconnect):
            self.closed_reason = f"disconnected by server: reason {packet.reason_code:#x}"
        elif isinstance(packet, (codec.PubAck, codec.PubComp, codec.SubAck, codec.UnsubAck)):
            future = self._acks.pop((type(packet), packet.packet_id), None)
            if future is not None and not future.done():
                future.set_result(packet)

    async def _ping_loop(self) -> None:
        if not self.keepalive:
            return
        while self._writer is not None:
            await asyncio.sleep(self.keepalive / 2)
            self._writer.write(codec.encode(codec.PingReq(), self.level))

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def _expect(self, kind: type, packet_id: int) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._acks[(kind, packet_id)] = future
        return future

    async def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, timeout: float = 10.0
    ) -> None:
        """Publish; at QoS 1/2 returns once the server has acknowledged."""
        assert self._writer is not None
        packet_id = self._packet_id() if qos else None
        ack = None
        if packet_id is not None:
            ack = self._expect(codec.PubAck if qos == 1 else codec.PubComp, packet_id)
        self._writer.write(codec.encode(codec.Publish(topic, payload, qos, retain, packet_id=packet_id), self.level))
        await self._writer.drain()
        if ack is not None:
            result = await asyncio.wait_for(ack, timeout)
            if getattr(result, "reason_code", 0) >= 0x80:
                raise ClientError(f"publish to {topic} refused: reason {result.reason_code:#x}")

    async def subscribe(self, filters: list[tuple[str, int]], timeout: float = 10.0) -> list[int]:
        assert self._writer is not None
        packet_id = self._packet_id()
        ack = self._expect(codec.SubAck, packet_id)
        requests = [codec.SubscriptionRequest(f, q) for f, q in filters]
        self._writer.write(codec.encode(codec.Subscribe(packet_id, requests), self.level))
        result: codec.SubAck = await asyncio.wait_for(ack, timeout)
        return list(result.reason_codes)

    async def messages(self) -> AsyncIterator[codec.Publish]:
        while True:
            packet = await self._messages.get()
            if packet is None:
                raise ClientError(self.closed_reason or "connection lost")
            yield packet

    async def disconnect(self) -> None:
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        with contextlib.suppress(ConnectionError):
            writer.write(codec.encode(codec.Disconnect(), self.level))
            await writer.drain()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
