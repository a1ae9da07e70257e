"""A job its worker fails waits before its next delivery (doubling), so a job that fails at
once is not dead-lettered within a fraction of a second; a worker that left is no reason
to wait, nor is a shared-subscription message."""

from __future__ import annotations

from zmesh.jobs.dispatcher import (
    RETRY_FIRST,
    RETRY_MAX,
    WORKER_GONE,
    Dispatcher,
    Job,
    Outcome,
    retry_delay,
)


def test_retry_delay_doubles_up_to_a_cap() -> None:
    assert [retry_delay(n) for n in (1, 2, 3)] == [RETRY_FIRST, 2 * RETRY_FIRST, 4 * RETRY_FIRST]
    assert retry_delay(50) == RETRY_MAX


def test_a_failed_job_waits_its_delay_then_goes_first_in_line() -> None:
    d = Dispatcher(lease=30, max_attempts=3)
    d.submit(Job("a", "scan", b"", 0.0))
    d.submit(Job("b", "scan", b"", 0.0))
    d.worker_up("w", "scan", prefetch=1)
    assert [j.id for j, _ in d.dispatch(now=0)] == ["a"]
    job, outcome = d.nacked("a", "w", "exit 1", now=10.0)
    assert outcome is Outcome.RETRY and job is not None
    assert [j.id for j, _ in d.dispatch(now=10.0)] == ["b"]  # a waits; b is not held up by it
    d.acked("b", "w")
    assert d.stats("scan", now=10.0).depth == 1  # waiting counts as queued
    assert d.dispatch(now=10.0 + RETRY_FIRST / 2) == []
    assert [j.id for j, _ in d.dispatch(now=10.0 + RETRY_FIRST)] == ["a"]
    d.nacked("a", "w", "exit 1", now=20.0)
    assert d.dispatch(now=20.0 + RETRY_FIRST) == []
    assert [j.id for j, _ in d.dispatch(now=20.0 + 2 * RETRY_FIRST)] == ["a"]
    _, outcome = d.nacked("a", "w", "exit 1", now=30.0)
    assert outcome is Outcome.DEAD  # the last attempt: dead at once, no wait
    assert d.backoff == [] or all(i != "a" for _, i in d.backoff) or "a" not in d.jobs


def test_no_wait_when_the_worker_left_or_for_shared_messages_or_without_now() -> None:
    for queue, reason, now in (("scan", WORKER_GONE, 5.0), ("$share/g/t/#", "nack", 5.0), ("scan", "nack", None)):
        d = Dispatcher(max_attempts=5)
        d.submit(Job("a", queue, b"", 0.0))
        d.worker_up("w", queue, prefetch=1)
        d.dispatch(now=0)
        d.nacked("a", "w", reason, now=now)
        assert [j.id for j, _ in d.dispatch(now=5.0)] == ["a"], (queue, reason, now)
