"""The WebSocket and TLS layers of the MQTT listeners, driven byte by byte without sockets:
any split of the stream gives the inner protocol the same bytes, and any garbage closes
the connection without an exception escaping into the event loop."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)

from tests.tls_certs import issue, make_ca
from zmesh.config import ListenerConfig
from zmesh.mqtt.tls import TlsAdapter, build_server_context
from zmesh.mqtt.websocket import WebSocketAdapter


class FakeSocket(asyncio.Transport):
    """The socket transport under a layer: records what is written and how it ends."""

    def __init__(self) -> None:
        super().__init__({"peername": ("127.0.0.1", 4242)})
        self.written = bytearray()
        self.closed = False
        self.aborted = False

    def write(self, data: Any) -> None:
        assert not self.aborted
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0


class Inner(asyncio.Protocol):
    def __init__(self) -> None:
        self.received = bytearray()
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.received += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def run(body: Callable[[], None]) -> None:
    """Run ``body`` inside a running event loop (the layers set timers)."""

    async def main() -> None:
        body()

    asyncio.run(main())


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


# ---------------------------------------------------------------------------- WebSocket


def connected_client(server_answer: bytes, client: WSConnection) -> None:
    client.receive_data(server_answer)
    events = list(client.events())
    assert isinstance(events[0], AcceptConnection), events


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=4), max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
)
def test_any_framing_and_any_split_give_the_inner_protocol_the_same_bytes(
    messages: list[list[bytes]], cuts: list[int]
) -> None:
    def body() -> None:
        sock, inner = FakeSocket(), Inner()
        adapter = WebSocketAdapter(lambda: inner, "test", 10.0, set())
        adapter.connection_made(sock)
        client = WSConnection(ConnectionType.CLIENT)
        upgrade = client.send(Request(host="localhost", target="/mqtt", subprotocols=["mqtt"]))
        adapter.data_received(upgrade)
        connected_client(bytes(sock.written), client)
        assert inner.transport is not None and inner.transport.get_extra_info("subprotocol") == "mqtt"
        stream = b""
        for fragments in messages:
            for i, fragment in enumerate(fragments):
                stream += client.send(BytesMessage(data=fragment, message_finished=i == len(fragments) - 1))
        for piece in split(stream, cuts):
            adapter.data_received(piece)
        assert bytes(inner.received) == b"".join(b"".join(f) for f in messages)
        assert not sock.closed
        # What the inner writes comes out as binary messages, in order.
        sock.written.clear()
        inner.transport.write(b"\x20\x02\x00\x00")
        inner.transport.write(b"\xd0\x00")
        client.receive_data(bytes(sock.written))
        assert b"".join(e.data for e in client.events() if isinstance(e, BytesMessage)) == b"\x20\x02\x00\x00\xd0\x00"

    run(body)


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=400), upgraded=st.booleans())
def test_garbage_never_raises_and_at_worst_closes(garbage: bytes, upgraded: bool) -> None:
    def body() -> None:
        sock, inner = FakeSocket(), Inner()
        adapter = WebSocketAdapter(lambda: inner, "test", 10.0, set())
        adapter.connection_made(sock)
        if upgraded:
            client = WSConnection(ConnectionType.CLIENT)
            adapter.data_received(client.send(Request(host="localhost", target="/", subprotocols=["mqtt"])))
        adapter.data_received(garbage)
        adapter.connection_lost(None)
        if upgraded:
            assert inner.lost
        # Unmasked client frames are a protocol error: garbage gives the inner nothing that
        # a real client frame could not have carried, and usually nothing at all.
        assert len(inner.received) <= len(garbage)

    run(body)


def test_frames_sent_right_behind_the_request_are_not_lost() -> None:
    """A client that does not wait for the 101 before its first frame (the request and the
    CONNECT in one TCP segment) still gets its CONNECT through."""

    def body() -> None:
        # A first adapter only brings the client to the open state, to frame with it.
        client = WSConnection(ConnectionType.CLIENT)
        request = client.send(Request(host="localhost", target="/", subprotocols=["mqtt"]))
        first_sock = FakeSocket()
        first = WebSocketAdapter(Inner, "test", 10.0, set())
        first.connection_made(first_sock)
        first.data_received(request)
        connected_client(bytes(first_sock.written), client)
        frame = client.send(BytesMessage(data=b"\x10\x0cCONNECT..."))

        sock, inner = FakeSocket(), Inner()
        adapter = WebSocketAdapter(lambda: inner, "test", 10.0, set())
        adapter.connection_made(sock)
        adapter.data_received(request + frame)
        assert bytes(inner.received) == b"\x10\x0cCONNECT..."

    run(body)


_CLIENT_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("binary"), st.binary(max_size=50)),
        st.tuples(st.just("text"), st.binary(max_size=5)),
        st.tuples(st.just("ping"), st.binary(max_size=20)),
        st.tuples(st.just("close"), st.binary(max_size=0)),
        st.tuples(st.just("server close"), st.binary(max_size=0)),
        st.tuples(st.just("server write"), st.binary(min_size=1, max_size=20)),
    ),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(steps=_CLIENT_STEPS)
def test_any_order_of_frames_and_closes_never_raises(steps: list[tuple[str, bytes]]) -> None:
    """Pings after our Close, data after the client's, writes after either: no exception,
    and nothing reaches the inner protocol once the close handshake has begun."""

    def body() -> None:
        sock, inner = FakeSocket(), Inner()
        adapter = WebSocketAdapter(lambda: inner, "test", 10.0, set())
        adapter.connection_made(sock)
        client = WSConnection(ConnectionType.CLIENT)
        adapter.data_received(client.send(Request(host="localhost", target="/", subprotocols=["mqtt"])))
        connected_client(bytes(sock.written), client)
        assert inner.transport is not None
        closing = False
        delivered = b""
        for kind, data in steps:
            if kind == "server close":
                inner.transport.close()
                closing = True
                continue
            if kind == "server write":
                inner.transport.write(data)
                continue
            event: Any = {
                "binary": BytesMessage(data=data),
                "text": TextMessage(data=data.hex()),
                "ping": Ping(payload=data),
                "close": CloseConnection(code=1000),
            }[kind]
            try:
                wire = client.send(event)
            except Exception:  # the client's own state forbids it (after its Close): skip
                continue
            if sock.closed:
                break
            adapter.data_received(wire)
            if kind == "binary" and not closing:
                delivered += data
            closing = closing or kind in ("text", "close")
        assert bytes(inner.received) == delivered

    run(body)


def test_a_plain_get_is_answered_400_and_closed() -> None:
    def body() -> None:
        sock, inner = FakeSocket(), Inner()
        adapter = WebSocketAdapter(lambda: inner, "test", 10.0, set())
        adapter.connection_made(sock)
        adapter.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.written.startswith(b"HTTP/1.1 400") and sock.closed and inner.transport is None

    run(body)


def test_an_upgrade_that_never_completes_is_closed_after_the_timeout() -> None:
    async def main() -> None:
        sock = FakeSocket()
        adapter = WebSocketAdapter(Inner, "test", 0.05, set())
        adapter.connection_made(sock)
        adapter.data_received(b"GET / HTTP/1.1\r\n")  # and then nothing
        for _ in range(100):
            if sock.aborted:
                break
            await asyncio.sleep(0.01)
        assert sock.aborted

    asyncio.run(main())


# ---------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def server_context(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, Path]:
    directory = tmp_path_factory.mktemp("tls-unit")
    ca = make_ca(directory)
    server = issue(ca, directory, "localhost", server=True, file_stem="server")
    listener = ListenerConfig("127.0.0.1:0", certfile=server.cert, keyfile=server.key, key="mqtt.listeners[0]")
    return build_server_context(listener, "test.toml"), ca.cert


def handshake_pump(adapter: TlsAdapter, sock: FakeSocket, client: ssl.SSLObject,
                   incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, cuts: list[int]) -> None:
    """Move bytes between the client object and the adapter until the handshake is done."""
    for _ in range(20):
        try:
            client.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        for piece in split(outgoing.read(), cuts):
            adapter.data_received(piece)
        incoming.write(bytes(sock.written))
        sock.written.clear()
        if done:
            return
    raise AssertionError("handshake did not finish")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.binary(min_size=1, max_size=5000), min_size=1, max_size=5),
       cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=10))
def test_tls_records_in_any_split_reach_the_inner_protocol(
    server_context: tuple[ssl.SSLContext, Path], chunks: list[bytes], cuts: list[int]
) -> None:
    context, ca = server_context

    def body() -> None:
        sock, inner = FakeSocket(), Inner()
        listener = ListenerConfig("127.0.0.1:0", certfile=ca, keyfile=ca, key="mqtt.listeners[0]")
        adapter = TlsAdapter(listener, context, 10.0, lambda cn: inner, set())
        adapter.connection_made(sock)
        client_context = ssl.create_default_context(cafile=str(ca))
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        handshake_pump(adapter, sock, client, incoming, outgoing, cuts)
        assert inner.transport is not None
        for chunk in chunks:
            client.write(chunk)
        for piece in split(outgoing.read(), cuts):
            adapter.data_received(piece)
        assert bytes(inner.received) == b"".join(chunks)
        inner.transport.write(b"answer")
        incoming.write(bytes(sock.written))
        assert client.read(100) == b"answer"

    run(body)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(min_size=1, max_size=600))
def test_tls_garbage_closes_without_raising(server_context: tuple[ssl.SSLContext, Path], garbage: bytes) -> None:
    context, _ = server_context

    def body() -> None:
        sock = FakeSocket()
        listener = ListenerConfig("127.0.0.1:0", key="mqtt.listeners[0]")
        adapter = TlsAdapter(listener, context, 10.0, lambda cn: Inner(), set())
        adapter.connection_made(sock)
        adapter.data_received(garbage)
        adapter.data_received(garbage)  # more after a failure is ignored
        adapter.connection_lost(None)

    run(body)
