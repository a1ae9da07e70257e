"""Work queues for MQTT clients (and so for `zmesh jobs` and any language), through
node-local ``$jobs/...`` topics:

* submit: publish (QoS 1) to ``$jobs/submit/QUEUE[/ID]``; the PUBACK means the job is
  accepted (spooled, when the node has a data_dir). When it finishes, the node publishes
  ``$jobs/result/ID`` (the worker's result) or ``$jobs/failed/ID`` (the reason) locally;
  subscribe before submitting to wait for it. A client that subscribes to one of them
  later still gets the outcome, as if retained, for ``OUTCOME_KEEP`` seconds (the last
  ``OUTCOME_MAX`` outcomes, at most ``OUTCOME_BYTES`` in all): `zmesh jobs result ID`.
* work: subscribe to ``$jobs/queue/QUEUE/+``; each subscribed client is one worker slot and
  gets one job at a time as ``$jobs/queue/QUEUE/ID`` (to an MQTT 5 client with the user
  property ``lease``: seconds it has before the job goes elsewhere); it answers by
  publishing the result to ``$jobs/done/ID``, or a reason to ``$jobs/fail/ID`` (delivered
  again elsewhere while attempts remain). While it works it may publish to
  ``$jobs/extend/ID`` (payload: seconds from now, or empty for one more lease) as often as
  it likes. A worker that disconnects gives its job back.
* only the worker holding a job may answer or extend it: the MQTT server asks
  ``may_publish`` (with the publishing session) before a client's publish to any
  ``$jobs/`` topic, and a client's ``done``/``fail``/``extend`` for a job its session does
  not hold, or a publish to a topic only the node writes (``result``, ``failed``,
  ``queue``), is refused (MQTT 5: reason 0x87) and counted. The node's own
  code (the Python API, publisher None) is trusted: it could settle the job directly.
* ``$SYS/zmesh/jobs``: per-queue depth, in flight, oldest age, redeliveries, dead letters.

Everything under ``$jobs/`` stays on this node except ``$jobs/dead/QUEUE``, which the whole
mesh hears.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from zmesh.jobs.dispatcher import WORKER_GONE
from zmesh.jobs.service import DEAD_LETTER_PREFIX, JobHandle, JobService, WorkItem, WorkQueue
from zmesh.routing import Subscriber

if TYPE_CHECKING:
    from zmesh.ports import Publisher

log = logging.getLogger("zmesh.jobs")

SUBMIT, QUEUE, DONE, FAIL = "$jobs/submit/", "$jobs/queue/", "$jobs/done/", "$jobs/fail/"
EXTEND = "$jobs/extend/"
RESULT, FAILED = "$jobs/result/", "$jobs/failed/"
ANSWERS = (DONE, FAIL, EXTEND)

# Drop reasons (zmesh.drops; README "Bad input").
NOT_LEASE_HOLDER = "jobs_not_lease_holder"  # an answer from a session not holding the job
RESERVED_TOPIC = "jobs_reserved_topic"  # a client publish to a $jobs/ topic the node writes

# Recent outcomes kept for clients that ask after the fact: bounded in time, count and bytes.
OUTCOME_KEEP = 600.0
OUTCOME_MAX = 10_000
OUTCOME_BYTES = 16 * 1024 * 1024


class RecentOutcomes:
    """The last outcomes of jobs submitted here: job id -> (topic, payload, when). Pure;
    ``now`` passed in. Oldest forgotten first when over count or bytes; expired on read."""

    def __init__(self, keep: float = OUTCOME_KEEP, max_count: int = OUTCOME_MAX, max_bytes: int = OUTCOME_BYTES) -> None:
        self.keep, self.max_count, self.max_bytes = keep, max_count, max_bytes
        self._items: OrderedDict[str, tuple[str, bytes, float]] = OrderedDict()
        self._bytes = 0

    def add(self, job_id: str, topic: str, payload: bytes, now: float) -> None:
        old = self._items.pop(job_id, None)
        if old is not None:
            self._bytes -= len(old[1])
        if len(payload) > self.max_bytes:
            return
        self._items[job_id] = (topic, payload, now)
        self._bytes += len(payload)
        while len(self._items) > self.max_count or self._bytes > self.max_bytes:
            _, (_, dropped, _) = self._items.popitem(last=False)
            self._bytes -= len(dropped)

    def get(self, job_id: str, now: float) -> tuple[str, bytes] | None:
        item = self._items.get(job_id)
        if item is None or now - item[2] > self.keep:
            return None
        return item[0], item[1]

    def __len__(self) -> int:
        return len(self._items)


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
            self.work = self.bridge.jobs.work(self.queue, prefetch=slots)
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
            worker.deliver(f"{QUEUE}{self.queue}/{item.id}", item.payload, 1, False, self.bridge.name, lease)


class JobBridge:
    def __init__(
        self, jobs: JobService, publisher: Publisher, name: str,
        drop: Callable[[str, str], None] = lambda reason, detail: None,
    ) -> None:
        self.jobs, self.publisher, self.name = jobs, publisher, name
        self.drop = drop  # counts and logs a refused publish (the node's Drops.drop)
        self.queues: dict[str, _QueueWorkers] = {}
        self.items: dict[str, tuple[WorkItem, Subscriber, _QueueWorkers]] = {}
        self.ready = asyncio.Event()
        self.outcomes = RecentOutcomes()

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
                item.fail(WORKER_GONE, retry=True)  # no backoff: the worker left, not the job
            if subscriber in workers.idle:
                workers.idle.remove(subscriber)
            elif item is None:
                continue
            workers.resize()

    # ------------------------------------------------------------------ publishes

    def refusal(self, topic: str, publisher: Subscriber) -> str | None:
        """Why ``publisher`` (a client's session) may not publish to ``topic`` under
        ``$jobs/``: a drop reason, or None when it may. An unknown job id and a job held by
        another session get the same answer, so a client cannot probe which ids exist."""
        if topic.startswith(SUBMIT) or topic.startswith(DEAD_LETTER_PREFIX):
            # Dead letters are a mesh-wide topic like any other (every node may send them;
            # they settle nothing): the ACL decides who may publish there.
            return None
        for prefix in ANSWERS:
            if topic.startswith(prefix):
                held = self.items.get(topic[len(prefix) :])
                return None if held is not None and held[1] is publisher else NOT_LEASE_HOLDER
        return RESERVED_TOPIC

    def may_publish(self, topic: str, publisher: Subscriber) -> bool:
        """Whether a client's publish to ``topic`` (under ``$jobs/``) goes through; a
        refused one is counted and logged (rate-limited) here."""
        reason = self.refusal(topic, publisher)
        if reason is None:
            return True
        self.drop(reason, f"client {getattr(publisher, 'client_id', '?')!r} published to {topic!r}")
        return False

    def on_publish(self, topic: str, payload: bytes) -> asyncio.Future[None] | None:
        """A publish to ``$jobs/...`` on this node; a future when the PUBACK must wait.
        A client's publish has passed ``may_publish`` (in the same event-loop step, so the
        job is still held by that client)."""
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
        self.watch(await self.jobs.submit(queue, payload, job_id))

    def watch(self, handle: JobHandle) -> None:
        """Publish the outcome of a job on ``$jobs/result/ID`` or ``$jobs/failed/ID``."""
        handle.add_done_callback(self._publish_outcome)

    def _publish_outcome(self, handle: JobHandle) -> None:
        value, error = handle.outcome()
        topic, payload = (FAILED + handle.id, str(error).encode()) if error is not None else (RESULT + handle.id, value)
        self.outcomes.add(handle.id, topic, payload, time.monotonic())
        self.publisher.publish_nowait(topic, payload, qos=1)

    def outcome_for(self, filt: str) -> tuple[str, bytes] | None:
        """A subscription to ``$jobs/result/ID`` or ``$jobs/failed/ID`` after the job ended:
        its outcome, if still kept (and of that kind)."""
        for prefix in (RESULT, FAILED):
            if filt.startswith(prefix):
                found = self.outcomes.get(filt[len(prefix):], time.monotonic())
                return found if found is not None and found[0] == filt else None
        return None


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
