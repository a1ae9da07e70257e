"""The retained-message cache: last value per topic. Pure: no I/O, time passed in.

Every entry remembers where it came from and when (origin node, timestamp), and a write
only replaces an entry that is older by ``(timestamp, origin, payload)``. That is last-writer-wins,
so copies on different nodes converge whatever order updates arrive in; mesh-wide
replication and durability build on exactly this merge rule.

A delete (an empty retained payload) is kept as a tombstone rather than forgotten, so a
stale copy that arrives later cannot resurrect the value.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from zmesh.topics import matches


@dataclass(frozen=True, slots=True)
class RetainedEntry:
    topic: str
    payload: bytes  # empty: tombstone
    qos: int
    origin: str
    timestamp: int
    properties: dict[str, Any] | None = None

    @property
    def deleted(self) -> bool:
        return not self.payload


def _order(entry: RetainedEntry) -> tuple[int, str, bytes]:
    # (timestamp, origin) identifies a write; the payload only breaks ties between writes
    # that should never share one, so that merge stays a total order whatever happens.
    return (entry.timestamp, entry.origin, entry.payload)


class RetainedCache:
    def __init__(self) -> None:
        self._entries: dict[str, RetainedEntry] = {}

    def merge(self, entry: RetainedEntry) -> bool:
        """Apply a write or delete; False when an existing entry is newer (the write loses)."""
        current = self._entries.get(entry.topic)
        if current is not None and _order(current) >= _order(entry):
            return False
        self._entries[entry.topic] = entry
        return True

    def get(self, topic: str) -> RetainedEntry | None:
        entry = self._entries.get(topic)
        return None if entry is None or entry.deleted else entry

    def match(self, filt: str) -> Iterator[RetainedEntry]:
        """Live (not deleted) entries whose topic the filter matches, in topic order."""
        for topic in sorted(self._entries):
            entry = self._entries[topic]
            if not entry.deleted and matches(filt, topic):
                yield entry

    def live(self) -> Iterator[RetainedEntry]:
        return (e for e in self._entries.values() if not e.deleted)

    def __len__(self) -> int:
        return sum(1 for e in self._entries.values() if not e.deleted)
