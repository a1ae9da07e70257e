"""A transport layered over another one (TLS records, WebSocket frames).

The MQTT ``Connection`` only writes bytes, closes, and asks about buffer sizes and the
peer; a layer overrides ``write`` and ``close`` and inherits the rest, which goes to the
socket's transport underneath: write-buffer size and limits (for the slow-client drop),
flow control, and ``get_extra_info`` (socket, peer name, and what the layer adds, such
as ``peercert``).
"""

from __future__ import annotations

import asyncio
from typing import Any


class WrappedTransport(asyncio.Transport):
    def __init__(self, raw: asyncio.Transport, extra: dict[str, Any] | None = None) -> None:
        super().__init__(extra)
        self._raw = raw
        self._protocol: asyncio.BaseProtocol | None = None
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def mark_closing(self) -> None:
        """The layer below is ending the connection: writes from now on are dropped."""
        self._closing = True

    def abort(self) -> None:
        self._closing = True
        self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw.is_closing()

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def pause_reading(self) -> None:
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()

    def is_reading(self) -> bool:
        return self._raw.is_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._extra:
            return self._extra[name]
        return self._raw.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol


class LayerProtocol(asyncio.Protocol):
    """The socket-side protocol of a layer (TLS, WebSocket): what it hands down to the
    protocol inside (``_inner``, through the layer's ``_transport``) is the same for every
    layer: flow control, and the end of the connection exactly once."""

    _inner: asyncio.Protocol | None
    _transport: WrappedTransport | None
    _timer: asyncio.TimerHandle | None

    def _cancel_timer(self) -> bool:
        """Stop the setup timer (handshake, upgrade); True if one was still running."""
        if self._timer is None:
            return False
        self._timer.cancel()
        self._timer = None
        return True

    def _end_inner(self, exc: Exception | None) -> None:
        """The socket is gone: the layer's transport stops writing, the inner protocol hears it once."""
        if self._transport is not None:
            self._transport.mark_closing()
        if self._inner is not None:
            inner, self._inner = self._inner, None
            inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()
