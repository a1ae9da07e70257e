"""zmesh.ops, the pure parts: readiness and liveness rules, histograms, the metric names."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from zmesh.ops import metrics
from zmesh.ops.latency import LATENCY_BUCKETS, DeliveryLatency, Histogram
from zmesh.ops.status import LAG_LIMIT, NodeStatus, liveness, readiness

UP = NodeStatus(uptime=1.0, mqtt_listening=True, peers={"up": 2}, peers_synced=1)


def test_ready_when_joined_and_synced() -> None:
    assert readiness(UP) == []


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"draining": True}, "draining"),
        ({"uptime": 0.0}, "starting"),
        ({"mqtt_listening": False}, "MQTT not listening"),
        ({"peers_synced": 0}, "retained sync"),
        ({"peers": {"connecting": 1, "down": 3}, "peers_synced": 0}, "no peer up yet"),
    ],
)
def test_not_ready_says_why(changes: dict, reason: str) -> None:
    reasons = readiness(NodeStatus(**{**UP.__dict__, **changes}))
    assert reasons and reason in reasons[0], reasons


def test_draining_wins_over_everything() -> None:
    assert readiness(NodeStatus(**{**UP.__dict__, "draining": True, "alone_by_design": True})) == ["draining: shutting down"]


def test_alone_by_design_or_after_the_join_timeout() -> None:
    alone = NodeStatus(uptime=1.0, mqtt_listening=True, join_timeout=15.0)
    assert readiness(alone) != []
    assert readiness(NodeStatus(**{**alone.__dict__, "alone_by_design": True})) == []
    assert readiness(NodeStatus(**{**alone.__dict__, "uptime": 15.0})) == []  # nobody came: alone
    # A member that shows up after the timeout must still be synced before we are ready.
    late = NodeStatus(**{**alone.__dict__, "uptime": 60.0, "peers": {"evasive": 1}})
    assert "retained sync" in readiness(late)[0]


def test_liveness_fails_only_on_a_stuck_loop() -> None:
    assert liveness(NodeStatus(loop_lag=LAG_LIMIT / 2)) == []
    assert "late" in liveness(NodeStatus(loop_lag=LAG_LIMIT + 1))[0]
    assert "no tick" in liveness(NodeStatus(loop_ticking=False))[0]
    # Draining is bounded by the grace: not a reason to be killed half way.
    assert liveness(NodeStatus(loop_ticking=False, draining=True)) == []


def test_histogram_is_cumulative_with_inf_last() -> None:
    h = Histogram((0.01, 0.1, 1.0))
    for value in (0.005, 0.01, 0.05, 0.5, 7.0, -0.002):
        h.observe(value)
    snap = h.snapshot()
    assert snap.buckets == ((0.01, 3), (0.1, 4), (1.0, 5), (float("inf"), 6))  # le: 0.01 includes 0.01
    assert snap.count == 6 and snap.sum == pytest.approx(0.005 + 0.01 + 0.05 + 0.5 + 7.0)


def test_histogram_refuses_unordered_bounds() -> None:
    with pytest.raises(ValueError):
        Histogram((1.0, 0.5))


def test_delivery_latency_skips_unstamped_and_ignores_absurd_stamps() -> None:
    latency = DeliveryLatency()
    now = 1_700_000_000_000_000  # microseconds
    latency.observe_stamps([0, now - 3_000, now - 40_000, now + 2_000, 1, now - 10**13], now)
    snap = latency.histogram.snapshot()
    assert snap.count == 3  # 0 is "no stamp"; 1 us and 10^13 us ago are clocks, not latencies
    assert latency.histogram.ignored == 2
    assert snap.sum == pytest.approx(0.003 + 0.040 + 0.0)  # a stamp from the future counts as 0


def test_metrics_follow_prometheus_conventions() -> None:
    h = Histogram(LATENCY_BUCKETS)
    h.observe(0.002)
    status = NodeStatus(**{**UP.__dict__, "messages": {"in": 5, "out": 7}, "bytes": {"in": 50, "out": 70},
                           "drops": {"bad_frame": 1}, "delivery_latency": h.snapshot(),
                           "jobs": {"pending": 2, "in_flight": 1}, "mqtt_sessions": {"online": 1, "offline": 0}})
    text = metrics.render(metrics.registry(lambda: status)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("zmesh_mesh_messages_total", (("direction", "in"),))] == 5
    assert samples[("zmesh_mesh_bytes_total", (("direction", "out"),))] == 70
    assert samples[("zmesh_dropped_total", (("reason", "bad_frame"),))] == 1
    assert samples[("zmesh_peers", (("state", "up"),))] == 2
    assert samples[("zmesh_ready", ())] == 1
    assert samples[("zmesh_delivery_latency_seconds_count", ())] == 1
    assert samples[("zmesh_delivery_latency_seconds_bucket", (("le", "0.0025"),))] == 1
    assert samples[("zmesh_jobs", (("state", "pending"),))] == 2
    for family in families.values():
        assert family.name.startswith("zmesh_")


def test_delivery_gaps_and_outbox_are_metrics() -> None:
    """Gaps are never silent (docs/delivery.md §8): the delivery counters and gauges, and
    the losses per origin and per destination, reach /metrics."""
    status = NodeStatus(**{**UP.__dict__, "delivery": {"gaps_total": 3, "lost_total": 40, "gaps_open_ended_total": 1,
                                                       "held_publishes": 2, "outbox_bytes": 1000},
                           "delivery_lost_by_origin": {"a": 40}, "delivery_evicted_by_destination": {"b": 41}})
    text = metrics.render(metrics.registry(lambda: status)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("zmesh_delivery_gaps_total", ())] == 3
    assert samples[("zmesh_delivery_lost_total", ())] == 40
    assert samples[("zmesh_delivery_gaps_open_ended_total", ())] == 1
    assert samples[("zmesh_delivery_held_publishes", ())] == 2
    assert samples[("zmesh_delivery_outbox_bytes", ())] == 1000
    assert samples[("zmesh_delivery_lost_by_origin_total", (("origin", "a"),))] == 40
    assert samples[("zmesh_delivery_evicted_by_destination_total", (("destination", "b"),))] == 41
    for family in families.values():
        assert family.name.startswith("zmesh_")
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        assert not any(unit in family.name for unit in ("_ms", "_milliseconds", "_kb", "_mb")), family.name
