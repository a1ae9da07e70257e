"""Work queues over the mesh: submit on any node, work on any node, each job done once.

The submitting node holds every job it accepted (``jobs.Dispatcher``) until a worker
acknowledges it. Worker nodes say in their hello which queues they serve and with what
prefetch; the submitter sends jobs over CURVE PUSH -> PULL only to a node with free credit
for their queue (or hands them to a worker on this very node), and the worker answers on
its DEALER to the submitter's ROUTER: done (with a result), failed (retry or not), or
"extend my lease". A lease that runs out, or a worker node that goes down, sends the job to
another worker; after ``max_attempts`` it is published to ``$jobs/dead/<queue>`` with the
reason. A worker remembers recently finished job ids, so a redelivered duplicate is
answered again, not run twice.

Both directions are batched (see ``wire``): one pump sends one frame per worker node with
every job dispatched to it, and reports for one submitter leave together when the event
loop goes idle. ``submit_many`` accepts many jobs with one spool write, one pump and no
task or future per job.

With a ``data_dir`` the submitter spools every job (``spool.JobSpool``) before ``submit``
returns, in group commits, and loads the spool again on start, so a restart of the
submitter loses nothing it accepted. Messages of shared subscriptions (``zmesh.jobs.shared``)
travel as jobs of a queue named after the group; they are not spooled.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zmesh.jobs.dispatcher import Dispatcher, Job, Outcome, RecentIds
from zmesh.mesh import wire

if TYPE_CHECKING:
    from zmesh.ports import JobMesh, Publisher

log = logging.getLogger("zmesh.jobs")

TICK = 0.05
DEAD_LETTER_PREFIX = "$jobs/dead/"
SHARED_PREFIX = "$share/"  # queues named "$share/GROUP/FILTER" carry shared subscriptions
FRAME_BYTES = 256 * 1024  # a job frame is closed past this many payload bytes
REPORTS_PER_MESSAGE = 1024


class JobFailed(Exception):
    """The job went to the dead letters; the message says why."""


class JobHandle:
    """A submitted job: ``await handle.result()``. No future exists until someone waits."""

    __slots__ = ("id", "done", "_value", "_error", "_future", "_callbacks")

    def __init__(self, job_id: str, callbacks: tuple[Callable[[JobHandle], None], ...] = ()) -> None:
        self.id = job_id
        self.done = False
        self._value = b""
        self._error: JobFailed | None = None
        self._future: asyncio.Future[None] | None = None
        # A tuple, so that the handles of one batch can share their batch's callback.
        self._callbacks = callbacks

    async def result(self, timeout: float | None = None) -> bytes:
        """The worker's result; JobFailed if the job ended in the dead letters."""
        if not self.done:
            if self._future is None:
                self._future = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(asyncio.shield(self._future), timeout)
        if self._error is not None:
            raise self._error
        return self._value

    def outcome(self) -> tuple[bytes, JobFailed | None]:
        """(result, None), or (b"", why it died), once ``done``."""
        return self._value, self._error

    def add_done_callback(self, callback: Callable[[JobHandle], None]) -> None:
        """Call ``callback(handle)`` when the job is done or dead (now, if it is)."""
        if self.done:
            callback(self)
        else:
            self._callbacks = (*self._callbacks, callback)

    def _finish(self, value: bytes, error: JobFailed | None) -> None:
        if self.done:
            return
        self.done, self._value, self._error = True, value, error
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        if self._callbacks:
            callbacks, self._callbacks = self._callbacks, ()
            for callback in callbacks:
                callback(self)


class JobBatch(list[JobHandle]):
    """The handles of ``submit_many``, in order; ``await batch.results()`` waits for all.

    It counts its unfinished jobs down itself (each new handle shares its callback), so
    waiting for 100,000 jobs costs one future, not one per job."""

    def __init__(self) -> None:
        super().__init__()
        self._remaining = 0
        self._finished: asyncio.Future[None] | None = None
        self.callbacks = (self._one_done,)

    def _one_done(self, _: JobHandle) -> None:
        self._remaining -= 1
        if self._remaining == 0 and self._finished is not None and not self._finished.done():
            self._finished.set_result(None)

    def _track(self, handle: JobHandle) -> None:
        """Count ``handle`` (one that existed before this batch) until it is done."""
        if not handle.done:
            self._remaining += 1
            handle.add_done_callback(self._one_done)

    async def results(self, timeout: float | None = None) -> list[bytes]:
        """Every result in order, once all jobs are done; JobFailed for the first that died."""
        if self._remaining:
            if self._finished is None:
                self._finished = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(asyncio.shield(self._finished), timeout)
        for handle in self:
            if handle._error is not None:
                raise handle._error
        return [handle._value for handle in self]


class WorkItem:
    """One job on a worker: ``ack(result)``, ``nack(reason, retry=True)``, ``extend(s)``."""

    __slots__ = ("service", "submitter", "id", "queue", "payload", "attempt", "lease", "finished")

    def __init__(self, service: JobService, submitter: str, frame: wire.JobFrame) -> None:
        self.service, self.submitter = service, submitter
        self.id, self.queue, self.payload, self.attempt, self.lease = frame
        self.finished = False

    async def ack(self, result: bytes = b"") -> None:
        self.done(result)

    async def nack(self, reason: str, retry: bool = True) -> None:
        self.fail(reason, retry)

    async def extend(self, seconds: float = 0.0) -> None:
        """Still working: the lease now ends ``seconds`` from now (0: one more lease)."""
        self.keep(seconds)

    def done(self, result: bytes = b"") -> None:
        """``ack`` without a coroutine, for callers that are not coroutines themselves."""
        if self.finished:
            return
        self.finished = True
        self.service.recent.add(self.id, result)
        self.service._report(self.submitter, wire.JobReport(self.id, wire.JOB_OK, result))

    def fail(self, reason: str, retry: bool = True) -> None:
        if self.finished:
            return
        self.finished = True
        self.service._report(self.submitter, wire.JobReport(self.id, wire.JOB_FAILED, b"", reason, retry))

    def refuse(self) -> None:
        """Not taken at all (no worker for it here): back to the submitter, no attempt spent."""
        if not self.finished:
            self.finished = True
            self.service._report(self.submitter, wire.JobReport(self.id, wire.JOB_REFUSED))

    def keep(self, seconds: float = 0.0) -> None:
        if not self.finished:
            seconds = min(max(seconds, 0.0), wire.MAX_JOB_LEASE)
            self.service._report(self.submitter, wire.JobReport(self.id, wire.JOB_EXTEND, seconds=seconds))


class WorkQueue:
    """``async for job in node.work(queue)``: jobs for a worker on this node.

    Given ``on_item``, jobs are handed to it as they arrive instead (no task wakes per job);
    the shared-subscription groups work that way."""

    def __init__(self, service: JobService, queue: str, prefetch: int,
                 on_item: Callable[[WorkItem], None] | None = None) -> None:
        self.service, self.queue, self.prefetch = service, queue, prefetch
        self.on_item = on_item
        self._items: deque[WorkItem] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: WorkItem) -> None:
        if self.on_item is not None:
            self.on_item(item)
            return
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> WorkQueue:
        return self

    async def __anext__(self) -> WorkItem:
        while not self._items:
            # About to wait: the answers given so far leave now rather than a loop turn
            # later, which is a round trip's worth of credit sooner back at the submitters.
            if self.service._outbox:
                self.service._flush_reports()
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._items.popleft()

    def resize(self, prefetch: int) -> None:
        """Hold up to ``prefetch`` jobs from now on (told to submitters in the next hello)."""
        self.service._resize(self, prefetch)

    def close(self) -> None:
        """Stop serving the queue here: jobs not yet taken go back to their submitters."""
        self.service._stop_working(self)


class JobService:
    def __init__(
        self, publisher: Publisher, lease: float = 30.0, max_attempts: int = 5,
        drop: Callable[[str, str], None] | None = None,
    ) -> None:
        self.publisher = publisher
        # Counts and logs (rate-limited) a frame refused from a peer: the node's Drops.drop.
        self.drop = drop
        # The mesh, from start() on (None before: work() and submit() may come first).
        self.mesh: JobMesh | None = None
        # Called with the handle of each job recovered from the spool at start, so that its
        # outcome is published (the MQTT $jobs/ bridge watches it).
        self.on_recovered: Callable[[JobHandle], None] | None = None
        self.dispatcher = Dispatcher(lease, max_attempts)
        self.handles: dict[str, JobHandle] = {}
        self.workers: dict[str, WorkQueue] = {}
        self.recent = RecentIds()
        # Called with the names of the shared-subscription queues served anywhere in the
        # mesh whenever that set may have changed (zmesh.jobs.shared keeps its index with it).
        self.on_shared_queues: Callable[[set[str]], None] | None = None
        self.tickers: list[Callable[[float], None]] = []  # called every TICK with the time
        self._task: asyncio.Task[None] | None = None
        self._own = ""
        self.spool: Any = None
        self._to_spool: list[tuple[list[Job], asyncio.Future[None]]] = []
        self._to_forget: list[str] = []
        self._spool_wake = asyncio.Event()
        self._spool_task: asyncio.Task[None] | None = None
        # Job ids: a random prefix per process and a counter (uuid4 per job cost more than
        # the rest of a submit). Unique across nodes and restarts, as the workers' dedup
        # window, keyed by id alone, needs.
        self._id_prefix = uuid.uuid4().hex[:16]
        self._id_counter = itertools.count(1)
        self._pump_scheduled = False
        self._outbox: dict[str, list[wire.JobReport]] = {}  # submitter -> reports to send
        self._flush_scheduled = False
        self._served: dict[str, tuple[tuple[str, int], ...]] = {}  # peer -> queues it said it serves
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(
        self, mesh: JobMesh, own_key: str, data_dir: Path | None,
        key: bytes | None = None, previous_keys: Sequence[bytes] = (),
    ) -> None:
        """Serve the mesh; with a ``data_dir``, spool jobs there, their payloads sealed
        with ``key`` (the store's key) when given."""
        self.mesh = mesh
        self._own = own_key
        self._loop = asyncio.get_running_loop()
        mesh.on_hello = self._on_hello
        mesh.on_job = self._on_frame
        if data_dir is not None:
            from zmesh.jobs.spool import JobSpool

            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.spool = await asyncio.to_thread(
                partial(JobSpool, data_dir / "jobs.db", key=key, previous_keys=previous_keys)
            )
            pending = await asyncio.to_thread(self.spool.load)
            now = time.monotonic()
            for job in pending:
                job.submitted_at = now
                if self.dispatcher.submit(job):
                    # Whoever submitted it is gone with the old process: its outcome is
                    # published on $jobs/result/ID or $jobs/failed/ID, and a submit of the
                    # same id gets this handle.
                    handle = self.handles[job.id] = JobHandle(job.id)
                    if self.on_recovered is not None:
                        self.on_recovered(handle)
            if pending:
                log.info("job spool: %d jobs accepted before the restart are pending again", len(pending))
            self._spool_task = asyncio.create_task(self._spool_writer(), name="job-spool")
        self._task = asyncio.create_task(self._tick(), name="jobs")

    async def stop(self) -> None:
        for task in (self._task, self._spool_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._flush_reports()  # answers given before the stop still reach their submitters
        if self.spool is not None:
            await self._write_spool()
            await asyncio.to_thread(self.spool.close)
            self.spool = None

    async def _spool_writer(self) -> None:
        while True:
            await self._spool_wake.wait()
            self._spool_wake.clear()
            await self._write_spool()

    async def _write_spool(self) -> None:
        added, self._to_spool = self._to_spool, []
        forgotten, self._to_forget = self._to_forget, []
        try:
            if added:
                await asyncio.to_thread(self.spool.add, [job for jobs, _ in added for job in jobs])
            if forgotten:
                await asyncio.to_thread(self.spool.remove, forgotten)
        except Exception as exc:  # the disk failed: refuse the jobs rather than pretend
            log.error("job spool write failed: %s", exc)
            for _, future in added:
                if not future.done():
                    future.set_exception(exc)
            return
        for _, future in added:
            if not future.done():
                future.set_result(None)

    # ------------------------------------------------------------------ submitting

    async def submit(self, queue: str, payload: bytes, job_id: str | None = None) -> JobHandle:
        """Accept a job (on disk first, when there is a spool) and dispatch it."""
        return (await self.submit_many(queue, [payload], [job_id] if job_id else None))[0]

    async def submit_many(self, queue: str, payloads: Iterable[bytes],
                          job_ids: Iterable[str] | None = None) -> JobBatch:
        """Accept many jobs at once: one spool write, one pump, no future per job. ``job_ids``
        (optional, in order; a missing or empty one is made up) are idempotency keys: an id
        that is already unfinished here gets that job's handle."""
        now = time.monotonic()
        handles = self.handles
        batch = JobBatch()
        new: list[Job] = []
        ids = iter(job_ids) if job_ids is not None else None
        callbacks, prefix, counter = batch.callbacks, self._id_prefix, self._id_counter
        for payload in payloads:
            job_id = next(ids, None) if ids is not None else None
            if not job_id:
                job_id = f"{prefix}{next(counter):x}"
            handle = handles.get(job_id)
            if handle is None:
                handle = handles[job_id] = JobHandle(job_id, callbacks)
                new.append(Job(job_id, queue, payload, now))
            else:
                batch._track(handle)
            batch.append(handle)
        batch._remaining += len(new)
        if not new:
            return batch
        if self.spool is not None:
            durable = asyncio.get_running_loop().create_future()
            self._to_spool.append((new, durable))
            self._spool_wake.set()
            try:
                await durable
            except Exception:
                for job in new:
                    handles.pop(job.id, None)
                raise
        submit = self.dispatcher.submit
        for job in new:
            submit(job)
        self._pump_soon()
        return batch

    def submit_shared(self, queue: str, message: bytes) -> None:
        """A message for a shared subscription group (``zmesh.jobs.shared``): a job with no
        handle, no spool and no result, acknowledged by the member's PUBACK."""
        job_id = f"{self._id_prefix}{next(self._id_counter):x}"
        self.dispatcher.submit(Job(job_id, queue, message, time.monotonic()))
        self._pump_soon()

    def _pump_soon(self) -> None:
        # One pump per event-loop turn, however many submits and reports came in it: jobs
        # to one worker node then leave in one frame.
        if not self._pump_scheduled and self._loop is not None:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        sends = self.dispatcher.dispatch(time.monotonic())
        if not sends:
            return
        by_worker: dict[str, list[Job]] = {}
        for job, worker in sends:
            jobs = by_worker.get(worker)
            if jobs is None:
                by_worker[worker] = [job]
            else:
                jobs.append(job)
        lease, mesh = self.dispatcher.lease, self.mesh
        for worker, jobs in by_worker.items():
            if worker == self._own:
                for job in jobs:
                    local = self.workers.get(job.queue)
                    if local is None:
                        self.dispatcher.undo_dispatch(job)
                    else:
                        local.put(WorkItem(self, self._own, wire.JobFrame(job.id, job.queue, job.payload,
                                                                          job.attempts, lease)))
                continue
            start = 0
            while start < len(jobs):  # frames of at most FRAME_BYTES of payload
                end, size = start, 0
                while end < len(jobs) and (end == start or size + len(jobs[end].payload) <= FRAME_BYTES):
                    size += len(jobs[end].payload)
                    end += 1
                chunk = jobs[start:end]
                frame = wire.encode_jobs(lease, [[j.id, j.queue, j.payload, j.attempts] for j in chunk])
                if mesh is None or not mesh.send_job(worker, frame):
                    for job in reversed(chunk):  # not connected yet: first in line again, next tick
                        self.dispatcher.undo_dispatch(job)
                start = end

    def _done(self, job: Job, result: bytes) -> None:
        if self.spool is not None and not job.queue.startswith(SHARED_PREFIX):
            self._to_forget.append(job.id)
            self._spool_wake.set()
        handle = self.handles.pop(job.id, None)
        if handle is not None:
            handle._finish(result, None)

    def _settle(self, results: list[tuple[Job, Outcome]]) -> None:
        """Jobs given up on by a worker (nack, lease, gone): retried, or dead."""
        for job, outcome in results:
            if outcome is not Outcome.DEAD:
                continue
            if self.spool is not None and not job.queue.startswith(SHARED_PREFIX):
                self._to_forget.append(job.id)
                self._spool_wake.set()
            log.warning("job %s of %s is dead after %d attempts: %s", job.id, job.queue, job.attempts, job.last_error)
            self.publisher.publish_nowait(*_dead_letter(job), qos=1)
            handle = self.handles.pop(job.id, None)
            if handle is not None:
                handle._finish(b"", JobFailed(f"job {job.id}: {job.last_error} (after {job.attempts} attempts)"))

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            self._settle(self.dispatcher.expire(now))
            # A shared group whose members left everywhere: MQTT drops what was meant for it.
            self.dispatcher.drop_unserved(SHARED_PREFIX, now, self.dispatcher.lease)
            for ticker in self.tickers:
                ticker(now)
            self._pump()
            if self._outbox:
                self._flush_reports()  # what a full socket refused before

    # ------------------------------------------------------------------ from the mesh

    def _on_hello(self, key: str, hello: wire.Hello) -> None:
        if self.mesh is not None:
            self.mesh.job_socket(key)  # dial now: jobs and reports may go either way
        if self._served.get(key) == hello.queues:
            return  # a heartbeat: nothing changed
        self._served[key] = hello.queues
        served = dict(hello.queues)
        for (worker, queue) in list(self.dispatcher.workers):
            if worker == key and queue not in served:  # only that queue's jobs go elsewhere
                self._settle(self.dispatcher.worker_down(key, time.monotonic(), queue))
        for queue, prefetch in served.items():
            self.dispatcher.worker_up(key, queue, prefetch)
        self._workers_changed()
        self._pump_soon()

    def peer_gone(self, key: str) -> None:
        """A worker node went down or restarted: what it held is delivered elsewhere."""
        self._served.pop(key, None)
        self._outbox.pop(key, None)  # its jobs are gone with it (or will be redelivered)
        self._settle(self.dispatcher.worker_down(key, time.monotonic()))
        self._workers_changed()
        self._pump()

    def _workers_changed(self) -> None:
        if self.on_shared_queues is not None:
            self.on_shared_queues({q for _, q in self.dispatcher.workers if q.startswith(SHARED_PREFIX)})

    def _on_reports(self, worker: str, reports: list[wire.JobReport]) -> None:
        acked, done, ok = self.dispatcher.acked, self._done, wire.JOB_OK
        for report in reports:
            if report.kind == ok:
                job = acked(report.id, worker)
                if job is not None:
                    done(job, report.result)
            else:
                self._handle_report(worker, report)
        self._pump()

    def _handle_report(self, worker: str, report: wire.JobReport) -> None:
        kind = report.kind
        if kind == wire.JOB_OK:
            job = self.dispatcher.acked(report.id, worker)
            if job is not None:
                self._done(job, report.result)
        elif kind == wire.JOB_EXTEND:
            self.dispatcher.extend(report.id, worker, report.seconds, time.monotonic())
        elif kind == wire.JOB_REFUSED:
            if self.dispatcher.refused(report.id, worker):
                self._served.pop(worker, None)  # its next hello is believed again, whatever it says
                self._workers_changed()
        else:
            job, outcome = self.dispatcher.nacked(report.id, worker, report.error or "failed", report.retry,
                                                  now=time.monotonic())
            if job is not None:
                self._settle([(job, outcome)])

    def _on_frame(self, sender: str, data: bytes) -> None:
        """A frame on our PULL socket: jobs from a submitter, or reports from a worker."""
        try:
            if data[:1] == wire.REPORTS_FRAME:
                reports = wire.decode_job_reports(data)
            else:
                self._on_jobs(sender, wire.decode_jobs(data))
                return
        except wire.WireError as exc:
            if self.drop is not None:
                self.drop("jobs_bad_frame", f"from {sender[:8]}: {exc}")
            else:
                log.warning("bad job frame from %s: %s", sender[:8], exc)
            return
        self._on_reports(sender, reports)

    def _on_jobs(self, submitter: str, frames: list[wire.JobFrame]) -> None:
        recent, workers = self.recent, self.workers
        for frame in frames:
            item = WorkItem(self, submitter, frame)
            done = recent.get(frame.id)
            if done is not None:  # a duplicate of one we finished: answer again, do not run it
                item.finished = True
                self._report(submitter, wire.JobReport(frame.id, wire.JOB_OK, done))
                continue
            local = workers.get(frame.queue)
            if local is None:
                item.refuse()  # served here no more (our hello saying so crossed this job)
                continue
            local.put(item)

    def _report(self, submitter: str, report: wire.JobReport) -> None:
        if submitter == self._own:
            self._handle_report(self._own, report)
            self._pump_soon()
            return
        reports = self._outbox.get(submitter)
        if reports is None:
            self._outbox[submitter] = [report]
        else:
            reports.append(report)
        if not self._flush_scheduled and self._loop is not None:
            # Reports of one event-loop turn leave together, one message per submitter.
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_reports)

    def _flush_reports(self) -> None:
        self._flush_scheduled = False
        mesh = self.mesh
        outbox, self._outbox = self._outbox, {}
        if mesh is None:
            return
        for submitter, reports in outbox.items():
            if submitter not in mesh.links:
                continue  # gone: it redelivers by lease, and our dedup window answers then
            for start in range(0, len(reports), REPORTS_PER_MESSAGE):
                chunk = reports[start : start + REPORTS_PER_MESSAGE]
                if not mesh.send_job(submitter, wire.encode_job_reports(chunk)):
                    # Not connected yet or the socket is full: kept for the next tick.
                    self._outbox.setdefault(submitter, []).extend(reports[start:])
                    break

    def stats(self) -> dict[str, dict[str, float]]:
        """Per queue: depth, in flight, oldest job age (s), redeliveries, dead, done."""
        now = time.monotonic()
        d = self.dispatcher
        queues = set(d.pending) | {q for _, q in d.workers} | set(d.done) | set(d.dead) | set(d.dropped)
        return {q: vars(d.stats(q, now)) for q in sorted(queues)}

    # ------------------------------------------------------------------ working

    def work(self, queue: str, prefetch: int = 1, on_item: Callable[[WorkItem], None] | None = None) -> WorkQueue:
        work_queue = self.workers[queue] = WorkQueue(self, queue, prefetch, on_item)
        if self.mesh is not None:
            self.mesh.local_queues[queue] = prefetch
            self.mesh.announce()
        self.dispatcher.worker_up(self._own, queue, prefetch)
        self._workers_changed()
        self._pump_soon()
        return work_queue

    def _resize(self, work_queue: WorkQueue, prefetch: int) -> None:
        work_queue.prefetch = prefetch
        if self.workers.get(work_queue.queue) is work_queue:
            if self.mesh is not None:
                self.mesh.local_queues[work_queue.queue] = prefetch
                self.mesh.announce()
            self.dispatcher.worker_up(self._own, work_queue.queue, prefetch)
            self._pump_soon()

    def _stop_working(self, work_queue: WorkQueue) -> None:
        if self.workers.get(work_queue.queue) is work_queue:
            del self.workers[work_queue.queue]
            if self.mesh is not None:
                self.mesh.local_queues.pop(work_queue.queue, None)
                self.mesh.announce()
            # What this node held of this queue goes back to be delivered elsewhere (other
            # queues' jobs stay where they are): our own jobs here, ...
            self._settle(self.dispatcher.worker_down(self._own, time.monotonic(), work_queue.queue))
            self._workers_changed()
            # ... and jobs of other submitters not yet taken by a worker, at once rather
            # than when their lease runs out.
            while work_queue._items:
                item = work_queue._items.popleft()
                if item.submitter != self._own:
                    item.refuse()
            self._pump_soon()


def _dead_letter(job: Job) -> tuple[str, bytes]:
    """The topic and JSON body a dead job is published with (mesh-wide)."""
    letter: dict[str, Any] = {"id": job.id, "queue": job.queue, "attempts": job.attempts, "reason": job.last_error}
    if job.queue.startswith(SHARED_PREFIX):
        # A filter may hold wildcards, which a topic may not: shared groups' dead letters go
        # to $jobs/dead/$share/GROUP, with the message's own topic in the body.
        group = job.queue[len(SHARED_PREFIX):].partition("/")[0]
        try:
            topic, payload, _qos, _properties = wire.decode_shared_message(job.payload)
        except wire.WireError:
            topic, payload = "", job.payload
        letter.update(topic=topic, payload=base64.b64encode(payload).decode())
        return f"{DEAD_LETTER_PREFIX}{SHARED_PREFIX}{group}", json.dumps(letter).encode()
    letter["payload"] = base64.b64encode(job.payload).decode()
    return DEAD_LETTER_PREFIX + job.queue, json.dumps(letter).encode()

