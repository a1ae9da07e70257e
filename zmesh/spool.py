"""The submitter's job spool: accepted jobs on disk until they are done or dead.

SQLite in WAL mode (``DATA_DIR/jobs.db``), one table, synchronous=FULL: ``add`` returns
once the job is durable, so a submitter restarted after accepting a job still delivers it.
Finished jobs are removed in batches. Calls come from one worker thread at a time.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

from zmesh.jobs import Job

log = logging.getLogger("zmesh.spool")


class JobSpool:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = self._open(path)
        except sqlite3.DatabaseError as exc:
            # A spool we cannot read is moved aside, loudly; the node still starts.
            aside = path.with_name(path.name + ".corrupt")
            log.error("job spool %s unreadable (%s): moved to %s, starting empty", path, exc, aside)
            path.replace(aside)
            self._db = self._open(path)

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, queue TEXT NOT NULL, "
            "payload BLOB NOT NULL, attempts INTEGER NOT NULL, submitted REAL NOT NULL)"
        )
        db.execute("SELECT count(*) FROM jobs").fetchone()
        return db

    def add(self, jobs: Iterable[Job]) -> None:
        rows = [(j.id, j.queue, j.payload, j.attempts, j.submitted_at) for j in jobs]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR IGNORE INTO jobs VALUES (?, ?, ?, ?, ?)", rows)
            self._db.execute("COMMIT")

    def remove(self, job_ids: Iterable[str]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in job_ids])
            self._db.execute("COMMIT")

    def load(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT id, queue, payload, attempts FROM jobs ORDER BY rowid").fetchall()
        # Attempts are not written back as they happen: after a restart they count afresh.
        return [Job(r[0], r[1], bytes(r[2]), 0.0, attempts=r[3]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
