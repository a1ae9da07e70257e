"""The submitter's job spool: accepted jobs on disk until they are done or dead.

SQLite in WAL mode (``DATA_DIR/jobs.db``), synchronous=FULL: ``add`` returns once the job is
durable, so a submitter restarted after accepting a job still delivers it. Finished jobs
are removed in batches. Calls come from one worker thread at a time.

Private and sealed, as the retained store (``zmesh.retained.store``) is:

* The file is created 0600 by ``os.open`` before SQLite sees it (SQLite gives its -wal and
  -shm the database's mode), so no job is ever readable by another user. A spool left
  wider by an older version is narrowed at open.
* With a key (``store.key_file``, the same key and ``Sealer`` as the retained store) each
  payload is sealed with AES-256-GCM, the job's id and queue as associated data (a payload
  copied onto another job does not open). Ids, queues and attempt counts stay plaintext.
* A wrong key fails at open, before any job is read: ``meta`` holds a key check (a
  constant sealed with that key) for every key that sealed a job; each must be opened by a
  configured key (current or previous) or the open raises ``WrongKeyError``, and a sealed
  spool opened with no key raises ``StoreError``. Nothing undecryptable is ever dispatched.
* Turning encryption on and rotating are one operation, done at open: jobs under another
  key (or none) are re-sealed under the current key, the other keys' checks are dropped,
  and the file is vacuumed with its WAL truncated, so no plaintext page stays in it. A
  spool holds jobs waiting for workers, not history: that pass is short.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgpack

from zmesh.jobs.dispatcher import Job
from zmesh.retained.store import StoreError, WrongKeyError
from zmesh.security.keys import Sealer, SealError, sealers_for

log = logging.getLogger("zmesh.spool")

_KEY_CHECK_PREFIX = "key_check:"
_KEY_CHECK_PLAINTEXT = b"zmesh job spool: key check"
_KEY_CHECK_AAD = b"zmesh-spool-meta:key-check"


def _aad(job_id: str, queue: str) -> bytes:
    # msgpack, not a separator: ids and queues from the Python API may hold any character.
    return msgpack.packb(["zmesh-job", job_id, queue], use_bin_type=True)


def _private_file(path: Path) -> None:
    """Create ``path`` 0600, or narrow an existing spool (and its -wal, -shm) to 0600."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return
    except FileExistsError:
        pass
    for suffix in ("", "-wal", "-shm"):
        name = Path(f"{path}{suffix}")
        try:
            mode = stat.S_IMODE(os.lstat(name).st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            os.chmod(name, 0o600)
            log.warning("%s: had mode %04o (readable by others); narrowed to 0600", name, mode)


class JobSpool:
    def __init__(self, path: Path, *, key: bytes | None = None, previous_keys: Sequence[bytes] = ()) -> None:
        self.path = path
        self._sealer, self._sealers = sealers_for(key, previous_keys)
        self.encrypted = self._sealer is not None
        self.unreadable_total = 0
        self._lock = threading.Lock()
        try:
            _private_file(path)
        except OSError as exc:
            raise StoreError(f"{path}: cannot create the job spool: {exc.strerror}") from None
        try:
            self._db = self._open(path)
        except sqlite3.DatabaseError as exc:
            # A spool we cannot read is moved aside, loudly; the node still starts.
            aside = path.with_name(path.name + ".corrupt")
            log.error("job spool %s unreadable (%s): moved to %s, starting empty", path, exc, aside)
            # WAL and shm first, with it: SQLite would replay an old WAL into the new file.
            for suffix in ("-wal", "-shm", ""):
                source = Path(f"{path}{suffix}")
                if source.exists():
                    source.replace(f"{aside}{suffix}")
            _private_file(path)
            self._db = self._open(path)

    def _open(self, path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, queue TEXT NOT NULL, "
                "payload BLOB NOT NULL, attempts INTEGER NOT NULL, submitted REAL NOT NULL, "
                "key_id BLOB NULL)"
            )
            db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value)")
            columns = [row[1] for row in db.execute("PRAGMA table_info(jobs)")]
            if "key_id" not in columns:  # a spool from before encryption: every job plaintext
                db.execute("ALTER TABLE jobs ADD COLUMN key_id BLOB NULL")
            db.execute("SELECT count(*) FROM jobs").fetchone()
            self._check_keys(db)
        except BaseException:
            db.close()
            raise
        return db

    def _check_keys(self, db: sqlite3.Connection) -> None:
        checks: dict[bytes, bytes] = {}
        for name, value in db.execute("SELECT name, value FROM meta WHERE name GLOB ?", (_KEY_CHECK_PREFIX + "*",)):
            try:
                key_id = bytes.fromhex(name[len(_KEY_CHECK_PREFIX) :])
            except ValueError:
                raise StoreError(f"{self.path}: the job spool holds a malformed key check") from None
            if type(value) is not bytes:
                raise StoreError(f"{self.path}: the job spool holds a malformed key check")
            checks[key_id] = value
        sealed = db.execute("SELECT 1 FROM jobs WHERE key_id IS NOT NULL LIMIT 1").fetchone() is not None
        if (checks or sealed) and self._sealer is None:
            ids = ", ".join(sorted(k.hex() for k in checks)) or "unknown"
            raise StoreError(f"{self.path}: the job spool is encrypted (key id {ids}); configure store.key_file")
        missing = sorted(k.hex() for k in checks if k not in self._sealers)
        if missing:
            several = len(missing) > 1
            raise WrongKeyError(
                f"{self.path}: the spooled jobs were encrypted with another key "
                f"(key id{'s' if several else ''} {', '.join(missing)}); configure "
                f"{'those keys' if several else 'that key'} as store.key_file or store.previous_key_files"
            )
        for key_id, blob in checks.items():
            try:
                ok = self._sealers[key_id].open(blob, _KEY_CHECK_AAD) == _KEY_CHECK_PLAINTEXT
            except SealError:
                ok = False
            if not ok:  # the id matches but the check does not open: the file was altered
                raise StoreError(f"{self.path}: the job spool's key check for key id {key_id.hex()} does not open")
        if self._sealer is None:
            return
        current = self._sealer.key_id
        if current not in checks:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO meta VALUES (?, ?)",
                       (_KEY_CHECK_PREFIX + current.hex(), self._sealer.seal(_KEY_CHECK_PLAINTEXT, _KEY_CHECK_AAD)))
            db.execute("COMMIT")
        stale = db.execute("SELECT 1 FROM jobs WHERE key_id IS NOT ? LIMIT 1", (current,)).fetchone()
        if stale is not None or any(k != current for k in checks):
            self._reseal(db, self._sealer)

    def _reseal(self, db: sqlite3.Connection, sealer: Sealer) -> None:
        """Every job under ``sealer``'s key; then the old checks go, and the old pages."""
        rows = db.execute(
            "SELECT rowid, id, queue, payload, key_id FROM jobs WHERE key_id IS NOT ?", (sealer.key_id,)
        ).fetchall()
        updates, bad = [], []
        for rowid, job_id, queue, payload, key_id in rows:
            try:
                plain = self._plain(job_id, queue, payload, key_id)
            except ValueError:
                bad.append((rowid,))
                continue
            updates.append((sealer.seal(plain, _aad(job_id, queue)), sealer.key_id, rowid))
        db.execute("BEGIN IMMEDIATE")
        db.executemany("UPDATE jobs SET payload = ?, key_id = ? WHERE rowid = ?", updates)
        db.executemany("DELETE FROM jobs WHERE rowid = ?", bad)
        db.execute("DELETE FROM meta WHERE name GLOB ? AND name != ?",
                   (_KEY_CHECK_PREFIX + "*", _KEY_CHECK_PREFIX + sealer.key_id.hex()))
        db.execute("COMMIT")
        if bad:
            self.unreadable_total += len(bad)
            log.error("%s: %d spooled job(s) could not be decrypted; deleted them", self.path, len(bad))
        # Old plaintext or old-key pages may sit in the WAL and on the free list: copy them
        # into the file, rebuild it from live rows only, then empty the WAL.
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        db.execute("VACUUM")
        if db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]:
            log.warning("%s: could not truncate the WAL after re-encrypting (busy)", self.path)
        log.info("%s: %d spooled job(s) now under key id %s", self.path, len(updates), sealer.key_id.hex())

    def _plain(self, job_id: object, queue: object, payload: object, key_id: object) -> bytes:
        """A row's payload, opened if sealed; ValueError if it will not open."""
        if type(payload) is not bytes or type(job_id) is not str or type(queue) is not str:
            raise ValueError("malformed row")
        if key_id is None:
            return payload
        sealer = self._sealers.get(key_id) if type(key_id) is bytes else None
        if sealer is None:
            raise ValueError("sealed with an unknown key")
        try:
            return sealer.open(payload, _aad(job_id, queue))
        except SealError:
            raise ValueError("does not decrypt") from None

    def add(self, jobs: Iterable[Job]) -> None:
        sealer = self._sealer
        if sealer is None:
            rows = [(j.id, j.queue, j.payload, j.attempts, j.submitted_at, None) for j in jobs]
        else:  # sealed before the lock is taken: crypto is the slow part
            key_id = sealer.key_id
            rows = [(j.id, j.queue, sealer.seal(j.payload, _aad(j.id, j.queue)), j.attempts, j.submitted_at, key_id)
                    for j in jobs]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR IGNORE INTO jobs (id, queue, payload, attempts, submitted, key_id) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            self._db.execute("COMMIT")

    def remove(self, job_ids: Iterable[str]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in job_ids])
            self._db.execute("COMMIT")

    def load(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, queue, payload, attempts, key_id FROM jobs ORDER BY rowid"
            ).fetchall()
        jobs, bad = [], []
        for job_id, queue, payload, attempts, key_id in rows:
            try:
                plain = self._plain(job_id, queue, payload, key_id)
            except ValueError:
                bad.append(job_id)
                continue
            # Attempts are not written back as they happen: after a restart they count afresh.
            jobs.append(Job(job_id, queue, plain, 0.0, attempts=attempts))
        if bad:
            # Never dispatched: a payload that does not open is not the one submitted.
            self.unreadable_total += len(bad)
            log.error("%s: %d spooled job(s) could not be decrypted or read; skipped them", self.path, len(bad))
        return jobs

    def close(self) -> None:
        with self._lock:
            self._db.close()
