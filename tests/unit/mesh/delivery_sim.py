"""An origin's Outbox and a receiver's StreamState joined by channels that lose, repeat and
reorder what they carry: the wiring of docs/delivery.md without sockets, time injected.
Every message crosses the real codecs, so the simulation also exercises the wire."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from zmesh.mesh import streamwire as sw
from zmesh.mesh.outbox import Outbox, OutboxConfig
from zmesh.mesh.streams import Gap, StreamConfig, StreamState

ORIGIN = "O" * 40
DEST = "D" * 40


@dataclass
class Sim:
    outbox_config: OutboxConfig = field(default_factory=OutboxConfig)
    stream_config: StreamConfig = field(default_factory=StreamConfig)
    now: float = 0.0

    def __post_init__(self) -> None:
        epochs = itertools.count(1000)
        self.outbox = Outbox(self.outbox_config, lambda: next(epochs))
        self.rx = StreamState(ORIGIN, self.stream_config)
        self.to_rx: list[bytes] = []  # data frames and answers on their way to the receiver
        self.to_tx: list[bytes] = []  # acks and requests on their way to the origin
        self.published: list[bytes] = []
        self.delivered: list[bytes] = []
        self.gaps: list[Gap] = []
        self.counter = 0

    # the origin
    def publish(self, dests: tuple[str, ...] = (DEST,)) -> bytes:
        payload = b"%06d" % self.counter  # fixed width: sizes are exact
        self.counter += 1
        self.outbox.append(sw.StreamEntry("t/x", payload, 1, int(self.now * 1000), None), dests, self.now)
        if DEST in dests:
            self.published.append(payload)
        self.pump()
        return payload

    def pump(self) -> None:
        while True:
            epoch, first, entries = self.outbox.sendable(DEST)
            if not entries:
                return
            self.to_rx.append(sw.encode_frame(DEST, epoch, first, entries))
            self.outbox.mark_sent(DEST, epoch, first + len(entries) - 1, self.now)

    def at_origin(self, data: bytes) -> None:
        message = sw.decode_control(data)
        if isinstance(message, sw.Ack):
            self.outbox.ack(DEST, message.epoch, message.upto, self.now)
            self.pump()
        elif isinstance(message, sw.Nack):
            answer = self.outbox.fetch(DEST, message.epoch, message.first, message.last)
            if answer is not None:
                self.to_rx.append(sw.encode_control(answer))
        else:
            raise AssertionError(f"the origin got {message!r}")

    # the receiver
    def at_receiver(self, data: bytes) -> None:
        rx = self.rx
        if data[:1] == sw.STREAM_TAG:
            out = rx.on_frame(sw.decode_frame(data, DEST), self.now)
        else:
            message = sw.decode_control(data)
            if isinstance(message, sw.Repair):
                out = rx.on_frame(message, self.now)
            elif isinstance(message, sw.Gone):
                out = rx.on_gone(message, self.now)
            elif isinstance(message, sw.Tail):
                out = rx.on_tail(message, self.now)
            else:
                raise AssertionError(f"the receiver got {message!r}")
        self.delivered.extend(e.payload for e in out)
        self.gaps.extend(rx.take_gaps())
        self.poll()

    def poll(self) -> None:
        controls, released = self.rx.poll(self.now)
        self.delivered.extend(e.payload for e in released)
        self.gaps.extend(self.rx.take_gaps())
        self.to_tx.extend(sw.encode_control(c) for c in controls)

    def tick(self, dt: float) -> None:
        self.now += dt
        self.to_rx.extend(sw.encode_control(tail) for _dest, tail in self.outbox.tick(self.now))
        self.poll()
        self.pump()

    def settle(self, dt: float = 0.25, rounds: int = 2000) -> None:
        """No more loss: carry everything in order until nothing moves."""
        for _ in range(rounds):
            while self.to_rx or self.to_tx:
                if self.to_rx:
                    self.at_receiver(self.to_rx.pop(0))
                if self.to_tx:
                    self.at_origin(self.to_tx.pop(0))
            if not self.outbox.unacknowledged() and self.rx.next_wakeup(self.now) is None:
                return
            self.tick(dt)
        raise AssertionError("the simulation did not settle")


class Store:
    """What a disk store keeps of an outbox, applied from its journal (the tables of
    docs/delivery.md §9, as dicts)."""

    def __init__(self) -> None:
        self.streams: dict[str, list[int]] = {}  # dest -> [epoch, next_seq, acked]
        self.entries: dict[int, tuple[sw.StreamEntry, int, dict[str, int]]] = {}
        self.horizon = -1

    def apply(self, journal: list) -> None:
        from zmesh.mesh import outbox as ob

        for record in journal:
            if isinstance(record, ob.JournalStream):
                self.streams[record.dest] = [record.epoch, 1, 0]
            elif isinstance(record, ob.JournalEntry):
                self.entries[record.lseq] = (record.message, record.copy_of, dict(record.seqs))
                for dest, seq in record.seqs:
                    self.streams[dest][1] = max(self.streams[dest][1], seq + 1)
            elif isinstance(record, ob.JournalAck):
                self.streams[record.dest][2] = record.acked
            elif isinstance(record, ob.JournalGone):
                del self.entries[record.lseq]
            elif isinstance(record, ob.JournalForget):
                del self.streams[record.dest]
            elif isinstance(record, ob.JournalHorizon):
                self.horizon = record.released_until_ms
        journal.clear()

    def restore_into(self, outbox: Outbox, now: float, now_ms: int) -> None:
        outbox.restore(
            [(dest, *row) for dest, row in self.streams.items()],  # type: ignore[misc]
            [(lseq, message, copy_of, seqs.items()) for lseq, (message, copy_of, seqs) in self.entries.items()],
            now, now_ms, self.horizon,
        )
