"""The retained-message cache: last value per topic, replicated. Pure: no I/O, time passed in.

Every entry remembers where it came from and when (origin node, hybrid-logical-clock
timestamp), and a write only replaces an entry that is older by ``(timestamp, origin,
payload)``. That is last-writer-wins, so copies on different nodes converge whatever order
updates arrive in, however often they are repeated.

A delete (an empty retained payload) is kept as a tombstone rather than forgotten, so that
a stale copy arriving later cannot resurrect the value; tombstones are collected after a
TTL long enough for every partition to have healed.

For anti-entropy the topics are split into ``BUCKETS`` buckets, each with a digest: the XOR
of a hash of every entry's identity in it, kept up to date on every change. Two nodes
compare 256 integers and exchange only the buckets that differ.
"""

from __future__ import annotations

import enum
import hashlib
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from zmesh.retained.hlc import physical_ms
from zmesh.retained.topicindex import TopicIndex

BUCKETS = 256


@dataclass(slots=True)  # not frozen: its __init__ costs 4x, and 100,000 arrive in a sync
class RetainedEntry:
    topic: str
    payload: bytes  # empty: tombstone
    qos: int
    origin: str
    timestamp: int  # hybrid logical clock
    properties: dict[str, Any] | None = None
    expires_at: int | None = None  # wall clock ms (MQTT 5 message expiry), None: never

    @property
    def deleted(self) -> bool:
        return not self.payload

    def expired(self, now_ms: int) -> bool:
        return self.expires_at is not None and self.expires_at <= now_ms


class Merge(enum.Enum):
    ACCEPTED = "accepted"
    STALE = "stale"  # an equal or newer entry is already here
    EXPIRED = "expired"  # arrived after its expiry
    FULL = "full"  # a new topic, and the cache is at its limit: refused, counted


def _order(entry: RetainedEntry) -> tuple[int, str, bytes]:
    # (timestamp, origin) identifies a write; the payload only breaks ties between writes
    # that should never share one, so that merge stays a total order whatever happens.
    return (entry.timestamp, entry.origin, entry.payload)


def _identity_hash(entry: RetainedEntry) -> int:
    # The payload is hashed too: merge orders by it on ties, so digests must see it.
    digest = hashlib.blake2b(f"{entry.topic}\0{entry.timestamp}\0{entry.origin}\0".encode(), digest_size=8)
    digest.update(entry.payload)
    return int.from_bytes(digest.digest(), "big")


def bucket_of(topic: str) -> int:
    return zlib.crc32(topic.encode()) % BUCKETS  # only spreads topics; the digests use blake2b


class RetainedCache:
    def __init__(self, max_entries: int = 0, max_bytes: int = 0) -> None:
        """``max_entries``/``max_bytes``: limits on live entries (0: unlimited)."""
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: dict[str, RetainedEntry] = {}
        self._digests = [0] * BUCKETS
        self._index = TopicIndex()  # the topics of _entries as a tree, for wildcard match()
        self.live_count = 0
        self.live_bytes = 0
        self.generation = 0  # counts changes: what is derived from the state is cached by it

    def merge(self, entry: RetainedEntry, now_ms: int = 0) -> Merge:
        """Apply a write or delete (last writer wins)."""
        current = self._entries.get(entry.topic)
        if current is not None and _order(current) >= _order(entry):
            return Merge.STALE
        if now_ms and entry.expired(now_ms):
            return Merge.EXPIRED
        if not entry.deleted and (self.max_entries or self.max_bytes):
            live_now = current is not None and not current.deleted
            more_entries = self.live_count + (0 if live_now else 1)
            more_bytes = self.live_bytes + len(entry.payload) - (len(current.payload) if current else 0)
            if (self.max_entries and more_entries > self.max_entries) or (
                self.max_bytes and more_bytes > self.max_bytes
            ):
                return Merge.FULL
        self._replace(current, entry)
        return Merge.ACCEPTED

    def _replace(self, current: RetainedEntry | None, entry: RetainedEntry | None) -> None:
        self.generation += 1
        topic = (entry or current).topic  # type: ignore[union-attr]
        bucket = bucket_of(topic)
        if current is not None:
            self._digests[bucket] ^= _identity_hash(current)
            if not current.deleted:
                self.live_count -= 1
                self.live_bytes -= len(current.payload)
        if entry is None:
            del self._entries[topic]
            self._index.discard(topic)
            return
        if current is None:
            self._index.add(topic)
        self._entries[topic] = entry
        self._digests[bucket] ^= _identity_hash(entry)
        if not entry.deleted:
            self.live_count += 1
            self.live_bytes += len(entry.payload)

    def get(self, topic: str, now_ms: int = 0) -> RetainedEntry | None:
        entry = self._entries.get(topic)
        if entry is None or entry.deleted or (now_ms and entry.expired(now_ms)):
            return None
        return entry

    def match(self, filt: str, now_ms: int = 0) -> Iterator[RetainedEntry]:
        """Live, unexpired entries whose topic the filter matches, in topic order."""
        if "+" not in filt and "#" not in filt:
            # A filter without wildcards matches one topic: a lookup, not a scan. (Sorting
            # and matching every topic made each SUBSCRIBE, $SYS ones included, hold the
            # event loop for ~190 ms on a node with 100,000 retained entries.)
            entry = self.get(filt, now_ms)
            if entry is not None:
                yield entry
            return
        # The topic tree visits only what the filter can match: a scan of every topic made
        # each wildcard SUBSCRIBE O(retained topics) (issue 14, hole 2).
        for topic in sorted(self._index.match(filt)):  # sort matches only
            entry = self._entries.get(topic)
            if entry is not None and not entry.deleted and not (now_ms and entry.expired(now_ms)):
                yield entry

    def live(self) -> Iterator[RetainedEntry]:
        return (e for e in self._entries.values() if not e.deleted)

    def topics(self) -> Iterable[str]:
        """Every topic held, tombstones included (a view: copy it to hold it across turns)."""
        return self._entries.keys()

    def all(self) -> Iterable[RetainedEntry]:
        """Every entry, tombstones included (what a peer needs to converge)."""
        return self._entries.values()

    def digests(self) -> list[int]:
        return list(self._digests)

    def differing_buckets(self, remote: list[int]) -> set[int]:
        return {i for i, (a, b) in enumerate(zip(self._digests, remote, strict=True)) if a != b}

    def in_buckets(self, buckets: set[int]) -> list[RetainedEntry]:
        return [e for e in self._entries.values() if bucket_of(e.topic) in buckets]

    def purge(self, now_ms: int, tombstone_ttl_ms: int, topics: Iterable[str] | None = None) -> list[str]:
        """Drop expired entries and tombstones older than the TTL (among ``topics``, when
        given: a large cache is purged a slice at a time); returns their topics."""
        entries = self._entries
        candidates = entries.values() if topics is None else [e for t in topics if (e := entries.get(t)) is not None]
        gone = [
            e.topic
            for e in candidates
            if e.expired(now_ms) or (e.deleted and physical_ms(e.timestamp) + tombstone_ttl_ms <= now_ms)
        ]
        for topic in gone:
            self._replace(self._entries[topic], None)
        return gone

    def __len__(self) -> int:
        return self.live_count
