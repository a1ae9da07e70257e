"""The CLI's MQTT client against a server that resets the connection mid-publish.

A node closes a connection whose PUBLISH exceeds its packet limit; the client must then
raise one ClientError and leave nothing behind (no "Future exception was never
retrieved" printed at exit, which `zmesh pub` users saw as a second error)."""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
from typing import Any

import pytest

from zmesh.mqtt import codec
from zmesh.mqtt.client import Client, ClientError

CONNACK = bytes([0x20, 2, 0, 0])


async def _resetting_server(started: asyncio.Event, port: list[int], rounds: int) -> None:
    """Accept `rounds` connections; answer CONNECT, then reset at the first bytes after it."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port.append(listener.getsockname()[1])
    started.set()
    loop = asyncio.get_running_loop()
    try:
        for _ in range(rounds):
            conn, _ = await loop.sock_accept(listener)
            with conn:
                conn.setblocking(False)
                await loop.sock_recv(conn, 4096)  # the CONNECT
                await loop.sock_sendall(conn, CONNACK)
                await loop.sock_recv(conn, 4096)  # the start of the large PUBLISH
                # SO_LINGER 0: close sends RST, as a node's kernel does with unread data
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        listener.close()


def test_a_reset_mid_publish_is_one_error_and_nothing_unretrieved() -> None:
    rounds = 10
    reports: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: reports.append(context))
        started, port = asyncio.Event(), []
        server = asyncio.create_task(_resetting_server(started, port, rounds))
        await asyncio.wait_for(started.wait(), 5)
        for _ in range(rounds):
            client = Client("t", codec.MQTT_311)
            await client.connect("127.0.0.1", port[0], timeout=5)
            with pytest.raises(ClientError) as caught:
                await client.publish("x", b"z" * (4 * 1024 * 1024), qos=1, timeout=5)
            assert "larger than the server accepts" in str(caught.value)
            await client.disconnect()
            del client
            gc.collect()
        await asyncio.wait_for(server, 5)
        gc.collect()

    asyncio.run(main())
    gc.collect()
    assert not [r for r in reports if "never retrieved" in str(r.get("message"))], reports
