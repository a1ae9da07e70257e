"""Per-client protocol state that outlives single packets. Pure: no I/O.

``OutboundWindow`` holds QoS >= 1 messages on their way to a client: at most
``max_inflight`` unacknowledged (MQTT 5's Receive Maximum, Mosquitto's
max_inflight_messages), further ones queued up to ``max_queued``, and beyond that dropped
and counted (Mosquitto's max_queued_messages), so a slow client costs bounded memory.

``InboundQoS2`` remembers the packet ids of QoS 2 messages received but not yet released,
so a retransmitted PUBLISH (DUP) is acknowledged again but not delivered twice.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: dict[str, Any] | None
    packet_id: int = 0


class OutboundWindow:
    def __init__(self, max_inflight: int, max_queued: int) -> None:
        self.max_inflight = max(1, max_inflight)
        self.max_queued = max_queued
        self.inflight: dict[int, Outgoing] = {}
        self.queue: deque[Outgoing] = deque()
        self.dropped = 0
        self._next_id = 0

    def _allocate(self) -> int:
        # Packet ids are 1..65535 and must not collide with one still in flight.
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self.inflight:
                return self._next_id
        raise RuntimeError("no free packet id")  # impossible while max_inflight < 65535

    def offer(self, message: Outgoing) -> Outgoing | None:
        """Accept a message; returns it (with its packet id) if it may be sent now."""
        if len(self.inflight) < self.max_inflight and not self.queue:
            message.packet_id = self._allocate()
            self.inflight[message.packet_id] = message
            return message
        if len(self.queue) >= self.max_queued:
            self.dropped += 1
            return None
        self.queue.append(message)
        return None

    def acknowledge(self, packet_id: int) -> list[Outgoing]:
        """A PUBACK (or PUBCOMP) arrived; returns queued messages that may be sent now.

        An unknown id is ignored: the client may ack twice after a retransmission."""
        if self.inflight.pop(packet_id, None) is None:
            return []
        released = []
        while self.queue and len(self.inflight) < self.max_inflight:
            message = self.queue.popleft()
            message.packet_id = self._allocate()
            self.inflight[message.packet_id] = message
            released.append(message)
        return released

    def unacknowledged(self) -> list[Outgoing]:
        """In-flight messages, oldest first (to resend with DUP after a reconnect)."""
        return list(self.inflight.values())


class InboundQoS2:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending: set[int] = set()

    def received(self, packet_id: int) -> bool:
        """True if this PUBLISH is new and must be delivered; False for a duplicate."""
        if packet_id in self.pending:
            return False
        self.pending.add(packet_id)
        return True

    def full(self) -> bool:
        return len(self.pending) >= self.limit

    def released(self, packet_id: int) -> bool:
        """PUBREL: forget the id; False if it was unknown."""
        if packet_id in self.pending:
            self.pending.discard(packet_id)
            return True
        return False
