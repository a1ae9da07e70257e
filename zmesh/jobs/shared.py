"""MQTT shared subscriptions, mesh-wide: ``$share/GROUP/FILTER``.

Each message matching a group's filter goes to exactly one member of the group, on whatever
node the member is connected to; the members' other, ordinary subscriptions are untouched.
A group is a work queue of the ``JobService`` named after the subscription
(``$share/GROUP/FILTER``), so it inherits credit, leases and redelivery:

* A node with members of a group serves that queue, with as much credit as its members
  may hold unacknowledged (``mqtt.max_inflight`` each), and says so in its hello like any
  queue. Every node therefore knows every group in the mesh, and keeps their filters in a
  trie of its own.
* A message published on a node (by an MQTT client, the Python API, a will) that matches a
  group's filter becomes one job of that group's queue, on the publishing node. The
  dispatcher sends it to the node with the most free credit for the group (its own members
  included, with no hop); that node hands it to one of its members, round robin among
  those with free credit.
* The member's acknowledgement acks the job: PUBACK at QoS 1 (PUBCOMP at QoS 2), at once
  at QoS 0 (at most once), and for the Python API when the consumer takes the message
  (subscribers offer ``deliver_shared(topic, payload, qos, properties, origin, settle)``:
  ``settle(True)`` when done, ``settle(False)`` when dropped undelivered). A
  member that leaves (unsubscribes, disconnects without a persistent session) gives back
  what it had not acknowledged, which goes to another member, here or on another node. A
  member that stays subscribed (a persistent session while its client is away included)
  keeps what it holds: the node extends those leases. A node that goes down loses its
  members' messages to the lease or the peer expiry, whichever comes first, and they are
  delivered elsewhere.
* A message matching no group anywhere costs one flag check. A group whose members all
  left everywhere has its waiting messages dropped after one lease (MQTT drops messages of
  a subscription that no longer exists), counted in ``$SYS/zmesh/jobs``.
* MQTT 5 rules: shared subscriptions get no retained messages when they subscribe, and
  No Local on one is a protocol error (the MQTT listener closes the connection).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from zmesh import topics
from zmesh.jobs.service import JobService, WorkItem, WorkQueue
from zmesh.mesh import wire

if TYPE_CHECKING:
    from zmesh.routing import Subscriber

# (sender key, topic) -> (the sender's node name, whether the mesh policy lets it publish
# there): the node answers it from the mesh's membership and its mesh policy.
OriginOf = Callable[[str, str], tuple[str, bool]]

log = logging.getLogger("zmesh.jobs.shared")

MATCH_CACHE_LIMIT = 10_000
EXTEND_TICK = 0.25  # seconds between looks at what members hold (leases are extended at 1/3)


class _Member:
    __slots__ = ("subscriber", "qos", "credit", "held")

    def __init__(self, subscriber: Subscriber, qos: int, credit: int) -> None:
        self.subscriber, self.qos, self.credit, self.held = subscriber, qos, credit, 0


class _Group:
    """The members of one shared subscription on this node, fed from one WorkQueue."""

    def __init__(self, shared: SharedGroups, queue: str) -> None:
        self.shared, self.queue = shared, queue
        self.members: dict[Subscriber, _Member] = {}
        self.ring: deque[_Member] = deque()  # round-robin order
        self.work: WorkQueue | None = None
        # (item, arrival): arrived while no member would take it (all full, refusing)
        self.backlog: deque[tuple[WorkItem, float]] = deque()
        # job id -> [member, item, last extended]: delivered, not yet acknowledged
        self.held: dict[str, list[Any]] = {}

    # ------------------------------------------------------------------ members

    def add(self, subscriber: Subscriber, qos: int) -> None:
        member = self.members.get(subscriber)
        if member is not None:
            member.qos = qos  # a re-subscribe changes the QoS only
            return
        # A member holds at most what its client may have unacknowledged (mqtt.max_inflight),
        # or what a Python subscription buffers, if less: the rest waits at the submitter,
        # where any member anywhere can take it.
        credit = max(1, min(self.shared.credit, getattr(subscriber, "shared_credit", self.shared.credit)))
        member = self.members[subscriber] = _Member(subscriber, qos, credit)
        self.ring.append(member)
        self._resize()
        self._feed()

    def remove(self, subscriber: Subscriber) -> None:
        member = self.members.pop(subscriber, None)
        if member is None:
            return
        self.ring.remove(member)
        for job_id, (holder, item, _) in list(self.held.items()):
            if holder is member:  # never acknowledged: delivered again, elsewhere if need be
                del self.held[job_id]
                item.fail("shared subscription member left", retry=True)
        if not self.members:
            while self.backlog:  # never delivered here: elsewhere, no attempt spent
                self.backlog.popleft()[0].refuse()
        self._resize()

    def _resize(self) -> None:
        slots = sum(member.credit for member in self.ring)
        if slots and self.work is not None:
            self.work.resize(slots)
        elif slots:
            self.work = self.shared.jobs.work(self.queue, slots, on_item=self.take)
        else:
            if self.work is not None:
                self.work.close()
                self.work = None
            del self.shared.groups[self.queue]

    # ------------------------------------------------------------------ messages

    def take(self, item: WorkItem) -> None:
        entry = self.held.get(item.id)
        if entry is not None:
            # Delivered again (its lease ran out) while a member here still holds it: that
            # member's acknowledgement answers this delivery too.
            entry[1] = item
            return
        if self.backlog or not self._give(item):
            self.backlog.append((item, time.monotonic()))

    def _pick(self) -> _Member | None:
        ring = self.ring
        for _ in range(len(ring)):
            member = ring[0]
            ring.rotate(-1)
            if member.held < member.credit:
                return member
        return None

    def _give(self, item: WorkItem) -> bool:
        """Deliver ``item`` to one member, round robin among those with free credit; False
        if none would take it now (it waits in the backlog)."""
        try:
            topic, payload, qos, properties = wire.decode_shared_message(item.payload)
        except wire.WireError as exc:
            item.fail(f"malformed shared message: {exc}", retry=False)
            return True
        origin, allowed = self.shared.origin(item.submitter, topic)
        if not allowed:
            item.done()  # the mesh policy forbids that peer this topic: dropped, as live
            return True
        tried: set[_Member] = set()
        while (member := self._pick()) is not None and member not in tried:
            tried.add(member)
            member.held += 1
            self.held[item.id] = [member, item, time.monotonic()]
            deliver = getattr(member.subscriber, "deliver_shared", None)
            if deliver is None:  # a subscriber with no acknowledgement of its own
                member.subscriber.deliver(topic, payload, min(qos, member.qos), False, origin, properties)
                self._settled(item.id, member, True)
                return True
            if deliver(topic, payload, min(qos, member.qos), properties, origin,
                       partial(self._settled, item.id, member)):
                return True
            # It would not take it (no read access, away at QoS 0, buffer full): another may.
            member.held -= 1
            del self.held[item.id]
        return False

    def _settled(self, job_id: str, member: _Member, kept: bool) -> None:
        """What a member says of a message it was given: done with (acknowledged), or
        dropped undelivered (its queue overflowed), which gives it back to the submitter."""
        entry = self.held.get(job_id)
        if entry is None or entry[0] is not member:
            return  # given back already (the member left), or settled twice
        del self.held[job_id]
        member.held -= 1
        if kept:
            entry[1].done()
        else:
            entry[1].fail("dropped from a shared subscription member's full queue", retry=True)
        self._feed()

    def _feed(self) -> None:
        backlog = self.backlog
        while backlog and self._give(backlog[0][0]):
            backlog.popleft()

    def upkeep(self, now: float) -> None:
        # Members that are still subscribed keep what they hold, however long their client
        # takes (or stays away, with a persistent session): tell the submitters so.
        for entry in self.held.values():
            item = entry[1]
            if now - entry[2] >= item.lease / 3:
                entry[2] = now
                item.keep()
        # What no member would take is not kept alive: once its lease is over the
        # submitter has given it to another node (or will dead-letter it), so it goes.
        backlog = self.backlog
        while backlog and now - backlog[0][1] >= backlog[0][0].lease:
            backlog.popleft()
        self._feed()


class SharedGroups:
    """Every shared subscription of this node's subscribers, and the groups of the mesh."""

    def __init__(self, jobs: JobService, credit: int, origin: OriginOf) -> None:
        self.jobs = jobs
        self.credit = max(1, credit)  # per member (mqtt.max_inflight)
        self.origin = origin
        self.groups: dict[str, _Group] = {}  # "$share/GROUP/FILTER" -> its members here
        self.active = False  # some group is served somewhere: publishes must be matched
        self._queues: frozenset[str] = frozenset()
        self._index: topics.SubscriptionTrie[str] = topics.SubscriptionTrie()
        self._cache: dict[str, list[str]] = {}
        self._last_extend = 0.0
        self._warned: set[str] = set()
        jobs.on_shared_queues = self.refresh
        jobs.tickers.append(self.tick)

    # ------------------------------------------------------------------ members

    def add_member(self, subscriber: Subscriber, filt: str, qos: int) -> None:
        """``subscriber`` joins the group of ``filt`` (a valid ``$share/GROUP/FILTER``)."""
        group = self.groups.get(filt)
        if group is None:
            group = self.groups[filt] = _Group(self, filt)
        group.add(subscriber, qos)

    def remove_member(self, subscriber: Subscriber, filt: str) -> bool:
        group = self.groups.get(filt)
        if group is None or subscriber not in group.members:
            return False
        group.remove(subscriber)
        return True

    def remove_subscriber(self, subscriber: Subscriber) -> None:
        for group in list(self.groups.values()):
            group.remove(subscriber)

    # ------------------------------------------------------------------ publishing

    def refresh(self, queues: set[str]) -> None:
        """The groups served anywhere in the mesh (from the JobService's workers)."""
        if queues == self._queues:
            return
        index: topics.SubscriptionTrie[str] = topics.SubscriptionTrie()
        for queue in queues:
            try:
                group, inner = topics.parse_shared(queue)
                if group is None:
                    continue
                topics.validate_topic_filter(queue)
                index.add(inner, queue)
            except topics.TopicError as exc:  # a peer advertised nonsense: not a group
                if queue not in self._warned:
                    self._warned.add(queue)
                    log.warning("ignoring shared subscription %r advertised by a peer: %s", queue, exc)
        self._queues = frozenset(queues)
        self._index, self._cache = index, {}
        self.active = bool(len(index))

    def route(self, topic: str, payload: bytes, qos: int, properties: dict[str, Any] | None) -> None:
        """A message published on this node: one job for each group whose filter matches."""
        queues = self._cache.get(topic)
        if queues is None:
            queues = [queue for queue, _filter, _value in self._index.match(topic)]
            if len(self._cache) >= MATCH_CACHE_LIMIT:
                self._cache.clear()
            self._cache[topic] = queues
        if queues:
            message = wire.encode_shared_message(topic, payload, qos, properties)
            for queue in queues:
                self.jobs.submit_shared(queue, message)

    # ------------------------------------------------------------------ upkeep

    def tick(self, now: float) -> None:
        if not self.groups or now - self._last_extend < EXTEND_TICK:
            return
        self._last_extend = now
        for group in list(self.groups.values()):
            group.upkeep(now)
