"""Hybrid logical clock: timestamps that order retained writes across nodes. Pure.

A timestamp is ``physical_ms << 16 | counter``. It never goes backwards on one node, even if
the wall clock does, and after seeing a remote timestamp a node's next one is larger, so a
write made after reading another node's write always wins against it, whatever the two
wall clocks say. Ties between nodes are broken by node name in the merge.

What a clock takes from a peer is bounded, as every HLC implementation bounds it
(CockroachDB's ``--max-offset``, the HLC paper's epsilon): a remote timestamp whose
physical part is more than ``max_offset_ms`` ahead of our wall clock, or negative, is
refused, not observed. Unbounded, one peer's timestamp of year 2500 (or 2^63 - 1, which no
later write can exceed within SQLite's integers) would drag every node's clock with it and
make every later local write lose, or fail to be stored, for good.
"""

from __future__ import annotations

import time
from collections.abc import Callable

COUNTER_BITS = 16
COUNTER_MASK = (1 << COUNTER_BITS) - 1
DEFAULT_MAX_OFFSET_MS = 60_000


class HybridClock:
    def __init__(self, wall_ms: Callable[[], int] | None = None, max_offset_ms: int = DEFAULT_MAX_OFFSET_MS) -> None:
        self._wall_ms = wall_ms or (lambda: time.time_ns() // 1_000_000)
        self.max_offset_ms = max_offset_ms
        self.last = 0

    def now(self) -> int:
        """A timestamp for a local event, larger than every one seen or issued."""
        physical = self._wall_ms() << COUNTER_BITS
        self.last = physical if physical > self.last else self.last + 1
        return self.last

    def acceptable(self, remote: int, max_offset_ms: int | None = None) -> bool:
        """Whether ``remote`` is within the bound: not negative, and its physical part at
        most ``max_offset_ms`` (default: the clock's) ahead of our wall clock."""
        offset = self.max_offset_ms if max_offset_ms is None else max_offset_ms
        return remote >= 0 and (remote >> COUNTER_BITS) <= self._wall_ms() + offset

    def observe(self, remote: int) -> bool:
        """Take in a timestamp from a peer, so our next one is larger; False (and nothing
        taken in) if it is beyond the bound: the caller refuses what carried it."""
        if remote > self.last:
            if not self.acceptable(remote):
                return False
            self.last = remote
        return remote >= 0


def physical_ms(timestamp: int) -> int:
    return timestamp >> COUNTER_BITS
