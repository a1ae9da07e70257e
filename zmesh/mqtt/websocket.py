"""MQTT over WebSocket (RFC 6455; MQTT 3.1.1 and 5.0 chapter 6) as an asyncio adapter.

The HTTP upgrade and the framing are wsproto's (sans-I/O, python-hyper); this module only
moves bytes. After the upgrade the inner MQTT protocol sees an ordinary byte stream through
a ``WebSocketTransport``: the payloads of binary messages are fed to it in order whatever
the frame boundaries (an MQTT packet may span frames and a frame may hold several
packets), and each ``write`` goes out as one binary message.

As the spec asks, the client must offer the subprotocol ``mqtt`` (``mqttv3.1`` is also
taken, from old clients), a text frame closes the connection, and any request path is
accepted (as Mosquitto does). A request that is not a WebSocket upgrade gets an HTTP error
and only its own socket is closed. No compression extension is offered: a deflate bomb
should not get past the MQTT packet size limit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from zmesh.mqtt.wrapped import LayerProtocol, WrappedTransport

log = logging.getLogger("zmesh.mqtt")

SUBPROTOCOLS = ("mqtt", "mqttv3.1")  # in order of preference
CLOSE_TIMEOUT = 2.0  # after our Close frame, how long the client has to answer with its own


class WebSocketTransport(WrappedTransport):
    """What the inner MQTT protocol writes to: each write goes out as one binary message."""

    def __init__(self, adapter: WebSocketAdapter, raw: asyncio.Transport) -> None:
        super().__init__(raw, {"subprotocol": adapter.subprotocol, "path": adapter.path})
        self._adapter = adapter

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing and data:
            self._raw.write(self._adapter.frame(bytes(data)))

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._adapter.close_websocket(CloseReason.NORMAL_CLOSURE)


class WebSocketAdapter(LayerProtocol):
    """The protocol of one WebSocket listener socket: upgrade, then unwrap into ``make_inner()``."""

    def __init__(
        self,
        make_inner: Callable[[], asyncio.Protocol],
        name: str,
        upgrade_timeout: float,
        live: set[Any],
    ) -> None:
        self._make_inner = make_inner
        self._name = name  # the listener, for log lines
        self._upgrade_timeout = upgrade_timeout
        self._live = live
        self._ws = WSConnection(ConnectionType.SERVER)
        self._raw: asyncio.Transport | None = None
        self._inner: asyncio.Protocol | None = None
        self._transport: WebSocketTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.subprotocol: str | None = None
        self.path = ""
        self._peer = "?"

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not isinstance(asyncio.Transport): uvloop's transports are not subclasses.
        self._raw = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self._live.add(self)
        # A socket that never completes the upgrade must not hold a slot for ever.
        self._timer = asyncio.get_running_loop().call_later(self._upgrade_timeout, self._upgrade_timed_out)

    def data_received(self, data: bytes) -> None:
        try:
            self._ws.receive_data(data)
        except RemoteProtocolError as exc:
            self._refuse_request(str(exc), exc.event_hint)
            return
        except LocalProtocolError:  # bytes after the close handshake ended
            self._raw.close()  # type: ignore[union-attr]
            return
        for event in self._ws.events():
            if isinstance(event, BytesMessage):
                if self._inner is not None and not self._stopped():
                    self._inner.data_received(bytes(event.data))
            elif isinstance(event, Request):
                self._on_request(event)
            elif isinstance(event, Ping):
                self._send(event.response())
            elif isinstance(event, CloseConnection):
                self._on_close(event)
                return
            elif isinstance(event, TextMessage):
                # MQTT over WebSocket is binary; the spec says to close on a text frame.
                log.info("%s: client %s sent a text frame; MQTT needs binary frames: closing",
                         self._name, self._peer)
                self.close_websocket(CloseReason.UNSUPPORTED_DATA, "MQTT needs binary frames")
                return
            # Pong: nothing to do.

    def eof_received(self) -> None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._live.discard(self)
        self._cancel_timer()
        self._end_inner(exc)

    # ------------------------------------------------------------------ the upgrade

    def _on_request(self, request: Request) -> None:
        offered = set(request.subprotocols)
        chosen = next((p for p in SUBPROTOCOLS if p in offered), None)
        if chosen is None:
            self._refuse_request(
                f"no 'mqtt' WebSocket subprotocol offered (got {sorted(offered) or 'none'})",
                RejectConnection(status_code=400),
            )
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        assert self._raw is not None
        self.subprotocol, self.path = chosen, request.target
        self._send(AcceptConnection(subprotocol=chosen))
        self._transport = WebSocketTransport(self, self._raw)
        self._inner = self._make_inner()
        self._transport.set_protocol(self._inner)
        self._inner.connection_made(self._transport)
        # Bytes the client sent right behind its request (early frames) stay in h11's
        # buffer: wsproto hands them to the client side only, so pass them on ourselves.
        h11_connection = getattr(self._ws.handshake, "_h11_connection", None)
        trailing = getattr(h11_connection, "trailing_data", (b"", False))[0]
        if trailing:
            self._ws.receive_data(bytes(trailing))

    def _refuse_request(self, why: str, answer: Any) -> None:
        log.info("%s: request from %s refused: %s", self._name, self._peer, why)
        assert self._raw is not None
        if self._ws.state is ConnectionState.CONNECTING and isinstance(answer, RejectConnection):
            try:
                self._raw.write(self._ws.send(answer))
            except LocalProtocolError:  # h11 cannot answer in its state: just close
                pass
        self._raw.close()

    def _upgrade_timed_out(self) -> None:
        self._timer = None
        if self._inner is None and self._raw is not None:
            log.info("%s: client %s did not complete the WebSocket upgrade in %g s: closing",
                     self._name, self._peer, self._upgrade_timeout)
            self._raw.abort()

    # ------------------------------------------------------------------ frames

    def frame(self, data: bytes) -> bytes:
        """``data`` as one binary WebSocket message."""
        return self._ws.send(BytesMessage(data=data))

    def _send(self, event: Any) -> None:
        assert self._raw is not None
        if self._raw.is_closing():
            return
        try:
            data = self._ws.send(event)
        except LocalProtocolError:
            return  # e.g. a Pong after our Close went out: nothing more may be sent
        self._raw.write(data)

    def _stopped(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def _on_close(self, event: CloseConnection) -> None:
        assert self._raw is not None
        if self._transport is not None:
            self._transport.mark_closing()
        if self._ws.state is ConnectionState.REMOTE_CLOSING:
            # The client closes: answer with our Close and end the TCP connection, as the
            # server should.
            if event.code not in (CloseReason.NORMAL_CLOSURE, CloseReason.GOING_AWAY, CloseReason.NO_STATUS_RCVD):
                log.info("%s: client %s closed the WebSocket: %s %s", self._name, self._peer, event.code, event.reason or "")
            self._send(event.response())
        elif self._ws.state is ConnectionState.OPEN:
            # Not a Close from the client: wsproto found a bad frame and says which code.
            log.info("%s: client %s: bad WebSocket frame: %s: closing", self._name, self._peer, event.reason)
            self._send(CloseConnection(code=event.code, reason=event.reason))
        self._raw.close()

    def close_websocket(self, code: int, reason: str | None = None) -> None:
        """Start the close handshake; the socket closes when the client answers, or after
        ``CLOSE_TIMEOUT`` if it does not."""
        assert self._raw is not None
        if self._transport is not None:
            self._transport.mark_closing()
        if self._ws.state is ConnectionState.OPEN:
            self._send(CloseConnection(code=code, reason=reason))
            self._timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.shutdown)
        else:
            self._raw.close()

    def shutdown(self) -> None:
        """Close the socket now (flushing what is written): the node is stopping, or the
        client did not answer our Close."""
        if self._raw is not None and not self._raw.is_closing():
            self._raw.close()
