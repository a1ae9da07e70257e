"""The origin's outbox: every QoS >= 1 message this node published, numbered per
destination, kept until each destination has acknowledged it (docs/delivery.md). Pure:
messages, acks and ``now`` in; what to send, repair or report out.

One **log** holds the messages once, in publish order, whatever the number of destinations.
Each destination node has an **out-stream** over that log: its own epoch and consecutive
sequence numbers 1, 2, 3... for exactly the messages that match its interest, so that every
hole the destination sees is a loss (never a message it was not meant to get). A stream
remembers how far it was sent and how far it was acknowledged.

Bounds, both enforced on every append and every ``tick``:

* ``max_bytes``: the whole log's bytes, counted as topic + payload + ``ENTRY_OVERHEAD`` per
  record (its measured memory). Past it the oldest message goes
  first (``drop`` policy), or the caller is told there is no room (``room`` is False) and
  holds the publish back (``block`` policy, ``zmesh.mesh.flow``).
* ``max_age``: seconds a message is kept for a destination that has not acknowledged it.
* A message every destination acknowledged is still kept ``backfill_window`` seconds (and
  a message that had no destination when it was published, too): a subscription declared
  just after it, or a peer whose interest arrives late, gets it from here (``backfill``),
  which is how "SUBACK means subscribed mesh-wide" is kept without waiting at SUBACK.
  While the log holds more than ``backfill_max_bytes``, such a message at its head goes
  at once: backfill memory is bounded by bytes as well as by time.

An evicted message that some destination had not acknowledged is counted for that
destination (``evicted``), and its range is reported (``fetch`` answers GONE EVICTED) when
the destination asks: the gap is never silent.

With a ``data_dir`` the outbox is kept on disk by a store in the I/O layer: given a
``journal`` list, the outbox appends every change the store must write (``Journal*``
records, drained by the store once per flush), and ``restore`` rebuilds it from what the
store kept, with the same epochs and numbers, so that a restarted node's receivers neither
lose nor see anything twice. Without a journal nothing is recorded and nothing costs.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import accumulate, islice
from typing import NamedTuple

from zmesh.mesh.streamwire import (
    GONE_ACKED,
    GONE_EPOCH,
    GONE_EVICTED,
    Gone,
    Repair,
    StreamEntry,
    Tail,
)

# Bytes counted per message beyond topic and payload: the Python memory of its record, its
# StreamEntry and one destination's slot, as measured (docs/delivery.md, "Costs").
ENTRY_OVERHEAD = 480


class JournalStream(NamedTuple):
    """A stream was made: the store adds its row (next_seq 1, acked 0)."""

    dest: str
    epoch: int


class JournalEntry(NamedTuple):
    """A message joined the log: its row, and its number in each destination's stream (the
    store also raises each stream's next_seq past it). ``copy_of``: a backfilled copy's
    original (0: an original)."""

    lseq: int
    message: StreamEntry
    copy_of: int
    seqs: tuple[tuple[str, int], ...]


class JournalAck(NamedTuple):
    dest: str
    acked: int


class JournalGone(NamedTuple):
    """The message left the log (evicted or let go): the store deletes its row."""

    lseq: int


class JournalForget(NamedTuple):
    dest: str


class JournalHorizon(NamedTuple):
    """``released_until_ms`` moved (what ``uncovered`` answers from)."""

    released_until_ms: int


class JournalInterest(NamedTuple):
    """A destination's interest changed (recorded by ``Delivery``, not the outbox): its
    declaration as received (``streamwire.encode_interest``), so that a restarted origin
    knows what each destination already wanted and does not take a re-declaration for a
    late subscription (a false "subscribed late" gap)."""

    dest: str
    declaration: bytes


Journal = (JournalStream | JournalEntry | JournalAck | JournalGone | JournalForget | JournalHorizon
           | JournalInterest)


@dataclass(frozen=True)
class OutboxConfig:
    max_bytes: int = 64 * 1024 * 1024
    max_age: float = 60.0
    backfill_window: float = 2.0
    # Bytes of the log past which a message nobody needs any more goes at once instead of
    # after backfill_window: the backfill covers about 50 ms of late interest, so 2 s of a
    # saturated publisher (50 MiB of 64 KiB messages in the hostile-load test) is far more
    # than it needs; a message released early is still reported by `uncovered`.
    backfill_max_bytes: int = 8 * 1024 * 1024
    # Messages sent but not acknowledged, per destination (credit); and, under `block`, the
    # most a destination may hold unacknowledged before publishers wait (see `room`).
    window: int = 128
    window_bytes: int = 8 * 1024 * 1024
    frame_entries: int = 1024  # per stream frame or repair
    frame_bytes: int = 256 * 1024
    ack_timeout: float = 0.25  # unacknowledged this long: send a TAIL (then back off)
    max_ack_timeout: float = 4.0
    max_destinations: int = 16_384


class Entry:
    """One published message in the log."""

    __slots__ = ("lseq", "message", "at", "size", "pending", "blockers", "dests", "original", "topic_key")

    def __init__(self, lseq: int, message: StreamEntry, at: float, original: Entry | None = None) -> None:
        self.lseq = lseq
        self.message = message
        self.at = at
        # Counted again for a backfilled copy although the payload is shared: the bound
        # errs on the safe side.
        self.size = len(message.payload) + len(message.topic) + ENTRY_OVERHEAD
        self.pending = 0  # destinations that have not acknowledged it
        self.blockers = 0  # ... of which attached (they make `room` False under `block`)
        # On an original: every destination it was ever put in a stream for, so that a
        # backfill never gives a destination the same message twice. A backfilled copy
        # points at its original and keeps no list.
        self.dests: list[str] = []
        self.original = original
        self.topic_key: bytes | None = None  # topic + NUL, made when a backfill looks


class OutStream:
    """What one destination gets from us: sequence numbers over the log, sent and acked."""

    __slots__ = ("dest", "epoch", "next_seq", "sent", "acked", "first_available", "entries",
                 "inflight_bytes", "attached", "evicted", "last_progress", "tail_due", "tail_backoff")

    def __init__(self, dest: str, epoch: int, now: float) -> None:
        self.dest = dest
        self.epoch = epoch
        self.next_seq = 1
        self.sent = 0  # every seq <= sent went to the socket at least once
        self.acked = 0  # every seq <= acked is acknowledged
        self.first_available = 1  # seqs below it are acked or evicted
        # (seq, entry) not yet acknowledged, seq ascending and consecutive from first_available
        self.entries: deque[tuple[int, Entry]] = deque()
        self.inflight_bytes = 0
        self.attached = True
        self.evicted = 0  # this destination's unacknowledged messages the bounds dropped
        self.last_progress = now
        self.tail_due = 0.0
        self.tail_backoff = 0.0

    @property
    def inflight(self) -> int:
        return self.sent - max(self.acked, self.first_available - 1)

    @property
    def backlog(self) -> int:
        """Messages not yet sent (waiting for credit)."""
        return self.next_seq - 1 - self.sent


@dataclass
class OutboxStats:
    appended: int = 0
    evicted: int = 0  # messages dropped from the log while some destination still needed them
    released: int = 0  # messages dropped from the log once nobody needed them
    bad_acks: int = 0  # acks for an unknown epoch or beyond what was sent (counted, ignored)
    backfilled: int = 0
    evicted_by_dest: dict[str, int] = field(default_factory=dict)


class Outbox:
    """The origin's outbox. ``epochs`` gives a new stream epoch (an int in 1..2^63-1) each
    call: the node draws a random 62-bit number (+1), so that a restarted node's streams are
    new to every receiver; receivers never rely on epochs growing."""

    def __init__(self, config: OutboxConfig, epochs: Callable[[], int], journal: list[Journal] | None = None) -> None:
        self.config = config
        self.journal = journal
        self._epochs = epochs
        self.log: deque[Entry] = deque()
        self.bytes = 0
        self.lseq = 0
        self.streams: dict[str, OutStream] = {}
        self.stats = OutboxStats()
        self._keep_min = min(config.max_age, config.backfill_window)
        # The newest publish time (ms) of a message let go once no destination needed it:
        # an interest subscribed before it but heard of after it cannot be fully backfilled
        # (the message may have matched it too).
        self.released_until_ms = -1
        # Attached streams holding more than `window` unacknowledged messages, kept by every
        # change to a stream's entries (O(1) each): `room` is False while any exists.
        self.over_window = 0

    # ------------------------------------------------------------------ streams

    def stream(self, dest: str, now: float) -> OutStream:
        """The stream to ``dest``, made on first use (first match of its interest)."""
        stream = self.streams.get(dest)
        if stream is None:
            if len(self.streams) >= self.config.max_destinations:
                raise OverflowError("more destinations than outbox.max_destinations")
            stream = self.streams[dest] = OutStream(dest, int(self._epochs()), now)
            if self.journal is not None:
                self.journal.append(JournalStream(dest, stream.epoch))
        return stream

    def attach(self, dest: str, attached: bool, now: float | None = None) -> None:
        """A destination that is down, or stuck past ``block_max``, is detached: it no longer
        holds publishers back (its messages still wait here within the bounds). Attached
        again (it came back up, at ``now``), its ``block_max`` clock starts afresh."""
        stream = self.streams.get(dest)
        if stream is None or stream.attached == attached:
            return
        stream.attached = attached
        if attached and now is not None:
            stream.last_progress = now
        step = 1 if attached else -1
        if len(stream.entries) > self.config.window:
            self.over_window += step
        for _seq, entry in stream.entries:
            entry.blockers += step

    def forget(self, dest: str) -> int:
        """Drop a destination entirely (its key is no longer trusted); returns how many of
        its messages were still unacknowledged."""
        stream = self.streams.pop(dest, None)
        if stream is None:
            return 0
        if self.journal is not None:
            self.journal.append(JournalForget(dest))
        if stream.attached and len(stream.entries) > self.config.window:
            self.over_window -= 1
        for _seq, entry in stream.entries:
            entry.pending -= 1
            if stream.attached:
                entry.blockers -= 1
        return len(stream.entries)

    # ------------------------------------------------------------------ publishing

    def room(self, size: int, now: float, count: int = 1) -> bool:
        """Whether ``count`` messages of ``size`` payload+topic bytes in all fit without
        evicting one that an attached destination still needs, and no attached destination
        holds more than ``window`` unacknowledged (the ``block`` policy holds a publish back
        if not). The second condition is what keeps latency low under saturation: without
        it a publisher faster than a subscriber filled the whole byte bound first (64 MiB,
        ~120,000 small messages, over a second of queue) before it was slowed."""
        if self.over_window:
            return False
        needed = self.bytes + size + count * ENTRY_OVERHEAD - self.config.max_bytes
        if needed <= 0:
            return True
        for entry in self.log:
            if entry.blockers:
                return False
            needed -= entry.size
            if needed <= 0:
                return True
        return False

    def append(self, message: StreamEntry, dests: Iterable[str], now: float) -> Entry:
        """Log one message for ``dests`` (the nodes whose interest matches its topic); each
        gets the next sequence number of its stream. Evicts past the bounds."""
        self.lseq += 1
        entry = Entry(self.lseq, message, now)
        streams = self.streams
        blockers = 0
        over = self.config.window + 1
        for dest in dests:  # the hot path: _put inlined
            stream = streams.get(dest) or self.stream(dest, now)
            entries = stream.entries
            entries.append((stream.next_seq, entry))
            stream.next_seq += 1
            if stream.attached:
                blockers += 1
                if len(entries) == over:
                    self.over_window += 1
            entry.dests.append(dest)
        entry.pending = len(entry.dests)
        entry.blockers = blockers
        if self.journal is not None:
            self.journal.append(JournalEntry(entry.lseq, message, 0, tuple(
                (dest, streams[dest].next_seq - 1) for dest in entry.dests)))
        log = self.log
        log.append(entry)
        self.bytes += entry.size
        self.stats.appended += 1
        # _trim only when the head may go: over the byte bound, or older than the shorter
        # of the two time bounds (a test per publish instead of a call).
        if (self.bytes > self.config.max_bytes or log[0].at < now - self._keep_min
                or self.bytes > self.config.backfill_max_bytes):
            self._trim(now)
        return entry

    def _put(self, stream: OutStream, entry: Entry) -> None:
        stream.entries.append((stream.next_seq, entry))
        stream.next_seq += 1
        entry.pending += 1
        if stream.attached:
            entry.blockers += 1
            if len(stream.entries) == self.config.window + 1:
                self.over_window += 1

    def backfill(self, dest: str, added: dict[bytes, int], now: float, now_ms: int) -> int:
        """``dest`` declared new interest: ``added`` maps each new ZeroMQ prefix to the wall
        time (ms, the subscriber's clock) it was subscribed at. Messages in the log published
        since then, or since ``backfill_window`` before ``now_ms`` on our clock, whichever is
        earlier (a skewed clock or a slow declaration costs a few early messages, never a
        lost one), that match a new prefix and that ``dest`` was never given, join its stream
        now, before any live message that follows. Returns how many.

        They join the log again as copies (sharing the payload): every stream stays a
        subsequence of the log in log order, which is what eviction relies on."""
        if not added:
            return 0
        stream = self.stream(dest, now)
        since = min(min(added.values()), now_ms - int(self.config.backfill_window * 1000))
        new = tuple(added)
        copies = []
        for entry in self.log:
            if entry.original is not None or entry.message.timestamp < since or dest in entry.dests:
                continue
            key = entry.topic_key
            if key is None:
                key = entry.topic_key = entry.message.topic.encode() + b"\x00"
            if key.startswith(new):
                entry.dests.append(dest)
                copies.append(entry)
        for original in copies:
            self.lseq += 1
            copy = Entry(self.lseq, original.message, now, original)
            self._put(stream, copy)
            if self.journal is not None:
                self.journal.append(JournalEntry(copy.lseq, copy.message, original.lseq,
                                                 ((dest, stream.next_seq - 1),)))
            self.log.append(copy)
            self.bytes += copy.size
        self.stats.backfilled += len(copies)
        if copies:
            self._trim(now)
        return len(copies)

    def uncovered(self, since_ms: int) -> tuple[int, int] | None:
        """For an interest subscribed at ``since_ms`` that arrives only now: the window of
        publish times (ms) in which messages may have matched it but were let go before it
        arrived (nobody wanted them then), or None when the backfill covered everything.
        The wiring tells the subscriber (a gap it cannot otherwise see; the count is unknown,
        the messages' topics having gone with them)."""
        if since_ms <= self.released_until_ms:
            return since_ms, self.released_until_ms
        return None

    # ------------------------------------------------------------------ sending

    def sendable(self, dest: str) -> tuple[int, int, list[StreamEntry]]:
        """(epoch, first seq, messages) that ``dest`` may be sent now: not sent yet, within
        its credit (window) and one frame's bounds. Call ``mark_sent`` once it is sent. The
        epoch is the stream's even when there is nothing to send (0: no stream)."""
        stream = self.streams.get(dest)
        if stream is None:
            return 0, 0, []
        config = self.config
        count = min(config.window - stream.inflight, config.frame_entries, stream.backlog)
        first = stream.sent + 1
        if count <= 0:
            return stream.epoch, first, []  # nothing waiting, or no credit left
        skip = first - stream.first_available
        chunk = list(islice(stream.entries, skip, skip + count))
        budget = min(config.window_bytes - stream.inflight_bytes, config.frame_bytes)
        sizes = list(accumulate([entry.size for _seq, entry in chunk]))
        cut = bisect_right(sizes, budget)
        if cut == 0 and not stream.inflight:
            cut = 1  # one message larger than the budget goes alone, when nothing is in flight
        return stream.epoch, first, [entry.message for _seq, entry in chunk[:cut]]

    def mark_sent(self, dest: str, epoch: int, upto: int, now: float) -> None:
        stream = self.streams.get(dest)
        if stream is None or epoch != stream.epoch or upto <= stream.sent:
            return
        upto = min(upto, stream.next_seq - 1)
        skip = max(stream.sent + 1 - stream.first_available, 0)
        stream.inflight_bytes += sum([entry.size for _seq, entry in
                                      islice(stream.entries, skip, skip + upto - stream.sent)])
        if stream.sent <= stream.acked:
            stream.tail_due = now + self.config.ack_timeout
            stream.tail_backoff = self.config.ack_timeout
        stream.sent = upto

    def ack(self, dest: str, epoch: int, upto: int, now: float) -> int:
        """The destination has delivered everything up to ``upto``; returns how many messages
        this newly acknowledged. A stale epoch or a claim beyond what was sent is ignored and
        counted (a lying peer cannot make us forget what it never got)."""
        stream = self.streams.get(dest)
        if stream is None or epoch != stream.epoch or upto > stream.sent:
            self.stats.bad_acks += 1
            return 0
        if upto <= stream.acked:
            return 0
        done = 0
        entries = stream.entries
        was_over = stream.attached and len(entries) > self.config.window
        while entries and entries[0][0] <= upto:
            _seq, entry = entries.popleft()
            stream.inflight_bytes -= entry.size
            entry.pending -= 1
            if stream.attached:
                entry.blockers -= 1
            done += 1
        if was_over and len(entries) <= self.config.window:
            self.over_window -= 1
        stream.acked = upto
        stream.first_available = max(stream.first_available, upto + 1)
        if self.journal is not None:
            self.journal.append(JournalAck(dest, upto))
        stream.last_progress = now
        stream.tail_backoff = self.config.ack_timeout
        stream.tail_due = now + self.config.ack_timeout
        return done

    def fetch(self, dest: str, epoch: int, first: int, last: int) -> Repair | Gone | None:
        """Answer a recovery request: the messages ``first..last`` (bounded by one frame), or
        why they cannot be had. None: nothing to say (a range not sent yet, or a stream we
        never had: the destination asks about a destination that is not itself)."""
        stream = self.streams.get(dest)
        if stream is None or epoch != stream.epoch:
            current = stream.epoch if stream is not None else 0
            return Gone(epoch, first, 0, GONE_EPOCH, current)
        if first <= stream.acked:
            return Gone(epoch, first, stream.acked + 1, GONE_ACKED, stream.epoch)
        if first < stream.first_available:
            return Gone(epoch, first, stream.first_available, GONE_EVICTED, stream.epoch)
        last = min(last, stream.sent)
        if last < first:
            return None
        out: list[StreamEntry] = []
        size = 0
        for seq, entry in islice(stream.entries, first - stream.first_available, None):
            if seq > last or len(out) >= self.config.frame_entries:
                break
            if out and size + entry.size > self.config.frame_bytes:
                break
            out.append(entry.message)
            size += entry.size
        return Repair(epoch, first, out) if out else None

    # ------------------------------------------------------------------ disk

    def restore(
        self,
        streams: Iterable[tuple[str, int, int, int]],
        entries: Iterable[tuple[int, StreamEntry, int, Iterable[tuple[str, int]]]],
        now: float,
        now_ms: int,
        released_until_ms: int = -1,
    ) -> None:
        """Rebuild an empty outbox from what a store kept: ``streams`` as (dest, epoch,
        next_seq, acked), ``entries`` as (lseq, message, copy_of, [(dest, seq), ...]) in
        any order. Numbers at or below a stream's ``acked`` are ignored. Nothing counts as
        sent: every unacknowledged message goes again (receivers drop what they have), and
        a message's age is taken from its publish time on the wall clock."""
        assert not self.log and not self.streams, "restore into an empty outbox"
        for dest, epoch, next_seq, acked in streams:
            stream = self.streams[dest] = OutStream(dest, epoch, now)
            stream.next_seq, stream.acked = next_seq, acked  # first_available and sent: below
        rows = sorted(entries, key=lambda row: row[0])
        by_lseq: dict[int, Entry] = {}
        for lseq, message, copy_of, seqs in rows:
            at = now - max(0, now_ms - message.timestamp) / 1000
            entry = Entry(lseq, message, at, by_lseq.get(copy_of) if copy_of else None)
            by_lseq[lseq] = entry
            for dest, seq in seqs:
                stream = self.streams.get(dest)
                if stream is None or seq <= stream.acked or seq >= stream.next_seq:
                    continue
                stream.entries.append((seq, entry))
                entry.pending += 1
                entry.blockers += 1
                (entry.original or entry).dests.append(dest)
            self.log.append(entry)
            self.bytes += entry.size
            self.lseq = max(self.lseq, lseq)
        for stream in self.streams.values():
            stream.entries = deque(sorted(stream.entries, key=lambda pair: pair[0]))
            if stream.entries:
                # What is missing below the first held number was evicted before the stop.
                stream.first_available = stream.entries[0][0]
                stream.sent = stream.first_available - 1
                held = [seq for seq, _ in stream.entries]
                if held != list(range(held[0], held[0] + len(held))):
                    raise ValueError(f"stored stream to {stream.dest[:8]} has holes in the middle")
            else:
                stream.first_available = stream.next_seq
                stream.sent = stream.next_seq - 1
        self.released_until_ms = released_until_ms
        self.over_window = sum(1 for stream in self.streams.values() if len(stream.entries) > self.config.window)
        self._trim(now)

    # ------------------------------------------------------------------ time

    def tick(self, now: float) -> list[tuple[str, Tail]]:
        """Age out the log, and say which destinations should hear a TAIL: they have had
        unacknowledged messages for ``ack_timeout`` (doubling up to ``max_ack_timeout`` while
        nothing moves), which reveals a lost last frame. An idle outbox says nothing."""
        self._trim(now)
        tails = []
        for stream in self.streams.values():
            if stream.sent > stream.acked and stream.attached and now >= stream.tail_due:
                tails.append((stream.dest, Tail(stream.epoch, stream.sent, False)))
                stream.tail_backoff = min(stream.tail_backoff * 2, self.config.max_ack_timeout)
                stream.tail_due = now + stream.tail_backoff
        return tails

    def final_tails(self) -> list[tuple[str, Tail]]:
        """On a clean stop: every stream's end, so that each destination can name exactly
        what it will not get (the new epoch after a restart would otherwise leave it
        guessing how many of the last messages were lost)."""
        return [(s.dest, Tail(s.epoch, s.next_seq - 1, True)) for s in self.streams.values() if s.next_seq > 1]

    def unacknowledged(self) -> dict[str, int]:
        """Destinations still owed an acknowledgement (attached ones): what stop waits for."""
        return {s.dest: s.next_seq - 1 - s.acked for s in self.streams.values()
                if s.attached and s.next_seq - 1 > s.acked}

    def stuck(self, now: float, block_max: float) -> list[str]:
        """Attached destinations that hold messages back and acknowledged nothing for
        ``block_max`` seconds: the flow gate detaches them rather than block forever."""
        return [s.dest for s in self.streams.values()
                if s.attached and s.entries and now - s.last_progress >= block_max]

    def _trim(self, now: float) -> None:
        config = self.config
        log = self.log
        oldest_kept = now - config.max_age
        quiet = now - config.backfill_window
        while log:
            entry = log[0]
            if self.bytes > config.max_bytes or entry.at < oldest_kept:
                pass  # over a bound: goes whatever it is
            elif entry.pending == 0 and (entry.at < quiet or self.bytes > config.backfill_max_bytes):
                pass  # nobody needs it and no backfill will (or backfill is over its bytes)
            else:
                break
            log.popleft()
            self.bytes -= entry.size
            if self.journal is not None:
                self.journal.append(JournalGone(entry.lseq))
            if entry.pending:
                self._evict(entry)
            else:
                self.stats.released += 1
                if entry.message.timestamp > self.released_until_ms:
                    self.released_until_ms = entry.message.timestamp
                    if self.journal is not None:
                        self.journal.append(JournalHorizon(entry.message.timestamp))

    def _evict(self, entry: Entry) -> None:
        self.stats.evicted += 1
        by_dest = self.stats.evicted_by_dest
        # The log is in publish order and every stream is a subsequence of it, so the
        # oldest log entry is the head of each stream that still holds it.
        for stream in self.streams.values():
            entries = stream.entries
            if entries and entries[0][1] is entry:
                seq, _ = entries.popleft()
                if seq <= stream.sent:
                    stream.inflight_bytes -= entry.size
                stream.first_available = seq + 1
                stream.sent = max(stream.sent, seq)  # never send what is gone
                stream.evicted += 1
                if len(by_dest) < self.config.max_destinations or stream.dest in by_dest:
                    by_dest[stream.dest] = by_dest.get(stream.dest, 0) + 1
                entry.pending -= 1
                if stream.attached:
                    entry.blockers -= 1
                    if len(entries) == self.config.window:
                        self.over_window -= 1
                if not entry.pending:
                    break
