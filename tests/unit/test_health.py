"""The loop-lag meter: stalls are wake-ups later than 50 ms."""

from __future__ import annotations

from zmesh.health import STALL, LoopLag


def test_stalls_are_counted_and_the_worst_lag_kept() -> None:
    meter = LoopLag()
    meter.observe(0.001, now=10.0)
    meter.observe(STALL + 0.001, now=10.2)
    meter.observe(-0.0001, now=10.3)  # early wake-ups count as no lag
    assert meter.stalls_total == 1
    assert meter.lag_max_s == STALL + 0.001 and meter.lag_last_s == 0.0
    assert meter.snapshot() == {"lag_last_ms": 0.0, "lag_max_ms": 51.0, "stalls_total": 1}


def test_healthy_only_while_the_loop_ticks() -> None:
    meter = LoopLag()
    assert not meter.healthy(now=1.0)
    meter.observe(0.0, now=1.0)
    assert meter.healthy(now=5.0) and not meter.healthy(now=6.5)


def test_lateness_spent_waiting_for_a_cpu_is_not_a_stall() -> None:
    meter = LoopLag()
    meter.observe(0.080, now=1.0, preempted=0.075)  # the machine gave us no core
    assert meter.stalls_total == 0 and meter.lag_max_s == 0.080
    meter.observe(0.080, now=1.2, preempted=0.001)  # a callback (or a blocking call) held the loop
    assert meter.stalls_total == 1


def test_the_run_queue_wait_is_read_where_the_kernel_says_it() -> None:
    from zmesh.eventloop import RunQueueWait

    waited = RunQueueWait()
    try:
        first = waited.read()
        assert first is None or first >= 0.0
    finally:
        waited.close()
