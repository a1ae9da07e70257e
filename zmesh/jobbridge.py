"""Work queues for MQTT clients (and so for `zmesh jobs` and any language), through
node-local ``$jobs/...`` topics:

* submit: publish (QoS 1) to ``$jobs/submit/QUEUE[/ID]``; the PUBACK means the job is
  accepted (spooled, when the node has a data_dir). When it finishes, the node publishes
  ``$jobs/result/ID`` (the worker's result) or ``$jobs/failed/ID`` (the reason) locally;
  subscribe before submitting to wait for it.
* work: subscribe to ``$jobs/queue/QUEUE/+``; each subscribed client is one worker slot and
  gets one job at a time as ``$jobs/queue/QUEUE/ID`` (to an MQTT 5 client with the user
  property ``lease``: seconds it has before the job goes elsewhere); it answers by
  publishing the result to ``$jobs/done/ID``, or a reason to ``$jobs/fail/ID`` (delivered
  again elsewhere while attempts remain). While it works it may publish to
  ``$jobs/extend/ID`` (payload: seconds from now, or empty for one more lease) as often as
  it likes. A worker that disconnects gives its job back.
* ``$SYS/zmesh/jobs``: per-queue depth, in flight, oldest age, redeliveries, dead letters.

Everything under ``$jobs/`` stays on this node except ``$jobs/dead/QUEUE``, which the whole
mesh hears.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from zmesh.jobqueue import JobHandle, WorkItem, WorkQueue
from zmesh.routing import Subscriber

if TYPE_CHECKING:
    from zmesh.node import Node

log = logging.getLogger("zmesh.jobs")

SUBMIT, QUEUE, DONE, FAIL = "$jobs/submit/", "$jobs/queue/", "$jobs/done/", "$jobs/fail/"
EXTEND = "$jobs/extend/"
RESULT, FAILED = "$jobs/result/", "$jobs/failed/"


def is_local_only(topic: str) -> bool:
    return topic.startswith("$jobs/") and not topic.startswith("$jobs/dead/")


def worker_queue(filt: str) -> str | None:
    """``$jobs/queue/NAME/+`` -> NAME: the filter by which an MQTT client becomes a worker."""
    if filt.startswith(QUEUE) and filt.endswith("/+"):
        name = filt[len(QUEUE) : -2]
        if name and "/" not in name and "+" not in name and "#" not in name:
            return name
    return None


class _QueueWorkers:
    """The MQTT clients working one queue on this node, fed from one WorkQueue."""

    def __init__(self, bridge: JobBridge, queue: str) -> None:
        self.bridge, self.queue = bridge, queue
        self.idle: deque[Subscriber] = deque()
        self.busy: dict[Subscriber, WorkItem] = {}
        self.work: WorkQueue | None = None
        self.task: asyncio.Task[None] | None = None

    def resize(self) -> None:
        """Serve the queue with one slot per connected worker client. The WorkQueue is kept
        while there are clients (only its prefetch changes), so jobs already sent here are
        never dropped by a client coming or going; with none left it is closed, which gives
        back the jobs not yet taken."""
        slots = len(self.idle) + len(self.busy)
        if slots and self.work is not None:
            self.work.resize(slots)
            return
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.work is not None:
            self.work.close()
            self.work = None
        if slots:
            self.work = self.bridge.node.jobs.work(self.queue, prefetch=slots)
            self.task = asyncio.create_task(self._feed(self.work), name=f"mqtt-workers-{self.queue}")

    async def _feed(self, work: WorkQueue) -> None:
        # Never holds a job across an await: a job is taken only when a client is idle to
        # take it, so a cancelled feed leaves every job in the WorkQueue.
        ready = self.bridge.ready
        while True:
            while not self.idle:
                ready.clear()
                await ready.wait()
            item = await work.__anext__()
            if not self.idle:  # the idle client left while we waited for a job
                work._items.appendleft(item)
                continue
            held = self.bridge.items.get(item.id)
            if held is not None:
                # Delivered again (its lease ran out) while a client here still works on it:
                # that client's answer serves this delivery too. Handing it to a second client
                # would tie two clients to one job id, and the first answer would free the
                # wrong one, leaving the other's slot taken for good.
                _, worker, workers = held
                workers.busy[worker] = item
                self.bridge.items[item.id] = (item, worker, workers)
                continue
            worker = self.idle.popleft()
            self.busy[worker] = item
            self.bridge.items[item.id] = (item, worker, self)
            # The lease goes with the job (MQTT 5 clients see it) so that a worker knows how
            # often to extend it; `zmesh jobs work` does so every third of it.
            lease = {"user_property": [("lease", f"{item.lease:g}")]}
            worker.deliver(f"{QUEUE}{self.queue}/{item.id}", item.payload, 1, False, self.bridge.node.name, lease)


class JobBridge:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.queues: dict[str, _QueueWorkers] = {}
        self.items: dict[str, tuple[WorkItem, Subscriber, _QueueWorkers]] = {}
        self.ready = asyncio.Event()

    # ------------------------------------------------------------------ workers

    def add_worker(self, subscriber: Subscriber, queue: str) -> None:
        workers = self.queues.get(queue)
        if workers is None:
            workers = self.queues[queue] = _QueueWorkers(self, queue)
        if subscriber not in workers.idle and subscriber not in workers.busy:
            workers.idle.append(subscriber)
            workers.resize()
            self.ready.set()

    def remove_worker(self, subscriber: Subscriber) -> None:
        for workers in self.queues.values():
            item = workers.busy.pop(subscriber, None)
            if item is not None:
                self.items.pop(item.id, None)
                item.fail("worker disconnected", retry=True)
            if subscriber in workers.idle:
                workers.idle.remove(subscriber)
            elif item is None:
                continue
            workers.resize()

    # ------------------------------------------------------------------ publishes

    def on_publish(self, topic: str, payload: bytes) -> asyncio.Future[None] | None:
        """A publish to ``$jobs/...`` on this node; a future when the PUBACK must wait."""
        if topic.startswith(SUBMIT):
            rest = topic[len(SUBMIT) :]
            queue, _, job_id = rest.partition("/")
            if not queue:
                return None
            return asyncio.ensure_future(self._submit(queue, payload, job_id or None))
        if topic.startswith(EXTEND):
            held = self.items.get(topic[len(EXTEND) :])
            if held is not None:
                held[0].keep(_seconds(payload))
            return None
        for prefix, ok in ((DONE, True), (FAIL, False)):
            if topic.startswith(prefix):
                entry = self.items.pop(topic[len(prefix) :], None)
                if entry is not None:
                    item, worker, workers = entry
                    workers.busy.pop(worker, None)
                    workers.idle.append(worker)
                    self.ready.set()
                    if ok:
                        item.done(payload)
                    else:
                        item.fail(payload.decode(errors="replace") or "failed")
        return None

    async def _submit(self, queue: str, payload: bytes, job_id: str | None) -> None:
        self.watch(await self.node.jobs.submit(queue, payload, job_id))

    def watch(self, handle: JobHandle) -> None:
        """Publish the outcome of a job on ``$jobs/result/ID`` or ``$jobs/failed/ID``."""
        handle.add_done_callback(self._publish_outcome)

    def _publish_outcome(self, handle: JobHandle) -> None:
        value, error = handle.outcome()
        if error is not None:
            self.node.publish_nowait(FAILED + handle.id, str(error).encode(), qos=1)
        else:
            self.node.publish_nowait(RESULT + handle.id, value, qos=1)


DEFAULT_LEASE = 30.0  # what a worker assumes when a job names no lease (jobs.lease's default)


def lease_of(properties: dict[str, Any] | None) -> float:
    """The lease a job was delivered with (its MQTT 5 user property ``lease``), in seconds."""
    for name, value in (properties or {}).get("user_property", ()):
        if name == "lease":
            try:
                lease = float(value)
            except ValueError:
                break
            if lease > 0:
                return lease
    return DEFAULT_LEASE


def _seconds(payload: bytes) -> float:
    """An extend payload: seconds as text; empty (or unreadable) means one more lease."""
    try:
        seconds = float(payload) if payload.strip() else 0.0
    except ValueError:
        return 0.0
    return seconds if seconds == seconds and seconds > 0 else 0.0  # NaN, negatives: one lease
