"""The origin's outbox alone: numbering per destination, credit, bounds and their counted
evictions, acks a peer cannot fake, backfill for a late subscription, and the flow gate."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.mesh.flow import BLOCK, DROP, Decision, FlowConfig, Gate
from zmesh.mesh.outbox import ENTRY_OVERHEAD, Outbox, OutboxConfig
from zmesh.mesh.streamwire import GONE_ACKED, GONE_EPOCH, GONE_EVICTED, Gone, Repair, StreamEntry

A, B = "A" * 40, "B" * 40


def _outbox(**config: float) -> Outbox:
    epochs = itertools.count(1)
    return Outbox(OutboxConfig(**config), lambda: next(epochs))  # type: ignore[arg-type]


def _msg(n: int, topic: str = "t/x", ts: int = 0) -> StreamEntry:
    return StreamEntry(topic, b"%04d" % n, 1, ts, None)


SIZE = len("t/x") + 4 + ENTRY_OVERHEAD


def _send_all(outbox: Outbox, dest: str, now: float = 0.0) -> list[bytes]:
    sent = []
    while True:
        epoch, first, entries = outbox.sendable(dest)
        if not entries:
            return sent
        outbox.mark_sent(dest, epoch, first + len(entries) - 1, now)
        sent.extend(e.payload for e in entries)


def test_each_destination_numbers_only_what_it_gets() -> None:
    outbox = _outbox()
    outbox.append(_msg(0), [A, B], 0.0)
    outbox.append(_msg(1), [B], 0.0)
    outbox.append(_msg(2), [A], 0.0)
    assert [outbox.streams[A].next_seq, outbox.streams[B].next_seq] == [3, 3]  # no holes for A
    assert _send_all(outbox, A) == [b"0000", b"0002"]
    assert _send_all(outbox, B) == [b"0000", b"0001"]
    assert len(outbox.log) == 3  # stored once, whatever the fan-out


def test_credit_limits_what_is_in_flight() -> None:
    outbox = _outbox(window=2)
    for n in range(5):
        outbox.append(_msg(n), [A], 0.0)
    assert _send_all(outbox, A) == [b"0000", b"0001"]
    epoch = outbox.streams[A].epoch
    assert outbox.ack(A, epoch, 1, 0.0) == 1
    assert _send_all(outbox, A) == [b"0002"]
    assert outbox.streams[A].backlog == 2


def test_acks_a_peer_cannot_fake() -> None:
    outbox = _outbox()
    outbox.append(_msg(0), [A], 0.0)
    _send_all(outbox, A)
    epoch = outbox.streams[A].epoch
    assert outbox.ack(A, epoch + 1, 1, 0.0) == 0  # another epoch
    assert outbox.ack(A, epoch, 5, 0.0) == 0  # beyond what was sent
    assert outbox.ack(B, epoch, 1, 0.0) == 0  # a stream it does not have
    assert outbox.stats.bad_acks == 3
    assert outbox.unacknowledged() == {A: 1}
    assert outbox.ack(A, epoch, 1, 0.0) == 1
    assert outbox.ack(A, epoch, 1, 0.0) == 0  # a repeat is harmless and not "bad"
    assert outbox.stats.bad_acks == 3


def test_fetch_answers_with_messages_or_says_why_not() -> None:
    outbox = _outbox(max_bytes=3 * SIZE)
    for n in range(5):
        outbox.append(_msg(n), [A], 0.0)
    _send_all(outbox, A)
    stream = outbox.streams[A]
    epoch = stream.epoch
    assert outbox.fetch(A, epoch, 1, 5) == Gone(epoch, 1, 3, GONE_EVICTED, epoch)  # 1, 2 evicted
    repair = outbox.fetch(A, epoch, 3, 9)
    assert isinstance(repair, Repair) and [e.payload for e in repair.entries] == [b"0002", b"0003", b"0004"]
    assert outbox.stats.evicted_by_dest == {A: 2} and stream.evicted == 2
    outbox.ack(A, epoch, 4, 0.0)
    assert outbox.fetch(A, epoch, 2, 5) == Gone(epoch, 2, 5, GONE_ACKED, epoch)
    assert outbox.fetch(A, epoch + 1, 1, 1) == Gone(epoch + 1, 1, 0, GONE_EPOCH, epoch)
    assert outbox.fetch(A, epoch, 6, 6) is None  # not sent yet: nothing to say


def test_age_bound_evicts_and_counts() -> None:
    outbox = _outbox(max_age=10.0)
    outbox.append(_msg(0), [A], 0.0)
    outbox.append(_msg(1), [A], 5.0)
    outbox.tick(10.5)
    assert [e.message.payload for e in outbox.log] == [b"0001"]
    assert outbox.stats.evicted_by_dest == {A: 1}
    assert outbox.streams[A].first_available == 2


def test_acknowledged_messages_are_kept_only_for_the_backfill_window() -> None:
    outbox = _outbox(backfill_window=2.0)
    outbox.append(_msg(0), [A], 0.0)
    _send_all(outbox, A)
    outbox.ack(A, outbox.streams[A].epoch, 1, 0.1)
    outbox.tick(1.0)
    assert len(outbox.log) == 1
    outbox.tick(2.5)
    assert len(outbox.log) == 0 and outbox.stats.released == 1 and outbox.stats.evicted == 0


def test_past_backfill_max_bytes_what_nobody_needs_goes_at_once_and_is_reported_uncovered() -> None:
    # A saturated publisher with nobody subscribed anywhere: 2 s of its traffic would all be
    # kept for backfill; past backfill_max_bytes the oldest such message goes at once.
    outbox = _outbox(backfill_window=2.0, backfill_max_bytes=3 * SIZE)
    for n in range(10):
        outbox.append(_msg(n, ts=1000 + n), [], 0.0)
    assert [e.message.payload for e in outbox.log] == [b"0007", b"0008", b"0009"]
    assert outbox.stats.released == 7 and outbox.stats.evicted == 0
    assert outbox.uncovered(1000) == (1000, 1006)  # a late interest is told, not left silent
    # What a destination still needs is never let go by this bound (only max_bytes evicts it).
    outbox.append(_msg(10, ts=1010), [A], 0.0)
    outbox.append(_msg(11, ts=1011), [A], 0.0)
    outbox.append(_msg(12, ts=1012), [A], 0.0)
    assert [e.message.payload for e in outbox.log] == [b"0010", b"0011", b"0012"]
    assert outbox.stats.evicted == 0


def test_backfill_gives_a_new_subscription_what_was_published_just_before() -> None:
    # B subscribed to t/# at 1000 ms on its clock; the declaration reached us later. What
    # we published since (and within the window before now) that B was not given joins
    # B's stream, once, and before what follows.
    outbox = _outbox(backfill_window=1.0)
    outbox.append(_msg(0, "t/a", ts=500), [A], 0.0)  # before the window and the subscription
    outbox.append(_msg(1, "t/a", ts=1500), [A], 0.0)
    outbox.append(_msg(2, "u/a", ts=1600), [A], 0.0)  # another topic
    outbox.append(_msg(3, "t/b", ts=1700), [A, B], 0.0)  # B had it already (an older filter)
    assert outbox.backfill(B, {b"t/": 1000}, 0.1, now_ms=2000) == 1
    outbox.append(_msg(4, "t/c", ts=2100), [A, B], 0.2)
    assert _send_all(outbox, B) == [b"0003", b"0001", b"0004"]
    assert outbox.backfill(B, {b"t/": 1000}, 0.3, now_ms=2200) == 0  # never twice


def test_backfill_reaches_back_by_the_window_when_the_subscriber_clock_is_ahead() -> None:
    outbox = _outbox(backfill_window=1.0)
    outbox.append(_msg(0, "t/a", ts=1500), [], 0.0)  # no subscriber anywhere yet: still kept
    # B's clock runs 10 s ahead: its subscription time is "in our future".
    assert outbox.backfill(B, {b"t/": 12_000}, 0.1, now_ms=2000) == 1


def test_an_interest_that_arrives_after_its_messages_were_let_go_is_told_so() -> None:
    outbox = _outbox(backfill_window=1.0)
    outbox.append(_msg(0, "t/a", ts=1000), [], 0.0)  # nobody wants it yet
    outbox.append(_msg(1, "t/a", ts=1100), [A], 0.0)  # A wants this one, and has not acked it
    outbox.tick(5.0)
    assert outbox.uncovered(900) == (900, 1000)  # B subscribed at 900, heard of only now
    assert outbox.uncovered(1001) is None
    _send_all(outbox, A, 5.0)
    outbox.ack(A, outbox.streams[A].epoch, 1, 5.0)
    outbox.tick(7.0)  # let go after A's ack: it might have matched B's interest too
    assert outbox.uncovered(1001) == (1001, 1100)


def test_backfilled_copies_are_bounded_and_evicted_like_the_rest() -> None:
    outbox = _outbox(max_bytes=4 * SIZE)
    for n in range(3):
        outbox.append(_msg(n, ts=n), [A], 0.0)
    outbox.backfill(B, {b"t/": 0}, 0.0, now_ms=10)
    assert outbox.bytes <= 4 * SIZE
    assert outbox.stats.evicted >= 2  # oldest first, whoever needed them, counted
    assert sum(outbox.stats.evicted_by_dest.values()) == outbox.stats.evicted


def test_tails_back_off_while_nothing_moves_and_stop_when_acked() -> None:
    outbox = _outbox(ack_timeout=0.25, max_ack_timeout=1.0)
    outbox.append(_msg(0), [A], 0.0)
    _send_all(outbox, A, 0.0)
    times = [t / 100 for t in range(0, 400, 5) if outbox.tick(t / 100)]
    assert times == [0.25, 0.75, 1.75, 2.75, 3.75]
    outbox.ack(A, outbox.streams[A].epoch, 1, 4.0)
    assert not any(outbox.tick(t) for t in (4.5, 9.0))
    assert _outbox().tick(100.0) == []  # an idle outbox says nothing


def test_final_tails_name_every_stream_end() -> None:
    outbox = _outbox()
    outbox.append(_msg(0), [A, B], 0.0)
    outbox.append(_msg(1), [A], 0.0)
    tails = dict(outbox.final_tails())
    assert (tails[A].last, tails[B].last, tails[A].final) == (2, 1, True)


def test_room_and_detach() -> None:
    outbox = _outbox(max_bytes=2 * SIZE)
    outbox.append(_msg(0), [A], 0.0)
    outbox.append(_msg(1), [B], 0.0)
    assert not outbox.room(SIZE - ENTRY_OVERHEAD, 0.0)  # would evict what A and B need
    outbox.attach(A, False)  # A is down, or stuck
    assert outbox.room(SIZE - ENTRY_OVERHEAD, 0.0)  # A's message may go now
    outbox.attach(A, True)
    assert not outbox.room(SIZE - ENTRY_OVERHEAD, 0.0)
    assert outbox.stuck(5.0, 10.0) == [] and sorted(outbox.stuck(10.0, 10.0)) == [A, B]
    assert outbox.forget(A) == 1 and outbox.room(SIZE - ENTRY_OVERHEAD, 0.0)


def test_a_destination_past_its_window_holds_publishers_until_it_acknowledges() -> None:
    """Room in bytes is not enough: a destination with more than ``window`` messages
    unacknowledged makes ``room`` False, so a saturating publisher waits at the gate (its
    PUBACKs held) instead of queueing the whole byte bound ahead of a slower subscriber."""
    outbox = _outbox(window=3)
    gate: Gate[int] = Gate(FlowConfig(BLOCK, block_max=10.0), outbox)
    for n in range(4):
        assert gate.offer(n, SIZE - ENTRY_OVERHEAD, 0.0) is Decision.ADMIT
        outbox.append(_msg(n), [A], 0.0)
    assert outbox.room(1, 0.0) is False and outbox.over_window == 1  # 4 unacknowledged > 3
    assert gate.offer(4, SIZE - ENTRY_OVERHEAD, 0.0) is Decision.HOLD
    _send_all(outbox, A)
    outbox.ack(A, outbox.streams[A].epoch, 1, 0.5)
    assert gate.release(0.5) == [4] and outbox.over_window == 0
    outbox.append(_msg(4), [B], 0.5)  # another destination's own window
    outbox.attach(A, False)  # a detached destination holds nobody back
    outbox.append(_msg(5), [A], 0.5)
    outbox.append(_msg(6), [A], 0.5)
    assert outbox.room(1, 0.5) and outbox.over_window == 0
    outbox.attach(A, True, 0.5)
    assert not outbox.room(1, 0.5)
    assert outbox.forget(A) == 5 and outbox.room(1, 0.5)
    aged = _outbox(window=1, max_age=5.0)
    aged.append(_msg(0), [A], 0.0)
    aged.append(_msg(1), [A], 0.0)
    assert not aged.room(1, 0.0)
    aged.tick(6.0)  # both evicted past max_age (counted for A): nothing holds publishers now
    assert aged.stats.evicted_by_dest == {A: 2} and aged.room(1, 6.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["append", "ack", "tick", "detach", "fetch"]),
                          st.integers(0, 3), st.integers(0, 50)), min_size=30, max_size=300))
def test_the_bounds_hold_whatever_happens(ops: list[tuple[str, int, int]]) -> None:
    dests = [f"{i:040d}" for i in range(4)]
    outbox = _outbox(max_bytes=10 * SIZE, max_age=5.0, window=4)
    now = 0.0
    for op, d, n in ops:
        dest = dests[d]
        if op == "append":
            outbox.append(_msg(n), dests[: d + 1], now)
            _send_all(outbox, dest, now)
        elif op == "ack" and dest in outbox.streams:
            outbox.ack(dest, outbox.streams[dest].epoch, n, now)
        elif op == "tick":
            now += n / 10
            outbox.tick(now)
        elif op == "detach":
            outbox.attach(dest, bool(n % 2))
        elif op == "fetch" and dest in outbox.streams:
            outbox.fetch(dest, outbox.streams[dest].epoch, max(1, n), n + 10)
        assert outbox.bytes <= 10 * SIZE
        assert outbox.bytes == sum(e.size for e in outbox.log)
        for entry in outbox.log:
            assert 0 <= entry.blockers <= entry.pending
        assert outbox.over_window == sum(s.attached and len(s.entries) > 4 for s in outbox.streams.values())
        for stream in outbox.streams.values():
            assert stream.inflight <= 4
            seqs = [seq for seq, _ in stream.entries]
            assert seqs == list(range(stream.first_available, stream.first_available + len(seqs)))
            assert stream.acked < stream.first_available <= stream.next_seq
            assert stream.inflight_bytes == sum(e.size for s, e in stream.entries if s <= stream.sent)


# ---------------------------------------------------------------------------- the gate


def test_block_holds_publishes_in_order_until_acks_make_room() -> None:
    outbox = _outbox(max_bytes=2 * SIZE)
    gate: Gate[int] = Gate(FlowConfig(BLOCK, block_max=10.0), outbox)
    for n in range(2):
        assert gate.offer(n, SIZE - ENTRY_OVERHEAD, 0.0) is Decision.ADMIT
        outbox.append(_msg(n), [A], 0.0)
    _send_all(outbox, A)
    assert [gate.offer(n, SIZE - ENTRY_OVERHEAD, 0.1) for n in (2, 3)] == [Decision.HOLD] * 2
    assert gate.release(1.0) == []
    outbox.ack(A, outbox.streams[A].epoch, 1, 1.0)
    assert gate.release(1.0) == [2]  # one freed slot, the oldest waiting publish
    outbox.append(_msg(2), [A], 1.0)
    assert gate.release(1.0) == []
    assert outbox.stats.evicted == 0  # block never dropped anything A needed


def test_block_detaches_a_destination_that_acknowledges_nothing() -> None:
    outbox = _outbox(max_bytes=1 * SIZE)
    gate: Gate[int] = Gate(FlowConfig(BLOCK, block_max=10.0), outbox)
    outbox.append(_msg(0), [A], 0.0)
    assert gate.offer(1, SIZE - ENTRY_OVERHEAD, 1.0) is Decision.HOLD
    assert gate.release(9.0) == []
    assert gate.release(11.5) == [1]
    assert gate.stats.detached == 1 and not outbox.streams[A].attached
    outbox.append(_msg(1), [A], 11.5)
    assert outbox.stats.evicted_by_dest == {A: 1}  # counted, and reported when A asks
    outbox.attach(A, True, 20.0)  # A came back up: not "stuck" for another block_max
    assert outbox.stuck(25.0, 10.0) == [] and outbox.stuck(30.0, 10.0) == [A]


def test_block_waits_for_a_slow_destination_that_still_progresses() -> None:
    outbox = _outbox(max_bytes=1 * SIZE)
    gate: Gate[int] = Gate(FlowConfig(BLOCK, block_max=10.0), outbox)
    outbox.append(_msg(0), [A], 0.0)
    outbox.append(_msg(1), [A], 0.0)  # over the bound at once: 0 evicted (as drop would)
    _send_all(outbox, A)
    outbox.ack(A, outbox.streams[A].epoch, 1, 9.0)  # progress at 9 s
    assert gate.offer(2, SIZE - ENTRY_OVERHEAD, 0.0) is Decision.HOLD
    assert gate.release(15.0) == []  # held 15 s, but A acknowledged 6 s ago: not stuck
    assert outbox.streams[A].attached


def test_drop_admits_everything_and_the_outbox_counts_what_it_evicts() -> None:
    outbox = _outbox(max_bytes=1 * SIZE)
    gate: Gate[int] = Gate(FlowConfig(DROP), outbox)
    for n in range(3):
        assert gate.offer(n, SIZE - ENTRY_OVERHEAD, 0.0) is Decision.ADMIT
        outbox.append(_msg(n), [A], 0.0)
    assert outbox.stats.evicted_by_dest == {A: 2}


def test_the_gate_itself_is_bounded() -> None:
    outbox = _outbox(max_bytes=1 * SIZE)
    outbox.append(_msg(0), [A], 0.0)
    gate: Gate[int] = Gate(FlowConfig(BLOCK, max_held=2, max_held_bytes=10**6), outbox)
    assert [gate.offer(n, 10, 0.0) for n in range(3)] == [Decision.HOLD, Decision.HOLD, Decision.REFUSE]
    assert gate.stats.refused == 1 and gate.waiting() == 2
    with pytest.raises(ValueError, match="block"):
        FlowConfig("maybe")
