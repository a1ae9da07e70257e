"""Is the node's event loop responsive? Pure: the meter; the node runs the ticking task.

A task sleeps ``interval`` seconds again and again and reports how late it woke up and how
long the loop's thread waited meanwhile for a CPU (``observe(lag, now, preempted)``; the
kernel's run-queue delay). Lateness has two causes: the loop ran or waited on something
without yielding (one client's or peer's work, a blocking call: the node's fault), or the
machine gave the process no core (a loaded host: not the node's fault). ``stalls_total``
counts wake-ups whose lateness *not* explained by waiting for a CPU exceeds ``STALL`` (50
ms, the figure tests hold a node under hostile load to). ``lag_max_s`` is the worst
lateness of either kind since the node was up, and ``healthy(now)`` says whether the loop
has ticked recently (the HTTP /healthz probe and ``$SYS/zmesh/node`` read it).

May import: the standard library. Imported by ``zmesh.node``.
"""

from __future__ import annotations

STALL = 0.050  # seconds: a wake-up later than this is a stall
INTERVAL = 0.050  # seconds between ticks (as the mesh's own tick): stalls of 100 ms and more are
# always seen, shorter ones over STALL when they span a tick; a shorter interval costs idle CPU


class LoopLag:
    def __init__(self, stall: float = STALL) -> None:
        self.stall = stall
        self.stalls_total = 0
        self.lag_max_s = 0.0
        self.lag_last_s = 0.0
        self.last_tick = 0.0  # when the loop last ticked (monotonic), 0 before the first

    def observe(self, lag: float, now: float, preempted: float | None = None) -> None:
        """``preempted``: seconds the loop's thread waited for a CPU over the window (None
        where the kernel does not say: then all lateness counts)."""
        lag = max(0.0, lag)
        self.lag_last_s = lag
        if lag > self.lag_max_s:
            self.lag_max_s = lag
        if lag - (preempted or 0.0) > self.stall:
            self.stalls_total += 1
        self.last_tick = now

    def healthy(self, now: float, within: float = 5.0) -> bool:
        """The loop ticked in the last ``within`` seconds."""
        return self.last_tick > 0 and now - self.last_tick <= within

    def snapshot(self) -> dict[str, float | int]:
        return {
            "lag_last_ms": round(self.lag_last_s * 1000, 1),
            "lag_max_ms": round(self.lag_max_s * 1000, 1),
            "stalls_total": self.stalls_total,
        }
