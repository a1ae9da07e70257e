"""Work-queue bookkeeping: no job is lost or duplicated, credit is respected."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.jobs.dispatcher import Dispatcher, Job, Outcome, RecentIds


def job(n: int, queue: str = "scan") -> Job:
    return Job(f"j{n}", queue, b"p", submitted_at=0.0)


def test_credit_bounds_what_a_worker_holds_and_acks_free_it() -> None:
    d = Dispatcher(lease=10, max_attempts=3)
    for n in range(5):
        d.submit(job(n))
    d.worker_up("w1", "scan", prefetch=2)
    sent = d.dispatch(now=0)
    assert [(j.id, w) for j, w in sent] == [("j0", "w1"), ("j1", "w1")]
    assert d.dispatch(now=0) == []  # no credit left
    assert d.acked("j0", "w1") is not None
    assert [j.id for j, _ in d.dispatch(now=1)] == ["j2"]
    stats = d.stats("scan", now=2)
    assert (stats.depth, stats.in_flight, stats.done_total) == (2, 2, 1)


def test_idle_worker_gets_work_and_free_capacity_decides() -> None:
    d = Dispatcher()
    d.worker_up("busy", "scan", prefetch=1)
    d.worker_up("idle", "scan", prefetch=4)
    for n in range(5):
        d.submit(job(n))
    workers = [w for _, w in d.dispatch(now=0)]
    assert workers.count("idle") == 4 and workers.count("busy") == 1


def test_lease_expiry_redelivers_then_dead_letters() -> None:
    d = Dispatcher(lease=5, max_attempts=2)
    d.submit(job(1))
    d.worker_up("w1", "scan", 1)
    d.worker_up("w2", "scan", 1)
    d.dispatch(now=0)
    assert d.expire(now=4.9) == []
    [(j, outcome)] = d.expire(now=5)
    assert outcome is Outcome.RETRY and "lease" in j.last_error
    [(again, holder)] = d.dispatch(now=5)
    assert again.attempts == 2
    other = "w2" if holder == "w1" else "w1"
    assert d.acked("j1", other) is None  # only the current holder's ack counts
    [(j, outcome)] = d.expire(now=11)
    assert outcome is Outcome.DEAD and d.stats("scan", 11).dead_total == 1 and "j1" not in d.jobs


def test_extend_keeps_the_lease_alive() -> None:
    d = Dispatcher(lease=5)
    d.submit(job(1))
    d.worker_up("w", "scan", 1)
    d.dispatch(now=0)
    assert d.extend("j1", "w", 20, now=4)
    assert d.expire(now=10) == []
    assert not d.extend("j1", "other", 20, now=4)  # only the holder extends


def test_poison_nack_without_retry_is_dead_at_once() -> None:
    d = Dispatcher(max_attempts=5)
    d.submit(job(1))
    d.worker_up("w", "scan", 1)
    d.dispatch(now=0)
    j, outcome = d.nacked("j1", "w", "bad input", retry=False)
    assert outcome is Outcome.DEAD and j is not None and j.last_error == "bad input"


def test_worker_down_returns_its_jobs() -> None:
    d = Dispatcher()
    d.submit(job(1))
    d.worker_up("w", "scan", 1)
    d.dispatch(now=0)
    [(j, outcome)] = d.worker_down("w", now=1)
    assert outcome is Outcome.RETRY and d.stats("scan", 1).depth == 1
    assert d.dispatch(now=1) == []  # no workers left


def test_duplicate_submission_is_idempotent() -> None:
    d = Dispatcher()
    assert d.submit(job(1)) and not d.submit(job(1))


ops = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.integers(0, 9)),
        st.tuples(st.just("up"), st.sampled_from(["w1", "w2"]), st.integers(1, 3)),
        st.tuples(st.just("down"), st.sampled_from(["w1", "w2"])),
        st.tuples(st.just("dispatch")),
        st.tuples(st.just("ack"), st.integers(0, 9), st.sampled_from(["w1", "w2"])),
        st.tuples(st.just("nack"), st.integers(0, 9), st.sampled_from(["w1", "w2"]), st.booleans()),
        st.tuples(st.just("refuse"), st.integers(0, 9), st.sampled_from(["w1", "w2"])),
        st.tuples(st.just("extend"), st.integers(0, 9), st.sampled_from(["w1", "w2"]), st.floats(0, 30)),
        st.tuples(st.just("drop"), st.floats(0, 20)),
        st.tuples(st.just("tick"), st.floats(0, 20)),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(ops)
def test_no_job_is_ever_lost_or_duplicated(operations: list) -> None:
    d = Dispatcher(lease=10, max_attempts=3)
    now = 0.0
    submitted: set[str] = set()
    finished: dict[str, Outcome] = {}
    for op in operations:
        kind = op[0]
        if kind == "submit":
            if d.submit(job(op[1])):
                submitted.add(f"j{op[1]}")
        elif kind == "up":
            d.worker_up(op[1], "scan", op[2])
        elif kind == "down":
            for j, outcome in d.worker_down(op[1], now):
                if outcome is Outcome.DEAD:
                    finished[j.id] = outcome
        elif kind == "dispatch":
            d.dispatch(now)
        elif kind == "ack":
            if d.acked(f"j{op[1]}", op[2]) is not None:
                finished[f"j{op[1]}"] = Outcome.DONE
        elif kind == "nack":
            j, outcome = d.nacked(f"j{op[1]}", op[2], "x", retry=op[3])
            if outcome is Outcome.DEAD:
                finished[f"j{op[1]}"] = outcome
        elif kind == "refuse":
            d.refused(f"j{op[1]}", op[2])
        elif kind == "extend":
            d.extend(f"j{op[1]}", op[2], op[3], now)
        elif kind == "drop":  # queues nobody serves: their old jobs go (shared subscriptions)
            for j in d.drop_unserved("sc", now, op[1]):
                finished[j.id] = Outcome.DEAD
        else:
            now += op[1]
            for j, outcome in d.expire(now):
                if outcome is Outcome.DEAD:
                    finished[j.id] = outcome
        pending = [i for q in d.pending.values() for i in q]
        in_flight = [i for w in d.workers.values() for i in w.outstanding]
        assert len(pending) == len(set(pending)) and len(in_flight) == len(set(in_flight))
        assert not set(pending) & set(in_flight)
        # a finished id may be submitted again later (a new job with a reused id)
        unfinished = set(pending) | set(in_flight)
        assert unfinished == set(d.jobs)
        assert all(len(w.outstanding) <= 3 for w in d.workers.values())
        assert all(0 <= j.attempts <= 3 for j in d.jobs.values())
        assert submitted <= unfinished | set(finished)


def test_recent_ids_remember_results_within_a_bound() -> None:
    recent = RecentIds(limit=2)
    recent.add("a", b"1")
    recent.add("b", b"2")
    recent.add("c", b"3")
    assert recent.get("a") is None and recent.get("c") == b"3"


def test_undone_dispatch_is_first_in_line_and_costs_no_attempt() -> None:
    d = Dispatcher()
    d.submit(job(1))
    d.submit(job(2))
    d.worker_up("w", "scan", 1)
    [(j, _)] = d.dispatch(now=0)
    d.undo_dispatch(j)
    [(again, _)] = d.dispatch(now=0)
    assert again.id == "j1" and again.attempts == 1


def test_a_refusal_returns_the_workers_jobs_of_that_queue_without_spending_attempts() -> None:
    d = Dispatcher(lease=5, max_attempts=2)
    for n in range(3):
        d.submit(job(n))
    d.submit(job(9, queue="other"))
    d.worker_up("w", "scan", prefetch=3)
    d.worker_up("w", "other", prefetch=1)
    assert len(d.dispatch(now=0)) == 4
    assert d.refused("j1", "w")  # w stopped serving "scan": all three come back
    assert ("w", "scan") not in d.workers and ("w", "other") in d.workers
    assert sorted(d.pending["scan"]) == ["j0", "j1", "j2"] and all(d.jobs[f"j{n}"].attempts == 0 for n in range(3))
    assert not d.refused("j1", "w")  # not in flight there any more: ignored
    d.worker_up("w2", "scan", prefetch=3)
    assert {j.id for j, w in d.dispatch(now=1)} == {"j0", "j1", "j2"}  # to w2, first attempt


def test_dead_letters_of_shared_groups_name_the_group_and_carry_the_topic() -> None:
    import base64
    import json

    from zmesh.jobs.service import _dead_letter
    from zmesh.mesh import wire
    from zmesh.topics import validate_topic_name

    message = wire.encode_shared_message("scans/new", b"10.0.0.1", 1, None)
    dead = Job("j1", "$share/scanners/scans/#", message, 0.0, attempts=5, last_error="member left")
    topic, body = _dead_letter(dead)
    validate_topic_name(topic)  # a filter's wildcards never end up in the topic
    letter = json.loads(body)
    assert topic == "$jobs/dead/$share/scanners" and letter["topic"] == "scans/new"
    assert base64.b64decode(letter["payload"]) == b"10.0.0.1" and letter["reason"] == "member left"
    plain_topic, plain_body = _dead_letter(Job("j2", "scan", b"x", 0.0, attempts=5))
    assert plain_topic == "$jobs/dead/scan" and base64.b64decode(json.loads(plain_body)["payload"]) == b"x"
