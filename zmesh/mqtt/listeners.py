"""The MQTT listeners of a node: plain TCP, TLS, WebSocket and WebSocket over TLS.

Each ``ListenerConfig`` becomes one asyncio server whose protocol stack ends in the same
MQTT ``Connection``: ``[TlsAdapter ->] [WebSocketAdapter ->] Connection``. Every
connection is told which listener it came in on (``connection.listener``) and, on a
listener with ``use_identity_as_username``, the client certificate's CN
(``connection.cert_username``; None otherwise), which the CONNECT handling takes as the
username.

Opening is all or nothing: a certificate that cannot be loaded or an address that cannot
be bound stops the node at startup with an error naming the config key, before any
client is accepted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zmesh.config import ListenerConfig, parse_hostport
from zmesh.mqtt.tls import ListenerError, TlsAdapter, build_server_context
from zmesh.mqtt.websocket import WebSocketAdapter

log = logging.getLogger("zmesh.mqtt")

HANDSHAKE_TIMEOUT = 10.0  # seconds for a TLS handshake or a WebSocket upgrade


@dataclass(frozen=True)
class BoundListener:
    config: ListenerConfig
    address: tuple[str, int]  # as bound (the real port when the config says 0)
    server: asyncio.Server


class ListenerSet:
    """Opens, tracks and closes the listeners; ``make_connection()`` builds one MQTT
    protocol object (``Connection(server)``)."""

    def __init__(self, make_connection: Callable[[], Any], source: str) -> None:
        self._make_connection = make_connection
        self._source = source  # the config file, for error messages
        self.bound: list[BoundListener] = []
        # Handshakes and WebSocket sockets in progress, closed with the listeners.
        self._live: set[Any] = set()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [b.address for b in self.bound]

    async def open(self, listeners: tuple[ListenerConfig, ...]) -> None:
        # Every TLS context first: a bad certificate should not leave half the ports bound.
        contexts = [build_server_context(x, self._source) if x.tls else None for x in listeners]
        try:
            for listener, context in zip(listeners, contexts, strict=True):
                self.bound.append(await self._bind(listener, context))
        except BaseException:
            self.close()
            raise
        for b in self.bound:
            log.info("MQTT listening on %s (%s, %s)", _format(b.address), b.config.scheme, b.config.key)

    async def _bind(self, listener: ListenerConfig, context: ssl.SSLContext | None) -> BoundListener:
        host, port = parse_hostport(listener.address)
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(self._factory(listener, context), host, port, reuse_address=True)
        except OSError as exc:
            # asyncio's message repeats the address in Python syntax; the errno's text is enough.
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            error = ListenerError(
                f"{self._source}: {listener.key}: cannot listen on {listener.address} ({listener.scheme}): {reason}"
            )
            # For the command line's advice (zmesh.cli.daemon): which key, and why.
            error.key, error.address, error.errno = listener.key, listener.address, exc.errno
            raise error from None
        sockname = server.sockets[0].getsockname()
        return BoundListener(listener, (sockname[0], sockname[1]), server)

    def _factory(self, listener: ListenerConfig, context: ssl.SSLContext | None) -> Callable[[], asyncio.Protocol]:
        def connection(cert_username: str | None) -> asyncio.Protocol:
            protocol = self._make_connection()
            protocol.listener = listener
            protocol.cert_username = cert_username
            return protocol  # type: ignore[no-any-return]

        def websocket(cert_username: str | None) -> asyncio.Protocol:
            return WebSocketAdapter(
                lambda: connection(cert_username), listener.describe(), HANDSHAKE_TIMEOUT, self._live
            )

        app = websocket if listener.protocol == "websockets" else connection
        if context is None:
            return lambda: app(None)
        tls_context = context
        return lambda: TlsAdapter(listener, tls_context, HANDSHAKE_TIMEOUT, app, self._live)

    def stop_accepting(self) -> None:
        for b in self.bound:
            b.server.close()

    def close(self) -> None:
        """Stop accepting, and end handshakes and WebSocket sockets still open (call it after
        the MQTT connections were told to close: it flushes and ends their sockets)."""
        self.stop_accepting()
        for pending in list(self._live):
            pending.shutdown()
        self._live.clear()

    async def wait_closed(self) -> None:
        for b in self.bound:
            await b.server.wait_closed()


def _format(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
