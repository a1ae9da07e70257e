"""Work-queue bookkeeping on the submitting node. Pure: no I/O, ``now`` passed in.

A job is held by the node it was submitted on until a worker acknowledges it. That node
dispatches jobs to worker nodes with credit: a worker serving a queue advertises how many
jobs it will hold at once (its prefetch), and is never sent more than that outstanding, so
a slow or busy worker is not flooded and an idle one anywhere gets work. A job whose lease
runs out (the worker died, or took too long without extending) is counted as lost there
and delivered again; after ``max_attempts`` deliveries, or on a nack that says so, it goes
to the dead letters with the reason.

Invariant (property-tested): every job submitted is, at any moment, in exactly one of
pending, in flight, done or dead; none is ever lost or duplicated in this bookkeeping.
"""

from __future__ import annotations

import enum
import heapq
from collections import OrderedDict, deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class Job:
    id: str
    queue: str
    payload: bytes
    submitted_at: float
    attempts: int = 0  # deliveries so far
    worker: str | None = None  # in flight at this worker
    deadline: float = 0.0  # lease end while in flight
    last_error: str = ""


@dataclass(slots=True)
class Worker:
    key: str
    queue: str
    prefetch: int
    outstanding: set[str] = field(default_factory=set)

    @property
    def free(self) -> int:
        return max(0, self.prefetch - len(self.outstanding))  # prefetch may shrink


class Outcome(enum.Enum):
    DONE = "done"
    RETRY = "retry"  # back to pending, to be delivered again
    DEAD = "dead"  # out of attempts: to the dead-letter topic
    UNKNOWN = "unknown"  # an ack for a job not in flight there (late, duplicate): ignored


@dataclass
class QueueStats:
    depth: int = 0  # pending
    in_flight: int = 0
    oldest_age: float = 0.0  # seconds since the oldest unfinished job was submitted
    redeliveries_total: int = 0
    dead_total: int = 0
    done_total: int = 0
    dropped_total: int = 0  # shared-subscription messages whose group was gone everywhere
    workers: int = 0  # nodes serving the queue (this one included)


# A job its worker failed (nack with retry) waits before its next delivery: 0.5 s, doubling
# per attempt, at most 10 s, so a job that fails at once is not burnt through its attempts
# in a fraction of a second (5 attempts: dead after ~7.5 s instead of ~0.3 s). Jobs lost to a
# lease or a worker node going down, and shared-subscription messages, go again at once.
RETRY_FIRST, RETRY_MAX = 0.5, 10.0
# The reason a worker's node gives when an MQTT worker disconnected holding the job: the
# worker is gone, not the job at fault, so no backoff (zmesh.jobs.bridge).
WORKER_GONE = "worker disconnected"
SHARED_QUEUE_PREFIX = "$share/"


def retry_delay(attempts: int) -> float:
    """Seconds a failed job waits after its ``attempts``-th delivery (1-based)."""
    return min(RETRY_FIRST * 2 ** max(attempts - 1, 0), RETRY_MAX)


class Dispatcher:
    def __init__(self, lease: float = 30.0, max_attempts: int = 5) -> None:
        self.lease, self.max_attempts = lease, max_attempts
        self.pending: dict[str, deque[str]] = {}  # queue -> job ids, oldest first
        self.backoff: list[tuple[float, str]] = []  # heap of (due, job id): failed, waiting
        self.jobs: dict[str, Job] = {}  # every unfinished job
        self.workers: dict[tuple[str, str], Worker] = {}  # (worker key, queue)
        self.redeliveries: dict[str, int] = {}
        self.dead: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.dropped: dict[str, int] = {}

    # ------------------------------------------------------------------ submitting

    def submit(self, job: Job) -> bool:
        """Accept a job; False if one with this id is already unfinished (idempotent)."""
        if job.id in self.jobs:
            return False
        self.jobs[job.id] = job
        self.pending.setdefault(job.queue, deque()).append(job.id)
        return True

    # ------------------------------------------------------------------ workers

    def worker_up(self, key: str, queue: str, prefetch: int) -> None:
        """A node serves ``queue`` with ``prefetch`` slots (again, after a restart: whatever
        it held before is treated as lost via ``worker_down`` first)."""
        worker = self.workers.get((key, queue))
        if worker is None:
            self.workers[(key, queue)] = Worker(key, queue, max(1, prefetch))
        else:
            worker.prefetch = max(1, prefetch)

    def worker_down(self, key: str, now: float, queue: str | None = None) -> list[tuple[Job, Outcome]]:
        """A worker node is gone (or, given ``queue``, no longer serves that queue): its jobs
        (of that queue) go back to pending (or dead, out of attempts)."""
        results = []
        for (worker_key, _queue), worker in list(self.workers.items()):
            if worker_key != key or (queue is not None and _queue != queue):
                continue
            for job_id in list(worker.outstanding):
                results.append(self._lost(self.jobs[job_id], "worker went away"))
            del self.workers[(worker_key, _queue)]
        return results

    # ------------------------------------------------------------------ dispatching

    def dispatch(self, now: float) -> list[tuple[Job, str]]:
        """Pending jobs matched to workers with free credit: (job, worker key) to send now.

        Each job goes to the worker of its queue with the most free slots, so work spreads
        by capacity: a worker that finishes faster frees slots faster and gets more."""
        if self.backoff and self.backoff[0][0] <= now:
            self._release_due(now)
        sends: list[tuple[Job, str]] = []
        jobs, deadline = self.jobs, now + self.lease
        for queue, waiting in self.pending.items():
            if not waiting:
                continue
            candidates = [w for w in self.workers.values() if w.queue == queue and w.free > 0]
            while waiting and candidates:
                worker = max(candidates, key=lambda w: w.free) if len(candidates) > 1 else candidates[0]
                # As many as it has room for while it stays the freest (all of them, when it
                # is the only candidate): one max() per run, not per job.
                others = max((w.free for w in candidates if w is not worker), default=0)
                take = min(len(waiting), max(1, worker.free - others))
                outstanding, key = worker.outstanding, worker.key
                for _ in range(take):
                    job = jobs[waiting.popleft()]
                    job.attempts += 1
                    job.worker, job.deadline = key, deadline
                    outstanding.add(job.id)
                    sends.append((job, key))
                if worker.free == 0:
                    candidates.remove(worker)
        return sends

    def refused(self, job_id: str, worker_key: str) -> bool:
        """The worker node does not serve the job's queue (any more: its hello saying so is
        on its way), so it refuses whatever of that queue reaches it. Its jobs of the queue
        are first in line again without an attempt counted, and it gets no more of the
        queue until a hello says it serves it."""
        job = self._in_flight_at(job_id, worker_key)
        if job is None:
            return False
        worker = self.workers.pop((worker_key, job.queue), None)
        waiting = self.pending.setdefault(job.queue, deque())
        for held in worker.outstanding if worker else (job_id,):
            other = self.jobs[held]
            other.worker = None
            other.attempts -= 1
            waiting.appendleft(held)
        return True

    def undo_dispatch(self, job: Job) -> None:
        """The send did not happen (the worker's socket was not ready): first in line again,
        and that delivery does not count as an attempt."""
        if job.worker is None or job.id not in self.jobs:
            return
        self._release(job)
        job.attempts -= 1
        self.pending.setdefault(job.queue, deque()).appendleft(job.id)

    # ------------------------------------------------------------------ outcomes

    def _in_flight_at(self, job_id: str, worker_key: str) -> Job | None:
        job = self.jobs.get(job_id)
        if job is None or job.worker != worker_key:
            return None
        return job

    def _release(self, job: Job) -> None:
        worker = self.workers.get((job.worker or "", job.queue))
        if worker is not None:
            worker.outstanding.discard(job.id)
        job.worker = None

    def acked(self, job_id: str, worker_key: str) -> Job | None:
        """The worker finished the job: it is done (None if it was not in flight there: a
        late or duplicate ack, ignored). The hot path of a queue, so written out flat."""
        job = self.jobs.get(job_id)
        if job is None or job.worker != worker_key:
            return None
        worker = self.workers.get((worker_key, job.queue))
        if worker is not None:
            worker.outstanding.discard(job_id)
        job.worker = None
        del self.jobs[job_id]
        done = self.done
        done[job.queue] = done.get(job.queue, 0) + 1
        return job

    def nacked(self, job_id: str, worker_key: str, reason: str, retry: bool = True,
               now: float | None = None) -> tuple[Job | None, Outcome]:
        """The worker failed the job: deliver it again (elsewhere, most likely) while
        attempts remain, else (or with ``retry=False``) it is dead. Given ``now``, the next
        delivery waits ``retry_delay(attempts)`` (see RETRY_FIRST)."""
        job = self._in_flight_at(job_id, worker_key)
        if job is None:
            return None, Outcome.UNKNOWN
        if not retry:
            job.attempts = self.max_attempts
        backoff = (now is not None and reason != WORKER_GONE and job.attempts < self.max_attempts
                   and not job.queue.startswith(SHARED_QUEUE_PREFIX))
        job, outcome = self._lost(job, reason, requeue=not backoff)
        if backoff and now is not None:
            heapq.heappush(self.backoff, (now + retry_delay(job.attempts), job.id))
        return job, outcome

    def _release_due(self, now: float) -> None:
        """Failed jobs whose wait is over go back to the front of their queue."""
        while self.backoff and self.backoff[0][0] <= now:
            _, job_id = heapq.heappop(self.backoff)
            job = self.jobs.get(job_id)
            if job is not None and job.worker is None:
                self.pending.setdefault(job.queue, deque()).appendleft(job_id)

    def extend(self, job_id: str, worker_key: str, seconds: float, now: float) -> bool:
        """The worker is still at it: the lease now ends ``seconds`` from now (0: one more
        lease), never earlier than it did."""
        job = self._in_flight_at(job_id, worker_key)
        if job is None:
            return False
        job.deadline = max(job.deadline, now + (seconds or self.lease))
        return True

    def drop_unserved(self, prefix: str, now: float, max_age: float) -> list[Job]:
        """Pending jobs of queues named ``prefix...`` that no worker anywhere serves, once
        they are ``max_age`` old: for a shared subscription whose members all left, as MQTT
        drops messages for a subscription that no longer exists."""
        served: set[str] | None = None
        dropped: list[Job] = []
        for queue, waiting in self.pending.items():
            if not waiting or not queue.startswith(prefix):
                continue
            if served is None:
                served = {w.queue for w in self.workers.values()}
            if queue in served:
                continue
            keep: deque[str] = deque()
            for job_id in waiting:
                job = self.jobs[job_id]
                if now - job.submitted_at >= max_age:
                    del self.jobs[job_id]
                    dropped.append(job)
                else:
                    keep.append(job_id)
            self.pending[queue] = keep
            if len(keep) != len(waiting):
                self.dropped[queue] = self.dropped.get(queue, 0) + len(waiting) - len(keep)
        return dropped

    def expire(self, now: float) -> list[tuple[Job, Outcome]]:
        """Jobs whose lease ran out: retried or dead.

        Only jobs in flight are looked at (at most the workers' total prefetch), never the
        whole backlog: this runs every tick, and a deep queue must not cost CPU while idle."""
        jobs = self.jobs
        late = [jobs[i] for w in self.workers.values() for i in w.outstanding if jobs[i].deadline <= now]
        late.sort(key=lambda j: (j.deadline, j.submitted_at))
        return [self._lost(job, f"lease of {self.lease:g} s expired at worker") for job in late]

    def _lost(self, job: Job, reason: str, requeue: bool = True) -> tuple[Job, Outcome]:
        self._release(job)
        job.last_error = reason
        if job.attempts >= self.max_attempts:
            del self.jobs[job.id]
            self.dead[job.queue] = self.dead.get(job.queue, 0) + 1
            return job, Outcome.DEAD
        self.redeliveries[job.queue] = self.redeliveries.get(job.queue, 0) + 1
        if requeue:
            self.pending.setdefault(job.queue, deque()).appendleft(job.id)  # first in line again
        return job, Outcome.RETRY

    # ------------------------------------------------------------------ metrics

    def stats(self, queue: str, now: float) -> QueueStats:
        unfinished = [j for j in self.jobs.values() if j.queue == queue]
        return QueueStats(
            depth=len(self.pending.get(queue, ())) + sum(
                1 for _, i in self.backoff if i in self.jobs and self.jobs[i].queue == queue),
            in_flight=sum(1 for j in unfinished if j.worker is not None),
            oldest_age=max((now - j.submitted_at for j in unfinished), default=0.0),
            redeliveries_total=self.redeliveries.get(queue, 0),
            dead_total=self.dead.get(queue, 0),
            done_total=self.done.get(queue, 0),
            dropped_total=self.dropped.get(queue, 0),
            workers=sum(1 for w in self.workers.values() if w.queue == queue),
        )


class RecentIds:
    """Job ids a worker completed recently, with their results, so a redelivered duplicate
    is answered again without being run twice (bounded: oldest forgotten first)."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._seen: OrderedDict[str, bytes] = OrderedDict()

    def get(self, job_id: str) -> bytes | None:
        return self._seen.get(job_id)

    def add(self, job_id: str, result: bytes) -> None:
        seen = self._seen
        if job_id in seen:
            seen.move_to_end(job_id)
        seen[job_id] = result
        if len(seen) > self.limit:
            seen.popitem(last=False)
