"""The job spool on disk: 0600, sealed with the store's key, refusing a wrong one."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from zmesh.jobs.dispatcher import Job
from zmesh.jobs.spool import JobSpool
from zmesh.retained.store import StoreError, WrongKeyError

K1, K2 = b"\x01" * 32, b"\x02" * 32


def _jobs(n: int, tag: str) -> list[Job]:
    return [Job(f"{tag}-{i}", "scan", f"PAYLOAD-{tag}-{i}".encode(), 0.0) for i in range(n)]


def _files(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.parent.glob(f"{path.name}*"))


def _payloads(spool: JobSpool) -> dict[str, bytes]:
    return {j.id: j.payload for j in spool.load()}


def test_sealed_spool_keeps_payloads_out_of_its_files_and_refuses_other_keys(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    spool = JobSpool(path, key=K1)
    spool.add(_jobs(5, "a"))
    assert b"PAYLOAD-a" not in _files(path)
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in tmp_path.iterdir()} == {"0o600"}
    spool.close()
    with pytest.raises(WrongKeyError, match="encrypted with another key"):
        JobSpool(path, key=K2)
    with pytest.raises(StoreError, match="job spool is encrypted"):
        JobSpool(path)
    spool = JobSpool(path, key=K1)
    assert _payloads(spool) == {f"a-{i}": f"PAYLOAD-a-{i}".encode() for i in range(5)}
    spool.close()


def test_a_plaintext_spool_is_sealed_at_open_and_rotation_drops_the_old_key(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    spool = JobSpool(path)
    spool.add(_jobs(3, "p"))
    assert b"PAYLOAD-p" in _files(path)  # positive control
    spool.close()
    spool = JobSpool(path, key=K1)  # encryption turned on: re-sealed, old pages gone
    assert b"PAYLOAD-p" not in _files(path)
    assert len(_payloads(spool)) == 3
    spool.close()
    spool = JobSpool(path, key=K2, previous_keys=[K1])  # rotation
    assert len(_payloads(spool)) == 3
    spool.close()
    with pytest.raises(WrongKeyError):
        JobSpool(path, key=K1)  # K1's check was dropped with the last job under it
    assert len(_payloads(JobSpool(path, key=K2))) == 3


def test_a_payload_moved_onto_another_job_does_not_open(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    spool = JobSpool(path, key=K1)
    spool.add(_jobs(2, "m"))
    spool.close()
    db = sqlite3.connect(path)
    (blob,) = db.execute("SELECT payload FROM jobs WHERE id = 'm-0'").fetchone()
    db.execute("UPDATE jobs SET payload = ? WHERE id = 'm-1'", (blob,))
    db.commit()
    db.close()
    spool = JobSpool(path, key=K1)
    assert _payloads(spool) == {"m-0": b"PAYLOAD-m-0"}  # m-1 skipped and counted, never dispatched
    assert spool.unreadable_total == 1
    spool.close()


def test_a_spool_left_world_readable_is_narrowed(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    JobSpool(path).close()
    os.chmod(path, 0o644)
    JobSpool(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
