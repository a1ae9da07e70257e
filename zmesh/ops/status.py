"""What the node reports about itself, and when it is ready. Pure: data in, verdicts out.

May import: the standard library and ``zmesh.ops.latency``. Imported by the rest of
``zmesh.ops`` and ``zmesh.node``.

``NodeStatus`` is a snapshot the node builds on request (``Node.status()``); the probes and
the metrics read nothing else. ``readiness`` decides ``/readyz``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zmesh.ops.latency import HistogramSnapshot

# Liveness: a loop this late is stuck, not busy (a 100k-entry sync takes ~1 s).
LAG_LIMIT = 5.0


@dataclass(frozen=True)
class NodeStatus:
    uptime: float = 0.0  # seconds since the node finished starting (0: still starting)
    draining: bool = False  # SIGTERM received: leaving
    mqtt_listening: bool = False  # every configured MQTT listener is open (or none is configured)
    # No seeds and no discovery: a mesh of one, on purpose (needs no peer to be ready).
    alone_by_design: bool = False
    join_timeout: float = 15.0  # with peers expected but none found by then: ready, alone
    peers: dict[str, int] = field(default_factory=dict)  # state -> count
    peers_synced: int = 0  # members whose retained state we have fetched since they joined
    # Mesh traffic (event frames), counted where it is cheap: per frame, not per message.
    messages: dict[str, int] = field(default_factory=dict)  # direction (in/out) -> count
    bytes: dict[str, int] = field(default_factory=dict)  # direction -> event frame bytes
    frames: dict[str, int] = field(default_factory=dict)  # direction -> frames
    drops: dict[str, int] = field(default_factory=dict)  # reason -> count
    mqtt_connections: int = 0
    mqtt_sessions: dict[str, int] = field(default_factory=dict)  # online/offline -> count
    queued_messages: int = 0  # waiting for MQTT clients (beyond max_inflight) or the mesh
    queued_bytes: int = 0  # held for MQTT clients (mqtt.max_queued_bytes_total's count) + for the mesh
    retained_entries: int = 0
    retained_bytes: int = 0
    jobs: dict[str, int] = field(default_factory=dict)  # pending/in_flight -> count
    jobs_total: dict[str, int] = field(default_factory=dict)  # done/dead/redelivered -> count
    # The event loop (zmesh.health.LoopLag): ticked within the last few seconds, how late
    # its latest and worst wake-ups were, and how many were stalls.
    loop_ticking: bool = True
    loop_lag: float = 0.0
    loop_lag_max: float = 0.0
    loop_stalls: int = 0
    delivery_latency: HistogramSnapshot | None = None
    latency_ignored: int = 0
    # Reliable QoS >= 1 delivery across nodes (zmesh.mesh.delivery; docs/delivery.md §8):
    # counters (gaps_total, lost_total, gaps_open_ended_total, duplicates_total, ...),
    # gauges (holes_open, held_publishes, outbox_bytes, outbox_messages, unacknowledged),
    # and the losses per origin (receiver side) and per destination (origin side).
    delivery: dict[str, float] = field(default_factory=dict)
    delivery_lost_by_origin: dict[str, int] = field(default_factory=dict)
    delivery_evicted_by_destination: dict[str, int] = field(default_factory=dict)


def readiness(status: NodeStatus) -> list[str]:
    """Why the node is not ready; ``[]`` when it is.

    Ready means: started, not draining, MQTT listening, and either in the mesh with the
    retained state of at least one member fetched (every node holds all of it) or alone,
    by design or because nobody answered within ``join_timeout`` (the first pod of a new
    StatefulSet, or a one-replica Deployment, must not wait for peers that do not exist).
    """
    if status.draining:
        return ["draining: shutting down"]
    reasons: list[str] = []
    if not status.uptime:
        reasons.append("starting")
    if not status.mqtt_listening:
        reasons.append("MQTT not listening")
    members = status.peers.get("up", 0) + status.peers.get("evasive", 0)
    if status.alone_by_design:
        return reasons
    if members == 0:
        if status.uptime < status.join_timeout:
            reasons.append(f"no peer up yet (alone after {status.join_timeout:g} s)")
    elif status.peers_synced == 0:
        reasons.append(f"retained sync with {members} peer(s) not done yet")
    return reasons


def liveness(status: NodeStatus) -> list[str]:
    """Why the node should be restarted; ``[]`` when it should not. That this is being
    computed at all proves the event loop turns; one whose ticker stopped, or that turns
    this late, is stuck. A draining node is alive: its drain is bounded by the grace."""
    if status.draining:
        return []
    if not status.loop_ticking:
        return ["event loop: no tick in the last 5 s"]
    if status.loop_lag > LAG_LIMIT:
        return [f"event loop {status.loop_lag:.1f} s late (limit {LAG_LIMIT:g} s)"]
    return []
