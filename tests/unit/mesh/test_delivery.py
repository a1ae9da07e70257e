"""Outbox and StreamState together, through channels that lose, repeat and reorder: every
message arrives exactly once and in order when recovery can succeed, and a range the
outbox no longer holds is reported exactly once, by name, when it cannot."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.mesh.delivery_sim import DEST, Sim, Store
from zmesh.mesh import streamwire as sw
from zmesh.mesh.outbox import ENTRY_OVERHEAD, Outbox, OutboxConfig
from zmesh.mesh.streams import EVICTED, ORIGIN_RESTARTED, SUBSCRIBED_LATE, TIMEOUT, StreamConfig

FOREVER = 1e9
actions = st.sampled_from(["publish", "publish", "publish", "deliver_rx", "deliver_rx", "deliver_tx",
                           "drop_rx", "drop_tx", "dup_rx", "dup_tx", "tick"])


def _step(sim: Sim, action: str, data: st.DataObject) -> None:
    if action == "publish":
        sim.publish()
    elif action == "tick":
        sim.tick(data.draw(st.sampled_from([0.001, 0.05, 0.3, 1.0])))
    else:
        queue = sim.to_rx if action.endswith("rx") else sim.to_tx
        if not queue:
            return
        index = data.draw(st.integers(0, len(queue) - 1))  # any one of them: reordering
        if action.startswith("drop"):
            queue.pop(index)
        elif action.startswith("dup"):
            queue.append(queue[index])
        elif action == "deliver_rx":
            sim.at_receiver(queue.pop(index))
        else:
            sim.at_origin(queue.pop(index))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(actions, min_size=40, max_size=400), st.data(), st.sampled_from([2, 7, 4096]),
       st.sampled_from([1, 3, 1024]), st.sampled_from([2, 16]))
def test_loss_reorder_and_duplication_deliver_every_message_once_in_order(
    steps: list[str], data: st.DataObject, window: int, frame_entries: int, buffered: int
) -> None:
    # The outbox's bounds are far away: recovery always can succeed, so nothing may be
    # lost. The receiver's buffer may be tiny: what overflows it is asked for again.
    sim = Sim(
        OutboxConfig(max_age=FOREVER, window=window, frame_entries=frame_entries),
        StreamConfig(give_up=FOREVER, max_buffered=buffered),
    )
    for action in steps:
        _step(sim, action, data)
        assert len(sim.rx.buffer) <= buffered
    sim.settle()
    assert sim.delivered == sim.published
    assert sim.gaps == []
    assert sim.outbox.unacknowledged() == {}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 30), st.integers(0, 30), st.integers(1, 30), st.data())
def test_an_evicted_range_is_one_gap_that_names_it(before: int, lost: int, after: int, data: st.DataObject) -> None:
    # Messages before..before+lost-1 never reach the receiver, and the outbox (a small byte
    # bound, policy drop) has let them go by the time the receiver asks.
    entry_size = 3 + 6 + ENTRY_OVERHEAD  # topic "t/x", a payload of 6 digits, the record
    sim = Sim(OutboxConfig(max_bytes=entry_size * after, max_age=FOREVER, backfill_window=0),
              StreamConfig(give_up=FOREVER))
    for _ in range(before):
        sim.publish()
    sim.settle()
    sim.to_rx.clear()
    for _ in range(lost):
        sim.publish()
        sim.to_rx.clear()  # every frame lost on the way
    lost_payloads = sim.published[before : before + lost]
    for _ in range(after):
        sim.publish()
    if data.draw(st.booleans()):
        sim.to_rx.reverse()  # the survivors arrive in any order
    sim.settle()
    expected = [p for p in sim.published if p not in lost_payloads]
    assert sim.delivered == expected
    evicted = sim.outbox.stats.evicted_by_dest.get(DEST, 0)
    if lost == 0:
        assert sim.gaps == []
        return
    assert len(sim.gaps) == 1, sim.gaps
    gap = sim.gaps[0]
    assert (gap.first, gap.last, gap.reason) == (before + 1, before + lost, EVICTED)
    assert gap.count == lost <= evicted


def test_a_hole_nobody_answers_is_given_up_and_reported_once() -> None:
    sim = Sim(OutboxConfig(max_age=FOREVER), StreamConfig(give_up=5.0))
    sim.publish()
    sim.to_rx.clear()  # lost
    sim.publish()
    sim.at_receiver(sim.to_rx.pop())
    for _ in range(40):  # the origin is unreachable: every request is lost
        sim.tick(0.25)
        sim.to_tx.clear()
        sim.to_rx.clear()
    assert [(g.first, g.last, g.reason) for g in sim.gaps] == [(1, 1, TIMEOUT)]
    assert sim.delivered == [sim.published[1]]  # released after the gap, not stalled for ever
    assert sim.rx.stats.nacks >= 4  # asked, then asked again with backoff


def test_a_restarted_origin_reports_exactly_what_it_said_it_had() -> None:
    sim = Sim()
    for _ in range(3):
        sim.publish()
    sim.settle()
    sim.publish()
    sim.publish()
    sim.to_rx.clear()  # the last two never arrive, and the origin stops cleanly
    for _dest, tail in sim.outbox.final_tails():
        sim.at_receiver(sw.encode_control(tail))
    old_epoch = sim.rx.epoch
    restarted = Sim()  # a new process: new epochs, an empty outbox
    restarted.outbox._epochs = lambda: old_epoch + 1  # noqa: SLF001  # a later life
    restarted.rx = sim.rx
    restarted.publish()
    restarted.settle()
    assert [(g.epoch, g.first, g.last, g.reason) for g in sim.rx.take_gaps() + restarted.gaps] == [
        (old_epoch, 4, 5, ORIGIN_RESTARTED)
    ]
    assert restarted.delivered == restarted.published


def test_a_crashed_origin_leaves_an_open_ended_gap_and_stale_frames_are_refused() -> None:
    sim = Sim()
    sim.publish()
    sim.settle()
    stale = sw.encode_frame(DEST, sim.rx.epoch, 2, [sw.StreamEntry("t/x", b"old", 1, 0, None)])
    old_epoch = sim.rx.epoch
    out = sim.rx.on_frame(sw.decode_frame(sw.encode_frame(DEST, old_epoch + 7, 1, [
        sw.StreamEntry("t/x", b"new", 1, 0, None)]), DEST), 1.0)
    assert [e.payload for e in out] == [b"new"]
    gaps = sim.rx.take_gaps()
    assert [(g.epoch, g.first, g.last, g.count) for g in gaps] == [(old_epoch, 2, None, None)]
    assert sim.rx.on_frame(sw.decode_frame(stale, DEST), 1.1) == []  # the old life is retired
    assert sim.rx.stats.stale == 1


def test_an_origin_that_forgot_the_epoch_says_so_and_the_receiver_reports_it() -> None:
    sim = Sim()
    sim.publish()
    sim.settle()
    sim.publish()
    sim.publish()
    sim.to_rx.pop(0)  # the first of the two is lost
    sim.at_receiver(sim.to_rx.pop(0))  # the second arrives: a hole at 2
    sim.outbox.streams.clear()  # the origin restarted without a disk outbox
    sim.tick(0.01)
    sim.settle()
    reasons = [(g.first, g.last, g.reason) for g in sim.gaps]
    # What it held past the hole was released; the hole and the unknown rest are reported.
    assert reasons == [(2, 2, ORIGIN_RESTARTED), (4, None, ORIGIN_RESTARTED)]
    assert sim.delivered == [sim.published[0], sim.published[2]]


def test_a_receiver_without_state_gets_what_was_never_acknowledged_and_no_false_gap() -> None:
    # A subscriber node restarted without a data_dir: its first frame is deep in the
    # stream. What it acknowledged before is GONE ACKED (no loss); the rest is repaired.
    sim = Sim()
    for _ in range(5):
        sim.publish()
    sim.settle()
    for _ in range(3):
        sim.publish()
    sim.to_rx.clear()  # sent, never acknowledged: the node died
    sim.rx = type(sim.rx)(sim.rx.origin, sim.rx.config)
    sim.publish()
    sim.settle()
    assert sim.gaps == []
    assert sim.delivered[5:] == sim.published[5:]


def test_adversarial_frames_keep_the_receiver_bounded() -> None:
    # A peer (an origin may lie about its own stream) floods far-ahead, repeated and huge
    # sequence numbers: memory stays within the buffer's bounds.
    config = StreamConfig(max_buffered=64, max_buffered_bytes=64 * 1024, max_range=1000)
    sim = Sim(stream_config=config)
    entry = sw.StreamEntry("t/x", b"x" * 100, 1, 0, None)
    for i in range(5000):
        first = 2 + (i * 7919) % 10**6
        sim.rx.on_frame(sw.StreamFrame(DEST, 1, first, [entry] * 4), float(i))
        sim.rx.poll(float(i))
        assert len(sim.rx.buffer) <= config.max_buffered
        assert sim.rx.buffered_bytes <= config.max_buffered_bytes
        assert len(sim.rx.gaps) <= config.max_gaps
    assert sim.rx.stats.overflow > 0
    assert len(sim.rx.retired) <= config.retired_epochs


def test_duplicates_of_released_messages_are_suppressed() -> None:
    sim = Sim()
    sim.publish()
    frame = sim.to_rx[0]
    sim.settle()
    for _ in range(3):
        sim.at_receiver(frame)
    assert sim.delivered == sim.published
    assert sim.rx.stats.duplicates == 3


def test_a_receiver_restored_from_disk_neither_loses_nor_repeats() -> None:
    sim = Sim()
    for _ in range(4):
        sim.publish()
    sim.settle()
    epoch, delivered = sim.rx.position()
    sim.publish()
    sim.to_rx.clear()  # lost while the subscriber node was down
    sim.rx = type(sim.rx)(sim.rx.origin, sim.rx.config)
    sim.rx.restore(epoch, delivered)
    sim.settle()  # the origin's TAIL reveals what it missed
    assert sim.delivered == sim.published
    assert sim.gaps == []


def test_a_long_hole_is_pulled_chunk_after_chunk_without_waiting_for_retries() -> None:
    # Recovery is paced by the answers, not by the retry timer: each repair that makes
    # progress asks for the next chunk at once.
    sim = Sim(OutboxConfig(frame_entries=10, max_age=FOREVER), StreamConfig(give_up=FOREVER))
    for _ in range(100):
        sim.publish()
    sim.to_rx.clear()  # all lost
    sim.publish()
    sim.at_receiver(sim.to_rx.pop())
    sim.tick(0.01)  # past nack_delay: the first request
    while sim.to_rx or sim.to_tx:  # no more time passes
        if sim.to_tx:
            sim.at_origin(sim.to_tx.pop(0))
        if sim.to_rx:
            sim.at_receiver(sim.to_rx.pop(0))
    assert sim.delivered == sim.published


def test_a_subscription_heard_of_too_late_is_a_gap_by_time() -> None:
    sim = Sim()
    notice = sw.decode_control(sw.encode_uncovered(1000, 2500))
    assert isinstance(notice, sw.Uncovered)
    sim.rx.on_uncovered(notice)
    (gap,) = sim.rx.take_gaps()
    assert (gap.reason, gap.since_ms, gap.until_ms, gap.count) == (SUBSCRIBED_LATE, 1000, 2500, None)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(actions, min_size=40, max_size=200), st.lists(actions, min_size=10, max_size=200), st.data())
def test_an_origin_restarted_from_its_disk_outbox_loses_nothing_and_repeats_nothing(
    before: list[str], after: list[str], data: st.DataObject
) -> None:
    # The origin keeps its outbox on disk (journal -> store). It dies at a random moment
    # (what was in flight is lost with it) and comes back from the store: same epochs,
    # same numbers; the receiver, which never restarted, gets everything once, in order.
    journal: list = []
    store = Store()
    config = OutboxConfig(max_age=FOREVER, window=7, frame_entries=3)
    sim = Sim(config, StreamConfig(give_up=FOREVER, max_buffered=16))
    sim.outbox = Outbox(config, lambda: 4242, journal)
    for action in before:
        _step(sim, action, data)
        store.apply(journal)  # the store commits once per flush: here once per step
        # The store mirrors the outbox: the same records, the same stream positions.
        assert set(store.entries) == {entry.lseq for entry in sim.outbox.log}
        assert store.streams == {d: [st_.epoch, st_.next_seq, st_.acked] for d, st_ in sim.outbox.streams.items()}
    sim.to_rx.clear()
    sim.to_tx.clear()  # the process died: nothing in flight survives
    old = {d: (st_.acked, st_.first_available, [seq for seq, _ in st_.entries]) for d, st_ in sim.outbox.streams.items()}
    sim.outbox = Outbox(config, lambda: 9999, journal)  # only for streams made after it
    store.restore_into(sim.outbox, sim.now, int(sim.now * 1000))
    for dest, (acked, first_available, held) in old.items():
        restored = sim.outbox.streams[dest]
        assert (restored.acked, restored.first_available, [seq for seq, _ in restored.entries]) == (
            acked, first_available, held)
        assert restored.sent == restored.first_available - 1  # everything unacknowledged goes again
    existed = set(old)
    sim.pump()
    for action in after:
        _step(sim, action, data)
        store.apply(journal)
    sim.settle()
    assert sim.delivered == sim.published
    assert sim.gaps == []
    assert all(sim.outbox.streams[dest].epoch == 4242 for dest in existed)  # continued, not new


def test_a_restored_outbox_reports_what_was_evicted_before_the_stop() -> None:
    journal: list = []
    store = Store()
    entry_size = 3 + 6 + ENTRY_OVERHEAD
    config = OutboxConfig(max_bytes=2 * entry_size, max_age=FOREVER)
    sim = Sim(config)
    sim.outbox = Outbox(config, lambda: 7, journal)
    for _ in range(5):
        sim.publish()
    sim.to_rx.clear()  # none of them arrived; the first three are evicted by the bound
    store.apply(journal)
    sim.outbox = Outbox(config, lambda: 8, journal)
    store.restore_into(sim.outbox, sim.now, int(sim.now * 1000))
    sim.pump()
    sim.settle()
    assert [(g.first, g.last, g.reason) for g in sim.gaps] == [(1, 3, EVICTED)]
    assert sim.delivered == sim.published[3:]
