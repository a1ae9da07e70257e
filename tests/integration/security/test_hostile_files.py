"""What a node writes to disk is its own: 0600 files in a 0700 data dir, job payloads
sealed like retained ones (issue 14, hole 9).

Real node processes with a data dir and a store key. Before the fix ``jobs.db`` and its
WAL were 0644 with every job payload in plaintext, whatever ``store.key_file`` said.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import stat
from pathlib import Path

import pytest

from tests.helpers import (
    MqttSubmitter,
    MqttWorker,
    NodeProcess,
    Publisher,
    make_certs,
    stop_all,
    wait_until,
    write_config,
    zmesh_cli,
)

pytestmark = pytest.mark.timeout(120)


def _markers(n: int) -> dict[str, bytes]:
    return {f"job-{i:02d}": f"target {secrets.token_hex(12)}".encode() for i in range(n)}


def _db_bytes(data_dir: Path, stem: str) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob(f"{stem}*")) if p.is_file())


def _leaks(data_dir: Path, markers: list[bytes]) -> list[tuple[str, bytes]]:
    files = {p.name: p.read_bytes() for p in sorted(data_dir.iterdir()) if p.is_file()}
    return [(name, m) for name, data in files.items() for m in markers if m in data]


def _start(tmp_path: Path, certs: Path, data_dir: Path, config: str | None) -> NodeProcess:
    extra = ["--data-dir", str(data_dir)]
    if config is not None:
        extra += ["--config", str(write_config(tmp_path / f"{data_dir.name}.toml", config))]
    return NodeProcess(tmp_path, "a", certs, control_port=0, extra=extra)


def _run_fails(certs: Path, data_dir: Path, config: Path | None) -> str:
    args = ["node", "run", "--name", "a", "--cert", str(certs / "a.key_secret"), "--listen", "127.0.0.1:0",
            "--mqtt", "127.0.0.1:0", "--data-dir", str(data_dir)]
    if config is not None:
        args += ["--config", str(config)]
    result = zmesh_cli(*args, timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 1, (result.returncode, output)
    assert "Traceback" not in output, output
    return output


def test_job_spool_and_every_node_file_are_private_and_sealed(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", ["a"])
    keys = tmp_path / "keys"
    for name in ("k1", "k2"):
        result = zmesh_cli("keys", "create", str(keys / f"{name}.key"))
        assert result.returncode == 0, result.stderr
    k1, k2 = keys / "k1.key", keys / "k2.key"
    nodes: list[NodeProcess] = []
    clients: list[MqttSubmitter | MqttWorker | Publisher] = []
    try:
        # Positive control: without a key the payloads are in the spool's files once the
        # PUBACKs are in, so the checks below read the right files at the right time.
        plain_dir = tmp_path / "plain"
        node = _start(tmp_path, certs, plain_dir, None)
        nodes.append(node)
        plain_jobs = _markers(5)
        submitter = MqttSubmitter(node.mqtt_port)
        submitter.submit("scan", plain_jobs)
        submitter.close()
        assert all(p in _db_bytes(plain_dir, "jobs.db") for p in plain_jobs.values())
        assert node.stop() == 0
        nodes.remove(node)

        # An operator's data dir made with the usual umask: the node narrows it to 0700.
        data_dir = tmp_path / "data"
        data_dir.mkdir(mode=0o755)
        os.chmod(data_dir, 0o755)
        key_config = f'[store]\nkey_file = "{k1}"\n'
        node = _start(tmp_path, certs, data_dir, key_config)
        nodes.append(node)
        stalls = node.loop_stalls()["stalls_total"]  # from here on: start-up is not the load
        jobs = _markers(20)
        submitter = MqttSubmitter(node.mqtt_port)
        clients.append(submitter)
        submitter.submit("scan", jobs)  # nobody works "scan": they wait in the spool
        retained_marker = f"retained {secrets.token_hex(12)}".encode()
        publisher = Publisher(node.mqtt_port)
        clients.append(publisher)
        publisher.publish("notes/secret", retained_marker, qos=1, retain=True)
        wait_until(lambda: (data_dir / "retained.db-wal").exists() and (data_dir / "zmesh.pid").exists(), 10,
                   "the store's WAL and the pid file")

        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        names = {p.name for p in data_dir.iterdir()}
        assert {"jobs.db", "jobs.db-wal", "jobs.db-shm", "retained.db", "retained.db-wal", "zmesh.pid"} <= names, names
        modes = {p.name: oct(stat.S_IMODE(p.lstat().st_mode)) for p in data_dir.iterdir()}
        assert modes == dict.fromkeys(names, "0o600"), modes
        assert stat.S_IMODE(node.ready_file.stat().st_mode) == 0o600
        markers = [*jobs.values(), retained_marker]
        assert _leaks(data_dir, markers) == []
        lag = node.loop_stalls()
        assert lag["stalls_total"] == stalls, lag  # sealing and syncing stay off the event loop
        for client in clients:
            client.close()
        clients.clear()
        assert node.stop() == 0
        nodes.remove(node)
        assert _leaks(data_dir, markers) == []
        # What is left after a clean stop is still private.
        modes = {p.name: oct(stat.S_IMODE(p.lstat().st_mode)) for p in data_dir.iterdir()}
        assert set(modes.values()) == {"0o600"}, modes

        # The wrong key, and no key: refused, naming the spool, leaking no key. (The retained
        # store is removed, so the spool is what the node trips over.)
        for path in data_dir.glob("retained.db*"):
            path.unlink()
        output = _run_fails(certs, data_dir, write_config(tmp_path / "wrong.toml", f'[store]\nkey_file = "{k2}"\n'))
        assert "encrypted with another key" in output and str(data_dir / "jobs.db") in output, output
        for key in (k1, k2):
            text = key.read_text().strip()
            assert text not in output and base64.b64decode(text).hex()[:16] not in output
        for path in data_dir.glob("retained.db*"):
            path.unlink()
        output = _run_fails(certs, data_dir, None)
        assert "job spool is encrypted" in output and "store.key_file" in output, output

        # The right key: every job comes back, intact, to a worker.
        for path in data_dir.glob("retained.db*"):
            path.unlink()
        node = _start(tmp_path, certs, data_dir, key_config)
        nodes.append(node)
        got: dict[str, bytes] = {}

        def work(job_id: str, payload: bytes) -> bytes:
            got[job_id] = payload
            return b"ok"

        worker = MqttWorker(node.mqtt_port, "scan", work)
        clients.append(worker)
        wait_until(lambda: len(got) == len(jobs), 20, "the spooled jobs to be worked")
        assert got == jobs
    finally:
        for client in clients:
            client.close()
        stop_all(nodes)
    shutil.rmtree(keys)
