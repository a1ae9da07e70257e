"""zmesh.mqtt.sessionstore: persistent sessions on SQLite. Round trips through real Session
objects, what is refused (corrupt files, other schemas, hostile rows, past the bounds), and
the file modes."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.unit.mqtt.test_sessions import FakeBroker, FakeHub
from zmesh.mqtt.session import NEVER, Outgoing, SubscriptionOptions
from zmesh.mqtt.sessions import Session, SessionStore
from zmesh.mqtt.sessionstore import (
    FILE_NAME,
    Batch,
    Limits,
    SessionDisk,
    SessionPersistence,
    SessionStoreError,
)


class Broker(FakeBroker):
    def remove_subscriber(self, subscriber: Any) -> None:
        self.subscribed.clear()


class Hub(FakeHub):
    def __init__(self) -> None:
        super().__init__()
        self.broker = Broker()


class Timer:
    def __init__(self, delay: float, callback: Any) -> None:
        self.delay, self.callback, self.cancelled = delay, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    def __init__(self) -> None:
        self.wall, self.mono = 1_000_000.0, 50.0


DEFAULT_LIMITS = Limits()


def make_store(path: Path, clock: Clock, limits: Limits = DEFAULT_LIMITS) -> tuple[SessionStore, SessionPersistence, list[Timer]]:
    timers: list[Timer] = []
    disk = SessionDisk(path, limits)
    soon: list[Any] = []
    persistence = SessionPersistence(disk, soon.append, wall=lambda: clock.wall, mono=lambda: clock.mono)
    hub = Hub()

    def call_later(delay: float, callback: Any) -> Timer:
        timers.append(Timer(delay, callback))
        return timers[-1]

    store = SessionStore(hub, call_later, lambda s, w: None, persistence, wall=lambda: clock.wall)  # type: ignore[arg-type]
    return store, persistence, timers


def persistent_session(store: SessionStore, client_id: str, expiry: int = NEVER) -> Session:
    session, present = store.open(client_id, clean_start=False)
    assert not present
    session.level = 4
    store.set_expiry(session, expiry)
    return session


def test_a_session_round_trips_with_its_subscriptions_messages_and_qos2_state(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "data" / FILE_NAME
    store, persistence, _ = make_store(path, clock)
    session = persistent_session(store, "c1")
    session.subscribe("alerts/#", SubscriptionOptions(2, no_local=True, identifier=7), replay=False)
    session.subscribe("gone/#", SubscriptionOptions(1), replay=False)
    session.unsubscribe("gone/#")
    window = session.window
    window.set_max_inflight(2)
    props = {"message_expiry_interval": 100, "user_property": [("k", "v")], "correlation_data": b"\x00\x01"}
    q2 = Outgoing("alerts/a", b"two", 2, False, None)
    q1 = Outgoing("alerts/b", b"one", 1, False, props, expires_at=clock.mono + 100)
    assert window.offer(q2, online=True) is q2 and window.offer(q1, online=True) is q1
    assert window.pubrec(q2.packet_id)  # PUBREL stage
    for i in range(3):
        window.offer(Outgoing("alerts/c", f"q{i}".encode(), 1, False, None), online=True)  # queued
    acked = window.acknowledge(q1.packet_id)  # q1 done: q0 moves into flight
    assert [m.payload for m in acked] == [b"q0"]
    session.inbound_qos2.received(11)
    session.inbound_qos2.received(12)
    session.inbound_qos2.released(11)
    session.conn = None
    store.disconnected(session, None)
    assert persistence.pending and persistence.flush() and not persistence.pending
    persistence.close()
    store.close()

    clock.wall += 30  # the node was down 30 s
    clock.mono = 10.0  # a new process: another monotonic origin
    store2, persistence2, timers = make_store(path, clock)
    stored = persistence2.disk.load()
    assert [s.client_id for s in stored] == ["c1"]
    assert store2.restore(stored, clock.wall, clock.mono) == 1
    back = store2.get("c1")
    assert back is not None and back.conn is None and "c1" in store2.offline
    assert back.subscriptions == {"alerts/#": SubscriptionOptions(2, no_local=True, identifier=7)}
    assert store2.hub.broker.subscribed == {"alerts/#"}
    inflight = list(back.window.inflight.values())
    assert [(m.packet_id, m.released, m.payload) for m in inflight] == [
        (q2.packet_id, True, b""), (acked[0].packet_id, False, b"q0")
    ]
    assert [m.payload for m in back.window.queue] == [b"q1", b"q2"]
    assert back.inbound_qos2.pending == {12}
    assert timers == []  # never expires (3.1.1 clean session 0, persistent_client_expiration 0)
    # New messages continue the numbering: nothing on disk is overwritten.
    back.window.offer(Outgoing("alerts/d", b"new", 1, False, None), online=False)
    assert back.window.queue[-1].seq > max(m.seq for m in (*inflight, *back.window.queue) if m.payload != b"new")
    persistence2.close()


def test_message_expiry_continues_on_the_wall_clock(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / FILE_NAME
    store, persistence, _ = make_store(path, clock)
    session = persistent_session(store, "c")
    for topic, ttl in (("t/short", 5), ("t/long", 100)):
        session.window.offer(Outgoing(topic, b"x", 1, False, {"message_expiry_interval": ttl},
                                      expires_at=clock.mono + ttl), online=False)
    store.disconnected(session, None)
    persistence.close()
    clock.wall += 10
    clock.mono = 3.0
    store2, persistence2, _ = make_store(path, clock)
    store2.restore(persistence2.disk.load(), clock.wall, clock.mono)
    back = store2.get("c")
    assert back is not None
    assert [m.topic for m in back.window.queue] == ["t/long"]  # the short one expired while down
    assert back.window.queue[0].expires_at == pytest.approx(clock.mono + 90, abs=0.01)
    persistence2.flush()
    assert [s.messages[0].topic for s in persistence2.disk.load()] == ["t/long"]  # gone from disk too
    persistence2.close()


def test_a_session_whose_expiry_passed_while_down_is_gone(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / FILE_NAME
    store, persistence, _ = make_store(path, clock)
    for cid, expiry in (("brief", 10), ("long", 3600)):
        session = persistent_session(store, cid, expiry)
        session.subscribe("a/#", SubscriptionOptions(1), replay=False)
        store.disconnected(session, None)
    persistence.close()
    clock.wall += 60
    store2, persistence2, timers = make_store(path, clock)
    assert store2.restore(persistence2.disk.load(), clock.wall, clock.mono) == 1
    assert store2.get("brief") is None and store2.expired_total == 1
    assert [t.delay for t in timers] == [pytest.approx(3540)]  # "long" keeps what is left of its hour
    persistence2.flush()
    assert [s.client_id for s in persistence2.disk.load()] == ["long"]
    persistence2.close()


def test_a_clean_session_is_never_written_and_an_ended_one_is_removed(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / FILE_NAME
    store, persistence, _ = make_store(path, clock)
    clean, _ = store.open("clean", clean_start=True)
    store.set_expiry(clean, 0)
    clean.subscribe("x", SubscriptionOptions(1), replay=False)
    kept = persistent_session(store, "kept")
    kept.subscribe("y", SubscriptionOptions(1), replay=False)
    persistence.flush()
    assert [s.client_id for s in persistence.disk.load()] == ["kept"]
    store.end(kept, "test")
    persistence.flush()
    assert persistence.disk.load() == []
    persistence.close()


def test_stream_positions_are_kept_with_the_sessions(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / FILE_NAME
    _, persistence, _ = make_store(path, clock)
    done: list[int] = []
    persistence.set_position("originkey", 12345, 99)
    persistence.when_committed(lambda: done.append(1))
    assert done == []  # not before the commit
    persistence.flush()
    assert done == [1]
    persistence.when_committed(lambda: done.append(2))  # nothing pending: at once
    assert done == [1, 2]
    persistence.disk.save_positions({"other": (1, 2)})
    assert persistence.disk.load_positions() == {"originkey": (12345, 99), "other": (1, 2)}
    persistence.close()


def test_files_are_private(tmp_path: Path) -> None:
    os.umask(0o022)
    path = tmp_path / "data" / FILE_NAME
    disk = SessionDisk(path)
    disk.write(Batch(sessions=[("c", 4, NEVER, None, 1.0, 0)]))
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    for name in (FILE_NAME, FILE_NAME + "-wal", FILE_NAME + ".lock"):
        assert stat.S_IMODE(os.stat(path.parent / name).st_mode) == 0o600, name
    with pytest.raises(SessionStoreError, match="in use by another zmesh node"):
        SessionDisk(path)
    disk.close()


def test_a_file_that_is_not_a_store_is_moved_aside_and_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / FILE_NAME
    path.write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.ERROR, "zmesh.mqtt.sessionstore"):
        disk = SessionDisk(path)
    assert disk.recovered_from is not None and disk.recovered_from.read_bytes().startswith(b"this is not")
    assert str(path) in caplog.text and "not an SQLite database" in caplog.text
    assert disk.load() == []
    disk.close()


def test_other_schemas_are_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / FILE_NAME
    SessionDisk(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = 99 WHERE name = 'schema_version'")
    with caplog.at_level(logging.ERROR, "zmesh.mqtt.sessionstore"):
        disk = SessionDisk(path)
    assert disk.recovered_from is not None and "written by a newer zmesh (schema 99" in caplog.text
    disk.close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE inbound")
        conn.execute("CREATE TABLE inbound(client_id TEXT, packet_id INT, extra INT)")
    disk = SessionDisk(path)
    assert disk.recovered_from is not None
    disk.close()


def _hostile(path: Path, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
    with sqlite3.connect(path) as conn:
        for sql, args in statements:
            conn.execute(sql, args)


GOOD = ("INSERT INTO sessions VALUES (?, 4, ?, NULL, 1.0, 0)", ("good", NEVER))


@pytest.mark.parametrize("statements", [
    [("INSERT INTO sessions VALUES ('bad', 9, 10, NULL, 1.0, 0)", ())],  # protocol level 9
    [("INSERT INTO sessions VALUES ('bad', 4, 0, NULL, 1.0, 0)", ())],  # expiry 0 is never stored
    [("INSERT INTO sessions VALUES ('bad', 4, 10, NULL, 'yesterday', 0)", ())],
    [("INSERT INTO sessions VALUES (CAST(X'FF' AS TEXT), 4, 10, NULL, 1.0, 0)", ())],  # not UTF-8
    [("INSERT INTO sessions VALUES ('bad', 4, 10, NULL, 1.0, 0)", ()),
     ("INSERT INTO subscriptions VALUES ('bad', 'a/#/b', 1, 0, 0, 0, 0)", ())],  # invalid filter
    [("INSERT INTO sessions VALUES ('bad', 4, 10, NULL, 1.0, 0)", ()),
     ("INSERT INTO subscriptions VALUES ('bad', 'a', 3, 0, 0, 0, 0)", ())],  # QoS 3
    [("INSERT INTO sessions VALUES ('bad', 4, 10, NULL, 1.0, 0)", ()),
     ("INSERT INTO messages VALUES ('bad', 1, 0, 0, 'a/+', X'00', 1, 0, NULL, NULL)", ())],  # wildcard topic
    [("INSERT INTO sessions VALUES ('bad', 4, 10, NULL, 1.0, 0)", ()),
     ("INSERT INTO messages VALUES ('bad', 1, 0, 1, 'a', X'00', 1, 0, NULL, NULL)", ())],  # PUBREL at QoS 1
    [("INSERT INTO sessions VALUES ('bad', 4, 10, NULL, 1.0, 0)", ()),
     ("INSERT INTO messages VALUES ('bad', 1, 5, 0, 'a', X'00', 1, 0, NULL, NULL)", ()),
     ("INSERT INTO messages VALUES ('bad', 2, 5, 0, 'a', X'00', 1, 0, NULL, NULL)", ())],  # packet id twice
    [("INSERT INTO sessions VALUES ('bad', 4, 10, NULL, 1.0, 0)", ()),
     ("INSERT INTO messages VALUES ('bad', 1, 0, 0, 'a', X'00', 1, 0, X'C1', NULL)", ())],  # properties garbage
    [("INSERT INTO sessions VALUES ('bad', 4, 10, NULL, 1.0, 0)", ()),
     ("INSERT INTO messages VALUES ('bad', 1, 0, 0, 'a', zeroblob(2000), 1, 0, NULL, NULL)", ())],  # > max_packet_size
    [("INSERT INTO sessions VALUES ('bad', 4, 10, NULL, 1.0, 0)", ()),
     ("INSERT INTO inbound VALUES ('bad', 70000)", ())],
], ids=["level", "expiry0", "offline-text", "id-utf8", "filter", "sub-qos", "topic", "pubrel-qos1",
        "pid-twice", "properties", "payload-size", "inbound-id"])
def test_a_hostile_row_refuses_its_session_whole_and_keeps_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, statements: list[tuple[str, tuple[Any, ...]]]
) -> None:
    path = tmp_path / FILE_NAME
    SessionDisk(path).close()
    _hostile(path, [GOOD, *statements])
    disk = SessionDisk(path, Limits(max_packet_size=1000))
    with caplog.at_level(logging.ERROR, "zmesh.mqtt.sessionstore"):
        loaded = disk.load()
    assert [s.client_id for s in loaded] == ["good"]
    assert disk.refused_sessions == 1 and str(path) in caplog.text
    disk.close()


def test_bounds_on_sessions_subscriptions_and_messages(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    disk = SessionDisk(path)
    disk.write(Batch(
        sessions=[(f"c{i}", 4, NEVER, None, float(i), 0) for i in range(5)],
        subs_put=[("c0", f"t/{i}", 1, 0, 0, 0, 0) for i in range(4)],
        msgs_put=[("c1", i + 1, 0, 0, "t", b"x", 1, 0, None, None) for i in range(4)],
    ))
    disk.close()
    disk = SessionDisk(path, Limits(max_sessions=3, max_subscriptions=3, max_messages=3))
    loaded = disk.load()
    # c0 (4 subscriptions) and c1 (4 messages) refused; three sessions at most: c2, c3, c4.
    assert [s.client_id for s in loaded] == ["c2", "c3", "c4"]
    assert disk.refused_sessions == 2 and disk.skipped_sessions == 0
    disk.close()
    disk = SessionDisk(path, Limits(max_sessions=2))
    assert [s.client_id for s in disk.load()] == ["c0", "c1"]  # longest away first
    assert disk.skipped_sessions == 3
    disk.close()


def test_a_failed_write_keeps_the_changes_for_the_next_commit(tmp_path: Path) -> None:
    clock = Clock()
    store, persistence, _ = make_store(tmp_path / FILE_NAME, clock)
    session = persistent_session(store, "c")
    real = persistence.disk.write

    def failing(batch: Batch) -> None:
        raise SessionStoreError("disk full")

    persistence.disk.write = failing  # type: ignore[method-assign]
    assert not persistence.flush() and persistence.pending and persistence.write_errors_total == 1
    persistence.disk.write = real  # type: ignore[method-assign]
    session.subscribe("a", SubscriptionOptions(1), replay=False)
    assert persistence.flush()
    assert [(s.client_id, s.subscriptions) for s in persistence.disk.load()] == [("c", [("a", SubscriptionOptions(1))])]
    persistence.close()


# ---------------------------------------------------------------------------- the origin's outbox


def _outbox_through_disk(path: Path) -> tuple[Any, SessionPersistence]:
    from itertools import count

    from zmesh.mesh.outbox import Outbox, OutboxConfig

    disk = SessionDisk(path)
    persistence = SessionPersistence(disk, lambda callback: None)
    epochs = count(7)
    return Outbox(OutboxConfig(window=2), lambda: next(epochs), persistence.outbox_journal()), persistence


def test_the_outbox_round_trips_through_the_session_file(tmp_path: Path) -> None:
    """What the origin's Outbox journals is committed with the turn's session changes and
    read back into a new Outbox with the same epochs, numbers and messages: the acked
    ones gone, every unacknowledged one still owed (docs/delivery.md §9)."""
    from zmesh.mesh.outbox import Outbox, OutboxConfig
    from zmesh.mesh.streamwire import StreamEntry

    dest_a, dest_b = "A" * 40, "B" * 40
    path = tmp_path / FILE_NAME
    outbox, persistence = _outbox_through_disk(path)
    for n in range(5):
        props = {"user_property": [("k", "v")]} if n == 4 else None
        outbox.append(StreamEntry(f"t/{n}", b"m%d" % n, 1 + n % 2, 1_000 + n, props), [dest_a, dest_b][: 1 + n % 2], 0.0)
    from zmesh.mesh.outbox import JournalInterest
    from zmesh.mesh.streamwire import Interest, encode_interest

    outbox.journal.append(JournalInterest(dest_a, encode_interest(5, {b"t/": 1_000})))
    outbox.journal.append(JournalInterest(dest_a, encode_interest(6, {b"t/": 1_000, b"u\x00": 1_001})))
    epoch_a = outbox.streams[dest_a].epoch
    epoch, first, sent = outbox.sendable(dest_a)
    outbox.mark_sent(dest_a, epoch, first + len(sent) - 1, 0.0)
    outbox.ack(dest_a, epoch_a, 2, 0.0)
    assert persistence.pending
    assert persistence.flush() and not persistence.pending and not persistence._outbox
    persistence.close()

    stored = SessionDisk(path).load_outbox(1000, 10)
    assert stored.interest == {dest_a: Interest(6, {b"t/": 1_000, b"u\x00": 1_001})}  # the last one
    assert sorted(stored.streams) == sorted([(dest_a, epoch_a, 6, 2), (dest_b, outbox.streams[dest_b].epoch, 3, 0)])
    restored = Outbox(OutboxConfig(window=2), lambda: 99)
    restored.restore(stored.streams, stored.entries, 0.0, 1_000, stored.released_until_ms)
    owed = {dest: [(seq, e.message.topic) for seq, e in s.entries] for dest, s in restored.streams.items()}
    assert owed == {dest_a: [(3, "t/2"), (4, "t/3"), (5, "t/4")], dest_b: [(1, "t/1"), (2, "t/3")]}
    last = restored.streams[dest_a].entries[-1][1].message
    assert last == StreamEntry("t/4", b"m4", 1, 1_004, {"user_property": [("k", "v")]})


def test_a_session_file_from_before_the_outbox_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    disk = SessionDisk(path)
    disk.write(Batch(sessions=[("keep", 4, NEVER, None, 1.0, 0)]))
    disk.close()
    conn = sqlite3.connect(path)
    for table in ("outbox_streams", "outbox_entries", "outbox_seqs", "outbox_interest"):
        conn.execute(f"DROP TABLE {table}")
    conn.execute("UPDATE meta SET value = 1 WHERE name = 'schema_version'")
    conn.commit()
    conn.close()
    disk = SessionDisk(path)
    assert disk.recovered_from is None and [s.client_id for s in disk.load()] == ["keep"]
    assert disk.load_outbox(10, 10).streams == []


@pytest.mark.parametrize("sql", [
    "UPDATE outbox_streams SET acked = next_seq",  # acknowledged beyond what was numbered
    "UPDATE outbox_entries SET topic = 'a/+/b'",  # a filter is no topic
    "UPDATE outbox_entries SET qos = 0",
    "UPDATE outbox_entries SET payload = 'text'",
    "UPDATE outbox_entries SET properties = x'c1'",
    "UPDATE outbox_seqs SET seq = 1000",  # beyond the stream's next number
    "UPDATE outbox_seqs SET dest = 'nobody'",
    "INSERT INTO outbox_entries VALUES (100, 't', x'00', 1, 1, NULL, 0), (101, 't', x'00', 1, 1, NULL, 0)",
    "INSERT INTO outbox_interest VALUES ('A', x'fe93')",  # not a declaration
])
def test_a_hostile_outbox_row_refuses_the_whole_outbox(tmp_path: Path, sql: str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / FILE_NAME
    outbox, persistence = _outbox_through_disk(path)
    from zmesh.mesh.streamwire import StreamEntry

    for _n in range(3):
        outbox.append(StreamEntry("t/x", b"m", 1, 1, None), ["A" * 40], 0.0)
    persistence.close()
    conn = sqlite3.connect(path)
    conn.execute(sql)
    conn.commit()
    conn.close()
    disk = SessionDisk(path)
    with caplog.at_level(logging.ERROR):
        stored = disk.load_outbox(4, 10)
    assert stored.streams == [] and stored.entries == []
    assert "stored outbox was refused" in caplog.text and str(path) in caplog.text
    assert disk.load_outbox(4, 10).streams == []  # discarded: the next start finds nothing
