"""Durable retained state: one SQLite database (WAL) in the node's data dir.

The in-memory ``RetainedCache`` stays the authority; this module mirrors it to disk so that
a node restarts with what it had. Promises, each backed by a test:

* Durability. ``put_many`` commits one transaction before it returns (tests kill a writer
  with SIGKILL; fsync itself they can only check as SQLite's setting). With
  ``sync="always"`` (``synchronous=FULL``) the commit is fsynced, so an acknowledged write
  survives SIGKILL and power loss. With ``sync="interval"`` (``synchronous=NORMAL``) a
  commit reaches the WAL file but is not fsynced: it still survives SIGKILL (the OS holds
  the data), but a power cut or kernel crash may lose what was committed since the last
  ``flush()``, which the caller runs once per interval.
* Encryption at rest. With a key, each row's payload and properties are sealed with
  AES-256-GCM (``zmesh.security.keys.Sealer``) with the topic as associated data, so a body copied
  onto another topic does not open. Only topic, QoS, origin, timestamp and expiry are
  stored in plaintext: they are what ordering and expiry need without a key.
* A wrong key fails at open, before any row is read: the ``meta`` table holds, for every
  key that may have sealed a row, a key-check blob (a constant sealed with that key). Each
  must be opened by a configured key (current or previous) or the open raises
  ``WrongKeyError``; no garbage is ever delivered.
* Rotation and turning encryption on are the same operation: open with the new key (and
  the old one in ``previous_keys``); rows still under another key (or plaintext) stay
  readable, and ``reencrypt_batch`` re-seals them in the background. When the last row is
  done, the other keys' checks are dropped and the file is vacuumed and its WAL truncated,
  so no page of old plaintext or old-key ciphertext lingers in the files. (The filesystem
  may still hold the freed blocks; only full-disk encryption covers those.)
* A corrupt or unreadable store is moved aside (``<path>.corrupt-<UTC time>``, with its
  ``-wal`` and ``-shm``), logged as an error, and replaced by an empty store: peers refill
  it. That holds at open and later: corruption found by any call is handled the same way,
  so the node never crashes on its store. A single row that will not decrypt or decode is
  skipped and counted (``unreadable_rows_total``), never returned.
* The store refuses to start only for what an operator must fix: a wrong or missing key,
  another process using the same store, or a data dir where no store can be created.

Threads: the connection is opened with ``check_same_thread=False`` so that one worker
thread off the event loop can own it; calls are serialised by an internal lock (a put_many
waits for a running reencrypt_batch), so the caller should still make them from a single
worker rather than expect parallelism. Crypto and encoding for ``put_many`` run before the
lock is taken.
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgpack

from zmesh.security.keys import Sealer, SealError, sealers_for

log = logging.getLogger("zmesh.store")

SCHEMA_VERSION = 1
_SQLITE_MAGIC = b"SQLite format 3\x00"
SYNC_MODES = ("always", "interval")

_T = TypeVar("_T")

_RETAINED_COLUMNS = ("topic", "qos", "origin", "ts", "expires_at", "key_id", "body")
_SCHEMA = (
    "CREATE TABLE meta(name TEXT PRIMARY KEY, value)",
    "CREATE TABLE retained("
    " topic TEXT PRIMARY KEY, qos INT NOT NULL, origin TEXT NOT NULL, ts INT NOT NULL,"
    " expires_at INT NULL, key_id BLOB NULL, body BLOB NOT NULL)",
)
# Text columns come out as their UTF-8 bytes: a damaged row's text must fail that row in
# _decode, not the whole query (sqlite3 raises on invalid UTF-8 in text mid-iteration), and
# the topic's bytes are exactly the associated data a sealed body needs.
_SELECT_ROWS = (
    "SELECT CAST(topic AS BLOB), qos, CAST(origin AS BLOB), ts, expires_at, key_id, body"
    " FROM retained"
)
_UPSERT = (
    "INSERT INTO retained(topic, qos, origin, ts, expires_at, key_id, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT(topic) DO UPDATE SET qos = excluded.qos, origin = excluded.origin,"
    " ts = excluded.ts, expires_at = excluded.expires_at, key_id = excluded.key_id,"
    " body = excluded.body"
)

# meta rows: "schema_version" -> int; "key_check:<key id hex>" -> a sealed constant.
_KEY_CHECK_PREFIX = "key_check:"
_KEY_CHECK_PLAINTEXT = b"zmesh retained store: key check"
_KEY_CHECK_AAD = b"zmesh-store-meta:key-check"

# SQLite errors that say "another process holds it" or "the machine is short of something":
# moving the file aside would not help and could destroy a live store. All others at open
# (not a database, corrupt, cannot open, I/O error, read-only) mean "this file is unusable".
_TRANSIENT = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_NOMEM", "SQLITE_INTERRUPT")

# How many unreadable topics one log line names; the count is always complete.
_LOG_TOPICS = 5
# Below every rowid SQLite hands out (they start at 1; only an explicit insert goes lower).
_FIRST_ROWID = -(1 << 63)


class StoreError(Exception):
    """The store cannot be used as configured. Messages name the file, never key material."""


class WrongKeyError(StoreError):
    """The store was sealed with a key that is not configured (neither current nor previous)."""


class _Unusable(Exception):
    """Internal: the file at the store's path is corrupt or unreadable; move it aside."""


@dataclass(frozen=True, slots=True)
class StoredEntry:
    topic: str
    payload: bytes  # empty: tombstone (kept, so a stale copy cannot resurrect the value)
    qos: int
    origin: str
    timestamp: int  # hybrid logical clock
    properties: dict[str, Any] | None = None
    expires_at: int | None = None  # wall clock ms, None: never


class EntryLike(Protocol):
    """What put_many reads: a StoredEntry, or the cache's RetainedEntry as it is."""

    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def qos(self) -> int: ...
    @property
    def origin(self) -> str: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def properties(self) -> dict[str, Any] | None: ...
    @property
    def expires_at(self) -> int | None: ...


def _is_transient(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorname", "").startswith(_TRANSIENT)


def _is_corruption(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "")
    return name.startswith("SQLITE_CORRUPT") or name == "SQLITE_NOTADB"


def _fsync_dir(directory: Path) -> None:
    # A rename is durable only once its directory is; best effort (some filesystems refuse).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RetainedStore:
    """Retained entries on SQLite; see the module docstring for what it promises."""

    def __init__(
        self,
        path: Path,
        *,
        key: bytes | None = None,
        previous_keys: Sequence[bytes] = (),
        sync: str = "always",
    ) -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"store sync must be one of {', '.join(SYNC_MODES)}, not {sync!r}")
        self.path = Path(path)
        self.sync = sync
        self._sealer, self._sealers = sealers_for(key, previous_keys)
        self.encrypted = self._sealer is not None
        self.recovered_from: Path | None = None
        self.unreadable_rows_total = 0
        self.needs_reencrypt = False
        # rowid cursor of the re-encryption pass: rows at or below it are under the current key
        self._reencrypt_after = _FIRST_ROWID
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._lock_fd = self._take_file_lock()
        try:
            self._conn = self._open()
        except BaseException:
            os.close(self._lock_fd)
            raise

    # ------------------------------------------------------------------------ opening

    def _take_file_lock(self) -> int:
        """Exclusive for this store's lifetime: two nodes pointed at one data dir would
        interleave writes and each move the other's file aside."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(
                f"{self.path}: cannot create the store's lock file: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreError(
                f"{self.path}: in use by another zmesh node (it holds {self.path}.lock); "
                "each node needs its own data_dir"
            ) from None
        return fd

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except _Unusable as exc:
            reason = str(exc)
        moved = self._move_aside(reason)
        try:
            conn = self._connect()
        except _Unusable as exc:
            raise StoreError(f"{self.path}: cannot create a fresh store: {exc}") from None
        self.recovered_from = moved
        return conn

    def _connect(self) -> sqlite3.Connection:
        """Open, check and prepare the database; _Unusable if the file is not a usable
        store. Key problems raise StoreError: the file is fine, the configuration is not."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise _Unusable(f"cannot stat: {exc.strerror}") from None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise _Unusable("not a regular file")
        if st is not None and st.st_size:
            # Checked before SQLite sees the file: on closing a file that is not a database
            # SQLite deletes the -wal beside it, which we want to keep with the moved file.
            try:
                with open(self.path, "rb") as f:
                    magic = f.read(len(_SQLITE_MAGIC))
            except OSError as exc:
                raise _Unusable(f"cannot read: {exc.strerror}") from None
            if magic != _SQLITE_MAGIC:
                raise _Unusable("not an SQLite database")
        if st is None:
            # Created here so it is 0600 from the first instant; SQLite gives its -wal and
            # -shm files the mode of the database file.
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except OSError as exc:
                raise StoreError(f"{self.path}: cannot create store: {exc.strerror}") from None
        conn: sqlite3.Connection | None = None
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is
            # exactly one call's work and nothing is left open between calls.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._prepare(conn)
            return conn
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            if _is_transient(exc):
                raise StoreError(f"{self.path}: cannot open store: {exc}") from None
            raise _Unusable(str(exc)) from None
        except BaseException:
            if conn is not None:
                conn.close()
            raise

    def _prepare(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            # Still correct (FULL sync with a rollback journal is durable), only slower.
            log.warning("%s: SQLite refused WAL mode (journal_mode=%s)", self.path, mode)
        conn.execute(f"PRAGMA synchronous={'FULL' if self.sync == 'always' else 'NORMAL'}")
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise _Unusable(f"integrity check failed: {'; '.join(map(str, problems[:3]))}")
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if "meta" not in tables and "retained" not in tables:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
        else:
            self._check_schema(conn, tables)
        self._check_keys(conn)

    def _check_schema(self, conn: sqlite3.Connection, tables: set[str]) -> None:
        if "meta" not in tables or "retained" not in tables:
            raise _Unusable("schema incomplete (meta or retained table missing)")
        row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        version = row[0] if row else None
        if type(version) is not int:
            raise _Unusable("no schema version")
        if version != SCHEMA_VERSION:
            # Moved aside, not deleted: after an upgrade it can be put back by hand.
            newer = "a newer" if version > SCHEMA_VERSION else "an older"
            raise _Unusable(
                f"written by {newer} zmesh (schema {version}; this one reads {SCHEMA_VERSION})"
            )
        columns = tuple(row[1] for row in conn.execute("PRAGMA table_info(retained)"))
        if columns != _RETAINED_COLUMNS:
            raise _Unusable(f"retained table has columns {columns}")

    def _check_keys(self, conn: sqlite3.Connection) -> None:
        checks: dict[bytes, bytes] = {}
        for name, value in conn.execute(
            "SELECT name, value FROM meta WHERE name GLOB ?", (_KEY_CHECK_PREFIX + "*",)
        ):
            try:
                key_id = bytes.fromhex(name[len(_KEY_CHECK_PREFIX) :])
            except ValueError:
                raise _Unusable("meta table holds a malformed key check") from None
            if type(value) is not bytes:
                raise _Unusable("meta table holds a malformed key check")
            checks[key_id] = value
        ids = ", ".join(sorted(k.hex() for k in checks))
        if checks and self._sealer is None:
            raise StoreError(
                f"{self.path}: the retained store is encrypted (key id {ids}); "
                "configure store.key_file"
            )
        missing = sorted(k.hex() for k in checks if k not in self._sealers)
        if missing:
            several = len(missing) > 1
            raise WrongKeyError(
                f"{self.path}: the stored retained messages were encrypted with another key "
                f"(key id{'s' if several else ''} {', '.join(missing)}); configure "
                f"{'those keys' if several else 'that key'} as store.key_file or "
                "store.previous_key_files"
            )
        for key_id, blob in checks.items():
            try:
                ok = self._sealers[key_id].open(blob, _KEY_CHECK_AAD) == _KEY_CHECK_PLAINTEXT
            except SealError:
                ok = False
            if not ok:
                # The key's id matches but its check does not open: the meta row was altered.
                raise _Unusable(f"key check for key id {key_id.hex()} does not open")
        if self._sealer is None:
            return
        current = self._sealer.key_id
        if current not in checks:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO meta VALUES (?, ?)",
                (
                    _KEY_CHECK_PREFIX + current.hex(),
                    self._sealer.seal(_KEY_CHECK_PLAINTEXT, _KEY_CHECK_AAD),
                ),
            )
            conn.execute("COMMIT")
        stale_row = conn.execute(
            "SELECT 1 FROM retained WHERE key_id IS NOT ? LIMIT 1", (current,)
        ).fetchone()
        self.needs_reencrypt = stale_row is not None or any(k != current for k in checks)
        if self.needs_reencrypt:
            log.info(
                "%s: some retained messages are not under the current key (id %s); "
                "re-encrypting them in the background",
                self.path,
                current.hex(),
            )

    def _move_aside(self, reason: str) -> Path:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        target = Path(f"{self.path}.corrupt-{stamp}")
        n = 0
        while any(Path(f"{target}{s}").exists() for s in ("", "-wal", "-shm")):
            n += 1
            target = Path(f"{self.path}.corrupt-{stamp}-{n}")
        try:
            # WAL and shm first: a fresh database must never find the old WAL next to it
            # (SQLite would replay it into the new file).
            for suffix in ("-wal", "-shm", ""):
                source = Path(f"{self.path}{suffix}")
                if source.exists() or source.is_symlink():
                    os.replace(source, f"{target}{suffix}")
        except OSError as exc:
            raise StoreError(
                f"{self.path}: store is unreadable ({reason}) and cannot be moved aside: "
                f"{exc.strerror}"
            ) from None
        _fsync_dir(self.path.parent)
        log.error(
            "%s: RETAINED STORE IS UNREADABLE (%s); moved it to %s and starting with an empty "
            "store. Retained messages will be refilled from peers; anything only this node "
            "had is in the moved file.",
            self.path,
            reason,
            target,
        )
        return target

    def _recover(self, reason: str) -> None:
        """Corruption found after open: the same treatment as at open. Lock held."""
        assert self._conn is not None
        try:
            self._conn.close()
        except sqlite3.Error:
            pass
        self._conn = None
        moved = self._move_aside(reason)
        try:
            self._conn = self._connect()
        except _Unusable as exc:
            raise StoreError(f"{self.path}: cannot create a fresh store: {exc}") from None
        self.recovered_from = moved
        self._reencrypt_after = _FIRST_ROWID
        self.needs_reencrypt = False

    # ------------------------------------------------------------------------ running

    def _run(self, what: str, work: Callable[[sqlite3.Connection], _T], on_recovered: _T) -> _T:
        """``work(conn)`` under the lock. Corruption: move aside, start fresh and return
        ``on_recovered``. Any other SQLite error: StoreError (the caller must not ack)."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError(f"{self.path}: store is closed")
            try:
                return work(conn)
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                if not _is_corruption(exc):
                    raise StoreError(f"{self.path}: {what} failed: {exc}") from None
                self._recover(f"{what}: {exc}")
                return on_recovered

    def _encode(self, entry: EntryLike) -> tuple[Any, ...]:
        try:
            body = msgpack.packb([entry.payload, entry.properties], use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise StoreError(
                f"{self.path}: cannot store retained message for {entry.topic!r}: {exc}"
            ) from None
        key_id = None
        if self._sealer is not None:
            key_id = self._sealer.key_id
            body = self._sealer.seal(body, entry.topic.encode())
        return (
            entry.topic,
            entry.qos,
            entry.origin,
            entry.timestamp,
            entry.expires_at,
            key_id,
            body,
        )

    def _plain_body(self, aad: bytes, key_id: Any, body: Any) -> bytes:
        """The msgpack body of a row, decrypted if sealed; ValueError if it will not open.
        ``aad`` is the topic's UTF-8 bytes as stored."""
        if type(body) is not bytes:
            raise ValueError("body is not a blob")
        if key_id is None:
            return body
        sealer = self._sealers.get(key_id) if type(key_id) is bytes else None
        if sealer is None:
            raise ValueError("sealed with an unknown key")
        try:
            return sealer.open(body, aad)
        except SealError:
            raise ValueError("does not decrypt") from None

    @staticmethod
    def _unpack(raw: bytes) -> tuple[bytes, dict[str, Any] | None]:
        try:
            value = msgpack.unpackb(raw, raw=False)
        except Exception:  # noqa: BLE001 - any undecodable body is just an unreadable row
            raise ValueError("body does not decode") from None
        if (
            type(value) is not list
            or len(value) != 2
            or type(value[0]) is not bytes
            or not (value[1] is None or type(value[1]) is dict)
        ):
            raise ValueError("body is not [payload, properties]")
        return value[0], value[1]

    def _decode(self, row: tuple[Any, ...]) -> StoredEntry:
        """One row of _SELECT_ROWS as an entry; ValueError if any part of it is damaged."""
        topic, qos, origin, ts, expires_at, key_id, body = row
        # INT affinity turns any number that is an integer into one, so a value in range is
        # an int; ts and expires_at can still hold text or a blob after damage.
        if (
            qos not in (0, 1, 2)
            or type(ts) is not int
            or (expires_at is not None and type(expires_at) is not int)
            or type(topic) is not bytes
            or type(origin) is not bytes
        ):
            raise ValueError("plaintext columns malformed")
        payload, properties = self._unpack(self._plain_body(topic, key_id, body))
        # decode() is strict: UnicodeDecodeError (a ValueError) if the text was damaged.
        return StoredEntry(
            topic.decode(), payload, qos, origin.decode(), ts, properties, expires_at
        )

    def _count_unreadable(self, topics: list[Any], action: str) -> None:
        self.unreadable_rows_total += len(topics)
        shown = ", ".join(
            repr(t.decode("utf-8", "replace") if type(t) is bytes else t)
            for t in topics[:_LOG_TOPICS]
        )
        more = f" and {len(topics) - _LOG_TOPICS} more" if len(topics) > _LOG_TOPICS else ""
        log.error(
            "%s: %d retained message(s) could not be decrypted or decoded (%s%s); %s. "
            "Peers will refill them.",
            self.path,
            len(topics),
            shown,
            more,
            action,
        )

    # ------------------------------------------------------------------------ public API

    def load(self) -> list[StoredEntry]:
        """Every row, tombstones and expired entries included, decrypted. A row that will
        not decrypt or decode is skipped, counted and logged; it is never returned."""

        def work(conn: sqlite3.Connection) -> list[StoredEntry]:
            entries: list[StoredEntry] = []
            bad: list[Any] = []
            decode = self._decode
            for row in conn.execute(_SELECT_ROWS):
                try:
                    entries.append(decode(row))
                except ValueError:
                    bad.append(row[0])
            if bad:
                self._count_unreadable(bad, "skipped them")
            return entries

        return self._run("load", work, [])

    def put_many(self, entries: Iterable[EntryLike]) -> None:
        """Upsert every entry in one transaction and commit before returning (fsynced with
        ``sync="always"``). Batching is the caller's: one call per group commit. Later
        entries for the same topic win; the store does not compare timestamps (the cache
        decided)."""
        rows = [self._encode(e) for e in entries]  # crypto outside the lock and transaction
        if not rows:
            return

        def work(conn: sqlite3.Connection) -> bool:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_UPSERT, rows)
            conn.execute("COMMIT")
            return True

        if not self._run("put_many", work, False):
            # The store was corrupt and is now fresh and empty: write this batch into it, so
            # what the caller is about to acknowledge is on disk.
            if not self._run("put_many", work, False):
                raise StoreError(f"{self.path}: put_many failed: the store was corrupt twice")

    def delete_many(self, topics: Iterable[str]) -> None:
        """Remove rows for good (tombstone collection, expiry), in one transaction."""
        params = [(t,) for t in topics]
        if not params:
            return

        def work(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("DELETE FROM retained WHERE topic = ?", params)
            conn.execute("COMMIT")

        self._run("delete_many", work, None)

    def flush(self) -> None:
        """Make every commit so far durable (a WAL checkpoint, which fsyncs). Needed only
        with ``sync="interval"``: call it once per interval."""
        self._run(
            "flush", lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall(), None
        )

    def reencrypt_batch(self, limit: int = 1000) -> int:
        """Re-seal up to ``limit`` rows that are not under the current key (plaintext rows
        included); returns how many rows it handled, 0 when there is nothing left.

        A row that no configured key opens is deleted (and counted): it could never be
        delivered. After the last row, the other keys' checks are dropped and the file is
        vacuumed and its WAL truncated, so no old page stays in the files; that pass holds
        the store (other calls wait) for about as long as copying the file twice."""
        if self._sealer is None or limit <= 0:
            return 0
        sealer = self._sealer

        def work(conn: sqlite3.Connection, again: bool = False) -> int:
            if not self.needs_reencrypt:
                return 0
            rows = conn.execute(
                "SELECT rowid, CAST(topic AS BLOB), key_id, body FROM retained"
                " WHERE rowid > ? AND key_id IS NOT ? ORDER BY rowid LIMIT ?",
                (self._reencrypt_after, sealer.key_id, limit),
            ).fetchall()
            updates: list[tuple[bytes, bytes, int]] = []
            bad: list[tuple[int, Any]] = []
            for rowid, topic, key_id, body in rows:
                try:
                    if type(topic) is not bytes:  # NULL: a rowid table's TEXT key allows it
                        raise ValueError("no topic")
                    raw = self._plain_body(topic, key_id, body)
                    self._unpack(raw)  # re-sealing garbage would only hide it
                    topic.decode()  # a damaged topic: likewise
                except ValueError:
                    bad.append((rowid, topic))
                    continue
                updates.append((sealer.key_id, sealer.seal(raw, topic), rowid))
            if rows:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    "UPDATE retained SET key_id = ?, body = ? WHERE rowid = ?", updates
                )
                conn.executemany("DELETE FROM retained WHERE rowid = ?", [(r,) for r, _ in bad])
                conn.execute("COMMIT")
                self._reencrypt_after = rows[-1][0]
            if bad:
                self._count_unreadable([t for _, t in bad], "deleted them while re-encrypting")
            if len(rows) < limit and not self._finish_reencrypt(conn, sealer) and not again:
                return work(conn, True)  # rows behind the cursor (cannot happen; one more pass)
            return len(rows)

        return self._run("reencrypt", work, 0)

    def _finish_reencrypt(self, conn: sqlite3.Connection, sealer: Sealer) -> bool:
        # New rows only ever get the current key and rowids above the cursor, so none can be
        # behind it; this count is the proof before the old keys' checks are dropped.
        left = conn.execute(
            "SELECT count(*) FROM retained WHERE key_id IS NOT ?", (sealer.key_id,)
        ).fetchone()[0]
        if left:
            self._reencrypt_after = _FIRST_ROWID  # start over; the next pass picks them up
            return False
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "DELETE FROM meta WHERE name GLOB ? AND name != ?",
            (_KEY_CHECK_PREFIX + "*", _KEY_CHECK_PREFIX + sealer.key_id.hex()),
        )
        conn.execute("COMMIT")
        # Old plaintext or old-key pages may sit in the WAL and on the free list: copy them
        # into the file, rebuild it from live rows only, then empty the WAL.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        conn.execute("VACUUM")
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        if busy:
            # Another connection (an operator's sqlite3 shell) is reading: the WAL keeps old
            # pages until a later checkpoint overwrites them.
            log.warning("%s: could not truncate the WAL after re-encrypting (busy)", self.path)
        self.needs_reencrypt = False
        self._reencrypt_after = _FIRST_ROWID
        log.info(
            "%s: every retained message is now under key id %s", self.path, sealer.key_id.hex()
        )
        return True

    def close(self) -> None:
        """Close the database (the last close checkpoints and removes the WAL) and release
        the store's lock. Idempotent."""
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except sqlite3.Error as exc:
                    log.warning("%s: closing the store: %s", self.path, exc)
                self._conn = None
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    def __enter__(self) -> RetainedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RetainedStore({str(self.path)!r}, encrypted={self.encrypted}, sync={self.sync!r})"
