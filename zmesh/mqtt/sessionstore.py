"""Persistent MQTT sessions on disk: ``<node.data_dir>/sessions.db`` (SQLite, WAL).

With ``node.data_dir`` set, every session that outlives its connection (MQTT 3.1.1 clean
session 0, MQTT 5 session expiry interval > 0) is mirrored here: its client id, protocol
level, expiry interval, owner (username), when its client went away (wall clock), its
subscriptions (filter and options, identifier included), the QoS 1/2 messages queued for
it, the ones in flight towards it (packet id, and for QoS 2 whether PUBREC came, i.e. the
PUBREL stage), and the packet ids of QoS 2 messages it sent us that wait for its PUBREL.
A small ``positions`` table keeps, per origin node, the receiver's stream position
``(epoch, delivered)`` (docs/delivery.md section 9), written in the same transactions as
the session changes the stream's messages made.

What is durable when (the write-ahead rule)
-------------------------------------------
Changes are coalesced in memory (``SessionPersistence``) and committed in ONE transaction
per event-loop turn (``call_soon``). Before a connection writes anything to its client in
a turn where changes are pending (``mqtt.server.Connection._flush_out``), the pending
changes are committed first. So nothing a client is told precedes the state it implies:

* PUBACK / PUBREC for a publish goes out after the messages it queued for persistent
  sessions on this node are committed (a QoS >= 1 message queued for an offline session
  is on disk before its publisher hears PUBACK), and PUBREC after the inbound QoS 2 packet
  id is (a resent PUBLISH after a restart is recognised as a duplicate);
* PUBCOMP after the packet id's removal (a reused id after a restart is a new message);
* a QoS 2 PUBLISH after its packet id assignment, PUBREL after the "PUBREC received"
  stage (a restart resends the same packet id, or PUBREL, never a new copy).

A message that reaches an offline session from the mesh is committed at the end of the
loop turn that delivered it (the stream acknowledgement, ``when_committed``, follows).

Commits use ``synchronous=NORMAL``: a committed transaction survives a crash of the process
(SIGKILL); a power cut or kernel crash may lose the last commits since the WAL's last
checkpoint (the WAL is fsynced at checkpoints). The commit runs on the event loop: measured
on the 2-core development machine while loaded (``python -m zmesh.mqtt.sessionstore``, the
bench below) at about 140 µs for a commit of one message and 1.5 ms for 100 (15 µs a
message). Only persistent sessions pay it, once per loop turn that changed one, so a burst
shares one commit; a node without a data_dir pays nothing.

What is not kept: sessions with expiry 0 (they end with their connection), QoS 0 messages
(not queued for absent clients anyway), a shared subscription's messages in flight (their
job is redelivered by the job service), a will waiting out its delay interval, and the
will of a client connected when the node died (the node cannot tell what its client would
have wanted; Mosquitto publishes these, zmesh does not). A SUBSCRIBE applied in the same
turn as its SUBACK is committed at the end of that turn, not before the SUBACK.

Files and hostile input
-----------------------
The database is 0600 in the 0700 data dir, with a lock file so two nodes never share it.
A file that is not a usable store (not SQLite, corrupt, failing its integrity check, an
unknown schema version, tables with other columns) is moved aside
(``sessions.db.corrupt-<UTC time>``, with its ``-wal`` and ``-shm``), the reason logged as
an error naming the file, and the node starts without sessions, as after a Mosquitto
restart without persistence. Rows are read as untrusted: every value is type- and
range-checked, and bounded by the MQTT limits (``mqtt.max_sessions`` sessions,
``mqtt.max_subscriptions`` per session, ``max_inflight + max_queued`` messages of at most
``max_packet_size`` bytes); a session with one bad row is refused whole, counted and logged
with the file's name, never half restored.
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import math
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from zmesh import topics
from zmesh.mesh.outbox import (
    Journal,
    JournalAck,
    JournalEntry,
    JournalForget,
    JournalGone,
    JournalHorizon,
    JournalInterest,
    JournalStream,
)
from zmesh.mesh.streamwire import Interest, StreamEntry, StreamWireError, decode_control
from zmesh.mqtt.session import NEVER, Outgoing, SubscriptionOptions

if TYPE_CHECKING:
    from zmesh.mqtt.sessions import Session

log = logging.getLogger("zmesh.mqtt.sessionstore")

SCHEMA_VERSION = 2  # 2 added the outbox tables (a version 1 file is upgraded in place)
FILE_NAME = "sessions.db"
_SQLITE_MAGIC = b"SQLite format 3\x00"
_TRANSIENT = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_NOMEM", "SQLITE_INTERRUPT")
MAX_POSITIONS = 100_000  # origins whose stream position is kept (far above any mesh's size)
MAX_CLIENT_ID = 65535  # bytes, as MQTT strings
MAX_PROPERTIES = 65536  # bytes of one message's msgpack-encoded properties beyond the payload bound

_COLUMNS: dict[str, tuple[str, ...]] = {
    "meta": ("name", "value"),
    "sessions": ("client_id", "level", "expiry", "username", "offline_since", "last_seq"),
    "subscriptions": (
        "client_id", "filter", "qos", "no_local", "retain_as_published", "retain_handling", "identifier",
    ),
    "messages": (
        "client_id", "seq", "packet_id", "released", "topic", "payload", "qos", "retain", "properties",
        "expires_wall",
    ),
    "inbound": ("client_id", "packet_id"),
    "positions": ("origin", "epoch", "delivered"),
    "outbox_streams": ("dest", "epoch", "next_seq", "acked"),
    "outbox_entries": ("lseq", "topic", "payload", "qos", "ts", "properties", "copy_of"),
    "outbox_seqs": ("lseq", "dest", "seq"),
    "outbox_interest": ("dest", "declaration"),
}
_OUTBOX_TABLES = ("outbox_streams", "outbox_entries", "outbox_seqs", "outbox_interest")
MAX_DECLARATION = 1 << 20  # bytes of one stored interest declaration (1,024 prefixes of 256 B fit)
_OUTBOX_SCHEMA = (
    "CREATE TABLE outbox_streams(dest TEXT PRIMARY KEY, epoch INT NOT NULL, next_seq INT NOT NULL,"
    " acked INT NOT NULL)",
    "CREATE TABLE outbox_entries(lseq INT PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL,"
    " qos INT NOT NULL, ts INT NOT NULL, properties BLOB NULL, copy_of INT NOT NULL)",
    "CREATE TABLE outbox_seqs(lseq INT NOT NULL, dest TEXT NOT NULL, seq INT NOT NULL,"
    " PRIMARY KEY(lseq, dest)) WITHOUT ROWID",
    "CREATE TABLE outbox_interest(dest TEXT PRIMARY KEY, declaration BLOB NOT NULL)",
)
_SCHEMA = (
    "CREATE TABLE meta(name TEXT PRIMARY KEY, value)",
    "CREATE TABLE sessions(client_id TEXT PRIMARY KEY, level INT NOT NULL, expiry INT NOT NULL,"
    " username TEXT NULL, offline_since REAL NULL, last_seq INT NOT NULL)",
    "CREATE TABLE subscriptions(client_id TEXT NOT NULL, filter TEXT NOT NULL, qos INT NOT NULL,"
    " no_local INT NOT NULL, retain_as_published INT NOT NULL, retain_handling INT NOT NULL,"
    " identifier INT NOT NULL, PRIMARY KEY(client_id, filter)) WITHOUT ROWID",
    "CREATE TABLE messages(client_id TEXT NOT NULL, seq INT NOT NULL, packet_id INT NOT NULL,"
    " released INT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL, qos INT NOT NULL,"
    " retain INT NOT NULL, properties BLOB NULL, expires_wall REAL NULL,"
    " PRIMARY KEY(client_id, seq)) WITHOUT ROWID",
    "CREATE TABLE inbound(client_id TEXT NOT NULL, packet_id INT NOT NULL,"
    " PRIMARY KEY(client_id, packet_id)) WITHOUT ROWID",
    "CREATE TABLE positions(origin TEXT PRIMARY KEY, epoch INT NOT NULL, delivered INT NOT NULL)",
    *_OUTBOX_SCHEMA,
)


class SessionStoreError(Exception):
    """The session store cannot be used as configured; the message names the file."""


class _Unusable(Exception):
    """Internal: the file is not a usable session store; move it aside."""


class _BadRow(Exception):
    """Internal: one session's rows fail validation; the session is refused."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds a loaded session must respect (from ``[mqtt]``)."""

    max_sessions: int = 10_000
    max_subscriptions: int = 1_000  # 0: no limit
    max_messages: int = 10_020  # per session: max_inflight + max_queued
    max_packet_size: int = 1_048_576


@dataclass(slots=True)
class StoredSession:
    client_id: str
    level: int
    expiry: int
    username: str | None
    offline_since: float | None  # wall clock; None: its client was connected when written
    last_seq: int
    subscriptions: list[tuple[str, SubscriptionOptions]] = field(default_factory=list)
    messages: list[Outgoing] = field(default_factory=list)  # expires_at holds the WALL deadline
    inbound: list[int] = field(default_factory=list)


@dataclass(slots=True)
class StoredOutbox:
    """The origin's outbox as kept (zmesh.mesh.outbox.Outbox.restore's arguments)."""

    streams: list[tuple[str, int, int, int]] = field(default_factory=list)  # dest, epoch, next_seq, acked
    entries: list[tuple[int, StreamEntry, int, list[tuple[str, int]]]] = field(default_factory=list)
    released_until_ms: int = -1
    interest: dict[str, Interest] = field(default_factory=dict)  # dest -> its last declaration


class _Journal(list):  # type: ignore[type-arg]
    """The list an Outbox records its changes in; each record marks the turn's commit due."""

    def __init__(self, dirty: Callable[[], None]) -> None:
        super().__init__()
        self._dirty = dirty

    def append(self, record: Journal) -> None:
        super().append(record)
        self._dirty()


@dataclass(slots=True)
class Batch:
    """One transaction's worth of changes; a key's last change wins (coalesced upstream)."""

    ended: list[str] = field(default_factory=list)
    sessions: list[tuple[Any, ...]] = field(default_factory=list)
    subs_put: list[tuple[Any, ...]] = field(default_factory=list)
    subs_del: list[tuple[str, str]] = field(default_factory=list)
    msgs_put: list[tuple[Any, ...]] = field(default_factory=list)
    msgs_del: list[tuple[str, int]] = field(default_factory=list)
    inbound_put: list[tuple[str, int]] = field(default_factory=list)
    inbound_del: list[tuple[str, int]] = field(default_factory=list)
    positions: list[tuple[str, int, int]] = field(default_factory=list)
    outbox: list[Journal] = field(default_factory=list)  # the origin's outbox changes, in order

    def __len__(self) -> int:
        return sum(len(getattr(self, name)) for name in self.__slots__)  # type: ignore[attr-defined]


def _is_transient(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorname", "").startswith(_TRANSIENT)


def _is_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _topic_name(value: Any, what: str) -> str:
    """A stored topic name, checked as a client's PUBLISH topic is."""
    topic = _text(value, f"{what} topic")
    try:
        topics.validate_topic_name(topic)
    except topics.TopicError as exc:
        raise _BadRow(f"{what}: {exc}") from None
    return topic


def _text(value: Any, what: str, limit: int = 65535) -> str:
    if type(value) is not bytes or len(value) > limit:
        raise _BadRow(f"{what} is not a string of at most {limit} bytes")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise _BadRow(f"{what} is not UTF-8") from None


class SessionDisk:
    """The SQLite file; blocking calls, made from the event loop (they are short)."""

    def __init__(self, path: Path, limits: Limits = Limits()) -> None:
        self.path = Path(path)
        self.limits = limits
        self.recovered_from: Path | None = None
        self.refused_sessions = 0  # sessions with a bad row, not restored
        self.skipped_sessions = 0  # beyond max_sessions, not restored
        self._conn: sqlite3.Connection | None = None
        self._lock_fd = self._take_file_lock()
        try:
            self._conn = self._open()
        except BaseException:
            os.close(self._lock_fd)
            raise

    # ------------------------------------------------------------------ opening

    def _take_file_lock(self) -> int:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SessionStoreError(f"{self.path}: cannot create the session store's lock file: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SessionStoreError(
                f"{self.path}: in use by another zmesh node (it holds {self.path}.lock); each node needs its own data_dir"
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
            raise SessionStoreError(f"{self.path}: cannot create a fresh session store: {exc}") from None
        self.recovered_from = moved
        return conn

    def _connect(self) -> sqlite3.Connection:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise _Unusable(f"cannot stat: {exc.strerror}") from None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise _Unusable("not a regular file")
        if st is not None and st.st_size:
            try:
                with open(self.path, "rb") as f:
                    magic = f.read(len(_SQLITE_MAGIC))
            except OSError as exc:
                raise _Unusable(f"cannot read: {exc.strerror}") from None
            if magic != _SQLITE_MAGIC:
                raise _Unusable("not an SQLite database")
        if st is None:
            # 0600 from the first instant; SQLite gives -wal and -shm the database's mode.
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except OSError as exc:
                raise SessionStoreError(f"{self.path}: cannot create the session store: {exc.strerror}") from None
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._prepare(conn)
            return conn
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            if _is_transient(exc):
                raise SessionStoreError(f"{self.path}: cannot open the session store: {exc}") from None
            raise _Unusable(str(exc)) from None
        except BaseException:
            if conn is not None:
                conn.close()
            raise

    def _prepare(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            log.warning("%s: SQLite refused WAL mode (journal_mode=%s)", self.path, mode)
        conn.execute("PRAGMA synchronous=NORMAL")
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise _Unusable(f"integrity check failed: {'; '.join(map(str, problems[:3]))}")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
            return
        missing = sorted(set(_COLUMNS) - tables)
        row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone() if "meta" in tables else None
        version = row[0] if row else None
        if version == 1 and missing == sorted(_OUTBOX_TABLES):
            # Written before the outbox was kept here: add its tables, keep the sessions.
            conn.execute("BEGIN IMMEDIATE")
            for statement in _OUTBOX_SCHEMA:
                conn.execute(statement)
            conn.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
            version, missing = SCHEMA_VERSION, []
        if missing:
            raise _Unusable(f"schema incomplete (missing table {', '.join(missing)})")
        if type(version) is not int:
            raise _Unusable("no schema version")
        if version != SCHEMA_VERSION:
            newer = "a newer" if version > SCHEMA_VERSION else "an older"
            raise _Unusable(f"written by {newer} zmesh (schema {version}; this one reads {SCHEMA_VERSION})")
        for table, expected in _COLUMNS.items():
            columns = tuple(r[1] for r in conn.execute(f"PRAGMA table_info({table})"))
            if columns != expected:
                raise _Unusable(f"{table} table has columns {columns}")

    def _move_aside(self, reason: str) -> Path:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        target = Path(f"{self.path}.corrupt-{stamp}")
        n = 0
        while any(Path(f"{target}{s}").exists() for s in ("", "-wal", "-shm")):
            n += 1
            target = Path(f"{self.path}.corrupt-{stamp}-{n}")
        try:
            for suffix in ("-wal", "-shm", ""):  # the WAL first: never replayed into a new file
                source = Path(f"{self.path}{suffix}")
                if source.exists() or source.is_symlink():
                    os.replace(source, f"{target}{suffix}")
        except OSError as exc:
            raise SessionStoreError(
                f"{self.path}: session store is unreadable ({reason}) and cannot be moved aside: {exc.strerror}"
            ) from None
        log.error(
            "%s: SESSION STORE IS UNREADABLE (%s); moved it to %s and starting without persistent "
            "sessions (clients will see session present 0 and subscribe again)",
            self.path, reason, target,
        )
        return target

    # ------------------------------------------------------------------ reading

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise SessionStoreError(f"{self.path}: the session store is closed")
        return self._conn

    def load(self) -> list[StoredSession]:
        """Every valid session, longest away first (connected-at-crash ones last), at most
        ``limits.max_sessions``. Bad sessions are refused (counted, logged), never partial."""
        conn = self._db()
        out: list[StoredSession] = []
        limits = self.limits
        try:
            rows = conn.execute(
                "SELECT CAST(client_id AS BLOB), level, expiry, CAST(username AS BLOB), offline_since, last_seq"
                " FROM sessions ORDER BY offline_since IS NULL, offline_since"
            ).fetchall()
            for row in rows:
                if len(out) >= limits.max_sessions:
                    self.skipped_sessions += 1
                    continue
                try:
                    out.append(self._load_one(conn, row))
                except _BadRow as exc:
                    self.refused_sessions += 1
                    log.error("%s: a stored session was refused and not restored: %s", self.path, exc)
        except sqlite3.Error as exc:
            raise SessionStoreError(f"{self.path}: cannot read the session store: {exc}") from None
        if self.skipped_sessions:
            log.error("%s: %d stored sessions beyond mqtt.max_sessions (%d) not restored",
                      self.path, self.skipped_sessions, limits.max_sessions)
        return out

    def _load_one(self, conn: sqlite3.Connection, row: tuple[Any, ...]) -> StoredSession:
        raw_id, level, expiry, raw_user, offline_since, last_seq = row
        client_id = _text(raw_id, "client id", MAX_CLIENT_ID)
        who = f"client {client_id[:64]!r}"
        if not _is_int(level, 3, 5):
            raise _BadRow(f"{who}: protocol level {level!r}")
        if not _is_int(expiry, 1, NEVER):
            raise _BadRow(f"{who}: session expiry {expiry!r}")
        username = None if raw_user is None else _text(raw_user, f"{who}: username")
        if offline_since is not None and (type(offline_since) is not float or not math.isfinite(offline_since)):
            raise _BadRow(f"{who}: offline_since {offline_since!r}")
        if not _is_int(last_seq, 0, 1 << 62):
            raise _BadRow(f"{who}: last_seq {last_seq!r}")
        stored = StoredSession(client_id, level, expiry, username, offline_since, last_seq)
        limits = self.limits
        # Fetched with LIMIT one past the bound: a hostile file cannot make us read more.
        cap = limits.max_subscriptions or 1_000_000
        for filt_raw, qos, no_local, rap, rh, ident in conn.execute(
            "SELECT CAST(filter AS BLOB), qos, no_local, retain_as_published, retain_handling, identifier"
            " FROM subscriptions WHERE client_id = ? LIMIT ?", (client_id, cap + 1)
        ):
            if len(stored.subscriptions) >= cap:
                raise _BadRow(f"{who}: more than {cap} subscriptions")
            filt = _text(filt_raw, f"{who}: filter")
            try:
                topics.validate_topic_filter(filt)
            except topics.TopicError as exc:
                raise _BadRow(f"{who}: filter {filt[:64]!r}: {exc}") from None
            if not (_is_int(qos, 0, 2) and _is_int(no_local, 0, 1) and _is_int(rap, 0, 1)
                    and _is_int(rh, 0, 2) and _is_int(ident, 0, 268_435_455)):
                raise _BadRow(f"{who}: filter {filt[:64]!r}: bad options")
            stored.subscriptions.append((filt, SubscriptionOptions(qos, bool(no_local), bool(rap), rh, ident)))
        pids: set[int] = set()
        for seq, pid, released, topic_raw, payload, qos, retain, props_raw, expires_wall in conn.execute(
            "SELECT seq, packet_id, released, CAST(topic AS BLOB), payload, qos, retain, properties, expires_wall"
            " FROM messages WHERE client_id = ? ORDER BY seq LIMIT ?", (client_id, limits.max_messages + 1)
        ):
            if len(stored.messages) >= limits.max_messages:
                raise _BadRow(f"{who}: more than {limits.max_messages} messages")
            if not (_is_int(seq, 1, 1 << 62) and _is_int(pid, 0, 65535) and _is_int(qos, 1, 2)
                    and _is_int(released, 0, 1) and _is_int(retain, 0, 1)):
                raise _BadRow(f"{who}: message {seq!r}: bad numbers")
            if released and (qos != 2 or not pid):
                raise _BadRow(f"{who}: message {seq}: PUBREL stage without a QoS 2 packet id")
            if pid and pid in pids:
                raise _BadRow(f"{who}: message {seq}: packet id {pid} twice")
            pids.add(pid)
            topic = _topic_name(topic_raw, f"{who}: message {seq}")
            if type(payload) is not bytes or len(payload) > limits.max_packet_size:
                raise _BadRow(f"{who}: message {seq}: payload is not bytes within mqtt.max_packet_size")
            properties = self._properties(props_raw, f"{who}: message {seq}")
            if expires_wall is not None and (type(expires_wall) is not float or not math.isfinite(expires_wall)):
                raise _BadRow(f"{who}: message {seq}: expiry {expires_wall!r}")
            message = Outgoing(topic, payload, qos, bool(retain), properties, packet_id=pid,
                               expires_at=expires_wall or 0.0, released=bool(released), sent=bool(pid), seq=seq)
            stored.messages.append(message)
        for (pid,) in conn.execute(
            "SELECT packet_id FROM inbound WHERE client_id = ? LIMIT 65536", (client_id,)
        ):
            if not _is_int(pid, 1, 65535):
                raise _BadRow(f"{who}: inbound packet id {pid!r}")
            stored.inbound.append(pid)
        return stored

    def _properties(self, raw: Any, who: str) -> dict[str, Any] | None:
        if raw is None:
            return None
        if type(raw) is not bytes or len(raw) > MAX_PROPERTIES + self.limits.max_packet_size:
            raise _BadRow(f"{who}: properties are not bytes of a bounded size")
        try:
            value = msgpack.unpackb(raw, raw=False, strict_map_key=True)  # raw is bounded above
        except Exception:  # msgpack raises several unrelated types for bad input
            raise _BadRow(f"{who}: properties do not decode") from None
        if not isinstance(value, dict) or not all(type(k) is str for k in value):
            raise _BadRow(f"{who}: properties are not a map of names")
        if "user_property" in value:  # msgpack gives lists; the codec wants (name, value) pairs
            pairs = value["user_property"]
            if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(type(x) is str for x in p) for p in pairs
            ):
                raise _BadRow(f"{who}: user properties malformed")
            value["user_property"] = [tuple(p) for p in pairs]
        return value

    def load_positions(self) -> dict[str, tuple[int, int]]:
        """The receiver's stream positions, origin key -> (epoch, delivered); bad rows skipped."""
        conn = self._db()
        out: dict[str, tuple[int, int]] = {}
        bad = 0
        try:
            for origin_raw, epoch, delivered in conn.execute(
                "SELECT CAST(origin AS BLOB), epoch, delivered FROM positions LIMIT ?", (MAX_POSITIONS + 1,)
            ):
                try:
                    origin = _text(origin_raw, "origin", 256)
                except _BadRow:
                    bad += 1
                    continue
                if len(out) >= MAX_POSITIONS or not (_is_int(epoch, 0, (1 << 63) - 1)
                                                     and _is_int(delivered, 0, (1 << 63) - 1)):
                    bad += 1
                    continue
                out[origin] = (epoch, delivered)
        except sqlite3.Error as exc:
            raise SessionStoreError(f"{self.path}: cannot read stream positions: {exc}") from None
        if bad:
            log.error("%s: %d stored stream positions refused", self.path, bad)
        return out

    def load_outbox(self, max_entries: int, max_streams: int) -> StoredOutbox:
        """The origin's outbox, every row checked as untrusted and bounded (``max_entries``
        messages, ``max_streams`` destinations, payloads within mqtt.max_packet_size). One
        bad row refuses the whole outbox (a stream with a hole in its middle would be worse
        than a new epoch, which receivers report): logged with the file's name, its rows
        deleted, and the node starts with an empty outbox."""
        conn = self._db()
        try:
            return self._load_outbox(conn, max_entries, max_streams)
        except _BadRow as exc:
            log.error("%s: the stored outbox was refused and is discarded (receivers will report what it "
                      "held as lost): %s", self.path, exc)
            self.clear_outbox()
            return StoredOutbox()
        except sqlite3.Error as exc:
            raise SessionStoreError(f"{self.path}: cannot read the stored outbox: {exc}") from None

    def clear_outbox(self) -> None:
        conn = self._db()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for table in _OUTBOX_TABLES:
                conn.execute(f"DELETE FROM {table}")
            conn.execute("DELETE FROM meta WHERE name = 'outbox_released_until_ms'")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise SessionStoreError(f"{self.path}: cannot clear the stored outbox: {exc}") from None

    def _load_outbox(self, conn: sqlite3.Connection, max_entries: int, max_streams: int) -> StoredOutbox:
        out = StoredOutbox()
        top = (1 << 63) - 1
        next_seqs: dict[str, int] = {}
        for dest_raw, epoch, next_seq, acked in conn.execute(
            "SELECT CAST(dest AS BLOB), epoch, next_seq, acked FROM outbox_streams LIMIT ?", (max_streams + 1,)
        ):
            if len(out.streams) >= max_streams:
                raise _BadRow(f"more than {max_streams} destinations")
            dest = _text(dest_raw, "outbox destination", 256)
            if not (_is_int(epoch, 1, top) and _is_int(next_seq, 1, 1 << 62) and _is_int(acked, 0, next_seq - 1)):
                raise _BadRow(f"stream to {dest[:16]!r}: bad numbers")
            next_seqs[dest] = next_seq
            out.streams.append((dest, epoch, next_seq, acked))
        by_lseq: dict[int, list[tuple[str, int]]] = {}
        limit = self.limits.max_packet_size
        for lseq, topic_raw, payload, qos, ts, props_raw, copy_of in conn.execute(
            "SELECT lseq, CAST(topic AS BLOB), payload, qos, ts, properties, copy_of FROM outbox_entries"
            " ORDER BY lseq LIMIT ?", (max_entries + 1,)
        ):
            if len(out.entries) >= max_entries:
                raise _BadRow(f"more than {max_entries} messages")
            if not (_is_int(lseq, 1, 1 << 62) and _is_int(qos, 1, 2) and _is_int(ts, 0, 1 << 62)
                    and _is_int(copy_of, 0, lseq - 1)):
                raise _BadRow(f"outbox message {lseq!r}: bad numbers")
            topic = _topic_name(topic_raw, f"outbox message {lseq}")
            if type(payload) is not bytes or len(payload) > limit:
                raise _BadRow(f"outbox message {lseq}: payload is not bytes within mqtt.max_packet_size")
            properties = self._properties(props_raw, f"outbox message {lseq}")
            seqs = by_lseq[lseq] = []
            out.entries.append((lseq, StreamEntry(topic, payload, qos, ts, properties), copy_of, seqs))
        cap = min(max_entries * max(1, len(out.streams)), 1 << 24)
        count = 0
        for lseq, dest_raw, seq in conn.execute("SELECT lseq, CAST(dest AS BLOB), seq FROM outbox_seqs LIMIT ?",
                                                (cap + 1,)):
            count += 1
            if count > cap:
                raise _BadRow(f"more than {cap} stream numbers")
            dest = _text(dest_raw, "outbox destination", 256)
            seqs = by_lseq.get(lseq)  # type: ignore[arg-type]
            if seqs is None or dest not in next_seqs or not _is_int(seq, 1, next_seqs[dest] - 1):
                raise _BadRow(f"stream number {seq!r} of message {lseq!r} to {dest[:16]!r}: no such message or stream")
            seqs.append((dest, seq))
        for dest_raw, declaration in conn.execute(
            "SELECT CAST(dest AS BLOB), declaration FROM outbox_interest LIMIT ?", (max_streams + 1,)
        ):
            if len(out.interest) >= max_streams:
                raise _BadRow(f"interest of more than {max_streams} destinations")
            dest = _text(dest_raw, "outbox destination", 256)
            if type(declaration) is not bytes or len(declaration) > MAX_DECLARATION:
                raise _BadRow(f"interest of {dest[:16]!r} is not a bounded declaration")
            try:  # checked as a peer's declaration is (zmesh.mesh.streamwire)
                message = decode_control(declaration)
            except StreamWireError as exc:
                raise _BadRow(f"interest of {dest[:16]!r}: {exc}") from None
            if not isinstance(message, Interest):
                raise _BadRow(f"interest of {dest[:16]!r} is another control message")
            out.interest[dest] = message
        row = conn.execute("SELECT value FROM meta WHERE name = 'outbox_released_until_ms'").fetchone()
        if row is not None:
            if not _is_int(row[0], -1, 1 << 62):
                raise _BadRow("released_until_ms is not a time")
            out.released_until_ms = row[0]
        return out

    # ------------------------------------------------------------------ writing

    def write(self, batch: Batch) -> None:
        """Apply one batch in one transaction (session ends first, then the rest)."""
        conn = self._db()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for table in ("subscriptions", "messages", "inbound", "sessions"):
                    conn.executemany(f"DELETE FROM {table} WHERE client_id = ?", [(c,) for c in batch.ended])
                conn.executemany("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?)", batch.sessions)
                conn.executemany("DELETE FROM subscriptions WHERE client_id = ? AND filter = ?", batch.subs_del)
                conn.executemany("INSERT OR REPLACE INTO subscriptions VALUES (?, ?, ?, ?, ?, ?, ?)", batch.subs_put)
                conn.executemany("DELETE FROM messages WHERE client_id = ? AND seq = ?", batch.msgs_del)
                conn.executemany("INSERT OR REPLACE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", batch.msgs_put)
                conn.executemany("DELETE FROM inbound WHERE client_id = ? AND packet_id = ?", batch.inbound_del)
                conn.executemany("INSERT OR IGNORE INTO inbound VALUES (?, ?)", batch.inbound_put)
                conn.executemany("INSERT OR REPLACE INTO positions VALUES (?, ?, ?)", batch.positions)
                if batch.outbox:
                    _write_outbox(conn, batch.outbox)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise SessionStoreError(f"{self.path}: cannot write the session store: {exc}") from exc

    def save_positions(self, positions: dict[str, tuple[int, int]]) -> None:
        """Write stream positions alone (the delivery wiring normally goes through
        ``SessionPersistence.set_position``, in the same transaction as the sessions)."""
        self.write(Batch(positions=[(o, e, d) for o, (e, d) in positions.items()]))

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
                os.close(self._lock_fd)


def _write_outbox(conn: sqlite3.Connection, records: list[Journal]) -> None:
    """The outbox's journal (zmesh.mesh.outbox), in order, in the caller's transaction.

    Consecutive records of one kind go in one executemany (a saturated publisher journals
    an entry, and an ack every few, per message: one statement each cost ~29 us a message).
    Runs of different kinds keep their order, which is all the semantics need (a stream's
    row before its entries' numbers, an entry before its removal, a forget before a new
    stream to the same destination)."""
    many, ex = conn.executemany, conn.execute
    for kind, group in groupby(records, type):
        batch = list(group)
        if kind is JournalEntry:
            many("INSERT OR REPLACE INTO outbox_entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                 [(r.lseq, r.message.topic, r.message.payload, r.message.qos, r.message.timestamp,
                   _pack_properties(r.message.properties), r.copy_of) for r in batch])
            many("INSERT OR REPLACE INTO outbox_seqs VALUES (?, ?, ?)",
                 [(r.lseq, dest, seq) for r in batch for dest, seq in r.seqs])
            top: dict[str, int] = {}
            for r in batch:
                for dest, seq in r.seqs:
                    if seq >= top.get(dest, 0):
                        top[dest] = seq
            many("UPDATE outbox_streams SET next_seq = max(next_seq, ?) WHERE dest = ?",
                 [(seq + 1, dest) for dest, seq in top.items()])
        elif kind is JournalAck:
            acked: dict[str, int] = {}
            for r in batch:
                acked[r.dest] = max(acked.get(r.dest, 0), r.acked)
            many("UPDATE outbox_streams SET acked = max(acked, ?) WHERE dest = ?", [(a, d) for d, a in acked.items()])
        elif kind is JournalGone:
            gone = [(r.lseq,) for r in batch]
            many("DELETE FROM outbox_entries WHERE lseq = ?", gone)
            many("DELETE FROM outbox_seqs WHERE lseq = ?", gone)
        elif kind is JournalStream:
            many("INSERT OR REPLACE INTO outbox_streams VALUES (?, ?, 1, 0)", [(r.dest, r.epoch) for r in batch])
        elif kind is JournalInterest:
            many("INSERT OR REPLACE INTO outbox_interest VALUES (?, ?)", [(r.dest, r.declaration) for r in batch])
        elif kind is JournalForget:
            for r in batch:
                ex("DELETE FROM outbox_streams WHERE dest = ?", (r.dest,))
                ex("DELETE FROM outbox_seqs WHERE dest = ?", (r.dest,))
                ex("DELETE FROM outbox_interest WHERE dest = ?", (r.dest,))
        elif kind is JournalHorizon:
            ex("INSERT OR REPLACE INTO meta VALUES ('outbox_released_until_ms', ?)", (batch[-1].released_until_ms,))


def _pack_properties(properties: dict[str, Any] | None) -> bytes | None:
    if not properties:
        return None
    return msgpack.packb(properties, use_bin_type=True)


class SessionPersistence:
    """The loop-side half: what changed since the last commit, coalesced by key, committed
    once per loop turn (``call_soon``) or earlier by ``flush()`` (the write-ahead rule).

    Sessions call it through their hooks (``attach``, ``session``, ``subscription``,
    ``message`` via ``OutboundWindow.on_change``, ``inbound`` via ``InboundQoS2.on_change``,
    ``ended``). Rows are built at commit time from the live objects, so a message changed
    five times in one turn is written once. Clocks are injected (``wall``: time.time,
    ``mono``: time.monotonic) to turn monotonic message deadlines into wall ones."""

    def __init__(
        self,
        disk: SessionDisk,
        call_soon: Callable[[Callable[[], None]], Any],
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.disk = disk
        self.pending = False
        self.failed = False  # a write failed: the next commit retries (changes are kept)
        self.commits_total = 0
        self.write_errors_total = 0
        self._call_soon = call_soon
        self._wall, self._mono = wall, mono
        self._sessions: dict[str, Session] = {}
        self._ended: set[str] = set()
        self._subs: dict[tuple[str, str], SubscriptionOptions | None] = {}
        self._msgs: dict[tuple[str, int], Outgoing | None] = {}
        self._inbound: dict[tuple[str, int], bool] = {}
        self._positions: dict[str, tuple[int, int]] = {}
        self._committed: list[Callable[[], None]] = []
        self._scheduled = False
        self._outbox: _Journal | None = None

    def outbox_journal(self) -> list[Journal]:
        """The list the origin's Outbox records its changes in (``Outbox(journal=...)``):
        each record makes this turn's commit due, and the commit writes them in order, with
        the session changes of the same turn. A PUBACK therefore leaves after the message's
        outbox row is on disk (the write-ahead rule above)."""
        if self._outbox is None:
            self._outbox = _Journal(self._dirty)
        return self._outbox

    def _dirty(self) -> None:
        self.pending = True
        if not self._scheduled:
            self._scheduled = True
            self._call_soon(self._turn)

    def _turn(self) -> None:
        self._scheduled = False
        self.flush()

    # ------------------------------------------------------------------ hooks

    def attach(self, session: Session) -> None:
        """The session became persistent: write all of it, and follow its changes."""
        cid = session.client_id
        session.persist = self
        session.window.on_change = lambda m, alive: self.message(cid, m, alive)
        session.inbound_qos2.on_change = lambda pid, added: self.inbound(cid, pid, added)
        self.session(session)
        for filt, options in session.subscriptions.items():
            self._subs[(cid, filt)] = options
        window = session.window
        for message in (*window.inflight.values(), *window.queue):
            if not message.seq and message.settle is None:
                window.last_seq += 1
                message.seq = window.last_seq
            if message.seq:
                self._msgs[(cid, message.seq)] = message
        for pid in session.inbound_qos2.pending:
            self._inbound[(cid, pid)] = True

    def detach(self, session: Session) -> None:
        """The session is over (or no longer persistent): remove it from disk."""
        session.persist = None
        session.window.on_change = None
        session.inbound_qos2.on_change = None
        cid = session.client_id
        if self._sessions.get(cid) is session:
            del self._sessions[cid]
        # Its pending row changes are void: the session's rows all go.
        for d in (self._subs, self._msgs, self._inbound):
            for key in [k for k in d if k[0] == cid]:  # pending changes only: one turn's worth
                del d[key]
        self._ended.add(cid)
        self._dirty()

    def session(self, session: Session) -> None:
        """The session's own row changed (level, expiry, owner, online/offline)."""
        # An end of the same client id earlier in this turn stays: ends are written first.
        self._sessions[session.client_id] = session
        self._dirty()

    def subscription(self, session: Session, filt: str, options: SubscriptionOptions | None) -> None:
        self._subs[(session.client_id, filt)] = options
        self._dirty()

    def message(self, client_id: str, message: Outgoing, alive: bool) -> None:
        self._msgs[(client_id, message.seq)] = message if alive else None
        self._dirty()

    def inbound(self, client_id: str, packet_id: int, added: bool) -> None:
        self._inbound[(client_id, packet_id)] = added
        self._dirty()

    def set_position(self, origin: str, epoch: int, delivered: int) -> None:
        """A receiver's stream position, written with the session changes of this turn."""
        self._positions[origin] = (epoch, delivered)
        self._dirty()

    def when_committed(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once what is pending now is on disk (at once if nothing is)."""
        if not self.pending:
            callback()
            return
        self._committed.append(callback)

    # ------------------------------------------------------------------ commit

    def flush(self) -> bool:
        """Commit what is pending; False when the write failed (kept for the next try)."""
        if not self.pending:
            return True
        wall, mono = self._wall(), self._mono()
        batch = Batch(ended=sorted(self._ended))
        for session in self._sessions.values():
            batch.sessions.append((
                session.client_id, session.level, session.expiry, session.username,
                session.offline_since, session.window.last_seq,
            ))
        for (cid, filt), options in self._subs.items():
            if options is None:
                batch.subs_del.append((cid, filt))
            else:
                batch.subs_put.append((cid, filt, options.qos, int(options.no_local),
                                       int(options.retain_as_published), options.retain_handling, options.identifier))
        for (cid, seq), m in self._msgs.items():
            if m is None:
                batch.msgs_del.append((cid, seq))
            else:
                expires = wall + (m.expires_at - mono) if m.expires_at else None
                batch.msgs_put.append((cid, seq, m.packet_id, int(m.released), m.topic, m.payload, m.qos,
                                       int(m.retain), _pack_properties(m.properties), expires))
        for (cid, pid), added in self._inbound.items():
            (batch.inbound_put if added else batch.inbound_del).append((cid, pid))
        batch.positions = [(o, e, d) for o, (e, d) in self._positions.items()]
        if self._outbox:
            batch.outbox = list(self._outbox)  # cleared only once written: a failed write retries them
        try:
            self.disk.write(batch)
        except SessionStoreError as exc:
            self.write_errors_total += 1
            if not self.failed:
                log.error("%s (sessions stay in memory; retrying with the next change)", exc)
            self.failed = True
            return False
        if self.failed:
            log.info("%s: session store writable again", self.disk.path)
        self.failed = False
        self.commits_total += 1
        self.pending = False
        self._sessions.clear()
        self._ended.clear()
        self._subs.clear()
        self._msgs.clear()
        self._inbound.clear()
        self._positions.clear()
        if batch.outbox:
            del self._outbox[: len(batch.outbox)]  # type: ignore[index]
        callbacks, self._committed = self._committed, []
        for callback in callbacks:
            callback()
        return True

    def close(self) -> None:
        self.flush()
        self.disk.close()


def restore_messages(stored: StoredSession, wall: float, mono: float) -> list[Outgoing]:
    """The stored messages with their wall-clock expiry turned into monotonic deadlines."""
    for m in stored.messages:
        if m.expires_at:
            m.expires_at = mono + (m.expires_at - wall)
            if m.expires_at <= mono:
                m.expires_at = mono  # passed while the node was down: dropped on restore
    return stored.messages


def _bench(count: int = 2000) -> None:  # pragma: no cover - `python -m zmesh.mqtt.sessionstore`
    """Commit cost: one message queued per commit, and 100 per commit."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        disk = SessionDisk(Path(tmp) / FILE_NAME)
        disk.write(Batch(sessions=[("c", 4, NEVER, None, 1.0, 0)]))
        for per in (1, 100):
            start = time.perf_counter()
            seq = 0
            for _ in range(count // per):
                rows = []
                for _ in range(per):
                    seq += 1
                    rows.append(("c", seq, 0, 0, "alerts/x", b"x" * 64, 1, 0, None, None))
                disk.write(Batch(msgs_put=rows))
            took = time.perf_counter() - start
            print(f"{per:4d} messages per commit: {took / (count // per) * 1e6:8.1f} us per commit, "
                  f"{took / count * 1e6:6.1f} us per message")
        disk.close()


if __name__ == "__main__":  # pragma: no cover
    _bench()
