"""The receiver's side of reliable delivery (docs/delivery.md): one ``StreamState`` per
origin node puts that origin's numbered messages back in order, drops duplicates, asks for
what is missing, acknowledges what it released, and reports, exactly once, every range it
will never get. Pure: frames, answers and ``now`` in; messages, requests and gaps out.

Per origin the state is a handful of integers and a bounded buffer:

* ``delivered``: every sequence number up to it was released, in order, exactly once. It
  is also the whole duplicate-suppression state: a message at or below it is a duplicate,
  so exactly-once costs one integer per origin, not a window of message ids.
* ``highest``: the highest sequence number known to exist (seen in a frame, or told by a
  TAIL). ``highest > delivered`` with ``delivered + 1`` missing is a hole.
* the buffer: messages past a hole, at most ``max_buffered`` messages and
  ``max_buffered_bytes`` bytes and ``max_range`` numbers ahead. Past that, a message is
  dropped and counted (``overflow``): the origin still has it, and it is asked for again
  once the hole before it is filled. Adversarial input cannot grow memory.

A hole is asked for (NACK) after ``nack_delay``, asked again with doubling backoff from
``retry`` to ``max_retry``, and after ``give_up`` seconds without an answer reported lost
(reason ``timeout``) and skipped, so that one lost message never stalls a stream forever.
The origin's answers: REPAIR (the messages), GONE ACKED (an earlier life of this node
acknowledged them: skipped, no loss), GONE EVICTED (reported lost, reason ``evicted``),
GONE EPOCH (the origin no longer has this epoch: reported lost, reason
``origin_restarted``). A frame of an epoch never seen before replaces the current one;
what the old epoch still owed is reported the same way, with its exact end when a final
TAIL told it, open-ended (``last`` None) when the origin died without saying.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from zmesh.mesh.streamwire import (
    GONE_EPOCH,
    GONE_EVICTED,
    Ack,
    Gone,
    Nack,
    Repair,
    StreamEntry,
    StreamFrame,
    Tail,
    Uncovered,
)

ENTRY_OVERHEAD = 200  # a buffered message's dict slot and StreamEntry, beyond topic and payload

EVICTED, ORIGIN_RESTARTED, TIMEOUT, SUBSCRIBED_LATE = "evicted", "origin_restarted", "timeout", "subscribed_late"


@dataclass(frozen=True)
class StreamConfig:
    max_buffered: int = 4096
    max_buffered_bytes: int = 8 * 1024 * 1024
    max_range: int = 65_536  # numbers ahead of `delivered` that may be buffered or asked for
    nack_delay: float = 0.005
    retry: float = 0.2
    max_retry: float = 2.0
    give_up: float = 90.0  # longer than the origin's outbox max_age: it answers GONE first
    # An ack per this many delivered, or after ack_delay: a quarter of the origin's default
    # window (128), so that credit comes back before it runs out at full speed.
    ack_every: int = 32
    ack_delay: float = 0.02
    retired_epochs: int = 4
    max_gaps: int = 1024  # gap events held until taken; past it only counted


@dataclass(frozen=True)
class Gap:
    """Messages of ``origin`` that will never be delivered: ``first..last`` of ``epoch``,
    ``last`` None when the origin died without saying where its stream ended. A gap by time
    (reason ``subscribed_late``: a new subscription heard of too late) has no numbers
    (``first`` 0, ``last`` None) but the window of publish times, ``since_ms..until_ms``."""

    origin: str
    epoch: int
    first: int
    last: int | None
    reason: str
    since_ms: int | None = None
    until_ms: int | None = None

    @property
    def count(self) -> int | None:
        return None if self.last is None else self.last - self.first + 1


@dataclass
class StreamStats:
    released: int = 0
    duplicates: int = 0
    stale: int = 0  # frames or answers of a retired epoch
    overflow: int = 0  # messages past the buffer's bounds, dropped to be asked for again
    nacks: int = 0
    lost: int = 0  # messages reported in gaps with a known end
    gaps: int = 0
    gaps_unreported: int = 0  # gap events past max_gaps before the caller took them


class StreamState:
    """What this node has of one origin's stream to it. Every input method returns the
    messages that may be delivered now, in order; ``poll`` also returns what to send."""

    def __init__(self, origin: str, config: StreamConfig | None = None) -> None:
        self.origin = origin
        self.config = config or StreamConfig()
        self.epoch = 0  # 0: none yet
        self.delivered = 0
        self.highest = 0
        self.final = False  # `highest` is the epoch's end (a final TAIL said so)
        self.buffer: dict[int, StreamEntry] = {}
        self.buffered_bytes = 0
        self.retired: deque[int] = deque(maxlen=self.config.retired_epochs)
        self.acked = 0  # the highest acknowledgement sent
        self.ack_forced = False
        self.ack_due: float | None = None
        self.hole_since: float | None = None
        self.request: tuple[int, int] | None = None
        self.request_at = 0.0
        self.next_retry = 0.0
        self.backoff = 0.0
        self.gaps: list[Gap] = []
        self.stats = StreamStats()

    # ------------------------------------------------------------------ persistence

    def position(self) -> tuple[int, int]:
        """(epoch, delivered): what a node with a data_dir writes in the same transaction as
        the session queues it delivered into, so that a restart neither loses nor repeats."""
        return self.epoch, self.delivered

    def restore(self, epoch: int, delivered: int) -> None:
        self._reset(epoch)
        self.delivered = self.highest = self.acked = delivered

    # ------------------------------------------------------------------ input

    def on_frame(self, frame: StreamFrame | Repair, now: float) -> list[StreamEntry]:
        """A stream frame or a repair: the messages that may be delivered now, in order."""
        ok, out = self._epoch(frame.epoch, now)
        if not ok:
            return out
        before = self.delivered
        delivered = before
        buffer = self.buffer
        seq = frame.first
        for entry in frame.entries:
            if seq <= delivered or seq in buffer:
                self.stats.duplicates += 1
            elif seq == delivered + 1:
                out.append(entry)
                delivered = seq
            else:
                self._hold(seq, entry)
            seq += 1
        if seq - 1 > self.highest:
            self.highest = seq - 1
        self.delivered = delivered
        out = self._release(out, now)
        if self.request is not None and self.delivered > before:
            self.request = None  # progress: ask for the rest of the hole now, not at the retry
        return out

    def on_tail(self, tail: Tail, now: float) -> list[StreamEntry]:
        """The origin says how far it has sent (and, when final, where its epoch ends)."""
        ok, out = self._epoch(tail.epoch, now)
        if not ok:
            return out
        if tail.final:
            self.final = True
            self.highest = max(tail.last, self.delivered)
        elif tail.last > self.highest:
            self.highest = tail.last
        self.ack_forced = True  # the origin waits for an acknowledgement: send one
        return self._release(out, now)

    def on_gone(self, gone: Gone, now: float) -> list[StreamEntry]:
        """The origin's answer that a range cannot be sent. Only an answer about the hole at
        ``delivered + 1`` is acted on; an older one (a retry's twin) is ignored."""
        if gone.epoch != self.epoch or self.epoch == 0:
            self.stats.stale += 1
            return []
        if gone.reason == GONE_EPOCH:
            out = self._finish_epoch()
            self.retired.append(self.epoch)
            self._reset(0)
            return out
        start = self.delivered + 1
        if not gone.first <= start < gone.resume_at:
            self.stats.stale += 1
            return []
        end = min(gone.resume_at - 1, max(self.highest, start))
        out = self._skip_to(end, EVICTED if gone.reason == GONE_EVICTED else None)
        return self._release(out, now)

    def on_uncovered(self, message: Uncovered) -> None:
        """The origin heard of our new interest after it had let go of messages that may
        have matched it: a gap by time, reported like the others (the count is unknown)."""
        self.stats.gaps += 1
        if len(self.gaps) >= self.config.max_gaps:
            self.stats.gaps_unreported += 1
            return
        self.gaps.append(Gap(self.origin, self.epoch, 0, None, SUBSCRIBED_LATE, message.since_ms, message.until_ms))

    # ------------------------------------------------------------------ output

    def poll(self, now: float) -> tuple[list[Ack | Nack], list[StreamEntry]]:
        """What to send the origin now (a recovery request for the hole, an acknowledgement),
        and the messages a given-up hole released."""
        controls: list[Ack | Nack] = []
        released: list[StreamEntry] = []
        config = self.config
        if self.request is not None and self.delivered >= self.request[1]:
            self.request = None
        if self.hole_since is not None and self.epoch:
            end = self._hole_end()
            if self.request is None:
                if now >= self.hole_since + config.nack_delay:
                    controls.append(self._nack(end, now, config.retry))
                    self.request_at = now
            elif now >= self.request_at + config.give_up:
                released = self._release(self._skip_to(end, TIMEOUT), now)
            elif now >= self.next_retry:
                controls.append(self._nack(end, now, min(self.backoff * 2, config.max_retry)))
        if self.epoch and (self.delivered > self.acked or self.ack_forced):
            due = self.ack_due
            if self.ack_forced or self.delivered - self.acked >= config.ack_every or due is None or now >= due:
                controls.append(Ack(self.epoch, self.delivered))
                self.acked = self.delivered
                self.ack_forced = False
                self.ack_due = None
        return controls, released

    def take_gaps(self) -> list[Gap]:
        gaps, self.gaps = self.gaps, []
        return gaps

    def next_wakeup(self, now: float) -> float | None:
        """When ``poll`` has something to do next; None if nothing is pending."""
        times = []
        if self.hole_since is not None and self.epoch:
            if self.request is None:
                times.append(self.hole_since + self.config.nack_delay)
            else:
                times.extend((self.next_retry, self.request_at + self.config.give_up))
        if self.ack_forced or (self.delivered > self.acked and self.ack_due is None):
            times.append(now)
        elif self.delivered > self.acked and self.ack_due is not None:
            times.append(self.ack_due)
        return min(times) if times else None

    # ------------------------------------------------------------------ internals

    def _nack(self, end: int, now: float, backoff: float) -> Nack:
        first = self.delivered + 1
        last = min(end, first + self.config.max_range - 1)
        self.request = (first, last)
        self.backoff = backoff
        self.next_retry = now + backoff
        self.stats.nacks += 1
        return Nack(self.epoch, first, last)

    def _hole_end(self) -> int:
        """The last missing number of the hole at ``delivered + 1``."""
        return min(self.buffer) - 1 if self.buffer else self.highest

    def _hold(self, seq: int, entry: StreamEntry) -> None:
        config = self.config
        size = len(entry.payload) + len(entry.topic) + ENTRY_OVERHEAD
        if (
            len(self.buffer) >= config.max_buffered
            or self.buffered_bytes + size > config.max_buffered_bytes
            or seq - self.delivered > config.max_range
        ):
            self.stats.overflow += 1  # the origin keeps it; asked for once the hole is filled
            return
        self.buffer[seq] = entry
        self.buffered_bytes += size

    def _pop(self, seq: int) -> StreamEntry:
        entry = self.buffer.pop(seq)
        self.buffered_bytes -= len(entry.payload) + len(entry.topic) + ENTRY_OVERHEAD
        return entry

    def _release(self, out: list[StreamEntry], now: float) -> list[StreamEntry]:
        buffer = self.buffer
        if buffer:
            delivered = self.delivered
            while delivered + 1 in buffer:
                delivered += 1
                out.append(self._pop(delivered))
            self.delivered = delivered
        if out:
            self.stats.released += len(out)
            if self.ack_due is None:
                self.ack_due = now + self.config.ack_delay
        if self.highest > self.delivered:
            if self.hole_since is None:
                self.hole_since = now
        else:
            self.hole_since = None
            self.request = None
        return out

    def _skip_to(self, end: int, reason: str | None) -> list[StreamEntry]:
        """Everything up to ``end`` will not come. Messages of that range we hold anyway
        (they came out of order before the origin dropped its copy) are released in order;
        each run of missing ones is one gap with ``reason`` (None: acknowledged by an
        earlier life of this node, so what we hold there is a duplicate and nothing is
        lost)."""
        out: list[StreamEntry] = []
        for seq in sorted(s for s in self.buffer if s <= end):
            entry = self._pop(seq)
            if reason is None:
                self.stats.duplicates += 1
                continue
            if seq > self.delivered + 1:
                self._gap(self.delivered + 1, seq - 1, reason)
            out.append(entry)
            self.delivered = seq
        if end > self.delivered:
            if reason is not None:
                self._gap(self.delivered + 1, end, reason)
            self.delivered = end
        if end > self.highest:
            self.highest = end
        self.request = None
        self.hole_since = None
        self.ack_due = None  # acknowledge the skip at the next poll: the origin can let go
        return out

    def _gap(self, first: int, last: int | None, reason: str) -> None:
        if last is not None and last < first:
            return
        stats = self.stats
        stats.gaps += 1
        if last is not None:
            stats.lost += last - first + 1
        if len(self.gaps) >= self.config.max_gaps:
            stats.gaps_unreported += 1  # still counted in `lost`; the caller drains gaps often
            return
        self.gaps.append(Gap(self.origin, self.epoch, first, last, reason))

    def _epoch(self, epoch: int, now: float) -> tuple[bool, list[StreamEntry]]:
        """Go on with a message of ``epoch``? A new epoch replaces the current one, and what
        the old one still held is released first."""
        if epoch == self.epoch:
            return True, []
        if epoch in self.retired:
            self.stats.stale += 1
            return False, []
        out: list[StreamEntry] = []
        if self.epoch:
            out = self._finish_epoch()
            self.retired.append(self.epoch)
        self._reset(epoch)
        return True, out

    def _finish_epoch(self) -> list[StreamEntry]:
        """The current epoch is over: release what is buffered (in order, the holes before
        it reported) and report what it still owed."""
        out: list[StreamEntry] = []
        for seq in sorted(self.buffer):
            if seq > self.delivered + 1:
                self._gap(self.delivered + 1, seq - 1, ORIGIN_RESTARTED)
            out.append(self.buffer[seq])
            self.delivered = seq
        self.buffer.clear()
        self.buffered_bytes = 0
        if self.final:
            self._gap(self.delivered + 1, self.highest, ORIGIN_RESTARTED)
        else:  # the origin went without saying where its stream ended
            self._gap(self.delivered + 1, None, ORIGIN_RESTARTED)
        self.stats.released += len(out)
        return out

    def _reset(self, epoch: int) -> None:
        self.epoch = epoch
        self.delivered = self.highest = self.acked = 0
        self.final = False
        self.buffer.clear()
        self.buffered_bytes = 0
        self.hole_since = self.ack_due = None
        self.ack_forced = False
        self.request = None


@dataclass
class Inbox:
    """Every origin's stream to this node, bounded by ``max_origins``. Origins are keys the
    CURVE handshake authenticated, but with a mesh authority (certificate admission) no
    ring bounds how many there are: this does. An origin past it is refused and counted."""

    config: StreamConfig = field(default_factory=StreamConfig)
    max_origins: int = 16_384
    streams: dict[str, StreamState] = field(default_factory=dict)
    refused: int = 0
    # origin -> (epoch, delivered) kept on disk by a restarted node: its stream resumes there.
    restored: dict[str, tuple[int, int]] = field(default_factory=dict)

    def get(self, origin: str) -> StreamState | None:
        stream = self.streams.get(origin)
        if stream is None:
            if len(self.streams) >= self.max_origins:
                self.refused += 1
                return None
            stream = self.streams[origin] = StreamState(origin, self.config)
            position = self.restored.pop(origin, None)
            if position is not None:
                stream.restore(*position)
        return stream

    def forget(self, origin: str) -> None:
        self.streams.pop(origin, None)
