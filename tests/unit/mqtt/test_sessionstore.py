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
