"""Reliable delivery wired into a running node (issue 17, docs/delivery.md §13): the glue
between the pure cores (``outbox``, ``streams``, ``flow``, ``streamwire``) and the mesh's
sockets. The interim of §3.3: QoS >= 1 messages go as numbered stream frames addressed on
the shared PUB (every SUB also holds ``0xFF + own key``), and every control message (ACK,
NACK, REPAIR, GONE, TAIL, INTEREST, INTEREST_OK, UNCOVERED) goes on our DEALER to the
peer's ROUTER, whose ZAP ``User-Id`` names the sender.

A narrow interface on purpose: the mesh hands it frames and control messages with the
sender's key and calls ``tick``; the node hands it publishes and interest changes and gets
released messages (``deliver``) and gaps (``on_gaps``) back. It never holds the Node or the
Mesh: sending is two callables. QoS 0 never comes here.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zmesh.mesh import streamwire as sw
from zmesh.mesh.flow import Decision, DeliveryRefused, FlowConfig, Gate
from zmesh.mesh.outbox import Journal, JournalInterest, Outbox, OutboxConfig
from zmesh.mesh.streams import Gap, Inbox, StreamConfig, StreamState

log = logging.getLogger("zmesh.delivery")

# Drop reasons (zmesh.drops)
BAD_CONTROL = "delivery_bad_control"  # a delivery control message or stream frame we refuse
HOLD_OVERFLOW = "delivery_hold_overflow"  # a stream input past the congestion hold's bound
EVICTED = "delivery_evicted"  # the outbox's bounds dropped a message a destination needed
REFUSED = "delivery_refused"  # a publish refused past the gate's bounds
UNKNOWN_ORIGIN = "delivery_too_many_origins"

MATCH_CACHE_LIMIT = 100_000
# While a local consumer is behind, stream input from a peer waits here instead of being
# released into full queues: at most this much per origin (the origin's credit normally
# keeps it far below); past it an input is dropped, and recovered later by NACK.
HOLD_MAX_ITEMS = 256
HOLD_MAX_BYTES = 32 * 1024 * 1024
HOLD_RETRY = 0.002  # seconds between congestion checks while something is held
INTEREST_RETRY = 0.05  # an interest that could not be queued (handshake not done) is retried this soon

SendData = Callable[[bytes, int], bool]  # (frame, messages in it)
SendControl = Callable[[str, bytes], bool]
Deliver = Callable[[str, list[sw.StreamEntry]], None]


@dataclass(frozen=True)
class DeliverySettings:
    """What ``[delivery]`` configures (zmesh.config.DeliveryConfig maps onto it)."""

    outbox: OutboxConfig = OutboxConfig()
    streams: StreamConfig = StreamConfig()
    flow: FlowConfig = FlowConfig()
    stop_timeout: float = 5.0
    interest_repeat: float = 1.0  # an unconfirmed interest is sent again this often (the heartbeat)


def _epoch() -> int:
    return random.getrandbits(62) + 1


class Delivery:
    def __init__(
        self,
        own_key: str,
        settings: DeliverySettings,
        send_data: SendData,
        send_control: SendControl,
        deliver: Deliver,
        on_gaps: Callable[[list[Gap]], None],
        drop: Callable[[str, str], None],
        congested: Callable[[], bool] = lambda: False,
        label: Callable[[str], str] = lambda key: key[:8],
        journal: list[Journal] | None = None,
    ) -> None:
        self.own_key = own_key
        self.settings = settings
        self.send_data, self.send_control = send_data, send_control
        self.deliver, self.on_gaps, self.drop = deliver, on_gaps, drop
        self.congested, self.label = congested, label
        # A disk store (data_dir) attaches here: it passes a journal list and, before any
        # publish, calls outbox.restore(...) with what it kept (see docs/delivery.md §9).
        self.outbox = Outbox(settings.outbox, _epoch, journal)
        self.gate: Gate[list[Any]] = Gate(settings.flow, self.outbox)
        self.inbox = Inbox(settings.streams)
        self._loop: asyncio.AbstractEventLoop | None = None
        # --- origin: who wants what (the interim's interest table, §3.3)
        self.interest: dict[str, dict[bytes, int]] = {}  # dest -> prefix -> since_ms
        self._prefixes: dict[str, tuple[bytes, ...]] = {}
        self._interest_seq_in: dict[str, int] = {}
        self._match: dict[bytes, list[str]] = {}
        self.up: set[str] = set()
        # Peers down, since when (monotonic): their streams and interest are kept (what is
        # published while they are away joins their streams) whatever the membership does,
        # for outbox_max_age (all of it recoverable) + give_up (what was evicted is still
        # reported to them as an exact range when they come back); then their state goes,
        # and a peer back later sees a new epoch (an open-ended gap, still not silent).
        self.down_since: dict[str, float] = {}
        self._next_departure_check = 0.0
        self.heard: set[str] = set()  # peers whose interest we heard since they were last down
        self._dirty: set[str] = set()
        self._flush_scheduled = False
        self._evicted_seen = 0
        self._changed: asyncio.Event | None = None
        # --- receiver: what we want (sent to every up peer) and who confirmed it
        self.own_interest: dict[bytes, int] = {}
        # Grows with every change; starts at the wall clock (us) so that a restarted node's
        # declarations are newer than its previous life's (origins apply only newer ones).
        self.interest_seq = time.time_ns() // 1000
        self._confirmed: dict[str, int] = {}
        self._interest_due: dict[str, float] = {}
        self._wakeups: dict[str, asyncio.TimerHandle] = {}
        self._held: dict[str, deque[tuple[str, Any, int]]] = {}
        self._held_bytes = 0
        self._hold_timer: asyncio.TimerHandle | None = None
        self.counters = {"gaps_total": 0, "lost_total": 0, "gaps_open_ended_total": 0, "bad_control_total": 0,
                         "hold_overflow_total": 0, "refused_total": 0}
        self.lost_by_origin: dict[str, int] = {}

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()

    # ================================================================== origin

    def publish(self, key: bytes, topic: str, payload: bytes, qos: int,
                properties: dict[str, Any] | None) -> asyncio.Future[None] | None:
        """A QoS >= 1 publish from this node (``key``: the topic's wire form). None: in the
        outbox, acknowledge now. A future: held by the gate (``block``), or failed with
        DeliveryRefused (past the gate's bounds)."""
        entry = sw.StreamEntry(topic, payload, qos, time.time_ns() // 1_000_000, properties or None)
        now = time.monotonic()
        item: list[Any] = [entry, key, None]  # the future is made only if it must wait
        decision = self.gate.offer(item, len(topic) + len(payload), now)
        if decision is Decision.ADMIT:
            self._append(entry, key, now)
            return None
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        if decision is Decision.HOLD:
            item[2] = future
            return future
        self.counters["refused_total"] += 1
        self.drop(REFUSED, f"publish to {topic[:80]!r}: {self.gate.waiting()} publishes already wait")
        future.set_exception(DeliveryRefused("delivery queue full (quota exceeded)"))
        return future

    def _append(self, entry: sw.StreamEntry, key: bytes, now: float) -> None:
        dests = self._dests(key)
        self.outbox.append(entry, dests, now)
        if dests:
            self._dirty.update(dests)
            self._schedule_flush()

    def _dests(self, key: bytes) -> list[str]:
        found = self._match.get(key)
        if found is None:
            topic_key = key + b"\x00"
            # O(destinations with interest) once per topic, then cached: in the interim's
            # full mesh every node may want anything (issue 16's interest-driven links
            # replace this table).
            found = [dest for dest, prefixes in self._prefixes.items() if topic_key.startswith(prefixes)]
            if len(self._match) >= MATCH_CACHE_LIMIT:
                self._match.clear()
            self._match[key] = found
        return found

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send every marked destination what its credit allows."""
        self._flush_scheduled = False
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        outbox, now = self.outbox, time.monotonic()
        for dest in dirty:
            if dest not in self.up:
                continue  # sent when it comes up (the outbox keeps it meanwhile)
            while True:
                epoch, first, entries = outbox.sendable(dest)
                if not entries:
                    break
                if not self.send_data(sw.encode_frame(dest, epoch, first, entries), len(entries)):
                    self._dirty.add(dest)  # the socket is full: the next tick tries again
                    break
                outbox.mark_sent(dest, epoch, first + len(entries) - 1, now)

    def _release_gate(self, now: float) -> None:
        for entry, key, future in self.gate.release(now):
            self._append(entry, key, now)
            if future is not None and not future.done():
                future.set_result(None)

    def _on_interest(self, key: str, message: sw.Interest, now: float) -> None:
        if message.seq > self._interest_seq_in.get(key, 0):
            self._interest_seq_in[key] = message.seq
            old = self.interest.get(key, {})
            added = {p: t for p, t in message.prefixes.items() if old.get(p) != t}
            self.interest[key] = dict(message.prefixes)
            self._prefixes[key] = tuple(message.prefixes)
            journal = self.outbox.journal
            if journal is not None:
                journal.append(JournalInterest(key, sw.encode_interest(message.seq, message.prefixes)))
            if not message.prefixes:
                del self._prefixes[key]
            self._match.clear()
            if added:
                self.outbox.backfill(key, added, now, time.time_ns() // 1_000_000)
                late = self.outbox.uncovered(min(added.values()))
                if late is not None:
                    self.send_control(key, sw.encode_uncovered(*late))
                self._dirty.add(key)
                self._schedule_flush()
        self.send_control(key, sw.encode_interest_ok(message.seq))
        if key not in self.heard:  # (it may come just before we saw the peer up)
            self.heard.add(key)
            self._poke()

    def _on_ack(self, key: str, message: sw.Ack, now: float) -> None:
        if self.outbox.ack(key, message.epoch, message.upto, now):
            self._release_gate(now)
            self._dirty.add(key)
            self._schedule_flush()
            self._poke()

    def _poke(self) -> None:
        if self._changed is not None:
            self._changed.set()

    # ================================================================== receiver

    def set_interest(self, added: set[bytes], removed: set[bytes]) -> None:
        """Our subscriptions' ZeroMQ prefixes changed: declare the whole set to every up
        peer (numbered; repeated until confirmed)."""
        wall = time.time_ns() // 1_000_000
        for prefix in removed:
            self.own_interest.pop(prefix, None)
        for prefix in added:
            self.own_interest.setdefault(prefix, wall)
        self.interest_seq += 1
        self._interest_due.clear()
        # O(up peers) per interest change: the interim has no other way to tell origins
        # (docs/delivery.md §3.3; issue 16's declarations replace it).
        for key in self.up:
            self._send_interest(key, time.monotonic())

    def _send_interest(self, key: str, now: float) -> None:
        prefixes = self.own_interest
        if len(prefixes) > sw.DEFAULT_LIMITS.max_prefixes:
            # More than one declaration may carry: ask for everything instead (the origin
            # over-approximates, the local trie filters), never for less than we want.
            prefixes = {b"": min(prefixes.values())}
        sent = self.send_control(key, sw.encode_interest(self.interest_seq, prefixes))
        self._interest_due[key] = now + (self.settings.interest_repeat if sent else INTEREST_RETRY)

    def on_frame(self, key: str, frame: bytes) -> None:
        """A stream frame off the SUB connected to ``key``'s PUB."""
        try:
            decoded = sw.decode_frame(frame, self.own_key)
        except sw.StreamWireError as exc:
            self._bad(key, exc)
            return
        self._input(key, "frame", decoded, len(frame))

    def _input(self, key: str, kind: str, message: Any, size: int) -> None:
        held = self._held.get(key)
        if held or self.congested():
            if held is None:
                held = self._held[key] = deque()
            if len(held) >= HOLD_MAX_ITEMS or self._held_bytes + size > HOLD_MAX_BYTES:
                self.counters["hold_overflow_total"] += 1
                self.drop(HOLD_OVERFLOW, f"{self.label(key)}: local consumers behind")
                return  # the origin keeps it: asked for again once the hole shows
            held.append((kind, message, size))
            self._held_bytes += size
            self._arm_hold()
            return
        self._apply(key, kind, message)

    def _arm_hold(self) -> None:
        if self._hold_timer is None and self._loop is not None:
            self._hold_timer = self._loop.call_later(HOLD_RETRY, self._drain_held)

    def _drain_held(self) -> None:
        self._hold_timer = None
        # O(origins holding input): only those, only while a local consumer was behind.
        for key in list(self._held):
            held = self._held[key]
            while held and not self.congested():
                kind, message, size = held.popleft()
                self._held_bytes -= size
                self._apply(key, kind, message)
            if not held:
                del self._held[key]
        if self._held:
            self._arm_hold()

    def _apply(self, key: str, kind: str, message: Any) -> None:
        state = self.inbox.get(key)
        if state is None:
            self.drop(UNKNOWN_ORIGIN, self.label(key))
            return
        now = time.monotonic()
        if kind == "frame":
            released = state.on_frame(message, now)
        elif kind == "gone":
            released = state.on_gone(message, now)
        elif kind == "tail":
            released = state.on_tail(message, now)
        else:
            state.on_uncovered(message)
            released = []
        if released:
            self.deliver(key, released)
        self._service(key, state, now)

    def _service(self, key: str, state: StreamState, now: float) -> None:
        controls, released = state.poll(now)
        if released:
            self.deliver(key, released)
        for control in controls:
            self.send_control(key, sw.encode_control(control))
        gaps = state.take_gaps()
        if gaps:
            self._report(gaps)
        wake = state.next_wakeup(now)
        handle = self._wakeups.pop(key, None)
        if handle is not None:
            handle.cancel()
        if wake is not None and self._loop is not None:
            self._wakeups[key] = self._loop.call_later(max(wake - now, 0.001), self._wake, key)

    def _wake(self, key: str) -> None:
        self._wakeups.pop(key, None)
        state = self.inbox.streams.get(key)
        if state is not None:
            self._service(key, state, time.monotonic())

    def _report(self, gaps: list[Gap]) -> None:
        counters = self.counters
        for gap in gaps:
            counters["gaps_total"] += 1
            if gap.count is None:
                counters["gaps_open_ended_total"] += 1
            else:
                counters["lost_total"] += gap.count
                if len(self.lost_by_origin) < 16_384 or gap.origin in self.lost_by_origin:
                    self.lost_by_origin[gap.origin] = self.lost_by_origin.get(gap.origin, 0) + gap.count
        self.on_gaps(gaps)

    # ================================================================== both

    def on_control(self, key: str, data: bytes) -> None:
        """A delivery control message from member ``key`` (ZAP-authenticated)."""
        try:
            message = sw.decode_control(data)
        except sw.StreamWireError as exc:
            self._bad(key, exc)
            return
        now = time.monotonic()
        if isinstance(message, sw.Ack):
            self._on_ack(key, message, now)
        elif isinstance(message, sw.Nack):
            answer = self.outbox.fetch(key, message.epoch, message.first, message.last)
            if answer is not None:
                self.send_control(key, sw.encode_control(answer))
        elif isinstance(message, sw.Interest):
            self._on_interest(key, message, now)
        elif isinstance(message, sw.InterestOk):
            if message.seq == self.interest_seq:
                self._confirmed[key] = message.seq
        elif isinstance(message, sw.Repair):
            self._input(key, "frame", message, len(data))
        elif isinstance(message, sw.Gone):
            self._input(key, "gone", message, 64)
        elif isinstance(message, sw.Tail):
            self._input(key, "tail", message, 64)
        else:
            self._input(key, "uncovered", message, 64)

    def _bad(self, key: str, exc: Exception) -> None:
        self.counters["bad_control_total"] += 1
        self.drop(BAD_CONTROL, f"{self.label(key)}: {exc}")

    def restore_positions(self, positions: dict[str, tuple[int, int]]) -> None:
        """Where each origin's stream stood when this node last committed its sessions
        (``data_dir``): a stream resumes there, so that what the sessions already hold is
        dropped as a duplicate and what they lack is asked for (docs/delivery.md §9)."""
        self.inbox.restored = dict(positions)

    def restore_interest(self, declarations: dict[str, sw.Interest]) -> None:
        """A restarted origin: what each destination wanted before (from the disk store).
        A destination's re-declaration then adds only what is really new to backfill and
        to the "subscribed late" check, and a restored stream has its destinations at once."""
        for key, message in declarations.items():
            self.interest[key] = dict(message.prefixes)
            if message.prefixes:
                self._prefixes[key] = tuple(message.prefixes)
        self._match.clear()

    def position(self, key: str) -> tuple[int, int] | None:
        """(epoch, delivered) of ``key``'s stream to us, for the session store."""
        state = self.inbox.streams.get(key)
        return state.position() if state is not None else None

    def peer_up(self, key: str) -> None:
        now = time.monotonic()
        self.up.add(key)  # `heard` is cleared when it goes down, not here: its interest may be in already
        self.down_since.pop(key, None)
        self.outbox.attach(key, True, now)
        self._confirmed.pop(key, None)
        self._send_interest(key, now)
        self._dirty.add(key)
        self._schedule_flush()

    def peer_down(self, key: str) -> None:
        if key in self.up or key not in self.down_since:
            self.down_since[key] = time.monotonic()
        self.up.discard(key)
        self.heard.discard(key)
        self.outbox.attach(key, False)
        self._poke()

    def forget(self, key: str) -> None:
        """``key`` is no longer trusted: nothing more for it, nothing more from it."""
        self.peer_down(key)
        self.down_since.pop(key, None)
        self.outbox.forget(key)
        self.interest.pop(key, None)
        self._prefixes.pop(key, None)
        self._interest_seq_in.pop(key, None)
        self._match.clear()
        self.inbox.forget(key)
        self._held.pop(key, None)
        handle = self._wakeups.pop(key, None)
        if handle is not None:
            handle.cancel()

    def tick(self, now: float) -> None:
        """Every mesh liveness tick (50 ms): TAILs, the gate, evictions, interest repeats."""
        for dest, tail in self.outbox.tick(now):
            if dest in self.up:
                self.send_control(dest, sw.encode_control(tail))
        self._release_gate(now)
        evicted = self.outbox.stats.evicted
        if evicted != self._evicted_seen:
            self.drop(EVICTED, f"{evicted - self._evicted_seen} messages past the outbox's bounds "
                      "(their destinations are told the exact range)")
            self._evicted_seen = evicted
        if self._dirty:
            self.flush()
        if now >= self._next_departure_check and self.down_since:
            # Once a second, O(peers down): a peer away that long has nothing left here to
            # recover nor an exact range to be told; its streams and interest go.
            self._next_departure_check = now + 1.0
            away = self.settings.outbox.max_age + self.settings.streams.give_up
            for key in [k for k, since in self.down_since.items() if now - since > away]:
                self.forget(key)
        # O(up peers) per tick: the interim repeats each interest until it is confirmed
        # (docs/delivery.md §3.3); a confirmed peer costs one dict lookup. Issue 16's
        # signed declarations replace this loop.
        seq = self.interest_seq
        for key in self.up:
            if self._confirmed.get(key) != seq and now >= self._interest_due.get(key, 0.0):
                self._send_interest(key, now)

    async def stop(self) -> None:
        """Stop flushes: wait (``stop_timeout``) until every up peer's interest was heard
        and everything published here is acknowledged; then the final TAILs."""
        self._release_gate(time.monotonic())
        self.flush()
        deadline = time.monotonic() + self.settings.stop_timeout
        assert self._changed is not None
        while time.monotonic() < deadline:
            if self.up <= self.heard and not self._owed():
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(0.05, max(deadline - time.monotonic(), 0.001)))
            except TimeoutError:
                pass
            now = time.monotonic()
            self.tick(now)
        owed = self._owed()
        if owed:
            log.warning("stopping with %d QoS >= 1 messages unacknowledged: %s", sum(owed.values()),
                        ", ".join(f"{self.label(k)}: {n}" for k, n in sorted(owed.items())))
        for dest, tail in self.outbox.final_tails():
            if dest in self.up:
                self.send_control(dest, sw.encode_control(tail))
        for item, _size, _since in self.gate.held:
            if item[2] is not None and not item[2].done():
                item[2].set_exception(DeliveryRefused("the node stopped before it had room"))
        self.gate.held.clear()
        for handle in self._wakeups.values():
            handle.cancel()
        if self._hold_timer is not None:
            self._hold_timer.cancel()

    def _owed(self) -> dict[str, int]:
        return {k: n for k, n in self.outbox.unacknowledged().items() if k in self.up}

    def snapshot(self) -> dict[str, Any]:
        """The `delivery` part of $SYS/zmesh/node and /metrics. O(origins + destinations):
        read per scrape or $SYS refresh, never per message."""
        now = time.monotonic()
        holes = [s for s in self.inbox.streams.values() if s.hole_since is not None]
        streams = self.inbox.streams.values()
        outbox = self.outbox
        return {
            **self.counters,
            "by_origin": {self.label(k): n for k, n in self.lost_by_origin.items()},
            "holes_open": len(holes),
            "oldest_hole_s": round(max((now - s.hole_since for s in holes if s.hole_since), default=0.0), 3),
            "released_total": sum(s.stats.released for s in streams),
            "duplicates_total": sum(s.stats.duplicates for s in streams),
            "overflow_total": sum(s.stats.overflow for s in streams),
            "nacks_total": sum(s.stats.nacks for s in streams),
            "held_publishes": self.gate.waiting(),
            "held_total": self.gate.stats.held,
            "detached_total": self.gate.stats.detached,
            "outbox": {
                "bytes": outbox.bytes,
                "messages": len(outbox.log),
                "appended_total": outbox.stats.appended,
                "evicted_total": outbox.stats.evicted,
                "backfilled_total": outbox.stats.backfilled,
                "bad_acks_total": outbox.stats.bad_acks,
                "unacknowledged": sum(outbox.unacknowledged().values()),
                "evicted_by_destination": {self.label(k): n for k, n in outbox.stats.evicted_by_dest.items()},
                "detached": sorted(self.label(s.dest) for s in outbox.streams.values() if not s.attached),
            },
        }
