"""Hybrid logical clock: timestamps that order retained writes across nodes. Pure.

A timestamp is ``physical_ms << 16 | counter``. It never goes backwards on one node, even if
the wall clock does, and after seeing a remote timestamp a node's next one is larger, so a
write made after reading another node's write always wins against it, whatever the two
wall clocks say. Ties between nodes are broken by node name in the merge.
"""

from __future__ import annotations

import time
from collections.abc import Callable

COUNTER_BITS = 16
COUNTER_MASK = (1 << COUNTER_BITS) - 1


class HybridClock:
    def __init__(self, wall_ms: Callable[[], int] | None = None) -> None:
        self._wall_ms = wall_ms or (lambda: time.time_ns() // 1_000_000)
        self.last = 0

    def now(self) -> int:
        """A timestamp for a local event, larger than every one seen or issued."""
        physical = self._wall_ms() << COUNTER_BITS
        self.last = physical if physical > self.last else self.last + 1
        return self.last

    def observe(self, remote: int) -> None:
        """Take in a timestamp from a peer, so our next one is larger."""
        if remote > self.last:
            self.last = remote


def physical_ms(timestamp: int) -> int:
    return timestamp >> COUNTER_BITS
