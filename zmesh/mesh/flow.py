"""Flow control for QoS >= 1 publishes (docs/delivery.md): whether a publish may enter the
outbox now, waits, or is refused. Pure: sizes, the outbox's answers and ``now`` in;
decisions out.

Two layers, both counted:

* **Credit per destination** is the outbox's (``OutboxConfig.window``, ``window_bytes``):
  at most that much sent and unacknowledged to one node. A destination out of credit does
  not stop anyone: its messages wait in the outbox, unsent, and leave as acks come back.
* **Room in the outbox** is this gate's business. When a publish would evict a message
  that an attached destination still needs, the ``policy`` decides:

  - ``block`` (the default): the publish waits here, in arrival order, and its
    acknowledgement to the publisher (PUBACK, PUBREC, the Python API's future) waits with
    it. An MQTT client stops at its window (receive maximum) and so slows down as it
    would against a broker whose queues are full; nothing it was told is accepted is ever
    dropped. A destination that acknowledges nothing for ``block_max`` seconds is detached
    (``Outbox.attach(dest, False)``) rather than let it stall every publisher for ever:
    from then on the bounds evict its messages, and it is told the exact range when it
    asks (a gap event, never silence).
  - ``drop``: the publish enters at once and the oldest message goes, counted for every
    destination that still needed it and reported to each as a gap.

  Waiting is bounded too: at most ``max_held`` publishes and ``max_held_bytes`` bytes; past
  that a publish is refused (MQTT 5: PUBACK "quota exceeded", 0x97; MQTT 3.1.1 has no way
  to say no, so the connection is closed and the client publishes again; the Python API
  raises), counted, and never acknowledged as accepted.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")

BLOCK, DROP = "block", "drop"


class DeliveryRefused(Exception):
    """A QoS >= 1 publish refused past the gate's bounds: never acknowledged as accepted
    (MQTT 5: PUBACK/PUBREC 0x97 quota exceeded; MQTT 3.1.1: the connection is closed)."""

    reason_code = 0x97


class Decision(enum.Enum):
    ADMIT = "admit"  # append to the outbox and acknowledge now
    HOLD = "hold"  # wait in the gate; acknowledged when `release` hands it back
    REFUSE = "refuse"  # not accepted: tell the publisher so (never acknowledge it)


class OutboxRoom(Protocol):
    def room(self, size: int, now: float, count: int = 1) -> bool: ...

    def stuck(self, now: float, block_max: float) -> list[str]: ...

    def attach(self, dest: str, attached: bool, now: float | None = None) -> None: ...


@dataclass(frozen=True)
class FlowConfig:
    policy: str = BLOCK
    block_max: float = 10.0  # must stay below the outbox's max_age
    max_held: int = 65_536
    max_held_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.policy not in (BLOCK, DROP):
            raise ValueError(f"delivery policy {self.policy!r}: must be 'block' or 'drop'")


@dataclass
class FlowStats:
    admitted: int = 0
    held: int = 0  # publishes that had to wait
    refused: int = 0
    detached: int = 0  # destinations detached for acknowledging nothing for block_max


class Gate(Generic[T]):
    """The gate in front of one outbox. ``T`` is whatever the caller needs to finish a
    publish later (the message and how to acknowledge it)."""

    def __init__(self, config: FlowConfig, outbox: OutboxRoom) -> None:
        self.config = config
        self.outbox = outbox
        self.held: deque[tuple[T, int, float]] = deque()  # (publish, size, since)
        self.held_bytes = 0
        self.stats = FlowStats()

    def offer(self, publish: T, size: int, now: float) -> Decision:
        """A QoS >= 1 publish of ``size`` bytes arrives. ADMIT: append it now. HOLD: the gate
        keeps it (``release`` gives it back). REFUSE: the gate is full."""
        if self.config.policy == DROP:
            self.stats.admitted += 1
            return Decision.ADMIT
        if not self.held and self.outbox.room(size, now):
            self.stats.admitted += 1
            return Decision.ADMIT
        if len(self.held) >= self.config.max_held or self.held_bytes + size > self.config.max_held_bytes:
            self.stats.refused += 1
            return Decision.REFUSE
        self.held.append((publish, size, now))
        self.held_bytes += size
        self.stats.held += 1
        return Decision.HOLD

    def release(self, now: float) -> list[T]:
        """Publishes that may enter now, in arrival order: call after acks freed room and on
        every tick. A publish held for ``block_max`` detaches the destinations that stopped
        acknowledging, which makes the room."""
        out: list[T] = []
        held, outbox = self.held, self.outbox
        reserved = 0  # what this call already let through, not appended yet
        while held:
            publish, size, since = held[0]
            if not outbox.room(reserved + size, now, len(out) + 1):
                if now - since < self.config.block_max:
                    break
                stuck = outbox.stuck(now, self.config.block_max)
                for dest in stuck:
                    outbox.attach(dest, False)
                self.stats.detached += len(stuck)
                if not outbox.room(reserved + size, now, len(out) + 1):
                    # Every destination still in the way acknowledged something within
                    # block_max: slow, not stuck. Publishers go at its pace (that is what
                    # `block` promises); the next ack or tick tries again.
                    break
            held.popleft()
            self.held_bytes -= size
            reserved += size
            self.stats.admitted += 1
            out.append(publish)
        return out

    def waiting(self) -> int:
        return len(self.held)
