"""The retained store on SQLite: round trips, no plaintext at rest, keys (wrong, missing,
rotated), corruption moved aside, and writes that survive SIGKILL."""

from __future__ import annotations

import base64
import logging
import multiprocessing
import os
import signal
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from zmesh.retained.lastvalue import RetainedEntry
from zmesh.retained.store import RetainedStore, StoredEntry, StoreError, WrongKeyError
from zmesh.security.keys import Sealer

K1, K2 = os.urandom(32), os.urandom(32)
ID1, ID2 = Sealer(K1).key_id.hex(), Sealer(K2).key_id.hex()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "retained.db"


@pytest.fixture
def stores() -> Iterator[list[RetainedStore]]:
    """Stores opened by a test, closed afterwards even when it fails."""
    opened: list[RetainedStore] = []
    yield opened
    for store in opened:
        store.close()


def entry(topic: str, payload: bytes = b"v", **kw: Any) -> StoredEntry:
    return StoredEntry(
        topic, payload, kw.pop("qos", 1), kw.pop("origin", "n1"), kw.pop("ts", 7), **kw
    )


def sample() -> list[StoredEntry]:
    return [
        entry("a/b", b"91%", qos=0, ts=5 << 16),
        entry(
            "a/c",
            b"\x00\xff" * 100,
            qos=2,
            origin="n2",
            properties={
                "content_type": "text/plain",
                "correlation_data": b"\x01\x02",
                "user_property": [["k", "v"], ["k", "w"]],
                "message_expiry_interval": 60,
            },
            expires_at=1_900_000_000_000,
        ),
        entry("a/deleted", b"", ts=9),  # tombstone
        entry("café/温度", b"unicode topic"),
    ]


def by_topic(entries: list[StoredEntry]) -> dict[str, StoredEntry]:
    return {e.topic: e for e in entries}


def raw_rows(path: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT topic, key_id, body FROM retained ORDER BY topic").fetchall()
    finally:
        conn.close()


def file_bytes(path: Path) -> bytes:
    """The database, its WAL and its shm, exactly as on disk."""
    parts = [Path(f"{path}{suffix}") for suffix in ("", "-wal", "-shm")]
    return b"".join(p.read_bytes() for p in parts if p.exists())


def forms(marker: bytes) -> list[bytes]:
    return [marker, marker.hex().encode(), base64.b64encode(marker)]


def found(markers: list[bytes], data: bytes) -> list[bytes]:
    return [m for m in markers if any(f in data for f in forms(m))]


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "zmesh.store" and r.levelno >= logging.ERROR
    ]


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("key", [None, K1], ids=["plain", "encrypted"])
def test_round_trip_upsert_delete_and_reopen(
    db: Path, key: bytes | None, stores: list[RetainedStore]
) -> None:
    store = RetainedStore(db, key=key)
    stores.append(store)
    assert store.encrypted is (key is not None) and not store.needs_reencrypt
    assert store.recovered_from is None and store.load() == []
    store.put_many(sample())
    assert by_topic(store.load()) == by_topic(sample())

    newer = entry("a/b", b"92%", qos=1, origin="n3", ts=6 << 16, properties={"x": 1})
    store.put_many([newer, entry("a/new", b"1")])
    loaded = by_topic(store.load())
    assert loaded["a/b"] == newer and len(loaded) == 5  # replaced, not duplicated

    store.delete_many(["a/deleted", "a/new", "never/there"])
    store.put_many([])
    store.delete_many([])
    store.close()
    store.close()  # idempotent

    again = RetainedStore(db, key=key)
    stores.append(again)
    expected = by_topic(sample())
    expected["a/b"] = newer
    del expected["a/deleted"]
    assert by_topic(again.load()) == expected


def test_files_are_private_and_rows_hold_only_the_agreed_plaintext(
    db: Path, stores: list[RetainedStore]
) -> None:
    store = RetainedStore(db, key=K1)
    stores.append(store)
    store.put_many(sample())
    for suffix in ("", "-wal", "-shm", ".lock"):
        assert stat.S_IMODE(Path(f"{db}{suffix}").stat().st_mode) == 0o600, suffix
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    conn = sqlite3.connect(db)
    columns = [row[1] for row in conn.execute("PRAGMA table_info(retained)")]
    assert columns == ["topic", "qos", "origin", "ts", "expires_at", "key_id", "body"]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    for topic, key_id, body in raw_rows(db):
        assert key_id == Sealer(K1).key_id
        assert Sealer(K1).open(body, topic.encode())  # sealed with the topic as AAD


def test_put_many_takes_retained_entries_as_they_are(db: Path, stores: list[RetainedStore]) -> None:
    store = RetainedStore(db)
    stores.append(store)
    store.put_many([RetainedEntry("t", b"p", 1, "n1", 3, {"a": "b"}, 99)])
    assert store.load() == [StoredEntry("t", b"p", 1, "n1", 3, {"a": "b"}, 99)]


def test_bad_arguments(db: Path) -> None:
    with pytest.raises(ValueError, match="sync"):
        RetainedStore(db, sync="sometimes")
    with pytest.raises(ValueError, match="current key"):
        RetainedStore(db, previous_keys=[K1])
    with pytest.raises(ValueError, match="32 bytes"):
        RetainedStore(db, key=b"short")


def test_a_second_store_on_the_same_file_is_refused(db: Path, stores: list[RetainedStore]) -> None:
    first = RetainedStore(db)
    stores.append(first)
    first.put_many([entry("t")])
    with pytest.raises(StoreError, match="in use by another") as info:
        RetainedStore(db)
    assert str(db) in str(info.value)
    assert db.exists() and first.recovered_from is None  # nothing moved aside
    first.close()
    second = RetainedStore(db)
    stores.append(second)
    assert second.load() == [entry("t")]


# ---------------------------------------------------------------------------- at rest


def marked_entries(count: int = 20) -> tuple[list[StoredEntry], list[bytes]]:
    """Entries whose payloads and properties carry distinctive random markers."""
    entries, markers = [], []
    for i in range(count):
        payload, correlation, traced = os.urandom(32), os.urandom(32), os.urandom(32)
        markers += [payload, correlation, traced]
        entries.append(
            entry(
                f"m/{i}",
                payload,
                properties={
                    "correlation_data": correlation,
                    "user_property": [["t", traced.hex()]],
                },
            )
        )
    return entries, markers


@pytest.mark.parametrize("key", [None, K1], ids=["plain-control", "encrypted"])
def test_no_plaintext_at_rest_in_the_file_or_its_wal(
    db: Path, key: bytes | None, stores: list[RetainedStore]
) -> None:
    entries, markers = marked_entries()
    store = RetainedStore(db, key=key)
    stores.append(store)
    store.put_many(entries)
    assert Path(f"{db}-wal").stat().st_size > 0  # committed, not yet checkpointed
    while_open = file_bytes(db)
    store.close()
    after_close = file_bytes(db)
    if key is None:
        # The control: the same check does see payloads and properties when they are there.
        assert found(markers, while_open) == markers
        assert found(markers, after_close) == markers
    else:
        assert found(markers, while_open) == []
        assert found(markers, after_close) == []
        assert b"m/3" in after_close  # topics are plaintext, by design


# ---------------------------------------------------------------------------- keys


def assert_names_no_key(exc: BaseException) -> None:
    text = str(exc)
    for key in (K1, K2):
        for form in forms(key):
            assert form.decode("latin-1") not in text


def test_a_wrong_key_fails_at_open_naming_the_path_and_key_id(
    db: Path, stores: list[RetainedStore]
) -> None:
    with RetainedStore(db, key=K1) as store:
        store.put_many(sample())
    with pytest.raises(WrongKeyError) as info:
        RetainedStore(db, key=K2)
    message = str(info.value)
    assert message.startswith(f"{db}: ") and ID1 in message and ID2 not in message
    assert "store.key_file" in message and "store.previous_key_files" in message
    assert_names_no_key(info.value)
    with pytest.raises(WrongKeyError):  # an unrelated previous key does not help
        RetainedStore(db, key=K2, previous_keys=[os.urandom(32)])
    # Refusing moved nothing and lost nothing: the right key still reads everything.
    store = RetainedStore(db, key=K1)
    stores.append(store)
    assert store.recovered_from is None and by_topic(store.load()) == by_topic(sample())


def test_an_encrypted_store_without_a_key_is_a_clear_error(db: Path) -> None:
    with RetainedStore(db, key=K1) as store:
        store.put_many(sample())
    with pytest.raises(StoreError, match="is encrypted.*configure store.key_file") as info:
        RetainedStore(db)
    assert type(info.value) is StoreError and str(db) in str(info.value)
    assert_names_no_key(info.value)
    assert db.exists()


def test_rotation_reads_old_rows_reencrypts_them_and_retires_the_old_key(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = [entry(f"r/{i}", os.urandom(16)) for i in range(2500)]
    with RetainedStore(db, key=K1) as store:
        store.put_many(old)
    with RetainedStore(db, key=K2, previous_keys=[K1]) as store:
        assert store.needs_reencrypt
        assert by_topic(store.load()) == by_topic(old)
        store.put_many([entry("r/new", b"under K2")])
        counts = []
        while count := store.reencrypt_batch(limit=1000):
            counts.append(count)
        assert counts == [1000, 1000, 500] and not store.needs_reencrypt
        assert store.reencrypt_batch() == 0
        assert {key_id for _, key_id, _ in raw_rows(db)} == {Sealer(K2).key_id}
    expected = by_topic([*old, entry("r/new", b"under K2")])
    with RetainedStore(db, key=K2) as store:
        assert by_topic(store.load()) == expected
    with pytest.raises(WrongKeyError, match=ID2):
        RetainedStore(db, key=K1)
    assert errors(caplog) == []


def test_writes_during_reencryption_from_another_thread_are_never_clobbered(db: Path) -> None:
    # The re-encryption pass reads a row and writes it back re-sealed; a put_many landing in
    # between must win. Callers use asyncio.to_thread, so calls do come from two threads.
    with RetainedStore(db, key=K1) as store:
        store.put_many([entry(f"r/{i}", b"old") for i in range(3000)])
    expected = {f"r/{i}": b"old" for i in range(3000)}
    with RetainedStore(db, key=K2, previous_keys=[K1]) as store:
        failures: list[BaseException] = []

        def reencrypt() -> None:
            try:
                while store.reencrypt_batch(limit=50):
                    pass
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                failures.append(exc)

        worker = threading.Thread(target=reencrypt)
        worker.start()
        for round_ in range(300):
            batch = [
                entry(f"r/{(round_ * 37 + j * 101) % 3000}", b"new %d" % round_) for j in range(5)
            ]
            store.put_many(batch)
            expected.update((e.topic, e.payload) for e in batch)
        worker.join(30)
        assert not failures and not store.needs_reencrypt
        assert {e.topic: e.payload for e in store.load()} == expected
    with RetainedStore(db, key=K2) as store:
        assert {e.topic: e.payload for e in store.load()} == expected


def test_rolling_back_mid_rotation_is_refused_not_half_read(db: Path) -> None:
    rows = [entry(f"r/{i}", os.urandom(8)) for i in range(50)]
    with RetainedStore(db, key=K1) as store:
        store.put_many(rows)
    with RetainedStore(db, key=K2, previous_keys=[K1]) as store:
        assert store.reencrypt_batch(limit=10) == 10  # interrupted: 40 rows still under K1
    with pytest.raises(WrongKeyError, match=ID2):
        RetainedStore(db, key=K1)  # the old key alone would miss the re-sealed rows
    with pytest.raises(WrongKeyError, match=ID1):
        RetainedStore(db, key=K2)  # the new key alone would miss the others
    with RetainedStore(db, key=K2, previous_keys=[K1]) as store:
        assert by_topic(store.load()) == by_topic(rows)
        while store.reencrypt_batch(limit=7):
            pass
    with RetainedStore(db, key=K2) as store:
        assert by_topic(store.load()) == by_topic(rows)


def test_turning_encryption_on_leaves_no_plaintext_page_behind(
    db: Path, stores: list[RetainedStore]
) -> None:
    entries, markers = marked_entries(300)
    big = os.urandom(32)  # in a payload that spills onto overflow pages
    entries.append(entry("m/big", os.urandom(5000) + big + os.urandom(5000)))
    markers.append(big)
    with RetainedStore(db) as store:
        store.put_many(entries)
    # Rows collected while the store was plaintext, by an SQLite built without secure_delete
    # (Debian turns it on, many builds do not): whole pages of them go to the free list with
    # their bytes intact.
    collected = {f"m/{i}" for i in range(100, 200)} | {"m/big"}
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA secure_delete = OFF")
    conn.executemany("DELETE FROM retained WHERE topic = ?", [(t,) for t in collected])
    conn.commit()
    conn.close()
    kept = [e for e in entries if e.topic not in collected]
    gone, live = markers[300:600] + [big], markers[:300] + markers[600:900]
    on_disk = file_bytes(db)
    assert found(live, on_disk) == live
    assert found(gone, on_disk)  # deleted, not erased: what the VACUUM is for

    store = RetainedStore(db, key=K1)
    stores.append(store)
    assert store.encrypted and store.needs_reencrypt
    assert by_topic(store.load()) == by_topic(kept)  # readable while still plaintext
    total = 0
    while count := store.reencrypt_batch(limit=64):
        total += count
    assert total == len(kept) == 200
    # Checked while the store is still open: VACUUM and a truncating checkpoint have already
    # removed the old pages from the file, its free list and the WAL.
    assert found(markers, file_bytes(db)) == []
    assert by_topic(store.load()) == by_topic(kept)
    store.close()
    assert found(markers, file_bytes(db)) == []
    with pytest.raises(StoreError, match="is encrypted"):
        RetainedStore(db)


# ---------------------------------------------------------------------------- corruption


def reopen_after(db: Path, caplog: pytest.LogCaptureFixture) -> RetainedStore:
    with caplog.at_level(logging.ERROR, logger="zmesh.store"):
        store = RetainedStore(db, key=K1)
    assert store.load() == []
    moved = store.recovered_from
    assert moved is not None and moved.exists() and moved.name.startswith(f"{db.name}.corrupt-")
    assert any("UNREADABLE" in m and str(moved) in m for m in errors(caplog))
    # The fresh store works and keeps what it is given.
    store.put_many([entry("after", b"ok")])
    store.close()
    with RetainedStore(db, key=K1) as again:
        assert again.recovered_from is None and again.load() == [entry("after", b"ok")]
    return store


def test_garbage_file_and_wal_are_moved_aside(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    db.parent.mkdir(parents=True)
    garbage = os.urandom(8192)
    db.write_bytes(garbage)
    Path(f"{db}-wal").write_bytes(os.urandom(1000))
    store = reopen_after(db, caplog)
    assert store.recovered_from is not None
    assert store.recovered_from.read_bytes() == garbage
    assert Path(f"{store.recovered_from}-wal").exists()  # kept beside it, for forensics


@pytest.mark.parametrize("fraction", [0.5, 0.01], ids=["half", "header-only"])
def test_a_truncated_store_is_moved_aside(
    db: Path, fraction: float, caplog: pytest.LogCaptureFixture
) -> None:
    with RetainedStore(db, key=K1) as store:
        store.put_many([entry(f"t/{i}", os.urandom(300)) for i in range(400)])
    size = db.stat().st_size
    os.truncate(db, int(size * fraction))
    reopen_after(db, caplog)


def test_a_store_from_a_newer_version_is_moved_aside_not_misread(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with RetainedStore(db, key=K1) as store:
        store.put_many(sample())
    conn = sqlite3.connect(db)
    conn.execute("UPDATE meta SET value = 99 WHERE name = 'schema_version'")
    conn.commit()
    conn.close()
    reopen_after(db, caplog)
    assert any("newer zmesh" in m for m in errors(caplog))


def tamper(db: Path, sql: str, *params: Any) -> None:
    conn = sqlite3.connect(db)
    conn.execute(sql, params)
    conn.commit()
    conn.close()


def test_unreadable_rows_are_skipped_counted_and_logged_never_returned(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = [entry(f"ok/{i}", os.urandom(20)) for i in range(5)]
    victims = ["bad/flipped", "bad/copied", "bad/unknown-key", "bad/origin", "bad/ts"]
    with RetainedStore(db, key=K1) as store:
        store.put_many(good + [entry(t, b"secret") for t in victims])
    rows = {topic: body for topic, _, body in raw_rows(db)}
    flipped = bytearray(rows["bad/flipped"])
    flipped[20] ^= 1
    tamper(db, "UPDATE retained SET body = ? WHERE topic = 'bad/flipped'", bytes(flipped))
    tamper(db, "UPDATE retained SET body = ? WHERE topic = 'bad/copied'", rows["ok/0"])
    tamper(db, "UPDATE retained SET key_id = x'0011223344556677' WHERE topic = 'bad/unknown-key'")
    tamper(db, "UPDATE retained SET origin = CAST(x'c328' AS TEXT) WHERE topic = 'bad/origin'")
    tamper(db, "UPDATE retained SET ts = 'soon' WHERE topic = 'bad/ts'")

    with caplog.at_level(logging.ERROR, logger="zmesh.store"):
        store = RetainedStore(db, key=K1)
        assert store.recovered_from is None  # rows, not the file, are damaged
        assert by_topic(store.load()) == by_topic(good)
        assert store.unreadable_rows_total == 5
        assert by_topic(store.load()) == by_topic(good)  # and again: still never raises
        assert store.unreadable_rows_total == 10
    assert any("5 retained message(s)" in m and "'bad/copied'" in m for m in errors(caplog))
    assert all("secret" not in m for m in errors(caplog))
    store.close()


def test_reencrypt_drops_rows_no_key_opens(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    with RetainedStore(db) as store:
        store.put_many([entry("ok", b"1"), entry("bad", b"2")])
    tamper(db, "UPDATE retained SET body = x'c1c1c1' WHERE topic = 'bad'")  # not msgpack
    with caplog.at_level(logging.ERROR, logger="zmesh.store"), RetainedStore(db, key=K1) as store:
        assert store.load() == [entry("ok", b"1")]
        while store.reencrypt_batch():
            pass
        assert [t for t, _, _ in raw_rows(db)] == ["ok"]
        assert store.unreadable_rows_total == 2  # once by load, once by re-encryption
    with RetainedStore(db, key=K1) as store:
        assert store.load() == [entry("ok", b"1")] and store.unreadable_rows_total == 0


class _FailingConnection:
    """Stands in for the store's connection: the next execute raises ``error``."""

    def __init__(self, real: Any, name: str) -> None:
        self.real = real
        self.error = sqlite3.DatabaseError(f"injected {name}")
        self.error.sqlite_errorname = name

    def execute(self, *args: Any) -> Any:
        raise self.error

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_corruption_found_later_is_moved_aside_and_the_write_still_lands(
    db: Path, caplog: pytest.LogCaptureFixture, stores: list[RetainedStore]
) -> None:
    store = RetainedStore(db, key=K1)
    stores.append(store)
    store.put_many(sample())
    store._conn = _FailingConnection(store._conn, "SQLITE_CORRUPT")  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR, logger="zmesh.store"):
        assert store.load() == []  # never raises: moved aside, fresh and empty
    assert store.recovered_from is not None and store.recovered_from.exists()

    store._conn = _FailingConnection(store._conn, "SQLITE_CORRUPT")  # type: ignore[assignment]
    first_move = store.recovered_from
    store.put_many([entry("kept", b"acked")])  # lands in the fresh store: safe to acknowledge
    assert store.recovered_from != first_move
    assert store.load() == [entry("kept", b"acked")]
    assert len(errors(caplog)) == 2


def test_other_sqlite_errors_raise_store_error_and_move_nothing(
    db: Path, stores: list[RetainedStore]
) -> None:
    store = RetainedStore(db)
    stores.append(store)
    store.put_many([entry("t")])
    real = store._conn
    store._conn = _FailingConnection(real, "SQLITE_FULL")  # type: ignore[assignment]
    with pytest.raises(StoreError, match="put_many failed") as info:
        store.put_many([entry("u")])  # the caller must not acknowledge this one
    assert str(db) in str(info.value)
    store._conn = real
    assert store.recovered_from is None and store.load() == [entry("t")]


# ---------------------------------------------------------------------------- durability


def _write_then_die(directory: str, key: bytes) -> None:
    """Child process: write to an "always" (encrypted) and an "interval" store, then SIGKILL
    itself the moment put_many returns (no close, no atexit, no flush)."""
    for sync, store_key in (("always", key), ("interval", None)):
        store = RetainedStore(Path(directory) / f"{sync}.db", key=store_key, sync=sync)
        store.put_many([entry(f"{sync}/{i}", str(i).encode()) for i in range(100)])
    os.kill(os.getpid(), signal.SIGKILL)


def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=_write_then_die, args=(str(tmp_path), K1))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    assert Path(f"{tmp_path}/always.db-wal").exists()  # it really died with the store open
    for sync, key in (("always", K1), ("interval", None)):
        with RetainedStore(tmp_path / f"{sync}.db", key=key) as store:
            assert store.recovered_from is None
            assert by_topic(store.load()) == {
                f"{sync}/{i}": entry(f"{sync}/{i}", str(i).encode()) for i in range(100)
            }


@pytest.mark.parametrize("sync, level", [("always", 2), ("interval", 1)])
def test_sync_mode_sets_sqlite_synchronous(
    db: Path, sync: str, level: int, stores: list[RetainedStore]
) -> None:
    store = RetainedStore(db, sync=sync)
    stores.append(store)
    assert store._conn is not None
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == level  # FULL / NORMAL
    store.put_many([entry("t")])
    store.flush()  # the interval's checkpoint: fsyncs what "interval" commits did not
    assert store.load() == [entry("t")]
