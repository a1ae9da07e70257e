"""Fixed-bucket histograms cheap enough for the message path. Pure.

May import: the standard library. Imported by ``zmesh.ops`` and ``zmesh.node``.

prometheus-client's Histogram takes a lock and walks its buckets in Python on every
observation; on the path of every message that crossed the mesh that is too dear. Here an
observation is one ``bisect`` and two additions, and the buckets are turned into
cumulative Prometheus form only when scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

# Seconds. Publish to delivery on one LAN or pod network is ~0.1-1 ms; tails reach seconds
# under load or while a peer resynchronises.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A peer's publish time further off than this is a broken clock or a hostile peer: not a
# latency, so not recorded (counted in ``ignored``).
MAX_PLAUSIBLE = 3600.0


@dataclass(frozen=True)
class HistogramSnapshot:
    """Prometheus form: cumulative counts per upper bound (the last is +Inf), sum, count."""

    buckets: tuple[tuple[float, int], ...]
    sum: float
    count: int


class Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("bucket bounds must be distinct and ascending")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self.ignored = 0

    def observe(self, seconds: float) -> None:
        """One observation; negative ones (clocks a little apart) count as 0, absurd ones
        are ignored (and counted as such)."""
        if not -MAX_PLAUSIBLE < seconds < MAX_PLAUSIBLE:
            self.ignored += 1
            return
        if seconds < 0.0:
            seconds = 0.0
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def snapshot(self) -> HistogramSnapshot:
        running = 0
        buckets = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append((bound, running))
        return HistogramSnapshot(tuple(buckets), self.sum, running)


class DeliveryLatency:
    """Publish-to-delivery times of messages from peers: the publishing node stamps its
    wall clock (microseconds since the epoch) into the item, the receiving node observes when it delivers. Assumes
    clocks in step (NTP), as any cross-host latency measure must; only items that carry a
    stamp count (the bare QoS 0 form has no room for one, by design)."""

    def __init__(self) -> None:
        self.histogram = Histogram(LATENCY_BUCKETS)

    def observe_stamps(self, stamps_us: list[int], now_us: int) -> None:
        observe = self.histogram.observe
        for stamp in stamps_us:
            if stamp:  # 0: not stamped (older nodes, or not a live publish)
                observe((now_us - stamp) / 1_000_000)
