"""The Python API's subscriptions: ``Message`` and ``Subscription``, an async iterator over
a bounded buffer. Re-exported as ``zmesh.Message`` and ``zmesh.Subscription``; the node
makes them (``Node.subscribe``) and hands them messages as a ``Subscriber``.

May import: the standard library. Imported by ``zmesh.node``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple


class Message(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    retain: bool
    origin: str  # name of the node it was published on
    properties: dict[str, Any] | None = None


class Subscription:
    """A live subscription of the Python API: an async iterator of ``Message``.

    Messages wait in a bounded buffer; when the consumer falls ``maxsize`` behind, new
    messages are dropped and counted in ``dropped`` (as Mosquitto does for a full queue),
    so a stalled consumer cannot exhaust the node's memory.
    """

    def __init__(
        self,
        filt: str,
        qos: int,
        maxsize: int,
        on_behind: Callable[[Subscription], None],
        on_caught_up: Callable[[Subscription], None],
        on_close: Callable[[Subscription], None],
    ) -> None:
        # on_behind / on_caught_up: the node slows its mesh readers while any subscription
        # is more than half full; on_close: the node forgets the subscription.
        self.filter, self.qos, self.maxsize = filt, qos, maxsize
        self._on_behind, self._on_caught_up, self._on_close = on_behind, on_caught_up, on_close
        self.dropped = 0
        # Past `_high` buffered messages the node's mesh readers slow down (mesh.links.CONGESTION_DELAY
        # between bursts) until the consumer is back under `_low`: a burst waits in ZeroMQ's
        # queue instead of being dropped.
        self._high, self._low = maxsize // 2, maxsize // 4
        self._behind = False
        self._buffer: deque[Message] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        # Shared-subscription messages in the buffer (by id of the Message) -> what to call
        # when the consumer takes one: that is its acknowledgement (zmesh.jobs.shared).
        self._on_taken: dict[int, Callable[[bool], None]] = {}

    def deliver_shared(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        properties: dict[str, Any] | None,
        origin: str,
        settle: Callable[[bool], None],
    ) -> bool:
        """A message of a shared subscription: ``settle(True)`` once the consumer has taken
        it. False (not taken) when the buffer is full or closed: another member gets it."""
        if self._closed or len(self._buffer) >= self.maxsize:
            return False
        message = tuple.__new__(Message, (topic, payload, qos, False, origin, properties))
        self._on_taken[id(message)] = settle
        self._buffer.append(message)
        self._wake()
        return True

    @property
    def shared_credit(self) -> int:
        """Shared-subscription messages this subscription may hold untaken (zmesh.jobs.shared)."""
        return self.maxsize

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def deliver(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        origin: str,
        properties: dict[str, Any] | None,
    ) -> None:
        if len(self._buffer) >= self.maxsize:
            self.dropped += 1
            return
        self._buffer.append(tuple.__new__(Message, (topic, payload, qos, retain, origin, properties)))
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def deliver_plain(self, topic: str, payloads: list[bytes], origin: str) -> None:
        room = self.maxsize - len(self._buffer)
        if room < len(payloads):
            self.dropped += len(payloads) - max(room, 0)
            payloads = payloads[: max(room, 0)]
        new = tuple.__new__  # Message(...) costs a Python-level __new__ per message
        self._buffer.extend([new(Message, (topic, p, 0, False, origin, None)) for p in payloads])
        if len(self._buffer) > self._high and not self._behind:
            self._behind = True
            self._on_behind(self)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if self._behind and len(self._buffer) < self._low:
            self._behind = False
            self._on_caught_up(self)
        message = self._buffer.popleft()
        if self._on_taken:
            settle = self._on_taken.pop(id(message), None)
            if settle is not None:
                settle(True)
        return message

    async def get(self, timeout: float | None = None) -> Message:
        """The next message, waiting at most ``timeout`` seconds (TimeoutError)."""
        return await asyncio.wait_for(self.__anext__(), timeout)

    def close(self) -> None:
        if self._behind:
            self._behind = False
            self._on_caught_up(self)
        if not self._closed:
            self._closed = True
            self._on_close(self)
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
