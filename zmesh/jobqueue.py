"""Work queues over the mesh: submit on any node, work on any node, each job done once.

The submitting node holds every job it accepted (``jobs.Dispatcher``) until a worker
acknowledges it. Worker nodes say in their hello which queues they serve and with what
prefetch; the submitter sends a job over CURVE PUSH -> PULL only to a node with free credit
for its queue (or hands it to a worker on this very node), and the worker answers on its
DEALER to the submitter's ROUTER: done (with a result), failed (retry or not), or "extend
my lease". A lease that runs out, or a worker node that goes down, sends the job to another
worker; after ``max_attempts`` it is published to ``$jobs/dead/<queue>`` with the reason.
A worker remembers recently finished job ids, so a redelivered duplicate is answered
again, not run twice.

With a ``data_dir`` the submitter spools every job (``spool.JobSpool``) before ``submit``
returns, in group commits, and loads the spool again on start, so a restart of the
submitter loses nothing it accepted.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zmesh import wire
from zmesh.jobs import Dispatcher, Job, Outcome, RecentIds

if TYPE_CHECKING:
    from zmesh.node import Node

log = logging.getLogger("zmesh.jobs")

TICK = 0.05
DEAD_LETTER_PREFIX = "$jobs/dead/"


class JobFailed(Exception):
    """The job went to the dead letters; the message says why."""


class JobHandle:
    def __init__(self, job_id: str, future: asyncio.Future[bytes]) -> None:
        self.id = job_id
        self._future = future

    async def result(self, timeout: float | None = None) -> bytes:
        """The worker's result; JobFailed if the job ended in the dead letters."""
        return await asyncio.wait_for(asyncio.shield(self._future), timeout)


class WorkItem:
    """One job on a worker: ``ack(result)``, ``nack(reason, retry=True)``, ``extend(s)``."""

    def __init__(self, service: JobService, submitter: str, frame: wire.JobFrame) -> None:
        self.service, self.submitter = service, submitter
        self.id, self.queue, self.payload, self.attempt = frame.id, frame.queue, frame.payload, frame.attempt
        self.lease = frame.lease
        self.finished = False

    async def ack(self, result: bytes = b"") -> None:
        self._finish(wire.JobReport(self.id, True, result))

    async def nack(self, reason: str, retry: bool = True) -> None:
        self._finish(wire.JobReport(self.id, False, b"", reason, retry))

    async def extend(self, seconds: float) -> None:
        self.service._report(self, wire.JOB_EXTEND, wire.JobReport(self.id, seconds=seconds))

    def _finish(self, report: wire.JobReport) -> None:
        if self.finished:
            return
        self.finished = True
        if report.ok:
            self.service.recent.add(self.id, report.result)
        self.service._report(self, wire.JOB_DONE, report)


class WorkQueue:
    """``async for job in node.work(queue)``: jobs for a worker on this node."""

    def __init__(self, service: JobService, queue: str, prefetch: int) -> None:
        self.service, self.queue, self.prefetch = service, queue, prefetch
        self._items: deque[WorkItem] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: WorkItem) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> WorkQueue:
        return self

    async def __anext__(self) -> WorkItem:
        while not self._items:
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
    def __init__(self, node: Node, lease: float = 30.0, max_attempts: int = 5) -> None:
        self.node = node
        self.dispatcher = Dispatcher(lease, max_attempts)
        self.handles: dict[str, asyncio.Future[bytes]] = {}
        self.workers: dict[str, WorkQueue] = {}
        self.recent = RecentIds()
        self._task: asyncio.Task[None] | None = None
        self._own = ""
        self.spool: Any = None
        self._to_spool: list[tuple[Job, asyncio.Future[None]]] = []
        self._to_forget: list[str] = []
        self._spool_wake = asyncio.Event()
        self._spool_task: asyncio.Task[None] | None = None

    async def start(self, own_key: str, data_dir: Path | None) -> None:
        mesh = self.node.mesh
        assert mesh is not None
        self._own = own_key
        mesh.on_hello = self._on_hello
        mesh.on_job = self._on_job
        mesh.on_job_report = self._on_report
        if data_dir is not None:
            from zmesh.spool import JobSpool

            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.spool = await asyncio.to_thread(JobSpool, data_dir / "jobs.db")
            pending = await asyncio.to_thread(self.spool.load)
            now = time.monotonic()
            loop = asyncio.get_running_loop()
            for job in pending:
                job.submitted_at = now
                if self.dispatcher.submit(job):
                    # Whoever submitted it is gone with the old process: its outcome is
                    # published on $jobs/result/ID or $jobs/failed/ID, and a submit of the
                    # same id gets this handle.
                    future = self.handles[job.id] = loop.create_future()
                    self.node.job_bridge.watch(job.id, future)
            if pending:
                log.info("job spool: %d jobs accepted before the restart are pending again", len(pending))
            self._spool_task = asyncio.create_task(self._spool_writer(), name="job-spool")
        self._task = asyncio.create_task(self._tick(), name="jobs")

    async def stop(self) -> None:
        for task in (self._task, self._spool_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
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
                await asyncio.to_thread(self.spool.add, [job for job, _ in added])
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
        job_id = job_id or uuid.uuid4().hex
        future = self.handles.get(job_id)
        if future is None:
            future = self.handles[job_id] = asyncio.get_running_loop().create_future()
            job = Job(job_id, queue, payload, time.monotonic())
            if self.spool is not None:
                durable = asyncio.get_running_loop().create_future()
                self._to_spool.append((job, durable))
                self._spool_wake.set()
                try:
                    await durable
                except Exception:
                    del self.handles[job_id]
                    raise
            self.dispatcher.submit(job)
            self._pump()
        return JobHandle(job_id, future)

    def _pump(self) -> None:
        mesh = self.node.mesh
        for job, worker in self.dispatcher.dispatch(time.monotonic()):
            if worker == self._own:
                local = self.workers.get(job.queue)
                if local is not None:
                    frame = wire.JobFrame(job.id, job.queue, job.payload, job.attempts, self.dispatcher.lease)
                    local.put(WorkItem(self, self._own, frame))
                    continue
            elif mesh is not None and mesh.send_job(
                worker, wire.encode_job(job.id, job.queue, job.payload, job.attempts, self.dispatcher.lease)
            ):
                continue
            self.dispatcher.undo_dispatch(job)  # not connected yet: try again next tick

    def _settle(self, results: list[tuple[Job, Outcome]], result: bytes = b"") -> None:
        for job, outcome in results:
            if outcome in (Outcome.DONE, Outcome.DEAD) and self.spool is not None:
                self._to_forget.append(job.id)
                self._spool_wake.set()
            future = self.handles.get(job.id)
            if outcome is Outcome.DONE:
                if future is not None and not future.done():
                    future.set_result(result)
                self.handles.pop(job.id, None)
            elif outcome is Outcome.DEAD:
                log.warning("job %s of %s is dead after %d attempts: %s", job.id, job.queue, job.attempts, job.last_error)
                letter = {
                    "id": job.id, "queue": job.queue, "attempts": job.attempts, "reason": job.last_error,
                    "payload": base64.b64encode(job.payload).decode(),
                }
                self.node.publish_nowait(DEAD_LETTER_PREFIX + job.queue, json.dumps(letter).encode(), qos=1)
                if future is not None and not future.done():
                    future.set_exception(JobFailed(f"job {job.id}: {job.last_error} (after {job.attempts} attempts)"))
                self.handles.pop(job.id, None)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self._settle(self.dispatcher.expire(time.monotonic()))
            self._pump()

    # ------------------------------------------------------------------ from the mesh

    def _on_hello(self, key: str, hello: wire.Hello) -> None:
        served = dict(hello.queues)
        for (worker, queue) in list(self.dispatcher.workers):
            if worker == key and queue not in served:  # only that queue's jobs go elsewhere
                self._settle(self.dispatcher.worker_down(key, time.monotonic(), queue))
        for queue, prefetch in served.items():
            self.dispatcher.worker_up(key, queue, prefetch)

    def peer_gone(self, key: str) -> None:
        """A worker node went down or restarted: what it held is delivered elsewhere."""
        self._settle(self.dispatcher.worker_down(key, time.monotonic()))
        self._pump()

    def _on_report(self, key: str, message: wire.ControlMessage) -> None:
        assert message.job is not None
        self._handle_report(key, message.kind, message.job)

    def _handle_report(self, worker: str, kind: str, report: wire.JobReport) -> None:
        now = time.monotonic()
        if kind == wire.JOB_EXTEND:
            self.dispatcher.extend(report.id, worker, report.seconds, now)
            return
        if report.ok:
            job, outcome = self.dispatcher.acked(report.id, worker)
        else:
            job, outcome = self.dispatcher.nacked(report.id, worker, report.error or "failed", report.retry)
        if job is not None:
            self._settle([(job, outcome)], report.result)
        self._pump()

    def _on_job(self, submitter: str, data: bytes) -> None:
        try:
            frame = wire.decode_job(data)
        except wire.WireError as exc:
            log.warning("bad job frame from %s: %s", submitter[:8], exc)
            return
        done = self.recent.get(frame.id)
        item = WorkItem(self, submitter, frame)
        if done is not None:  # a duplicate of one we finished: answer again, do not run it
            item.finished = True
            self._report(item, wire.JOB_DONE, wire.JobReport(frame.id, True, done))
            return
        local = self.workers.get(frame.queue)
        if local is None:
            item.finished = True
            self._report(item, wire.JOB_DONE, wire.JobReport(frame.id, False, b"", "no worker for this queue here"))
            return
        local.put(item)

    def _report(self, item: WorkItem, kind: str, report: wire.JobReport) -> None:
        if item.submitter == self._own:
            self._handle_report(self._own, kind, report)
        elif self.node.mesh is not None:
            self.node.mesh.send_report(item.submitter, wire.encode_job_report(kind, report))

    def stats(self) -> dict[str, dict[str, float]]:
        """Per queue: depth, in flight, oldest job age (s), redeliveries, dead, done."""
        now = time.monotonic()
        queues = set(self.dispatcher.pending) | {q for _, q in self.dispatcher.workers} | set(self.dispatcher.done)
        return {q: vars(self.dispatcher.stats(q, now)) for q in sorted(queues)}

    # ------------------------------------------------------------------ working

    def work(self, queue: str, prefetch: int = 1) -> WorkQueue:
        work_queue = self.workers[queue] = WorkQueue(self, queue, prefetch)
        if self.node.mesh is not None:
            self.node.mesh.local_queues[queue] = prefetch
        self.dispatcher.worker_up(self._own, queue, prefetch)
        self._pump()
        return work_queue

    def _resize(self, work_queue: WorkQueue, prefetch: int) -> None:
        work_queue.prefetch = prefetch
        if self.workers.get(work_queue.queue) is work_queue:
            if self.node.mesh is not None:
                self.node.mesh.local_queues[work_queue.queue] = prefetch
            self.dispatcher.worker_up(self._own, work_queue.queue, prefetch)
            self._pump()

    def _stop_working(self, work_queue: WorkQueue) -> None:
        if self.workers.get(work_queue.queue) is work_queue:
            del self.workers[work_queue.queue]
            if self.node.mesh is not None:
                self.node.mesh.local_queues.pop(work_queue.queue, None)
            # What this node held of this queue goes back to be delivered elsewhere (other
            # queues' jobs stay where they are): our own jobs here, ...
            self._settle(self.dispatcher.worker_down(self._own, time.monotonic(), work_queue.queue))
            # ... and jobs of other submitters not yet taken by a worker, at once rather
            # than when their lease runs out.
            while work_queue._items:
                item = work_queue._items.popleft()
                if item.submitter != self._own:
                    item._finish(wire.JobReport(item.id, False, b"", "worker stopped before taking it"))
