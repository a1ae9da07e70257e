"""The ``[http] listen`` server: ``/healthz``, ``/readyz`` and ``/metrics``.

Kubelet probes and Prometheus scrapes are its only callers, so it is deliberately small:
HTTP/1.1 GET (and HEAD), one request per connection (``Connection: close``), no body read.
Whatever connects is still treated as hostile: the request head is bounded in size and in
time, the number of connections at once is bounded, and anything else gets a short error
and the connection closed.

The server answers from the event loop that runs the node, so an answer at all means the
loop turns; the node's ``zmesh.health.LoopLag`` says how late.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from zmesh.config import parse_hostport
from zmesh.ops import metrics
from zmesh.ops.status import NodeStatus, liveness, readiness

log = logging.getLogger("zmesh.ops")

MAX_HEAD = 8192  # bytes of request line and headers
HEAD_TIMEOUT = 5.0  # seconds to send them
WRITE_TIMEOUT = 5.0
MAX_CONNECTIONS = 32

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class OpsServer:
    """Serves the probes and the metrics for ``status()``, a snapshot of the node."""

    def __init__(self, listen: str, status: Callable[[], NodeStatus]) -> None:
        self.host, self.port = parse_hostport(listen)
        self.status = status
        self.registry = metrics.registry(status)
        self.address: tuple[str, int] | None = None
        self.refused_total = 0  # connections over MAX_CONNECTIONS, or bad requests
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_HEAD)
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        log.info("HTTP listening on %s:%d (/healthz /readyz /metrics)", *self.address)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._open):
                task.cancel()
            await asyncio.gather(*self._open, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._open) >= MAX_CONNECTIONS or task is None:
            self.refused_total += 1
            writer.close()
            return
        self._open.add(task)
        try:
            code, content_type, body, head_only = await self._answer(reader)
            head = (
                f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n"
            ).encode()
            writer.write(head if head_only else head + body)
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.drain()
        except (OSError, TimeoutError):
            pass  # the client went away or stalled: nothing to tell it
        finally:
            self._open.discard(task)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes, bool]:
        text = "text/plain; charset=utf-8"
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            self.refused_total += 1
            return 431, text, b"request head too large\n", False
        except (asyncio.IncompleteReadError, TimeoutError):
            self.refused_total += 1
            return 400, text, b"incomplete request\n", False
        parts = raw.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self.refused_total += 1
            return 400, text, b"bad request line\n", False
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, text, b"GET only\n", False
        head_only = method == b"HEAD"
        if target == b"/metrics":
            return 200, metrics.CONTENT_TYPE, metrics.render(self.registry), head_only
        if target in (b"/healthz", b"/readyz"):
            status = self.status()
            problems = liveness(status) if target == b"/healthz" else readiness(status)
            if problems:
                return 503, text, ("\n".join(problems) + "\n").encode(), head_only
            return 200, text, b"ok\n", head_only
        return 404, text, b"not found: /healthz /readyz /metrics\n", head_only
