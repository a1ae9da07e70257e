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
from zmesh.wire import subscription_prefix

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

    def subscribe(self, subscriber: Subscriber, filt: str, qos: int) -> bool:
        """Add (or re-grant) a subscription; True when it is new."""
        return self.trie.add(filt, subscriber, qos)

    def unsubscribe(self, subscriber: Subscriber, filt: str) -> bool:
        return self.trie.remove(filt, subscriber)

    def remove(self, subscriber: Subscriber) -> int:
        return self.trie.remove_subscriber(subscriber)

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
        prefixes = set()
        for filt in self.trie.filters():
            _group, inner = topics.parse_shared(filt)
            prefixes.add(
                subscription_prefix(topics.literal_prefix(inner), not topics.has_wildcards(inner))
            )
        return prefixes
