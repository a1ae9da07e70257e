"""``/metrics``: a ``NodeStatus`` in Prometheus' text format, via prometheus-client.

Nothing is counted here: the node's own counters are read when Prometheus scrapes (a
custom collector), so the message path pays nothing for the endpoint. Names follow the
Prometheus conventions: ``zmesh_`` prefix, base units (seconds, bytes), ``_total`` for
counters, labels for direction, state and reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from zmesh.ops.latency import HistogramSnapshot
from zmesh.ops.status import NodeStatus, readiness

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labelled(family: CounterMetricFamily | GaugeMetricFamily, values: dict[str, int]) -> Metric:
    for value, count in sorted(values.items()):
        family.add_metric([value], count)
    return family


def _histogram(name: str, doc: str, snapshot: HistogramSnapshot | None) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc)
    if snapshot is not None:
        buckets = [("+Inf" if math.isinf(b) else repr(b), n) for b, n in snapshot.buckets]
        family.add_metric([], buckets, snapshot.sum)
    return family


def families(status: NodeStatus) -> Iterator[Metric]:
    """The metric families for one snapshot (separate from the collector, for tests)."""
    yield GaugeMetricFamily("zmesh_uptime_seconds", "Seconds since the node finished starting.", value=status.uptime)
    yield GaugeMetricFamily("zmesh_ready", "1 when /readyz says ready.", value=0 if readiness(status) else 1)
    yield GaugeMetricFamily("zmesh_draining", "1 once SIGTERM started the drain.", value=int(status.draining))
    yield _labelled(CounterMetricFamily(
        "zmesh_mesh_messages", "Messages in event frames to and from peers.", labels=["direction"]), status.messages)
    yield _labelled(CounterMetricFamily(
        "zmesh_mesh_bytes", "Bytes of event frames to and from peers (as on the wire, before CURVE).",
        labels=["direction"]), status.bytes)
    yield _labelled(CounterMetricFamily(
        "zmesh_mesh_frames", "Event frames to and from peers.", labels=["direction"]), status.frames)
    yield _labelled(CounterMetricFamily(
        "zmesh_dropped", "Messages or frames dropped, by reason.", labels=["reason"]), status.drops)
    yield _labelled(GaugeMetricFamily("zmesh_peers", "Known peers by state.", labels=["state"]), status.peers)
    yield GaugeMetricFamily("zmesh_peers_synced", "Members whose retained state was fetched since they joined.",
                            value=status.peers_synced)
    yield GaugeMetricFamily("zmesh_mqtt_connections", "Open MQTT connections.", value=status.mqtt_connections)
    yield _labelled(GaugeMetricFamily(
        "zmesh_mqtt_sessions", "MQTT sessions, online (connected) or offline (kept).", labels=["state"]), status.mqtt_sessions)
    yield GaugeMetricFamily("zmesh_queued_messages", "Messages waiting: for MQTT clients, and for the mesh.",
                            value=status.queued_messages)
    yield GaugeMetricFamily("zmesh_queued_bytes", "Bytes held for MQTT clients (queued and in flight, as "
                            "mqtt.max_queued_bytes_total counts them) and waiting for the mesh.", value=status.queued_bytes)
    yield GaugeMetricFamily("zmesh_retained_entries", "Live retained topics held here.", value=status.retained_entries)
    yield GaugeMetricFamily("zmesh_retained_bytes", "Payload bytes of the retained topics.", value=status.retained_bytes)
    yield _labelled(GaugeMetricFamily(
        "zmesh_jobs", "Jobs submitted here, by state.", labels=["state"]), status.jobs)
    yield _labelled(CounterMetricFamily(
        "zmesh_jobs_finished", "Jobs submitted here that ended, or were delivered again, by outcome.",
        labels=["outcome"]), status.jobs_total)
    yield GaugeMetricFamily("zmesh_event_loop_lag_seconds", "How late the event loop's latest tick was.",
                            value=status.loop_lag)
    yield GaugeMetricFamily("zmesh_event_loop_lag_max_seconds", "The latest tick's worst lateness since start.",
                            value=status.loop_lag_max)
    yield CounterMetricFamily("zmesh_event_loop_stalls", "Ticks over 50 ms late beyond waiting for a CPU (zmesh.health).",
                              value=status.loop_stalls)
    yield _histogram(
        "zmesh_delivery_latency_seconds",
        "From publish on the origin node to delivery here, for stamped messages from peers "
        "(QoS 1/2 or with properties; the bare QoS 0 form carries no stamp).",
        status.delivery_latency,
    )
    yield CounterMetricFamily("zmesh_delivery_latency_ignored", "Stamps too far off to be a latency (clocks).",
                              value=status.latency_ignored)
    yield from _delivery(status)


# Reliable delivery (docs/delivery.md §8): name in NodeStatus.delivery -> (metric, help, counter?)
_DELIVERY = {
    "gaps_total": ("zmesh_delivery_gaps", "Gaps reported here: QoS >= 1 messages from a peer that will never come.", True),
    "lost_total": ("zmesh_delivery_lost", "Messages in gaps with a known count.", True),
    "gaps_open_ended_total": ("zmesh_delivery_gaps_open_ended",
                              "Gaps of unknown size (an origin died without saying where its stream ended).", True),
    "duplicates_total": ("zmesh_delivery_duplicates", "Stream messages dropped as already delivered.", True),
    "overflow_total": ("zmesh_delivery_reorder_overflow", "Messages past the reorder buffer, asked for again.", True),
    "released_total": ("zmesh_delivery_released", "Stream messages handed to local sessions and subscriptions.", True),
    "refused_total": ("zmesh_delivery_refused", "Publishes refused past the flow gate's bounds (MQTT 5: 0x97).", True),
    "held_total": ("zmesh_delivery_held", "Publishes that waited for room in the outbox (policy block).", True),
    "evicted_total": ("zmesh_delivery_outbox_evicted", "Messages the outbox's bounds dropped while some "
                      "destination still needed them.", True),
    "holes_open": ("zmesh_delivery_holes_open", "Streams from peers waiting for a missing message.", False),
    "held_publishes": ("zmesh_delivery_held_publishes", "Publishes waiting for room now (their PUBACK held).", False),
    "outbox_bytes": ("zmesh_delivery_outbox_bytes", "Bytes of the outbox log.", False),
    "outbox_messages": ("zmesh_delivery_outbox_messages", "Messages in the outbox log.", False),
    "unacknowledged": ("zmesh_delivery_unacknowledged", "Messages sent to peers and not yet acknowledged.", False),
}


def _delivery(status: NodeStatus) -> Iterator[Metric]:
    values = status.delivery
    for key, (name, doc, counter) in _DELIVERY.items():
        family = CounterMetricFamily if counter else GaugeMetricFamily
        yield family(name, doc, value=values.get(key, 0))
    yield _labelled(CounterMetricFamily(
        "zmesh_delivery_lost_by_origin", "Messages in gaps, by the node they came from.", labels=["origin"]),
        status.delivery_lost_by_origin)
    yield _labelled(CounterMetricFamily(
        "zmesh_delivery_evicted_by_destination", "Messages evicted from the outbox before this destination "
        "acknowledged them.", labels=["destination"]), status.delivery_evicted_by_destination)


class _Collector(Collector):
    def __init__(self, status: Callable[[], NodeStatus]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        return families(self.status())


def registry(status: Callable[[], NodeStatus]) -> CollectorRegistry:
    """A registry of its own (not the process-global default, which would also export
    Python's process metrics under names that are not ours, and collide in tests)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(status))
    return reg


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
