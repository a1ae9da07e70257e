"""Per-client protocol state that outlives single packets. Pure: no I/O, time comes as ``now``.

``OutboundWindow`` holds QoS 1 and 2 messages on their way to a client: at most
``max_inflight`` unacknowledged (Mosquitto's max_inflight_messages, lowered to the client's
MQTT 5 Receive Maximum), further ones queued up to ``max_queued`` (Mosquitto's
max_queued_messages), and beyond that the OLDEST queued message is dropped and counted, so
a slow or absent client costs bounded memory and gets the freshest data when it returns.
A QoS 2 message moves from "PUBLISH sent" to "PUBREL sent" on PUBREC and leaves on PUBCOMP.
While the client is away nothing is sent: messages wait in the queue, and on reconnect the
unacknowledged ones are sent again (PUBLISH with DUP, or PUBREL) before the queue drains.

``InboundQoS2`` remembers the packet ids of QoS 2 messages received but not yet released,
so a retransmitted PUBLISH (DUP) is acknowledged again but not delivered twice.

``TopicAliases`` resolves MQTT 5 topic aliases a client sends us.

``SubscriptionOptions`` and :func:`plan_delivery` decide, for a client whose matching
subscriptions carry MQTT 5 options (no local, retain as published, identifiers), whether
and how one message goes to it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zmesh.mqtt.codec import PROTOCOL_ERROR, TOPIC_ALIAS_INVALID, MQTTError

# MQTT 5 session expiry interval meaning "never expires" (and the 3.1.1 clean session 0).
NEVER = 0xFFFFFFFF


@dataclass(slots=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: dict[str, Any] | None
    packet_id: int = 0
    # Monotonic deadline from the MQTT 5 message expiry interval; 0.0: never expires.
    expires_at: float = 0.0
    # QoS 2: PUBREC received and PUBREL sent; only PUBCOMP is awaited.
    released: bool = False
    # Sent at least once on some connection: a resend carries DUP.
    sent: bool = False
    # A shared subscription's message (zmesh.jobs.shared): called once with True when it is done
    # with here (acknowledged, or expired), False when dropped undelivered (another member
    # of the group should get it).
    settle: Callable[[bool], None] | None = None
    # What it counts against the node's QueueBudget while held (set on admission).
    cost: int = 0
    # Its number in the session's on-disk copy (zmesh.mqtt.sessionstore), given on admission
    # when the session is persisted; 0: not persisted (a shared subscription's message: its
    # job is redelivered by the job service instead).
    seq: int = 0


# Memory one held message costs beyond its topic and payload (the Outgoing, its strings'
# headers, the queue slot): measured ~198 B per queued message in issue 14.
MESSAGE_OVERHEAD = 200

DROP_QUEUE_FULL = "mqtt_queue_full"  # max_queued: the oldest queued message went
DROP_QUEUED_BYTES = "mqtt_queued_bytes"  # max_queued_bytes: the new message went
DROP_QUEUE_BUDGET = "mqtt_queue_budget"  # max_queued_bytes_total (node-wide): the new message went
DROP_NOT_READABLE = "mqtt_read_denied"  # held for a session whose new owner may not read it


class QueueBudget:
    """Bytes of QoS 1/2 messages the node holds for its clients, queued and in flight, all
    sessions together (``mqtt.max_queued_bytes_total``; 0: no limit). Each held message
    counts its payload, topic and MESSAGE_OVERHEAD, so the figure follows memory."""

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.used = 0

    def full(self) -> bool:
        return 0 < self.limit <= self.used


class OutboundWindow:
    def __init__(
        self, max_inflight: int, max_queued: int, max_queued_bytes: int = 0, budget: QueueBudget | None = None
    ) -> None:
        self.max_inflight = max(1, max_inflight)
        self.max_queued = max_queued
        # Mosquitto's max_queued_bytes: payload bytes of queued (not in flight) messages;
        # while the queue holds this much, a new message is dropped (0: no limit).
        self.max_queued_bytes = max_queued_bytes
        self.queued_bytes = 0
        self.budget = budget
        self.inflight: dict[int, Outgoing] = {}  # insertion order is send order
        self.queue: deque[Outgoing] = deque()
        self.dropped = 0  # every message dropped here, whatever the reason
        self.drops: dict[str, int] = {}  # the same, by reason (DROP_*)
        self.expired = 0  # message expiry passed while queued
        self._next_id = 0
        # Told of every change a disk copy must follow (message, still held?); None: the
        # session is not persisted. Messages are numbered (``seq``) on admission for it.
        self.on_change: Callable[[Outgoing, bool], None] | None = None
        self.last_seq = 0

    def _allocate(self) -> int:
        # Packet ids are 1..65535 and must not collide with one still in flight.
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self.inflight:
                return self._next_id
        raise RuntimeError("no free packet id")  # impossible while max_inflight < 65535

    def _hold(self, message: Outgoing) -> None:
        if self.budget is not None:
            message.cost = len(message.payload) + len(message.topic) + MESSAGE_OVERHEAD
            self.budget.used += message.cost
        if self.on_change is not None and message.settle is None:
            self.last_seq += 1
            message.seq = self.last_seq
            self.on_change(message, True)

    def _release(self, message: Outgoing) -> None:
        # Every way out of the window passes here (acknowledged, completed, expired, dropped).
        if message.cost:
            self.budget.used -= message.cost  # type: ignore[union-attr]  # cost is set only with a budget
            message.cost = 0
        if message.seq and self.on_change is not None:
            self.on_change(message, False)

    def _drop(self, message: Outgoing, reason: str) -> None:
        self.dropped += 1
        self.drops[reason] = self.drops.get(reason, 0) + 1
        self._release(message)
        _settle(message, False)

    def offer(self, message: Outgoing, online: bool = True, now: float = 0.0) -> Outgoing | None:
        """Accept a message; returns it (with its packet id) if it may be sent now.

        Offline (no connection) nothing is sent: the message waits in the queue."""
        if self.budget is not None and self.budget.full():
            self._drop(message, DROP_QUEUE_BUDGET)  # the node holds all it may for its clients
            return None
        if online and len(self.inflight) < self.max_inflight and not self.queue:
            message.packet_id = self._allocate()
            self.inflight[message.packet_id] = message
            self._hold(message)
            return message
        if self.max_queued_bytes and self.queued_bytes >= self.max_queued_bytes:
            self._drop(message, DROP_QUEUED_BYTES)  # as Mosquitto: the new one goes
            return None
        if len(self.queue) >= self.max_queued:
            if not self.queue:  # max_queued 0: nothing may wait, this one goes
                self._drop(message, DROP_QUEUE_FULL)
                return None
            oldest = self.queue.popleft()  # the oldest goes: a returning client wants the latest
            self.queued_bytes -= len(oldest.payload)
            self._drop(oldest, DROP_QUEUE_FULL)
        self.queue.append(message)
        self.queued_bytes += len(message.payload)
        self._hold(message)
        return None

    def acknowledge(self, packet_id: int, now: float = 0.0) -> list[Outgoing]:
        """A PUBACK arrived; returns queued messages that may be sent now.

        An unknown id is ignored: the client may ack twice after a retransmission."""
        message = self.inflight.get(packet_id)
        if message is None or message.qos != 1:
            return []
        del self.inflight[packet_id]
        self._release(message)
        released = self.fill(now)
        _settle(message, True)
        return released

    def pubrec(self, packet_id: int) -> bool:
        """A PUBREC arrived: the message is the client's now, PUBREL follows. False if the
        id names no QoS 2 message of ours (the caller answers PUBREL 0x92)."""
        message = self.inflight.get(packet_id)
        if message is None or message.qos != 2:
            return False
        message.released = True
        if message.cost:
            freed = min(len(message.payload), message.cost)
            message.cost -= freed
            self.budget.used -= freed  # type: ignore[union-attr]  # cost is set only with a budget
        message.payload = b""  # never sent again: free it now
        message.properties = None
        if message.seq and self.on_change is not None:
            self.on_change(message, True)  # on disk as "PUBREL stage" before PUBREL leaves
        return True

    def complete(self, packet_id: int, now: float = 0.0) -> list[Outgoing]:
        """PUBCOMP (or a PUBREC with a failure reason code, which also ends the flow)."""
        message = self.inflight.get(packet_id)
        if message is None or message.qos != 2:
            return []
        del self.inflight[packet_id]
        self._release(message)
        released = self.fill(now)
        _settle(message, True)
        return released

    def wrong_ack(self, kind: str, packet_id: int) -> str | None:
        """Why ``kind`` (PUBACK, PUBREC, PUBCOMP) cannot answer the message in flight under
        ``packet_id``, or None when it can or when nothing is in flight under that id."""
        message = self.inflight.get(packet_id)
        if message is None:
            return None
        if message.qos == 1:
            return None if kind == "PUBACK" else f"{kind} answering QoS 1 PUBLISH {packet_id}"
        if kind == "PUBACK":
            return f"PUBACK answering QoS 2 {'PUBREL' if message.released else 'PUBLISH'} {packet_id}"
        if kind == "PUBCOMP" and not message.released:
            return f"PUBCOMP before PUBREC for QoS 2 PUBLISH {packet_id}"
        return None

    def fill(self, now: float = 0.0) -> list[Outgoing]:
        """Move queued messages into free in-flight slots; expired ones are dropped."""
        released: list[Outgoing] = []
        queue, inflight = self.queue, self.inflight
        while queue and len(inflight) < self.max_inflight:
            message = queue.popleft()
            self.queued_bytes -= len(message.payload)
            if message.expires_at and message.expires_at <= now:
                self.expired += 1
                self._release(message)
                _settle(message, True)  # expired: nobody is to get it any more
                continue
            message.packet_id = self._allocate()
            inflight[message.packet_id] = message
            released.append(message)
            if message.seq and self.on_change is not None:
                self.on_change(message, True)  # its packet id is on disk before it is sent
        return released

    def restore(self, messages: list[Outgoing], last_seq: int, now: float = 0.0) -> None:
        """Refill an empty window from a disk copy (``messages`` in ``seq`` order: the
        in-flight ones, with their packet ids, before the queued ones, packet id 0). A
        message whose expiry passed is dropped; beyond ``max_queued`` the oldest queued go,
        counted as on ``offer``. Nothing is reported to ``on_change`` (the disk has it)."""
        on_change, self.on_change = self.on_change, None
        gone: list[Outgoing] = []
        try:
            for message in messages:
                if message.expires_at and message.expires_at <= now:
                    self.expired += 1
                    gone.append(message)
                    continue
                if message.packet_id and message.packet_id not in self.inflight:
                    self.inflight[message.packet_id] = message
                    self._next_id = max(self._next_id, message.packet_id)
                else:
                    message.packet_id = 0
                    self.queue.append(message)
                    self.queued_bytes += len(message.payload)
                self._hold(message)
            while len(self.queue) > self.max_queued:
                oldest = self.queue.popleft()
                self.queued_bytes -= len(oldest.payload)
                self._drop(oldest, DROP_QUEUE_FULL)
                gone.append(oldest)
        finally:
            self.on_change = on_change
        self.last_seq = max(self.last_seq, last_seq, *(m.seq for m in messages))
        if on_change is not None:
            for message in gone:  # what the disk copy still holds and the window did not take
                on_change(message, False)

    def resume(self, now: float = 0.0) -> list[Outgoing]:
        """On reconnect: every unacknowledged message again (oldest first; the caller sends
        PUBLISH with DUP, or PUBREL for released QoS 2), then newly admitted queued ones."""
        return [*self.inflight.values(), *self.fill(now)]

    def set_max_inflight(self, value: int) -> None:
        self.max_inflight = max(1, value)

    def unacknowledged(self) -> list[Outgoing]:
        """In-flight messages, oldest first."""
        return list(self.inflight.values())

    def retain_only(self, keep: Any) -> int:
        """Drop queued messages for which ``keep(message)`` is false; returns how many
        (counted as dropped)."""
        before = len(self.queue)
        kept: deque[Outgoing] = deque()
        for message in self.queue:
            if keep(message):
                kept.append(message)
            else:
                self.queued_bytes -= len(message.payload)
                self._drop(message, DROP_NOT_READABLE)
        self.queue = kept
        return before - len(kept)

    def drop_inflight(self, keep: Any) -> int:
        """Drop in-flight messages whose PUBLISH would be sent again and for which
        ``keep(message)`` is false (a new owner of the session may not read them); a QoS 2
        message past PUBREC stays (only its PUBREL is left, the payload is gone). Counted
        as dropped; returns how many."""
        gone = [pid for pid, m in self.inflight.items() if not m.released and not keep(m)]
        for pid in gone:
            self._drop(self.inflight.pop(pid), DROP_NOT_READABLE)
        return len(gone)

    def close(self) -> None:
        """The session ended: what it held no longer counts against the node's budget."""
        for message in (*self.inflight.values(), *self.queue):
            self._release(message)

    def __len__(self) -> int:
        return len(self.inflight) + len(self.queue)


def _settle(message: Outgoing, kept: bool) -> None:
    if message.settle is not None:
        settle, message.settle = message.settle, None
        settle(kept)


def remaining_expiry(properties: dict[str, Any], expires_at: float, now: float) -> dict[str, Any]:
    """``properties`` with the message expiry interval the receiver must see: what is left of
    it (MQTT 5 section 3.3.2.3.3), rounded up so that a live message never reads 0."""
    left = max(1, math.ceil(expires_at - now))
    if properties.get("message_expiry_interval") == left:
        return properties
    return {**properties, "message_expiry_interval": left}


class InboundQoS2:
    def __init__(self, limit: int = 65535) -> None:
        self.limit = limit
        self.pending: set[int] = set()
        # Told (packet id, pending?) of every change, for a disk copy; None: not persisted.
        self.on_change: Callable[[int, bool], None] | None = None

    def received(self, packet_id: int) -> bool:
        """True if this PUBLISH is new and must be delivered; False for a duplicate."""
        if packet_id in self.pending:
            return False
        self.pending.add(packet_id)
        if self.on_change is not None:
            self.on_change(packet_id, True)
        return True

    def full(self) -> bool:
        return len(self.pending) > self.limit

    def released(self, packet_id: int) -> bool:
        """PUBREL: forget the id; False if it was unknown."""
        if packet_id in self.pending:
            self.pending.discard(packet_id)
            if self.on_change is not None:
                self.on_change(packet_id, False)
            return True
        return False


class TopicAliases:
    """Inbound MQTT 5 topic aliases (section 3.3.2.3.4): a PUBLISH with a topic and an alias
    sets it; one with an empty topic and an alias uses it."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.topics: dict[int, str] = {}

    def resolve(self, topic: str, alias: int | None) -> str:
        if alias is None:
            if not topic:
                raise MQTTError(PROTOCOL_ERROR, "PUBLISH with an empty topic and no topic alias")
            return topic
        if not 0 < alias <= self.maximum:
            raise MQTTError(TOPIC_ALIAS_INVALID, f"topic alias {alias} outside 1..{self.maximum}")
        if topic:
            self.topics[alias] = topic
            return topic
        known = self.topics.get(alias)
        if known is None:
            raise MQTTError(PROTOCOL_ERROR, f"topic alias {alias} used before it was set")
        return known


@dataclass(frozen=True, slots=True)
class SubscriptionOptions:
    """What one SUBSCRIBE asked for one filter (MQTT 5 section 3.8.3.1)."""

    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    identifier: int = 0  # subscription identifier; 0: none

    @property
    def plain(self) -> bool:
        """Nothing beyond the QoS: the router's answer alone decides delivery."""
        return not (self.no_local or self.retain_as_published or self.identifier)


def plan_delivery(
    matching: list[SubscriptionOptions], own: bool, replay: bool, live_retained: bool, qos: int
) -> tuple[int, bool, list[int]] | None:
    """How one message goes to a client whose ``matching`` subscriptions cover its topic.

    ``own``: the client itself published it (no local excludes those subscriptions);
    ``replay``: a retained message sent because of a subscribe (the retain flag is set);
    ``live_retained``: a live message that was published with the retain flag (kept only
    for subscriptions with retain as published); ``qos``: the message's QoS.
    Returns (QoS, retain flag, subscription identifiers) or None when no subscription
    takes it. One copy goes out, at the highest QoS granted, with every identifier
    (section 3.3.4 allows this for overlapping subscriptions)."""
    granted = -1
    retain = replay
    identifiers: list[int] = []
    for options in matching:
        if own and options.no_local:
            continue
        if options.qos > granted:
            granted = options.qos
        if live_retained and options.retain_as_published:
            retain = True
        if options.identifier:
            identifiers.append(options.identifier)
    if granted < 0:
        return None
    return (qos if qos < granted else granted), retain, sorted(identifiers)
