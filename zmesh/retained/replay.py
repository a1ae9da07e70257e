"""Large retained answers, given without holding the event loop: the replay of retained
messages to a new subscriber, and the ``$SYS/zmesh/topics`` dump.

A ``#`` subscription on a node holding 200,000 retained topics replayed them all in one
loop turn (0.7 s in which no other client, heartbeat or peer was served), and every
SUBSCRIBE to ``$SYS/zmesh/topics`` sorted and encoded the whole state again (10 of them:
3.3 s). Here a replay delivers ``REPLAY_SLICE`` messages per loop turn, and the dump is
built in slices once per state generation and shared by every subscriber until the state
changes.

A replay in slices must not deliver a stale value after a newer one: a topic written
while its replay is pending has reached the subscriber live already, so the replay skips
every entry that is no longer the cache's current one for its topic.

May import: the standard library, ``retained.lastvalue``, the ground floor. Used by the node.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import time
from collections.abc import Callable, Hashable
from typing import Any

from zmesh.retained.lastvalue import RetainedCache, RetainedEntry

REPLAY_SLICE = 250  # retained messages handed to one subscriber per loop turn
DUMP_SLICE = 1000  # entries of the $SYS/zmesh/topics dump built per loop turn (~10 ms here)

# (entry, qos granted, properties with the expiry left) -> deliver it to the subscriber
Deliver = Callable[[RetainedEntry, dict[str, Any] | None], None]


def _with_expiry_left(entry: RetainedEntry, now_ms: int) -> dict[str, Any] | None:
    # A replayed message carries what is left of its MQTT 5 message expiry interval.
    properties = entry.properties
    if entry.expires_at is not None and properties:
        left = max(1, -((now_ms - entry.expires_at) // 1000))  # seconds, rounded up
        properties = {**properties, "message_expiry_interval": left}
    return properties


class Replays:
    """Replays of retained messages in progress, by (subscriber, filter)."""

    def __init__(self, cache: RetainedCache) -> None:
        self.cache = cache
        self._pending: dict[tuple[Hashable, str], object] = {}

    def start(self, subscriber: Hashable, filt: str, entries: list[RetainedEntry], deliver: Deliver) -> None:
        """Deliver ``entries`` (in order): the first slice now, the rest a slice per turn."""
        key = (subscriber, filt)
        self._pending.pop(key, None)  # a new SUBSCRIBE to the same filter replays anew
        now_ms = time.time_ns() // 1_000_000
        for entry in entries[:REPLAY_SLICE]:
            deliver(entry, _with_expiry_left(entry, now_ms))
        if len(entries) > REPLAY_SLICE:
            token = self._pending[key] = object()
            asyncio.get_running_loop().call_soon(self._more, key, token, entries, REPLAY_SLICE, deliver)

    def _more(self, key: tuple[Hashable, str], token: object, entries: list[RetainedEntry], start: int,
              deliver: Deliver) -> None:
        if self._pending.get(key) is not token:
            return  # unsubscribed, gone, or subscribed again since
        now_ms = time.time_ns() // 1_000_000
        get = self.cache.get
        end = start + REPLAY_SLICE
        for entry in entries[start:end]:
            if get(entry.topic, now_ms) is entry:  # else: newer (delivered live), deleted or expired
                deliver(entry, _with_expiry_left(entry, now_ms))
        if end < len(entries):
            asyncio.get_running_loop().call_soon(self._more, key, token, entries, end, deliver)
        else:
            del self._pending[key]

    def cancel(self, subscriber: Hashable, filt: str | None = None) -> None:
        """Stop replaying ``filt`` (every filter when None) to ``subscriber``."""
        if filt is not None:
            self._pending.pop((subscriber, filt), None)
        elif self._pending:
            for key in [k for k in self._pending if k[0] == subscriber]:
                del self._pending[key]

    def __len__(self) -> int:
        return len(self._pending)


class TopicsDump:
    """The ``$SYS/zmesh/topics`` value (JSON list of ``{"topic", "bytes", "origin"}`` in
    topic order), cached per cache generation and built in slices when large."""

    def __init__(self, cache: RetainedCache) -> None:
        self.cache = cache
        self._value: bytes | None = None
        self._generation = -1
        self._building: asyncio.Task[bytes] | None = None

    def cached(self) -> bytes | None:
        """The dump of the current state, if it is built already."""
        return self._value if self._generation == self.cache.generation else None

    def now(self) -> bytes:
        """The dump, built in one go if need be (a small state, or no loop to slice on)."""
        value = self.cached()
        if value is None:
            generation = self.cache.generation
            value = _encode(sorted(self.cache.live(), key=lambda e: e.topic))
            self._value, self._generation = value, generation
        return value

    def get(self, then: Callable[[bytes], None]) -> None:
        """Call ``then(dump)``: now if it is built or the state is small, else once the
        dump has been built in slices (one build shared by every caller meanwhile)."""
        value = self.cached()
        if value is not None or len(self.cache) <= DUMP_SLICE:
            then(value if value is not None else self.now())
            return
        if self._building is None or self._building.done():
            self._building = asyncio.get_running_loop().create_task(self._build(), name="sys-topics-dump")
        self._building.add_done_callback(lambda task: None if task.cancelled() else then(task.result()))

    async def _build(self) -> bytes:
        generation = self.cache.generation
        entries = list(self.cache.all())  # references only, at C speed; filtered in slices
        runs: list[list[RetainedEntry]] = []
        for start in range(0, len(entries), DUMP_SLICE):
            live = [e for e in entries[start : start + DUMP_SLICE] if e.payload]  # not tombstones
            runs.append(sorted(live, key=lambda e: e.topic))
            await asyncio.sleep(0)
        parts: list[bytes] = []
        merged = heapq.merge(*runs, key=lambda e: e.topic)
        while True:
            chunk = [{"topic": e.topic, "bytes": len(e.payload), "origin": e.origin}
                     for _, e in zip(range(DUMP_SLICE), merged, strict=False)]
            if not chunk:
                break
            parts.append(json.dumps(chunk)[1:-1].encode())
            await asyncio.sleep(0)
        # The same text json.dumps gives the whole list; bytes joined (one copy), since a
        # str join and encode of 11 MB held the loop ~70 ms here.
        value = b"[" + b", ".join(parts) + b"]"
        # Cached under the generation it was started at: if the state changed meanwhile,
        # the next caller builds again (this one gets the snapshot it asked for).
        self._value, self._generation = value, generation
        return value

    def close(self) -> None:
        if self._building is not None:
            self._building.cancel()


def _encode(entries: list[RetainedEntry]) -> bytes:
    return json.dumps([{"topic": e.topic, "bytes": len(e.payload), "origin": e.origin} for e in entries]).encode()
