"""Local routing: which of this node's subscribers get a message. Pure: no I/O.

A subscriber is anything with a ``deliver`` method (an MQTT session, a Python API
subscription). The trie answers "who matches this topic"; the answer is cached per topic
because a stream publishes to the same few topics again and again, and the cache is dropped
whenever a subscription changes (the trie's version moves).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Protocol

from zmesh import topics
from zmesh.mesh.wire import subscription_prefix

MATCH_CACHE_LIMIT = 10_000


class Subscriber(Hashable, Protocol):
    def deliver(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        origin: str,
        properties: dict[str, Any] | None,
    ) -> None: ...

    def deliver_plain(self, topic: str, payloads: list[bytes], origin: str) -> None:
        """Many QoS 0, non-retained messages without properties, in order."""


class LocalRouter:
    def __init__(self) -> None:
        self.trie: topics.SubscriptionTrie[Subscriber] = topics.SubscriptionTrie()
        self._cache: dict[str, list[tuple[Subscriber, int]]] = {}
        self._cache_version = -1
        # ZeroMQ prefix -> how many (filter, subscriber) pairs need it; kept as subscriptions
        # change, so a subscribe costs O(1), not a pass over every filter (10,000 subscribes
        # were quadratic). Changes wait in _added/_removed until take_prefix_changes().
        self._prefix_refs: dict[bytes, int] = {}
        self._added: set[bytes] = set()
        self._removed: set[bytes] = set()

    @staticmethod
    def _prefix(filt: str) -> bytes:
        _group, inner = topics.parse_shared(filt)
        return subscription_prefix(topics.literal_prefix(inner), not topics.has_wildcards(inner))

    def _ref(self, filt: str, delta: int) -> None:
        prefix = self._prefix(filt)
        count = self._prefix_refs.get(prefix, 0) + delta
        if count > 0:
            self._prefix_refs[prefix] = count
            if count == 1 and delta > 0:
                self._removed.discard(prefix)
                self._added.add(prefix)
        else:
            self._prefix_refs.pop(prefix, None)
            self._added.discard(prefix)
            self._removed.add(prefix)

    def subscribe(self, subscriber: Subscriber, filt: str, qos: int) -> bool:
        """Add (or re-grant) a subscription; True when it is new."""
        new = self.trie.add(filt, subscriber, qos)
        if new:
            self._ref(filt, 1)
        return new

    def unsubscribe(self, subscriber: Subscriber, filt: str) -> bool:
        removed = self.trie.remove(filt, subscriber)
        if removed:
            self._ref(filt, -1)
        return removed

    def remove(self, subscriber: Subscriber) -> int:
        for filt in self.trie.filters_of(subscriber):
            self._ref(filt, -1)
        return self.trie.remove_subscriber(subscriber)

    def take_prefix_changes(self) -> tuple[set[bytes], set[bytes]]:
        """Prefixes to subscribe and to unsubscribe since the last call."""
        changes = (self._added, self._removed)
        self._added, self._removed = set(), set()
        return changes

    def targets(self, topic: str) -> list[tuple[Subscriber, int]]:
        """Each matching subscriber once, with the highest QoS any of its filters granted."""
        if self._cache_version != self.trie.version:
            self._cache.clear()
            self._cache_version = self.trie.version
        found = self._cache.get(topic)
        if found is None:
            best: dict[Subscriber, int] = {}
            for subscriber, _filter, qos in self.trie.match(topic):
                if best.get(subscriber, -1) < qos:
                    best[subscriber] = qos
            found = list(best.items())
            if len(self._cache) >= MATCH_CACHE_LIMIT:
                self._cache.clear()
            self._cache[topic] = found
        return found

    def mesh_prefixes(self) -> set[bytes]:
        """The ZeroMQ SUB prefixes that bring every message some local filter wants."""
        return set(self._prefix_refs)
